"""One shard of the Puzzle library's work, the same wherever it runs: in the puzzle stage (one
shard holding everything), in the local BLD processes (`launch`) and in the NeMo-Run tasks (one
shard per launcher rank). A shard is every `world_size`-th variant in key order (`bld.shard`).

    train_shard   initialize the shard's variants from the parent, BLD-train those not on disk
    load_shard    the shard's variants as modules holding their trained weights from disk
    score_shard   their replace-one-block scores on the held-out scoring batches
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..model.llama import Block, HeteroLlamaForCausalLM
from ..model.train import token_batches
from .bld import load_variant_state, run_bld, shard, variant_path
from .build import build_students
from .library import Variant, is_parent_variant
from .scoring import score_variants


def _build(parent: HeteroLlamaForCausalLM, variants: list[Variant], examples: list, cfg) -> dict[Variant, Block]:
    calib = token_batches(examples, cfg.bld.batch_size, cfg.init.calibration_batches, 0)
    return build_students(parent, variants, calib, cfg.init)


def train_shard(
    parent: HeteroLlamaForCausalLM, variants: list[Variant], examples: list, library_dir: Path, cfg, *,
    rank: int = 0, world_size: int = 1, progress: bool = False,
) -> tuple[dict[Variant, Block], dict[str, float]]:  # fmt: skip
    """(the shard's modules, {variant key: final BLD loss} of what trained now). `cfg`: the
    PuzzleConfig (its init and BLD sections)."""
    mine = shard(variants, rank, world_size)
    students = _build(parent, mine, examples, cfg)
    exact = {v for v in mine if is_parent_variant(parent.config, v)}
    single = dataclasses.replace(cfg.bld, rank=0, world_size=1, processes=1)
    return students, run_bld(parent, students, examples, library_dir, single, exact=exact, progress=progress)


def load_shard(
    parent: HeteroLlamaForCausalLM, variants: list[Variant], examples: list, library_dir: Path, cfg, *,
    rank: int = 0, world_size: int = 1, built: dict[Variant, Block] | None = None,
) -> dict[Variant, Block]:  # fmt: skip
    """The shard's variants holding their trained weights from `library_dir` (modules in `built`
    are reused); a variant not on disk is a FileNotFoundError naming what to run first."""
    mine = shard(variants, rank, world_size)
    missing = [v.key for v in mine if not variant_path(library_dir, v).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Puzzle shard {rank}/{world_size}: {len(missing)} variants are not trained in {library_dir} (first: "
            f"{missing[0]}); train them first (the puzzle stage, or puzzle_bld with the same settings)"
        )
    built = built or {}
    students = {**{v: built[v] for v in mine if v in built}, **_build(parent, [v for v in mine if v not in built], examples, cfg)}
    for v in mine:
        students[v].load_state_dict(load_variant_state(library_dir, v))
    return {v: students[v] for v in mine}


def score_shard(
    parent: HeteroLlamaForCausalLM, students: dict[Variant, Block], batches: list, *, device: str | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """{variant key: metrics} of `students` on `batches` (the scoring half of the held-out text),
    on `device` (default: where the parent is); the parent's own sub-blocks are not run."""
    device = device or parent.lm_head.weight.device
    parent.to(device).eval()
    for block in students.values():
        block.to(device).eval()
    exact = {v for v in students if is_parent_variant(parent.config, v)}
    on_device = [(ids.to(device), valid.to(device)) for ids, valid in batches]
    return score_variants(parent, students, on_device, exact=exact, progress=progress)
