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

from . import aligner_stages as A  # noqa: E402
from .executors import GPUS_PER_H100_NODE, for_trainer, local_executor, with_container_image  # noqa: E402
from .puzzle_tasks import export_hf, import_hf, puzzle_bld, puzzle_prepare, puzzle_score, puzzle_search  # noqa: E402
from .recipes import RecipeError, check_recipe, cpt_recipe, recovery_recipe, toggle_sft_recipe  # noqa: E402


# Every stage the pipeline can run, in order (the keys of `images`): the NeMo 2.7 stages, then the
# boundary (export to HF, convert to Aligner's .nemo) and the NeMo-Aligner RL stages.
NEMO_STAGE_NAMES = ("prepare", "bld", "score", "search", "import_parent", "import_child", "recovery", "sft", "export_hf")
STAGE_NAMES = (*NEMO_STAGE_NAMES, "to_aligner", *A.ALIGNER_STAGES)  # the last four run in aligner_image


@dataclasses.dataclass
class Stage:
    """One job of the pipeline experiment: the task, where it runs, and the jobs it waits for. An
    Aligner RL stage is a job group: [reward server, trainer] tasks with their executors."""

    name: str
    task: run.Partial | run.Script | list
    executor: run.Executor | list
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
    aligner: Optional[list[str]] = None,
    aligner_image: Optional[str] = None,
    aligner_from: str = "sft",
    aligner_nodes: int = 1,
    rl_prompts: Optional[list[str]] = None,
    rpo_prompts: Optional[str] = None,
    reward_prompts: Optional[list[str]] = None,
    reward_model: Optional[str] = None,
    aligner_overrides: Optional[dict[str, list[str]]] = None,
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

    `aligner` (a subset of grpo, rloo, rpo, run in that order) appends the NeMo-Aligner stages in
    `aligner_image` (see `aligner_stage_list`).
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
        start, after = f"{work_dir}/logs/sft", ("sft",)
    if aligner:
        if aligner_from == "parent":
            start, after = parent_hf, ("prepare",)
        elif aligner_from != "sft":
            raise RecipeError(f"aligner_from={aligner_from!r}: expected 'sft' (the last NeMo stage's model) or 'parent' "
                              "(RL before compression: Aligner's GPT model cannot hold a heterogeneous Puzzle child)")  # fmt: skip
        stages += aligner_stage_list(
            executor, aligner, aligner_image, work_dir, start, after, hf_ready=aligner_from == "parent",
            nodes=aligner_nodes, gpus_per_node=gpus_per_node, rl_prompts=rl_prompts, rpo_prompts=rpo_prompts,
            reward_prompts=reward_prompts, reward_model=reward_model, overrides=aligner_overrides,
        )  # fmt: skip
    for s in stages:
        if getattr(s.task, "__fn_or_cls__", None) in (llm.distill, llm.pretrain, llm.finetune):
            check_recipe(s.task)
        if s.name in A.ALIGNER_STAGES or s.name == "to_aligner":
            continue  # in aligner_image, set by aligner_stage_list
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
        if name in STAGE_NAMES and name not in NEMO_STAGE_NAMES:
            raise RecipeError(f"images.{name}={images[name]!r}: {name!r} runs in aligner_image (set aligner_image=IMAGE)")
        if name not in STAGE_NAMES:
            raise RecipeError(f"images.{name}={images[name]!r}: {name!r} is not a stage of the pipeline; "
                              f"expected one of {', '.join(NEMO_STAGE_NAMES)}")  # fmt: skip


