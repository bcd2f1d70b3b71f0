"""GPU tier (skipped without CUDA): the reference model gives the same results on the GPU."""

import pytest
import torch

from nemo_plugins.arch import RopeScaling, homogeneous
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model.generate import SamplingConfig, generate

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    cfg = homogeneous(vocab_size=101, hidden_size=64, num_layers=2, num_attention_heads=8, num_kv_heads=2,
                      intermediate_size=160, rope_theta=10000.0, rope_scaling=RopeScaling(original_max_position_embeddings=32))  # fmt: skip
    return HeteroLlamaForCausalLM(cfg).eval()


def test_cuda_logits_match_cpu():
    cpu = _model()
    gpu = _model().cuda()
    x = torch.randint(0, 101, (2, 64))
    with torch.no_grad():
        diff = (cpu(x) - gpu(x.cuda()).cpu()).abs().max().item()
    assert diff < 1e-4


def test_cuda_kv_cache_generation_matches_recompute():
    model = _model().cuda()
    prompts = [[1, 2, 3, 4], [5, 6]]
    cfg = SamplingConfig(max_new_tokens=12)
    assert generate(model, prompts, cfg) == generate(model, prompts, cfg, use_cache=False)
