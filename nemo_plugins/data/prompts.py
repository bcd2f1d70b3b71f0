"""RL prompts with verifiable answers, read from JSONL, for GRPO (and RLOO/RPO) stages.

GRPO samples completions for a prompt and scores them against a reference answer with a
rule-based reward (`rl.rewards`), so a prompt set is (prompt, answer, task) records. One JSON
object a line:

    {"prompt": "What is 1/2 + 1/4?",   # required, non-blank, no chat special token
     "answer": "3/4",                  # required: a string or a number (kept as its string)
     "task": "math",                   # "math" | "choice" | "world" | "judge" (or `default_task`)
     "id": "q-17"}                     # optional string or integer; default `file:line`

Per task the answer must fit its reward: "choice" a single letter A-Z (stored upper-case),
"world" an integer (the tiny world's exact match). "judge" answers are free text that an LLM
judge compares a completion's answer with (`rl.judge`). "math" answers are any non-blank text that
math-verify should parse; that is checked when rewards are computed (rl.rewards raises on an
unparsable reference), since this module does not import the RL code. `TASKS` mirrors
`rl.rewards.TASKS`; a test keeps the two equal.

Every malformed record (not UTF-8 JSON, not an object, a missing / mistyped / blank / out-of-set
field, a chat special token in the prompt, an id seen before) is counted in a
`data.sft_data.ReadReport` with its `file:line` and skipped or raised (`on_error`). For a
duplicate id the first record wins and the later one is rejected, naming the first's location.
Extra fields are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Literal

from ..utils.atomic import write_jsonl_atomic
from .chat import ASSISTANT, BOS, EOS, PAD, SYSTEM, USER
from .sft_data import ReadReport, RecordError
from .text_data import PathsLike, expand_paths, load_json_object, record_id

OnError = Literal["skip", "raise"]

TASKS = ("math", "choice", "world", "judge")  # = rl.rewards.TASKS (checked by tests/test_prompts_data.py)

PROMPT_REASONS = {
    "bad_json": "the line is not valid UTF-8 JSON",
    "not_object": "the line is JSON but not an object",
    "missing_field": "a required field is absent",
    "bad_type": "a field has the wrong type",
    "bad_value": "a field has a value outside its allowed set (task, or an answer the task cannot score)",
    "empty_text": "the prompt or the answer is blank",
    "special_token": "a chat special token appears in the prompt",
    "duplicate_id": "the id was already used by an earlier record",
}

_STRUCTURE_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt: the reward for `task` scores a completion against the reference `answer`.

    `source` is (file, line) for read records, None for records built in code.
    """

    id: str
    prompt: str
    answer: str
    task: str
    source: tuple[str, int] | None = None

    def to_json(self) -> dict:
        """The JSONL record this module reads back as an equal PromptRecord (source aside)."""
        return {"id": self.id, "prompt": self.prompt, "answer": self.answer, "task": self.task}


