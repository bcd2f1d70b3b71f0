"""Plain-text documents for calibration, block-wise distillation, scoring and KD: read, split, pack.

Stages that only need text (Puzzle's calibration and block library scoring, distillation on
general text) draw it from user files through this module instead of the embedded tiny world.

Reading (`read_documents` / `TextReader`): paths are files, directories (every `.txt` and
`.jsonl` file below, recursively) or glob patterns (`data/*.jsonl`, `**` allowed), expanded in
sorted order and de-duplicated; a path that does not exist, or a glob that matches nothing, is a
FileNotFoundError naming it. The file's suffix picks the format:

* `.jsonl`: one JSON object a line; the document is `record[text_field]` (default "text").
  With `id_field` set, that field (string or integer) is the document id and must be present;
  otherwise the id is `file:line`. A malformed record (not UTF-8 JSON, not an object, the text
  field missing / not a string / blank, a bad id) is counted in a `ReadReport` (see
  `data.sft_data`) with its `file:line` and skipped or raised (`on_error="skip"|"raise"`).
  Blank lines are counted apart (`report.blank`) and ignored.
* `.txt`, `txt_mode="file"` (default): the whole file is one document, id = the file path.
  A whitespace-only file counts as blank; a file that is not UTF-8 is a malformed record
  (`file:1`).
* `.txt`, `txt_mode="paragraph"`: one document per paragraph, paragraphs separated by one or
  more blank (whitespace-only) lines; id = `file:line` of the paragraph's first line; the text is
  the paragraph's lines joined by "\\n". A paragraph with a line that is not UTF-8 is malformed.

Default ids contain the path as expanded from what was passed (`data/a.jsonl:3`), so the
held-out split below is stable only while the same relative paths are passed; give an id field
for a split that survives moving the files.

Held-out split: `is_heldout(doc_id, fraction, seed)` hashes `seed` and the id with BLAKE2b
(not Python's salted `hash`), so a document's side depends on its id alone: not on file order,
on other documents, or on the process. `split_documents` and `select_split` apply it.

Packing: `pack_documents` concatenates documents (each `[bos] + encode(text) + [eos]` when
those ids are given) into rows of exactly `seq_len` tokens, rows cut anywhere (a document may
span rows and a row may start mid-document), until `token_budget // seq_len` rows are full. It
pulls documents one at a time and stops as soon as the last row is full, so it never tokenizes
a document the budget does not need. `encode` is any `str -> list[int]` (an HF tokenizer's
`lambda s: tok.encode(s, add_special_tokens=False)`, a `tokenizers.Tokenizer` wrapper, ...).
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal

import torch

from ..errors import InputFileError
from .sft_data import ReadReport, RecordError, load_json_object

OnError = Literal["skip", "raise"]
TxtMode = Literal["file", "paragraph"]
PathsLike = str | PathLike | Sequence[str | PathLike]

TEXT_SUFFIXES = (".txt", ".jsonl")

# Why a text record was rejected (the keys of ReadReport.reasons for this module's readers).
TEXT_REASONS = {
    "bad_json": "the line is not valid UTF-8 JSON",
    "bad_encoding": "the text is not valid UTF-8",
    "not_object": "the line is JSON but not an object",
    "missing_field": "a required field is absent",
    "bad_type": "a field has the wrong type",
    "bad_value": "a field has a value outside its allowed set",
    "empty_text": "the document text is blank",
}


# ============================================================================ documents


@dataclass(frozen=True)
class Document:
    """One text document: `id` keys the held-out split; `source` is (file, line) where it starts."""

    id: str
    text: str
    source: tuple[str, int] | None = None


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def expand_paths(paths: PathsLike, suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """Files named by `paths`: files as given, directories and globs expanded (sorted, de-duplicated).

    A directory yields its files (recursively) whose suffix is in `suffixes`; a glob yields its
    matching files in sorted order, and any matching directory expanded the same way. A file
    named directly with another suffix is a ValueError; a path that does not exist or a glob
    that matches nothing is a FileNotFoundError naming it.
    """
    items = [paths] if isinstance(paths, (str, PathLike)) else list(paths)
    if not items:
        raise ValueError("no paths given")
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path, named: bool) -> None:
        if p.suffix not in suffixes:
            if named:
                raise InputFileError(f"{p}: unsupported file type {p.suffix!r}; expected one of {tuple(suffixes)}")
            return
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    def add_dir(d: Path) -> None:
        for f in sorted(d.rglob("*")):
            if f.is_file():
                add(f, named=False)

    for item in items:
        s = str(item)
        p = Path(item)
        if p.is_file():
            add(p, named=True)
        elif p.is_dir():
            add_dir(p)
        elif _is_glob(s):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{s}: the pattern matches no file")
            for m in map(Path, matches):
                if m.is_dir():
                    add_dir(m)
                else:
                    add(m, named=False)
        else:
            raise FileNotFoundError(f"{s}: no such file or directory")
    return out


def record_id(rec: dict, key: str) -> str:
    """`rec[key]` as an id: a non-blank string or an integer (not a bool); RecordError otherwise."""
    if key not in rec or rec[key] is None:
        raise RecordError("missing_field", f"no {key!r}")
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError("bad_type", f"{key!r} is {type(value).__name__}, expected str or int")
    value = str(value)
    if not value.strip():
        raise RecordError("bad_value", f"{key!r} is blank")
    return value


def document_from_record(
    rec: dict, *, text_field: str = "text", id_field: str | None = None, source: tuple[str, int]
) -> Document:
    """One JSONL record as a Document (rules in the module doc); raises RecordError."""
    if text_field not in rec or rec[text_field] is None:
        raise RecordError("missing_field", f"no {text_field!r}")
    text = rec[text_field]
    if not isinstance(text, str):
        raise RecordError("bad_type", f"{text_field!r} is {type(text).__name__}, expected str")
    if not text.strip():
        raise RecordError("empty_text", f"{text_field!r} is blank")
    doc_id = record_id(rec, id_field) if id_field is not None else f"{source[0]}:{source[1]}"
    return Document(doc_id, text, source)


class TextReader:
    """Streams Documents from `.txt` / `.jsonl` files (module doc); `report` describes the last pass.

    Paths are expanded (and a missing path raised) when the reader is made. on_error="skip"
    counts and logs a bad record and goes on; "raise" raises ValueError "file:line: reason:
    detail" at the first one.
    """

    def __init__(
        self,
        paths: PathsLike,
        *,
        text_field: str = "text",
        id_field: str | None = None,
        txt_mode: TxtMode = "file",
        on_error: OnError = "skip",
        max_problems: int = 100,
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}: expected 'skip' or 'raise'")
        if txt_mode not in ("file", "paragraph"):
            raise ValueError(f"txt_mode={txt_mode!r}: expected 'file' or 'paragraph'")
        self.files = expand_paths(paths)
        self.text_field, self.id_field, self.txt_mode, self.on_error = text_field, id_field, txt_mode, on_error
        self.report = ReadReport(max_problems=max_problems)

    def __iter__(self) -> Iterator[Document]:
        self.report = ReadReport(max_problems=self.report.max_problems)
        for path in self.files:
            if path.suffix == ".jsonl":
                yield from self._jsonl(path)
            elif self.txt_mode == "file":
                yield from self._txt_file(path)
            else:
                yield from self._txt_paragraphs(path)

    # -- one outcome per record

    def _fail(self, path: Path, lineno: int, e: RecordError) -> None:
        self.report.fail(f"{path}:{lineno}", e, self.on_error)

    def _jsonl(self, path: Path) -> Iterator[Document]:
        for lineno, raw in self.report.lines(path):
            try:
                rec = load_json_object(raw)
                doc = document_from_record(rec, text_field=self.text_field, id_field=self.id_field, source=(str(path), lineno))
            except RecordError as e:
                self._fail(path, lineno, e)
                continue
            self.report.kept += 1
            yield doc

    def _txt_file(self, path: Path) -> Iterator[Document]:
        raw = path.read_bytes()
        if not raw.strip():
            self.report.blank += 1
            return
        self.report.read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._fail(path, 1, RecordError("bad_encoding", str(e)))
            return
        self.report.kept += 1
        yield Document(str(path), text, (str(path), 1))

    def _txt_paragraphs(self, path: Path) -> Iterator[Document]:
        lines: list[str] = []
        start, bad = 0, None

        def flush() -> Iterator[Document]:
            self.report.read += 1
            if bad is not None:
                self._fail(path, start, RecordError("bad_encoding", f"line {bad} is not UTF-8"))
                return
            self.report.kept += 1
            yield Document(f"{path}:{start}", "\n".join(lines), (str(path), start))

        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    if lines or bad is not None:
                        yield from flush()
                        lines, bad = [], None
                    continue
                if not lines and bad is None:
                    start = lineno
                try:
                    lines.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError:
                    bad = lineno if bad is None else bad
        if lines or bad is not None:
            yield from flush()


def read_documents(
    paths: PathsLike,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    txt_mode: TxtMode = "file",
    on_error: OnError = "skip",
) -> TextReader:
    """Reader for text documents (iterate it, then read `.report`); see the module doc."""
    return TextReader(paths, text_field=text_field, id_field=id_field, txt_mode=txt_mode, on_error=on_error)


# ============================================================================ held-out split


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")


def split_point(doc_id: str, seed: int = 0) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc_id): BLAKE2b, the same in every process."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_heldout(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether document `doc_id` is held out: about `fraction` of all ids are, decided by the id alone.

    Raising `fraction` only moves documents into held-out (never out of it), for a fixed seed.
    """
    _check_fraction(fraction)
    return split_point(str(doc_id), seed) < fraction


