"""The main job: tiny world -> parent -> evaluation -> export -> Puzzle child -> FFN Fusion ->
recovery distillation, each stage resumable.

Stages keep their outputs on disk keyed by their config (world and parent live in the cache,
see `data.tiny_world.cache_root`), so a rerun restores finished work instead of redoing it.
Later stages (SFT, GRPO) join this list.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .arch.accounting import report
from .data.tiny_world import World, WorldConfig, build_world
from .data.tokenizer import TOKENIZER_FILE
from .evaluate import task_accuracy
from .model.checkpoint import load_checkpoint, save_checkpoint
from .model.tiny_parent import ParentConfig, read_train_log, train_parent
from .distill.stage import RecoveryStageConfig
from .errors import CheckpointError
from .fusion.stage import FusionConfig
from .puzzle.stage import PuzzleConfig, run_puzzle
from .rl.grpo_stage import GRPOStageConfig
from .sft.stage import SFTStageConfig
from .utils.atomic import write_json_atomic

log = logging.getLogger("nemo_plugins")

STAGES = ("world", "parent", "evaluate", "export", "puzzle", "fusion", "recovery", "sft", "grpo")
MODES = {"on": True, "off": False}
# YAML and OmegaConf read a bare on/off as a boolean; accept those spellings too.
_MODE_ALIASES = {"True": "on", "true": "on", "False": "off", "false": "off"}


@dataclass
class EvalConfig:
    n_problems: int = 250  # taken from the world's held-out set
    batch_size: int = 64
    max_new_tokens: int = 64
    modes: list[str] = field(default_factory=lambda: ["on", "off"])  # reasoning toggle settings

    def __post_init__(self):
        self.modes = [_MODE_ALIASES.get(str(m), str(m)) for m in self.modes]
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"eval.modes: unknown mode {bad[0]!r} (expected 'on' or 'off')")
        if self.n_problems <= 0 or self.batch_size <= 0 or self.max_new_tokens <= 0:
            raise ValueError("eval.n_problems, eval.batch_size and eval.max_new_tokens must be positive")


@dataclass
class ExportConfig:
    architecture: str = "auto"  # auto | llama | nemotron-nas | nemo_plugins
    max_shard_bytes: int = 0  # 0: one safetensors file

    def __post_init__(self):
        if self.architecture not in ("auto", "llama", "nemotron-nas", "nemo_plugins"):
            raise ValueError(
                f"export.architecture={self.architecture!r}: expected auto, llama, nemotron-nas or nemo_plugins"
            )


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/tiny"
    cache_dir: str | None = None  # default: $NEMO_PLUGINS_CACHE or ~/.cache/nemo_plugins
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    progress: bool = True
    world: WorldConfig = field(default_factory=WorldConfig)
    parent: ParentConfig = field(default_factory=ParentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    puzzle: PuzzleConfig = field(default_factory=PuzzleConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    recovery: RecoveryStageConfig = field(default_factory=RecoveryStageConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown stage {bad[0]!r} (expected some of {list(STAGES)})")


def evaluate_model(model, world: World, cfg: EvalConfig, progress: bool = False) -> dict:
    problems = world.eval[: cfg.n_problems]
    return {
        mode: task_accuracy(
            model, world.tokenizer, problems, thinking=MODES[mode], batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens, progress=progress,
        )  # fmt: skip
        for mode in cfg.modes
    }


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the selected stages; returns (and writes to output_dir/report.json) a summary."""
    out = Path(cfg.output_dir)
    root = Path(cfg.cache_dir) if cfg.cache_dir else None
    summary: dict = {"config": asdict(cfg)}

    world = build_world(cfg.world, root)
    summary["world"] = {
        "directory": str(world.directory), "vocab_size": world.tokenizer.get_vocab_size(),
        "n_train": len(world.train), "n_eval": len(world.eval),
    }  # fmt: skip
    log.info("world: %s", summary["world"])
    if cfg.stages == ["world"]:
        return _finish(out, summary)

    ckpt = train_parent(world, cfg.parent, progress=cfg.progress)
    losses = read_train_log(ckpt)["losses"]
    summary["parent"] = {"checkpoint": str(ckpt), "first_loss": losses[0], "final_loss": losses[-1]}
    log.info("parent: %s", summary["parent"])
    model = load_checkpoint(ckpt)

    if "evaluate" in cfg.stages:
        summary["evaluate"] = evaluate_model(model, world, cfg.eval, cfg.progress)
        for mode, res in summary["evaluate"].items():
            log.info("parent accuracy (thinking %s): %.3f by difficulty %s", mode, res["accuracy"], res["by_difficulty"])

    if "export" in cfg.stages:
        target = out / "parent"
        save_checkpoint(
            model, target, architecture=cfg.export.architecture, max_shard_bytes=cfg.export.max_shard_bytes or None,
            extra_files={TOKENIZER_FILE: world.tokenizer.to_str()},
        )  # fmt: skip
        rep = report(model.config)
        summary["export"] = {"checkpoint": str(target), "params": rep.params,
                             "kv_cache_bytes_per_token": rep.kv_cache_bytes_per_token}  # fmt: skip
        log.info("exported parent to %s", target)

    if "puzzle" in cfg.stages:
        rep = run_puzzle(model, ckpt.name, world, cfg.puzzle, out / "puzzle", progress=cfg.progress)
        summary["puzzle"] = {k: rep[k] for k in ("status", "objective", "child", "quality", "task_accuracy_easy",
                                                 "child_params", "parent_params", "child_kv_cache_bytes_per_token",
                                                 "parent_kv_cache_bytes_per_token")}  # fmt: skip
        log.info("puzzle child: %s", summary["puzzle"])

    if "fusion" in cfg.stages:
        from .fusion.stage import run_fusion_stage

        child = load_checkpoint(_stage_input(out, "fusion", cfg.stages))
        rep, _ = run_fusion_stage(child, world, cfg.fusion, out / "fusion")
        summary["fusion"] = {k: rep[k] for k in ("message", "windows", "layers_saved", "kl_div", "max_abs_diff_logits",
                                                 "depth_before", "depth_after", "checkpoint")}  # fmt: skip

    if "recovery" in cfg.stages:
        from .distill.stage import run_recovery_stage

        child = load_checkpoint(_stage_input(out, "recovery", cfg.stages))
        rep, _ = run_recovery_stage(model, child, world, cfg.recovery, out / "recovery", progress=cfg.progress)
        summary["recovery"] = {k: rep[k] for k in ("parent", "before", "kd", "cpt", "kd_gap_closed", "child") if k in rep}
        for run in ("kd", "cpt"):  # the curves are in recovery/<run>/metrics.csv; keep the summary short
            summary["recovery"].get(run, {}).pop("val_history", None)

    if "sft" in cfg.stages:
        from .sft.stage import run_sft_stage

        start = _stage_input(out, "sft", cfg.stages, parent=ckpt)
        rep, _ = run_sft_stage(load_checkpoint(start), world, cfg.sft, out / "sft", progress=cfg.progress)
        summary["sft"] = {"start": str(start), "before": rep["before"], "after": rep["after"], "model": str(out / "sft" / "model")}

    if "grpo" in cfg.stages:
        from .rl.grpo_stage import run_grpo_stage

        start = _stage_input(out, "grpo", cfg.stages, parent=ckpt)
        rep, _ = run_grpo_stage(load_checkpoint(start), world, cfg.grpo, out / "grpo", progress=cfg.progress)
        summary["grpo"] = {"start": str(start), **{k: rep[k] for k in ("table", "model") if k in rep}}
    return _finish(out, summary)


