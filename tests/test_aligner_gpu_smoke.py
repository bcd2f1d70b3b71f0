"""The 1xH100 NeMo-Aligner smoke test (ALIGNER.md, issue 18): a 2-layer GPT `.nemo` at TP=1 with
AdamW and TensorRT-LLM off, 2 GRPO steps against the rule reward server on localhost, then 5 RPO
steps from that checkpoint.

The GPU test (`gpu` + `aligner`) runs in the Aligner image (docker/aligner.Dockerfile), whose NeMo
and NeMo-Aligner checkouts hold the HF -> .nemo converter and `train_gpt_dpo.py` (the wheels lack
them; `NEMO_DIR` and `ALIGNER_DIR` point elsewhere). Its steps, each a separate process as a user
runs them:

1. a random 2-layer HF Llama (tests/hf_llama.py) -> `.nemo` through `nemo_plugins.aligner.to_nemo`;
2. `nemo_plugins.aligner.reward_server` on 127.0.0.1 over the world-task prompts;
3. `python -m nemo_plugins.aligner.train_grpo` for 2 steps (`grpo_overrides`): exits 0, leaves
   `checkpoints/megatron_gpt.nemo`, logs finite rollout rewards within the rule rewards' range
   and finite losses;
4. `rpo_sample` (the online driver's `sample_command`) from the GRPO checkpoint against the
   server: every prompt gets its responses and finite rewards;
5. the online RPO driver (`iterations=1`, `dpo_overrides`) over samples whose rewards the core's
   `RuleScorer` gave (a random policy's own samples all score 0, and all-tied prompts make no
   pair): Aligner's `train_gpt_dpo.py` with `rpo_bwd_kl` for 5 steps from the GRPO checkpoint.
   With beta = 1e-5 the policy/reference log-ratio term is negligible, so each step's loss is the
   hand value KL(sigmoid(eta * (r_chosen - r_rejected)) || 1/2).

The file is named for the aligner tier's `tests/test_aligner_*.py`, so the README's test command
runs its CPU tests in the Aligner venv. They check what the GPU run cannot be checked for here: the exact
override lists compose against conf/aligner/{grpo,rpo}.yaml (and pass `check_config`), NeMo's
tokenizer for the converted model encodes the prompt rows as the reward server keys them, and
the TensorBoard reader the GPU test asserts through.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.aligner

REPO = Path(__file__).resolve().parent.parent
SEQ_LENGTH = 512  # the HF model's max_position_embeddings (tests/hf_llama.py), kept by the converter
GRPO_STEPS, RPO_STEPS = 2, 5
NEMO_NAME = "megatron_gpt"  # exp_manager.name of both stages: checkpoints/megatron_gpt.nemo
QUESTIONS = [(f"What is {a} + {b}?", a + b) for a, b in ((2, 3), (4, 1), (3, 3), (5, 2), (1, 6), (2, 2))]
# AdamW instead of the stock distributed_fused_adam: its bucket/overlap keys would reach torch's
# AdamW constructor, and the checkpoint's own optim block is dropped (overwrite_base_config)
ADAMW = ["model.megatron_amp_O2=False", "model.optim.name=adamw", "~model.optim.bucket_cap_mb",
         "~model.optim.overlap_grad_sync", "~model.optim.contiguous_grad_buffer", "model.optim.sched.warmup_steps=1",
         "model.optim.sched.constant_steps=0", "+model.overwrite_base_config.optim=True",
         "++model.tensor_model_parallel_size=1", "++model.pipeline_model_parallel_size=1"]  # fmt: skip


# --------------------------------------------------------------------------- inputs and commands


def write_world_prompts(path: Path) -> Path:
    """The project's RL prompt JSONL (world task) the reward server and prompt rows come from."""
    path.write_text("".join(json.dumps({"prompt": q, "answer": a, "task": "world", "id": f"q{i}"}) + "\n"
                            for i, (q, a) in enumerate(QUESTIONS)))  # fmt: skip
    return path


def write_aligner_prompt_file(prompts: Path, tokenizer_dir: Path, out: Path):
    """Aligner's prompt JSONL (`prompt_set`: each question under both thinking modes); returns the rows."""
    from nemo_plugins.aligner.prompt_set import load_prompt_set, write_aligner_prompts
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer

    prompt_set = load_prompt_set([prompts], ChatTokenizer.from_dir(tokenizer_dir), (True, False))
    write_aligner_prompts(prompt_set, out)
    return prompt_set


def data_prefix(path: Path) -> str:
    return f"{{train: [{path}], validation: [{path}], test: [{path}]}}"