def aligner_stage_list(
    executor: run.Executor,
    names: list[str],
    image: Optional[str],
    work_dir: str,
    start: str,
    after: tuple[str, ...],
    hf_ready: bool = False,
    nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    rl_prompts: Optional[list[str]] = None,
    rpo_prompts: Optional[str] = None,
    reward_prompts: Optional[list[str]] = None,
    reward_model: Optional[str] = None,
    overrides: Optional[dict[str, list[str]]] = None,
) -> list[Stage]:
    """The boundary and the NeMo-Aligner stages `names` (in the order grpo, rloo, rpo), each one
    starting from the previous one's `.nemo`.

    export_hf (NeMo 2.7 image: `start`, a NeMo 2 checkpoint or log dir, to a HF directory; skipped
    when `hf_ready`, i.e. `start` is one already) -> to_aligner (`nemo_plugins.aligner.to_nemo`:
    NeMo's convert_llama_hf_to_nemo.py; refuses a heterogeneous model, naming the routes) -> grpo ->
    rloo -> rpo, each a [reward server, trainer] job group in `image`. GRPO and RLOO train on
    `rl_prompts` (Aligner prompt JSONL, `nemo_plugins.aligner.prompt_set`) with the rule server over
    `reward_prompts` (the project's prompt JSONL they were rendered from) and the HF directory's
    tokenizer; online RPO samples `rpo_prompts` and is scored by `reward_model` (a reward-model
    `.nemo`, Aligner's serve_reward_model.py) or, without one, by the rule server. `overrides`
    ({stage: [key=value, ...]}) go to a stage's trainer (Hydra) or driver.
    """
    A.check_slurm(executor)
    names = list(names)
    unknown = [n for n in names if n not in A.ALIGNER_STAGES]
    if unknown or not names or len(set(names)) != len(names):
        raise RecipeError(f"aligner={names!r}: expected distinct stages of {', '.join(A.ALIGNER_STAGES)} (e.g. ['grpo', 'rloo', 'rpo'])")
    if image is None:
        raise RecipeError("aligner_image is not set: the Aligner stages run in their own image (docker/aligner.Dockerfile), "
                          "e.g. aligner_image=registry/nemo_plugins-aligner:0.7.0")  # fmt: skip
    bad_keys = sorted(set(overrides or {}) - set(names))
    if bad_keys:
        raise RecipeError(f"aligner_overrides.{bad_keys[0]}: not one of the stages run ({', '.join(names)})")
    needs_rl = [n for n in names if n in ("grpo", "rloo")]
    if needs_rl and not rl_prompts:
        raise RecipeError(f"rl_prompts is not set: {needs_rl[0]} trains on Aligner prompt JSONL files, e.g. "
                          "rl_prompts=['/results/aligner/prompts.jsonl'] (python -m nemo_plugins.aligner.prompt_set)")  # fmt: skip
    if "rpo" in names and not rpo_prompts:
        raise RecipeError("rpo_prompts is not set: online RPO samples the prompts of an Aligner prompt JSONL, e.g. "
                          "rpo_prompts=/results/aligner/chat_prompts.jsonl")  # fmt: skip
    if (needs_rl or ("rpo" in names and not reward_model)) and not reward_prompts:
        raise RecipeError("reward_prompts is not set: the rule reward server scores against the project's prompt JSONL "
                          "(the files rl_prompts were rendered from), e.g. reward_prompts=['/results/data/rl_prompts.jsonl']")  # fmt: skip
    root = f"{work_dir}/aligner"
    hf = start if hf_ready else f"{work_dir}/hf/policy"
    one = _sized(executor, 1, 1)
    stages = []
    if not hf_ready:
        stages.append(Stage("export_hf", run.Partial(export_hf, nemo_path=start, output=hf), one, after))
        after = ("export_hf",)
    policy = f"{root}/policy.nemo"
    convert = run.Script(inline=f"python -m nemo_plugins.aligner.to_nemo hf_dir={hf} out={policy}\n")
    stages.append(Stage("to_aligner", convert, with_container_image(one, image, key="aligner_image"), after))
    after = ("to_aligner",)
    rule = A.RewardServer("rule", tuple(reward_prompts or ()), hf) if reward_prompts else None
    for name in A.ALIGNER_STAGES:
        if name not in names:
            continue
        stage_dir, extra = f"{root}/{name}", (overrides or {}).get(name)
        if name == "rpo":
            server = A.RewardServer("model", model=reward_model) if reward_model else rule
            trainer = A.rpo_command(policy, rpo_prompts, stage_dir, gpus_per_node, server.port, extra)
            executors = A.server_and_trainer_executors(executor, image, server, 1, gpus_per_node, trainer_tasks=1)
            next_policy = A.rpo_policy(stage_dir)
        else:
            server = rule
            trainer = A.reinforce_command(name, policy, list(rl_prompts), stage_dir, nodes, gpus_per_node, server.port,
                                          overrides=extra)  # fmt: skip
            executors = A.server_and_trainer_executors(executor, image, server, nodes, gpus_per_node)
            next_policy = A.trained_policy(stage_dir)
        stages.append(Stage(name, A.server_and_trainer_tasks(server, stage_dir, trainer), executors, after))
        policy, after = next_policy, (name,)
    return stages


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
    aligner: Optional[list[str]] = None,
    aligner_image: Optional[str] = None,
    aligner_from: str = "sft",
    aligner_nodes: int = 1,
    rl_prompts: Optional[list[str]] = None,
    rpo_prompts: Optional[str] = None,
    reward_prompts: Optional[list[str]] = None,
    reward_model: Optional[str] = None,
    aligner_overrides: Optional[dict[str, list[str]]] = None,
    title: str = "puzzle-pipeline",
):
    """The whole pipeline as one NeMo-Run experiment (see `pipeline_stages`); `--dryrun` prints
    every job's script instead of launching. tp=, pp=, nodes= set the training stages' layout
    (needed for a parent_size without a default, e.g. 405b). The executor comes from `executor=...` on the
    command line (e.g. run.executor=slurm_h100 run.executor.account=...), else local torchrun.
    container_image= sets every job's image, "images={'recovery': IMAGE}" one stage's.
    "aligner=['grpo','rloo','rpo']" aligner_image=IMAGE appends the NeMo-Aligner stages (`aligner_stage_list`)."""
    executor = ctx.executor or local_executor(gpus_per_node)
    stages = pipeline_stages(
        executor, work_dir=work_dir, parent_size=parent_size, preset=preset, puzzle_overrides=puzzle_overrides,
        puzzle_nodes=puzzle_nodes, gpus_per_node=gpus_per_node, fusion=fusion, recovery=recovery,
        recovery_data=recovery_data, recovery_steps=recovery_steps, sft_data=sft_data, sft_format=sft_format,
        sft_steps=sft_steps, tp=tp, pp=pp, nodes=nodes, container_image=container_image, images=images,
        aligner=aligner, aligner_image=aligner_image, aligner_from=aligner_from, aligner_nodes=aligner_nodes,
        rl_prompts=rl_prompts, rpo_prompts=rpo_prompts, reward_prompts=reward_prompts, reward_model=reward_model,
        aligner_overrides=aligner_overrides,
    )  # fmt: skip
    if ctx.dryrun:
        print(describe_stages(stages))
    with run.Experiment(title, executor=executor) as exp:
        add_stages(exp, stages)
        ctx.launch(exp)
    return exp



