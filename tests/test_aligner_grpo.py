"""GRPO on NeMo-Aligner 0.7.0 (`nemo_plugins.aligner.grpo_*`, `train_grpo`), on a CPU.

- The actor's loss closure, driven by its own `get_loss_and_metrics` through megatron-core's
  forward-backward schedule on a tiny megatron-core GPT (one-process gloo group, TP=1), equals
  the core's `grpo_loss` on the full batch, with one and with two micro-batches, and so do the
  gradients.
- The trainer's advantages and keep mask equal hand formulas (and the core's) for a reward
  tensor with zero-variance groups.
- With two data-parallel processes: the actor's loss is each rank's share of the global batch
  (gradients averaged over the ranks equal the core's full-batch gradients), and the trainer's
  `_run_inference` gives the ranks disjoint whole prompt groups covering the rollout batch.
- The two REINFORCE bookkeeping bugs of Aligner 0.7.0 (ALIGNER.md), shown on the installed
  stock code and fixed by the subclass.
- The Hydra entry script's config (the `model.reinforce.grpo` keys themselves and the rank
  split's properties are in tests/test_aligner_grpo_core.py, which needs no Aligner).

Aligner's REINFORCE modules import TensorRT-LLM at import time; without it a stand-in module for
`nemo_aligner.utils.trt_llm` is registered (generation with TensorRT-LLM is not exercised here).
"""

import importlib.util
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.aligner

REPO = Path(__file__).resolve().parent.parent


def _stand_in_trt_llm():
    if "nemo_aligner.utils.trt_llm" not in sys.modules and importlib.util.find_spec("tensorrt_llm") is None:
        stand_in = types.ModuleType("nemo_aligner.utils.trt_llm")
        stand_in.GPTGenerateTRTLLM = None  # only referenced when reinforce.trt_llm.enable
        sys.modules["nemo_aligner.utils.trt_llm"] = stand_in


@pytest.fixture(scope="module")
def cpu_world():
    """A one-process gloo group with megatron's TP=1/PP=1 state and the CPU patches (megatron's
    schedule allocates its token counter on "cuda": `training_cpu` keeps it on the CPU)."""
    _stand_in_trt_llm()
    sys.path.insert(0, str(Path(__file__).parent))
    from nemo_cpu_shim import megatron_cpu, training_cpu

    with megatron_cpu(), training_cpu():
        yield


def _model_cfg(**grpo):
    from omegaconf import OmegaConf

    return OmegaConf.create({"micro_batch_size": 2, "global_batch_size": 4, "data": {}, "optim": {"name": "adam"},
                             "reinforce": {"grpo": grpo}})  # fmt: skip


# --------------------------------------------------------------------------- actor loss


def _tiny_gpt(vocab):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                            params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                            bias_dropout_fusion=False, gradient_accumulation_fusion=False,
                            masked_softmax_fusion=False, persist_layer_norm=False)  # fmt: skip
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                    max_sequence_length=64, position_embedding_type="rope")  # fmt: skip


def _actor(gpt, model_cfg, eos_id):
    """A GRPOActor around a bare megatron-core GPT: the members its training step reads, without
    a NeMo checkpoint, a Lightning trainer or CUDA."""
    from nemo_plugins.aligner.grpo_actor import GRPOActor

    actor = GRPOActor.__new__(GRPOActor)
    torch.nn.Module.__init__(actor)
    actor._cfg = model_cfg
    actor.model = gpt
    actor.tokenizer = types.SimpleNamespace(eos_id=eos_id)
    actor.with_distributed_adam = False
    actor.use_mcore_dist_optim = False
    return actor


