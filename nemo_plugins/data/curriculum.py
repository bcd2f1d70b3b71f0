"""Data filtering and curriculum sampling for GRPO (Llama-Nemotron, arXiv 2505.00949 §5).

The paper prepares RL prompts in two steps, both here:

1. **Filtering.** Sample k completions per prompt from a prior model and drop the prompts
   it already solves often (pass rate >= a threshold; the paper uses k=8 and 0.75):
   `rl.pass_rates.estimate_pass_rates` (it samples the model) then `filter_by_pass_rate`.
2. **Curriculum ("progressive batching").** Group prompts into pass-rate levels. For each
   batch the target distribution over levels is a Gaussian whose centre moves from the easiest
   level (highest pass rate) to the hardest over training; samples are allocated by that target
   within what remains at each level, leftover capacity is filled from the levels with the
   largest remaining pools, and the batch is shuffled: `CurriculumSampler`. `RandomSampler` has
   the same interface with uniform batches, for comparison (the paper found the curriculum better).

Problem ids: `Problem` has no id field, so `problem_id` derives one from the question text
(first 16 hex digits of its SHA-256). It is stable across runs and processes; equal questions
(which have equal answers) share an id, so a problem set with repeats collapses to its unique
questions here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field


from .reasoning_world import Problem

log = logging.getLogger("nemo_plugins.curriculum")

STATE_VERSION = 1

ProblemId = Hashable  # str from `problem_id`; any JSON scalar works for the samplers


# -----------------------------------------------------------------------------
# problem ids


def problem_id(problem: Problem) -> str:
    """Stable id of a problem: the first 16 hex digits of the SHA-256 of its question text."""
    return hashlib.sha256(problem.question.encode("utf-8")).hexdigest()[:16]


def problems_by_id(problems: Sequence[Problem]) -> dict[str, Problem]:
    """{problem_id: problem}, first occurrence kept; repeated questions collapse to one entry."""
    out: dict[str, Problem] = {}
    for p in problems:
        out.setdefault(problem_id(p), p)
    return out


# -----------------------------------------------------------------------------
# filtering


@dataclass
class FilterResult:
    """Prompts kept (pass rate < threshold) and dropped, each in input order."""

    threshold: float
    kept: list
    dropped: list

    def counts(self) -> dict:
        total = len(self.kept) + len(self.dropped)
        return {"total": total, "kept": len(self.kept), "dropped": len(self.dropped), "threshold": self.threshold}


def _check_pass_rates(pass_rates: Mapping) -> None:
    if not pass_rates:
        raise ValueError("pass_rates: empty")
    for i, r in pass_rates.items():
        if not (isinstance(r, (int, float)) and 0.0 <= r <= 1.0):
            raise ValueError(f"pass_rates[{i!r}]={r!r}: expected a number in [0, 1]")


def filter_by_pass_rate(pass_rates: Mapping, threshold: float) -> FilterResult:
    """Drop prompts the prior model already solves often (pass rate >= threshold; paper: 0.75)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold}: expected 0 < threshold <= 1")
    _check_pass_rates(pass_rates)
    kept = [i for i, r in pass_rates.items() if r < threshold]
    dropped = [i for i, r in pass_rates.items() if r >= threshold]
    result = FilterResult(threshold, kept, dropped)
    log.info("pass-rate filter: kept %(kept)d of %(total)d (dropped %(dropped)d at >= %(threshold)s)", result.counts())
    return result


# -----------------------------------------------------------------------------
# levels


