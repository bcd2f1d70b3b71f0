"""Chat data for reasoning-toggle SFT: readers, paired on/off examples, tokenization, packing.

The model learns from the system prompt "detailed thinking on" to answer with a
`<think>…</think>` trace then the answer, and from "detailed thinking off" to answer directly.
Every source is mapped to one `ChatExample` (mode, prompt turns, response), rendered with the
template of data/chat.py and encoded with `encode_example` of data/tokenizer.py, so the loss
mask covers response tokens (incl. EOS) only.

Two JSONL readers stream a file line by line; every problem names `file:line`, is counted in a
`ReadReport` (read, kept, skipped, reasons) and either skipped or raised (`on_error`):

* **Llama-Nemotron-Post-Training-Dataset** (nvidia, HF; `SFT/<split>/*.jsonl`), one record a line:

      {"input": [{"role": "user", "content": "..."}, ...],   # prompt turns, last one a user turn
       "output": "<think>...</think>answer",                 # the response (trace only when on)
       "reasoning": "on" | "off",                            # the mode (required)
       "system_prompt": "detailed thinking on" | "detailed thinking off",   # optional, must agree
       "category": "math", "license": "...", "generator": "...",
       "used_in_training": ["Ultra", "Nano"] (or a string), "version": "v1.1"}

  The first release (v1, HF revision ed905e6) stored `input` as one Llama-3-template string
  (`<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|>...`) and ended
  `output` with `<|eot_id|>`; such strings are parsed into turns and the trailing `<|eot_id|>`
  removed. A plain string without Llama-3 headers is one user turn. Metadata fields are kept in
  `ChatExample.meta`.

* **plain messages**, one record a line:

      {"messages": [{"role": "system", "content": "detailed thinking on"},   # optional, selects mode
                    {"role": "user", "content": "..."},
                    {"role": "assistant", "content": "..."}, ...,           # earlier turns
                    {"role": "assistant", "content": "ANSWER"}],            # last turn = response
       "thinking": true,          # optional bool; with the system message, at least one is needed
       "reasoning": "TRACE",      # optional, thinking on only: response = <think>TRACE</think>ANSWER
       "category": "math"}        # optional

  Without `reasoning`, a thinking-on response must itself start with `<think>…</think>`.

Checks shared by both (reason codes in `REASONS`): turns alternate user/assistant starting and
ending (before the response) with a user turn; no chat special token (`<|eos|>`, `<|user|>`, ...)
inside any text; thinking on ⇒ the response starts with exactly one `<think>…</think>` block with a
non-blank trace (unless `allow_empty_think`) and a non-blank answer after it; thinking off ⇒ no
think tag in the response.

Packing: `pack_examples` puts tokenized examples whole into rows of `max_len` (greedy first-fit)
and returns per-token `position_ids` restarting at 0 for each example and `segment_ids` (1, 2, ...
per example in a row, 0 for padding). A consumer restricts attention to within an example with
`packed_attention_mask(segment_ids)`: a bool [B, 1, T, T] mask, True = may attend, that is causal
inside each segment and blocks every cross-segment pair (padding queries see only themselves, so
no softmax row is empty). It is a valid SDPA `attn_mask` (with `is_causal=False`) and has the
layout of the `allowed` mask HeteroLlamaForCausalLM builds from `key_valid`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from .chat import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    SYSTEM,
    THINK_END,
    THINK_START,
    THINKING_OFF,
    THINKING_ON,
    USER,
    render_example,
    render_prompt,
    system_prompt,
)
from .reasoning_world import Problem, direct_response, has_think_block, reasoning_response
from ..errors import InputFileError
from .chat_tokenizer import ChatTokenizer, as_chat

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
Overflow = Literal["drop", "truncate"]

# Why a record was rejected (the keys of ReadReport.reasons).
REASONS = {
    "bad_json": "the line is not valid UTF-8 JSON",
    "not_object": "the line is JSON but not an object",
    "missing_field": "a required field is absent",
    "bad_type": "a field has the wrong type",
    "bad_value": "a field has a value outside its allowed set",
    "mode_conflict": "the mode fields (reasoning / thinking / system prompt) disagree",
    "bad_turns": "the turns do not alternate user/assistant, or do not end where they must",
    "special_token": "a chat special token appears inside a text",
    "think_mismatch": "think tags do not match the mode",
    "empty_think": "thinking on with a blank trace",
    "empty_response": "the response (or the answer after </think>) is blank",
}

# Tokens that give the conversation its structure; text must never contain them.
_STRUCTURE_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)
_MODE_OF_PROMPT = {THINKING_ON: True, THINKING_OFF: False}
NEMOTRON_META_FIELDS = ("license", "generator", "used_in_training", "version")


# ============================================================================ examples


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    content: str


@dataclass(frozen=True)
class ChatExample:
    """One SFT example: the mode, the prompt turns and the response that follows them.

    `messages` are the prompt turns (user, then alternating, ending with a user turn); the
    system turn is implied by `thinking`. `response` is the final assistant turn as trained on
    (with its `<think>` block when thinking); `reasoning` is the trace inside that block (None
    when thinking is off). `source` is (file, line) for read records.
    """

    thinking: bool
    messages: tuple[Turn, ...]
    response: str
    reasoning: str | None = None
    category: str | None = None
    source: tuple[str, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def system(self) -> str:
        return system_prompt(self.thinking)


class RecordError(ValueError):
    """A record that cannot become a ChatExample; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _check_text(what: str, text: str) -> None:
    for t in _STRUCTURE_TOKENS:
        if t in text:
            raise RecordError("special_token", f"{what} contains the special token {t!r}")