def _rollout(B=4, T=12, vocab=40, seed=1):
    """Tokens, a response mask over predicting positions [B, T−1] with ragged prompts/responses,
    advantages, a keep mask with one dropped group, and old/reference log-prob offsets."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (B, T), generator=g)
    prompt_lengths, response_lengths = torch.tensor([3, 5, 2, 4]), torch.tensor([12, 9, 11, 7])
    mask = torch.zeros(B, T - 1)
    for i in range(B):
        mask[i, prompt_lengths[i] - 1 : response_lengths[i] - 1] = 1.0  # Aligner's create_mask
    return {
        "response_tokens": tokens,
        "mask": mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1]),
        "keep": torch.tensor([True, True, False, False]),
        "old_offset": 0.6 * torch.randn(B, T - 1, generator=g),  # ratios e^±0.6 typical: the clip range is left
        "ref_offset": 0.2 * torch.randn(B, T - 1, generator=g),
    }


def _core_reference(gpt, rollout, cfg):
    """The core's loss and gradients on the full batch: `token_logprobs` of the plain forward."""
    from nemo_plugins.rl.grpo_loss import grpo_loss
    from nemo_plugins.rl.policy_loss import token_logprobs

    tokens = rollout["response_tokens"]
    gpt.zero_grad(set_to_none=True)
    T = tokens.size(1)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)[None, None].expand(tokens.size(0), 1, T, T)
    logits = gpt(tokens, torch.arange(T)[None].expand_as(tokens), causal, labels=None)
    logp = token_logprobs(logits, tokens)[:, :-1]
    with torch.no_grad():
        old, ref = logp + rollout["old_offset"], logp + rollout["ref_offset"]
    loss, _ = grpo_loss(logp, old, ref, rollout["advantages"], rollout["mask"], cfg, keep=rollout["keep"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in gpt.named_parameters()}
    return loss.item(), grads, old, ref


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_actor_loss_closure_equals_core_loss_full_batch_and_micro_batches(cpu_world, aggregation):
    from nemo_aligner.utils.utils import configure_batch_sizes

    from nemo_plugins.aligner.grpo_config import GRPOSettings

    vocab = 40
    gpt = _tiny_gpt(vocab)
    rollout = _rollout(vocab=vocab)
    model_cfg = _model_cfg(clip_low=0.2, clip_high=0.28, kl_beta=0.05, aggregation=aggregation)
    settings = GRPOSettings.from_model_cfg(model_cfg)
    core_loss, core_grads, old, ref = _core_reference(gpt, rollout, settings.loss)
    assert core_loss != 0 and all(g.abs().sum() > 0 for n, g in core_grads.items() if "layers.0" in n)

    actor = _actor(gpt, model_cfg, eos_id=0)  # eos 0 never occurs in the tokens: plain causal masks
    for micro_batch_size in (4, 2):  # one micro-batch, then two
        model_cfg.micro_batch_size = micro_batch_size
        configure_batch_sizes(mbs=micro_batch_size, gbs=4, dp=1)
        gpt.zero_grad(set_to_none=True)
        batch = {k: rollout[k] for k in ("response_tokens", "mask", "advantages", "keep")}
        batch |= {"logprobs": old, "init_logprobs": ref}
        loss, metrics = actor.get_loss_and_metrics(batch=batch, forward_only=False)
        assert loss == pytest.approx(core_loss, rel=1e-5, abs=1e-7), micro_batch_size
        assert metrics["pg_loss"] + 0.05 * metrics["kl_loss"] == pytest.approx(core_loss, rel=1e-5, abs=1e-7)
        assert 0 < metrics["clip_fraction"] < 1  # the clipped branch was exercised
        for name, p in gpt.named_parameters():
            torch.testing.assert_close(p.grad, core_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name} mbs={micro_batch_size}")


def _data_parallel_step(rank, world_size, aggregation):
    """Rows rank and rank+2 of the rollout on this rank, micro-batches of one row; the gradients
    averaged over the ranks (as NeMo's data-parallel reduction does) must equal the core's
    full-batch gradients, and the reported loss the full-batch loss."""
    from nemo_aligner.utils.utils import configure_batch_sizes

    from nemo_plugins.aligner.grpo_config import GRPOSettings

    gpt = _tiny_gpt(40)
    rollout = _rollout()
    model_cfg = _model_cfg(kl_beta=0.05, aggregation=aggregation)
    core_loss, core_grads, old, ref = _core_reference(gpt, rollout, GRPOSettings.from_model_cfg(model_cfg).loss)
    rows = torch.tensor([rank, rank + 2])  # one kept and one dropped row each, unequal token counts
    batch = {k: rollout[k][rows] for k in ("response_tokens", "mask", "advantages", "keep")}
    batch |= {"logprobs": old[rows], "init_logprobs": ref[rows]}
    model_cfg.micro_batch_size = 1
    configure_batch_sizes(mbs=1, gbs=4, dp=world_size)
    actor = _actor(gpt, model_cfg, eos_id=0)
    gpt.zero_grad(set_to_none=True)
    loss, _ = actor.get_loss_and_metrics(batch=batch, forward_only=False)
    assert loss == pytest.approx(core_loss, rel=1e-5, abs=1e-7), aggregation
    for name, p in gpt.named_parameters():
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad)
        torch.testing.assert_close(grad / world_size, core_grads[name], rtol=1e-4, atol=1e-6, msg=f"{name} {aggregation}")


