"""The `data:` section: the text that calibration, BLD, scoring and distillation train and
measure on.

By default that text is the tiny world's examples. With `data.text.paths` (plain text or JSONL
files, directories, globs) or `data.text.builtin=champ` (CHAMP's problems with their human
solutions) it is the user's documents instead: streamed, split into train and held-out by
document id (`text_data.is_heldout`, so the two never share a document), tokenized with the
model's own tokenizer and packed into rows of `seq_len` up to a token budget per split.

`Corpus` gives stages one interface for both: `training_examples(chat)` and
`eval_examples(chat)` as (ids, loss_mask) lists, and `directory`, the cache directory keyed by
the data (the world's own directory for the tiny world, so its caches stay valid).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from .chat_tokenizer import ChatTokenizer
from .problems import ProblemSourceConfig
from .text_data import Document, expand_paths, pack_documents, read_documents, select_split
from ..utils.hashing import config_hash
from .tiny_world import World

log = logging.getLogger(__name__)

BUILTIN_TEXT = ("champ",)


class DataError(ValueError):
    """Data that cannot serve a stage (too little text, ...): the message says what to change."""


@dataclass
class TextSourceConfig:
    paths: list[str] = field(default_factory=list)  # .txt / .jsonl files, directories or globs
    builtin: str | None = None  # champ: CHAMP problem statements with their step-by-step solutions
    text_field: str = "text"  # JSONL: the field holding the document
    id_field: str | None = None  # JSONL: the document id (default file:line); the split hashes it
    txt_mode: str = "file"  # .txt: one document per file, or per blank-line separated paragraph
    on_error: str = "skip"  # skip | raise: a malformed JSONL record (counted and located either way)
    heldout_fraction: float = 0.1  # share of documents held out for scoring and validation
    seed: int = 0  # of the held-out split
    seq_len: int = 256  # tokens per packed row
    train_tokens: int = 262_144  # budget of the train split (rows of seq_len)
    heldout_tokens: int = 32_768  # budget of the held-out split

    def __post_init__(self):
        self.paths = [str(p) for p in self.paths]
        if self.builtin is not None and self.builtin not in BUILTIN_TEXT:
            raise ValueError(f"data.text.builtin={self.builtin!r}: expected null or one of {list(BUILTIN_TEXT)}")
        if self.txt_mode not in ("file", "paragraph"):
            raise ValueError(f"data.text.txt_mode={self.txt_mode!r}: expected file or paragraph")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.text.on_error={self.on_error!r}: expected skip or raise")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"data.text.heldout_fraction={self.heldout_fraction}: expected a fraction in (0, 1)")
        for name in ("seq_len", "train_tokens", "heldout_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.text.{name}={getattr(self, name)}: expected a positive integer")
        for name in ("train_tokens", "heldout_tokens"):
            if getattr(self, name) < self.seq_len:
                raise ValueError(f"data.text.{name}={getattr(self, name)}: expected at least seq_len={self.seq_len}")

    @property
    def enabled(self) -> bool:
        return bool(self.paths) or self.builtin is not None


@dataclass
class DataConfig:
    text: TextSourceConfig = field(default_factory=TextSourceConfig)
    problems: ProblemSourceConfig = field(default_factory=ProblemSourceConfig)


class Corpus:
    """Token examples for the stages that need text (see the module docstring)."""

    def __init__(self, world: World, cfg: TextSourceConfig | None = None):
        self.world, self.cfg = world, cfg or TextSourceConfig()
        self.report: dict = {"source": "tiny_world"}
        if self.cfg.enabled:
            self.report["source"] = {"paths": self.cfg.paths, "builtin": self.cfg.builtin}
            paths = expand_paths(self.cfg.paths) if self.cfg.paths else []
            files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
            self.key = config_hash("text", asdict(self.cfg), files)
            self.directory = world.cache_root / "text" / self.key
        else:
            self.key, self.directory = None, world.directory

    def _documents(self, readers: list) -> Iterator[Document]:
        c = self.cfg
        if c.paths:
            reader = read_documents(c.paths, text_field=c.text_field, id_field=c.id_field, txt_mode=c.txt_mode,
                                    on_error=c.on_error)  # fmt: skip
            readers.append(reader)
            yield from reader
        if c.builtin == "champ":
            from .champ import champ_documents, load_champ

            yield from champ_documents(load_champ())

    def _split(self, chat: ChatTokenizer, split: str, budget: int) -> list[tuple[list[int], list[int]]]:
        c = self.cfg
        readers: list = []
        docs = select_split(self._documents(readers), split, c.heldout_fraction, c.seed)
        packed = pack_documents(docs, chat.encode, seq_len=c.seq_len, token_budget=budget, eos_id=chat.eos_id)
        for r in (reader.report for reader in readers):
            self.report[f"{split}_files"] = {"read": r.read, "kept": r.kept, "skipped": r.skipped,
                                             "reasons": dict(r.reasons), "problems": r.problems[:10]}  # fmt: skip
        if not packed.rows:
            raise DataError(
                f"data.text: the {split} split has fewer than seq_len={c.seq_len} tokens "
                f"({packed.tokens} from {packed.documents} documents); add text or lower data.text.seq_len"
            )
        self.report[split] = {"documents": packed.documents, "rows": packed.num_rows, "tokens": packed.num_rows * c.seq_len,
                              "exhausted": packed.exhausted}  # fmt: skip
        if packed.exhausted:
            log.warning("data.text: the %s split ran out of text at %d rows of %d tokens (budget %d)",
                        split, packed.num_rows, c.seq_len, budget)  # fmt: skip
        return [(list(row), [1] * len(row)) for row in packed.rows]

    def training_examples(self, chat: ChatTokenizer | None = None) -> list[tuple[list[int], list[int]]]:
        """(ids, loss_mask) rows to train and calibrate on."""
        if not self.cfg.enabled:
            return self.world.training_examples(chat)
        return self._split(chat or self.world.chat, "train", self.cfg.train_tokens)

    def eval_examples(self, chat: ChatTokenizer | None = None) -> list[tuple[list[int], list[int]]]:
        """(ids, loss_mask) rows held out for scoring and validation."""
        if not self.cfg.enabled:
            return self.world.eval_examples(chat)
        return self._split(chat or self.world.chat, "heldout", self.cfg.heldout_tokens)
