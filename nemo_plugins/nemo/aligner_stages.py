"""The NeMo-Aligner stages (GRPO, RLOO, online RPO) as NeMo-Run jobs on the Slurm H100 executor.

Each RL stage is one heterogeneous Slurm job of two tasks in the Aligner container image:

- the reward server (`nemo_plugins.aligner.reward_server`, the rule verifier; or Aligner's
  `serve_reward_model.py` for a trained reward model) as one task on its own node, which first writes its
  host name to `<stage dir>/rm_host`;
- the trainer, on `nodes` x `gpus_per_node` GPUs, whose tasks wait for that server
  (`nemo_plugins.aligner.rm_host`) and pass its host as `remote_rm.reward_model.ip`.

NeMo-Run's job group ends the server when the trainer ends. The trainers are Aligner-style Hydra
scripts with overrides: GRPO `python -m nemo_plugins.aligner.train_grpo` (conf/aligner/grpo.yaml),
RLOO Aligner's own `train_gpt_reinforce_actor.py` with conf/aligner/rloo.yaml, online RPO the
driver `python -m nemo_plugins.aligner.online_rpo` (one task that starts torchrun on its node for
every sampling and training step; single node).

Checkpoints cross the boundary with the NeMo 2.7 stages by name: `export_hf` (NeMo 2.7 image,
`llm.export_ckpt` to a HF directory) then `nemo_plugins.aligner.to_nemo` (Aligner image, NeMo's
`scripts/checkpoint_converters/convert_llama_hf_to_nemo.py` to a `.nemo`). Each Aligner stage writes
`<dir>/checkpoints/megatron_gpt.nemo` (exp_manager's save_nemo_on_train_end), the next stage's start.
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Optional

from . import require_nemo

run = require_nemo("nemo_run")

from .executors import GPUS_PER_H100_NODE, ExecutorConfigError  # noqa: E402

ALIGNER_STAGES = ("grpo", "rloo", "rpo")
ALIGNER_DIR = "/opt/NeMo-Aligner"  # Aligner's checkout in its image (the stock example scripts)
PROJECT_DIR = "/opt/nemo_plugins"  # this project in docker/aligner.Dockerfile (conf/aligner/*.yaml)
NEMO_NAME = "megatron_gpt"  # exp_manager.name of every Aligner stage: <dir>/checkpoints/megatron_gpt.nemo
RM_PORT = 5555


@dataclasses.dataclass(frozen=True)
class RewardServer:
    """The reward server beside an RL trainer: `kind` 'rule' (the project's verifier: `prompts`
    JSONL files and the `tokenizer` model directory the trainer's prompt file was rendered with) or
    'model' (Aligner's serve_reward_model.py on the reward model `.nemo` `model`, on `gpus` GPUs)."""

    kind: str = "rule"
    prompts: tuple[str, ...] = ()
    tokenizer: str = ""
    model: str = ""
    gpus: int = GPUS_PER_H100_NODE
    port: int = RM_PORT

    def __post_init__(self):
        if self.kind == "rule" and (not self.prompts or not self.tokenizer):
            raise ExecutorConfigError(f"reward server kind='rule': needs prompts=[...] (got {list(self.prompts)!r}) and "
                                      f"tokenizer=MODEL_DIR (got {self.tokenizer!r})")  # fmt: skip
        if self.kind == "model" and not self.model:
            raise ExecutorConfigError("reward server kind='model': needs model=REWARD_MODEL.nemo")
        if self.kind not in ("rule", "model"):
            raise ExecutorConfigError(f"reward server kind={self.kind!r}: expected 'rule' or 'model'")

    def command(self, host_file: str) -> str:
        """Write this node's host name for the trainer, then serve (exec: Slurm's signal reaches it)."""
        if self.kind == "rule":
            serve = ["python", "-m", "nemo_plugins.aligner.reward_server", f"prompts=[{','.join(self.prompts)}]",
                     f"tokenizer={self.tokenizer}", f"port={self.port}"]  # fmt: skip
        else:
            serve = ["python", f"{ALIGNER_DIR}/examples/nlp/gpt/serve_reward_model.py", f"rm_model_file={self.model}",
                     f"trainer.devices={self.gpus}", "trainer.num_nodes=1", f"inference.port={self.port}"]  # fmt: skip
        return f"hostname > {shlex.quote(host_file)}\nexec {shlex.join(serve)}\n"


def _wait_for_server(host_file: str, port: int) -> str:
    return f"RM_HOST=$(python -m nemo_plugins.aligner.rm_host host_file={shlex.quote(host_file)} port={port})\n"


def trained_policy(stage_dir: str) -> str:
    """The `.nemo` an Aligner stage leaves in its log dir (save_nemo_on_train_end)."""
    return f"{stage_dir}/checkpoints/{NEMO_NAME}.nemo"


def _data_prefix(train: list[str], validation: Optional[list[str]]) -> str:
    val = validation or train
    return f"model.data.data_prefix={{train: [{','.join(train)}], validation: [{','.join(val)}], test: [{','.join(val)}]}}"


def reinforce_command(stage: str, policy: str, prompts: list[str], stage_dir: str, nodes: int, gpus_per_node: int,
                      port: int, val_prompts: Optional[list[str]] = None, overrides: Optional[list[str]] = None) -> str:  # fmt: skip
    """GRPO (the project's trainer) or RLOO (Aligner's stock REINFORCE script) with Hydra overrides."""
    if stage == "grpo":
        entry = ["python", "-m", "nemo_plugins.aligner.train_grpo"]
    elif stage == "rloo":
        entry = ["python", f"{ALIGNER_DIR}/examples/nlp/gpt/train_gpt_reinforce_actor.py",
                 f"--config-path={PROJECT_DIR}/conf/aligner", "--config-name=rloo"]  # fmt: skip
    else:
        raise ExecutorConfigError(f"stage={stage!r}: expected 'grpo' or 'rloo'")
    args = [f"pretrained_checkpoint.restore_from_path={policy}", _data_prefix(prompts, val_prompts),
            f"trainer.num_nodes={nodes}", f"trainer.devices={gpus_per_node}", f"exp_manager.explicit_log_dir={stage_dir}",
            f"exp_manager.name={NEMO_NAME}", "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=True",
            f"remote_rm.reward_model.port={port}", *(overrides or [])]  # fmt: skip
    return (_wait_for_server(f"{stage_dir}/rm_host", port)
            + shlex.join([*entry, *args]) + ' "remote_rm.reward_model.ip=$RM_HOST"\n')  # fmt: skip


def rpo_command(policy: str, prompts: str, stage_dir: str, gpus_per_node: int, port: int,
                overrides: Optional[list[str]] = None) -> str:  # fmt: skip
    """The online RPO driver; it starts torchrun on this node for each sampling and training step."""
    args = ["python", "-m", "nemo_plugins.aligner.online_rpo", f"policy={policy}", f"prompts={prompts}",
            f"work_dir={stage_dir}", f"rm_port={port}", f"launch=torchrun --nproc-per-node={gpus_per_node}",
            f"aligner_dir={ALIGNER_DIR}", f"dpo_config={PROJECT_DIR}/conf/aligner/rpo.yaml",
            f"dpo_overrides=[trainer.num_nodes=1,trainer.devices={gpus_per_node}]", *(overrides or [])]  # fmt: skip
    return _wait_for_server(f"{stage_dir}/rm_host", port) + shlex.join(args) + ' "rm_host=$RM_HOST"\n'


def rpo_policy(stage_dir: str, iterations: int = 2) -> str:
    """The `.nemo` online RPO ends with (its last iteration's training)."""
    return trained_policy(f"{stage_dir}/iter{iterations - 1}/train")


def _sized(executor: run.SlurmExecutor, nodes: int, tasks: int, gpus: Optional[int], image: str) -> run.SlurmExecutor:
    ex = executor.clone()
    ex.nodes, ex.ntasks_per_node, ex.gpus_per_node = nodes, tasks, gpus
    ex.launcher, ex.torchrun_nproc_per_node = None, None
    ex.container_image = image
    ex.heterogeneous = True
    return ex


def check_slurm(executor: run.Executor) -> None:
    """The Aligner stages need Slurm: the reward server is a second task of one allocation."""
    if not isinstance(executor, run.SlurmExecutor):
        raise ExecutorConfigError(
            f"the Aligner stages run the reward server as a second task of one Slurm allocation: they need "
            f"run.executor=slurm_h100, not {type(executor).__name__}"
        )


def server_and_trainer_executors(executor: run.Executor, image: str, server: RewardServer, nodes: int,
                                 gpus_per_node: int, trainer_tasks: Optional[int] = None) -> list[run.SlurmExecutor]:  # fmt: skip
    """[reward server, trainer] executors of one heterogeneous Slurm job, both in `image`: the server
    one task on one node (with GPUs only for a reward model), the trainer one task per GPU (or
    `trainer_tasks` per node)."""
    check_slurm(executor)
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise ExecutorConfigError(f"aligner_image={image!r}: expected the Aligner container image (docker/aligner.Dockerfile)")
    # NeMo-Run 0.11 writes a het group's --gpus-per-node only when the first group has one (it loops
    # over the first group's keys), so the rule server asks for 1 GPU it does not use.
    server_gpus = server.gpus if server.kind == "model" else 1
    return [_sized(executor, 1, 1, server_gpus, image),
            _sized(executor, nodes, trainer_tasks or gpus_per_node, gpus_per_node, image)]  # fmt: skip


def server_and_trainer_tasks(server: RewardServer, stage_dir: str, trainer: str) -> list[run.Script]:
    return [run.Script(inline=server.command(f"{stage_dir}/rm_host")), run.Script(inline=trainer)]
