"""NeMo-Run training recipes for the stages users run at scale, with their building blocks.

Factories (registered on import; `nemo llm <fn> --factory <name> key=value` finds them once the
`nemo_run.cli` entry point loads this module):

    puzzle_recovery    llm.distill    recovery KD of a Puzzle child (student) from its parent (teacher)
    puzzle_cpt         llm.pretrain   continued pretraining of the child
    puzzle_toggle_sft  llm.finetune   reasoning-toggle SFT ("detailed thinking on/off" chat data)

The entry point names this module only, so it imports the other NeMo-Run modules at its end,
which registers their entrypoints and factories too: `puzzle_tasks` (the Puzzle tasks
`nemo nemo_plugins puzzle_<task>` and their `h100_preset` factories) and `pipeline` (the
experiment chaining everything, `nemo nemo_plugins pipeline`, and `cli_main` for recipes/*.py).

Paths default to a mount convention inside the container: parent/child NeMo checkpoints under
/checkpoints, data under /data. Training uses MegatronStrategy with the TP/PP of the parent's
size (executors.PARALLELISM), bf16-mixed, distributed Adam with a cosine schedule.

On that path a recipe of these factories is checked once every `key=value` override is applied
and before the dry run or launch (`RecipeRunContext`, installed on NeMo's training entrypoints):
strategy keys, parallel sizes against the trainer's GPUs, the executor against the trainer.

Values that exist only on the cluster (the newest checkpoint of an earlier stage, the KD config
file) are `run.Config`s of small functions here, resolved when the job builds its config.
"""

import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

from . import require_nemo

llm = require_nemo("nemo.collections.llm")

import nemo_run as run  # noqa: E402
from lightning.pytorch import LightningModule  # noqa: E402
from megatron.core.distributed import DistributedDataParallelConfig  # noqa: E402
from nemo import lightning as nl  # noqa: E402
from nemo.collections.llm.recipes.optim.adam import distributed_fused_adam_with_cosine_annealing  # noqa: E402

from .data import TextDataModule, ToggleChatDataModule  # noqa: E402
from .executors import (  # noqa: E402
    GPUS_PER_H100_NODE, Parallelism, check_fits_trainer, check_parallelism, parallelism_for,
)  # fmt: skip

CHECKPOINTS = "/checkpoints"
DATA = "/data"


class RecipeError(ValueError):
    """A recipe setting that cannot work (names the field, its value and what is expected)."""


# ============================================================================ building blocks


