"""The Puzzle -> (FFN Fusion) -> NeMo import -> recovery -> toggle-SFT pipeline as one NeMo-Run
experiment (`nemo nemo_plugins pipeline ...`, recipes/nemo_pipeline.py), and `cli_main`, the
command line of the scripts in recipes/.

The jobs are the Puzzle tasks (`puzzle_tasks`) and the training recipes (`recipes`). The
entrypoint registers when this module is imported; `nemo_plugins.nemo.recipes` (the
`nemo_run.cli` entry point) imports it.
"""

import dataclasses
from typing import Optional

from . import require_nemo

llm = require_nemo("nemo.collections.llm")

import nemo_run as run  # noqa: E402

from .executors import GPUS_PER_H100_NODE, for_trainer, local_executor, with_container_image  # noqa: E402
from .puzzle_tasks import import_hf, puzzle_bld, puzzle_prepare, puzzle_score, puzzle_search  # noqa: E402
from .recipes import RecipeError, check_recipe, cpt_recipe, recovery_recipe, toggle_sft_recipe  # noqa: E402


# Every stage the pipeline can run, in order (the keys of `images`).
STAGE_NAMES = ("prepare", "bld", "score", "search", "import_parent", "import_child", "recovery", "sft")


@dataclasses.dataclass
class Stage:
    """One job of the pipeline experiment: the task, where it runs, and the jobs it waits for."""

    name: str
    task: run.Partial
    executor: run.Executor
    after: tuple[str, ...] = ()


def _sized(executor: run.Executor, nodes: int = 1, tasks_per_node: Optional[int] = None) -> run.Executor:
    """A copy of `executor` with `nodes` and `tasks_per_node` processes per node (default: one per
    GPU for Slurm and torchrun; 1 for single-process tasks)."""
    ex = executor.clone()
    if isinstance(ex, run.SlurmExecutor):
        ex.nodes = nodes
        if tasks_per_node is not None:  # srun starts them (each finds its rank in SLURM_PROCID)
            ex.ntasks_per_node, ex.launcher, ex.torchrun_nproc_per_node = tasks_per_node, None, None
    elif isinstance(ex, run.LocalExecutor):
        if nodes != 1:
            raise RecipeError(f"nodes={nodes}: a local executor runs one node")
        if tasks_per_node is not None:
            ex.ntasks_per_node = tasks_per_node
    return ex


