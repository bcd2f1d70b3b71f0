"""The RL loop every algorithm runs on: sample → score → prepare → update → log → checkpoint.

One step:

1. **Sample.** `prompts_per_step` problem ids from the prompt sampler (curriculum or random
   order, `experience.make_sampler`), each under a thinking mode (`experience.choose_modes`), and
   G = `group_size` completions per prompt from the rollout engine (`experience.rollout`).
2. **Score.** Through the reward protocol (`experience.score_rollout`: the run's `Scorer`, plus
   DAPO's soft overlong penalty on the response length).
3. **Prepare.** The algorithm turns the scored rollout into what it trains on (`Algorithm.prepare`:
   per-sequence advantages and which sequences to keep, or preference pairs and their rewards).
4. **Update.** `updates_per_rollout` optimizer steps over the kept sequences through the
   algorithm's `PolicyLoss` (`update.train_batches`, `update.apply_updates`), the frozen reference's
   log-probs in every batch when a reference is kept; then one scheduler step. No kept token: no
   optimizer step.
5. **Log.** One metrics row (`metrics`), held-out accuracy when due.
6. **Checkpoint.** Every `ckpt_every` steps and at the last.

Determinism and resume: the prompts of step k come from the sampler (its `state_dict` is saved
in the checkpoint's `extra`), the modes and the rollout's torch generator are seeded from
(seed, k) alone, and the reward functions are pure; so a run resumed from the checkpoint of
step k draws the same batch k+1, samples the same completions and, with the restored weights,
optimizer, scheduler and RNG states, ends with the same weights as an uninterrupted run (bit for
bit on CPU; tested). A reward sample near the pool's time limit is the one source of run-to-run
difference (it scores 0 and is counted under `fail_timeout`); the limit is on the worker's CPU
time, so a loaded machine alone does not push a sample over it.

Files under `out_dir`: `checkpoints/step-*/` (utils/resume.py), `metrics.csv` and
`metrics.jsonl` (one row per step, rewritten from the checkpointed history, so a resumed run
never duplicates rows), `<name>.png` (curves, `plots.plot_grpo`), `<name>_summary.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..data.chat_tokenizer import ChatTokenizer, as_chat
from ..data.reasoning_world import Problem
from ..utils.atomic import write_json_atomic
from ..utils.resume import TrainingState, latest, save_training_state
from ..utils.training import RunPaths, StepModule, check_resumable, fit_module, resolve_precision, resume_latest
from ..utils.training import stop_if_terminated
from .config import LoopConfig
from .experience import Rewards, Rollout, choose_modes, make_sampler, rollout, score_rollout, seed_for
from .metrics import heldout_accuracy, rollout_metrics, write_metrics
from .policy_loss import PolicyLoss
from .scoring import RuleScorer, Scorer
from .update import apply_updates, pair_batches, train_batches


@dataclass
class Prepared:
    """What an algorithm makes of a scored rollout: per-sequence `advantages` [N], which sequences
    it trains on (`keep` [N] bool) and its own metrics for the step's row. A pairwise algorithm
    gives `pairs` [P, 2] (chosen, rejected sequence indices) and the per-sequence `rewards` [N]
    its loss compares instead of advantages (`update.pair_batches`)."""

    advantages: torch.Tensor | None
    keep: torch.Tensor
    metrics: dict = field(default_factory=dict)
    pairs: torch.Tensor | None = None
    rewards: torch.Tensor | None = None


class Algorithm(Protocol):
    """The parts of an RL algorithm the loop plugs in: its name (files, logs), how a scored
    rollout becomes a training signal, and the loss it trains with."""

    name: str
    loss: PolicyLoss

    def prepare(self, roll: Rollout, rewards: Rewards) -> Prepared: ...


class RLModule(StepModule):
    """The policy trained by the loop (manual optimization); one Lightning batch = one RL step
    (the batch is only the step index: the prompts come from the sampler inside the step, so a
    Lightning prefetch never advances the sampler past the checkpoint)."""

    def __init__(
        self, policy, reference, tok: ChatTokenizer, problems: Mapping[str, Problem], sampler, cfg: LoopConfig,
        algorithm: Algorithm, paths: RunPaths, resume: TrainingState | None, eval_problems: Sequence[Problem],
        scorer: Scorer | None = None,
    ):  # fmt: skip
        super().__init__(policy, cfg, paths, resume)
        self.policy = policy
        self.reference = reference.requires_grad_(False).eval() if reference is not None else None
        self.tok, self.problems, self.sampler = as_chat(tok), problems, sampler
        self.algorithm = algorithm
        self.eval_problems = list(eval_problems)
        self.scorer = scorer
        self.pad_id = as_chat(tok).pad_id
        extra = resume.extra if resume is not None else {}
        self.history: list[dict] = list(extra.get("history", []))
        self.eval_history: list[dict] = list(extra.get("eval_history", []))
        self.last_batch: list[str] = []

    def train(self, mode: bool = True):
        """Lightning puts the whole module in train mode; the reference stays in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def training_step(self, batch, batch_idx):
        t0 = time.perf_counter()
        cfg = self.cfg
        ids, roll = self.sample(self.step_count)
        rewards = score_rollout(roll, self.scorer, cfg)
        prepared = self.algorithm.prepare(roll, rewards)
        lr = self.lr_schedulers().get_last_lr()[0]
        if prepared.pairs is None:
            batches = train_batches(self.policy, self.reference, roll, prepared.advantages, prepared.keep, cfg, self.pad_id)
        else:
            batches = pair_batches(self.policy, self.reference, roll, prepared.pairs, prepared.rewards, cfg, self.pad_id)
        update = apply_updates(self.policy, self.optimizers(), batches, self.algorithm.loss, cfg, self.manual_backward)
        with warnings.catch_warnings():  # a step without an update (nothing kept) is expected
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.lr_schedulers().step()
        self.step_count += 1
        row = {"step": self.step_count, "lr": lr, **rollout_metrics(roll, rewards, cfg), **prepared.metrics, **update,
               "prompt_pass_rate": self.sampler.mean_pass_rate(ids), "levels": self.sampler.batch_composition(ids),
               "batch": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]}  # fmt: skip
        self.log_and_checkpoint(row, t0)

    def sample(self, step: int) -> tuple[list[str], Rollout]:
        """Step `step`'s prompt ids (from the sampler), modes and completions (seeded by (seed, step))."""
        cfg = self.cfg
        ids = self.sampler.next_batch()
        self.last_batch = list(ids)
        problems = [self.problems[i] for i in ids]
        thinking = choose_modes(len(problems), cfg.off_fraction, cfg.seed, step)
        return ids, rollout(self.policy, self.tok, problems, thinking, cfg, seed_for(cfg.seed, "rollout", step))

    def log_and_checkpoint(self, row: dict, t0: float) -> None:
        """Held-out evaluation when due, metrics files, checkpoint and plot when due."""
        last = self.step_count == self.cfg.steps
        if self.eval_problems and ((self.cfg.eval_every and self.step_count % self.cfg.eval_every == 0) or last):
            self.eval_history.append({"step": self.step_count, **self.evaluate()})
            row["eval_accuracy"] = self.eval_history[-1]["accuracy"]
        row["time_s"] = time.perf_counter() - t0
        self.history.append(row)
        write_metrics(self.history, self.paths.metrics_csv, _jsonl(self.paths))
        if self.step_count % self.cfg.ckpt_every == 0 or last:
            self.save()
            self.write_plot()

    def evaluate(self) -> dict:
        return heldout_accuracy(self.policy, self.tok, self.eval_problems, self.cfg.max_new_tokens,
                                verify=self.cfg.rewards.verifier())  # fmt: skip

    def write_plot(self):
        from .plots import plot_grpo

        plot_grpo(self.history, self.eval_history, self.paths.plot)

    def save(self):
        extra = {
            "history": self.history,
            "eval_history": self.eval_history,
            "config": asdict(self.cfg),
            "sampler": self.sampler.state_dict(),
        }
        save_training_state(
            self.paths.checkpoints, self.step_count, self.policy, self.optimizers(), self.lr_schedulers(),
            extra, keep_last=self.cfg.keep_last,
        )  # fmt: skip