class _FakePolicy:
    """What `_run_inference` calls on the actor: each `infer` appends two response tokens that
    name (rank, call, row), so every rollout row is unique and traceable."""

    def __init__(self, rank):
        self.rank, self.calls = rank, 0
        self.tokenizer = types.SimpleNamespace(eos_id=0, ids_to_text=lambda ids: " ".join(map(str, ids)))

    def infer(self, batch):
        self.calls += 1
        prompt, b = batch["text"], batch["text"].size(0)
        response = torch.tensor([[100 + 10 * self.rank + self.calls, 1 + j] for j in range(b)])
        return {"response_tokens": torch.cat([prompt, response], 1), "response_lengths": batch["length"] + 2,
                "prompt_lengths": batch["length"], "is_end": torch.ones(b, dtype=torch.bool)}  # fmt: skip

    def get_inference_log_probs(self, tokens):
        return torch.zeros(tokens.size(0), tokens.size(1) - 1)

    get_init_policy_logprobs = get_inference_log_probs


def _row_key(tokens):
    return (tokens[:, 3] * 10 + tokens[:, 4]).tolist()


def _reward_of(tokens):
    return torch.tensor(_row_key(tokens), dtype=torch.float32) % 3


def _data_parallel_rollout(rank, world_size, P=4, G=2):
    """One step of `_run_inference` on this rank over 8 prompts (P a step), with Aligner's random
    sampler and batch iterator; rewards come back through futures, as from the reward client."""
    from nemo.collections.nlp.data.language_modeling.megatron.data_samplers import MegatronPretrainingRandomSampler
    from nemo_aligner.algorithms.reinforce import ReinforceTrainer
    from nemo_aligner.utils.batch_iterators import DefaultBatchIterator

    from nemo_plugins.aligner.grpo_trainer import GRPOTrainer

    dataset = [{"text": torch.full((3,), i + 1), "length": 3} for i in range(8)]

    def builder(consumed_samples):
        sampler = MegatronPretrainingRandomSampler(total_samples=8, consumed_samples=consumed_samples, micro_batch_size=1,
                                                   data_parallel_rank=rank, data_parallel_size=world_size,
                                                   drop_last=True, global_batch_size=P, seed=0)  # fmt: skip
        return types.SimpleNamespace(batch_sampler=sampler, dataset=dataset)

    def trained_rows(trainer_cls):
        trainer = _trainer(G)
        trainer.__class__ = trainer_cls
        trainer.cfg.rollout_batch_seq_length = None
        trainer.trtllm_reshard, trainer.compute_init_policy_kl = False, False
        trainer.model, trainer.batch_iterator_cls = _FakePolicy(rank), DefaultBatchIterator
        trainer.collate_fn = lambda rows: {"text": torch.stack([r["text"] for r in rows]),
                                           "length": torch.tensor([r["length"] for r in rows])}  # fmt: skip
        trainer.rm = types.SimpleNamespace(infer_rm=lambda rollout: types.SimpleNamespace(
            result=lambda tokens=rollout["response_tokens"]: _reward_of(tokens)[:, None]))  # fmt: skip
        local, metrics = trainer._run_inference(builder, consumed_samples=0, is_validation=False)
        assert metrics["rollout_size"] == P * G
        torch.testing.assert_close(local["rewards"], _reward_of(local["response_tokens"]))  # rewards stay on their rows
        return local

    # Aligner gathers 0-dim row counts with all_gather_into_tensor, which NCCL takes and gloo
    # refuses (its input must have the shape of one output chunk): give gloo that shape
    gather = torch.distributed.all_gather_into_tensor
    torch.distributed.all_gather_into_tensor = lambda out, inp, *a, **k: gather(out, inp.reshape(-1) if inp.dim() == 0 else inp, *a, **k)
    try:
        local = trained_rows(GRPOTrainer)
        stock = trained_rows(ReinforceTrainer)
    finally:
        torch.distributed.all_gather_into_tensor = gather
    prompts = local["response_tokens"][:, 0].view(-1, G)
    assert (prompts == prompts[:, :1]).all()  # whole groups, contiguous
    per_rank = [None] * world_size
    torch.distributed.all_gather_object(per_rank, _row_key(local["response_tokens"]))
    assert sum(map(len, per_rank)) == P * G and len(set().union(*per_rank)) == P * G  # disjoint, covering

    stock_rows = [None] * world_size
    torch.distributed.all_gather_object(stock_rows, sorted(_row_key(stock["response_tokens"])))
    assert all(len(rows) == P * G for rows in stock_rows) and stock_rows[0] == stock_rows[1]  # bug 2: all rows everywhere