def reward_server_command(prompts: Path, tokenizer_dir: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "nemo_plugins.aligner.reward_server", f"prompts=[{prompts}]", f"tokenizer={tokenizer_dir}",
            f"port={port}", "host=127.0.0.1", "workers=1"]  # fmt: skip


def grpo_overrides(policy: Path, aligner_prompts: Path, port: int, log_dir: Path) -> list[str]:
    """2 GRPO steps on one GPU: 2 prompts x G=2 rollouts, one optimizer step of 4 rows per step,
    32 new tokens, NeMo generation (TensorRT-LLM off), validation and the checkpoint at the end."""
    return [
        f"pretrained_checkpoint.restore_from_path={policy}", f"model.data.data_prefix={data_prefix(aligner_prompts)}",
        "remote_rm.reward_model.ip=127.0.0.1", f"remote_rm.reward_model.port={port}",
        "trainer.num_nodes=1", "trainer.devices=1", f"trainer.reinforce.max_steps={GRPO_STEPS}",
        f"trainer.reinforce.val_check_interval={GRPO_STEPS}", "trainer.reinforce.num_rollouts_per_prompt=2",
        "trainer.reinforce.trt_llm.enable=False", "model.reinforce.num_rollout_samples=2",
        "model.reinforce.rollout_micro_batch_size=2", "model.reinforce.offload_adam_states=False",
        "model.reinforce.length_params.max_length=32", "model.global_batch_size=4", "model.micro_batch_size=2",
        f"model.encoder_seq_length={SEQ_LENGTH}", *ADAMW,
        f"exp_manager.explicit_log_dir={log_dir}", f"exp_manager.name={NEMO_NAME}",
    ]  # fmt: skip


def dpo_overrides() -> list[str]:
    """5 RPO steps on one GPU: 2 pairs a step, validation and the checkpoint at step 5."""
    return ["trainer.devices=1", f"trainer.dpo.max_steps={RPO_STEPS}", f"trainer.dpo.val_check_interval={RPO_STEPS}",
            f"trainer.dpo.save_interval={RPO_STEPS}", "trainer.dpo.limit_val_batches=2", "model.global_batch_size=2",
            "model.micro_batch_size=1", *ADAMW, "~model.optim.overlap_param_sync"]  # fmt: skip


def online_rpo_args(policy: Path, aligner_prompts: Path, work_dir: Path, port: int, aligner_dir: str) -> list[str]:
    """The online RPO driver's key=value arguments: one iteration, the DPO overrides above."""
    return [f"policy={policy}", f"prompts={aligner_prompts}", f"work_dir={work_dir}", "iterations=1",
            "responses_per_prompt=3", "max_new_tokens=16", "rm_host=127.0.0.1", f"rm_port={port}",
            f"launch={sys.executable} -m torch.distributed.run --standalone --nproc-per-node=1",
            f"aligner_dir={aligner_dir}", f"dpo_overrides=[{','.join(dpo_overrides())}]"]  # fmt: skip


def hand_rpo_bwd_kl(chosen_reward: float, rejected_reward: float, eta: float) -> float:
    """rpo_bwd_kl at policy == reference: KL(p* || 1/2) with p* = sigmoid(eta * reward gap)."""
    p = 1.0 / (1.0 + math.exp(-eta * (chosen_reward - rejected_reward)))
    return p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))


def read_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar across the TensorBoard event files under `log_dir` (NeMo's exp_manager logger)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from nemo_plugins.aligner.train_grpo import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


# --------------------------------------------------------------------------- CPU: the commands compose


def test_smoke_grpo_overrides_compose_and_pass_the_entry_checks(tmp_path):
    from nemo_plugins.aligner.train_grpo import check_config

    cfg = _compose("grpo", grpo_overrides(tmp_path / "policy.nemo", tmp_path / "p.jsonl", 5599, tmp_path / "grpo"))
    settings = check_config(cfg)
    assert settings.loss.aggregation == "token"
    r, m = cfg.trainer.reinforce, cfg.model
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, r.max_steps, r.num_rollouts_per_prompt) == (1, 1, 2, 2)
    assert r.trt_llm.enable is False and r.save_interval == GRPO_STEPS  # saved (and validated) at the last step
    assert (m.reinforce.num_rollout_samples, m.reinforce.num_val_samples, m.reinforce.forward_micro_batch_size) == (2, 2, 2)
    assert m.reinforce.length_params.max_length == 32 and cfg.remote_rm.pad_to_length == SEQ_LENGTH
    assert (cfg.remote_rm.reward_model.ip, cfg.remote_rm.reward_model.port) == ("127.0.0.1", 5599)
    assert list(m.data.data_prefix.train) == list(m.data.data_prefix.validation) == [str(tmp_path / "p.jsonl")]
    optim = {k: v for k, v in m.optim.items() if k != "sched"}
    assert optim == {"name": "adamw", "lr": 9e-7, "weight_decay": 0.1, "betas": [0.9, 0.98]}  # only AdamW's kwargs
    assert m.megatron_amp_O2 is False and m.overwrite_base_config.optim is True and m.overwrite_base_config.data.data_prefix
    assert cfg.exp_manager.checkpoint_callback_params.model_parallel_size == 1  # TP x PP
    assert cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end is True
    assert cfg.exp_manager.name == NEMO_NAME and cfg.exp_manager.explicit_log_dir == str(tmp_path / "grpo")


