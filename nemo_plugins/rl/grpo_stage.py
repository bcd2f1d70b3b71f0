"""The `grpo` stage: reasoning RL on the problems of `data.problems` (the tiny world by default,
CHAMP or the user's prompt JSONL), with the paper's data preparation and a curriculum-vs-random
comparison (Llama-Nemotron, arXiv 2505.00949 §5).

1. Training prompts: the first `train_problems` unique problems of the training split
   (of `difficulties`); the starting model's pass rate on each from `pass_rate_k` samples
   (thinking on, the rollout's temperature; cached next to the runs, keyed by the model's
   fingerprint); prompts solved at rate >= `pass_rate_threshold` are dropped.
2. Held-out accuracy of the starting model (greedy, thinking on, and off when `eval_off`).
3. GRPO with the sampler `curriculum.kind` (default: the curriculum), and with `compare_random`
   the same number of steps with random ordering from the same start; held-out accuracy after each.
4. `report.json` / `grpo_report.md` (table: before, curriculum, random), `reward_curves.png`,
   and the model trained with `curriculum.kind` in `model/` (checkpoint + tokenizer).

Each run lives in a directory keyed by its config, the starting weights' fingerprint and the
problem set, so a rerun resumes (a finished run trains nothing) and a changed setting starts afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import filter_by_pass_rate, problems_by_id
from .pass_rates import estimate_pass_rates
from ..data.problems import ProblemSet
from ..data.reasoning_world import Problem
from ..data.tiny_world import World
from ..utils.hashing import config_hash
from ..model.checkpoint import fingerprint, save_checkpoint
from ..model.generate import SamplingConfig
from ..utils.atomic import write_json_atomic, write_text_atomic
from .config import _bad, _positive_int, run_key
from .grpo import GRPOConfig, run_grpo
from .metrics import heldout_accuracy
from .plots import plot_reward_curves
from .rewards import check_references
from .scoring import RuleScorer

log = logging.getLogger("nemo_plugins.grpo")

# Held-out sets drawn from the tiny world (`eval_difficulties` given): the defaults were chosen on
# "tuning"; "report" is drawn apart from it, and from both splits.
EVAL_SETS = ("report", "tuning")

# Stage settings that do not change what a run trains (left out of its directory key).
_REPORT_ONLY = ("compare_random", "eval_off")


@dataclass
class GRPOStageConfig(GRPOConfig):
    """A GRPO run's settings (`GRPOConfig`) plus the stage's: the prompt pool
    (`train_problems` of `difficulties`, None = all), pass-rate filtering (`pass_rate_k` samples,
    drop at >= `pass_rate_threshold`, `pass_rate_batch_size` sequences per generate call),
    `compare_random` and `eval_off` (also report held-out accuracy with thinking off).

    Held-out set: with `eval_difficulties` null, the first `eval_problems` of the world's eval
    split (every difficulty); with a list, `eval_problems` problems of those difficulties drawn
    apart from both splits (`World.extra_heldout`), so runs can be compared on more problems of
    the levels RL trains on. Of those, `eval_set` "report" (default) is drawn apart from the
    "tuning" set too: the defaults were chosen on "tuning", so only "report" measures them."""

    train_problems: int = 512
    difficulties: list[int] | None = None
    pass_rate_k: int = 4
    pass_rate_threshold: float = 0.75
    pass_rate_batch_size: int = 256
    compare_random: bool = True
    eval_off: bool = True
    eval_difficulties: list[int] | None = None
    prompt_source: str = "train"
    eval_set: str = "report"  # report | tuning (see the class docstring)

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_problems", "pass_rate_k", "pass_rate_batch_size"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.pass_rate_threshold, (int, float)) and 0 < self.pass_rate_threshold <= 1):
            _bad("pass_rate_threshold", self.pass_rate_threshold, "a number in (0, 1]")
        if self.difficulties is not None and (not self.difficulties or any(d < 1 for d in self.difficulties)):
            _bad("difficulties", self.difficulties, "a non-empty list of integers >= 1, or null for all")
        if self.prompt_source not in ("train", "fresh"):
            _bad("prompt_source", self.prompt_source, "train (the world's training split) or fresh (problems no stage trained on)")
        if self.eval_set not in EVAL_SETS:
            _bad("eval_set", self.eval_set, "report (drawn apart from the set the defaults were chosen on) or tuning")
        if self.eval_difficulties is not None and (
            not self.eval_difficulties or any(d < 1 for d in self.eval_difficulties)
        ):
            _bad("eval_difficulties", self.eval_difficulties, "a non-empty list of integers >= 1, or null")

    def run_config(self, kind: str) -> GRPOConfig:
        """The GRPO run of this stage with sampler `kind` ("curriculum" or "random")."""
        return dataclasses.replace(self, curriculum=dataclasses.replace(self.curriculum, kind=kind))


def _tiny_only(problems: ProblemSet, key: str, value, instead: str) -> World:
    """The tiny world, for settings that draw new tiny-world problems (refused for other sources)."""
    if problems.cfg.source != "tiny":
        _bad(key, value, f"{instead}: it draws new tiny-world problems, and data.problems.source="
                         f"{problems.cfg.source} has none")  # fmt: skip
    return problems.world


def training_pool(problems: ProblemSet, cfg: GRPOStageConfig) -> dict[str, Problem]:
    """{problem_id: problem}: the first `train_problems` unique training problems of `difficulties`,
    or with prompt_source "fresh" that many new tiny-world problems (in no split and in neither
    held-out set)."""
    if cfg.prompt_source == "fresh":
        world = _tiny_only(problems, "prompt_source", cfg.prompt_source, "train")
        levels = cfg.difficulties or world.config.difficulties
        held_out = [p for name in EVAL_SETS for p in heldout_set(problems, dataclasses.replace(cfg, eval_set=name))]
        fresh = world.extra_heldout(cfg.train_problems, levels, tag="grpo-prompts", exclude=held_out)
        return problems_by_id(fresh)
    wanted = set(cfg.difficulties) if cfg.difficulties is not None else None
    chosen = [p for p in problems.train if wanted is None or p.difficulty in wanted]
    pool = dict(list(problems_by_id(chosen).items())[: cfg.train_problems])
    if not pool:
        _bad("difficulties", cfg.difficulties, "difficulties present in the training split")
    return pool


def _cached(path: Path, key: dict, compute):
    """compute() once per `key`, stored as JSON at `path` (recomputed when the key differs)."""
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == json.loads(json.dumps(key)):
                return data["value"]
        except (OSError, ValueError):
            pass
    value = compute()
    write_json_atomic(path, {"key": key, "value": value})
    return value


def heldout_set(problems: ProblemSet, cfg: GRPOStageConfig) -> list[Problem]:
    """The stage's held-out problems (see `GRPOStageConfig`)."""
    if cfg.eval_difficulties is None:
        return problems.eval[: cfg.eval_problems]
    world = _tiny_only(problems, "eval_difficulties", cfg.eval_difficulties, "null")
    tuning = world.extra_heldout(cfg.eval_problems, cfg.eval_difficulties, tag="grpo-heldout")
    if cfg.eval_set == "tuning":
        return tuning
    return world.extra_heldout(cfg.eval_problems, cfg.eval_difficulties, tag="grpo-report", exclude=tuning)


