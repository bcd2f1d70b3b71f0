"""Online RPO's CPU-checkable parts: best/worst pair selection, the DPO JSONL read back by
NeMo-Aligner's own DPO dataset builder, and Aligner's DPO `loss_func` for each `rpo_*` kind (and
`dpo`) against the core's `preference_loss` and hand formulas (REFERENCE §6).

Aligner's `loss_func` is called unbound on a minimal stand-in for `MegatronGPTDPOModel` (the four
attributes and two helpers it reads), in a one-process gloo group with Megatron's model-parallel
state at TP=1 (it asks for the context-parallel size).
"""

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pair selection


def test_best_worst_pairs_skip_ties_and_keep_both_rewards():
    from nemo_plugins.aligner.rpo_pairs import RPOPair, SampledPrompt, select_pairs

    samples = [
        SampledPrompt("p0", ["a", "b", "c", "d"], [0.1, 0.9, -0.3, 0.9]),  # best tied: the first sampled (b)
        SampledPrompt("p1", ["a", "b", "c"], [0.5, 0.5, 0.5]),  # all tied: skipped
        SampledPrompt("p2", ["a", "b", "c"], [1.0, 0.0, 0.0]),  # worst tied: the first sampled (b)
        SampledPrompt("p3", ["only"], [2.0]),  # nothing to compare
        SampledPrompt("p4", ["x", "y"], [-1.0, 3.0]),
    ]
    pairs, skipped = select_pairs(samples)
    assert pairs == [RPOPair("p0", "b", "c", 0.9, -0.3), RPOPair("p2", "a", "b", 1.0, 0.0), RPOPair("p4", "y", "x", 3.0, -1.0)]
    assert skipped == {"all_tied": 1, "too_few": 1}
    with pytest.raises(ValueError, match="non-finite rewards"):
        SampledPrompt("p", ["a", "b"], [0.0, math.nan])
    with pytest.raises(ValueError, match="2 responses but 1 rewards"):
        SampledPrompt("p", ["a", "b"], [0.0])


def test_write_dpo_jsonl_has_aligners_fields_and_refuses_no_pairs(tmp_path):
    from nemo_plugins.aligner.rpo_pairs import RPOPair, write_dpo_jsonl

    assert write_dpo_jsonl([RPOPair("p", "good", "bad", 1.5, 0.25)], tmp_path / "d.jsonl") == 1
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "p", "chosen_response": "good", "rejected_response": "bad", "chosen_reward": 1.5,
                     "rejected_reward": 0.25}]  # fmt: skip
    with pytest.raises(ValueError, match="no preference pairs"):
        write_dpo_jsonl([], tmp_path / "e.jsonl")
    assert not (tmp_path / "e.jsonl").exists()


# ----------------------------------------------------------------------------- Aligner reads it


class _NemoStyleTokenizer:
    """The members Aligner's DPO dataset uses, over the project's ChatTokenizer."""

    def __init__(self, tok):
        self.tok, self.eos_id = tok, tok.eos_id

    def text_to_ids(self, text):
        return self.tok.encode(text)