def mixed_precision(precision: str = "bf16-mixed", params_dtype: str = "bfloat16", grad_reduce_in_fp32: bool = True):
    """NeMo's bf16-mixed Megatron precision plugin (as its `bf16_mixed` recipe), with dtypes by
    name so that the recipe's YAML reads back (NeMo-Run 0.11 cannot read a torch.dtype back)."""
    dtype = getattr(torch, params_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise RecipeError(f"params_dtype={params_dtype!r}: expected a torch dtype name such as 'bfloat16'")
    return nl.MegatronMixedPrecision(
        precision=precision, params_dtype=dtype, pipeline_dtype=dtype, autocast_enabled=False,
        grad_reduce_in_fp32=grad_reduce_in_fp32,
    )  # fmt: skip


def trainer(
    layout: Parallelism,
    num_gpus_per_node: int = GPUS_PER_H100_NODE,
    max_steps: int = 1000,
    val_check_interval: int = 500,
    limit_val_batches: int = 32,
) -> run.Config[nl.Trainer]:
    """Megatron trainer for `layout`: bf16-mixed, distributed-optimizer DDP with overlapped
    gradient reduce / parameter gather (as NeMo's Llama recipes)."""
    check_parallelism(layout, num_gpus_per_node)
    strategy = run.Config(
        nl.MegatronStrategy,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=None,  # taken from the precision plugin (bf16)
        virtual_pipeline_model_parallel_size=layout.vp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sp and layout.tp > 1,
        gradient_as_bucket_view=True,
        ckpt_async_save=False,  # NeMo 2.7.3's async save needs a strategy megatron-core 0.16 removed
        ckpt_parallel_load=True,
        ddp=run.Config(
            DistributedDataParallelConfig, check_for_nan_in_grad=True, grad_reduce_in_fp32=True,
            overlap_grad_reduce=True, overlap_param_gather=True, average_in_collective=True,
        ),
    )  # fmt: skip
    return run.Config(
        nl.Trainer,
        accelerator="gpu",
        # a string: NeMo-Run 0.11 reads `devices` back from YAML as str (Lightning's annotation
        # lists str before int), and Lightning takes "8" as 8 GPUs
        devices=str(num_gpus_per_node),
        num_nodes=layout.nodes,
        max_steps=max_steps,
        val_check_interval=val_check_interval,
        limit_val_batches=limit_val_batches,
        log_every_n_steps=10,
        accumulate_grad_batches=1,
        plugins=run.Config(mixed_precision),
        strategy=strategy,
        use_distributed_sampler=False,
    )  # no callbacks list: NeMo-Run 0.11's YAML reader cannot read a list of configs back


def optimizer(lr: float, min_lr: float, warmup_steps: int, weight_decay: float = 0.01, clip_grad: float = 1.0):
    """Distributed Adam (0.9, 0.95) with warmup then cosine decay to `min_lr` (NeMo's recipe, set up
    through `optim.MegatronOptimizer`, which starts with the pinned megatron-core)."""
    import fiddle as fdl

    from .optim import MegatronOptimizer

    opt = distributed_fused_adam_with_cosine_annealing(
        max_lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, clip_grad=clip_grad
    )
    fdl.update_callable(opt, MegatronOptimizer)
    opt.config.weight_decay = weight_decay
    return opt


def logger(dir: Optional[str], name: str, every_n_train_steps: int) -> run.Config[nl.NeMoLogger]:
    """Logs and checkpoints under dir/name (NeMo's default ./nemo_experiments when dir is None;
    under NeMo-Run on Slurm that is the job directory, which persists)."""
    ckpt = run.Config(
        nl.ModelCheckpoint, save_last="link", save_top_k=2, every_n_train_steps=every_n_train_steps,
        filename="{model_name}--{val_loss:.2f}-{step}-{consumed_samples}",
    )  # fmt: skip
    return run.Config(nl.NeMoLogger, ckpt=ckpt, name=name, log_dir=dir)


def restore_from(path) -> run.Config[nl.AutoResume]:
    """Start from the weights at `path` (a NeMo checkpoint, or a log dir: its newest checkpoint);
    a requeued job resumes from its own newest checkpoint instead."""
    return run.Config(
        nl.AutoResume,
        restore_config=run.Config(nl.RestoreConfig, path=run.Config(resolve_checkpoint, path=path)),
        resume_if_exists=True,
        resume_ignore_no_checkpoint=True,
    )


def text_data(paths: Optional[list], seq_length: int, global_batch_size: int, micro_batch_size: int, tokenizer,
              mock: bool = False):  # fmt: skip
    """Megatron-indexed text (`TextDataModule`; `paths`: dataset prefixes, optionally weighted), or NeMo's mock
    data (random tokens) only with `mock=True`: no data is an error, never a silent smoke test.
    `tokenizer` is given even for mock data, whose default would be downloaded."""
    _check_data(paths, mock, "Megatron-indexed dataset prefixes, e.g. data_paths=['/data/mix_text_document']")
    if mock:
        return run.Config(llm.MockDataModule, seq_length=seq_length, global_batch_size=global_batch_size,
                          micro_batch_size=micro_batch_size, tokenizer=tokenizer)  # fmt: skip
    return run.Config(
        TextDataModule, paths=[str(p) for p in paths], seq_length=seq_length, global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size, tokenizer=tokenizer, split="998,1,1",
    )  # fmt: skip


def _check_data(paths, mock: bool, expected: str) -> None:
    if mock not in (True, False):
        raise RecipeError(f"mock={mock!r}: expected True or False")
    if isinstance(paths, str):
        raise RecipeError(f"data_paths={paths!r}: expected a list ({expected})")
    if mock and paths:
        raise RecipeError(f"data_paths={list(paths)!r} with mock=True: give real data or mock=True, not both")
    if not mock and not paths:
        raise RecipeError(
            f"data_paths={paths!r}: training needs data: {expected}; mock=True trains on random tokens "
            "(smoke tests only)"
        )


def _layout(parent_size, num_nodes, tp, pp, cp, num_gpus_per_node) -> Parallelism:
    layout = parallelism_for(parent_size, tp=tp, pp=pp, cp=cp, nodes=num_nodes)
    check_parallelism(layout, num_gpus_per_node)
    return layout


def _check_batch(layout: Parallelism, num_gpus_per_node: int, global_batch_size: int, micro_batch_size: int) -> None:
    dp = layout.nodes * num_gpus_per_node // layout.model_parallel_gpus
    if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp):
        raise RecipeError(
            f"global_batch_size={global_batch_size}: expected a multiple of micro_batch_size ({micro_batch_size}) x "
            f"data-parallel size ({dp} = {layout.nodes} nodes x {num_gpus_per_node} GPUs / tp*pp*cp "
            f"{layout.model_parallel_gpus})"
        )