def _answer_text(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError("bad_type", f"'answer' is {type(value).__name__}, expected str or number")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError("bad_value", f"'answer' is {value!r}, expected a finite number")
        return repr(value)
    text = str(value).strip()
    if not text:
        raise RecordError("empty_text", "'answer' is blank")
    return text


def check_answer_for_task(answer: str, task: str) -> str:
    """`answer` in the form the task's reward reads (choice: upper-case letter); RecordError if it cannot."""
    if task not in TASKS:
        raise RecordError("bad_value", f"'task' is {task!r}, expected one of {TASKS}")
    if task == "choice":
        letter = answer.strip().upper()
        if len(letter) != 1 or not "A" <= letter <= "Z":
            raise RecordError("bad_value", f"task 'choice' needs one letter A-Z as answer, got {answer!r}")
        return letter
    if task == "world" and not _INT_RE.fullmatch(answer.strip()):
        raise RecordError("bad_value", f"task 'world' needs an integer answer, got {answer!r}")
    return answer


def make_prompt_record(
    prompt: str, answer, task: str, *, id: str, source: tuple[str, int] | None = None
) -> PromptRecord:
    """A checked PromptRecord (same rules as the reader, duplicate ids aside); raises RecordError."""
    if not isinstance(prompt, str):
        raise RecordError("bad_type", f"'prompt' is {type(prompt).__name__}, expected str")
    if not prompt.strip():
        raise RecordError("empty_text", "'prompt' is blank")
    for t in _STRUCTURE_TOKENS:
        if t in prompt:
            raise RecordError("special_token", f"'prompt' contains the special token {t!r}")
    if not isinstance(task, str):
        raise RecordError("bad_type", f"'task' is {type(task).__name__}, expected str")
    return PromptRecord(str(id), prompt, check_answer_for_task(_answer_text(answer), task), task, source)


def prompt_from_record(rec: dict, *, source: tuple[str, int], default_task: str | None = None) -> PromptRecord:
    """One JSONL record as a PromptRecord (schema in the module doc); raises RecordError."""
    for key in ("prompt", "answer"):
        if key not in rec or rec[key] is None:
            raise RecordError("missing_field", f"no {key!r}")
    task = rec.get("task")
    if task is None:
        if default_task is None:
            raise RecordError("missing_field", "no 'task' (and no default_task)")
        task = default_task
    doc_id = record_id(rec, "id") if rec.get("id") is not None else f"{source[0]}:{source[1]}"
    return make_prompt_record(rec["prompt"], rec["answer"], task, id=doc_id, source=source)


class PromptReader:
    """Streams PromptRecords from JSONL files (files, directories, globs); `report` describes the last pass.

    Duplicate ids are detected within one pass over all the files. on_error="skip" counts and
    logs a bad record and goes on; "raise" raises ValueError "file:line: reason: detail".
    """

    def __init__(
        self,
        paths: PathsLike,
        *,
        on_error: OnError = "skip",
        default_task: str | None = None,
        max_problems: int = 100,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
        if default_task is not None and default_task not in TASKS:
            raise ValueError(f"default_task={default_task!r}: expected one of {TASKS}")
        self.files = expand_paths(paths, suffixes=(".jsonl",))
        self.on_error, self.default_task = on_error, default_task
        self.report = ReadReport(max_problems=max_problems)

    def __iter__(self) -> Iterator[PromptRecord]:
        self.report = ReadReport(max_problems=self.report.max_problems)
        seen: dict[str, str] = {}
        for path in self.files:
            for lineno, raw in self.report.lines(path):
                where = f"{path}:{lineno}"
                try:
                    rec = prompt_from_record(load_json_object(raw), source=(str(path), lineno), default_task=self.default_task)
                    if rec.id in seen:
                        raise RecordError("duplicate_id", f"id {rec.id!r} was already used at {seen[rec.id]}")
                except RecordError as e:
                    self.report.fail(where, e, self.on_error)
                    continue
                seen[rec.id] = where
                self.report.kept += 1
                yield rec


def read_prompts(paths: PathsLike, *, on_error: OnError = "skip", default_task: str | None = None) -> PromptReader:
    """Reader for prompt JSONL files (iterate it, then read `.report`)."""
    return PromptReader(paths, on_error=on_error, default_task=default_task)


def load_prompts(
    paths: PathsLike, *, on_error: OnError = "skip", default_task: str | None = None
) -> tuple[list[PromptRecord], ReadReport]:
    """All prompts of `paths` and the read report."""
    reader = read_prompts(paths, on_error=on_error, default_task=default_task)
    records = list(reader)
    return records, reader.report


def write_prompts(records: Iterable[PromptRecord], path: str | PathLike) -> int:
    """Write records as prompt JSONL (readable by `read_prompts`), atomically; returns how many were written."""
    return write_jsonl_atomic(path, records)


__all__ = [
    "PROMPT_REASONS",
    "PromptReader",
    "PromptRecord",
    "TASKS",
    "check_answer_for_task",
    "load_prompts",
    "make_prompt_record",
    "prompt_from_record",
    "read_prompts",
    "write_prompts",
]
