"""The `rloo` stage: instruction following by RLOO with a verifier reward (Llama-Nemotron,
arXiv 2505.00949 §6; REFERENCE §6), on the problems of `data.problems` with verifiable
instructions appended (`data.instructions`).

1. Training prompts: the first `train_problems` unique training problems (of `difficulties`),
   each with one instruction of `instructions` (kinds dealt evenly).
2. Held-out prompts, disjoint from the training ones, in two sets: "tuning" (every default in
   conf/rloo/tiny.yaml was chosen on it) and "report" (drawn apart from it; what report.json
   states). Tiny world: `eval_problems` new problems each, drawn apart from both splits; other
   sources: the held-out split's problems alternately to tuning and report.
3. Greedy instruction-following accuracy and task accuracy (thinking on) of the starting model
   on the `eval_set` prompts, overall and per instruction kind.
4. RLOO (`rloo.run_rloo`) from that model; the same measures after.
5. `report.json` (before, after, after − before, per kind; training summary), `rloo_curves.png`
   (reward, instruction rate and KL per step), and the trained model in `model/`.

The run lives in a directory keyed by its config, the starting weights' fingerprint and the
problem set, so a rerun resumes (a finished run trains nothing) and a changed setting starts afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import problems_by_id
from ..data.instructions import INSTRUCTION_KINDS, InstructedProblem, augment_all, check_choices
from ..data.problems import ProblemSet
from ..data.reasoning_world import Problem
from ..data.tiny_world import World
from ..evaluate import check_answers
from ..model.checkpoint import fingerprint, save_checkpoint
from ..model.generate import SamplingConfig
from ..model.rollout import RolloutConfig, sample_questions
from ..utils.atomic import write_json_atomic
from ..utils.hashing import config_hash
from .config import run_key
from .grpo_stage import _cached
from .instructions import instruction_followed
from .plots import plot_rloo
from .rewards import check_references
from .rloo import RLOOConfig, run_rloo

log = logging.getLogger("nemo_plugins.rloo")

EVAL_SETS = ("report", "tuning")
_REPORT_ONLY = ("eval_set", "eval_problems", "eval_batch_size")


def _bad(key: str, value, expected: str):
    raise ValueError(f"rloo.{key}={value!r}: expected {expected}")


@dataclass
class RLOOStageConfig(RLOOConfig):
    """An RLOO run's settings (`rloo.RLOOConfig`) plus the stage's: the training prompts
    (`train_problems` of `difficulties`, None = all), the instruction kinds (`instructions`, from
    steps, max_words, brackets) and the word limits max_words draws from (`max_words`), the
    held-out set (`eval_problems` prompts of `eval_set`, see the module docstring) and the
    evaluation's generate batch (`eval_batch_size`)."""

    train_problems: int = 2048
    difficulties: list[int] | None = None
    instructions: list[str] = field(default_factory=lambda: list(INSTRUCTION_KINDS))
    max_words: list[int] = field(default_factory=lambda: [4, 8])
    eval_set: str = "report"
    eval_batch_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_problems", "eval_batch_size", "eval_problems"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _bad(name, value, "a positive integer")
        if self.difficulties is not None and (not self.difficulties or any(d < 1 for d in self.difficulties)):
            _bad("difficulties", self.difficulties, "a non-empty list of integers >= 1, or null for all")
        self.instructions, self.max_words = list(self.instructions), list(self.max_words)
        check_choices(self.instructions, self.max_words, "rloo")
        if self.eval_set not in EVAL_SETS:
            _bad("eval_set", self.eval_set, "report (drawn apart from the set the defaults were chosen on) or tuning")
        if self.prompts_per_step > self.train_problems:
            _bad("prompts_per_step", self.prompts_per_step, f"<= rloo.train_problems ({self.train_problems})")

    def run_config(self) -> RLOOConfig:
        """The loop's part of these settings."""
        names = {f.name for f in dataclasses.fields(RLOOConfig)}
        return RLOOConfig(**{k: getattr(self, k) for k in names})


def training_prompts(problems: ProblemSet, cfg: RLOOStageConfig) -> list[InstructedProblem]:
    """The first `train_problems` unique training problems of `difficulties`, instructed."""
    wanted = set(cfg.difficulties) if cfg.difficulties is not None else None
    chosen = [p for p in problems.train if wanted is None or p.difficulty in wanted]
    unique = list(problems_by_id(chosen).values())[: cfg.train_problems]
    if len(unique) < cfg.prompts_per_step:
        _bad("difficulties", cfg.difficulties, f"levels with at least rloo.prompts_per_step={cfg.prompts_per_step} "
                                               f"training problems (found {len(unique)})")  # fmt: skip
    return augment_all(unique, cfg.instructions, cfg.max_words, seed=0, tag="rloo-train")


def heldout_prompts(problems: ProblemSet, cfg: RLOOStageConfig, which: str | None = None) -> list[InstructedProblem]:
    """The `eval_problems` instructed held-out prompts of set `which` (default `cfg.eval_set`);
    no question among them is a training question (see the module docstring)."""
    which = which or cfg.eval_set
    if problems.cfg.source == "tiny":
        world = problems.world
        levels = cfg.difficulties or world.config.difficulties
        tuning = world.extra_heldout(cfg.eval_problems, levels, tag="rloo-tuning")
        base = tuning if which == "tuning" else world.extra_heldout(cfg.eval_problems, levels, tag="rloo-report",
                                                                    exclude=tuning)  # fmt: skip
    else:
        base = problems.eval[(0 if which == "tuning" else 1) :: 2][: cfg.eval_problems]
        if not base:
            _bad("eval_set", which, f"a set with problems (data.problems has {len(problems.eval)} held-out problems)")
    return augment_all(base, cfg.instructions, cfg.max_words, seed=0, tag=f"rloo-{which}")