def _data_parallel_worker(rank, world_size, port, aggregations):
    """One of `world_size` data-parallel ranks (TP=1) in a gloo world."""
    _stand_in_trt_llm()
    from megatron.core import parallel_state
    from nemo_cpu_shim import _cpu_patches, _process_group, training_cpu

    torch.set_num_threads(1)
    with _process_group(rank, world_size, port):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        try:
            with _cpu_patches(), training_cpu():
                assert parallel_state.get_data_parallel_world_size() == world_size
                for aggregation in aggregations:
                    _data_parallel_step(rank, world_size, aggregation)
                _data_parallel_rollout(rank, world_size)
        finally:
            parallel_state.destroy_model_parallel()


def test_two_data_parallel_ranks_actor_normalizer_and_trainer_rows():
    """Two processes, DP=2. The actor (token and sequence aggregation): each rank's loss is its
    share of the global-batch loss, gradients included. The trainer's `_run_inference`: the ranks
    train on disjoint whole groups that cover the global rollout batch (stock: every row on
    every rank, bug 2)."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).parent))
    from nemo_cpu_shim import _free_port

    mp.spawn(_data_parallel_worker, args=(2, _free_port(), ("token", "sequence")), nprocs=2, join=True)


def test_actor_all_groups_dropped_gives_zero_loss_and_gradient(cpu_world):
    from nemo_aligner.utils.utils import configure_batch_sizes

    gpt = _tiny_gpt(40)
    rollout = _rollout()
    model_cfg = _model_cfg()
    actor = _actor(gpt, model_cfg, eos_id=0)
    configure_batch_sizes(mbs=2, gbs=4, dp=1)
    batch = {k: rollout[k] for k in ("response_tokens", "mask", "advantages")}
    batch |= {"keep": torch.zeros(4, dtype=torch.bool), "logprobs": torch.zeros(4, 11)}
    loss, _ = actor.get_loss_and_metrics(batch=batch, forward_only=False)
    assert loss == 0.0 and not math.isnan(loss)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in gpt.parameters())


def test_actor_refuses_what_its_normalizer_does_not_cover(cpu_world):
    actor = _actor(_tiny_gpt(40), _model_cfg(), eos_id=0)
    with pytest.raises(RuntimeError, match="get_loss_and_metrics"):
        actor.grpo_step_scale()  # the closure outside a training step
    actor.cfg.context_parallel_size = 2
    rollout = _rollout()
    with pytest.raises(ValueError, match=r"model\.context_parallel_size=2: the GRPO actor supports 1"):
        actor.count_global_normalizers({"mask": rollout["mask"], "keep": rollout["keep"]}, num_microbatches=1)


# --------------------------------------------------------------------------- trainer advantages


def _trainer(G, penalty=0.0, **grpo):
    """A GRPOTrainer with only the members its rollout bookkeeping reads (no model, no data)."""
    from omegaconf import OmegaConf

    from nemo_aligner.utils.distributed import ScopedTimer

    from nemo_plugins.aligner.grpo_config import GRPOSettings
    from nemo_plugins.aligner.grpo_trainer import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.cfg = OmegaConf.create({"num_rollouts_per_prompt": G, "initial_policy_kl_penalty": penalty,
                                    "use_absolute_kl": True})  # fmt: skip
    trainer.grpo = GRPOSettings.from_mapping(grpo)
    trainer.group_size = G
    trainer.timer = ScopedTimer(reduction="mean", sync_cuda=False, buffer_size=1)
    trainer.step = 0
    return trainer


def _rollout_batch(rewards, T=6):
    n = rewards.numel()
    return {
        "logprobs": torch.zeros(n, T - 1),
        "init_logprobs": torch.zeros(n, T - 1),
        "prompt_lengths": torch.full((n,), 2),
        "response_lengths": torch.full((n,), T),
        "response_tokens": torch.ones(n, T, dtype=torch.long),
        "rewards": rewards,
        "prompt_tokens": torch.arange(n // 2).repeat_interleave(2)[:, None].expand(n, 3),  # for the stock RLOO baseline
        "is_end": torch.ones(n, dtype=torch.bool),
    }


def _hand_advantages(rewards, G, leave_one_out, normalize_std):
    out = []
    for group in rewards.view(-1, G).tolist():
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        for i, r in enumerate(group):
            if max(group) == min(group):
                out.append(0.0)
                continue
            a = r - ((sum(group) - r) / (G - 1) if leave_one_out else mean)
            out.append(a / (std + 1e-6) if normalize_std else a)
    return torch.tensor(out)


@pytest.mark.parametrize("leave_one_out,normalize_std", [(False, True), (True, False)])
@pytest.mark.parametrize("drop_zero_variance", [True, False])
def test_trainer_advantages_equal_the_core_and_hand_formulas(cpu_world, leave_one_out, normalize_std, drop_zero_variance):
    from nemo_plugins.rl.grpo_loss import group_advantages

    G = 4
    rewards = torch.tensor([1.0, 0.0, 1.1, 0.0,  # mixed
                            1.1, 1.1, 1.1, 1.1,  # all equal (solved): zero variance
                            0.0, 0.0, 0.0, 0.0,  # all equal (unsolved): zero variance
                            0.1, 1.1, 0.0, 0.1])  # fmt: skip
    trainer = _trainer(G, leave_one_out=leave_one_out, normalize_std=normalize_std, drop_zero_variance=drop_zero_variance)
    data, metrics = trainer.generate_reinforce_data(_rollout_batch(rewards))

    expected = _hand_advantages(rewards, G, leave_one_out, normalize_std)
    torch.testing.assert_close(data["advantages"], expected, rtol=1e-6, atol=1e-6)
    core = group_advantages(rewards, G, leave_one_out=leave_one_out, normalize_std=normalize_std)
    torch.testing.assert_close(data["advantages"], core, rtol=0, atol=0)
    keep = torch.tensor([True] * 4 + [not drop_zero_variance] * 8 + [True] * 4)
    assert data["keep"].tolist() == keep.tolist()
    assert metrics["groups_dropped_fraction"] == (0.5 if drop_zero_variance else 0.0)
    assert "init_logprobs" not in data  # kl_beta 0: no reference log-probs travel to the actor
    assert data["mask"].sum(1).tolist() == [4.0] * 16  # Aligner's create_mask: positions 1..4


def test_trainer_reward_kl_penalty_shifts_rewards_before_the_groups(cpu_world):
    G = 2
    batch = _rollout_batch(torch.tensor([1.0, 0.0, 0.5, 0.5]))
    batch["init_logprobs"] = batch["init_logprobs"] - torch.tensor([0.0, 0.4, 0.0, 0.2])[:, None]  # |KL| per token
    trainer = _trainer(G, penalty=0.5, normalize_std=False, kl_beta=0.01)
    data, _ = trainer.generate_reinforce_data(batch)
    shaped = torch.tensor([1.0, 0.0 - 0.5 * 0.4, 0.5, 0.5 - 0.5 * 0.2])
    torch.testing.assert_close(data["advantages"], _hand_advantages(shaped, G, False, False))
    assert "init_logprobs" in data  # kl_beta > 0: the actor's k3 term needs them


# --------------------------------------------------------------------------- the two REINFORCE bugs


def test_bug2_stock_chunk_ignores_the_rank(cpu_world):
    """Stock 0.7.0: every data-parallel rank gets every row of the global rollout batch."""
    from nemo_aligner.algorithms.reinforce import ReinforceRolloutBatch

    batch = ReinforceRolloutBatch({"rewards": torch.arange(16.0)})
    rank0, rank1 = (batch.chunk(rank=r, split_size=2, seed=0)["rewards"] for r in range(2))
    assert rank0.tolist() == rank1.tolist() == list(range(16))


def _step_with(trainer_cls, P, G):
    """One `generate_rollouts` of `trainer_cls` over a stand-in rollout of P prompts x G."""
    trainer = _trainer(G, penalty=0.1)  # stock 0.7.0 cannot run with the penalty at 0 (masked_mean of a scalar)
    trainer.__class__ = trainer_cls
    trainer.compute_init_policy_kl = True
    trainer.consumed_samples = 0
    trainer.model = types.SimpleNamespace(prepare_for_inference=lambda: None, finish_inference=lambda: None)
    trainer.train_dataloader_builder = None
    seen = []
    rewards = torch.tensor([0.0, 1.0] * (P * G // 2))

    def fake_inference(builder, consumed_samples, is_validation):
        seen.append(consumed_samples)
        return _rollout_batch(rewards), {"rollout_size": P * G}

    trainer._run_inference = fake_inference
    for _ in range(2):
        trainer.generate_rollouts()
    return seen, trainer.consumed_samples


def test_bug1_consumed_samples_counts_prompts(cpu_world):
    """The prompt dataloader is rebuilt from consumed_samples, which its sampler counts in prompts."""
    from nemo_aligner.algorithms.reinforce import ReinforceTrainer

    from nemo_plugins.aligner.grpo_trainer import GRPOTrainer

    P, G = 8, 4
    seen, consumed = _step_with(GRPOTrainer, P, G)
    assert seen == [0, P] and consumed == 2 * P
    stock_seen, stock_consumed = _step_with(ReinforceTrainer, P, G)
    assert stock_seen == [0, P * G] and stock_consumed == 2 * P * G  # stock: skips (G-1) prompt batches a step


# --------------------------------------------------------------------------- config and entry script


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from nemo_plugins.aligner.train_grpo import CONFIG_DIR, CONFIG_NAME, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=CONFIG_NAME, overrides=overrides)


def test_entry_config_is_aligners_reinforce_config_plus_grpo():
    from nemo_plugins.aligner.train_grpo import check_config

    cfg = _compose(["pretrained_checkpoint.restore_from_path=policy.nemo", "model.reinforce.grpo.kl_beta=0.001",
                    "trainer.reinforce.num_rollouts_per_prompt=8"])  # fmt: skip
    settings = check_config(cfg)
    assert settings.loss.kl_beta == 0.001 and settings.loss.clip_high == 0.28 and settings.loss.aggregation == "token"
    assert cfg.model.reinforce.length_params.max_length == 2048  # Aligner's int_div resolver; stock value
    assert cfg.trainer.reinforce.initial_policy_kl_penalty == 0.0  # the KL lives in the loss (kl_beta)
    assert cfg.remote_rm.reward_model.port == 5555 and cfg.trainer.reinforce.trt_llm.enable is True

    with pytest.raises(ValueError, match=r"num_rollouts_per_prompt=1: expected an integer >= 2"):
        check_config(_compose(["pretrained_checkpoint.restore_from_path=p.nemo", "trainer.reinforce.num_rollouts_per_prompt=1"]))
    with pytest.raises(ValueError, match=r"model\.global_batch_size=48: expected to divide"):
        check_config(_compose(["pretrained_checkpoint.restore_from_path=p.nemo", "model.global_batch_size=48"]))
    with pytest.raises(ValueError, match=r"pretrained_checkpoint\.restore_from_path: missing"):
        check_config(_compose([]))
    with pytest.raises(ValueError, match=r"model\.reinforce\.grpo\.clip_hi: unknown key"):
        check_config(_compose(["pretrained_checkpoint.restore_from_path=p.nemo", "+model.reinforce.grpo.clip_hi=0.3"]))


def test_entry_curriculum_block_draws_the_core_curriculum(cpu_world, tmp_path):
    """`model.reinforce.curriculum` builds the core's plan from the prompt file, tokenizer and
    pass rates, and the entry's prompt dataloader builder draws it, resuming at consumed_samples."""
    import json

    from nemo_plugins.aligner.curriculum_batches import CurriculumPlan, CurriculumSettings
    from nemo_plugins.aligner.curriculum_config import curriculum_plan
    from nemo_plugins.aligner.curriculum_sampler import CurriculumBatchSampler
    from nemo_plugins.aligner.prompt_set import load_prompt_set
    from nemo_plugins.aligner.train_grpo import check_config, curriculum_of, train_dataloader_builder
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer
    from nemo_plugins.data.curriculum import problem_id
    from nemo_plugins.data.problems import TaskProblem
    from nemo_plugins.data.tokenizer import save_tokenizer, train_tokenizer

    questions = [f"What is {a} + {b}?" for a in range(1, 5) for b in range(1, 4)]  # 12 problems
    save_tokenizer(train_tokenizer([q + " The answer is 3." for q in questions] * 5, 300), tmp_path / "tok")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": 3, "task": "world", "id": i}) + "\n"
                                              for i, q in enumerate(questions)))  # fmt: skip
    rates = {problem_id(TaskProblem(q, "3", str(i))): [0.0, 0.25, 0.5, 0.875][i % 4] for i, q in enumerate(questions)}
    (tmp_path / "rates.json").write_text(json.dumps({"pass_rates": rates}))
    block = {"prompts": [str(tmp_path / "p.jsonl")], "tokenizer": str(tmp_path / "tok"), "pass_rates": str(tmp_path / "rates.json")}
    cfg = _compose(["pretrained_checkpoint.restore_from_path=p.nemo", "model.reinforce.num_rollout_samples=4",
                    "model.reinforce.rollout_micro_batch_size=2", "model.global_batch_size=8", "model.data.num_workers=0",
                    "trainer.reinforce.max_steps=3",
                    f"model.reinforce.curriculum={{prompts: ['{tmp_path / 'p.jsonl'}'], tokenizer: '{tmp_path / 'tok'}', "
                    f"pass_rates: '{tmp_path / 'rates.json'}', threshold: 0.75}}"])  # fmt: skip
    check_config(cfg)
    plan = curriculum_of(cfg)
    prompt_set = load_prompt_set([tmp_path / "p.jsonl"], ChatTokenizer.from_dir(tmp_path / "tok"), (True, False))
    direct = CurriculumPlan(prompt_set, rates, 4, CurriculumSettings(threshold=0.75, total_batches=3))
    batches = [direct.global_batch(b) for b in range(3)]
    assert [plan.global_batch(b) for b in range(3)] == batches

    loader = train_dataloader_builder(cfg, list(range(len(prompt_set.rows))), lambda rows: rows, plan)(consumed_samples=4)
    assert isinstance(loader.batch_sampler, CurriculumBatchSampler)
    it = iter(loader.batch_sampler)
    assert next(it) + next(it) == batches[1]  # resumed at batch 1: one consumed sample per prompt (GRPOTrainer's count)

    with pytest.raises(ValueError, match=r"model\.reinforce\.curriculum\.thresh: unknown key"):
        curriculum_plan({**block, "thresh": 0.5}, 4, 3)
    with pytest.raises(ValueError, match=r"model\.reinforce\.curriculum\.total_batches: missing"):
        curriculum_plan(block, 4, -1)
    with pytest.raises(ValueError, match=r"model\.reinforce\.curriculum\.pass_rates: missing"):
        curriculum_plan({**block, "pass_rates": None}, 4, 3)
    assert curriculum_of(_compose([])) is None  # default: Aligner's random sampler


def test_readme_grpo_command_composes_and_checks():
    import re
    import shlex

    from nemo_plugins.aligner.train_grpo import check_config

    readme = (REPO / "README.md").read_text()
    cmd = re.search(r"python -m nemo_plugins\.aligner\.train_grpo (.*?)\n```", readme, flags=re.S).group(1)
    overrides = shlex.split(cmd.replace("\\\n", " "))
    cfg = _compose(overrides)
    check_config(cfg)
    assert cfg.trainer.reinforce.num_rollouts_per_prompt == 8
    assert list(cfg.model.data.data_prefix.train) == ["aligner_train.jsonl"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
def test_entry_script_checks_config_then_names_cuda():
    """`python -m nemo_plugins.aligner.train_grpo` as a user runs it: the config is checked
    (a bad key is named) and, on a machine without CUDA, it stops saying CUDA is needed."""
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nemo_plugins.aligner.train_grpo", *args], cwd=REPO,  # noqa: E731
                                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    ok = run("pretrained_checkpoint.restore_from_path=policy.nemo", "model.reinforce.grpo.clip_high=0.2")
    assert ok.returncode != 0
    assert "needs CUDA GPUs" in ok.stderr + ok.stdout, (ok.stdout[-2000:], ok.stderr[-2000:])
