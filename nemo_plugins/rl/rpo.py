"""Iterative online RPO (Nemotron-4 340B, arXiv 2406.11704; Llama-Nemotron, arXiv 2505.00949 §6;
NeMo-Aligner's `rpo_*` losses) on the shared RL loop (`rl.loop`).

`iterations` rounds (two by default, as in the paper); round i is one run of the loop whose
frozen reference is the policy as round i − 1 left it (the starting policy for round 1). A step
of a round, as the loop runs it:

1. **Sample.** `prompts_per_step` prompts (random order: RPO has no pass-rate curriculum) and
   n = `group_size` responses each from the CURRENT policy (the rollout engine).
2. **Score.** `RPO.prepare` scores every prompt + response, as sampled, with the reward model
   (`reward_model.RewardModelScorer.score_ids`). The rule reward (accuracy, format) is logged; with
   `rule_weight` w > 0 it is also added to the reward-model score, reward = RM + w · rule (as
   TRL's `reward_weights` combine reward functions), so a verifier can overrule a reward model
   that cannot check answers. w = 0 (default): the paper's reward model alone.
3. **Pairs**, by `pairs` (`PAIR_KINDS`):
   - `reward` (default, `best_worst_pairs`): per prompt the best and the worst response by that
     reward make a (chosen, rejected) pair; a prompt whose best and worst tie (equal rewards or
     the same response) gives none and is counted (`ties_skipped`);
   - `verified` (`verified_pairs`): the best-rewarded response that the verifier accepts against
     the worst-rewarded one it rejects; a prompt without both gives none (counted as a tie). It needs
     `rule_weight` > 0, so that Δr carries the verifier;
   - `random` (`random_pairs`): two different responses at random, a control: with `loss=dpo`
     (which ignores the rewards) it measures what updates of this size do without any preference.
4. **Update.** `updates_per_rollout` optimizer steps over the pairs (`update.pair_batches`)
   through `preference_loss.PreferenceLoss` with `loss`, β, η and `sft_loss_weight`.

Difference from the paper: there, a round samples responses for its whole prompt set once, then
trains on those pairs (offline within the round); here every step samples from the current
policy, so within a round the pairs stay on-policy (the loop's shape; the reference is the
previous round's policy either way). Each round starts a fresh optimizer and learning-rate
schedule, and its own seed (`iteration_config`), so rounds draw different prompts.

Resume: each round lives in `out_dir/iteration-<i>/` (the loop's checkpoints). A rerun replays
finished rounds from their last checkpoint (no training; the policy takes their final weights,
so the next round's reference is the same) and resumes the interrupted round at its step: bit
for bit on CPU (tested).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch

from ..data.chat_tokenizer import ChatTokenizer
from ..data.reasoning_world import Problem
from .config import LoopConfig, SamplerSettings, _bad, _number, _positive_int
from .experience import Rewards, Rollout, seed_for
from .loop import Prepared, run_loop
from .preference_loss import LOSS_KINDS, PreferenceLoss
from .reward_model import RewardModel, RewardModelScorer
from .scoring import RuleScorer


@dataclass
class RPOConfig(LoopConfig):
    """Settings of iterative online RPO: the loop's (`config.LoopConfig`; `steps` per round,
    `group_size` = n responses per prompt) plus `loss` (one of LOSS_KINDS), `beta` (β, the scale
    of the policy's implicit reward margin), `eta` (η, the scale of the reward model's margin),
    `iterations` (rounds, each with the previous round's policy as reference),
    `score_batch_size` (sequences per reward-model forward), `rule_weight` (w: the reward is the
    reward-model score + w × the rule reward), `sft_loss_weight` (α × the chosen response's
    token-mean NLL added per pair, `preference_loss.PreferenceLoss`) and `pairs` (how a group
    makes its pair, one of PAIR_KINDS). Errors name `rpo.<field>`."""

    run_defining: ClassVar[tuple[str, ...]] = (*LoopConfig.run_defining, "loss", "beta", "eta", "rule_weight",
                                                  "sft_loss_weight", "pairs")

    loss: str = "rpo_bwd_kl"
    beta: float = 0.1
    eta: float = 1.0
    iterations: int = 2
    score_batch_size: int = 64
    rule_weight: float = 0.0
    sft_loss_weight: float = 0.0
    pairs: str = "reward"
    curriculum: SamplerSettings = field(default_factory=lambda: SamplerSettings(kind="random"))

    def __post_init__(self):
        try:
            super().__post_init__()
            if self.loss not in LOSS_KINDS:
                _bad("loss", self.loss, f"one of {', '.join(LOSS_KINDS)}")
            _number("beta", self.beta, lo_open=True)
            _number("eta", self.eta)
            _positive_int("iterations", self.iterations)
            _positive_int("score_batch_size", self.score_batch_size)
            _number("rule_weight", self.rule_weight)
            _number("sft_loss_weight", self.sft_loss_weight)
            if self.pairs not in PAIR_KINDS:
                _bad("pairs", self.pairs, f"one of {', '.join(PAIR_KINDS)}")
            if self.pairs == "verified" and not self.rule_weight > 0:
                _bad("rule_weight", self.rule_weight, "> 0 with rpo.pairs=verified (Δr must carry the verifier)")
        except ValueError as e:  # the shared checks name the GRPO section
            raise ValueError(re.sub(r"\bgrpo\.", "rpo.", str(e))) from None

    @property
    def needs_reference(self) -> bool:
        return True

    def iteration_config(self, iteration: int) -> RPOConfig:
        """The loop settings of round `iteration` (1-based): its own seed, so rounds differ."""
        return dataclasses.replace(self, seed=seed_for(self.seed, "rpo-iteration", iteration) % 2**31)


PAIR_KINDS = ("reward", "verified", "random")


def best_worst_pairs(
    scores: torch.Tensor, group_size: int, completions: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, int]:
    """([P, 2] (chosen, rejected) sequence indices, ties skipped): per group of `group_size`
    contiguous sequences, the highest and the lowest score (the first of equals); a group whose
    best and worst scores are equal, or whose best and worst responses are the same tokens,
    gives no pair."""
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores shape {tuple(scores.shape)}: expected [N * {group_size}] (group_size)")
    grouped = scores.view(-1, group_size)
    best, worst = grouped.argmax(dim=1), grouped.argmin(dim=1)
    pairs, ties = [], 0
    for g in range(len(grouped)):
        b, w = g * group_size + int(best[g]), g * group_size + int(worst[g])
        if scores[b] == scores[w] or (completions is not None and list(completions[b]) == list(completions[w])):
            ties += 1
            continue
        pairs.append((b, w))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), ties


def verified_pairs(scores: torch.Tensor, accepted: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """([P, 2] pairs, groups without one): per group, the highest-scored response that the verifier
    `accepted` against the lowest-scored one it did not; a group that is all right or all wrong
    gives none."""
    if scores.shape != accepted.shape or scores.dim() != 1 or scores.numel() % group_size:
        shapes = f"scores {tuple(scores.shape)}, accepted {tuple(accepted.shape)}"
        raise ValueError(f"{shapes}: expected both [N * {group_size}] (group_size)")
    right = accepted.view(-1, group_size).bool()
    grouped = scores.view(-1, group_size)
    best = torch.where(right, grouped, -torch.inf).argmax(dim=1)
    worst = torch.where(right, torch.inf, grouped).argmin(dim=1)
    mixed = right.any(dim=1) & ~right.all(dim=1)
    pairs = [(g * group_size + int(best[g]), g * group_size + int(worst[g])) for g in range(len(grouped)) if mixed[g]]
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), int((~mixed).sum())


def random_pairs(completions: Sequence[Sequence[int]], group_size: int, seed: int) -> tuple[torch.Tensor, int]:
    """([P, 2] pairs, groups without one): per group two different positions at random, drawn from
    a generator seeded by `seed` and the responses' tokens (so a resumed step draws the same
    pairs); the same tokens at both give none."""
    if len(completions) % group_size:
        raise ValueError(f"{len(completions)} responses: expected a multiple of group_size={group_size}")
    digest = hashlib.sha256(repr((seed, [list(c) for c in completions])).encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    pairs, ties = [], 0
    for g in range(len(completions) // group_size):
        a, b = (g * group_size + int(i) for i in torch.randperm(group_size, generator=gen)[:2])
        if list(completions[a]) == list(completions[b]):
            ties += 1
        else:
            pairs.append((a, b))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), ties


@dataclass
class RPO:
    """RPO's parts for the loop: reward-model scores, best/worst pairs, the preference loss."""

    cfg: RPOConfig
    rm_scorer: RewardModelScorer
    name: str = "rpo"

    @property
    def loss(self) -> PreferenceLoss:
        return PreferenceLoss(self.cfg.loss, self.cfg.beta, self.cfg.eta, self.cfg.sft_loss_weight)

    def prepare(self, roll: Rollout, rewards: Rewards) -> Prepared:
        seqs = [p + c for p, c in zip(roll.prompt_ids, roll.completions)]
        scores = self.rm_scorer.score_ids(seqs)
        reward = scores + self.cfg.rule_weight * rewards.total if self.cfg.rule_weight else scores
        if self.cfg.pairs == "verified":
            pairs, ties = verified_pairs(reward, rewards.accuracy, self.cfg.group_size)
        elif self.cfg.pairs == "random":
            pairs, ties = random_pairs(roll.completions, self.cfg.group_size, self.cfg.seed)
        else:
            pairs, ties = best_worst_pairs(reward, self.cfg.group_size, roll.completions)
        keep = torch.zeros(len(seqs), dtype=torch.bool)
        keep[pairs.flatten()] = True
        chosen, rejected = pairs[:, 0], pairs[:, 1]
        metrics = {
            "rm_score": float(scores.mean()),
            "pairs": len(pairs),
            "ties_skipped": ties,
            "rm_margin": float((scores[chosen] - scores[rejected]).mean()) if len(pairs) else 0.0,
            "chosen_pass_rate": float(rewards.accuracy[chosen].mean()) if len(pairs) else None,
            "rejected_pass_rate": float(rewards.accuracy[rejected].mean()) if len(pairs) else None,
        }
        return Prepared(None, keep, metrics, pairs=pairs, rewards=reward)


