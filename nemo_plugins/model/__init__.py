"""Reference heterogeneous Llama, checkpoints and generation."""

from .llama import HeteroLlamaForCausalLM, KVCache, causal_lm_loss

__all__ = ["HeteroLlamaForCausalLM", "KVCache", "causal_lm_loss"]