def _jsonl(paths: RunPaths) -> Path:
    return paths.out_dir / "metrics.jsonl"


def run_loop(
    policy,
    tokenizer: ChatTokenizer,
    problems: Mapping[str, Problem],
    pass_rates: Mapping[str, float],
    cfg: LoopConfig,
    algorithm: Algorithm,
    out_dir: str | Path,
    *,
    eval_problems: Sequence[Problem] = (),
    reference=None,
    scorer: RuleScorer | None = None,
    initial_eval: Mapping | None = None,
    progress: bool = False,
    callbacks: Sequence[L.Callback] = (),
) -> dict:
    """Train `policy` in place by `algorithm` for `cfg.steps` steps, resuming from the newest
    checkpoint in `out_dir/checkpoints` if there is one; return the run's summary.

    Only the ids in `pass_rates` are sampled from `problems`. reference: the frozen model for the
    KL (default: a copy of `policy` as given, i.e. before any resume, so it is the run's starting
    point); not kept when `cfg.needs_reference` is false. scorer: a `RuleScorer` to share between
    runs (the caller closes it); default: one for this call, closed at the end. initial_eval: the
    starting model's held-out result, recorded as step 0 of a fresh run's evaluations; without
    it, a run with eval_every > 0 measures it itself.
    """
    missing = [i for i in pass_rates if i not in problems]
    if missing:
        raise ValueError(f"pass_rates: {len(missing)} ids are not among the problems (first: {missing[0]!r})")
    paths = RunPaths(Path(out_dir), algorithm.name)
    if cfg.needs_reference and reference is None:
        reference = copy.deepcopy(policy)
    if not cfg.needs_reference:
        reference = None
    sampler = make_sampler(dict(pass_rates), cfg)
    resume = resume_latest(paths.checkpoints, policy, algorithm.name)
    if resume is not None:
        check_resumable(_unread_judge_as_now(resume, cfg), cfg, cfg.run_defining)
        sampler.load_state_dict(resume.extra["sampler"])
    else:
        L.seed_everything(cfg.seed, verbose=False)
    start = resume.step if resume is not None else 0
    held_out = list(eval_problems)[: cfg.eval_problems]
    module = RLModule(policy, reference, tokenizer, problems, sampler, cfg, algorithm, paths, resume, held_out)
    if resume is None and held_out and (initial_eval is not None or cfg.eval_every):
        module.eval_history = [{"step": 0, **(initial_eval if initial_eval is not None else module.evaluate())}]
    if start < cfg.steps:
        want = (cfg.rewards.reward_config(), cfg.rewards.limits())
        if scorer is not None and (scorer.config, scorer.limits) != want:
            raise ValueError(f"rewarder {scorer.config}, {scorer.limits} differs from grpo.rewards {cfg.rewards}")
        own = scorer is None
        module.scorer = scorer or cfg.rewards.scorer()
        try:
            _fit(module, cfg, start, progress, callbacks)
        finally:
            if own:
                module.scorer.close()
    policy.eval()
    return _summary(module, paths, start)


