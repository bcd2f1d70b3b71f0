"""Online RPO's data step: sampled responses with rewards -> best/worst pairs -> Aligner's DPO JSONL.

Each prompt's responses (sampled from the current policy, scored by a reward model or the rule
server) give one pair: the highest-reward response chosen, the lowest rejected, both rewards kept
so that Aligner's `rpo_*` losses can use the reward gap (η·(r_chosen − r_rejected)). A prompt whose
responses all score the same teaches nothing and is skipped (as are prompts with fewer than two
responses); among equal best (or worst) rewards the first sampled wins, so the choice is
reproducible.

The JSONL is what Aligner 0.7.0's `DPOModelDataset` reads: one object a line with `prompt` (the
chat-rendered prompt string), `chosen_response`, `rejected_response`, `chosen_reward`,
`rejected_reward`; the dataset tokenizes prompt + response and takes the prompt's tokens as the
masked prefix. Core-only (no Aligner import), so the selection is testable anywhere.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike

from ..utils.atomic import write_text_atomic

SKIP_REASONS = {
    "all_tied": "every response of the prompt has the same reward",
    "too_few": "fewer than two responses",
}


@dataclass(frozen=True)
class SampledPrompt:
    """One prompt (chat-rendered, as the policy saw it), its sampled responses and their rewards."""

    prompt: str
    responses: Sequence[str]
    rewards: Sequence[float]

    def __post_init__(self):
        if len(self.responses) != len(self.rewards):
            raise ValueError(f"prompt {self.prompt[:60]!r}: {len(self.responses)} responses but {len(self.rewards)} rewards")
        bad = [r for r in self.rewards if not math.isfinite(float(r))]
        if bad:
            raise ValueError(f"prompt {self.prompt[:60]!r}: non-finite rewards {bad}: expected finite reward-model scores")


@dataclass(frozen=True)
class RPOPair:
    """A DPO/RPO training pair with both rewards (Aligner's field names)."""

    prompt: str
    chosen_response: str
    rejected_response: str
    chosen_reward: float
    rejected_reward: float


def best_worst_pair(sample: SampledPrompt) -> RPOPair | str:
    """The pair (highest reward chosen, lowest rejected; the first sampled on ties), or the reason
    it is skipped (a key of SKIP_REASONS)."""
    if len(sample.responses) < 2:
        return "too_few"
    rewards = [float(r) for r in sample.rewards]
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if rewards[best] == rewards[worst]:
        return "all_tied"
    return RPOPair(sample.prompt, sample.responses[best], sample.responses[worst], rewards[best], rewards[worst])


def select_pairs(samples: Iterable[SampledPrompt]) -> tuple[list[RPOPair], Counter]:
    """Pairs of every prompt that has one, and the skipped prompts counted by reason."""
    pairs, skipped = [], Counter()
    for sample in samples:
        result = best_worst_pair(sample)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            pairs.append(result)
    return pairs, skipped


def write_dpo_jsonl(pairs: Sequence[RPOPair], path: str | PathLike) -> int:
    """Write the pairs as Aligner's DPO JSONL (atomically); returns the number written. An empty
    list is refused: Aligner's dataset builder cannot train on no data."""
    if not pairs:
        raise ValueError(f"{path}: no preference pairs to write (every prompt's responses tied or too few)")
    lines = [json.dumps({"prompt": p.prompt, "chosen_response": p.chosen_response, "rejected_response": p.rejected_response,
                         "chosen_reward": p.chosen_reward, "rejected_reward": p.rejected_reward}, ensure_ascii=False)
             for p in pairs]  # fmt: skip
    write_text_atomic(path, "\n".join(lines) + "\n")
    return len(pairs)
