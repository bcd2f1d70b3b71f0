"""Preference pairs for a reward model: a prompt, a chosen and a rejected response.

One JSON object a line:

    {"prompt": "What is (7 + 5) * 3?",          # required, non-blank, no chat special token
     "chosen": "<think>...</think>The answer is 36.",   # required, non-blank
     "rejected": "The answer is 35.",           # required, non-blank, not equal to chosen
     "thinking": true,                          # optional: the reasoning toggle (true/false/null)
     "kind": "wrong_answer"}                    # optional label, for accuracy by kind

Every malformed record is counted in a `data.sft_data.ReadReport` with its `file:line` and skipped
or raised (`on_error`), as the SFT and prompt readers do. Extra fields are ignored.

On the tiny world, `world_pairs` builds pairs from the correct, well-formatted response of a
problem (chosen) against a wrong one (rejected): a wrong final answer, a wrong last step carried
into the answer, a wrong step anywhere carried through the steps after it (the slips a policy
makes), or the right answer in a broken format. `pair_examples` renders them with a chat
template and its thinking toggle into token ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Literal

from ..utils.atomic import write_jsonl_atomic
from .chat import ASSISTANT, BOS, EOS, PAD, SYSTEM, THINK_END, THINK_START, USER
from .chat_tokenizer import ChatTokenizer
from .reasoning_world import (
    MAX_VALUE, MIN_VALUE, OPS, STEP_SEP, Problem, answer_text, is_correct, is_well_formatted, response_for,
)
from .sft_data import ReadReport, RecordError
from .text_data import PathsLike, expand_paths, load_json_object

OnError = Literal["skip", "raise"]

PAIR_REASONS = {
    "bad_json": "the line is not valid UTF-8 JSON",
    "not_object": "the line is JSON but not an object",
    "missing_field": "a required field is absent",
    "bad_type": "a field has the wrong type",
    "empty_text": "the prompt or a response is blank",
    "special_token": "a chat special token appears in the prompt",
    "same_response": "chosen and rejected are the same text",
}

WORLD_KINDS = ("wrong_answer", "wrong_step", "carried_step", "bad_format")
DEFAULT_WORLD_KINDS = ("wrong_answer", "wrong_step", "bad_format")
_STRUCTURE_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` is preferred to `rejected` as the response to `prompt` (in reasoning mode `thinking`)."""

    prompt: str
    chosen: str
    rejected: str
    thinking: bool | None = None
    kind: str = ""
    source: tuple[str, int] | None = None

    def to_json(self) -> dict:
        """The JSONL record this module reads back as an equal pair (source aside)."""
        rec = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "thinking": self.thinking}
        return rec | ({"kind": self.kind} if self.kind else {})


