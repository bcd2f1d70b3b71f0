"""The core's GRPO prompt curriculum as Aligner dataset indices, one global batch at a time.

What the core's GRPO does per step, here per Aligner rollout step: pass rates from a prior model
(`rl.pass_rates`, keyed by `data.curriculum.problem_id`), prompts at or above `threshold` dropped
(`filter_by_pass_rate`), the rest batched by the core's sampler (as `rl.experience.make_sampler`: the Gaussian
curriculum over pass-rate levels, or uniform), each prompt's thinking mode drawn by GRPO's
`choose_modes` (`off_fraction` off). Global batch b is a pure function of the settings, so a run
resumed at `consumed_samples` replays to batch `consumed_samples // global_batch_size` and draws
the same batches as one that never stopped; `rank_micro_batches` splits a global batch over the
data-parallel ranks so that together they return exactly that batch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from ..data.curriculum import CurriculumSampler, RandomSampler, filter_by_pass_rate
from ..rl.config import SamplerSettings
from ..rl.experience import choose_modes
from .prompt_set import PromptSet


def load_pass_rates(path: str | PathLike) -> dict[str, float]:
    """{problem_id: pass rate} from a JSON file: the core's cache (`{"key", "pass_rates"}`, as
    `rl.pass_rates.estimate_pass_rates` writes it) or a plain mapping."""
    data = json.loads(Path(path).read_text())
    rates = data.get("pass_rates", data) if isinstance(data, dict) else None
    if not isinstance(rates, dict):
        raise ValueError(f"{path}: expected a JSON object {{problem_id: pass rate}} or {{'pass_rates': {{...}}}}")
    return {str(k): v for k, v in rates.items()}


@dataclass
class CurriculumSettings:
    """The sampler's settings: GRPO's (`rl.config.SamplerSettings`: kind, levels, Gaussian schedule),
    the pass-rate `threshold` (paper: 0.75), `total_batches` the schedule spans (the run's steps),
    `seed`, and the fraction of prompts per batch under "detailed thinking off"."""

    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    threshold: float = 0.75
    total_batches: int = 100
    seed: int = 0
    off_fraction: float = 0.0


class CurriculumPlan:
    """Global batch b (`global_batch_size` dataset indices) of the curriculum over `prompt_set`."""

    def __init__(self, prompt_set: PromptSet, pass_rates: Mapping[str, float], global_batch_size: int,
                 settings: CurriculumSettings = CurriculumSettings()):  # fmt: skip
        known = set(prompt_set.problem_ids)
        unknown = [k for k in pass_rates if k not in known]
        if unknown:
            raise ValueError(f"pass_rates: {len(unknown)} ids are not problems of the prompt file (first {unknown[0]!r}): "
                             "expected rates keyed by data.curriculum.problem_id of these prompts")  # fmt: skip
        if not 0.0 <= settings.off_fraction <= 1.0:
            raise ValueError(f"off_fraction={settings.off_fraction}: expected a value in [0, 1]")
        modes = {t for _, t in prompt_set.index_of}
        need = ({True} if settings.off_fraction < 1 else set()) | ({False} if settings.off_fraction > 0 else set())
        if not need <= modes:
            raise ValueError(f"off_fraction={settings.off_fraction} needs thinking modes {sorted(need)}, "
                             f"the prompt file has {sorted(modes)}")  # fmt: skip
        self.prompt_set, self.settings, self.global_batch_size = prompt_set, settings, global_batch_size
        self.filter = filter_by_pass_rate(pass_rates, settings.threshold)
        self.pass_rates = {k: pass_rates[k] for k in self.filter.kept}
        if global_batch_size > len(self.pass_rates):
            raise ValueError(f"global_batch_size={global_batch_size}: expected <= the prompts kept after filtering "
                             f"({len(self.pass_rates)} of {len(pass_rates)} below threshold {settings.threshold})")  # fmt: skip
        self._sampler = None

    def _new_sampler(self):
        s = self.settings
        cfg = s.sampler.curriculum_config(self.global_batch_size, s.total_batches, s.seed)
        kind = CurriculumSampler if s.sampler.kind == "curriculum" else RandomSampler
        return kind(dict(self.pass_rates), cfg)

    def problem_ids(self, b: int) -> list[str]:
        """Problem ids of global batch `b` (replayed from the start when `b` is behind the sampler)."""
        if b < 0:
            raise ValueError(f"batch index {b}: expected >= 0")
        if self._sampler is None or self._sampler.batch_index > b:
            self._sampler = self._new_sampler()
        while self._sampler.batch_index < b:
            self._sampler.next_batch()
        return self._sampler.next_batch()

    def global_batch(self, b: int) -> list[int]:
        """Dataset indices of global batch `b`: each problem under its thinking mode for that batch."""
        ids = self.problem_ids(b)
        thinking = choose_modes(len(ids), self.settings.off_fraction, self.settings.seed, b)
        return [self.prompt_set.index_of[(i, t)] for i, t in zip(ids, thinking)]


def rank_micro_batches(batch: Sequence[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: micro-step m gives rank r the slice
    [m·mbs·world + r·mbs, +mbs), so the ranks' micro-batches together are the batch, each row once."""
    step = micro_batch_size * world
    if len(batch) % step:
        raise ValueError(f"global batch of {len(batch)}: expected a multiple of micro_batch_size x data-parallel size ({step})")
    if not 0 <= rank < world:
        raise ValueError(f"data-parallel rank {rank}: expected 0..{world - 1}")
    return [list(batch[m + rank * micro_batch_size : m + (rank + 1) * micro_batch_size]) for m in range(0, len(batch), step)]