def _evaluate(model, problems: ProblemSet, cfg: GRPOStageConfig, chat: ChatTokenizer, thinking: bool) -> dict:
    return heldout_accuracy(model, chat, heldout_set(problems, cfg), cfg.max_new_tokens, thinking,
                            cfg.rewards.verifier())  # fmt: skip


def _accuracies(model, problems: ProblemSet, cfg: GRPOStageConfig, chat: ChatTokenizer, on: dict | None = None) -> dict:
    """Held-out accuracy with thinking on (given, or measured) and off (when eval_off)."""
    on = on or _evaluate(model, problems, cfg, chat, True)
    out = {"accuracy": on["accuracy"], "format_ok": on["format_ok"], "by_difficulty": on["by_difficulty"]}
    if cfg.eval_off:
        off = _evaluate(model, problems, cfg, chat, False)
        out.update(accuracy_off=off["accuracy"], format_ok_off=off["format_ok"], by_difficulty_off=off["by_difficulty"])
    return out


def _pass_rate_summary(rates: dict[str, float], cfg: GRPOStageConfig, kept: list) -> dict:
    hist = Counter(round(r, 4) for r in rates.values())
    return {"k": cfg.pass_rate_k, "threshold": cfg.pass_rate_threshold, "problems": len(rates), "kept": len(kept),
            "dropped": len(rates) - len(kept), "mean": sum(rates.values()) / len(rates),
            "histogram": {str(r): n for r, n in sorted(hist.items())}}  # fmt: skip