def check_recipe(recipe: run.Partial) -> None:
    """Consistency of a built (and possibly overridden) training recipe: the strategy knows every
    key it is given, the parallel layout tiles the trainer's GPUs and the batch sizes divide.
    Raises RecipeError naming the fields."""
    tr, st, data = recipe.trainer, recipe.trainer.strategy, recipe.data
    check_strategy_keys(st)
    try:
        devices = int(tr.devices)
    except (TypeError, ValueError):
        raise RecipeError(f"trainer.devices={tr.devices!r}: expected a GPU count per node") from None
    layout = Parallelism(
        tp=st.tensor_model_parallel_size, pp=st.pipeline_model_parallel_size, cp=st.context_parallel_size,
        nodes=tr.num_nodes,
    )  # fmt: skip
    try:
        check_parallelism(layout, devices)
    except ValueError as e:
        keys = ", ".join(f"trainer.{k}={v!r}" for k, v in (
            ("strategy.tensor_model_parallel_size", layout.tp), ("strategy.pipeline_model_parallel_size", layout.pp),
            ("strategy.context_parallel_size", layout.cp), ("num_nodes", layout.nodes), ("devices", tr.devices),
        ))  # fmt: skip
        raise RecipeError(f"trainer: {e} (from {keys})") from None
    _check_batch(layout, devices, data.global_batch_size, data.micro_batch_size)


def check_strategy_keys(strategy) -> None:
    """Raise RecipeError for a key of the trainer's strategy config that the strategy does not
    take. MegatronStrategy has **kwargs (on to torch's DistributedDataParallel), so fiddle and
    NeMo-Run accept a misspelt key, which would fail only once the job starts on the cluster."""
    fn = getattr(strategy, "__fn_or_cls__", None)
    if fn is None:
        raise RecipeError(f"trainer.strategy={strategy!r}: expected a MegatronStrategy config")
    names = _parameters(fn)
    for key, value in strategy.__arguments__.items():
        if key not in names:
            raise RecipeError(
                f"trainer.strategy.{key}={value!r}: {_type_name(fn)} has no parameter {key!r}; expected one of "
                f"its parameters{_did_you_mean(key, names)}"
            )