@pytest.mark.aligner
def test_aligners_dpo_dataset_reads_the_written_pairs(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    from nemo_aligner.algorithms.dpo import dpo_custom_collate
    from nemo_aligner.data.nlp.builders import build_train_valid_test_dpo_datasets

    from nemo_plugins.aligner.rpo_pairs import SampledPrompt, select_pairs, write_dpo_jsonl
    from nemo_plugins.data.chat import render_example
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer
    from nemo_plugins.data.tokenizer import train_tokenizer

    questions = ["What is 2 + 3?", "What is 4 * 3?", "What is 9 - 1?"]
    tok = ChatTokenizer.tiny(train_tokenizer([render_example(q, "<think>x</think>The answer is 5.", True)[0] for q in questions] * 10, 300))
    samples = [SampledPrompt(tok.prompt(q, i % 2 == 0), ["<think>ok</think>The answer is 5.", "The answer is 6", "no"],
                             [1.1, 0.0, 0.1 * i]) for i, q in enumerate(questions)]  # fmt: skip
    pairs, _ = select_pairs(samples)
    path = tmp_path / "iter0.jsonl"
    write_dpo_jsonl(pairs, path)
    # the model section train_gpt_dpo.py passes, from conf/aligner/rpo.yaml, with the data as online_rpo sets it
    cfg = OmegaConf.load(ROOT / "conf" / "aligner" / "rpo.yaml").model
    cfg.encoder_seq_length = 512  # from the policy's .nemo in a real run
    cfg.data.data_prefix = OmegaConf.create({"train": [str(path)], "validation": [str(path)], "test": [str(path)]})
    train, _, _ = build_train_valid_test_dpo_datasets(
        cfg=cfg, data_prefix=cfg.data.data_prefix, data_impl=cfg.data.data_impl, splits_string=cfg.data.splits_string,
        train_valid_test_num_samples=[-1, -1, -1], seq_length=cfg.data.seq_length, seed=cfg.seed,
        tokenizer=_NemoStyleTokenizer(tok),
    )  # fmt: skip
    assert len(train) == len(pairs) == 3
    for i, pair in enumerate(pairs):
        item = train[i]
        assert (item["chosen_reward"], item["rejected_reward"]) == (pair.chosen_reward, pair.rejected_reward)
        assert not item["ignore_example"]
        prompt_len = len(tok.encode(pair.prompt))
        for key, response in (("chosen", pair.chosen_response), ("rejected", pair.rejected_response)):
            full = tok.encode(pair.prompt + response)
            n = item[f"{key}_length"]
            assert item[key][:n].tolist() == full[:-1]  # inputs: all but the last token
            labels = item[f"{key}_labels"][:n].tolist()
            assert labels == [-100] * (prompt_len - 1) + full[prompt_len:]  # the loss reads the response only
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the collate builds its masks on CUDA
    batch = dpo_custom_collate([train[i] for i in range(3)], eos_id=tok.eos_id)
    assert batch["chosen_rewards"].tolist() == pytest.approx([p.chosen_reward for p in pairs])
    assert batch["rejected_rewards"].tolist() == pytest.approx([p.rejected_reward for p in pairs])


# ----------------------------------------------------------------------------- Aligner's loss = the core's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_parallel():
    """A one-process gloo group with Megatron's model-parallel state at TP=PP=CP=1."""
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


class _DPOLossHost:
    """What `MegatronGPTDPOModel.loss_func` reads from `self`: the loss kind, β, η and two helpers."""

    def __init__(self, kind, beta, eta):
        from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel as M

        self.preference_loss, self.ref_policy_kl_penalty, self.gt_reward_scale = kind, beta, eta
        self.get_reduced_masked_logps = M.get_reduced_masked_logps.__get__(self)
        self.split_output_tensor = M.split_output_tensor.__get__(self)
        self.loss = M.loss_func.__get__(self)


def _hand(kind, d_pi, d_r):
    """REFERENCE §6 written out with plain sigmoids and logs (float64, moderate margins)."""
    p_hat, p_star = torch.sigmoid(d_pi), torch.sigmoid(d_r)

    def kl(p, q):
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()

    return {"rpo_bwd_kl": kl(p_star, p_hat), "rpo_fwd_kl": kl(p_hat, p_star), "rpo_sq": (d_pi - d_r) ** 2,
            "dpo": -torch.log(torch.sigmoid(d_pi))}[kind]  # fmt: skip


@pytest.mark.aligner
@pytest.mark.parametrize("kind", ["rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq", "dpo"])
def test_aligner_dpo_loss_func_equals_the_core_preference_loss(kind, model_parallel):
    pytest.importorskip("nemo_plugins.rl.preference_loss", reason="the core's preference_loss (issue 16, branch issue16-rpo) is not merged yet")
    from nemo_plugins.rl.preference_loss import preference_loss

    gen = torch.Generator().manual_seed(0)
    pairs, width = 6, 9
    beta, eta = 0.3, 3.0
    # Aligner's micro-batch: P chosen rows then P rejected rows; labels -100 on the prompt and padding
    pi = -torch.rand(2 * pairs, width, generator=gen) * 2
    ref = -torch.rand(2 * pairs, width, generator=gen) * 2
    labels = torch.randint(1, 50, (2 * pairs, width), generator=gen)
    for row in range(2 * pairs):
        start, end = 1 + row % 3, width - row % 4
        labels[row, :start] = -100
        labels[row, end:] = -100
    rewards = torch.rand(2 * pairs, generator=gen) * 2
    rewards[1], rewards[pairs + 1] = 0.7, 0.7  # a tied pair
    host = _DPOLossHost(kind, beta, eta)
    loss, _ = host.loss(pi, ref, labels, rewards, cu_seqlens=None, average_log_probs=False)
    mask = labels > -1
    seq_pi, seq_ref = (pi * mask).sum(1).double(), (ref * mask).sum(1).double()
    r = rewards.double()
    core = preference_loss(kind, seq_pi[:pairs], seq_pi[pairs:], seq_ref[:pairs], seq_ref[pairs:], r[:pairs], r[pairs:], beta, eta)
    assert core.shape == (pairs,)
    torch.testing.assert_close(loss.double(), core.mean(), rtol=1e-6, atol=1e-7)
    d_pi = beta * ((seq_pi[:pairs] - seq_ref[:pairs]) - (seq_pi[pairs:] - seq_ref[pairs:]))
    d_r = eta * (r[:pairs] - r[pairs:])
    torch.testing.assert_close(core, _hand(kind, d_pi, d_r), rtol=1e-9, atol=1e-12)


def test_rpo_config_is_the_papers_online_rpo_on_aligners_stock_dpo_keys():
    """conf/aligner/rpo.yaml: Aligner's stock DPO keys plus the driver's `online_rpo` section, with
    LN-Super's RPO (rpo_bwd_kl, lr 4e-7, β 1e-5, η 3.0, batch 64, 500 steps, two iterations)."""
    from omegaconf import OmegaConf

    from nemo_plugins.aligner.online_rpo import OnlineRPOConfig, load_online_rpo_config

    ours = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "aligner" / "rpo.yaml"), resolve=False)
    stock = OmegaConf.to_container(OmegaConf.load(ROOT / "tests" / "fixtures" / "aligner_v0.7.0" / "gpt_dpo.yaml"), resolve=False)
    online = ours.pop("online_rpo")
    from test_aligner_rloo import _flat

    ours, stock = _flat(ours), _flat(stock)
    assert sorted(ours) == sorted(stock)
    assert {k: ours[k] for k in ours if ours[k] != stock[k]} == {
        "trainer.dpo.max_steps": 500, "model.dpo.ref_policy_kl_penalty": 1e-5, "model.dpo.gt_reward_scale": 3.0,
        "model.dpo.preference_loss": "rpo_bwd_kl", "model.optim.lr": 4e-7, "model.optim.sched.min_lr": 4e-8,
    }  # fmt: skip
    assert ours["model.global_batch_size"] == 64
    cfg = load_online_rpo_config(["policy=/c/p.nemo", "prompts=/d/p.jsonl", "work_dir=/r"])
    assert isinstance(cfg, OnlineRPOConfig) and cfg.iterations == 2 and cfg.responses_per_prompt >= 2
    assert set(online) <= set(OnlineRPOConfig.__dataclass_fields__)


