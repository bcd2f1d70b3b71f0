"""The `rpo` stage: iterative online RPO (`rl.rpo`) of the input policy against a frozen reward
model (the `reward_model` stage's, or `rpo.reward_model`, a directory another tool wrote).

1. Training prompts: the first `train_problems` unique problems of the training split (of
   `difficulties`).
2. RPO for `iterations` rounds, each with the previous round's policy as reference.
3. On HELD-OUT prompts, for the starting policy and after each round (greedy, thinking on):
   the reward model's mean score, the win rate against the starting policy (the reward model as
   judge: a higher score wins, an equal score or the same response counts ½) and task accuracy.
   On the tiny world the held-out prompts are drawn apart from both splits, as "tuning" (the
   set the defaults were chosen on) or "report" (drawn apart from tuning too; the default).
4. `report.json` (those figures per round, pairs and ties of each round), `rpo_iterations.png`,
   and the last round's policy in `model/`.

The run lives in a directory keyed by its config, the starting policy's and the reward model's
fingerprints and the problem set, so a rerun resumes (a finished run trains nothing) and a
changed setting starts afresh; held-out evaluations are cached per model.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import problems_by_id
from ..data.problems import ProblemSet
from ..data.reasoning_world import Problem, is_well_formatted
from ..data.tiny_world import World
from ..evaluate import check_answers
from ..model.checkpoint import fingerprint, save_checkpoint, tensors_digest
from ..model.generate import SamplingConfig
from ..model.rollout import RolloutConfig, sample_questions
from ..utils.atomic import write_json_atomic
from ..utils.hashing import config_hash
from .config import run_key
from .grpo_stage import _cached, _tiny_only
from .plots import plot_rpo_iterations
from .reward_model import RewardModel, RewardModelScorer, load_reward_model
from .rpo import RPOConfig, run_rpo

log = logging.getLogger("nemo_plugins.rpo")

EVAL_SETS = ("report", "tuning")
_REPORT_ONLY = ("eval_problems", "eval_set", "eval_difficulties", "reward_model", "eval_every")


def _rpo_bad(name: str, value, expected: str):
    raise ValueError(f"rpo.{name}={value!r}: expected {expected}")


@dataclass
class RPOStageConfig(RPOConfig):
    """An RPO run's settings (`rpo.RPOConfig`) plus the stage's: `reward_model` (a directory
    `reward_model.save_reward_model` wrote; null: the `reward_model` stage's output), the prompt
    pool (`train_problems` of `difficulties`, null = all) and the held-out set (`eval_problems`
    problems; `eval_difficulties` null: the first of the world's eval split, a list: drawn apart
    from both splits on the tiny world, as `eval_set` "report" or "tuning", see the module doc)."""

    reward_model: str | None = None
    train_problems: int = 1024
    difficulties: list[int] | None = None
    eval_difficulties: list[int] | None = None
    eval_set: str = "report"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.train_problems, bool) or not isinstance(self.train_problems, int) or self.train_problems < 1:
            _rpo_bad("train_problems", self.train_problems, "a positive integer")
        if self.eval_problems < 1:
            _rpo_bad("eval_problems", self.eval_problems, "a positive integer (the held-out prompts)")
        for name in ("difficulties", "eval_difficulties"):
            value = getattr(self, name)
            if value is not None and (not value or any(d < 1 for d in value)):
                _rpo_bad(name, value, "a non-empty list of integers >= 1, or null")
        if self.eval_set not in EVAL_SETS:
            _rpo_bad("eval_set", self.eval_set, "report (drawn apart from the set the defaults were chosen on) or tuning")
        if self.reward_model is not None and not str(self.reward_model).strip():
            _rpo_bad("reward_model", self.reward_model, "a reward model directory, or null for the reward_model stage's")


def training_pool(problems: ProblemSet, cfg: RPOStageConfig) -> dict[str, Problem]:
    """{problem_id: problem}: the first `train_problems` unique training problems of `difficulties`."""
    wanted = set(cfg.difficulties) if cfg.difficulties is not None else None
    chosen = [p for p in problems.train if wanted is None or p.difficulty in wanted]
    pool = dict(list(problems_by_id(chosen).items())[: cfg.train_problems])
    if not pool:
        _rpo_bad("difficulties", cfg.difficulties, "difficulties present in the training split")
    return pool


def heldout_set(problems: ProblemSet, cfg: RPOStageConfig) -> list[Problem]:
    """The stage's held-out prompts (see `RPOStageConfig`)."""
    if cfg.eval_difficulties is None:
        return problems.eval[: cfg.eval_problems]
    try:
        world = _tiny_only(problems, "eval_difficulties", cfg.eval_difficulties, "null")
    except ValueError as e:
        raise ValueError(str(e).replace("grpo.", "rpo.", 1)) from None
    tuning = world.extra_heldout(cfg.eval_problems, cfg.eval_difficulties, tag="rpo-tuning")
    if cfg.eval_set == "tuning":
        return tuning
    return world.extra_heldout(cfg.eval_problems, cfg.eval_difficulties, tag="rpo-report", exclude=tuning)


def evaluate_policy(model, rm: RewardModel, chat: ChatTokenizer, problems: list[Problem], cfg: RPOStageConfig,
                    verify: Callable[[str, Problem], bool]) -> dict:  # fmt: skip
    """Greedy responses (thinking on) to `problems`: the reward model's mean score, task accuracy,
    format rate, and per problem the score and the response (for win rates)."""
    engine = RolloutConfig(SamplingConfig(max_new_tokens=cfg.max_new_tokens), batch_size=cfg.generation_batch_size)
    done = sample_questions(model, chat, [p.question for p in problems], True, engine)
    seqs = [p + c for p, c in zip(done.prompt_ids, done.ids)]
    scores = RewardModelScorer(rm, chat, cfg.score_batch_size).score_ids(seqs).tolist()
    correct = check_answers(verify, done.texts, problems)
    n = len(problems)
    return {"rm_score": sum(scores) / n, "accuracy": sum(correct) / n,
            "format_ok": sum(is_well_formatted(t, True) for t in done.texts) / n, "n": n,
            "scores": scores, "responses": done.texts}  # fmt: skip


def win_rate(ev: dict, base: dict) -> float:
    """Share of prompts where `ev`'s response outscores `base`'s under the reward model; equal
    scores or the same response count ½."""
    total = 0.0
    for s, b, r, rb in zip(ev["scores"], base["scores"], ev["responses"], base["responses"], strict=True):
        total += 0.5 if (r == rb or s == b) else float(s > b)
    return total / len(ev["scores"])


def _row(iteration: int, ev: dict, base: dict, summary: dict | None) -> dict:
    row = {"iteration": iteration, "rm_score": ev["rm_score"], "win_rate": win_rate(ev, base),
           "accuracy": ev["accuracy"], "format_ok": ev["format_ok"], "n": ev["n"]}  # fmt: skip
    if summary is not None:
        hist = summary["history"]
        row.update(steps=summary["steps"], pairs=sum(r.get("pairs", 0) for r in hist),
                   ties_skipped=sum(r.get("ties_skipped", 0) for r in hist),
                   train_rm_score_first=hist[0].get("rm_score") if hist else None,
                   train_rm_score_last=hist[-1].get("rm_score") if hist else None,
                   run_dir=str(Path(summary["checkpoint_dir"]).parent))  # fmt: skip
    return row


def run_rpo_stage(
    model, world: World, cfg: RPOStageConfig, out_dir: str | Path, *, reward_model_dir: str | Path,
    progress: bool = False, chat: ChatTokenizer | None = None, problems: ProblemSet | None = None,
):  # fmt: skip
    """(report, trained policy). `model` itself is not changed (a copy trains). The reward model
    is read from `reward_model_dir`; `chat` and `problems` default to the tiny world's."""
    out_dir = Path(out_dir)
    chat = chat or world.chat
    problems = problems or ProblemSet(world)
    if problems.task != cfg.rewards.task:
        _rpo_bad("rewards.task", cfg.rewards.task, f"{problems.task!r}, the task of data.problems.source={problems.cfg.source}")
    rm = load_reward_model(reward_model_dir, device=model.lm_head.weight.device)
    if rm.backbone.config.vocab_size != model.config.vocab_size:
        _rpo_bad("reward_model", str(reward_model_dir), f"a reward model with the policy's vocabulary "
                 f"({model.config.vocab_size} tokens, not {rm.backbone.config.vocab_size})")  # fmt: skip
    start = fingerprint(model)
    rm_id = config_hash(fingerprint(rm.backbone), tensors_digest(rm.head.state_dict()))
    pool = training_pool(problems, cfg)
    held_out = heldout_set(problems, cfg)
    data_key = [problems.key] if problems.key else []
    key = run_key(cfg, _REPORT_ONLY)
    run_dir = out_dir / f"run-{config_hash(key, start, rm_id, *data_key)}"
    eval_key = {"problems": [p.question for p in held_out], "max_new_tokens": cfg.max_new_tokens, "rm": rm_id}

    def evaluate(policy) -> dict:
        name = fingerprint(policy)
        return _cached(out_dir / "evals" / f"{name}-{config_hash(eval_key)}.json", {**eval_key, "model": name},
                       lambda: evaluate_policy(policy, rm, chat, held_out, cfg, cfg.rewards.verifier()))  # fmt: skip

    base = evaluate(model)
    rows = [_row(0, base, base, None)]
    policy = copy.deepcopy(model)
    with cfg.rewards.scorer() as scorer:
        run_rpo(policy, chat, pool, cfg, rm, run_dir, scorer=scorer, progress=progress,
                on_iteration=lambda i, p, summary: rows.append(_row(i, evaluate(p), base, summary)))  # fmt: skip
    target = out_dir / "model"
    save_checkpoint(policy, target, extra_files=chat.files())
    report = {
        "start_fingerprint": start, "reward_model": str(reward_model_dir), "loss": cfg.loss, "beta": cfg.beta,
        "eta": cfg.eta, "rule_weight": cfg.rule_weight, "sft_loss_weight": cfg.sft_loss_weight, "pairs": cfg.pairs,
        "lr": cfg.lr, "train_prompts": len(pool),
        "heldout": {"n": len(held_out), "set": cfg.eval_set if cfg.eval_difficulties is not None else "eval split",
                    "difficulties": cfg.eval_difficulties, "decoding": "greedy, thinking on"},
        "iterations": rows, "run_dir": str(run_dir),
        "plot": str(plot_rpo_iterations(rows, out_dir / "rpo_iterations.png")), "model": str(target),
    }  # fmt: skip
    write_json_atomic(out_dir / "report.json", report)
    log.info("rpo: held-out rm score %s, win rate %s, accuracy %s",
             " -> ".join(f"{r['rm_score']:.3f}" for r in rows), " -> ".join(f"{r['win_rate']:.3f}" for r in rows),
             " -> ".join(f"{r['accuracy']:.3f}" for r in rows))  # fmt: skip
    return report, policy