def _did_you_mean(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def apply_overrides(recipe, overrides: list[str]):
    """A copy of `recipe` with `key=value` overrides applied by NeMo-Run's CLI parser (dotted keys,
    typed values: what `nemo llm <fn> --factory name key=value` accepts). A bad override raises
    RecipeError naming it: an unknown key (also one that NeMo-Run would let through a **kwargs,
    e.g. a misspelt MegatronStrategy field) with the names it could be, or a value that does not
    parse as the parameter's type."""
    import copy

    from nemo_run.cli.cli_parser import CLIException

    out = copy.deepcopy(recipe)
    quiet = logging.getLogger("nemo_run.cli.cli_parser")
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.strip().rstrip("+-*/|&")  # NeMo-Run also takes key+=value and the like
        if not sep or not key:
            raise RecipeError(f"override {arg!r}: expected key=value, e.g. trainer.max_steps=100")
        parts, node = key.split("."), out
        for part in parts[:-1]:
            node = getattr(node, part, None)
        fn = getattr(node, "__fn_or_cls__", None)
        if fn is None:
            where = ".".join(parts[:-1])
            raise RecipeError(f"override {arg!r}: unknown key {key!r} (nothing configurable at {where!r})")
        names = _parameters(fn)
        if parts[-1] not in names:
            raise RecipeError(
                f"override {arg!r}: unknown key {key!r} ({_type_name(fn)} has no parameter {parts[-1]!r})"
                f"{_did_you_mean(parts[-1], names)}"
            )
        was_disabled, quiet.disabled = quiet.disabled, True  # NeMo-Run logs every failure at length
        try:
            run.cli.parse_cli_args(out, [arg])
        except CLIException:
            expected = _parameters(fn)[parts[-1]].annotation
            raise RecipeError(
                f"override {arg!r}: {value.strip()!r} is not a valid {_type_name(expected)} for {key!r}"
            ) from None
        finally:
            quiet.disabled = was_disabled
    return out


def _parameters(fn) -> dict:
    """{name: inspect.Parameter} of a function, or of a class's __init__ along its MRO (where
    **kwargs go); the most derived definition wins. A Lightning DDPStrategy (MegatronStrategy)
    also takes the arguments of torch's DistributedDataParallel, where its **kwargs end up
    (e.g. gradient_as_bucket_view)."""
    import inspect

    from lightning.pytorch.strategies import DDPStrategy

    inits = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    if inspect.isclass(fn) and issubclass(fn, DDPStrategy):
        inits.append(torch.nn.parallel.DistributedDataParallel.__init__)
    out: dict = {}
    for init in inits:
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                out.setdefault(p.name, p)
    return out


def _type_name(t) -> str:
    import inspect

    if t is inspect.Parameter.empty:
        return "value"
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


# ============================================================================ resolved on the cluster


def write_distillation_config(
    path: Optional[str] = None,
    logit_layers: Optional[list[str]] = None,
    intermediate_layer_pairs: Optional[list[list[str]]] = None,
    skip_lm_loss: bool = True,
    kd_loss_scale: float = 1.0,
) -> str:
    """Write the YAML that `llm.distill` reads (NeMo's DistillationConfig fields); returns its path.

    Logits KL always; each (student, teacher) module pair in `intermediate_layer_pairs` adds a
    cosine loss on its outputs (they must sit on the last pipeline stage, e.g.
    decoder.final_layernorm). Without `path` the file goes to a fresh temporary directory, one per
    process, so concurrent ranks never share a half-written file.
    """
    import tempfile

    import yaml

    logit_layers = list(logit_layers or ("output_layer", "output_layer"))
    pairs = [list(p) for p in (intermediate_layer_pairs or [])]
    bad = [p for p in pairs if len(p) != 2 or not all(isinstance(x, str) and x for x in p)]
    if bad or len(logit_layers) != 2:
        raise RecipeError(
            f"distillation config: intermediate_layer_pairs={intermediate_layer_pairs!r}, "
            f"logit_layers={logit_layers!r}: expected pairs of (student module, teacher module) names"
        )
    if kd_loss_scale <= 0:
        raise RecipeError(f"distillation config: kd_loss_scale={kd_loss_scale}: expected a positive number")
    cfg = {"logit_layers": list(logit_layers), "intermediate_layer_pairs": pairs, "skip_lm_loss": bool(skip_lm_loss),
           "kd_loss_scale": float(kd_loss_scale)}  # fmt: skip
    target = Path(path) if path else Path(tempfile.mkdtemp(prefix="nemo_plugins_kd_")) / "distillation.yaml"
    from ..utils.atomic import write_text_atomic

    write_text_atomic(target, yaml.safe_dump(cfg, sort_keys=False))
    return str(target)


def _is_checkpoint(p: Path) -> bool:
    return (p / "context").is_dir() and (p / "weights").is_dir()


def resolve_checkpoint(path: str) -> str:
    """`path` when it is a NeMo 2 checkpoint (context/ + weights/); else the newest checkpoint
    below it (e.g. an earlier stage's log dir), preferring NeMo's `*-last` ones."""
    root = Path(path)
    if _is_checkpoint(root):
        return str(root)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no such directory")
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        for d in list(dirnames):
            cand = Path(dirpath) / d
            if _is_checkpoint(cand):
                found.append(cand)
                dirnames.remove(d)  # do not walk into a checkpoint's weights
    if not found:
        raise FileNotFoundError(
            f"checkpoint {path}: no NeMo checkpoint (a directory with context/ and weights/) below it"
        )
    last = [c for c in found if c.name.endswith("-last")]
    return str(max(last or found, key=lambda c: c.stat().st_mtime))


def resolve_teacher(path: str) -> str:
    """`resolve_checkpoint` for the KD teacher. A function of its own because NeMo-Run 0.11's YAML
    reader turns two configs of one function at the same level into one shared object."""
    return resolve_checkpoint(path)


def _instantiate(node, memo: Optional[dict] = None):
    """Build a config tree read from a checkpoint's context (`io.load_context(..., build=False)`)
    by calling its functions and classes directly.

    Not `fdl.build`: these helpers run while NeMo-Run's job runner (or `nemo llm ... --factory`)
    builds the whole recipe, and fiddle forbids a build inside another. A node shared by several
    parents is built once, as `fdl.build` does.
    """
    import functools

    import fiddle as fdl

    memo = {} if memo is None else memo
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, fdl.Buildable):
        args = {name: _instantiate(value, memo) for name, value in node.__arguments__.items()}
        fn = node.__fn_or_cls__
        out = functools.partial(fn, **args) if isinstance(node, fdl.Partial) else fn(**args)
    elif type(node) in (list, tuple):
        out = type(node)(_instantiate(v, memo) for v in node)
    elif type(node) is dict:
        out = {k: _instantiate(v, memo) for k, v in node.items()}
    else:
        return node
    memo[key] = out
    return out


