"""The project's Puzzle steps as NeMo-Run tasks (`nemo nemo_plugins <task> ...`, recipes/nemo_puzzle.py).

    puzzle_prepare  world, parent and its HF export: what every shard reads (once, before them)
    puzzle_bld      blockwise local distillation of this process's share of the block library
    puzzle_score    scoring of this process's share of the trained library
    puzzle_search   MIP, child and report on the shards' results (FFN Fusion with fusion=True)
    import_hf       a HF checkpoint (parent or Puzzle child) into a NeMo 2 checkpoint
    h100_preset     factory of puzzle_bld / puzzle_score / puzzle_search with conf/puzzle/h100.yaml

Each runs the project's own Puzzle code (nemo_plugins.puzzle) from the project's config
(conf/*.yaml, `preset` 'tiny' or 'h100', then `configs`, then `overrides` as key=value). BLD and
scoring split the block library over processes: `rank`/`world_size` when given, else the
launcher's (torchrun RANK/WORLD_SIZE, Slurm SLURM_PROCID/SLURM_NTASKS); each process takes one
GPU. Shards write where the Puzzle stage looks (its `library_dir`, its `scores_file`), so
`puzzle_search` then only solves the MIP and builds the child. All processes must see one
shared file system (set cache_dir= and output_dir= there).

The entrypoints and factories register when this module is imported; `nemo_plugins.nemo.recipes`
(the `nemo_run.cli` entry point) imports it.
"""

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from . import require_nemo

llm = require_nemo("nemo.collections.llm")

import nemo_run as run  # noqa: E402

log = logging.getLogger("nemo_plugins.nemo")

STAGES_BEFORE_PUZZLE = ("world", "parent")


def _project_config(preset: str, configs: Optional[list[str]], overrides: Optional[list[str]], stages=None):
    from ..config import CONF_DIR, DEFAULT_CONFIGS, ConfigError, load_config
    from ..pipeline import PipelineConfig

    presets = {"tiny": list(DEFAULT_CONFIGS), "h100": [*DEFAULT_CONFIGS, CONF_DIR / "puzzle" / "h100.yaml"]}
    if preset not in presets:
        raise ConfigError(f"preset={preset!r}: expected one of {sorted(presets)}")
    extra = [p if Path(p).is_file() else CONF_DIR / p for p in (configs or [])]  # conf-relative names work too
    stage_override = [f"stages=[{','.join(stages)}]"] if stages else []
    cfg = load_config(PipelineConfig, [*presets[preset], *extra], [*stage_override, *(overrides or [])])
    if (cfg.puzzle.bld.rank, cfg.puzzle.bld.world_size) != (0, 1):
        raise ConfigError(
            f"puzzle.bld.rank={cfg.puzzle.bld.rank}, puzzle.bld.world_size={cfg.puzzle.bld.world_size}: the "
            "shard comes from the task's rank/world_size (or the launcher) here; drop these overrides"
        )
    return cfg


def launcher_rank(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank): the arguments, else torchrun's, else Slurm's, else (0, 1, 0)."""
    env = os.environ
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    elif "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world_size, local = 0, 1, 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    return rank, world_size, local


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                  "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_PROCID", "SLURM_LOCALID",
                  "SLURM_STEP_NUM_TASKS")  # fmt: skip


def _own_gpu(local_rank: int) -> None:
    """Leave this process one GPU and no launcher variables, so Lightning trains on one device
    alone (as one of the project's BLD workers does). Must run before CUDA starts."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i for i in visible.split(",") if i.strip()] if visible else None
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank] if local_rank < len(ids) else ids[0]
    elif visible is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank)
    for var in _LAUNCHER_VARS:
        os.environ.pop(var, None)


