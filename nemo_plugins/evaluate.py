"""Task accuracy of a model on tiny-world problems, by difficulty and reasoning mode."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .data.chat_tokenizer import ChatTokenizer, as_chat
from .data.reasoning_world import Problem, is_correct, is_well_formatted
from .model.generate import SamplingConfig, generate
from .model.llama import HeteroLlamaForCausalLM


def task_accuracy(
    model: HeteroLlamaForCausalLM,
    tok: ChatTokenizer,
    problems: Sequence[Problem],
    *,
    thinking: bool | None = True,
    batch_size: int = 64,
    max_new_tokens: int = 64,
    progress: bool = False,
    verify: Callable[[str, Problem], bool] = is_correct,
) -> dict:
    """Greedy-decode each problem's prompt; report accuracy (`verify`, default the tiny world's
    exact answer) overall and per difficulty.

    Returns {"accuracy", "format_ok", "n", "by_difficulty": {d: accuracy}}.
    """
    if not problems:
        raise ValueError("task_accuracy: no problems given")
    tok = as_chat(tok)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=tok.stop_ids)
    correct: dict[int, list[bool]] = defaultdict(list)
    formatted = 0
    batches = range(0, len(problems), batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress):
        chunk = problems[start : start + batch_size]
        prompts = [tok.prompt_ids(p.question, thinking) for p in chunk]
        outputs = generate(model, prompts, sampling, pad_id=tok.pad_id)
        for p, out in zip(chunk, outputs):
            text = tok.decode_response(out)
            correct[p.difficulty].append(bool(verify(text, p)))
            formatted += bool(thinking is not None and is_well_formatted(text, bool(thinking)))
    every = [c for cs in correct.values() for c in cs]
    return {
        "accuracy": sum(every) / len(every),
        "format_ok": formatted / len(every),
        "n": len(every),
        "by_difficulty": {d: sum(cs) / len(cs) for d, cs in sorted(correct.items())},
    }
