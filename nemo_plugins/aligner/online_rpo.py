"""Iterative online RPO on NeMo-Aligner 0.7.0 (Llama-Nemotron §6): per iteration, sample from the
current policy, score with a reward server, pair each prompt's best and worst response, and train
Aligner's DPO model with an `rpo_*` loss whose reference is the policy the iteration started from.

    python -m nemo_plugins.aligner.online_rpo policy=/checkpoints/policy.nemo \
        prompts=/data/chat_prompts.jsonl work_dir=/results/rpo rm_host=RM_HOST

Iteration i works in `work_dir/iter{i}/`:

1. `samples.jsonl`: `launch` starts `nemo_plugins.aligner.rpo_sample` (NeMo generation from the
   policy `.nemo`, `responses_per_prompt` per prompt; rewards from the server through Aligner's own
   `RemoteGPTRMClient`: Aligner's `serve_reward_model.py` or this project's rule server);
2. `pairs.jsonl`: `rpo_pairs.select_pairs` (best/worst, all-tied prompts skipped), Aligner's DPO JSONL;
3. `train/`: `launch` starts Aligner's own `train_gpt_dpo.py` with `dpo_config` (conf/aligner/rpo.yaml:
   rpo_bwd_kl, β, η, lr, 500 steps) restored from the policy, so that policy is the reference (PEFT off);
   its `checkpoints/megatron_gpt.nemo` is the next iteration's policy.

A step whose output exists is not run again, so a rerun after a failure resumes. The prompt file
is Aligner's prompt JSONL (`{"text": chat-rendered prompt}`, e.g. from `aligner.prompt_set`; for the
rule server, the file the server was started with). `dry_run=true` prints the commands instead.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ..config import CONF_DIR, ConfigError
from .rpo_pairs import SampledPrompt, select_pairs, write_dpo_jsonl
from .rpo_sample import SamplingSettings

log = logging.getLogger("nemo_plugins.aligner.online_rpo")

DEFAULT_DPO_CONFIG = CONF_DIR / "aligner" / "rpo.yaml"
NEMO_NAME = "megatron_gpt"  # the stock DPO config's exp_manager.name: train/checkpoints/megatron_gpt.nemo


@dataclass
class OnlineRPOConfig(SamplingSettings):
    """The driver's settings: defaults <- `online_rpo` of `dpo_config` <- key=value overrides
    (the sampling ones, `SamplingSettings`, go on to each iteration's sampler)."""

    policy: str = ""  # the starting policy, a NeMo 1 `.nemo` (Aligner's format)
    prompts: str = ""  # Aligner prompt JSONL ({"text": ...} per line)
    work_dir: str = ""
    iterations: int = 2
    launch: str = "torchrun --nproc-per-node=8"
    aligner_dir: str = "/opt/NeMo-Aligner"
    dpo_config: str = str(DEFAULT_DPO_CONFIG)
    dpo_overrides: list[str] = field(default_factory=list)  # Hydra overrides for train_gpt_dpo.py
    dry_run: bool = False

    def check(self) -> None:
        for key in ("policy", "prompts", "work_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is not set: expected policy=POLICY.nemo prompts=PROMPTS.jsonl work_dir=DIR")
        for key in ("iterations", "responses_per_prompt", "max_new_tokens"):
            if getattr(self, key) < (2 if key == "responses_per_prompt" else 1):
                raise ConfigError(f"{key}={getattr(self, key)}: expected >= {2 if key == 'responses_per_prompt' else 1}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts}: expected a positive integer or null (all)")


def load_online_rpo_config(argv: list[str]) -> OnlineRPOConfig:
    """Schema defaults <- the `online_rpo` section of `dpo_config` (default conf/aligner/rpo.yaml) <- argv."""
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ConfigError(f"argument {bad[0]!r}: expected key=value (e.g. iterations=2)")
    given = OmegaConf.from_dotlist(argv)
    dpo_config = Path(str(given.get("dpo_config", DEFAULT_DPO_CONFIG)))
    if not dpo_config.is_file():
        raise ConfigError(f"dpo_config={dpo_config}: file not found (expected a DPO config such as conf/aligner/rpo.yaml)")
    section = OmegaConf.load(dpo_config).get("online_rpo") or {}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(OnlineRPOConfig), section, given)
    except Exception as e:  # OmegaConf names the key and the type it expected
        raise ConfigError(f"online RPO config: {e}") from None
    out = OmegaConf.to_object(cfg)
    out.check()
    return out