def _parent_and_library(cfg):
    """(parent model, corpus, library directory, variants, chat tokenizer) exactly as the Puzzle
    stage has them: the parent is `parent.path` or the cached tiny parent, the text `data.text`
    or the tiny world's (which is built only then)."""
    from ..data.chat_tokenizer import ChatTokenizer
    from ..data.sources import Corpus
    from ..data.tiny_world import DeferredWorld
    from ..model.checkpoint import fingerprint
    from ..pipeline import load_model, parent_source
    from ..puzzle.library import build_variants
    from ..puzzle.stage import library_dir

    world = DeferredWorld(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)  # built only if used
    corpus = Corpus(world, cfg.data.text)
    source = parent_source(cfg, world)
    parent = load_model(source)
    lib_dir = library_dir(cfg.puzzle, fingerprint(parent), corpus.directory)  # keyed as the pipeline keys it
    return parent, corpus, lib_dir, build_variants(parent.config, cfg.puzzle.library), ChatTokenizer.from_dir(source)


@run.cli.entrypoint(namespace="nemo_plugins")
def puzzle_prepare(
    preset: str = "tiny", configs: Optional[list[str]] = None, overrides: Optional[list[str]] = None
) -> dict:
    """World, parent and its HF export: what every Puzzle shard reads (run once, before them)."""
    from ..pipeline import run_pipeline

    summary = run_pipeline(_project_config(preset, configs, overrides, STAGES_BEFORE_PUZZLE))
    return {k: v for k, v in summary.items() if k != "config"}


