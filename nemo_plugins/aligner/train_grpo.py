"""GRPO training on NeMo-Aligner 0.7.0, in the style of Aligner's
`examples/nlp/gpt/train_gpt_reinforce_actor.py`:

    python -m nemo_plugins.aligner.train_grpo pretrained_checkpoint.restore_from_path=MODEL.nemo \\
        "model.data.data_prefix={train: [train.jsonl], validation: [val.jsonl], test: [val.jsonl]}" \\
        remote_rm.reward_model.ip=HOST remote_rm.reward_model.port=5555 model.reinforce.grpo.kl_beta=0.001

The config is conf/aligner/grpo.yaml (Aligner's REINFORCE config plus `model.reinforce.grpo`);
the script is the stock one with `GRPOActor` / `GRPOTrainer` in place of Aligner's REINFORCE
classes, the initial policy's weights kept when the loss has a KL term, and with a
`model.reinforce.curriculum` block (`curriculum_config`) the core's curriculum drawing the prompts. The reward server
(e.g. `python -m nemo_plugins.aligner.reward_server`) runs beside it. It needs CUDA (Aligner's
generation, Transformer Engine, apex); `check_config` and the curriculum plan come first and need
neither, then the framework imports (an ImportError names the `aligner` extra), then the CUDA check.
"""

from __future__ import annotations

from functools import partial

from omegaconf import OmegaConf

from ..config import CONF_DIR
from .curriculum_config import curriculum_plan
from .deps import require
from .grpo_config import GRPOSettings

CONFIG_DIR = CONF_DIR / "aligner"
CONFIG_NAME = "grpo"


