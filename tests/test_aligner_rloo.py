"""RLOO on NeMo-Aligner's stock REINFORCE: its baseline against the core's leave-one-out advantages,
and `conf/aligner/rloo.yaml` against the paper's instruction-following stage (REFERENCE §6).

Aligner's `ReinforceTrainer` trains on r − b with b = `calculate_rloo_baseline` (the mean of the
other valid rollouts of the same prompt); the core's `group_advantages(..., leave_one_out=True,
normalize_std=False)` is r − mean of the other G − 1. They must agree on any rewards, ties and a
group of two included, and with the rollouts of different prompts interleaved as Aligner's
batches hold them.
"""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _prompt_tokens(prompt_of_row: list[int], width: int = 5) -> torch.Tensor:
    """[B, width] token rows: every rollout of prompt p carries the same tokens (what Aligner groups by)."""
    return torch.stack([torch.arange(width) * 7 + 100 * p for p in prompt_of_row])


@pytest.mark.aligner
@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_calculate_rloo_baseline_equals_the_core_leave_one_out(group_size):
    from nemo_aligner.utils.ppo_utils import calculate_rloo_baseline

    from nemo_plugins.rl.grpo_loss import group_advantages

    gen = torch.Generator().manual_seed(group_size)
    n_prompts = 5
    rewards = torch.rand(n_prompts, group_size, generator=gen)  # float32, as the reward server returns them
    rewards[1] = 0.5  # one group all tied: every advantage 0
    rewards[2, :2] = torch.tensor([1.0, 1.0])  # ties inside a group
    rewards[3] = torch.randint(0, 2, (group_size,), generator=gen).float()  # 0/1 verifier rewards
    expected = group_advantages(rewards.flatten().double(), group_size, leave_one_out=True, normalize_std=False)
    # Aligner's batch: rollouts interleaved across prompts (prompt p's k-th rollout at row k*N + p)
    order = [k * n_prompts + p for p in range(n_prompts) for k in range(group_size)]
    rows = torch.empty(n_prompts * group_size)
    rows[order] = rewards.flatten()
    prompts = _prompt_tokens([i % n_prompts for i in range(len(rows))])
    baseline = calculate_rloo_baseline(prompts=prompts, reward=rows, mask=torch.ones_like(rows))
    got = (rows - baseline)[order].double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the hand formula on the group of two: each rollout's baseline is the other's reward
    if group_size == 2:
        torch.testing.assert_close(baseline[order].view(-1, 2), rewards.flip(1), rtol=0, atol=0)


@pytest.mark.aligner
def test_rloo_baseline_drops_unfinished_rollouts_from_the_mean():
    """Aligner masks rollouts that never reached EOS out of the baseline; the core's formula on the
    finished ones gives the finished rollouts' advantages."""
    from nemo_aligner.utils.ppo_utils import calculate_rloo_baseline

    from nemo_plugins.rl.grpo_loss import group_advantages

    rewards = torch.tensor([0.2, 0.9, 0.4, 0.7])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    baseline = calculate_rloo_baseline(prompts=_prompt_tokens([0, 0, 0, 0]), reward=rewards, mask=mask)
    finished = rewards[mask.bool()]
    expected = group_advantages(finished.double(), 3, leave_one_out=True, normalize_std=False)
    torch.testing.assert_close((rewards - baseline)[mask.bool()].double(), expected, rtol=0, atol=1e-6)


def test_rloo_config_is_the_papers_instruction_following_stage():
    """conf/aligner/rloo.yaml: Aligner's REINFORCE keys with the paper's stage (fewer than 120 steps,
    128 prompts per step, KL β subtracted from the reward, the verifier reward server)."""
    from omegaconf import OmegaConf

    for name, fn in (("multiply", lambda x, y: x * y), ("int_div", lambda x, y: x // y), ("subtract", lambda x, y: x - y)):
        OmegaConf.register_new_resolver(name, fn, replace=True)  # the resolvers Aligner's script registers
    cfg = OmegaConf.load(ROOT / "conf" / "aligner" / "rloo.yaml")
    cfg.pretrained_checkpoint.restore_from_path = "/checkpoints/policy.nemo"
    cfg.model.tensor_model_parallel_size = cfg.model.get("tensor_model_parallel_size", 1)
    cfg.model.pipeline_model_parallel_size = cfg.model.get("pipeline_model_parallel_size", 1)
    r = OmegaConf.to_container(cfg, resolve=True)
    rf, m = r["trainer"]["reinforce"], r["model"]
    assert 0 < rf["max_steps"] < 120
    assert m["reinforce"]["num_rollout_samples"] == 128  # prompts per REINFORCE step
    k = rf["num_rollouts_per_prompt"]
    assert k >= 2  # RLOO needs another rollout for the baseline
    # one optimizer step per REINFORCE step on all 128 x k rollouts (on-policy, as the paper's RLOO)
    assert m["global_batch_size"] == 128 * k
    assert rf["initial_policy_kl_penalty"] > 0 and rf["use_absolute_kl"] is True  # β·|log π − log π_ref|
    assert m["peft"]["peft_scheme"] == "none"  # full-parameter: the initial policy is the KL reference
    assert r["remote_rm"]["reward_model"] == {"name": "reward_model", "ip": "localhost", "port": 5555}
    assert rf["trt_llm"]["enable"] is True and r["trainer"]["max_steps"] == rf["max_steps"]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_rloo_config_changes_only_the_stage_keys_of_aligners_stock_config():
    """Aligner's script reads its own keys only: rloo.yaml has exactly the stock v0.7.0 keys, and
    differs from the stock values only where the stage says so."""
    from omegaconf import OmegaConf

    def load(path):
        return _flat(OmegaConf.to_container(OmegaConf.load(path), resolve=False))

    ours = load(ROOT / "conf" / "aligner" / "rloo.yaml")
    stock = load(ROOT / "tests" / "fixtures" / "aligner_v0.7.0" / "gpt_reinforce_actor.yaml")
    assert sorted(ours) == sorted(stock)
    changed = {k for k in ours if ours[k] != stock[k]}
    assert changed == {"trainer.reinforce.max_steps", "model.reinforce.num_rollout_samples", "model.global_batch_size"}