@run.cli.entrypoint(namespace="nemo_plugins")
def puzzle_bld(
    preset: str = "tiny",
    configs: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> dict:
    """Blockwise local distillation of this process's share of the block library."""
    from ..puzzle.shards import train_shard

    rank, world_size, local = launcher_rank(rank, world_size)
    _own_gpu(local)
    cfg = _project_config(preset, configs, overrides)
    parent, corpus, lib_dir, variants, chat = _parent_and_library(cfg)
    students, losses = train_shard(parent, variants, corpus.training_examples(chat), lib_dir, cfg.puzzle,
                                   rank=rank, world_size=world_size)  # fmt: skip
    mine = list(students)
    log.info("BLD shard %d/%d: %d variants (%d trained now) in %s", rank, world_size, len(mine), len(losses), lib_dir)
    return {"rank": rank, "world_size": world_size, "variants": [v.key for v in mine], "trained": len(losses),
            "library_dir": str(lib_dir)}  # fmt: skip


@run.cli.entrypoint(namespace="nemo_plugins")
def puzzle_score(
    preset: str = "tiny",
    configs: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> dict:
    """Score this process's share of the trained library (each variant in the otherwise-parent
    model: KL, LM loss, cosine); writes a part file that `puzzle_search` merges."""
    from ..puzzle.shards import load_shard, score_shard
    from ..puzzle.stage import held_out_batches, scores_file
    from ..utils.atomic import write_json_atomic

    rank, world_size, local = launcher_rank(rank, world_size)
    _own_gpu(local)
    cfg = _project_config(preset, configs, overrides)
    parent, corpus, lib_dir, variants, chat = _parent_and_library(cfg)
    students = load_shard(parent, variants, corpus.training_examples(chat), lib_dir, cfg.puzzle, rank=rank,
                          world_size=world_size)  # fmt: skip
    held_out = corpus.eval_examples(chat)
    batches, _ = held_out_batches(cfg.puzzle, held_out)
    scores = score_shard(parent, students, batches, device="cuda" if torch.cuda.is_available() else "cpu")
    final = scores_file(cfg.puzzle, lib_dir, len(held_out))
    part = final.with_name(f"{final.stem}.part-{rank}-of-{world_size}.json")
    write_json_atomic(part, scores)
    return {"rank": rank, "world_size": world_size, "scored": len(scores), "part": str(part)}


def merge_score_parts(final: Path) -> bool:
    """Merge a complete set of `<final>.part-R-of-W.json` into `final` (if absent). True when
    `final` exists afterwards."""
    if final.is_file():
        return True
    from ..utils.atomic import write_json_atomic

    parts: dict[int, dict[int, Path]] = {}
    for f in final.parent.glob(f"{final.stem}.part-*-of-*.json"):
        r, w = f.name[len(final.stem) + len(".part-") : -len(".json")].split("-of-")
        parts.setdefault(int(w), {})[int(r)] = f
    for w, got in sorted(parts.items()):
        if sorted(got) == list(range(w)):
            merged: dict = {}
            for r in range(w):
                merged.update(json.loads(got[r].read_text()))
            write_json_atomic(final, merged)
            return True
    return False


@run.cli.entrypoint(namespace="nemo_plugins")
def puzzle_search(
    preset: str = "tiny",
    configs: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    fusion: bool = False,
) -> dict:
    """The Puzzle stage on the shards' results (MIP, child, report; FFN Fusion with fusion=True).
    Variants or scores missing on disk are computed here, so it is also correct alone."""
    from ..pipeline import run_pipeline
    from ..puzzle.bld import variant_path
    from ..puzzle.stage import scores_file

    stages = [*STAGES_BEFORE_PUZZLE, "puzzle", *(["fusion"] if fusion else [])]
    cfg = _project_config(preset, configs, overrides, stages)
    parent, corpus, lib_dir, variants, chat = _parent_and_library(cfg)
    untrained = sum(not variant_path(lib_dir, v).is_file() for v in variants)
    if untrained:
        log.warning("puzzle_search: %d of %d variants not in %s; BLD trains them here",
                    untrained, len(variants), lib_dir)  # fmt: skip
    if not merge_score_parts(scores_file(cfg.puzzle, lib_dir, len(corpus.eval_examples(chat)))):
        log.warning("puzzle_search: no complete set of score shards in %s; scoring here", lib_dir)
    summary = run_pipeline(cfg)
    return {k: v for k, v in summary.items() if k != "config"}


@run.cli.entrypoint(namespace="nemo_plugins")
def import_hf(hf_dir: str, output: str, overwrite: bool = False) -> str:
    """Convert a HF checkpoint (plain Llama or nemotron-nas, e.g. a Puzzle child) into a NeMo 2
    checkpoint of PuzzleChildModel at `output`; returns its path."""
    from .model import PuzzleChildModel, nemo_config

    importlib.import_module(f"{__package__}.connectors")  # registers the HF importer
    source = Path(hf_dir).resolve()
    model = PuzzleChildModel(nemo_config(source))  # the importer reads the arch from the directory
    return str(llm.import_ckpt(model, f"hf://{source}", output_path=Path(output), overwrite=overwrite))



@run.cli.entrypoint(namespace="nemo_plugins")
def export_hf(nemo_path: str, output: str) -> str:
    """Write a NeMo 2 checkpoint of PuzzleChildModel (or a log dir: its newest checkpoint, e.g. the
    SFT stage's) as a HF directory at `output` (plain Llama when every layer is the same; what
    NeMo-Aligner's HF -> .nemo converter reads); returns its path. Skipped when `output` has a config."""
    from .recipes import resolve_checkpoint

    if (Path(output) / "config.json").is_file():
        return output
    importlib.import_module(f"{__package__}.connectors")  # registers the HF exporter
    return str(llm.export_ckpt(path=Path(resolve_checkpoint(nemo_path)), target="hf", output_path=Path(output)))

# `nemo nemo_plugins puzzle_bld --factory h100_preset executor=... "overrides=[...]"` (not named
# "h100": NeMo-Run reads a string value equal to a factory name back as that factory's output): the paper's library,
# BLD settings and H100 costs (conf/puzzle/h100.yaml) on top of the defaults.


@run.cli.factory(target=puzzle_bld, name="h100_preset")
def puzzle_bld_h100(overrides: Optional[list[str]] = None) -> run.Partial:
    """BLD shards with conf/puzzle/h100.yaml."""
    return run.Partial(puzzle_bld, preset="h100", overrides=list(overrides or []))


@run.cli.factory(target=puzzle_score, name="h100_preset")
def puzzle_score_h100(overrides: Optional[list[str]] = None) -> run.Partial:
    """Scoring shards with conf/puzzle/h100.yaml."""
    return run.Partial(puzzle_score, preset="h100", overrides=list(overrides or []))


@run.cli.factory(target=puzzle_search, name="h100_preset")
def puzzle_search_h100(overrides: Optional[list[str]] = None, fusion: bool = False) -> run.Partial:
    """MIP and child with conf/puzzle/h100.yaml (the 79 GiB single-H100 memory budget)."""
    return run.Partial(puzzle_search, preset="h100", overrides=list(overrides or []), fusion=fusion)
