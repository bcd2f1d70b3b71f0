"""The small tokenizer and start policy the RL tests (GRPO, RLOO, RPO) share."""

import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.chat import render_example
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.train import fit_lm
from nemo_plugins.utils.training import OptimConfig


def rl_tokenizer():
    """A 320-token BPE tokenizer trained on reasoning-world chats."""
    return T.train_tokenizer(rw.chat_texts(rw.generate_problems(300, seed=0)), vocab_size=320)


def start_policy(tok, problems: int = 400, steps: int = 60, off_every: int = 4) -> HeteroLlamaForCausalLM:
    """A 1-layer model briefly trained on `problems` difficulty-1 problems, every `off_every`-th in
    "thinking off" (0: all thinking on): its samples still vary in format and answer, so groups
    and pairs carry a signal."""
    torch.manual_seed(0)
    cfg = homogeneous(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=1, num_attention_heads=4,
                      num_kv_heads=2, intermediate_size=64, rope_theta=10000.0, max_position_embeddings=256)  # fmt: skip
    model = HeteroLlamaForCausalLM(cfg)
    examples = []
    for i, p in enumerate(rw.generate_problems(problems, seed=1, difficulties=(1,))):
        thinking = not off_every or i % off_every != 0
        examples.append(T.encode_example(tok, *render_example(p.question, rw.response_for(p, thinking), thinking)))
    fit_lm(model, examples, steps=steps, batch_size=16, optim=OptimConfig(lr=1e-2, warmup_steps=5), progress=False)
    return model.eval()
