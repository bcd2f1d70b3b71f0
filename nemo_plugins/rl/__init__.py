"""Reinforcement learning for the reasoning stage (GRPO): losses, rewards, their sandbox and an LLM judge."""