def _unread_judge_as_now(resume: TrainingState, cfg: LoopConfig) -> TrainingState:
    """`resume` with its saved judge settings replaced by `cfg`'s where neither run reads them
    (task not "judge"; a checkpoint from before the judge existed has none), so that only settings
    a run reads count as changed when it resumes."""
    rewards = resume.extra.get("config", {}).get("rewards")
    if not isinstance(rewards, dict) or "judge" in (rewards.get("task"), cfg.rewards.task):
        return resume
    config = {**resume.extra["config"], "rewards": {**rewards, "judge": asdict(cfg.rewards.judge)}}
    return dataclasses.replace(resume, extra={**resume.extra, "config": config})


def _fit(module: RLModule, cfg: LoopConfig, start: int, progress: bool, callbacks) -> None:
    loader = DataLoader(list(range(start, cfg.steps)), batch_size=None, shuffle=False, collate_fn=lambda step: step)
    trainer = fit_module(
        module, loader, callbacks=list(callbacks),
        accelerator="auto", devices=1, precision=resolve_precision(cfg.precision), max_epochs=1, max_steps=-1,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )  # fmt: skip
    stop_if_terminated(trainer, module.algorithm.name)


def _summary(module: RLModule, paths: RunPaths, start: int) -> dict:
    if module.history and not paths.plot.is_file():
        module.write_plot()
    last = latest(paths.checkpoints)
    summary = {
        "steps": module.step_count,
        "start_step": start,
        "history": module.history,
        "eval_history": module.eval_history,
        "final_eval": module.eval_history[-1] if module.eval_history else None,
        "metrics_csv": str(paths.metrics_csv),
        "metrics_jsonl": str(_jsonl(paths)),
        "plot": str(paths.plot),
        "checkpoint_dir": str(paths.checkpoints),
        "last_checkpoint": str(last) if last is not None else None,
    }
    write_json_atomic(paths.summary, summary)
    return summary
