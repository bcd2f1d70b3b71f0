"""Online RPO's sampling step (GPU): responses from the current policy, scored by a reward server.

    torchrun --nproc-per-node=8 -m nemo_plugins.aligner.rpo_sample policy=POLICY.nemo \
        prompts=PROMPTS.jsonl out=samples.jsonl responses_per_prompt=4 rm_host=HOST rm_port=5555

The policy is restored as NeMo's `MegatronGPTModel` from its `.nemo` (at the checkpoint's own
TP/PP, as NeMo's megatron_gpt_eval.py does) and sampled with `model.generate`. Each data-parallel
rank takes every DP-th prompt, repeated `responses_per_prompt` times. Rewards come from the server
through Aligner's own `RemoteGPTRMClient` (prompt + response ids up to the first EOS, zero-padded,
with their lengths: what the stock REINFORCE trainer sends), so Aligner's `serve_reward_model.py`
and this project's rule server both work. Global rank 0 writes one
`{"prompt", "responses", "rewards"}` object a line (atomically), prompts in file order.

Unverified without a GPU: the restore, generation and the client's CUDA transfer run only on one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, fields

from ..utils.atomic import write_text_atomic
from .deps import require


@dataclass
class SamplingSettings:
    """How an iteration samples and scores: set on the online RPO driver, passed on to this sampler."""

    responses_per_prompt: int = 4
    max_prompts: int | None = None
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    rm_host: str = "localhost"
    rm_port: int = 5555
    rm_name: str = "reward_model"

    def sampling_overrides(self) -> dict:
        """These settings as this sampler's key=value arguments (None as `null`)."""
        values = {f.name: getattr(self, f.name) for f in fields(SamplingSettings)}
        return {k: "null" if v is None else v for k, v in values.items()}


@dataclass
class SampleConfig(SamplingSettings):
    policy: str = ""
    prompts: str = ""
    out: str = ""
    precision: str = "bf16"


def read_prompt_texts(path: str, max_prompts: int | None = None) -> list[str]:
    """The `text` of each line of an Aligner prompt JSONL (the first `max_prompts`)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise ValueError(f"{path}:{n}: expected {{\"text\": prompt}} (Aligner's prompt JSONL)")
            texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts[:max_prompts] if max_prompts else texts


def response_ids(full_ids: list[int], prompt_len: int, eos_id: int) -> list[int]:
    """The generated ids after the prompt, through the first EOS (kept, as the trainer keeps it)."""
    out = list(full_ids[prompt_len:])
    return out[: out.index(eos_id) + 1] if eos_id in out else out


def rollout_batch(prompt_ids: list[list[int]], responses: list[list[int]]):
    """{response_tokens [B, T] zero-padded prompt + response, response_lengths [B]}: RemoteGPTRMClient's input."""
    import torch

    seqs = [p + r for p, r in zip(prompt_ids, responses)]
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    return {"response_tokens": tokens, "response_lengths": torch.tensor([len(s) for s in seqs])}


def _restore(cfg: SampleConfig):
    """NeMo's MegatronGPTModel from the `.nemo`, frozen, on this torchrun/srun process's GPU."""
    require("nemo_aligner", "online RPO sampling")
    from lightning.pytorch import Trainer
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.parts.nlp_overrides import NLPDDPStrategy, NLPSaveRestoreConnector
    from omegaconf import open_dict

    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    trainer = Trainer(strategy=NLPDDPStrategy(), devices=local, num_nodes=max(world // local, 1), accelerator="gpu",
                      precision=cfg.precision, logger=False, enable_checkpointing=False)  # fmt: skip
    connector = NLPSaveRestoreConnector()
    model_cfg = MegatronGPTModel.restore_from(cfg.policy, trainer=trainer, return_config=True, save_restore_connector=connector)
    with open_dict(model_cfg):
        model_cfg.micro_batch_size = 1
        model_cfg.sequence_parallel = False
        model_cfg.activations_checkpoint_granularity = None
        model_cfg.activations_checkpoint_method = None
        model_cfg.precision = cfg.precision
    model = MegatronGPTModel.restore_from(cfg.policy, trainer=trainer, override_config_path=model_cfg, save_restore_connector=connector)
    model.freeze()
    from megatron.core import parallel_state

    if parallel_state.is_unitialized():  # as NeMo's megatron_gpt_eval.py: `sample` reads the DP group before generate
        if trainer.strategy.launcher is not None:
            trainer.strategy.launcher.launch(lambda: None, trainer=trainer)
        trainer.strategy.setup_environment()
    return model


def sample(cfg: SampleConfig) -> None:
    import torch
    from megatron.core import parallel_state
    from omegaconf import OmegaConf

    client_mod = require("nemo_aligner.models.nlp.gpt.reward_critic_clients", "online RPO sampling")
    texts = read_prompt_texts(cfg.prompts, cfg.max_prompts)
    model = _restore(cfg)
    tok = model.tokenizer
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(texts), dp))
    inputs = [texts[i] for i in mine for _ in range(cfg.responses_per_prompt)]
    out = model.generate(inputs=inputs, length_params={"max_length": cfg.max_new_tokens, "min_length": 1},
                         sampling_params={"use_greedy": False, "temperature": cfg.temperature, "top_k": 0, "top_p": cfg.top_p,
                                          "repetition_penalty": 1.0, "add_BOS": False, "all_probs": False,
                                          "compute_logprob": False, "end_strings": [tok.ids_to_text([tok.eos_id])]})  # fmt: skip
    prompt_ids = [tok.text_to_ids(t) for t in inputs]
    responses = [response_ids(list(full), len(p), tok.eos_id) for full, p in zip(out["token_ids"], prompt_ids)]
    client = client_mod.RemoteGPTRMClient(OmegaConf.create({"reward_model": {"name": cfg.rm_name, "ip": cfg.rm_host,
                                                                              "port": cfg.rm_port}, "pad_to_length": None}))  # fmt: skip
    try:
        rewards = client.infer_rm(rollout_batch(prompt_ids, responses)).result().squeeze(1).float().cpu().tolist()
    finally:
        client.communicator.close()
    g = cfg.responses_per_prompt
    rows = {i: {"prompt": texts[i], "responses": [tok.ids_to_text([t for t in r if t != tok.eos_id]) for r in responses[k * g:(k + 1) * g]],
                "rewards": rewards[k * g:(k + 1) * g]} for k, i in enumerate(mine)}  # fmt: skip
    gathered = [None] * dp
    torch.distributed.all_gather_object(gathered, rows if parallel_state.is_model_parallel_src_rank() else {},
                                        group=parallel_state.get_data_parallel_group(with_context_parallel=False))  # fmt: skip
    if torch.distributed.get_rank() == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        write_text_atomic(cfg.out, "".join(json.dumps(merged[i], ensure_ascii=False) + "\n" for i in sorted(merged)))
    torch.distributed.barrier()


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    cfg = load_config(SampleConfig, overrides=sys.argv[1:] if argv is None else argv)
    for key in ("policy", "prompts", "out"):
        if not getattr(cfg, key):
            raise SystemExit(f"{key} is not set: expected policy=POLICY.nemo prompts=PROMPTS.jsonl out=FILE.jsonl")
    sample(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
