"""NeMo-Run executors for the recipes: local torchrun, Slurm on 8xH100 nodes, and the TP/PP
defaults per parent size.

Every value a user may need to change on a cluster (account, partition, nodes, GPUs per node,
time, container image and mounts) is a plain argument, so it is also an override on the CLI
(`run.executor=slurm_h100 run.executor.account=abc run.executor.nodes=4`). Arguments are checked when the
executor is built and a bad one is named with its value and what was expected.
"""

import dataclasses
import os
import re
import tempfile
from typing import Optional

from . import require_nemo

run = require_nemo("nemo_run")

GPUS_PER_H100_NODE = 8
# Environment for NeMo/Megatron training in the NeMo container (as in NeMo's own Slurm examples).
TRAINING_ENV = {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_NVLS_ENABLE": "0"}
_SLURM_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")


class ExecutorConfigError(ValueError):
    """An executor argument that cannot work (names the argument, its value and what is expected)."""


# ============================================================================ parallelism


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """Model-parallel layout of one training job on 8xH100 (80 GB) nodes.

    `nodes` is the smallest node count the layout fits with the teacher of recovery
    distillation in memory (the heaviest stage); more nodes add data parallelism.
    """

    tp: int  # tensor parallel
    pp: int  # pipeline parallel
    cp: int = 1  # context parallel (raise it for sequences beyond ~16k)
    sp: bool = True  # sequence parallel (only with tp > 1)
    vp: Optional[int] = None  # virtual pipeline stages per PP rank
    nodes: int = 1

    @property
    def model_parallel_gpus(self) -> int:
        return self.tp * self.pp * self.cp


# Sized for KD with bf16 weights, distributed Adam and seq 8192. 8B: TP2 as NeMo's full-SFT
# Llama-3.1-8B recipe; 49B: TP8 x PP2 as NeMo's Nemotron-Super-49B full SFT; 70B: TP8 x PP4 as
# NeMo's Llama-3.1-70B full SFT (teacher 70B + a ~49B child with optimizer state fit at DP=1).
PARALLELISM: dict[str, Parallelism] = {
    "8b": Parallelism(tp=2, pp=1, nodes=1),
    "49b": Parallelism(tp=8, pp=2, nodes=2),
    "70b": Parallelism(tp=8, pp=4, nodes=4),
}
# A parent of up to this many billion parameters uses the row's layout.
_SIZE_BUCKETS = ((15.0, "8b"), (55.0, "49b"), (100.0, "70b"))


def _billions(parent_size) -> float:
    if isinstance(parent_size, bool):
        raise ExecutorConfigError(f"parent_size={parent_size!r}: expected e.g. '70b', 70 or 7.06e10")
    if isinstance(parent_size, (int, float)):
        return parent_size / 1e9 if parent_size > 1e6 else float(parent_size)
    text = str(parent_size).strip().lower()
    try:
        return float(text[:-1]) if text.endswith("b") else float(text)
    except ValueError:
        raise ExecutorConfigError(
            f"parent_size={parent_size!r}: expected a size such as '8b', '49b', '70b' (or billions as a number)"
        ) from None


def parallelism_for(parent_size="70b", **overrides) -> Parallelism:
    """The table's layout for a parent of `parent_size` ('8b', '49B', 70, 7.06e10 params, ...),
    with `overrides` (tp=, pp=, cp=, sp=, vp=, nodes=) winning over the table. A size beyond
    the table (e.g. '405b') needs tp=, pp= and nodes= (cp, sp, vp keep Parallelism's defaults)."""
    billions = _billions(parent_size)
    fields = {f.name for f in dataclasses.fields(Parallelism)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ExecutorConfigError(f"parallelism override {unknown[0]!r}: expected one of {sorted(fields)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    key = next((k for limit, k in _SIZE_BUCKETS if billions <= limit), None)
    if billions <= 0:
        raise ExecutorConfigError(f"parent_size={parent_size!r}: expected a positive size such as '8b' or 70")
    if key is None:  # no table row: the caller's layout, complete
        missing = [k for k in ("tp", "pp", "nodes") if k not in given]
        if missing:
            raise ExecutorConfigError(
                f"parent_size={parent_size!r}: no default layout beyond 100B parents (table: {sorted(PARALLELISM)}); "
                f"give tp=, pp= and nodes= explicitly (missing: {', '.join(m + '=' for m in missing)})"
            )
        layout = Parallelism(**given)
    else:
        layout = dataclasses.replace(PARALLELISM[key], **given)
    check_parallelism(layout)
    return layout


def check_parallelism(p: Parallelism, gpus_per_node: int = GPUS_PER_H100_NODE) -> None:
    """Raise ExecutorConfigError when the layout cannot tile `p.nodes` x `gpus_per_node` GPUs."""
    for name in ("tp", "pp", "cp", "nodes"):
        value = getattr(p, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExecutorConfigError(f"{name}={value!r}: expected a positive integer")
    if p.tp > gpus_per_node:
        raise ExecutorConfigError(f"tp={p.tp}: tensor parallelism must stay inside one node ({gpus_per_node} GPUs)")
    world = p.nodes * gpus_per_node
    if world % p.model_parallel_gpus:
        raise ExecutorConfigError(
            f"tp*pp*cp={p.tp}*{p.pp}*{p.cp}={p.model_parallel_gpus} does not divide the {world} GPUs of "
            f"nodes={p.nodes} x gpus_per_node={gpus_per_node}"
        )


# ============================================================================ executors


def local_executor(gpus: int = GPUS_PER_H100_NODE, env_vars: Optional[dict[str, str]] = None) -> run.LocalExecutor:
    """One process per GPU on this machine, started by torchrun."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ExecutorConfigError(f"gpus={gpus!r}: expected a positive integer")
    return run.LocalExecutor(
        ntasks_per_node=gpus, launcher="torchrun", env_vars={**TRAINING_ENV, **(env_vars or {})}
    )


def slurm_executor(
    account: str,
    partition: str,
    nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    time: str = "04:00:00",
    container_image: str = "",
    container_mounts: Optional[list[str]] = None,
    job_dir: Optional[str] = None,
    host: Optional[str] = None,
    user: Optional[str] = None,
    identity: Optional[str] = None,
    ntasks_per_node: Optional[int] = None,
    launcher: Optional[str] = None,
    env_vars: Optional[dict[str, str]] = None,
    packager: str = "none",
    exclusive: bool = True,
    qos: Optional[str] = None,
    constraint: Optional[str] = None,
    job_name_prefix: Optional[str] = None,
    additional_parameters: Optional[dict[str, str]] = None,
) -> run.SlurmExecutor:
    """Slurm on H100 nodes, in a container.

    By default srun starts one task per GPU (`ntasks_per_node = gpus_per_node`, no launcher),
    which is what NeMo's MegatronStrategy and the Puzzle shard tasks expect; `launcher="torchrun"`
    starts one torchrun per node instead, with `ntasks_per_node` (default: one per GPU) ranks.
    The tunnel is local (run this on a login node) unless `host` is given, then SSH (`user`,
    optional `identity`) with `job_dir` on the cluster.
    `packager="none"` expects nemo_plugins installed in the container (or mounted and put on
    PYTHONPATH through env_vars); `"git"` ships the current git checkout with the job.
    """
    _check_slurm(account, partition, nodes, gpus_per_node, time, container_image, container_mounts, host, job_dir,
                 ntasks_per_node, launcher, packager)  # fmt: skip
    if host:
        tunnel = run.SSHTunnel(host=host, user=user or os.environ.get("USER", ""), job_dir=job_dir, identity=identity)
    else:
        tunnel = run.LocalTunnel(job_dir=job_dir or os.path.join(run.config.get_nemorun_home(), "experiments"))
    return run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=nodes,
        # processes per node: srun tasks, or one task running torchrun with that many ranks
        ntasks_per_node=1 if launcher == "torchrun" else ntasks_per_node or gpus_per_node,
        torchrun_nproc_per_node=(ntasks_per_node or gpus_per_node) if launcher == "torchrun" else None,
        time=time,
        container_image=container_image,
        container_mounts=list(container_mounts or []),
        tunnel=tunnel,
        launcher=launcher,
        env_vars={**TRAINING_ENV, **(env_vars or {})},
        packager=run.GitArchivePackager() if packager == "git" else run.Packager(),
        exclusive=exclusive,
        mem="0" if exclusive else None,
        qos=qos,
        constraint=constraint,
        job_name_prefix=job_name_prefix,
        additional_parameters=additional_parameters,
        gpus_per_node=gpus_per_node,
    )


def _check_slurm(account, partition, nodes, gpus_per_node, time, image, mounts, host, job_dir, ntasks, launcher,
                 packager) -> None:  # fmt: skip
    def need(name, value, hint):
        if not isinstance(value, str) or not value.strip():
            raise ExecutorConfigError(f"slurm executor: {name}={value!r}: expected a non-empty string ({hint})")

    need("account", account, "your Slurm account, e.g. run.executor.account=my_account")
    need("partition", partition, "an H100 partition, e.g. executor.partition=batch")
    need("container_image", image, "a NeMo 2.7 container with nemo_plugins installed, e.g. nvcr.io/nvidia/nemo:<tag>")
    for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ExecutorConfigError(f"slurm executor: {name}={value!r}: expected a positive integer")
    if ntasks is not None and (not isinstance(ntasks, int) or ntasks < 1):
        raise ExecutorConfigError(f"slurm executor: ntasks_per_node={ntasks!r}: expected a positive integer or None")
    if not isinstance(time, str) or not _SLURM_TIME.match(time):
        raise ExecutorConfigError(f"slurm executor: time={time!r}: expected HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    mounts = [] if mounts is None else mounts
    if isinstance(mounts, str):
        raise ExecutorConfigError(f"slurm executor: container_mounts={mounts!r}: expected a list of SRC:DST strings")
    for i, m in enumerate(mounts):
        if not isinstance(m, str) or ":" not in m or m.startswith(":") or m.endswith(":"):
            raise ExecutorConfigError(f"slurm executor: container_mounts[{i}]={m!r}: expected SRC:DST")
    if host and not job_dir:
        raise ExecutorConfigError(f"slurm executor: host={host!r} needs job_dir, a directory on the cluster")
    if launcher not in (None, "torchrun"):
        raise ExecutorConfigError(f"slurm executor: launcher={launcher!r}: expected None (srun) or 'torchrun'")
    if packager not in ("none", "git"):
        raise ExecutorConfigError(f"slurm executor: packager={packager!r}: expected 'none' or 'git'")


# CLI factories: `run.executor=slurm_h100 run.executor.account=... run.executor.nodes=2` (any argument of
# slurm_executor), `executor=local_gpus executor.gpus=2`. They return configs of the functions
# above, so overrides are checked against their signatures and values when the executor is built.


@run.cli.factory(name="slurm_h100")
def slurm_h100(
    account: str = "",
    partition: str = "",
    nodes: int = 1,
    gpus_per_node: int = GPUS_PER_H100_NODE,
    time: str = "04:00:00",
    container_image: str = "",
    container_mounts: Optional[list[str]] = None,
) -> run.Config[run.SlurmExecutor]:
    """Slurm on 8xH100 nodes (set account, partition and container_image)."""
    return run.Config(
        slurm_executor, account=account, partition=partition, nodes=nodes, gpus_per_node=gpus_per_node, time=time,
        container_image=container_image, container_mounts=container_mounts,
    )  # fmt: skip


@run.cli.factory(name="local_gpus")
def local_gpus(gpus: int = GPUS_PER_H100_NODE) -> run.Config[run.LocalExecutor]:
    """torchrun on this machine."""
    return run.Config(local_executor, gpus=gpus)


def for_trainer(executor: run.Executor, recipe: run.Partial) -> run.Executor:
    """A copy of `executor` sized to the recipe's trainer (nodes, GPUs per node)."""
    ex = executor.clone()
    nodes, devices = recipe.trainer.num_nodes, int(recipe.trainer.devices)
    if isinstance(ex, run.SlurmExecutor):
        ex.nodes = nodes
        ex.gpus_per_node = devices
        if ex.launcher is None:
            ex.ntasks_per_node = devices
        else:
            ex.ntasks_per_node, ex.torchrun_nproc_per_node = 1, devices
    elif isinstance(ex, run.LocalExecutor):
        if nodes != 1:
            raise ExecutorConfigError(f"trainer.num_nodes={nodes}: a local executor runs one node")
        ex.ntasks_per_node = devices
    return ex


def with_container_image(executor: run.Executor, image: str, key: str = "container_image") -> run.Executor:
    """A copy of `executor` whose jobs run in `image` (`key` names the setting in errors). Only a
    container executor (Slurm) takes one: a local executor runs here, without a container."""
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ExecutorConfigError(f"{key}={image!r}: expected a container image, e.g. nvcr.io/nvidia/nemo:25.04")
    if not isinstance(executor, run.SlurmExecutor):
        raise ExecutorConfigError(
            f"{key}={image!r}: a container image needs a container executor (run.executor=slurm_h100); "
            f"{type(executor).__name__} runs the job here, without one"
        )
    ex = executor.clone()
    ex.container_image = image
    return ex


def check_fits_trainer(executor: run.Executor, num_nodes: int, devices: int) -> None:
    """Raise ExecutorConfigError unless `executor` starts the trainer's num_nodes x devices
    processes (one per GPU), naming the executor's setting, its value and the trainer's: a
    mismatch would otherwise hang or fail in Megatron's process-group set-up on the cluster."""
    try:
        nodes, procs = executor.nnodes(), executor.nproc_per_node()
    except NotImplementedError:  # an executor that does not say how many it starts
        return
    local = isinstance(executor, run.LocalExecutor)
    errors = []
    if nodes != num_nodes and local:
        errors.append(
            f"run.executor: a local executor runs {nodes} node: expected trainer.num_nodes={num_nodes} "
            f"(run.executor=slurm_h100 run.executor.nodes={num_nodes}, or a layout for one node)"
        )
    elif nodes != num_nodes:
        errors.append(f"run.executor.nodes={nodes}: expected {num_nodes}, the trainer's trainer.num_nodes")
    if procs != devices:
        key = "run.executor.gpus" if local else "run.executor.gpus_per_node"
        errors.append(f"{key}={procs}: expected {devices} processes per node, one per GPU of trainer.devices")
    if errors:
        raise ExecutorConfigError("; ".join(errors))


# ============================================================================ dry runs


def sbatch_script(task, executor: run.SlurmExecutor, name: str = "task") -> str:
    """The sbatch script `executor` would submit for `task`, without submitting anything.

    Works on a copy: the tunnel is replaced by a local one in a temporary directory (nothing is
    contacted, nothing lands in the working directory) that is deleted afterwards, and the code is
    not packaged.
    """
    from nemo_run.core.execution.slurm import get_packaging_job_key
    from nemo_run.core.tunnel.client import PackagingJob
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler

    if not isinstance(executor, run.SlurmExecutor):
        raise ExecutorConfigError(f"sbatch_script needs a SlurmExecutor, got {type(executor).__name__}")
    with tempfile.TemporaryDirectory(prefix="nemo_plugins_sbatch_") as tmp:
        ex = executor.clone()
        ex.tunnel = run.LocalTunnel(job_dir=tmp)
        ex.experiment_id = "dryrun"
        ex.experiment_dir = tmp
        ex.job_dir = os.path.join(tmp, name)
        os.makedirs(ex.job_dir, exist_ok=True)
        # the script does not depend on the packaged code: mark it packaged (no git archive, no shell)
        ex.tunnel.packaging_jobs[get_packaging_job_key(ex.experiment_id, name)] = PackagingJob(symlink=False)
        app = package(name, task, executor=ex, serialize_to_file=True)
        info = SlurmTunnelScheduler(session_name="dryrun")._submit_dryrun(app, ex)
        return info.request.materialize()