def _checkpoint_context(path: str, subpath: str):
    """The unbuilt config of `subpath` in the NeMo checkpoint at `path` (or the newest below it),
    with its artifacts (the tokenizer directory) resolved into the checkpoint."""
    from nemo.lightning import io
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir

    ckpt = resolve_checkpoint(path)
    context = ckpt_to_context_subdir(ckpt)
    if not (Path(context) / "io.json").is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no context/io.json (not a NeMo 2 checkpoint?)")
    cfg = io.load_context(context, subpath=subpath, build=False)
    if cfg is None or getattr(cfg, "__fn_or_cls__", None) is io.TrainerContext:
        raise FileNotFoundError(f"checkpoint {ckpt}: its context holds no {subpath!r}")
    return cfg


def load_model(path: str, seq_length: Optional[int] = None):
    """The model class, config and tokenizer stored in a NeMo checkpoint (weights come from the
    resume config), with the training sequence length. Read from the checkpoint's context
    without a nested `fdl.build`, so it works inside the job runner's build of the recipe."""
    model = _instantiate(_checkpoint_context(path, "model"))
    if seq_length:
        model.config.seq_length = seq_length
    return model


def checkpoint_tokenizer(path: str):
    """The tokenizer stored in a NeMo checkpoint (for data modules that need their own); read
    without a nested `fdl.build`, as `load_model`."""
    return _instantiate(_checkpoint_context(path, "model.tokenizer"))


# ============================================================================ model factory


