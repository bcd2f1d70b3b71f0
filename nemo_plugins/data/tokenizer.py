"""A small byte-level BPE tokenizer for the tiny world, built with HF `tokenizers`.

Pre-tokenization splits every digit into its own piece (numbers are read digit by
digit, which makes arithmetic learnable), keeps words whole with their leading
space, and keeps runs of punctuation with their surrounding spaces (" + ", ") * ")
so expressions stay short. Bytes are mapped GPT-2 style, so any text encodes
and decode(encode(s)) == s exactly. Special tokens from data/chat.py get fixed ids
in SPECIAL_TOKENS order (PAD=0) and are never split.
"""

import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from nemo_plugins.data.chat import SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"

# words with their leading space | punctuation runs joined by single spaces, with
# optional leading/trailing space | other whitespace. Digits are already isolated.
_SPLIT_PATTERN = r" ?\p{L}+| ?[^\s\p{L}\p{N}]+(?: [^\s\p{L}\p{N}]+)* ?|\s+"


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384) -> Tokenizer:
    """Train BPE on `texts`. Deterministic for the same texts.

    The vocab holds the special tokens, all 256 bytes, then merges up to
    `vocab_size`; it ends up smaller if the corpus runs out of pairs to merge.
    """
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size must be >= {base} (special tokens + 256 bytes), got {vocab_size}")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    _check_special_tokens(tok, where="trained tokenizer")
    return tok


# -----------------------------------------------------------------------------
# save / load


def _tokenizer_file(path: str | os.PathLike) -> Path:
    """`path` is either a directory (holding tokenizer.json) or a .json file."""
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write tokenizer.json atomically (temp file in the same dir, then os.replace)."""
    file = _tokenizer_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tok.to_str())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return file


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read tokenizer.json from a directory or file path, with a clear error naming the file."""
    file = _tokenizer_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {file}")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ValueError(f"invalid tokenizer file {file}: {e}") from e
    _check_special_tokens(tok, where=str(file))
    return tok


# -----------------------------------------------------------------------------
# ids and encoding


def token_id(tok: Tokenizer, token: str) -> int:
    """Id of a (special) token; raises ValueError if the vocab lacks it."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise ValueError(f"token {token!r} is not in the tokenizer vocabulary")
    return idx


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: token_id(tok, t) for t in SPECIAL_TOKENS}


def _check_special_tokens(tok: Tokenizer, where: str) -> None:
    for expected, t in enumerate(SPECIAL_TOKENS):
        idx = tok.token_to_id(t)
        if idx != expected:
            raise ValueError(f"{where}: special token {t!r} has id {idx}, expected {expected}")


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of text; special tokens in the text map to their fixed ids, nothing is added."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Inverse of encode, special tokens kept (the think tags matter for parsing)."""
    return tok.decode(list(ids), skip_special_tokens=False)


def encode_example(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): mask is 1 on response tokens (incl. EOS), 0 on the prompt.

    Prompt and response are encoded separately, so the boundary is exact.
    """
    p, r = encode(tok, prompt), encode(tok, response)
    return p + r, [0] * len(p) + [1] * len(r)