def split_documents(
    items: Iterable, fraction: float, seed: int = 0, key: Callable = lambda d: d.id
) -> tuple[list, list]:
    """(train, heldout) lists of `items` by `is_heldout(key(item), fraction, seed)`, order kept."""
    _check_fraction(fraction)
    train, held = [], []
    for item in items:
        (held if is_heldout(key(item), fraction, seed) else train).append(item)
    return train, held


def select_split(
    docs: Iterable[Document], split: Literal["train", "heldout"], fraction: float, seed: int = 0
) -> Iterator[Document]:
    """Stream only the documents of one side of the split (lazy: for large corpora)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected 'train' or 'heldout'")
    _check_fraction(fraction)
    want = split == "heldout"
    return (d for d in docs if is_heldout(d.id, fraction, seed) == want)


# ============================================================================ packing


@dataclass
class PackedText:
    """Rows of exactly `seq_len` token ids and what went into them.

    documents: documents tokenized (all of them contributed tokens to rows, or were empty);
    tokens: tokens in rows (= len(rows) * seq_len); unused_tokens: tokens of those documents
    left out (the tail of the last document once the budget was reached, or a partial last row
    when the documents ran out); exhausted: the documents ran out before the budget was reached;
    doc_ids: ids of the documents used, when they were Documents.
    """

    rows: list[list[int]]
    seq_len: int
    documents: int = 0
    tokens: int = 0
    unused_tokens: int = 0
    exhausted: bool = False
    doc_ids: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def as_tensor(self) -> torch.Tensor:
        """The rows as a long tensor [num_rows, seq_len]."""
        if not self.rows:
            return torch.empty(0, self.seq_len, dtype=torch.long)
        return torch.tensor(self.rows, dtype=torch.long)


def pack_documents(
    docs: Iterable[Document | str],
    encode: Callable[[str], Sequence[int]],
    *,
    seq_len: int,
    token_budget: int,
    eos_id: int | None = None,
    bos_id: int | None = None,
) -> PackedText:
    """Concatenate documents into `token_budget // seq_len` rows of `seq_len` tokens (module doc).

    Each document becomes `[bos_id] + encode(text) + [eos_id]` (either id only when given) and
    is appended to a running stream cut into rows. Documents are pulled lazily and pulling stops
    as soon as the last row is full. If the documents run out first, the partial last row is
    dropped (`exhausted` is then True and the rows are fewer). Accepts Documents or plain strings.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < seq_len:
        raise ValueError(f"token_budget must be an int >= seq_len={seq_len}, got {token_budget!r}")
    max_rows = token_budget // seq_len
    out = PackedText(rows=[], seq_len=seq_len)
    buf: list[int] = []
    for doc in docs:
        text = doc.text if isinstance(doc, Document) else doc
        if not isinstance(text, str):
            raise TypeError(f"pack_documents: expected Document or str, got {type(doc).__name__}")
        ids = list(encode(text))
        if bos_id is not None:
            ids.insert(0, bos_id)
        if eos_id is not None:
            ids.append(eos_id)
        out.documents += 1
        if isinstance(doc, Document):
            out.doc_ids.append(doc.id)
        buf.extend(ids)
        n_full = min(len(buf) // seq_len, max_rows - len(out.rows))
        for i in range(n_full):
            out.rows.append(buf[i * seq_len : (i + 1) * seq_len])
        del buf[: n_full * seq_len]
        if len(out.rows) == max_rows:
            break  # before pulling another document
    else:
        out.exhausted = True
    out.unused_tokens = len(buf)
    out.tokens = len(out.rows) * seq_len
    return out


__all__ = [
    "Document",
    "PackedText",
    "TEXT_REASONS",
    "TEXT_SUFFIXES",
    "TextReader",
    "document_from_record",
    "expand_paths",
    "is_heldout",
    "load_json_object",
    "pack_documents",
    "read_documents",
    "record_id",
    "select_split",
    "split_documents",
    "split_point",
]