@run.cli.factory(name="puzzle_child")
def puzzle_child(
    config: str, tensor_model_parallel_size: int = 1, seq_length: Optional[int] = None
) -> run.Config[LightningModule]:
    """`PuzzleChildModel` of the architecture in `config` (a model directory, or its config.json /
    nemo_plugins_config.json), e.g. `nemo llm import model="puzzle_child(config='/models/child')"
    source=hf:///models/child`. The model config names the file (`arch_path`), so it goes through
    NeMo-Run's YAML (`--to-yaml`, `--yaml`) and back unchanged."""
    from ..model.checkpoint import config_file
    from .model import PuzzleChildConfig, PuzzleChildModel

    path = config_file(config)
    if not path.is_file():
        raise RecipeError(
            f"puzzle_child: config={config!r}: expected a model directory or its config file (config.json or "
            f"nemo_plugins_config.json); {path} does not exist"
        )
    extra = {} if seq_length is None else {"seq_length": seq_length}
    cfg = run.Config(PuzzleChildConfig, arch_path=str(path), tensor_model_parallel_size=tensor_model_parallel_size,
                     **extra)  # fmt: skip
    return run.Config(PuzzleChildModel, config=cfg)


# ============================================================================ training factories


@run.cli.factory(target=llm.distill, name="puzzle_recovery")
def recovery_recipe(
    student: str = f"{CHECKPOINTS}/child",
    teacher: str = f"{CHECKPOINTS}/parent",
    data_paths: Optional[list[str]] = None,
    dir: Optional[str] = None,
    name: str = "recovery",
    parent_size: str = "70b",
    num_nodes: Optional[int] = None,
    num_gpus_per_node: int = GPUS_PER_H100_NODE,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    cp: Optional[int] = None,
    seq_length: int = 8192,
    global_batch_size: int = 256,
    micro_batch_size: int = 1,
    max_steps: int = 19000,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 200,
    hidden_cosine: bool = False,
    kd_loss_scale: float = 1.0,
    mock: bool = False,
) -> run.Partial:
    """Recovery distillation of a Puzzle child from its parent (`llm.distill`).

    student/teacher: NeMo 2 checkpoints (import them from HF with `import_hf`); they may differ
    in every layer. Loss: KL on logits (LM loss skipped, as the paper found it hurt), plus a cosine
    loss on the final hidden states with hidden_cosine=True. Defaults: lr 1e-4 cosine to 1e-5,
    weight decay 0.01, clip 1.0 (conf/recovery/tiny.yaml); 19k steps x 256 x 8192 tokens is
    ~40B tokens, the KD budget the Llama-Nemotron report gives for LN-Super. data_paths
    (Megatron-indexed dataset prefixes) is required; mock=True trains on random tokens instead
    (smoke tests only).
    """
    layout = _layout(parent_size, num_nodes, tp, pp, cp, num_gpus_per_node)
    _check_batch(layout, num_gpus_per_node, global_batch_size, micro_batch_size)
    pairs = [["decoder.final_layernorm", "decoder.final_layernorm"]] if hidden_cosine else None
    val_every = min(500, max_steps)
    tokenizer = run.Config(checkpoint_tokenizer, path=student)  # teacher and student share it
    return run.Partial(
        llm.distill,
        student_model_path=run.Config(resolve_checkpoint, path=student),
        teacher_model_path=run.Config(resolve_teacher, path=teacher),
        data=text_data(data_paths, seq_length, global_batch_size, micro_batch_size, tokenizer=tokenizer, mock=mock),
        trainer=trainer(layout, num_gpus_per_node, max_steps, val_every),
        distillation_config_path=run.Config(
            write_distillation_config, intermediate_layer_pairs=pairs, skip_lm_loss=True, kd_loss_scale=kd_loss_scale
        ),
        log=logger(dir, name, val_every),
        resume=run.Config(nl.AutoResume, resume_if_exists=True, resume_ignore_no_checkpoint=True),
        optim=optimizer(lr, min_lr, warmup_steps),
    )