# The model each stage leaves for the next, newest first.
_STAGE_OUTPUTS = (
    ("grpo", Path("grpo") / "model"),
    ("sft", Path("sft") / "model"),
    ("recovery", Path("recovery") / "child"),
    ("fusion", Path("fusion") / "fused"),
    ("puzzle", Path("puzzle") / "child"),
)


def _stage_input(out: Path, stage: str, stages: list[str], parent: Path | None = None) -> Path:
    """The model a stage starts from: the output of the latest earlier stage that ran in this
    job, else the newest such output already on disk, else (for stages that do not need a
    compressed child, like SFT) the parent."""
    earlier = [(name, path) for name, path in _STAGE_OUTPUTS if STAGES.index(name) < STAGES.index(stage)]
    for name, path in earlier:
        if name in stages:
            return out / path
    for name, path in earlier:
        if (out / path).is_dir():
            log.info("%s: starting from %s (from an earlier run)", stage, out / path)
            return out / path
    if parent is not None:
        log.info("%s: no compressed child in %s, starting from the parent", stage, out)
        return parent
    raise CheckpointError(
        f"stage {stage!r} needs a compressed child: none of {[str(out / p) for _, p in earlier]} exists; "
        f"run the puzzle stage first (e.g. stages=[world,parent,puzzle,{stage}])"
    )


def _finish(out: Path, summary: dict) -> dict:
    write_json_atomic(out / "report.json", summary, default=str)
    return summary