# ----------------------------------------------------------------------------- the driver's loop

FAKE_LAUNCH = r'''
import json, pathlib, sys
args = sys.argv[1:]
kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
log = pathlib.Path(sys.argv[0]).with_suffix(".log")
if args[:2] == ["-m", "nemo_plugins.aligner.rpo_sample"]:
    with open(log, "a") as f:
        f.write(f"sample {kv['policy']}\n")
    rows = [{"prompt": "P%d" % i, "responses": ["good", "bad", "meh"], "rewards": [1.0, 0.0, 0.5] if i else [0.3] * 3}
            for i in range(3)]
    pathlib.Path(kv["out"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
else:
    with open(log, "a") as f:
        f.write(f"train {kv['pretrained_checkpoint.restore_from_path']} {kv['model.data.data_prefix']} "
                f"{kv['model.dpo.preference_loss'] if 'model.dpo.preference_loss' in kv else '-'}\n")
    ckpt = pathlib.Path(kv["exp_manager.explicit_log_dir"]) / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "megatron_gpt.nemo").write_text("policy")
'''


def test_online_rpo_hands_each_iterations_policy_to_the_next_and_resumes(tmp_path):
    """With a stand-in launcher (records its commands, writes what the GPU steps would): iteration 1
    samples from and is referenced to iteration 0's trained policy, the pairs file holds the
    non-tied prompts, and a rerun runs nothing again."""
    from nemo_plugins.aligner.online_rpo import load_online_rpo_config, run_online_rpo

    fake = tmp_path / "launch.py"
    fake.write_text(FAKE_LAUNCH)
    argv = ["policy=/c/start.nemo", f"prompts={tmp_path / 'p.jsonl'}", f"work_dir={tmp_path / 'rpo'}",
            f"launch={sys.executable} {fake}", "dpo_overrides=[model.dpo.preference_loss=rpo_sq]"]  # fmt: skip
    final = run_online_rpo(load_online_rpo_config(argv))
    it0, it1 = tmp_path / "rpo" / "iter0", tmp_path / "rpo" / "iter1"
    assert final == str(it1 / "train" / "checkpoints" / "megatron_gpt.nemo")
    data = "{train: [%s], validation: [%s], test: [%s]}"
    assert (tmp_path / "launch.log").read_text().splitlines() == [
        "sample /c/start.nemo",
        f"train /c/start.nemo {data % ((it0 / 'pairs.jsonl',) * 3)} rpo_sq",
        f"sample {it0 / 'train' / 'checkpoints' / 'megatron_gpt.nemo'}",
        f"train {it0 / 'train' / 'checkpoints' / 'megatron_gpt.nemo'} {data % ((it1 / 'pairs.jsonl',) * 3)} rpo_sq",
    ]
    pairs = [json.loads(line) for line in (it0 / "pairs.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["chosen_response"], p["rejected_response"]) for p in pairs] == [("P1", "good", "bad"), ("P2", "good", "bad")]
    run_online_rpo(load_online_rpo_config(argv))  # everything exists: nothing runs again
    assert len((tmp_path / "launch.log").read_text().splitlines()) == 4
    with pytest.raises(Exception, match="responses_per_prompt=1: expected >= 2"):
        load_online_rpo_config([*argv, "responses_per_prompt=1"])
    with pytest.raises(Exception, match="policy is not set"):
        load_online_rpo_config(argv[1:])


def test_online_rpo_training_overrides_compose_with_rpo_yaml():
    """The DPO command's Hydra overrides (and a dpo_overrides entry) exist in conf/aligner/rpo.yaml."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from pathlib import Path as P

    from nemo_plugins.aligner.online_rpo import load_online_rpo_config, train_command

    cfg = load_online_rpo_config(["policy=/c/p.nemo", "prompts=/d/p.jsonl", "work_dir=/r", "dpo_overrides=[trainer.devices=4]"])
    cmd = train_command(cfg, "/c/p.nemo", P("/r/iter0/pairs.jsonl"), P("/r/iter0/train"))
    overrides = [w for w in cmd if "=" in w and not w.startswith("--")]
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "aligner"), version_base=None):
        dpo = compose(config_name="rpo", overrides=overrides)
    assert dpo.pretrained_checkpoint.restore_from_path == "/c/p.nemo" and (dpo.trainer.num_nodes, dpo.trainer.devices) == (1, 4)
    assert list(dpo.model.data.data_prefix.train) == ["/r/iter0/pairs.jsonl"] and dpo.model.peft.peft_scheme == "none"
    assert dpo.exp_manager.explicit_log_dir == "/r/iter0/train" and dpo.model.dpo.preference_loss == "rpo_bwd_kl"