@run.cli.factory(target=llm.pretrain, name="puzzle_cpt")
def cpt_recipe(
    child: str = f"{CHECKPOINTS}/child",
    data_paths: Optional[list[str]] = None,
    dir: Optional[str] = None,
    name: str = "cpt",
    parent_size: str = "70b",
    num_nodes: Optional[int] = None,
    num_gpus_per_node: int = GPUS_PER_H100_NODE,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    cp: Optional[int] = None,
    seq_length: int = 8192,
    global_batch_size: int = 256,
    micro_batch_size: int = 1,
    max_steps: int = 19000,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 200,
    mock: bool = False,
) -> run.Partial:
    """Continued pretraining of a Puzzle child on the LM loss (`llm.pretrain`), starting from
    its NeMo checkpoint (or the newest checkpoint below a log dir). Same schedule as recovery,
    the comparison the project's recovery stage makes (recovery.loss.mode=cpt). data_paths
    (Megatron-indexed dataset prefixes) is required; mock=True trains on random tokens instead."""
    layout = _layout(parent_size, num_nodes, tp, pp, cp, num_gpus_per_node)
    _check_batch(layout, num_gpus_per_node, global_batch_size, micro_batch_size)
    val_every = min(500, max_steps)
    tokenizer = run.Config(checkpoint_tokenizer, path=child)  # llm.pretrain takes the data's tokenizer
    return run.Partial(
        llm.pretrain,
        model=run.Config(load_model, path=child, seq_length=seq_length),
        data=text_data(data_paths, seq_length, global_batch_size, micro_batch_size, tokenizer=tokenizer, mock=mock),
        trainer=trainer(layout, num_gpus_per_node, max_steps, val_every),
        log=logger(dir, name, val_every),
        resume=restore_from(child),
        optim=optimizer(lr, min_lr, warmup_steps),
    )


@run.cli.factory(target=llm.finetune, name="puzzle_toggle_sft")
def toggle_sft_recipe(
    start: str = f"{CHECKPOINTS}/child",
    data_paths: Optional[list[str]] = None,
    data_format: str = "nemotron",
    dataset_root: Optional[str] = None,
    dir: Optional[str] = None,
    name: str = "toggle_sft",
    parent_size: str = "70b",
    num_nodes: Optional[int] = None,
    num_gpus_per_node: int = GPUS_PER_H100_NODE,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    cp: Optional[int] = None,
    seq_length: int = 8192,
    global_batch_size: int = 128,
    micro_batch_size: int = 1,
    max_steps: int = 2000,
    lr: float = 5e-6,
    min_lr: float = 5e-7,
    warmup_steps: int = 50,
    val_fraction: float = 0.02,
    mock: bool = False,
) -> run.Partial:
    """Reasoning-toggle SFT (`llm.finetune`, full weights) on "detailed thinking on/off" chat data.

    start: the child's NeMo checkpoint, or a log dir (its newest checkpoint, e.g. recovery's).
    data_paths: JSONL files, Llama-Nemotron-Post-Training-Dataset records (data_format='nemotron') or
    plain {"messages": ...} records ('messages'); they are converted on the cluster into
    dataset_root (default: next to the first file) and the loss covers the final assistant turn
    only. data_paths is required; mock=True trains on random tokens instead (smoke tests only).
    lr 5e-6 cosine to 5e-7 with 50 warmup steps is NeMo's full-SFT setting for 49B/70B.
    """
    layout = _layout(parent_size, num_nodes, tp, pp, cp, num_gpus_per_node)
    _check_batch(layout, num_gpus_per_node, global_batch_size, micro_batch_size)
    _check_data(data_paths, mock, f"JSONL files, e.g. data_paths=['{DATA}/sft/train.jsonl']")
    if mock:  # llm.finetune gives it the model's tokenizer; this one spares the default's download
        data_module = run.Config(llm.MockDataModule, seq_length=seq_length, global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size,
                                 tokenizer=run.Config(checkpoint_tokenizer, path=start))  # fmt: skip
    else:
        sources = list(data_paths)
        root = dataset_root or str(Path(sources[0]).parent / f"{Path(sources[0]).stem}_toggle_chat")
        data_module = run.Config(
            ToggleChatDataModule, sources=sources, dataset_root=root, source_format=data_format,
            val_fraction=val_fraction, seq_length=seq_length, global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
        )  # fmt: skip
    val_every = min(100, max_steps)
    return run.Partial(
        llm.finetune,
        model=run.Config(load_model, path=start, seq_length=seq_length),
        data=data_module,
        trainer=trainer(layout, num_gpus_per_node, max_steps, val_every),
        log=logger(dir, name, val_every),
        resume=restore_from(start),
        optim=optimizer(lr, min_lr, warmup_steps),
        peft=None,
        tokenizer="model",
    )