def instruction_eval(model, chat: ChatTokenizer, prompts: Sequence[InstructedProblem], max_new_tokens: int,
                     verify: Callable[[str, Problem], bool], batch_size: int = 256,
                     thinking: bool = True) -> dict:  # fmt: skip
    """Greedy instruction-following and task accuracy on `prompts`, overall and per kind."""
    engine = RolloutConfig(SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), n=1, batch_size=batch_size)
    done = sample_questions(model, chat, [p.question for p in prompts], thinking, engine)
    by_kind: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for p, text, ok in zip(prompts, done.texts, check_answers(verify, done.texts, prompts)):
        by_kind[p.kind].append((instruction_followed(text, p.instruction), ok))

    def summary(rows) -> dict:
        n = len(rows)
        return {"instruction_accuracy": sum(f for f, _ in rows) / n, "task_accuracy": sum(c for _, c in rows) / n, "n": n}

    out = summary([r for rows in by_kind.values() for r in rows])
    out["by_kind"] = {k: summary(by_kind[k]) for k in INSTRUCTION_KINDS if k in by_kind}
    out["mean_tokens"] = sum(done.lengths) / len(done.lengths)
    return out


def _difference(before: dict, after: dict) -> dict:
    keys = ("instruction_accuracy", "task_accuracy")
    out = {k: after[k] - before[k] for k in keys}
    out["by_kind"] = {kind: {k: after["by_kind"][kind][k] - row[k] for k in keys} for kind, row in before["by_kind"].items()}
    return out


def run_rloo_stage(
    model, world: World, cfg: RLOOStageConfig, out_dir: str | Path, *, progress: bool = False,
    chat: ChatTokenizer | None = None, problems: ProblemSet | None = None, callbacks: Sequence = (),
):  # fmt: skip
    """(report, trained model). `model` itself is not changed: the run trains a copy. `chat`: the
    model's tokenizer and template (default: the world's); `problems`: the prompts and held-out
    problems (default: the tiny world's), whose task must be `rloo.rewards.task`."""
    out_dir = Path(out_dir)
    chat = chat or world.chat
    problems = problems or ProblemSet(world)
    if problems.task != cfg.rewards.task:
        _bad("rewards.task", cfg.rewards.task, f"{problems.task!r}, the task of data.problems.source={problems.cfg.source}")
    start = fingerprint(model)
    train = training_prompts(problems, cfg)
    held_out = heldout_prompts(problems, cfg)
    check_references({p.question: p.answer for p in train}, cfg.rewards.task, timeout_s=cfg.rewards.timeout_s / 2)
    data_key = [problems.key] if problems.key else []
    eval_key = {"model": start, "set": cfg.eval_set, "problems": cfg.eval_problems, "instructions": cfg.instructions,
                "max_words": cfg.max_words, "difficulties": cfg.difficulties, "max_new_tokens": cfg.max_new_tokens,
                "data": data_key}  # fmt: skip

    verify = cfg.rewards.verifier()

    def evaluate(m) -> dict:
        return instruction_eval(m, chat, held_out, cfg.max_new_tokens, verify, cfg.eval_batch_size)

    report: dict = {"start_fingerprint": start, "eval_set": cfg.eval_set, "train_prompts": len(train),
                    "heldout_prompts": len(held_out)}  # fmt: skip
    report["before"] = _cached(out_dir / "before.json", eval_key, lambda: evaluate(model))
    run_cfg = cfg.run_config()
    key = run_key(cfg, _REPORT_ONLY)
    run_dir = out_dir / f"run-{config_hash(key, start, *data_key)}"
    policy = copy.deepcopy(model)
    summary = run_rloo(policy, chat, train, run_cfg, run_dir, progress=progress, callbacks=callbacks)
    report["after"] = _cached(run_dir / "after.json", {**eval_key, "model": fingerprint(policy)}, lambda: evaluate(policy))
    report["after_minus_before"] = _difference(report["before"], report["after"])
    history = summary["history"]
    last = history[-5:]
    report["training"] = {
        "steps": summary["steps"], "run_dir": str(run_dir), "metrics_csv": summary["metrics_csv"],
        "instruction_rate_first": history[0].get("instruction_rate") if history else None,
        "instruction_rate_last5": sum(r.get("instruction_rate", 0.0) for r in last) / len(last) if last else None,
        "reward_last5": sum(r["reward"] for r in last) / len(last) if last else None,
        "kl_ref_last": history[-1].get("kl_ref") if history else None,
        "train_seconds": sum(r.get("time_s", 0.0) for r in history),
    }  # fmt: skip
    report["plot"] = str(plot_rloo(history, report["before"], report["after"], out_dir / "rloo_curves.png"))
    target = out_dir / "model"
    save_checkpoint(policy, target, extra_files=chat.files())
    report["model"] = str(target)
    write_json_atomic(out_dir / "report.json", report)
    b, a = report["before"], report["after"]
    log.info("rloo: held-out instruction following %.3f -> %.3f, task accuracy %.3f -> %.3f",
             b["instruction_accuracy"], a["instruction_accuracy"], b["task_accuracy"], a["task_accuracy"])  # fmt: skip
    return report, policy