def pipeline_stages(
    executor: run.Executor,
    work_dir: str = "/results/puzzle_pipeline",
    parent_size: str = "8b",
    preset: str = "tiny",
    puzzle_overrides: Optional[list[str]] = None,
    puzzle_nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    fusion: bool = False,
    recovery: str = "kd",
    recovery_data: Optional[list[str]] = None,
    recovery_steps: int = 19000,
    sft_data: Optional[list[str]] = None,
    sft_format: str = "nemotron",
    sft_steps: int = 2000,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    nodes: Optional[int] = None,
    container_image: Optional[str] = None,
    images: Optional[dict[str, str]] = None,
) -> list[Stage]:
    """The jobs of Puzzle -> (FFN Fusion) -> NeMo import -> recovery (KD or CPT) -> toggle SFT.

    prepare (world, parent, HF export) -> BLD shards -> scoring shards (puzzle_nodes x
    gpus_per_node processes each) -> search (MIP, child) -> import parent and child to NeMo ->
    recovery (recovery='kd' | 'cpt' | 'none', on recovery_data: Megatron-indexed dataset
    prefixes, required unless recovery='none') -> toggle SFT on sft_data (skipped without it).
    tp, pp and nodes set the training stages' layout (default: the table's for parent_size;
    required for sizes it has no row for, e.g. 405b). Everything lives under work_dir, which all
    nodes must share. Container images: every job runs in `container_image` (default: the
    executor's), except the stages named in `images` ({stage: image}, stage one of STAGE_NAMES),
    so that one experiment can mix images (e.g. NeMo-Aligner's for RL stages).
    """
    _check_images(images)
    if recovery not in ("kd", "cpt", "none"):
        raise RecipeError(f"recovery={recovery!r}: expected 'kd', 'cpt' or 'none'")
    if recovery != "none" and not recovery_data:
        raise RecipeError(
            f"recovery_data={recovery_data!r}: recovery={recovery!r} trains on real text: give "
            "recovery_data=['/results/data/mix_text_document', ...] (Megatron-indexed dataset prefixes), "
            "or recovery=none"
        )
    if not isinstance(puzzle_nodes, int) or puzzle_nodes < 1:
        raise RecipeError(f"puzzle_nodes={puzzle_nodes!r}: expected a positive integer")
    out = f"{work_dir}/outputs"
    overrides = [f"output_dir={out}", f"cache_dir={work_dir}/cache", "progress=false", *(puzzle_overrides or [])]
    kw = {"preset": preset, "overrides": overrides}
    one = _sized(executor, 1, 1)
    spread = _sized(executor, puzzle_nodes, gpus_per_node)
    parent_nemo, child_nemo = f"{work_dir}/nemo/parent", f"{work_dir}/nemo/child"
    child_hf = f"{out}/fusion/model" if fusion else f"{out}/puzzle/model"
    # the parent as the project's stages hand it over: parent.path itself, else the parent stage's model
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("parent.path=")]
    parent_hf = given[-1] if given else f"{out}/parent/model"
    stages = [
        Stage("prepare", run.Partial(puzzle_prepare, **kw), one),
        Stage("bld", run.Partial(puzzle_bld, **kw), spread, ("prepare",)),
        Stage("score", run.Partial(puzzle_score, **kw), spread, ("bld",)),
        Stage("search", run.Partial(puzzle_search, fusion=fusion, **kw), one, ("score",)),
        Stage("import_parent", run.Partial(import_hf, hf_dir=parent_hf, output=parent_nemo), one, ("prepare",)),
        Stage("import_child", run.Partial(import_hf, hf_dir=child_hf, output=child_nemo), one, ("search",)),
    ]
    start, after = child_nemo, ("import_child",)
    layout = {"parent_size": parent_size, "tp": tp, "pp": pp, "num_nodes": nodes}
    if recovery != "none":
        common = {"dir": f"{work_dir}/logs", "num_gpus_per_node": gpus_per_node, "data_paths": recovery_data,
                  "max_steps": recovery_steps, **layout}  # fmt: skip
        if recovery == "kd":
            task = recovery_recipe(student=child_nemo, teacher=parent_nemo, name="recovery", **common)
            after = ("import_parent", "import_child")
        else:
            task = cpt_recipe(child=child_nemo, name="recovery", **common)
        stages.append(Stage("recovery", task, for_trainer(executor, task), after))
        start, after = f"{work_dir}/logs/recovery", ("recovery",)
    if sft_data:
        task = toggle_sft_recipe(
            start=start, data_paths=sft_data, data_format=sft_format, dataset_root=f"{work_dir}/sft_data",
            dir=f"{work_dir}/logs", name="sft", num_gpus_per_node=gpus_per_node, max_steps=sft_steps, **layout,
        )  # fmt: skip
        stages.append(Stage("sft", task, for_trainer(executor, task), after))
    for s in stages:
        if s.task.__fn_or_cls__ in (llm.distill, llm.pretrain, llm.finetune):
            check_recipe(s.task)
        if s.name in (images or {}):
            s.executor = with_container_image(s.executor, images[s.name], key=f"images.{s.name}")
        elif container_image is not None:
            s.executor = with_container_image(s.executor, container_image)
    return stages


def _check_images(images) -> None:
    """`images` is None or {stage: image} with stages of STAGE_NAMES (each image checked where it is set)."""
    if images is None:
        return
    if not isinstance(images, dict):
        raise RecipeError(f"images={images!r}: expected a mapping of stage name to container image, e.g. "
                          "images={'recovery': 'nvcr.io/nvidia/nemo:25.04'}")  # fmt: skip
    for name in images:
        if name not in STAGE_NAMES:
            raise RecipeError(f"images.{name}={images[name]!r}: {name!r} is not a stage of the pipeline; "
                              f"expected one of {', '.join(STAGE_NAMES)}")  # fmt: skip


