"""The tiny parent: a small Llama trained on the tiny world on CPU in a few minutes, cached.

Dimensions keep Puzzle children expressible in nemotron-nas: with hidden 192 the parent FFN
(768, ffn_mult 6.0) and its reduced widths 256 and 512 are multiples of 256, and 8 query heads
over 4 KV heads leave 2 and 1 KV heads as cheaper variants.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..utils import checks
from ..arch.config import ModelConfig, homogeneous
from ..data.chat import BOS, EOS
from ..data.tiny_world import World
from ..utils.hashing import config_hash, source_digest
from ..data.tokenizer import token_id
from ..utils.atomic import write_json_atomic
from .checkpoint import save_checkpoint
from .llama import HeteroLlamaForCausalLM
from ..utils.training import OptimConfig
from .train import fit_lm

# The code that trains and saves the tiny parent (model, loop, data batching): part of its cache
# key. Not generation or rollout code, which reads a parent but never makes one: an edit there
# would retrain the parent and every block library built on it for nothing.
PARENT_SOURCE = ("model/llama.py", "model/train.py", "model/tiny_parent.py", "model/checkpoint.py", "arch",
                 "utils/training.py", "utils/resume.py")  # fmt: skip


@dataclass
class ParentConfig:
    hidden_size: int = 192
    num_layers: int = 4
    num_attention_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 768
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    seed: int = 0
    # Any local Hugging Face Llama-family directory (plain Llama or nemotron-nas, one file or
    # sharded, with tokenizer.json and its chat template) to use instead of training the tiny
    # parent; the fields above are then unused.
    path: str | None = None
    ckpt_every: int = 100  # steps between checkpoints of the training (a killed one resumes from the last)

    def __post_init__(self):
        checks.positive_ints(self, "parent", "steps", "batch_size", "hidden_size", "num_layers", "num_attention_heads",
                             "num_kv_heads", "intermediate_size", "max_position_embeddings")  # fmt: skip
        checks.non_negative_ints(self, "parent", "warmup_steps", "seed", "ckpt_every")
        checks.positive_numbers(self, "parent", "lr", "rope_theta")


def parent_model_config(p: ParentConfig, world: World) -> ModelConfig:
    tok = world.tokenizer
    return homogeneous(
        vocab_size=tok.get_vocab_size(),
        hidden_size=p.hidden_size,
        num_layers=p.num_layers,
        num_attention_heads=p.num_attention_heads,
        num_kv_heads=p.num_kv_heads,
        intermediate_size=p.intermediate_size,
        rope_theta=p.rope_theta,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=p.tie_word_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=token_id(tok, BOS),
        eos_token_id=token_id(tok, EOS),
    )


def parent_dir(world: World, p: ParentConfig) -> Path:
    """The cache directory of the tiny parent trained with `p` (keyed by its training fields)."""
    fields = {k: v for k, v in asdict(p).items() if k not in ("path", "ckpt_every")}
    return world.directory / f"parent-{config_hash(fields, source_digest(*PARENT_SOURCE))}"


def train_parent(world: World, p: ParentConfig | None = None, *, progress: bool = True) -> Path:
    """Train the parent (or reuse the cached one); returns its HF checkpoint directory."""
    p = p or ParentConfig()
    out = parent_dir(world, p)
    if (out / "train_log.json").is_file():
        return out
    import torch

    torch.manual_seed(p.seed)
    model = HeteroLlamaForCausalLM(parent_model_config(p, world))
    optim = OptimConfig(lr=p.lr, warmup_steps=p.warmup_steps)
    run = out.with_name(out.name + ".run")  # checkpoints of an unfinished training, resumed by a rerun
    losses = fit_lm(
        model, world.training_examples(), steps=p.steps, batch_size=p.batch_size, optim=optim,
        seed=p.seed, progress=progress, checkpoints=run / "checkpoints", ckpt_every=p.ckpt_every,
    )  # fmt: skip
    save_checkpoint(model, out, extra_files=world.chat.files())
    write_json_atomic(out / "train_log.json", {"config": asdict(p), "losses": losses})
    shutil.rmtree(run, ignore_errors=True)
    return out


def read_train_log(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "train_log.json").read_text())
