"""The tiny world: problems, tokenizer and training examples, generated locally and cached.

Everything is deterministic in `WorldConfig`, so the cache (keyed by a hash of the config) is
only a speed-up: the tokenizer is trained once and reused by the demo and the tests.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from ..utils import checks
from ..utils.atomic import write_json_atomic
from ..utils.hashing import config_hash, source_digest
from .chat_tokenizer import ChatTokenizer
from .reasoning_world import DIFFICULTIES, Problem, draw_unique, reasoning_response, response_for, split_problems
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

# The code that makes the world (problems, splits, renderings, tokenizer): part of its cache key.
WORLD_SOURCE = ("data/tiny_world.py", "data/reasoning_world.py", "data/tokenizer.py", "data/chat.py",
                "data/chat_tokenizer.py")

FORMAT_VERSION = 1  # bump when generation changes, so stale caches are not reused


def cache_root() -> Path:
    """`$NEMO_PLUGINS_CACHE`, else ~/.cache/nemo_plugins."""
    return Path(os.environ.get("NEMO_PLUGINS_CACHE", Path.home() / ".cache" / "nemo_plugins"))


@dataclass
class WorldConfig:
    seed: int = 0
    n_train: int = 20000
    n_eval: int = 250
    difficulties: list[int] = field(default_factory=lambda: list(DIFFICULTIES))
    vocab_size: int = 384
    thinking_fraction: float = 0.7  # share of training examples in "detailed thinking on" mode

    def __post_init__(self):
        checks.fractions(self, "world", "thinking_fraction")
        checks.positive_ints(self, "world", "n_train", "n_eval")
        checks.non_negative_ints(self, "world", "seed")
        checks.non_empty(self, "world", "difficulties")
        bad = [d for d in self.difficulties if d not in DIFFICULTIES]
        if bad:
            raise ValueError(f"world.difficulties={list(self.difficulties)}: {bad[0]!r} is not one of {list(DIFFICULTIES)}")
        if not (isinstance(self.vocab_size, int) and self.vocab_size >= 264):
            raise ValueError(f"world.vocab_size={self.vocab_size}: expected >= 264 (8 special tokens + 256 bytes)")


@dataclass
class World:
    config: WorldConfig
    train: list[Problem]
    eval: list[Problem]
    tokenizer: Tokenizer
    directory: Path = field(default=Path("."))

    @property
    def cache_root(self) -> Path:
        """The cache this world lives in (`directory` is <cache_root>/tiny_world/<key>); other
        cached artefacts (imported GGUF parents, text corpora) go beside it."""
        return self.directory.parent.parent

    @property
    def chat(self) -> ChatTokenizer:
        """The world's own tokenizer with the tiny chat template."""
        return ChatTokenizer.tiny(self.tokenizer)

    def training_examples(self, chat: ChatTokenizer | None = None) -> list[tuple[list[int], list[int]]]:
        """(ids, loss_mask) examples, each problem in one reasoning mode, in `chat`'s template
        (default: the world's own tokenizer and template)."""
        chat = chat or self.chat
        rng = random.Random(f"{self.config.seed}/modes")
        out = []
        for p in self.train:
            thinking = rng.random() < self.config.thinking_fraction
            out.append(chat.example_ids(p.question, response_for(p, thinking), thinking))
        return out

    def eval_examples(self, chat: ChatTokenizer | None = None) -> list[tuple[list[int], list[int]]]:
        """The held-out problems with their reasoning responses (thinking on), as (ids, loss_mask):
        what Puzzle scores and recovery validates on."""
        chat = chat or self.chat
        return [chat.example_ids(p.question, reasoning_response(p), True) for p in self.eval]

    def extra_heldout(
        self, n: int, difficulties: list[int] | None = None, tag: str = "heldout", exclude: Iterable[Problem] = ()
    ) -> list[Problem]:
        """`n` more problems of `difficulties` (default: the world's), unique, evenly split across
        levels, and in none of `train`, `eval` and `exclude`. Deterministic in (world seed, `tag`,
        `exclude`): a larger held-out set than `eval`, or prompts no model has been trained on."""
        seen = {p.question for p in self.train} | {p.question for p in self.eval} | {p.question for p in exclude}
        levels = difficulties if difficulties is not None else self.config.difficulties
        return draw_unique(random.Random(f"{self.config.seed}/{tag}"), n, levels, seen)


def world_directory(cfg: WorldConfig, root: Path | None = None) -> Path:
    return (root or cache_root()) / "tiny_world" / config_hash(asdict(cfg), source_digest(*WORLD_SOURCE))


class DeferredWorld(World):
    """The tiny world of a run that may never use it (a real parent with real data): its
    directory, and so the cache root, are known at once; the problems and the tokenizer are made
    (or restored) on first use, so a run that reads none of them builds nothing."""

    def __init__(self, cfg: WorldConfig, root: Path | None = None):
        self.config, self.directory, self._root, self._built = cfg, world_directory(cfg, root), root, None

    def _world(self) -> World:
        if self._built is None:
            self._built = build_world(self.config, self._root)
        return self._built

    @property
    def built(self) -> bool:
        """Whether anything has used the world's problems or tokenizer yet."""
        return self._built is not None

    train = property(lambda self: self._world().train)
    eval = property(lambda self: self._world().eval)
    tokenizer = property(lambda self: self._world().tokenizer)


def build_world(cfg: WorldConfig | None = None, root: Path | None = None) -> World:
    """Generate (or restore from the cache) the problems and tokenizer of the tiny world."""
    cfg = cfg or WorldConfig()
    train, eval_ = split_problems(cfg.seed, cfg.n_train, cfg.n_eval, cfg.difficulties)
    directory = world_directory(cfg, root)
    tok_path = directory / "tokenizer.json"
    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
    else:
        from .reasoning_world import chat_texts

        tok = train_tokenizer(chat_texts(train), vocab_size=cfg.vocab_size)
        save_tokenizer(tok, tok_path)
        write_json_atomic(directory / "world.json", {"format_version": FORMAT_VERSION, **asdict(cfg)})
    return World(cfg, train, eval_, tok, directory)