def _check_turns(turns: Sequence[Turn]) -> None:
    """Prompt turns: user first, alternating, last one a user turn (the response follows)."""
    if not turns:
        raise RecordError("bad_turns", "no user turn before the response")
    for i, t in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if t.role != expected:
            raise RecordError("bad_turns", f"turn {i} has role {t.role!r}, expected {expected!r}")
        _check_text(f"turn {i}", t.content)
    if turns[-1].role != "user":
        raise RecordError("bad_turns", "the turns before the response must end with a user turn")


def _check_response(response: str, thinking: bool, allow_empty_think: bool) -> str | None:
    """Check the response against the mode; return the think trace (None when off)."""
    _check_text("response", response)
    if not response.strip():
        raise RecordError("empty_response", "the response is blank")
    if not thinking:
        if THINK_START in response or THINK_END in response:
            raise RecordError("think_mismatch", "thinking off but the response has a think tag")
        return None
    if not has_think_block(response):
        raise RecordError(
            "think_mismatch", f"thinking on but the response does not start with one {THINK_START}…{THINK_END} block"
        )
    trace, answer = response[len(THINK_START) :].split(THINK_END, 1)
    if not trace.strip() and not allow_empty_think:
        raise RecordError("empty_think", "thinking on with a blank trace")
    if not answer.strip():
        raise RecordError("empty_response", f"nothing after {THINK_END}")
    return trace


def make_example(
    messages: Sequence[Turn],
    response: str,
    thinking: bool,
    *,
    category: str | None = None,
    source: tuple[str, int] | None = None,
    meta: dict | None = None,
    allow_empty_think: bool = False,
) -> ChatExample:
    """A checked ChatExample; raises RecordError if turns or response break the rules above."""
    messages = tuple(messages)
    _check_turns(messages)
    trace = _check_response(response, thinking, allow_empty_think)
    return ChatExample(thinking, messages, response, trace, category, source, dict(meta or {}))


def render_chat(ex: ChatExample) -> tuple[str, str]:
    """(prompt_text, response_text + EOS) in the chat.py template.

    One turn is exactly `chat.render_example`. Later turns continue the prompt: each earlier
    assistant turn ends with EOS (as a trained response does), then the next user turn:
    `BOS SYSTEM mode USER q1 ASSISTANT a1 EOS USER q2 ASSISTANT`.
    """
    first, rest = ex.messages[0], ex.messages[1:]
    if not rest:
        return render_example(first.content, ex.response, ex.thinking)
    prompt = render_prompt(first.content, ex.thinking)
    for answer, question in zip(rest[0::2], rest[1::2]):
        prompt += f"{answer.content}{EOS}{USER}{question.content}{ASSISTANT}"
    return prompt, ex.response + EOS