def _run_report(summary: dict, accuracies: dict, run_dir: Path) -> dict:
    history = summary["history"]

    def mean(key: str) -> float | None:  # over the last 5 steps
        values = [r[key] for r in history[-5:] if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {**accuracies, "steps": summary["steps"], "train_reward_last5": mean("reward"),
            "train_pass_rate_last5": mean("pass_rate"), "train_seconds": sum(r.get("time_s", 0.0) for r in history),
            "groups_dropped": sum(r.get("groups_dropped", 0) for r in history),
            "reward_failures": sum(r.get("reward_failures", 0) for r in history),
            "run_dir": str(run_dir), "metrics_csv": summary["metrics_csv"], "plot": summary["plot"]}  # fmt: skip


def _table(report: dict, names: list[str]) -> tuple[list[dict], str]:
    """Rows (before and each run) and the same as a markdown table."""
    rows = []
    for name in ["before", *names]:
        r = report[name]
        row = {"model": name, "accuracy_on": r["accuracy"], **{f"d{d}": a for d, a in r["by_difficulty"].items()}}
        if "accuracy_off" in r:
            row["accuracy_off"] = r["accuracy_off"]
        row["steps"] = r.get("steps", 0)
        rows.append(row)
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return rows, "\n".join(lines) + "\n"


def _run_names(cfg: GRPOStageConfig) -> list[str]:
    """Sampler kinds this stage trains, the kept model's first: `curriculum.kind`, then random
    order for comparison when `compare_random` (nothing to add when the kind is random already)."""
    kind = cfg.curriculum.kind
    return [kind, "random"] if cfg.compare_random and kind != "random" else [kind]


def _train(model, problems: ProblemSet, chat: ChatTokenizer, cfg: GRPOStageConfig, pool, rates, kind: str, start: str, out_dir: Path,
           rewarder: RuleScorer, before: dict, progress: bool):  # fmt: skip
    """(summary, trained copy of `model`, run dir) of the GRPO run with sampler `kind`."""
    run_cfg = cfg.run_config(kind)
    key = run_key(run_cfg, _REPORT_ONLY)
    data_key = [problems.key] if problems.key else []  # the tiny world's runs keep their keys
    run_dir = out_dir / f"{kind}-{config_hash(key, start, *data_key)}"
    policy = copy.deepcopy(model)
    initial = {k: before[k] for k in ("accuracy", "format_ok", "by_difficulty")}
    summary = run_grpo(policy, chat, pool, rates, run_cfg, run_dir, eval_problems=heldout_set(problems, cfg),
                       rewarder=rewarder, initial_eval=initial, progress=progress)  # fmt: skip
    return summary, policy, run_dir


def run_grpo_stage(
    model, world: World, cfg: GRPOStageConfig, out_dir: str | Path, *, progress: bool = False,
    chat: ChatTokenizer | None = None, problems: ProblemSet | None = None,
):  # fmt: skip
    """(report, curriculum-trained model). `model` itself is not changed: each run trains a copy.
    `chat`: the model's tokenizer and template (default: the world's); `problems`: the prompts and
    held-out problems (default: the tiny world's), whose task must be `grpo.rewards.task`."""
    out_dir = Path(out_dir)
    chat = chat or world.chat
    problems = problems or ProblemSet(world)
    if problems.task != cfg.rewards.task:
        _bad("rewards.task", cfg.rewards.task, f"{problems.task!r}, the task of data.problems.source={problems.cfg.source}")
    start = fingerprint(model)
    pool = training_pool(problems, cfg)
    check_references({pid: p.answer for pid, p in pool.items()}, cfg.rewards.task, timeout_s=cfg.rewards.timeout_s / 2)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    rates = estimate_pass_rates(
        model, chat, list(pool.values()), cfg.pass_rate_k, sampling=sampling, batch_size=cfg.pass_rate_batch_size,
        seed=cfg.seed, cache_path=out_dir / "pass_rates.json", model_id=start, thinking=True, progress=progress,
        verify=cfg.rewards.verifier(),
    )  # fmt: skip
    kept = filter_by_pass_rate(rates, cfg.pass_rate_threshold).kept
    report: dict = {"start_fingerprint": start, "pass_rates": _pass_rate_summary(rates, cfg, kept)}
    eval_key = {"model": start, "problems": cfg.eval_problems, "difficulties": cfg.eval_difficulties,
                **({"set": cfg.eval_set} if cfg.eval_difficulties is not None else {}),
                **({"data": problems.key} if problems.key else {}),
                "max_new_tokens": cfg.max_new_tokens, "off": cfg.eval_off}  # fmt: skip
    report["before"] = _cached(out_dir / "before.json", eval_key, lambda: _accuracies(model, problems, cfg, chat))
    names = _run_names(cfg)
    runs, trained = {}, None
    with cfg.rewards.scorer() as rewarder:  # one sandbox for both runs, started only if one trains
        for name in names:
            summary, policy, run_dir = _train(model, problems, chat, cfg, pool, {i: rates[i] for i in kept}, name, start,
                                              out_dir, rewarder, report["before"], progress)  # fmt: skip
            after_key = {**eval_key, "model": fingerprint(policy)}
            final = summary["final_eval"]
            after = _cached(run_dir / "after.json", after_key, lambda: _accuracies(policy, problems, cfg, chat, final))
            report[name], runs[name] = _run_report(summary, after, run_dir), summary
            if name == names[0]:
                trained = policy
    report["table"], table_md = _table(report, names)
    report["reward_curves"] = str(plot_reward_curves(runs, out_dir / "reward_curves.png", report["before"]["accuracy"]))
    target = out_dir / "model"
    save_checkpoint(trained, target, extra_files=chat.files())
    report["model"] = str(target)
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "grpo_report.md", "# GRPO: held-out accuracy (greedy)\n\n" + table_md)
    log.info("grpo: held-out accuracy %.3f -> %s", report["before"]["accuracy"],
             ", ".join(f"{n} {report[n]['accuracy']:.3f}" for n in names))  # fmt: skip
    return report, trained