@dataclass
class CurriculumConfig:
    """Batching settings shared by `CurriculumSampler` and `RandomSampler`.

    Levels over pass rate (ordered easiest = highest pass rate first):
      - `level_edges` (ascending, inside (0, 1)): bin i holds rates in [edge[i-1], edge[i]);
      - else `num_levels` equal-width bins over the observed range [min, max] of pass rates;
      - else (both None) one level per distinct pass rate (k samples give at most k+1).
    Levels that hold no prompt are dropped.

    The Gaussian target over levels has standard deviation `std` (in level units); its centre
    moves linearly from `centre_start` to `centre_end` (fractions of the level range, 0 =
    easiest, 1 = hardest) over batches 0..`total_batches`-1 and stays at `centre_end` after.

    `without_replacement=True`: each prompt is drawn at most once per epoch. An epoch ends when
    the pools together hold fewer prompts than a batch: that batch takes all of them, every pool
    refills (reshuffled, a new epoch), and the rest of the batch comes from the new epoch, which
    draws the prompts already in that batch last. So every prompt is drawn exactly once per
    epoch and never twice in one batch. `False`: every batch draws distinct prompts from the
    full levels (pools never run dry).
    """

    batch_size: int = 64
    num_levels: int | None = None
    level_edges: list[float] | None = None
    std: float = 1.0
    total_batches: int = 100
    centre_start: float = 0.0
    centre_end: float = 1.0
    seed: int = 0
    without_replacement: bool = True

    def __post_init__(self):
        def bad(name, value, expected):
            raise ValueError(f"curriculum.{name}={value}: expected {expected}")

        if self.batch_size < 1:
            bad("batch_size", self.batch_size, ">= 1")
        if self.num_levels is not None and self.num_levels < 1:
            bad("num_levels", self.num_levels, ">= 1 (or None)")
        if self.level_edges is not None:
            edges = list(self.level_edges)
            if not all(0.0 < e < 1.0 for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
                bad("level_edges", edges, "strictly ascending values inside (0, 1)")
        if not self.std > 0:
            bad("std", self.std, "> 0")
        if self.total_batches < 1:
            bad("total_batches", self.total_batches, ">= 1")
        for name in ("centre_start", "centre_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, getattr(self, name), "a value in [0, 1]")


def _bin_index(rate: float, cfg: CurriculumConfig, lo: float, hi: float, distinct: list[float]) -> int:
    """Bin of a pass rate, counted from the lowest rate (hardest) upwards."""
    if cfg.level_edges is not None:
        return sum(rate >= e for e in cfg.level_edges)
    if cfg.num_levels is not None:
        if hi == lo:
            return 0
        x = (rate - lo) / (hi - lo) * cfg.num_levels
        return min(int(math.floor(x + 1e-9)), cfg.num_levels - 1)  # epsilon: rates on an edge go up
    return distinct.index(rate)


def build_levels(pass_rates: Mapping, cfg: CurriculumConfig) -> list[list]:
    """Prompt ids per non-empty level, easiest (highest pass rate) first, each in input order."""
    _check_pass_rates(pass_rates)
    rates = list(pass_rates.values())
    distinct = sorted(set(rates))
    bins: dict[int, list] = {}
    for i, r in pass_rates.items():
        bins.setdefault(_bin_index(r, cfg, min(rates), max(rates), distinct), []).append(i)
    return [bins[b] for b in sorted(bins, reverse=True)]


# -----------------------------------------------------------------------------
# allocation


def gaussian_weights(num_levels: int, centre: float, std: float) -> list[float]:
    """Normalized Gaussian weights over level indices 0..num_levels-1."""
    w = [math.exp(-0.5 * ((i - centre) / std) ** 2) for i in range(num_levels)]
    total = sum(w)
    return [x / total for x in w]


def largest_remainder(weights: Sequence[float], n: int) -> list[int]:
    """Integers summing to n, proportional to weights: floors, then +1 by largest fraction (ties: lower index)."""
    quotas = [w * n for w in weights]
    counts = [int(math.floor(q)) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def fill_leftover(take: list[int], available: Sequence[int], n: int, centre: float) -> list[int]:
    """Raise `take` (<= available) to sum n, one at a time to the level with the most left over.

    Ties go to the level nearest the centre, then the easier one.
    """
    take = list(take)
    for _ in range(n - sum(take)):
        best = max(range(len(take)), key=lambda i: (available[i] - take[i], -abs(i - centre), -i))
        if available[best] - take[best] <= 0:
            raise ValueError(f"cannot fill a batch of {n}: only {sum(available)} prompts available")
        take[best] += 1
    return take


# -----------------------------------------------------------------------------
# samplers


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


@dataclass
class _PoolSampler:
    """Batches drawn from per-group pools; subclasses say how a batch splits over the groups.

    Holds the pass-rate levels (for `batch_composition`) and everything `state_dict` saves:
    batch index, epoch, the ids left in each pool (in draw order) and the RNG state.
    """

    pass_rates: Mapping = field(repr=False)
    config: CurriculumConfig = field(default_factory=CurriculumConfig)
    kind = "base"

    def __post_init__(self):
        self.levels = build_levels(self.pass_rates, self.config)
        self.level_of = {i: lvl for lvl, ids in enumerate(self.levels) for i in ids}
        self.groups = self._groups()
        n = len(self.level_of)
        if self.config.batch_size > n:
            raise ValueError(f"curriculum.batch_size={self.config.batch_size}: expected <= the number of prompts ({n})")
        self.rng = random.Random(self.config.seed)
        self.batch_index = 0
        self.epoch = 0
        self.pools = self._fresh_pools(exclude=set())

    # subclass hooks
    def _groups(self) -> list[list]:
        raise NotImplementedError

    def _allocate(self, n: int, available: list[int]) -> list[int]:
        raise NotImplementedError

    # drawing
    def _fresh_pools(self, exclude: set) -> list[list]:
        """Every group reshuffled; ids in `exclude` (already in this batch) moved to the end."""
        pools = []
        for ids in self.groups:
            pool = list(ids)
            self.rng.shuffle(pool)
            pools.append([i for i in pool if i not in exclude] + [i for i in pool if i in exclude])
        return pools

    def _draw_without_replacement(self) -> list:
        n = self.config.batch_size
        batch: list = []
        if sum(map(len, self.pools)) < n:  # epoch ends inside this batch
            batch = [i for pool in self.pools for i in pool]
            self.pools = self._fresh_pools(exclude=set(batch))
            self.epoch += 1
        taken = set(batch)
        available = [sum(i not in taken for i in pool) for pool in self.pools]
        counts = self._allocate(n - len(batch), available)
        for g, c in enumerate(counts):
            batch += self.pools[g][:c]
            self.pools[g] = self.pools[g][c:]
        return batch

    def _draw_with_replacement(self) -> list:
        counts = self._allocate(self.config.batch_size, [len(ids) for ids in self.groups])
        return [i for ids, c in zip(self.groups, counts) for i in self.rng.sample(ids, c)]

    def next_batch(self) -> list:
        """Prompt ids of the next batch (distinct, shuffled)."""
        if self.config.without_replacement:
            batch = self._draw_without_replacement()
        else:
            batch = self._draw_with_replacement()
        self.rng.shuffle(batch)
        self.batch_index += 1
        return batch

    # metrics
    def batch_composition(self, batch: Sequence) -> list[int]:
        """Number of prompts of the batch in each level, easiest first."""
        counts = [0] * len(self.levels)
        for i in batch:
            counts[self.level_of[i]] += 1
        return counts

    def mean_pass_rate(self, batch: Sequence) -> float:
        return sum(self.pass_rates[i] for i in batch) / len(batch)

    # checkpointing
    def _fingerprint(self) -> str:
        blob = json.dumps([self.kind, asdict(self.config), self.levels], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """JSON-able state (plain lists and ints): restoring it continues the exact batch sequence."""
        return {
            "kind": self.kind,
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "batch_index": self.batch_index,
            "epoch": self.epoch,
            "pools": [list(p) for p in self.pools],
            "rng": _rng_state(self.rng),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore `state_dict()`; refuses a state from another kind, config or set of prompts."""
        for name, want in (("kind", self.kind), ("version", STATE_VERSION), ("fingerprint", self._fingerprint())):
            if state.get(name) != want:
                raise ValueError(
                    f"sampler state {name}={state.get(name)!r}: expected {want!r} "
                    "(saved for another sampler, config or set of prompts)"
                )
        pools = [list(p) for p in state["pools"]]
        if len(pools) != len(self.groups) or any(not set(p) <= set(g) for p, g in zip(pools, self.groups)):
            raise ValueError("sampler state pools: ids do not match this sampler's prompts")
        self.batch_index = int(state["batch_index"])
        self.epoch = int(state["epoch"])
        self.pools = pools
        _set_rng_state(self.rng, state["rng"])


@dataclass
class CurriculumSampler(_PoolSampler):
    """Progressive batching: per batch a Gaussian target over pass-rate levels, centre easy -> hard.

    Per batch: target = Gaussian weights over levels x batch size (largest-remainder integers);
    take min(target, remaining) from each level; fill leftover capacity from the levels with
    the largest remaining pools; shuffle. Deterministic given the config (seed included) and the
    order of `pass_rates`.
    """

    kind = "curriculum"

    def _groups(self) -> list[list]:
        return self.levels

    def centre(self, batch_index: int | None = None) -> float:
        """Level index (fractional) the target is centred on at a batch (default: the next one)."""
        b = self.batch_index if batch_index is None else batch_index
        cfg = self.config
        t = min(1.0, b / max(cfg.total_batches - 1, 1))
        return (len(self.levels) - 1) * (cfg.centre_start + t * (cfg.centre_end - cfg.centre_start))

    def target_weights(self, batch_index: int | None = None) -> list[float]:
        return gaussian_weights(len(self.levels), self.centre(batch_index), self.config.std)

    def _allocate(self, n: int, available: list[int]) -> list[int]:
        target = largest_remainder(self.target_weights(), n)
        take = [min(t, a) for t, a in zip(target, available)]
        return fill_leftover(take, available, n, self.centre())


@dataclass
class RandomSampler(_PoolSampler):
    """Uniform random batches (without replacement per epoch when configured); no curriculum.

    Uses `batch_size`, `seed`, `without_replacement` and the levels (for `batch_composition`)
    of the config; the schedule fields are ignored.
    """

    kind = "random"

    def _groups(self) -> list[list]:
        return [[i for ids in self.levels for i in ids]]

    def _allocate(self, n: int, available: list[int]) -> list[int]:
        return [n]