def register_resolvers() -> None:
    """The resolvers Aligner's REINFORCE config uses (as its example script registers them)."""
    OmegaConf.register_new_resolver("multiply", lambda x, y: x * y, replace=True)
    OmegaConf.register_new_resolver("int_div", lambda x, y: x // y, replace=True)
    OmegaConf.register_new_resolver("subtract", lambda x, y: x - y, replace=True)


def check_config(cfg) -> GRPOSettings:
    """The GRPO settings of a full config, after the checks that need no GPU: the grpo block
    parses, G >= 2, and the prompt and rollout batch sizes fit together."""
    settings = GRPOSettings.from_model_cfg(cfg.model)
    reinforce = cfg.trainer.reinforce
    g = reinforce.num_rollouts_per_prompt
    if not isinstance(g, int) or g < 2:
        raise ValueError(f"trainer.reinforce.num_rollouts_per_prompt={g!r}: expected an integer >= 2 (GRPO compares "
                         "each completion with the other completions of its prompt)")  # fmt: skip
    prompts, mbs = cfg.model.reinforce.num_rollout_samples, cfg.model.reinforce.rollout_micro_batch_size
    if prompts % mbs:
        raise ValueError(f"model.reinforce.num_rollout_samples={prompts}: expected a multiple of "
                         f"model.reinforce.rollout_micro_batch_size ({mbs})")  # fmt: skip
    if (prompts * g) % cfg.model.global_batch_size:
        raise ValueError(f"model.global_batch_size={cfg.model.global_batch_size}: expected to divide the rollout rows "
                         f"num_rollout_samples x num_rollouts_per_prompt = {prompts * g} (one optimizer step per "
                         "global batch)")  # fmt: skip
    if cfg.pretrained_checkpoint.restore_from_path is None:
        raise ValueError("pretrained_checkpoint.restore_from_path: missing; expected the policy's .nemo checkpoint")
    return settings


def curriculum_of(cfg):
    """The `model.reinforce.curriculum` plan (`curriculum_config`), or None for Aligner's random order."""
    block = cfg.model.reinforce.get("curriculum")
    if block is None:
        return None
    return curriculum_plan(block, cfg.model.reinforce.num_rollout_samples, cfg.trainer.reinforce.get("max_steps"))


def train_dataloader_builder(cfg, train_ds, collate_fn, plan=None):
    """The prompt dataloader builder `ReinforceTrainer` calls with `consumed_samples`: Aligner's
    `build_dataloader`, or with a curriculum plan the curriculum sampler's (at one consumed
    sample per prompt, as `GRPOTrainer` counts them)."""
    common = dict(cfg=cfg, dataset=train_ds, mbs=cfg.model.reinforce.rollout_micro_batch_size,
                  gbs=cfg.model.reinforce.num_rollout_samples, collate_fn=collate_fn)  # fmt: skip
    if plan is None:
        return partial(require("nemo_aligner.data.nlp.builders", "GRPO training").build_dataloader, load_gbs=False, **common)
    from .curriculum_sampler import build_curriculum_dataloader

    return partial(build_curriculum_dataloader, plan=plan, rollouts_per_prompt=1, **common)


def require_cuda() -> None:
    """Aligner's generation, Transformer Engine layers and apex optimizers run only on CUDA."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("GRPO training on NeMo-Aligner needs CUDA GPUs (no CUDA device is visible); the config "
                           "checked out (check_config), nothing was trained")  # fmt: skip


def train(cfg) -> None:
    """Aligner's `train_gpt_reinforce_actor.main` with the GRPO actor and trainer."""
    settings = check_config(cfg)
    plan = curriculum_of(cfg)
    torch = require("torch", "GRPO training")
    need = "GRPO training"
    divide = require("megatron.core.utils", need).divide
    exp_manager = require("nemo.utils.exp_manager", need).exp_manager
    logging = require("nemo.utils", need).logging
    builders = require("nemo_aligner.data.nlp.builders", need)
    parallel_state = require("nemo_aligner.utils.parallel_state", need)
    clients = require("nemo_aligner.models.nlp.gpt.reward_critic_clients", need)
    get_batch_iterator_cls = require("nemo_aligner.utils.batch_iterators", need).get_batch_iterator_cls
    Timer = require("nemo_aligner.utils.distributed", need).Timer
    tsu = require("nemo_aligner.utils.train_script_utils", need)
    utils = require("nemo_aligner.utils.utils", need)
    require_cuda()
    from .grpo_actor import GRPOActor  # these import TensorRT-LLM through Aligner's REINFORCE actor
    from .grpo_trainer import GRPOTrainer

    cfg.model = utils.load_and_override_model_config(cfg.pretrained_checkpoint.restore_from_path, cfg.model)
    logging.info(f"\n{OmegaConf.to_yaml(cfg)}")
    trainer = tsu.resolve_and_create_trainer(cfg, "reinforce")
    exp_manager(trainer, cfg.exp_manager)
    logger = tsu.CustomLoggerWrapper(trainer.loggers)
    ptl_model = utils.load_from_nemo(GRPOActor, cfg.model, trainer, strict=True,
                                     restore_path=cfg.pretrained_checkpoint.restore_from_path)  # fmt: skip
    tsu.init_peft(ptl_model, cfg.model)
    needs_init_policy = cfg.trainer.reinforce.initial_policy_kl_penalty > 0 or settings.needs_reference
    if needs_init_policy and cfg.model.peft.peft_scheme == "none":
        ptl_model.init_policy_state_dict = utils.retrieve_model_state_dict_in_cpu(
            ptl_model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False))  # fmt: skip
    custom_trainer_state_dict = tsu.retrieve_custom_trainer_state_dict(trainer) if trainer.ckpt_path is not None else None
    tsu.init_distributed(trainer, ptl_model, cfg.model.get("transformer_engine", False))

    train_ds, validation_ds, _ = builders.build_train_valid_test_rlhf_datasets(
        cfg=cfg.model, data_prefix=cfg.model.data.data_prefix, data_impl=cfg.model.data.data_impl,
        splits_string=cfg.model.data.splits_string, train_valid_test_num_samples=[-1, -1, -1],
        seq_length=cfg.model.data.seq_length, seed=cfg.model.seed, tokenizer=ptl_model.tokenizer,
    )  # fmt: skip
    collate_fn = builders.collate_with_pad_to_max_batch(cfg.model.reinforce.length_params.max_length,
                                                        ptl_model.tokenizer.eos_id, cfg, generate_masks_and_position_ids=False)  # fmt: skip
    train_builder = train_dataloader_builder(cfg, train_ds, collate_fn, plan)
    val_dataloader_builder = partial(builders.build_dataloader, cfg=cfg, dataset=validation_ds,
                                     mbs=cfg.model.reinforce.val_rollout_micro_batch_size,
                                     gbs=cfg.model.reinforce.num_val_samples, collate_fn=collate_fn, load_gbs=False,
                                     use_random_sampler=False)  # fmt: skip
    dummy = torch.utils.data.DataLoader(dataset=train_ds, batch_size=divide(cfg.model.global_batch_size,
                                        parallel_state.get_data_parallel_world_size()))  # fmt: skip
    tsu.init_using_ptl(trainer, ptl_model, dummy, train_ds)
    del ptl_model._train_dl
    optimizer, scheduler = tsu.extract_optimizer_scheduler_from_ptl_model(ptl_model)
    ckpt_callback = tsu.add_custom_checkpoint_callback(trainer, ptl_model)
    logger.log_hyperparams(OmegaConf.to_container(cfg))

    rm = clients.RemoteGPTRMClient(cfg.remote_rm)
    grpo_trainer = GRPOTrainer(
        cfg=cfg.trainer.reinforce, model=ptl_model, optimizer=optimizer, scheduler=scheduler,
        train_dataloader_builder=train_builder, val_dataloader_builder=val_dataloader_builder,
        collate_fn=collate_fn, rm=rm, batch_iterator_cls=get_batch_iterator_cls(cfg.trainer.reinforce.get("batch_iterator", {})),
        logger=logger, ckpt_callback=ckpt_callback,
        run_timer=Timer(cfg.exp_manager.get("max_time_per_run") if cfg.exp_manager else None),
    )  # fmt: skip
    if custom_trainer_state_dict is not None:
        grpo_trainer.load_state_dict(custom_trainer_state_dict)
    try:
        grpo_trainer.fit()
    finally:
        rm.communicator.close()  # its PyTriton clients' threads would otherwise block exit (as the stock script)


def main() -> None:
    register_resolvers()
    require("torch.multiprocessing", "GRPO training").set_start_method("spawn", force=True)
    hydra_runner = require("nemo.core.config", "GRPO training").hydra_runner
    hydra_runner(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)(train)()


if __name__ == "__main__":
    main()