# ============================================================================ checks on the `nemo llm` path

TRAINING_FACTORIES = {
    "puzzle_recovery": recovery_recipe, "puzzle_cpt": cpt_recipe, "puzzle_toggle_sft": toggle_sft_recipe,
}  # fmt: skip


def check_launch(recipe: run.Partial, executor: Optional[run.Executor] = None) -> None:
    """What a training recipe must pass before it runs: `check_recipe`, and an executor (when
    there is one) that starts the trainer's nodes x GPUs processes."""
    check_recipe(recipe)
    if executor is not None:
        check_fits_trainer(executor, recipe.trainer.num_nodes, int(recipe.trainer.devices))


class RecipeRunContext(run.cli.RunContext):
    """NeMo-Run's run context for `nemo llm distill|pretrain|finetune`, checking a recipe of this
    project (`--factory puzzle_*`) with `check_launch` once every override is applied.

    NeMo-Run 0.11 builds the executor (`run.executor=...`) first, then `parse_fn` calls the
    factory and applies the `key=value` overrides; the dry run, the direct run and the launch all
    follow it. A `run.Plugin` would run only on a launch through an executor, and a factory runs
    before the overrides, so this is where the checks see what will actually run."""

    def parse_fn(self, fn, args, **default_kwargs):
        task = super().parse_fn(fn, args, **default_kwargs)
        if _from_training_factory(self.factory):
            check_launch(task, getattr(self, "executor", None))
        return task


def _from_training_factory(factory) -> bool:
    """Whether `--factory` names one of TRAINING_FACTORIES: by registered name, e.g.
    "puzzle_cpt(data_paths=[...])", or by dotted path to the function."""
    if callable(factory):
        return any(factory is f for f in TRAINING_FACTORIES.values())
    match = re.match(r"\s*([\w.]+)", factory or "")
    module, _, name = (match.group(1) if match else "").rpartition(".")
    found = getattr(sys.modules.get(module), name, None) if module else TRAINING_FACTORIES.get(name)
    return any(found is f for f in TRAINING_FACTORIES.values())


def _check_on_the_cli() -> None:
    """Give NeMo's training entrypoints RecipeRunContext. The `nemo` command loads this module
    (the `nemo_run.cli` entry point) before it builds its commands, which take the run context
    class from the entrypoint; a run context of someone else's is left alone, with a warning."""
    for fn in (llm.distill, llm.pretrain, llm.finetune):
        entry = fn.cli_entrypoint
        if entry.run_ctx_cls is run.cli.RunContext:
            entry.run_ctx_cls = RecipeRunContext
        elif not issubclass(entry.run_ctx_cls, RecipeRunContext):
            logging.getLogger(__name__).warning(
                "nemo llm %s has its own run context (%s): the puzzle_* recipes are not checked before launch",
                entry.name, entry.run_ctx_cls.__qualname__,
            )  # fmt: skip


_check_on_the_cli()


# ============================================================================ the other NeMo-Run modules
#
# NeMo-Run imports only this module (the `nemo_run.cli` entry point); importing the Puzzle tasks
# and the pipeline experiment here registers their entrypoints and factories. At the end because
# the pipeline imports the factories above (importing it first works too: by the time this
# module imports it back, everything it needs from here is defined).

import importlib  # noqa: E402

for _module in ("puzzle_tasks", "pipeline"):
    importlib.import_module(f"{__package__}.{_module}")
