"""The prompt rows that NeMo-Aligner's RL trainer, the reward server and the curriculum sampler share.

Aligner's RLHF dataset reads JSONL rows `{"text": prompt}` and tokenizes each `text`; row i is
dataset index i. This module renders the project's RL prompts (`data.prompts` JSONL, one task)
through the model's chat template, once per thinking mode, in a fixed order (problem by problem,
modes in the order given). The reward server and the sampler rebuild the same rows from the same
prompt file, tokenizer and modes, so all three agree on what index i is and which answer and
thinking mode its prompt tokens stand for; nothing has to travel with the rollouts.

A row's `problem_id` is the core's `data.curriculum.problem_id` of its question, the key pass
rates are stored under (`rl.pass_rates`), so the core's pass-rate estimates drive the sampler.

    python -m nemo_plugins.aligner.prompt_set prompts=[train.jsonl] tokenizer=MODEL_DIR out=aligner_prompts.jsonl
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer
from ..data.curriculum import problem_id
from ..data.problems import TaskProblem
from ..data.prompts import load_prompts


@dataclass(frozen=True)
class PromptRow:
    """Dataset row `index`: `problem_id`'s question rendered under `thinking`, its reference, and
    the question itself (an LLM judge reads it)."""

    index: int
    problem_id: str
    thinking: bool
    text: str
    answer: str
    question: str = ""


@dataclass
class PromptSet:
    """All rows of one prompt file for one task, and each (problem id, thinking) row's index."""

    task: str
    rows: list[PromptRow]
    index_of: dict[tuple[str, bool], int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index_of = {(r.problem_id, r.thinking): r.index for r in self.rows}

    @property
    def problem_ids(self) -> list[str]:
        """Problem ids in file order, each once."""
        return list(dict.fromkeys(r.problem_id for r in self.rows))


def _check_modes(modes) -> tuple[bool, ...]:
    modes = tuple(modes)
    if not modes or len(set(modes)) != len(modes) or not all(isinstance(m, bool) for m in modes):
        raise ValueError(f"modes={modes!r}: expected distinct thinking modes, e.g. (True, False)")
    return modes


def load_prompt_set(paths, tokenizer: ChatTokenizer, modes=(True, False)) -> PromptSet:
    """Rows of the prompt JSONL `paths` under each thinking mode of `modes`.

    Raises ValueError for a malformed record (naming its file:line) or prompts of more than one
    task (one reward task per server, as in the core's GRPO). Repeated questions keep the first.
    """
    modes = _check_modes(modes)
    records, _ = load_prompts(paths, on_error="raise")
    tasks = sorted({r.task for r in records})
    if len(tasks) != 1:
        raise ValueError(f"prompts {paths}: expected records of one task, found {tasks or 'none'}")
    rows: list[PromptRow] = []
    seen: set[str] = set()
    for r in records:
        pid = problem_id(TaskProblem(r.prompt, r.answer, r.id))
        if pid in seen:
            continue
        seen.add(pid)
        for thinking in modes:
            rows.append(PromptRow(len(rows), pid, thinking, tokenizer.prompt(r.prompt, thinking), r.answer, r.prompt))
    return PromptSet(tasks[0], rows)


def write_aligner_prompts(prompt_set: PromptSet, path: str | PathLike) -> int:
    """Write the rows as Aligner's prompt JSONL (`text`, plus `problem_id` and `thinking`, which
    Aligner ignores); returns the number of rows."""
    with open(Path(path), "w", encoding="utf-8") as f:
        for r in prompt_set.rows:
            f.write(json.dumps({"text": r.text, "problem_id": r.problem_id, "thinking": r.thinking}, ensure_ascii=False) + "\n")
    return len(prompt_set.rows)


@dataclass
class PromptFileConfig:
    """`python -m nemo_plugins.aligner.prompt_set` settings: the project's prompt JSONL files, the
    model directory whose tokenizer and chat template render them, the thinking modes, the output."""

    prompts: list[str] = field(default_factory=list)
    tokenizer: str = ""
    modes: list[bool] = field(default_factory=lambda: [True, False])
    out: str = ""


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    cfg = load_config(PromptFileConfig, overrides=sys.argv[1:] if argv is None else argv)
    for key in ("prompts", "tokenizer", "out"):
        if not getattr(cfg, key):
            raise SystemExit(f"{key} is not set: expected prompts=[file.jsonl] tokenizer=MODEL_DIR out=FILE.jsonl")
    prompt_set = load_prompt_set(cfg.prompts, ChatTokenizer.from_dir(cfg.tokenizer), cfg.modes)
    n = write_aligner_prompts(prompt_set, cfg.out)
    print(f"wrote {n} prompt rows ({len(prompt_set.problem_ids)} problems x {len(cfg.modes)} modes, task {prompt_set.task}) to {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
