"""The core-only parts of the Aligner GRPO plugin (no Aligner needed, so in the default tier):
the `model.reinforce.grpo` keys, and which rollout rows each data-parallel rank trains on
(`grpo_groups.rank_group_rows`, the fix of Aligner 0.7.0's rank-blind `chunk`; the stock
behaviour and the trainer path are in tests/test_aligner_grpo.py)."""

import pytest
import torch

from nemo_plugins.aligner.grpo_groups import RANK_STRIDE


def _model_cfg(**grpo):
    return {"reinforce": {"grpo": grpo}}


def _interleaved_group_ids(n_micro, mbs, G, dp):
    """Row -> prompt group in the global batch `_run_inference` gathers: per rank, per prompt
    micro-batch, G rollouts of its mbs prompts, ranks concatenated."""
    ids = []
    for rank in range(dp):
        for i in range(n_micro):
            for _ in range(G):
                ids += [rank * RANK_STRIDE + i * mbs + j for j in range(mbs)]
    return torch.tensor(ids)


@pytest.mark.parametrize("dp", [2, 4])
def test_bug2_fixed_ranks_take_disjoint_whole_groups(dp):
    from nemo_plugins.aligner.grpo_groups import rank_group_rows

    G, mbs, n_micro = 4, 2, 2
    group_ids = _interleaved_group_ids(n_micro, mbs, G, dp)
    shares = [rank_group_rows(group_ids, G, rank, dp, seed=3) for rank in range(dp)]
    all_rows = torch.cat(shares)
    assert sorted(all_rows.tolist()) == list(range(len(group_ids)))  # each row on exactly one rank
    assert len({len(s) for s in shares}) == 1  # equal shares
    for rows in shares:
        ids = group_ids[rows].view(-1, G)
        assert (ids == ids[:, :1]).all()  # contiguous whole groups: what group_advantages takes
        assert len(set(ids[:, 0].tolist())) == len(ids)
    again = [rank_group_rows(group_ids, G, rank, dp, seed=3) for rank in range(dp)]
    assert all(torch.equal(a, b) for a, b in zip(shares, again))  # same on every rank (seeded)


def test_bug2_rank_rows_reject_incomplete_groups():
    from nemo_plugins.aligner.grpo_groups import rank_group_rows

    with pytest.raises(ValueError, match="num_rollouts_per_prompt=4"):
        rank_group_rows(torch.tensor([0, 0, 0, 0, 1, 1, 1]), 4, 0, 1, seed=0)


def test_grpo_keys_parse_with_the_core_names():
    from nemo_plugins.aligner.grpo_config import GRPOSettings
    from nemo_plugins.rl.grpo_loss import GRPOLossConfig

    s = GRPOSettings.from_model_cfg(_model_cfg(clip_low=0.1, clip_high=0.3, kl_beta=0.002, aggregation="sequence",
                                               drop_zero_variance=False, leave_one_out=True, normalize_std=False))  # fmt: skip
    assert s.loss == GRPOLossConfig(clip_low=0.1, clip_high=0.3, kl_beta=0.002, aggregation="sequence", drop_zero_variance=False)
    assert (s.leave_one_out, s.normalize_std, s.needs_reference) == (True, False, True)
    assert GRPOSettings.from_model_cfg(_model_cfg()) == GRPOSettings()  # the core's defaults
    with pytest.raises(ValueError, match=r"model\.reinforce\.grpo\.clip_lo: unknown key"):
        GRPOSettings.from_mapping({"clip_lo": 0.1})
    with pytest.raises(ValueError, match=r"model\.reinforce\.grpo\.clip_low=1\.5: expected 0 <= clip_low < 1"):
        GRPOSettings.from_mapping({"clip_low": 1.5})
    with pytest.raises(ValueError, match=r"model\.reinforce\.grpo\.aggregation='tokens'"):
        GRPOSettings.from_mapping({"aggregation": "tokens"})
    with pytest.raises(ValueError, match=r"model\.reinforce\.grpo\.normalize_std='yes': expected true or false"):
        GRPOSettings.from_mapping({"normalize_std": "yes"})


