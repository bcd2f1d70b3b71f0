"""nemo_plugins: the Llama-Nemotron recipe (Puzzle NAS, FFN Fusion, recovery, reasoning toggle, GRPO) for NeMo users.

The core (arch, model, data, ...) depends only on PyTorch and small libraries; the NeMo and
Megatron adapters (`nemo_plugins.nemo`) import those frameworks lazily.
"""

__version__ = "0.1.0"
