"""The `fusion` stage: analyze the Puzzle child's FFN runs, fuse the chosen windows, save.

Calibration tokens are the world's training examples (every real token counts). With no
attention-free run in the child the stage reports so and passes the child on unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.tiny_world import World
from ..data.chat_tokenizer import ChatTokenizer
from ..data.sources import Corpus
from ..model.checkpoint import load_checkpoint
from ..model.llama import HeteroLlamaForCausalLM
from .fuse import run_fusion

log = logging.getLogger("nemo_plugins.fusion")


@dataclass
class FusionConfig:
    threshold: float | None = None  # fuse windows whose max dependency is at most this
    target_layers_saved: int | None = None  # or: fuse greedily until this many sequential layers are saved
    calibration_batches: int = 8
    batch_size: int = 16

    def __post_init__(self):
        if self.threshold is not None and self.target_layers_saved is not None:
            raise ValueError("fusion.threshold and fusion.target_layers_saved: give at most one of them")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"fusion.threshold={self.threshold}: expected a cosine distance >= 0")
        if self.target_layers_saved is not None and self.target_layers_saved < 0:
            raise ValueError(f"fusion.target_layers_saved={self.target_layers_saved}: expected an integer >= 0")
        if self.calibration_batches <= 0 or self.batch_size <= 0:
            raise ValueError("fusion.calibration_batches and fusion.batch_size must be positive")


def run_fusion_stage(
    model: HeteroLlamaForCausalLM, world: World, cfg: FusionConfig, out_dir: Path, *, chat: ChatTokenizer | None = None,
    corpus: Corpus | None = None,
) -> tuple[dict, HeteroLlamaForCausalLM]:
    """(report, fused model); files under out_dir (see `fuse.run_fusion`). `chat`: the model's
    tokenizer and template (default: the world's); `corpus`: the calibration text (default: the
    world's examples)."""
    from ..model.train import token_batches

    chat, corpus = chat or world.chat, corpus or Corpus(world)
    batches = token_batches(corpus.training_examples(chat), cfg.batch_size, cfg.calibration_batches, 0)
    report = run_fusion(
        model, batches, out_dir, threshold=cfg.threshold, target_layers_saved=cfg.target_layers_saved,
        extra_files=chat.files(),
    )  # fmt: skip
    log.info("fusion: %s", report["message"])
    return report, load_checkpoint(report["checkpoint"]["path"])