def run_rpo(
    policy,
    tokenizer: ChatTokenizer,
    problems: Mapping[str, Problem],
    cfg: RPOConfig,
    reward_model: RewardModel,
    out_dir: str | Path,
    *,
    scorer: RuleScorer | None = None,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
    on_iteration: Callable[[int, object, dict], None] | None = None,
) -> dict:
    """Train `policy` in place by `cfg.iterations` rounds of online RPO on the prompts of
    `problems` ({problem_id: Problem}), resuming where a run in `out_dir` stopped; return
    {"iterations": [each round's loop summary]}.

    The reward model is frozen. scorer: the rule scorer whose accuracy and format are logged
    (shared between rounds; default: one per round). on_iteration(i, policy, summary) runs
    after round i (e.g. a held-out evaluation), also for a round replayed from disk. The loop's
    `prompt_pass_rate` column is 0 here: RPO samples prompts without pass rates.
    """
    rm_scorer = RewardModelScorer(reward_model, tokenizer, cfg.score_batch_size)  # frozen, in eval mode
    rates = {pid: 0.0 for pid in problems}
    rounds = []
    for i in range(1, cfg.iterations + 1):
        reference = copy.deepcopy(policy)  # the previous round's policy (the start, for round 1)
        round_cfg = cfg.iteration_config(i)
        summary = run_loop(policy, tokenizer, problems, rates, round_cfg, RPO(round_cfg, rm_scorer),
                           Path(out_dir) / f"iteration-{i}", reference=reference, scorer=scorer, progress=progress,
                           callbacks=callbacks)  # fmt: skip
        rounds.append(summary)
        if on_iteration is not None:
            on_iteration(i, policy, summary)
    return {"iterations": rounds}
