"""Preference pairs from the policy's own samples, judged by the task's verifier.

A reward model trained on hand-made wrong answers (`data.preference_pairs.world_pairs`) learns to
spot those corruptions; online RPO then asks it to rank the policy's own samples, which look
nothing like them. Pairs drawn from the policy itself put the reward model's training data where
it is used: for each prompt, `samples` responses (thinking on, sampled at `temperature`); the
first one that the task's verifier accepts and that holds one well-formed think block is chosen
against the first one the verifier rejects. Prompts where every sample is right, or every sample
wrong, give no pair and are counted. Needs only problems with checkable answers, so it works on
any `data.problems` source (tiny world, CHAMP, JSONL prompts), not just the tiny world.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..data.chat_tokenizer import ChatTokenizer
from ..data.preference_pairs import PreferencePair
from ..data.reasoning_world import has_think_block
from ..model.generate import SamplingConfig
from ..model.rollout import RolloutConfig, sample_questions
from .rewards import answer_checker


@dataclass(frozen=True)
class PolicyPairSettings:
    """How to sample: `samples` responses per prompt at `temperature`, up to `max_new_tokens`,
    `batch_size` sequences per generate call, from a generator seeded with `seed`."""

    samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    seed: int = 0


def policy_pairs(
    model, chat: ChatTokenizer, problems: Sequence, task: str, settings: PolicyPairSettings
) -> tuple[list[PreferencePair], dict]:
    """(pairs, counts): at most one pair per problem, kind "policy" (see the module doc). counts:
    prompts, pairs, all_right (no wrong sample), all_wrong (no right, well-formed sample)."""
    rollout = RolloutConfig(
        SamplingConfig(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature),
        n=settings.samples, batch_size=settings.batch_size, seed=settings.seed,
    )  # fmt: skip
    done = sample_questions(model, chat, [p.question for p in problems], True, rollout)
    verify = answer_checker(task)
    pairs, all_right, all_wrong = [], 0, 0
    for i, problem in enumerate(problems):
        texts = done.texts[i * settings.samples : (i + 1) * settings.samples]
        right = [t for t in texts if verify(t, problem) and has_think_block(t)]
        wrong = [t for t in texts if not verify(t, problem)]
        if right and wrong:
            pairs.append(PreferencePair(problem.question, right[0], wrong[0], True, "policy"))
        all_right += not wrong
        all_wrong += not right
    counts = {"prompts": len(problems), "pairs": len(pairs), "all_right": all_right, "all_wrong": all_wrong}
    return pairs, counts