def pair_from_record(rec: dict, *, source: tuple[str, int] | None = None) -> PreferencePair:
    """One JSONL record as a PreferencePair (schema in the module doc); raises RecordError."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in rec or rec[key] is None:
            raise RecordError("missing_field", f"no {key!r}")
        if not isinstance(rec[key], str):
            raise RecordError("bad_type", f"{key!r} is {type(rec[key]).__name__}, expected str")
        if not rec[key].strip():
            raise RecordError("empty_text", f"{key!r} is blank")
    for t in _STRUCTURE_TOKENS:
        if t in rec["prompt"]:
            raise RecordError("special_token", f"'prompt' contains the special token {t!r}")
    if rec["chosen"] == rec["rejected"]:
        raise RecordError("same_response", "'chosen' and 'rejected' are the same text")
    thinking, kind = rec.get("thinking"), rec.get("kind", "")
    if thinking is not None and not isinstance(thinking, bool):
        raise RecordError("bad_type", f"'thinking' is {type(thinking).__name__}, expected true, false or null")
    if not isinstance(kind, str):
        raise RecordError("bad_type", f"'kind' is {type(kind).__name__}, expected str")
    return PreferencePair(rec["prompt"], rec["chosen"], rec["rejected"], thinking, kind, source)


class PairReader:
    """Streams PreferencePairs from JSONL files (files, directories, globs); `report` describes the
    last pass. on_error="skip" counts and logs a bad record and goes on; "raise" raises ValueError
    "file:line: reason: detail" at the first one."""

    def __init__(self, paths: PathsLike, *, on_error: OnError = "skip", max_problems: int = 100):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
        self.files = expand_paths(paths, suffixes=(".jsonl",))
        self.on_error = on_error
        self.report = ReadReport(max_problems=max_problems)

    def __iter__(self) -> Iterator[PreferencePair]:
        self.report = ReadReport(max_problems=self.report.max_problems)
        for path in self.files:
            for lineno, raw in self.report.lines(path):
                try:
                    pair = pair_from_record(load_json_object(raw), source=(str(path), lineno))
                except RecordError as e:
                    self.report.fail(f"{path}:{lineno}", e, self.on_error)
                    continue
                self.report.kept += 1
                yield pair


def load_pairs(paths: PathsLike, *, on_error: OnError = "skip") -> tuple[list[PreferencePair], ReadReport]:
    """All pairs of `paths` and the read report."""
    reader = PairReader(paths, on_error=on_error)
    pairs = list(reader)
    return pairs, reader.report


def write_pairs(pairs: Iterable[PreferencePair], path: str | PathLike) -> int:
    """Write pairs as JSONL (readable by `load_pairs`), atomically; returns how many were written."""
    return write_jsonl_atomic(path, pairs)


# ----------------------------------------------------------------------------- the tiny world


def _wrong_number(rng: random.Random, right: int) -> int:
    return right + rng.choice([d for d in range(-9, 10) if d])


def _carried_steps(p: Problem, rng: random.Random) -> tuple[list[str], int]:
    """(steps, final value) of `p` with one step's result wrong (a step drawn uniformly, the
    wrong value kept in 0..99) and every later step computed on from it, as a model that slips
    once and then calculates correctly would write them."""
    k = rng.randrange(len(p.steps))
    steps, value = list(p.steps[:k]), None
    for i, step in enumerate(p.steps[k:]):
        a, op, b, _, _ = step.split()
        a = int(a) if i == 0 else value
        value = OPS[op](a, int(b))
        if i == 0:
            value = rng.choice([w for w in range(max(MIN_VALUE, value - 9), min(MAX_VALUE, value + 9) + 1) if w != value])
        steps.append(f"{a} {op} {b} = {value}")
    return steps, value


def wrong_response(p: Problem, thinking: bool, kind: str, rng: random.Random) -> str:
    """A response to `p` that is wrong in the way `kind` names (see WORLD_KINDS)."""
    if kind == "wrong_answer":  # the steps (when thinking) are right, the stated answer is not
        right = response_for(p, thinking)
        return right.removesuffix(answer_text(p.answer)) + answer_text(_wrong_number(rng, p.answer))
    if kind == "wrong_step":  # the last step's result is wrong, and carried into the answer
        wrong = _wrong_number(rng, p.answer)
        if not thinking:
            return answer_text(wrong)
        steps = [*p.steps[:-1], p.steps[-1].rsplit("=", 1)[0] + f"= {wrong}"]
        return f"{THINK_START}{STEP_SEP.join(steps)}{THINK_END}{answer_text(wrong)}"
    if kind == "carried_step":  # one step's result is wrong, and the steps after it go on from it
        steps, wrong = _carried_steps(p, rng)
        if not thinking:
            return answer_text(wrong)
        return f"{THINK_START}{STEP_SEP.join(steps)}{THINK_END}{answer_text(wrong)}"
    if kind == "bad_format":  # the right answer, outside the mode's format
        if thinking:  # the steps without their think block
            return f"{STEP_SEP.join(p.steps)}{STEP_SEP}{answer_text(p.answer)}"
        return response_for(p, True)  # a think block where thinking is off
    raise ValueError(f"kind={kind!r}: expected one of {WORLD_KINDS}")


def world_pairs(
    problems: Sequence[Problem], seed: int, *, kinds: Sequence[str] = DEFAULT_WORLD_KINDS, thinking_fraction: float = 0.5
) -> list[PreferencePair]:
    """One pair per problem: its correct, well-formatted response against a wrong one of a kind
    drawn from `kinds`, in a reasoning mode drawn with P(on) = thinking_fraction. Deterministic in
    (problems, seed)."""
    rng = random.Random(f"{seed}/pairs")
    out = []
    for p in problems:
        thinking = rng.random() < thinking_fraction
        kind = rng.choice(list(kinds))
        chosen, rejected = response_for(p, thinking), wrong_response(p, thinking, kind, rng)
        assert is_correct(chosen, p) and is_well_formatted(chosen, thinking)
        assert not (is_correct(rejected, p) and is_well_formatted(rejected, thinking)), (kind, rejected)
        out.append(PreferencePair(p.question, chosen, rejected, thinking, kind))
    return out


def pair_examples(chat: ChatTokenizer, pairs: Iterable[PreferencePair]) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) per pair: the prompt rendered with `chat`'s template and the
    pair's thinking toggle, then the response and its end of turn."""
    return [(chat.example_ids(p.prompt, p.chosen, p.thinking)[0], chat.example_ids(p.prompt, p.rejected, p.thinking)[0])
            for p in pairs]  # fmt: skip