def add_stages(exp: run.Experiment, stages: list[Stage]) -> dict[str, str]:
    """Add the stages to an open experiment, each depending on its `after` jobs; {name: job id}."""
    ids: dict[str, str] = {}
    for s in stages:
        missing = [a for a in s.after if a not in ids]
        if missing:
            raise RecipeError(f"stage {s.name!r} waits for {missing[0]!r}, which is not added before it")
        ids[s.name] = exp.add(s.task, executor=s.executor, name=s.name, dependencies=[ids[a] for a in s.after])
    return ids


@run.cli.entrypoint(namespace="nemo_plugins", type="experiment")
def pipeline(
    ctx: run.cli.RunContext,
    work_dir: str = "/results/puzzle_pipeline",
    parent_size: str = "8b",
    preset: str = "tiny",
    puzzle_overrides: Optional[list[str]] = None,
    puzzle_nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    fusion: bool = False,
    recovery: str = "kd",
    recovery_data: Optional[list[str]] = None,
    recovery_steps: int = 19000,
    sft_data: Optional[list[str]] = None,
    sft_format: str = "nemotron",
    sft_steps: int = 2000,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    nodes: Optional[int] = None,
    container_image: Optional[str] = None,
    images: Optional[dict[str, str]] = None,
    title: str = "puzzle-pipeline",
):
    """The whole pipeline as one NeMo-Run experiment (see `pipeline_stages`); `--dryrun` prints
    every job's script instead of launching. tp=, pp=, nodes= set the training stages' layout
    (needed for a parent_size without a default, e.g. 405b). The executor comes from `executor=...` on the
    command line (e.g. run.executor=slurm_h100 run.executor.account=...), else local torchrun.
    container_image= sets every job's image, "images={'recovery': IMAGE}" one stage's."""
    executor = ctx.executor or local_executor(gpus_per_node)
    stages = pipeline_stages(
        executor, work_dir=work_dir, parent_size=parent_size, preset=preset, puzzle_overrides=puzzle_overrides,
        puzzle_nodes=puzzle_nodes, gpus_per_node=gpus_per_node, fusion=fusion, recovery=recovery,
        recovery_data=recovery_data, recovery_steps=recovery_steps, sft_data=sft_data, sft_format=sft_format,
        sft_steps=sft_steps, tp=tp, pp=pp, nodes=nodes, container_image=container_image, images=images,
    )  # fmt: skip
    if ctx.dryrun:
        print(describe_stages(stages))
    with run.Experiment(title, executor=executor) as exp:
        add_stages(exp, stages)
        ctx.launch(exp)
    return exp


def describe_stages(stages: list[Stage]) -> str:
    """One line per job: name, what it runs, nodes x processes, what it waits for, its container image."""
    lines = []
    for s in stages:
        ex = s.executor
        procs = getattr(ex, "torchrun_nproc_per_node", None) or getattr(ex, "ntasks_per_node", 1)
        target = getattr(s.task.__fn_or_cls__, "__name__", str(s.task.__fn_or_cls__))
        wait = ", ".join(s.after) or "-"
        nodes = getattr(ex, "nodes", 1)
        image = getattr(ex, "container_image", None) or "-"
        lines.append(f"{s.name:<14} {target:<16} {nodes} node(s) x {procs} process(es)  after: {wait}  image: {image}")
    return "\n".join(lines)


def cli_main(fn, default_factory=None) -> int:
    """`run.cli.main(fn, default_factory=...)` that returns the exit status: NeMo-Run's own
    returns nothing, so a script would exit 0 after a bad override."""
    import typer

    entry = fn.cli_entrypoint
    saved = entry.default_factory
    if default_factory is not None:
        entry.default_factory = default_factory
    try:
        app = typer.Typer(help=entry.help_str, pretty_exceptions_enable=False)
        entry._add_command(app, is_main=True)
        status = app(standalone_mode=False)
    finally:
        entry.default_factory = saved
    return status if isinstance(status, int) else 0
