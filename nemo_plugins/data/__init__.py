"""Tiny-world data: a verifiable arithmetic reasoning task, a chat template with a reasoning toggle, and its tokenizer."""
