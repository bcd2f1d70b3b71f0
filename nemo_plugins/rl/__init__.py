"""Reinforcement learning after SFT: one loop (GRPO, RLOO, online RPO), its losses, and the rewards behind one protocol (rules in a sandbox, an LLM judge, a reward model)."""
