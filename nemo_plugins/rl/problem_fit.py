"""Which RL stage settings cannot run on the problems of `data.problems`, found before any stage runs.

The tiny-world defaults (`difficulties` and `eval_difficulties` of levels 2-4, `prompt_source:
fresh`, `rewards.task: world`) only fit the tiny world: CHAMP and JSONL problems have no levels
(every one is difficulty 0), no new problems can be drawn from them, and a reward must check the
problems' own task. Each stage refuses them when it runs; this lists every one of them across the
selected stages at once, so a run is refused when its config loads (or, for a JSONL whose task is
known only once read, when the file is read), not after the stages before it have run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The settings each RL stage has that only the tiny world's problems can satisfy.
LEVEL_KEYS = ("difficulties", "eval_difficulties")


@dataclass(frozen=True)
class Misfit:
    """`key=value` does not fit the problems: `why`, and `fix` is a value that does."""

    key: str
    value: object
    fix: object
    why: str


def override_value(value) -> str:
    """`value` as a key=value override spells it (null, [2,3,4], math)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def misfits(stages: Mapping[str, object], source: str, task: str | None) -> list[Misfit]:
    """Every setting of the RL stage configs `stages` ({section: config}) that cannot run on
    `source`'s problems of reward task `task` (None: not known yet, e.g. a JSONL not read yet)."""
    no_levels = f"levels exist only in the tiny world; {source} problems have none"
    no_fresh = f"it draws new tiny-world problems; {source} has none"
    other_task = f"the rewards must check the problems' task, and {source}'s is {task}"
    found = []
    for section, cfg in stages.items():
        if source != "tiny":
            for name in LEVEL_KEYS:
                value = getattr(cfg, name, None)
                if value is not None:
                    found.append(Misfit(f"{section}.{name}", value, None, no_levels))
            if getattr(cfg, "prompt_source", "train") == "fresh":
                found.append(Misfit(f"{section}.prompt_source", "fresh", "train", no_fresh))
        if task is not None and cfg.rewards.task != task:
            found.append(Misfit(f"{section}.rewards.task", cfg.rewards.task, task, other_task))
    return found


def misfit_message(found: list[Misfit], source: str, task_known: bool = True) -> str:
    """One error naming each misfit (key=value: why) and the overrides that fix them all."""
    lines = [f"data.problems.source={source}: {len(found)} setting(s) of the selected stages do not fit its problems:"]
    lines += [f"  {m.key}={override_value(m.value)}: {m.why}" for m in found]
    lines.append("fix: add " + " ".join(f"{m.key}={override_value(m.fix)}" for m in found))
    if not task_known:
        lines.append("(each <stage>.rewards.task must also be the task of the prompts in data.problems.paths; "
                     "that is checked when they are read, before the first stage)")  # fmt: skip
    return "\n".join(lines)
