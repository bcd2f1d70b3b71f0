"""Rule rewards for token rows as Aligner sends them: prompt + response ids, zero-padded, with lengths.

Each row's prompt is found in the `PromptIndex` (its answer and thinking mode), the response after
it is decoded up to the first stop token, and all rows are scored together through the core's
`Scorer` (`rl.scoring.RuleScorer`: accuracy + format in the sandboxed pool; for prompts of task
"judge", `JudgeScorer`), so a reward here is the reward the core's GRPO gives the same
completion. A row whose prompt is not in the index scores `unknown_reward` and is counted as
`unknown_prompt`: the trainer's prompt file and the server's disagree, which the server logs
rather than failing the whole batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data.chat_tokenizer import ChatTokenizer
from ..rl.scoring import Reference, Scorer
from .prompt_index import PromptIndex

UNKNOWN_PROMPT = "unknown_prompt"


@dataclass
class TokenRewards:
    """Rewards [B] (float32) of one request and the rows that could not be scored, by reason."""

    rewards: np.ndarray
    failures: Counter


class TokenVerifier:
    """Scores Aligner token rows against the references their prompts stand for."""

    def __init__(self, index: PromptIndex, tokenizer: ChatTokenizer, scorer: Scorer, unknown_reward: float = 0.0):
        self.index, self.tokenizer, self.scorer = index, tokenizer, scorer
        self.unknown_reward = float(unknown_reward)

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> TokenRewards:
        """`tokens` [B, T] int, `lengths` [B] or [B, 1] int (prompt + response, as Aligner sends them)."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths).reshape(-1)
        if tokens.ndim != 2 or lengths.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens of shape {tokens.shape} and sequence_lengths of shape {lengths.shape}: "
                             "expected [B, T] and [B] (or [B, 1])")  # fmt: skip
        if lengths.size and (lengths.min() < 0 or lengths.max() > tokens.shape[1]):
            raise ValueError(f"sequence_lengths range {lengths.min()}..{lengths.max()}: expected 0..{tokens.shape[1]}")
        rewards = np.full(tokens.shape[0], self.unknown_reward, dtype=np.float32)
        failures: Counter = Counter()
        rows, texts, refs = [], [], []
        for b in range(tokens.shape[0]):
            ids = tokens[b, : lengths[b]].tolist()
            found = self.index.match(ids)
            if found is None:
                failures[UNKNOWN_PROMPT] += 1
                continue
            row, n = found
            rows.append(b)
            texts.append(self.tokenizer.decode_response(ids[n:]))
            refs.append(Reference(row.answer, row.thinking, question=row.question))
        if rows:
            scores = self.scorer.score(texts, refs)
            rewards[rows] = scores.total.numpy()
            failures.update(scores.failures)
        return TokenRewards(rewards, failures)
