"""From a rollout's token ids back to its prompt row: the index the reward server scores through.

Aligner's `RemoteGPTRMClient` sends only `tokens` (prompt + response, zero-padded) and
`sequence_lengths`; no prompt id or reference answer reaches the server. The prompt's tokens are
the row's start, so the index keys each row by its prompt ids (the same tokenizer and rendering
as the trainer's dataset) and a lookup tries the known prompt lengths, longest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .prompt_set import PromptRow


class PromptIndex:
    """{prompt token ids: row}; `match` finds the row a token sequence starts with."""

    def __init__(self, rows: Sequence[PromptRow], encode: Callable[[str], list[int]]):
        self.by_ids: dict[tuple[int, ...], PromptRow] = {}
        for row in rows:
            key = tuple(encode(row.text))
            if not key:
                raise ValueError(f"prompt row {row.index} ({row.problem_id}) encodes to no tokens")
            other = self.by_ids.get(key)
            if other is not None:
                raise ValueError(
                    f"prompt rows {other.index} and {row.index} encode to the same tokens: the server could not "
                    "tell their references apart (same question, or a template that ignores the thinking mode?)"
                )
            self.by_ids[key] = row
        self.lengths = sorted({len(k) for k in self.by_ids}, reverse=True)

    def __len__(self) -> int:
        return len(self.by_ids)

    def match(self, tokens: Sequence[int]) -> tuple[PromptRow, int] | None:
        """(row, prompt length) of the longest known prompt that `tokens` starts with, or None."""
        tokens = tuple(tokens)
        for n in self.lengths:
            if n <= len(tokens):
                row = self.by_ids.get(tokens[:n])
                if row is not None:
                    return row, n
        return None