def iteration_dir(cfg: OnlineRPOConfig, i: int) -> Path:
    return Path(cfg.work_dir) / f"iter{i}"


def sample_command(cfg: OnlineRPOConfig, policy: str, out: Path) -> list[str]:
    """The sampling process: `launch` python -m nemo_plugins.aligner.rpo_sample ..."""
    args = {"policy": policy, "prompts": cfg.prompts, "out": str(out), **cfg.sampling_overrides()}
    return [*shlex.split(cfg.launch), "-m", "nemo_plugins.aligner.rpo_sample", *(f"{k}={v}" for k, v in args.items())]


def train_command(cfg: OnlineRPOConfig, policy: str, pairs: Path, train_dir: Path) -> list[str]:
    """Aligner's own train_gpt_dpo.py on the pairs, restored from (and referenced to) `policy`."""
    config = Path(cfg.dpo_config).resolve()
    data = f"{{train: [{pairs}], validation: [{pairs}], test: [{pairs}]}}"
    return [
        *shlex.split(cfg.launch), f"{cfg.aligner_dir}/examples/nlp/gpt/train_gpt_dpo.py",
        f"--config-path={config.parent}", f"--config-name={config.stem}",
        f"pretrained_checkpoint.restore_from_path={policy}", f"model.data.data_prefix={data}",
        f"exp_manager.explicit_log_dir={train_dir}", f"exp_manager.name={NEMO_NAME}",
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=True", "model.peft.peft_scheme=none",
        "trainer.num_nodes=1",  # `launch` starts the processes of this node only (the stock config says 8 nodes)
        *cfg.dpo_overrides,
    ]  # fmt: skip


def trained_policy(train_dir: Path) -> Path:
    return train_dir / "checkpoints" / f"{NEMO_NAME}.nemo"


def read_samples(path: Path) -> list[SampledPrompt]:
    """rpo_sample's output: one {"prompt", "responses", "rewards"} object a line."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                samples.append(SampledPrompt(row["prompt"], row["responses"], row["rewards"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{prompt, responses, rewards}} ({e})") from None
    return samples


def _run(cmd: list[str], dry_run: bool) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True)


def run_online_rpo(cfg: OnlineRPOConfig) -> str:
    """All iterations; returns the final policy's path."""
    policy = cfg.policy
    for i in range(cfg.iterations):
        d = iteration_dir(cfg, i)
        samples, pairs, train_dir = d / "samples.jsonl", d / "pairs.jsonl", d / "train"
        if not cfg.dry_run:
            d.mkdir(parents=True, exist_ok=True)
        if not samples.is_file():
            _run(sample_command(cfg, policy, samples), cfg.dry_run)
        if not cfg.dry_run and not pairs.is_file():
            chosen, skipped = select_pairs(read_samples(samples))
            write_dpo_jsonl(chosen, pairs)
            log.info("iteration %d: %d pairs, skipped %s", i, len(chosen), dict(skipped))
        if not trained_policy(train_dir).is_file():
            _run(train_command(cfg, policy, pairs, train_dir), cfg.dry_run)
        if not cfg.dry_run and not trained_policy(train_dir).is_file():
            raise FileNotFoundError(f"iteration {i}: train_gpt_dpo.py ended without {trained_policy(train_dir)} "
                                    "(exp_manager.checkpoint_callback_params.save_nemo_on_train_end)")  # fmt: skip
        policy = str(trained_policy(train_dir))
    print(f"online RPO: final policy {policy}")
    return policy


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_online_rpo_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    run_online_rpo(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