@run.cli.entrypoint(namespace="nemo_plugins", type="experiment")
def aligner_rl(
    ctx: run.cli.RunContext,
    start: str = "",
    start_is_hf: bool = False,
    stages: Optional[list[str]] = None,
    work_dir: str = "/results/aligner_rl",
    aligner_image: Optional[str] = None,
    nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    rl_prompts: Optional[list[str]] = None,
    rpo_prompts: Optional[str] = None,
    reward_prompts: Optional[list[str]] = None,
    reward_model: Optional[str] = None,
    aligner_overrides: Optional[dict[str, list[str]]] = None,
    title: str = "aligner-rl",
):
    """The NeMo-Aligner stages alone (default grpo, rloo, rpo) from `start`: a NeMo 2 checkpoint or
    log dir of the NeMo 2.7 stages (exported to HF first), or with start_is_hf=true a HF directory
    (e.g. the parent, for RL before compression). Needs run.executor=slurm_h100 (the reward server
    is a second task of each stage's allocation); `--dryrun` prints every sbatch script."""
    if not start:
        raise RecipeError("start is not set: expected a NeMo 2 checkpoint or log dir (start=/results/p/logs/sft), "
                          "or a HF directory with start_is_hf=true")  # fmt: skip
    executor = ctx.executor or local_executor(gpus_per_node)
    stage_list = aligner_stage_list(
        executor, stages or list(A.ALIGNER_STAGES), aligner_image, work_dir, start, (), hf_ready=start_is_hf,
        nodes=nodes, gpus_per_node=gpus_per_node, rl_prompts=rl_prompts, rpo_prompts=rpo_prompts,
        reward_prompts=reward_prompts, reward_model=reward_model, overrides=aligner_overrides,
    )  # fmt: skip
    if ctx.dryrun:
        print(describe_stages(stage_list))
    with run.Experiment(title, executor=executor) as exp:
        add_stages(exp, stage_list)
        ctx.launch(exp)
    return exp

def describe_stages(stages: list[Stage]) -> str:
    """One line per job (per task of a job group): name, what it runs, nodes x processes, what it
    waits for, its container image; a shell task's commands below it."""
    lines = []
    for s in stages:
        tasks = s.task if isinstance(s.task, list) else [s.task]
        executors = s.executor if isinstance(s.executor, list) else [s.executor] * len(tasks)
        wait = ", ".join(s.after) or "-"
        for i, (task, ex) in enumerate(zip(tasks, executors)):
            procs = getattr(ex, "torchrun_nproc_per_node", None) or getattr(ex, "ntasks_per_node", 1)
            fn = getattr(task, "__fn_or_cls__", None)
            target = getattr(fn, "__name__", str(fn)) if fn is not None else _script_target(task)
            nodes = getattr(ex, "nodes", 1)
            image = getattr(ex, "container_image", None) or "-"
            name = s.name if i == 0 else f"  +{s.name}"
            lines.append(f"{name:<14} {target:<16} {nodes} node(s) x {procs} process(es)  after: {wait}  image: {image}")
            if fn is None:  # a shell task: the sbatch script runs it from a file, so show its lines here
                lines += [f"    $ {line}" for line in (task.inline or "").strip().splitlines()]
    return "\n".join(lines)


def _script_target(script) -> str:
    """What a run.Script runs (its python module or script), for the dry-run listing."""
    words = (script.inline or script.path or "").split()
    for i, w in enumerate(words[:-1]):
        if w == "python":
            nxt = words[i + 1]
            if nxt == "-m" and i + 2 < len(words):
                return words[i + 2].rsplit(".", 1)[-1]
            return nxt.rsplit("/", 1)[-1]
    return "script"


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
