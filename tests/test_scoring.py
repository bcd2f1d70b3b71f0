"""The reward protocol (`rl.scoring`): the rule scorer gives `combined_reward`'s totals and parts in
process and in the sandbox, counts failures as zeros, and GRPO's scoring goes through the protocol."""

from collections import Counter

import pytest
import torch

from nemo_plugins.rl import config as C
from nemo_plugins.rl import experience as X
from nemo_plugins.rl import grpo as G
from nemo_plugins.rl.rewards import RewardConfig, combined_reward
from nemo_plugins.rl.sandbox import TOO_LONG
from nemo_plugins.rl.scoring import Reference, RuleScorer, SandboxLimits, Scores

CONFIG = RewardConfig(task="world", accuracy_weight=1.0, format_weight=0.25)
TEXTS = ["<think>2 + 3 = 5</think>The answer is 5.", "The answer is 5.", "The answer is 7.", "<think>x</think>5"]
REFS = [Reference(5, True), Reference(5, False), Reference(5, False), Reference(5, True)]


def expected(texts, refs):
    return [combined_reward(t, r.answer, r.thinking, CONFIG) for t, r in zip(texts, refs)]


@pytest.mark.parametrize("workers", [0, 1])
def test_rule_scorer_gives_combined_reward_and_counts_failures(workers):
    texts, refs = [*TEXTS, "The answer is 5." * 40], [*REFS, Reference(5, False)]  # the last is too long
    with RuleScorer(CONFIG, SandboxLimits(workers=workers, timeout_s=20, max_chars=200)) as scorer:
        scores = scorer.score(texts, refs)
    want = expected(TEXTS, REFS)
    assert scores.total.dtype == torch.float32 and scores.total.tolist() == pytest.approx([w.total for w in want] + [0])
    assert scores.parts["accuracy"].tolist() == [w.accuracy for w in want] + [0.0]
    assert scores.parts["format"].tolist() == [w.format for w in want] + [0.0]
    assert len(set(scores.total.tolist())) > 2  # the cases differ, so a constant scorer would fail
    assert scores.failures == Counter({TOO_LONG: 1})


def test_rule_scorer_refuses_unpaired_references():
    with pytest.raises(ValueError, match="2 completions, 1 references"):
        RuleScorer(CONFIG, SandboxLimits(workers=0)).score(TEXTS[:2], REFS[:1])


def test_grpo_scores_through_the_protocol():
    class Fixed:
        """A scorer that is no rule scorer: GRPO must take its totals, parts and failures as given."""

        def __init__(self):
            self.seen = None

        def score(self, completions, references):
            self.seen = (list(completions), list(references))
            n = len(completions)
            return Scores(torch.arange(n, dtype=torch.float32), {"accuracy": torch.ones(n), "format": torch.zeros(n)},
                          Counter({"timeout": 1}))  # fmt: skip

    roll = X.Rollout(prompt_ids=[[1]] * 2, completions=[[5, 6], [5]], texts=["a", "b"], thinking=[True, False],
                     answers=[3, 4], truncated=[False, False])  # fmt: skip
    cfg = G.GRPOConfig(max_new_tokens=2, group_size=2, prompts_per_step=1, rewards=C.RewardSettings(workers=0),
                       overlong=C.OverlongConfig(buffer=1, penalty=0.5))  # fmt: skip
    scorer = Fixed()
    rewards = X.score_rollout(roll, scorer, cfg)
    assert scorer.seen == (["a", "b"], [Reference(3, True), Reference(4, False)])
    assert rewards.overlong.tolist() == [-0.5, 0.0]  # 2 tokens of at most 2, buffer 1: the full penalty
    assert rewards.total.tolist() == [-0.5, 1.0] and rewards.accuracy.tolist() == [1.0, 1.0]
    assert rewards.format.tolist() == [0.0, 0.0] and rewards.failures == Counter({"timeout": 1})
