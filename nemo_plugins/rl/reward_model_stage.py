"""The `reward_model` stage: a reward model (`rl.reward_model`: the policy's architecture with a
scalar head, Bradley-Terry loss) trained from the input policy's weights on preference pairs.

Pairs come from one of three sources, each on three disjoint prompt sets: training prompts, a
"tuning" set that validates during training (the set the defaults were chosen on), and a
"report" set drawn apart from both, on which the stage reports its held-out accuracy.
- `pairs_path` (JSONL of {prompt, chosen, rejected}): the prompts are split by a hash of the
  prompt text, `heldout_fraction` of them to each held-out set.
- `policy_samples` >= 2: the input policy's own samples, a verified-correct one against a wrong
  one (`rl.policy_pairs`), on any problem source: the first `train_pairs` training problems, and
  `heldout_pairs` held-out problems in each held-out set (tiny world: drawn apart from both splits;
  other sources: the held-out split's problems alternately to tuning and report). The samples are
  cached per starting policy and settings.
- otherwise (the tiny world only): `data.preference_pairs.world_pairs`, a correct, well-formatted
  response against a hand-made wrong one, on the first `train_pairs` training problems and
  `heldout_pairs` new problems in each held-out set.

Writes `<stage>/model/` (the backbone), `<stage>/reward_head.safetensors` and
`<stage>/reward_model.json` (`reward_model.load_reward_model(<stage>)` reads them), and
`report.json`. The policy is not replaced: the stage's summary names the reward model under
`reward_model`, and the next stage continues from the policy this stage started from.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer
from ..data.preference_pairs import (
    DEFAULT_WORLD_KINDS, WORLD_KINDS, PreferencePair, load_pairs, pair_examples, pair_from_record, world_pairs,
)
from ..data.problems import ProblemSet
from ..data.sources import DataError
from ..data.tiny_world import World
from ..model.checkpoint import fingerprint
from ..utils.atomic import write_json_atomic
from ..utils.hashing import config_hash
from .grpo_stage import _cached
from .policy_pairs import PolicyPairSettings, policy_pairs
from .reward_model import RewardModel, RewardModelConfig, evaluate_pairs, save_reward_model, train_reward_model

log = logging.getLogger("nemo_plugins.reward_model")

_REPORT_ONLY = ("val_every",)


def _bad(name: str, value, expected: str):
    raise ValueError(f"reward_model.{name}={value!r}: expected {expected}")


@dataclass
class RewardModelStageConfig(RewardModelConfig):
    """Training settings (`reward_model.RewardModelConfig`) plus where the pairs come from (see
    the module doc): `pairs_path` (JSONL; null: the tiny world), `train_pairs` (tiny world:
    training problems, one pair each), `heldout_pairs` (tiny world: pairs in each held-out set),
    `difficulties` (tiny world: levels the pairs' problems come from; null: all),
    `heldout_fraction` (JSONL: share of prompts in each held-out set), `world_kinds` and
    `thinking_fraction` (tiny world: the wrong responses' kinds, `preference_pairs.WORLD_KINDS`, and
    the share of pairs in thinking-on mode) and, for pairs from the
    policy's samples, `policy_samples` (per prompt; 0: not from the policy),
    `policy_temperature`, `policy_max_new_tokens` and `policy_batch_size` (sequences per
    generate call)."""

    pairs_path: str | None = None
    train_pairs: int = 2048
    heldout_pairs: int = 300
    difficulties: list[int] | None = None
    heldout_fraction: float = 0.1
    world_kinds: list[str] = field(default_factory=lambda: list(DEFAULT_WORLD_KINDS))
    thinking_fraction: float = 0.5
    policy_samples: int = 0
    policy_temperature: float = 1.0
    policy_max_new_tokens: int = 64
    policy_batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("train_pairs", "heldout_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _bad(name, value, "a positive integer")
        if self.difficulties is not None and (not self.difficulties or any(d < 1 for d in self.difficulties)):
            _bad("difficulties", self.difficulties, "a non-empty list of integers >= 1, or null for all")
        if not (isinstance(self.heldout_fraction, (int, float)) and 0 < self.heldout_fraction < 0.5):
            _bad("heldout_fraction", self.heldout_fraction, "a number in (0, 0.5): the share of prompts in each held-out set")
        if not self.world_kinds or any(k not in WORLD_KINDS for k in self.world_kinds):
            _bad("world_kinds", self.world_kinds, f"a non-empty list of {list(WORLD_KINDS)}")
        if not (isinstance(self.thinking_fraction, (int, float)) and 0 <= self.thinking_fraction <= 1):
            _bad("thinking_fraction", self.thinking_fraction, "a number in [0, 1]: the share of thinking-on pairs")
        if self.pairs_path is not None and not str(self.pairs_path).strip():
            _bad("pairs_path", self.pairs_path, "a JSONL file or directory of pairs, or null for the tiny world")
        n = self.policy_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n == 1:
            _bad("policy_samples", self.policy_samples, "0 (pairs not from the policy) or at least 2 samples per prompt")
        if self.policy_samples and self.pairs_path is not None:
            _bad("policy_samples", self.policy_samples, f"0 with reward_model.pairs_path={self.pairs_path!r} (one source of pairs)")
        for name in ("policy_max_new_tokens", "policy_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _bad(name, value, "a positive integer")
        if not (isinstance(self.policy_temperature, (int, float)) and self.policy_temperature > 0):
            _bad("policy_temperature", self.policy_temperature, "a temperature > 0 (the samples must differ)")

    def policy_settings(self, seed_offset: int = 0) -> PolicyPairSettings:
        return PolicyPairSettings(self.policy_samples, self.policy_temperature, self.policy_max_new_tokens,
                                  self.policy_batch_size, self.seed + seed_offset)  # fmt: skip


def missing_pairs_message(source: str) -> str:
    """Why the stage has no pairs on `source`'s problems (not the tiny world's), and what to give."""
    return (f"reward_model.pairs_path=None: data.problems.source={source} has no tiny-world responses to build "
            'preference pairs from; give reward_model.pairs_path=PAIRS.jsonl (one {"prompt", "chosen", "rejected"} '
            "a line), or reward_model.policy_samples=4 (pairs from the policy's own verified samples), "
            "or leave reward_model out of stages")  # fmt: skip


def _prompt_bucket(prompt: str, seed: int) -> float:
    """A number in [0, 1) fixed by the prompt text (and seed): the same prompt, the same set."""
    return int(hashlib.sha256(f"{seed}/{prompt}".encode()).hexdigest()[:12], 16) / 16**12


def split_by_prompt(pairs: Sequence[PreferencePair], fraction: float, seed: int) -> dict[str, list[PreferencePair]]:
    """{"train", "tuning", "report"}: `fraction` of the prompts to each held-out set, by prompt hash."""
    out: dict[str, list[PreferencePair]] = {"train": [], "tuning": [], "report": []}
    for p in pairs:
        u = _prompt_bucket(p.prompt, seed)
        out["report" if u < fraction else "tuning" if u < 2 * fraction else "train"].append(p)
    return out


def pair_prompts(problems: ProblemSet, cfg: RewardModelStageConfig) -> dict[str, list]:
    """The train / tuning / report problems (disjoint) that tiny-world and policy pairs are built on."""
    if problems.cfg.source != "tiny":
        return {"train": problems.train[: cfg.train_pairs], "tuning": problems.eval[0::2][: cfg.heldout_pairs],
                "report": problems.eval[1::2][: cfg.heldout_pairs]}  # fmt: skip
    world = problems.world
    levels = cfg.difficulties or world.config.difficulties
    train = [p for p in world.train if p.difficulty in set(levels)]
    tuning = world.extra_heldout(cfg.heldout_pairs, levels, tag="rm-tuning")
    return {"train": list({p.question: p for p in train}.values())[: cfg.train_pairs], "tuning": tuning,
            "report": world.extra_heldout(cfg.heldout_pairs, levels, tag="rm-report", exclude=tuning)}  # fmt: skip


def sampled_pairs(model, chat: ChatTokenizer, problems: ProblemSet, cfg: RewardModelStageConfig, out_dir: Path,
                  start: str) -> tuple[dict[str, list[PreferencePair]], dict]:  # fmt: skip
    """Pairs from `model`'s own samples on each set of `pair_prompts` (cached in `out_dir` per
    starting weights `start` (its fingerprint), settings and prompts), and per set how many prompts
    gave none and why."""
    sets, counts = {}, {}
    for offset, (name, prompts) in enumerate(pair_prompts(problems, cfg).items()):
        settings = cfg.policy_settings(offset)
        key = {"model": start, "settings": asdict(settings), "task": problems.task,
               "prompts": config_hash([(p.question, str(p.answer)) for p in prompts])}  # fmt: skip

        def sample(prompts=prompts, settings=settings):
            pairs, n = policy_pairs(model, chat, prompts, problems.task, settings)
            return {"pairs": [p.to_json() for p in pairs], "counts": n}

        got = _cached(out_dir / f"policy-pairs-{name}-{config_hash(key)}.json", key, sample)
        sets[name] = [pair_from_record(r) for r in got["pairs"]]
        counts[name] = got["counts"]
        if not sets[name]:
            raise DataError(f"reward_model.policy_samples={cfg.policy_samples}: expected samples that give pairs (the "
                            f"{name} set has none: {got['counts']}); the policy needs both right and wrong answers: "
                            "more samples, a higher policy_temperature, or a policy that solves some problems")  # fmt: skip
    return sets, counts


def stage_pairs(problems: ProblemSet, cfg: RewardModelStageConfig) -> dict[str, list[PreferencePair]]:
    """The train / tuning / report pairs (disjoint prompts) of the stage from a JSONL file or the
    tiny world (see the module doc; pairs from the policy are `sampled_pairs`)."""
    if cfg.pairs_path is not None:
        pairs, read = load_pairs(cfg.pairs_path)
        if read.skipped:
            log.warning("reward_model.pairs_path=%s: skipped %d of %d records (%s)", cfg.pairs_path, read.skipped,
                        read.read, dict(read.reasons))  # fmt: skip
        sets = split_by_prompt(pairs, cfg.heldout_fraction, cfg.seed)
        empty = [k for k, v in sets.items() if not v]
        if empty:
            _bad("pairs_path", cfg.pairs_path, f"pairs enough for every set (the {empty[0]} set is empty: "
                 f"{len(pairs)} pairs, heldout_fraction={cfg.heldout_fraction})")  # fmt: skip
        return sets
    if problems.cfg.source != "tiny":
        raise ValueError(missing_pairs_message(problems.cfg.source))
    prompts = pair_prompts(problems, cfg)
    return {name: world_pairs(prompts[name], cfg.seed + i, kinds=cfg.world_kinds, thinking_fraction=cfg.thinking_fraction)
            for i, name in enumerate(("train", "tuning", "report"))}  # fmt: skip


def run_reward_model_stage(
    model, world: World, cfg: RewardModelStageConfig, out_dir: str | Path, *, progress: bool = False,
    chat: ChatTokenizer | None = None, problems: ProblemSet | None = None,
) -> tuple[dict, RewardModel]:  # fmt: skip
    """(report, reward model) trained from a copy of the policy `model` (not changed)."""
    out_dir = Path(out_dir)
    chat = chat or world.chat
    problems = problems or ProblemSet(world)
    start = fingerprint(model)
    sampled = None
    if cfg.policy_samples:
        sets, sampled = sampled_pairs(model, chat, problems, cfg, out_dir, start)
    else:
        sets = stage_pairs(problems, cfg)
    ids = {name: pair_examples(chat, pairs) for name, pairs in sets.items()}
    key = {k: v for k, v in asdict(cfg).items() if k not in _REPORT_ONLY}
    data = [[(p.prompt, p.chosen, p.rejected) for p in sets[n]] for n in ("train", "tuning")]
    run_dir = out_dir / f"run-{config_hash(key, start, data)}"
    rm = RewardModel(copy.deepcopy(model))
    summary = train_reward_model(rm, ids["train"], ids["tuning"], cfg, run_dir, pad_id=chat.pad_id, progress=progress)
    held_out = evaluate_pairs(rm, ids["report"], chat.pad_id, cfg.batch_size, kinds=[p.kind or "all" for p in sets["report"]])
    save_reward_model(rm, out_dir, extra_files=chat.files())
    report = {
        "start_fingerprint": start,
        "pairs": {name: len(v) for name, v in sets.items()},
        "source": cfg.pairs_path or ("the policy's samples (policy_pairs)" if sampled else "tiny world (world_pairs)"),
        **({"sampled": sampled} if sampled else {}),
        "heldout_accuracy": held_out["val_accuracy"],
        "heldout": {"set": "report", **held_out},
        "tuning_accuracy": summary["accuracy"],
        "untrained_tuning_accuracy": summary["untrained_accuracy"],
        "steps": summary["steps"],
        "run_dir": str(run_dir),
        "reward_model": str(out_dir),
    }
    write_json_atomic(out_dir / "report.json", report)
    log.info("reward model: held-out pair accuracy %.3f (tuning %.3f, untrained %.3f)", report["heldout_accuracy"],
             report["tuning_accuracy"], report["untrained_tuning_accuracy"])  # fmt: skip
    return report, rm