def test_smoke_rpo_driver_arguments_parse_and_its_dpo_command_composes(tmp_path):
    from nemo_plugins.aligner.online_rpo import load_online_rpo_config, sample_command, train_command

    args = online_rpo_args(tmp_path / "grpo.nemo", tmp_path / "p.jsonl", tmp_path / "rpo", 5599, "/opt/NeMo-Aligner")
    cfg = load_online_rpo_config(args)
    assert cfg.iterations == 1 and cfg.dpo_overrides == dpo_overrides()
    sample = sample_command(cfg, str(tmp_path / "grpo.nemo"), tmp_path / "s.jsonl")
    assert sample[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m"]
    assert "rm_port=5599" in sample and "responses_per_prompt=3" in sample and "max_new_tokens=16" in sample
    it0 = tmp_path / "rpo" / "iter0"
    cmd = train_command(cfg, str(tmp_path / "grpo.nemo"), it0 / "pairs.jsonl", it0 / "train")
    assert cmd[5] == "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py"
    config_path, config_name = cmd[6:8]
    assert config_path == f"--config-path={REPO / 'conf' / 'aligner'}" and config_name == "--config-name=rpo"
    dpo = _compose("rpo", cmd[8:])
    assert dpo.model.dpo.preference_loss == "rpo_bwd_kl" and (dpo.model.dpo.ref_policy_kl_penalty, dpo.model.dpo.gt_reward_scale) == (1e-5, 3.0)
    assert (dpo.trainer.num_nodes, dpo.trainer.devices, dpo.trainer.dpo.max_steps, dpo.trainer.max_steps) == (1, 1, 5, 5)
    assert (dpo.trainer.dpo.val_check_interval, dpo.trainer.dpo.save_interval) == (RPO_STEPS, RPO_STEPS)
    assert (dpo.model.global_batch_size, dpo.model.micro_batch_size, dpo.model.peft.peft_scheme) == (2, 1, "none")
    optim = {k: v for k, v in dpo.model.optim.items() if k != "sched"}
    assert optim == {"name": "adamw", "lr": 4e-7, "weight_decay": 0.1, "betas": [0.9, 0.98]}
    assert dpo.pretrained_checkpoint.restore_from_path == str(tmp_path / "grpo.nemo")
    assert list(dpo.model.data.data_prefix.train) == [str(it0 / "pairs.jsonl")]
    assert dpo.exp_manager.explicit_log_dir == str(it0 / "train") and dpo.exp_manager.name == NEMO_NAME
    assert dpo.exp_manager.checkpoint_callback_params.model_parallel_size == 1


def test_nemo_tokenizer_of_the_converted_model_encodes_the_rows_as_the_server_keys_them(tmp_path):
    """The converter points the `.nemo` at the HF directory's tokenizer (library huggingface,
    use_fast); NeMo's tokenizer from that encodes each Aligner prompt row (what the trainer's
    dataset tokenizes) to the ids the reward server's index keys it by, with the same EOS."""
    from hf_llama import write_hf_llama
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    from nemo_plugins.aligner.prompt_index import PromptIndex
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer

    hf = write_hf_llama(tmp_path / "hf", layers=2)
    rows = write_aligner_prompt_file(write_world_prompts(tmp_path / "p.jsonl"), hf, tmp_path / "aligner.jsonl").rows
    chat = ChatTokenizer.from_dir(hf)
    index = PromptIndex(rows, chat.encode)
    nemo_tok = get_nmt_tokenizer(library="huggingface", model_name=str(hf), use_fast=True)
    assert nemo_tok.eos_id == chat.eos_id
    texts = [json.loads(line)["text"] for line in (tmp_path / "aligner.jsonl").read_text().splitlines()]
    assert len(texts) == len(rows) == 2 * len(QUESTIONS)
    for row, text in zip(rows, texts):
        ids = nemo_tok.text_to_ids(text)
        assert index.match(ids + [7, chat.eos_id]) == (row, len(ids))

    # the GPU test's RPO samples: every prompt gives a pair with the same reward gap (right and
    # formatted over no format and no answer), so its hand loss holds for every step
    from nemo_plugins.aligner.online_rpo import read_samples
    from nemo_plugins.aligner.rpo_pairs import select_pairs

    _samples_scored_by_the_rules(rows, tmp_path / "iter0" / "samples.jsonl")
    pairs, skipped = select_pairs(read_samples(tmp_path / "iter0" / "samples.jsonl"))
    assert len(pairs) == len(rows) and not skipped
    assert [(p.chosen_reward, p.rejected_reward) for p in pairs] == [(pytest.approx(1.1), 0.0)] * len(rows)


def test_read_scalars_reads_what_a_tensorboard_logger_wrote(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for run, offset in (("a", 0), ("b", 10)):
        w = SummaryWriter(str(tmp_path / run))
        for step in range(3):
            w.add_scalar("train/loss", offset + step * 0.5, step + offset)
        w.add_scalar("other", 1.0, 0)
        w.close()
    assert read_scalars(tmp_path, "train/loss") == [(0, 0.0), (1, 0.5), (2, 1.0), (10, 10.0), (11, 10.5), (12, 11.0)]
    assert read_scalars(tmp_path, "missing") == []


def test_hand_rpo_bwd_kl_equals_the_core_at_policy_equal_reference():
    from nemo_plugins.rl.preference_loss import preference_loss

    zero = torch.zeros(3, dtype=torch.float64)
    chosen, rejected = torch.tensor([1.1, 0.1, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 0.1], dtype=torch.float64)
    core = preference_loss("rpo_bwd_kl", zero, zero, zero, zero, chosen, rejected, 1e-5, 3.0)
    assert core.tolist() == pytest.approx([hand_rpo_bwd_kl(c, r, 3.0) for c, r in zip(chosen.tolist(), rejected.tolist())], rel=1e-12)
    assert hand_rpo_bwd_kl(1.1, 0.0, 3.0) == pytest.approx(0.5395, abs=1e-4)


# --------------------------------------------------------------------------- GPU: the smoke run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log: Path, timeout_s: float = 1200.0, env: dict | None = None) -> None:
    """Run `cmd` from the repository root (its output to `log`); fail with the log's tail if it does not exit 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
    assert rc == 0, f"$ {shlex.join(cmd)}\nexited {rc}; last lines of {log}:\n{log.read_text()[-6000:]}"


def _samples_scored_by_the_rules(rows, path: Path) -> None:
    """rpo_sample's format, 3 responses per prompt row (right and formatted, wrong and formatted,
    no format and no answer), rewards from the core's RuleScorer (what the rule server returns)."""
    from nemo_plugins.rl.rewards import RewardConfig
    from nemo_plugins.rl.scoring import Reference, RuleScorer, SandboxLimits

    lines = []
    with RuleScorer(RewardConfig("world"), SandboxLimits(workers=0)) as scorer:
        for row in rows:
            a = int(row.answer)
            right = f"<think>so {a}</think>The answer is {a}." if row.thinking else f"The answer is {a}."
            wrong = f"<think>so {a + 1}</think>The answer is {a + 1}." if row.thinking else f"The answer is {a + 1}."
            responses = [right, wrong, "no idea"]
            rewards = scorer.score(responses, [Reference(row.answer, row.thinking)] * 3).total.tolist()
            assert rewards[0] > rewards[1] > rewards[2], (row, rewards)
            lines.append(json.dumps({"prompt": row.text, "responses": responses, "rewards": rewards}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines))


@pytest.mark.gpu
def test_grpo_two_steps_then_rpo_five_steps_on_one_gpu(tmp_path):
    from hf_llama import write_hf_llama

    from nemo_plugins.aligner.online_rpo import load_online_rpo_config, sample_command
    from nemo_plugins.aligner.rm_host import server_ready
    from nemo_plugins.aligner.to_nemo import CONVERTER

    nemo_dir, aligner_dir = os.environ.get("NEMO_DIR", "/opt/NeMo"), os.environ.get("ALIGNER_DIR", "/opt/NeMo-Aligner")
    if not (Path(nemo_dir) / CONVERTER).is_file() or not (Path(aligner_dir) / "examples/nlp/gpt/train_gpt_dpo.py").is_file():
        pytest.skip(f"needs the NeMo and NeMo-Aligner checkouts of Aligner's image (NEMO_DIR={nemo_dir}, "
                    f"ALIGNER_DIR={aligner_dir}): the converter and train_gpt_dpo.py are not in the wheels")  # fmt: skip

    # 1. a 2-layer GPT .nemo from a random HF Llama, through the project's boundary module
    hf = write_hf_llama(tmp_path / "hf", layers=2)
    policy = tmp_path / "policy.nemo"
    _run([sys.executable, "-m", "nemo_plugins.aligner.to_nemo", f"hf_dir={hf}", f"out={policy}", f"nemo_dir={nemo_dir}"],
         tmp_path / "to_nemo.log")  # fmt: skip
    assert policy.is_file() and policy.stat().st_size > 0

    prompts = write_world_prompts(tmp_path / "prompts.jsonl")
    aligner_prompts = tmp_path / "aligner_prompts.jsonl"
    rows = write_aligner_prompt_file(prompts, hf, aligner_prompts).rows

    # 2. the rule reward server beside the trainer
    port = _free_port()
    server_log = open(tmp_path / "reward_server.log", "w")
    server = subprocess.Popen(reward_server_command(prompts, hf, port), cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO), "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR")})  # fmt: skip
    try:
        t0 = time.time()
        while not server_ready("127.0.0.1", port):
            assert server.poll() is None, (tmp_path / "reward_server.log").read_text()[-3000:]
            assert time.time() - t0 < 180, "reward server not ready after 180 s"
            time.sleep(0.5)

        # 3. two GRPO steps
        grpo_dir = tmp_path / "grpo"
        _run([sys.executable, "-m", "nemo_plugins.aligner.train_grpo", *grpo_overrides(policy, aligner_prompts, port, grpo_dir)],
             tmp_path / "grpo.log")  # fmt: skip
        grpo_policy = grpo_dir / "checkpoints" / f"{NEMO_NAME}.nemo"
        assert grpo_policy.is_file(), sorted(p.name for p in grpo_dir.rglob("*"))
        rewards = read_scalars(grpo_dir, "train_rollouts/rewards")
        assert [s for s, _ in rewards] == list(range(GRPO_STEPS))
        assert all(0.0 <= r <= 1.1 + 1e-6 for _, r in rewards), rewards  # accuracy + 0.1 x format, world task
        losses = read_scalars(grpo_dir, "train_optim/loss")
        assert len(losses) == GRPO_STEPS and all(math.isfinite(v) for _, v in losses), losses
        assert read_scalars(grpo_dir, "val_rollouts/rewards"), "no validation at the last step"

        # 4. the driver's sampling step from the GRPO policy, scored by the server
        work = tmp_path / "rpo"
        args = online_rpo_args(grpo_policy, aligner_prompts, work, port, aligner_dir)
        sampled = tmp_path / "sampled.jsonl"
        _run(sample_command(load_online_rpo_config(args), str(grpo_policy), sampled), tmp_path / "rpo_sample.log")
        got = [json.loads(line) for line in sampled.read_text().splitlines()]
        assert [g["prompt"] for g in got] == [r.text for r in rows]
        assert all(len(g["responses"]) == len(g["rewards"]) == 3 for g in got)
        assert all(math.isfinite(x) and 0.0 <= x <= 1.1 + 1e-6 for g in got for x in g["rewards"])

        # 5. five RPO steps through the online driver, from the GRPO checkpoint
        _samples_scored_by_the_rules(rows, work / "iter0" / "samples.jsonl")
        _run([sys.executable, "-m", "nemo_plugins.aligner.online_rpo", *args], tmp_path / "online_rpo.log")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    train_dir = work / "iter0" / "train"
    assert (train_dir / "checkpoints" / f"{NEMO_NAME}.nemo").is_file()
    pairs = [json.loads(line) for line in (work / "iter0" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == len(rows)
    gaps = {round(p["chosen_reward"] - p["rejected_reward"], 6) for p in pairs}
    assert len(gaps) == 1, gaps  # every pair: right-and-formatted over unformatted
    expected = hand_rpo_bwd_kl(pairs[0]["chosen_reward"], pairs[0]["rejected_reward"], 3.0)
    losses = read_scalars(train_dir, "train/loss")
    assert [s for s, _ in losses] == list(range(RPO_STEPS))
    assert [v for _, v in losses] == pytest.approx([expected] * RPO_STEPS, abs=2e-3)
    assert read_scalars(train_dir, "val/loss"), "no validation at step 5"