# ============================================================================ paired examples


def paired_examples(
    messages: Sequence[Turn] | str, reasoning: str, answer: str, **kw
) -> tuple[ChatExample, ChatExample]:
    """(thinking-on, thinking-off) examples for one prompt: `<think>reasoning</think>answer` and `answer`.

    `messages` may be a plain question string (one user turn). Extra keywords go to make_example.
    """
    turns = (Turn("user", messages),) if isinstance(messages, str) else tuple(messages)
    on = make_example(turns, f"{THINK_START}{reasoning}{THINK_END}{answer}", True, **kw)
    return on, make_example(turns, answer, False, **kw)


def world_paired_examples(problems: Iterable[Problem]) -> list[ChatExample]:
    """Both modes for every tiny-world problem, on then off, with the world's own responses."""
    out = []
    for p in problems:
        turns, cat = (Turn("user", p.question),), f"difficulty_{p.difficulty}"
        out.append(make_example(turns, reasoning_response(p), True, category=cat))
        out.append(make_example(turns, direct_response(p), False, category=cat))
    return out


# ============================================================================ JSONL readers


@dataclass
class ReadReport:
    """What a reader saw: `read` non-blank lines, `kept` + `skipped` == `read`.

    `reasons` counts every rejected record by reason (REASONS); `problems` keeps the first
    `max_problems` messages, each naming file:line.
    """

    read: int = 0
    kept: int = 0
    skipped: int = 0
    blank: int = 0
    reasons: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    max_problems: int = 100

    def reject(self, message: str, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(message)
            log.warning("skipped %s", message)

    def fail(self, where: str, error: RecordError, on_error: str) -> None:
        """Count `error` at `where` (file:line); raise it as `BadRecord` when on_error is "raise"."""
        message = f"{where}: {error}"
        self.reject(message, error.reason)
        if on_error == "raise":
            raise BadRecord(message) from None

    def lines(self, path: Path) -> Iterator[tuple[int, bytes]]:
        """(line number, raw line) of each non-blank line of a JSONL file, counted as read (blank
        lines are counted apart)."""
        if path.is_dir():
            raise InputFileError(f"{path}: is a directory; expected a JSONL file (one JSON record a line)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such JSONL file")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    self.blank += 1
                    continue
                self.read += 1
                yield lineno, raw


class BadRecord(ValueError):
    """A malformed record with on_error="raise"; the message names file:line and the reason."""


def _get(rec: dict, key: str, types: type | tuple, required: bool = True):
    """rec[key] checked against `types`; None when absent and not required."""
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError("missing_field", f"no {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise RecordError("bad_type", f"{key!r} is {type(value).__name__}, expected {names}")
    return value


def _turns_from_dicts(key: str, items: list) -> list[Turn]:
    turns = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise RecordError("bad_type", f"{key}[{i}] is {type(m).__name__}, expected an object")
        role, content = _get(m, "role", str), _get(m, "content", str)
        if role not in ("system", "user", "assistant"):
            raise RecordError("bad_value", f"{key}[{i}] has role {role!r}")
        turns.append(Turn(role, content))
    return turns


def _mode_of_system(text: str, where: str) -> bool:
    """True/False for the two thinking prompts; any other system prompt is refused."""
    mode = _MODE_OF_PROMPT.get(text.strip())
    if mode is None:
        raise RecordError("bad_value", f"{where} is {text[:60]!r}, expected {THINKING_ON!r} or {THINKING_OFF!r}")
    return mode


def _split_system(turns: list[Turn], where: str) -> tuple[bool | None, list[Turn]]:
    """(mode from a leading system turn or None, the remaining turns)."""
    if turns and turns[0].role == "system":
        return _mode_of_system(turns[0].content, f"the system message of {where}"), turns[1:]
    return None, turns


def _agree(mode: bool, other: bool | None, what: str) -> None:
    if other is not None and other != mode:
        said, mode_name = ("on" if other else "off"), ("on" if mode else "off")
        raise RecordError("mode_conflict", f"{what} says thinking {said}, the mode is {mode_name}")


_LLAMA3_TURN = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
_LLAMA3_BOT = "<|begin_of_text|>"
_LLAMA3_GEN = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_LLAMA3_EOT = "<|eot_id|>"


def _parse_llama3_prompt(text: str) -> list[Turn]:
    """Turns of a v1 Llama-3-template `input` string; a string without headers is one user turn."""
    if "<|start_header_id|>" not in text:
        return [Turn("user", text)]
    body, pos, turns = text.removeprefix(_LLAMA3_BOT), 0, []
    for m in _LLAMA3_TURN.finditer(body):
        if m.start() != pos:
            break
        turns.append(Turn(m.group(1), m.group(2)))
        pos = m.end()
    if body[pos:] not in ("", _LLAMA3_GEN):
        raise RecordError("bad_value", f"'input' is not a Llama-3 chat template at character {pos}")
    if any(t.role not in ("system", "user", "assistant") for t in turns):
        raise RecordError("bad_value", "'input' has a turn with an unknown role")
    return turns


def nemotron_example(rec: dict, *, allow_empty_think: bool = False, source=None) -> ChatExample:
    """One Llama-Nemotron-Post-Training-Dataset record as a ChatExample (schema in the module doc)."""
    reasoning = _get(rec, "reasoning", str)
    if reasoning not in ("on", "off"):
        raise RecordError("bad_value", f"'reasoning' is {reasoning!r}, expected 'on' or 'off'")
    thinking = reasoning == "on"
    prompt = _get(rec, "input", (list, str))
    output = _get(rec, "output", str)
    sp = _get(rec, "system_prompt", str, required=False)
    if sp is not None:
        _agree(thinking, _mode_of_system(sp, "'system_prompt'"), "'system_prompt'")
    turns = _turns_from_dicts("input", prompt) if isinstance(prompt, list) else _parse_llama3_prompt(prompt)
    in_mode, turns = _split_system(turns, "'input'")
    _agree(thinking, in_mode, "the system message of 'input'")
    if output.endswith(_LLAMA3_EOT):
        output = output[: -len(_LLAMA3_EOT)]
    meta = {}
    for key in NEMOTRON_META_FIELDS:
        value = _get(rec, key, (str, list), required=False)
        if value is not None:
            meta[key] = value
    category = _get(rec, "category", str, required=False)
    return make_example(
        turns, output, thinking, category=category, source=source, meta=meta, allow_empty_think=allow_empty_think
    )


def messages_example(rec: dict, *, allow_empty_think: bool = False, source=None) -> ChatExample:
    """One plain `{"messages": [...], ...}` record as a ChatExample (schema in the module doc)."""
    turns = _turns_from_dicts("messages", _get(rec, "messages", list))
    sys_mode, turns = _split_system(turns, "'messages'")
    flag = _get(rec, "thinking", bool, required=False)
    if sys_mode is None and flag is None:
        raise RecordError("missing_field", "no mode: give 'thinking' or a leading system message")
    thinking = flag if flag is not None else sys_mode
    _agree(thinking, sys_mode, "the system message")
    if not turns or turns[-1].role != "assistant":
        raise RecordError("bad_turns", "'messages' must end with the assistant response")
    response = turns[-1].content
    trace = _get(rec, "reasoning", str, required=False)
    if trace is not None:
        if not thinking:
            raise RecordError("mode_conflict", "'reasoning' given but thinking is off")
        if THINK_START in response or THINK_END in response:
            raise RecordError("think_mismatch", "both 'reasoning' and a think tag in the response")
        response = f"{THINK_START}{trace}{THINK_END}{response}"
    category = _get(rec, "category", str, required=False)
    return make_example(
        turns[:-1], response, thinking, category=category, source=source, allow_empty_think=allow_empty_think
    )


Parser = Callable[..., ChatExample]


class JsonlChatReader:
    """Streams ChatExamples from JSONL files, one record a line; `report` describes the last pass.

    on_error="skip" counts and logs a bad record and goes on; "raise" raises ValueError
    "file:line: reason: detail" at the first one. Blank lines are counted apart and ignored.
    """

    def __init__(
        self,
        paths: str | PathLike | Sequence[str | PathLike],
        parse: Parser,
        *,
        on_error: OnError = "skip",
        allow_empty_think: bool = False,
        max_problems: int = 100,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
        self.paths = [Path(paths)] if isinstance(paths, (str, PathLike)) else [Path(p) for p in paths]
        self.parse, self.on_error, self.allow_empty_think = parse, on_error, allow_empty_think
        self.report = ReadReport(max_problems=max_problems)

    def __iter__(self) -> Iterator[ChatExample]:
        self.report = ReadReport(max_problems=self.report.max_problems)
        for path in self.paths:
            for lineno, raw in self.report.lines(path):
                ex = self._record(path, lineno, raw)
                if ex is not None:
                    yield ex

    def _record(self, path: Path, lineno: int, raw: bytes) -> ChatExample | None:
        try:
            ex = self.parse(load_json_object(raw), allow_empty_think=self.allow_empty_think, source=(str(path), lineno))
        except RecordError as e:
            self.report.fail(f"{path}:{lineno}", e, self.on_error)
            return None
        self.report.kept += 1
        return ex


def load_json_object(raw: bytes) -> dict:
    """One JSONL line as a dict; RecordError "bad_json" / "not_object" otherwise."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError("bad_json", str(e)) from None
    except RecursionError:  # e.g. 100,000 nested "[": no record of ours is nested that deep
        raise RecordError("bad_json", "nested deeper than the JSON parser can follow") from None
    if not isinstance(rec, dict):
        raise RecordError("not_object", f"the line holds a JSON {type(rec).__name__}, expected an object")
    return rec


def read_nemotron_jsonl(paths, *, on_error: OnError = "skip", allow_empty_think: bool = False) -> JsonlChatReader:
    """Reader for Llama-Nemotron-Post-Training-Dataset JSONL files (iterate it; then read `.report`)."""
    return JsonlChatReader(paths, nemotron_example, on_error=on_error, allow_empty_think=allow_empty_think)


def read_messages_jsonl(paths, *, on_error: OnError = "skip", allow_empty_think: bool = False) -> JsonlChatReader:
    """Reader for plain `{"messages": [...]}` JSONL files (iterate it; then read `.report`)."""
    return JsonlChatReader(paths, messages_example, on_error=on_error, allow_empty_think=allow_empty_think)


# ============================================================================ tokenization

TokenizedExample = tuple[list[int], list[int]]  # (ids, loss_mask)


@dataclass
class TokenizeReport:
    """`examples` seen = `kept` + `dropped`; `truncated` of the kept were cut to max_len."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    reasons: Counter = field(default_factory=Counter)


def tokenize_example(tok: Tokenizer | ChatTokenizer, ex: ChatExample) -> TokenizedExample:
    """(ids, loss_mask) in the tokenizer's chat template (for the tiny template the strings of
    `render_chat`): mask 1 on response tokens, the end of turn included."""
    turns = [(t.role, t.content) for t in ex.messages]
    return as_chat(tok).example_ids(turns, ex.response, ex.thinking)


# Normalizers can merge characters (NFKC: a letter and its combining accent become one), so the
# character bound of `ChatTokenizer.max_token_chars` gets this much slack before it refuses a text.
_CHAR_SLACK = 4


def _cut_overlong(ex: ChatExample, max_chars: int, overflow: Overflow) -> ChatExample | None:
    """`ex` as it is when its text is within `max_chars`; else None when it must be dropped
    (overflow=drop, or a prompt alone over the bound), or its response cut to `max_chars`
    characters (overflow=truncate: still more tokens than max_len, so the token cut decides)."""
    prompt_chars = sum(len(t.content) for t in ex.messages)
    if prompt_chars + len(ex.response) <= max_chars:
        return ex
    if overflow == "drop" or prompt_chars > max_chars:
        return None
    return replace(ex, response=ex.response[:max_chars])


def tokenize_examples(
    tok: Tokenizer | ChatTokenizer, examples: Iterable[ChatExample], max_len: int | None = None,
    overflow: Overflow = "drop",
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize all examples; those longer than `max_len` are dropped or truncated (counted).

    "truncate" keeps the whole prompt and cuts the response's tail (EOS included); an example
    whose prompt leaves no room for one response token is dropped either way ("prompt_too_long").
    """
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow={overflow!r}: expected 'drop' or 'truncate'")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len={max_len}: expected >= 2 (a prompt token and a response token)")
    out, rep, tok = [], TokenizeReport(), as_chat(tok)
    for ex in examples:
        rep.examples += 1
        if max_len is not None:  # a huge record must not cost gigabytes of tokenizing to be refused
            ex = _cut_overlong(ex, max_len * tok.max_token_chars * _CHAR_SLACK, overflow)
            if ex is None:
                rep.dropped += 1
                rep.reasons["too_long" if overflow == "drop" else "prompt_too_long"] += 1
                continue
        ids, mask = tokenize_example(tok, ex)
        if max_len is not None and len(ids) > max_len:
            prompt_len = mask.index(1)
            if overflow == "drop" or prompt_len >= max_len:
                rep.dropped += 1
                rep.reasons["too_long" if overflow == "drop" else "prompt_too_long"] += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            rep.truncated += 1
        rep.kept += 1
        rep.tokens += len(ids)
        out.append((ids, mask))
    return out, rep


# ============================================================================ packing


@dataclass
class PackedBatch:
    """Rows of whole examples. All tensors [B, T] (long); `rows[b]` lists the example indices of row b.

    segment_ids: 1, 2, ... per example within a row, 0 on padding. position_ids restart at 0 for
    every example (0 on padding). loss_mask is the examples' mask with each example's first token
    zeroed, so a shifted next-token loss never targets across an example boundary.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    rows: list[list[int]]

    def attention_mask(self) -> torch.Tensor:
        return packed_attention_mask(self.segment_ids)


def first_fit(lengths: Sequence[int], capacity: int, decreasing: bool = False) -> list[list[int]]:
    """Greedy first-fit bin packing: each item (index) goes to the first bin with room, else a new bin.

    Items keep their order inside a bin; with `decreasing` the items are placed longest first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if decreasing else range(len(lengths))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity or n <= 0:
            raise ValueError(f"example {i} has {n} tokens; packing needs 1..{capacity} (tokenize with max_len)")
        b = next((j for j, room in enumerate(free) if room >= n), None)
        if b is None:
            bins.append([])
            free.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= n
    return bins


def pack_examples(
    examples: Sequence[TokenizedExample], max_len: int, pad_id: int = 0, decreasing: bool = False
) -> PackedBatch:
    """Pack tokenized examples whole into rows of exactly `max_len` tokens (first-fit)."""
    rows = first_fit([len(ids) for ids, _ in examples], max_len, decreasing)
    shape = (len(rows), max_len)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    mask, pos, seg = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
    for b, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row, 1):
            x, m = examples[i]
            end = start + len(x)
            ids[b, start:end] = torch.tensor(x)
            mask[b, start:end] = torch.tensor(m)
            mask[b, start] = 0  # a first token is never a target (it has no prefix in its example)
            pos[b, start:end] = torch.arange(len(x))
            seg[b, start:end] = s
            start = end
    return PackedBatch(ids, mask, pos, seg, rows)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask, bool [B, 1, T, T], True where query q may attend to key k.

    Allowed iff k <= q and both tokens are in the same example (segment id > 0); every query also
    sees itself, so padding rows are never empty (no NaN in SDPA). Pass it as SDPA `attn_mask`
    with `is_causal=False`; it broadcasts over heads.
    """
    seg = segment_ids
    T = seg.shape[-1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    diag = torch.eye(T, dtype=torch.bool, device=seg.device)
    return ((same & causal) | diag)[:, None]


__all__ = [
    "ChatExample",
    "JsonlChatReader",
    "PackedBatch",
    "REASONS",
    "ReadReport",
    "RecordError",
    "TokenizeReport",
    "Turn",
    "first_fit",
    "make_example",
    "messages_example",
    "nemotron_example",
    "pack_examples",
    "packed_attention_mask",
    "paired_examples",
    "read_messages_jsonl",
    "read_nemotron_jsonl",
    "render_chat",
    "tokenize_example",
    "tokenize_examples",
    "world_paired_examples",
]
