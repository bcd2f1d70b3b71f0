"""Pass rates of a model on RL prompts: k sampled completions per prompt, checked by the task's
verifier, cached per (model, prompts, sampling). What GRPO's data filtering and curriculum
levels (`data.curriculum`) are built from."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from ..data.chat_tokenizer import ChatTokenizer, as_chat
from ..data.curriculum import problems_by_id
from ..data.reasoning_world import Problem, is_correct
from ..evaluate import check_answers
from ..model.generate import SamplingConfig
from ..model.rollout import RolloutConfig, sample_questions, with_stop_tokens
from ..utils.atomic import write_json_atomic

log = logging.getLogger("nemo_plugins.curriculum")

CACHE_FORMAT = 1  # bump when the estimate changes, so stale caches are not reused


def _pass_rate_sampling(sampling: SamplingConfig | None, stops: Sequence[int]) -> SamplingConfig:
    """The sampling config for pass rates: temperature 1 by default, always stopping at EOS."""
    sampling = sampling or SamplingConfig(max_new_tokens=64, temperature=1.0)
    if sampling.temperature <= 0:
        raise ValueError(
            f"sampling.temperature={sampling.temperature}: expected > 0 (k greedy samples would be identical)"
        )
    return with_stop_tokens(sampling, stops)


def _cache_key(model_id: str, k: int, seed: int, sampling: SamplingConfig, thinking, ids: Sequence[str]) -> dict:
    """Everything the estimate depends on, JSON-normalized so it compares equal after a round trip."""
    ids_hash = hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()
    key = {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "k": k,
        "seed": seed,
        "thinking": thinking,
        "sampling": asdict(sampling),
        "n_problems": len(ids),
        "problem_ids_sha256": ids_hash,
    }
    return json.loads(json.dumps(key))


def _read_cache(path: Path, key: dict) -> dict[str, float] | None:
    """Cached pass rates if `path` holds an estimate for exactly `key`, else None."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("pass-rate cache %s is unreadable (%s); re-estimating", path, e)
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("pass_rates"), dict):
        log.info("pass-rate cache %s is for other settings; re-estimating", path)
        return None
    return {str(i): float(r) for i, r in data["pass_rates"].items()}


def _sample_pass_rates(
    model, tok: ChatTokenizer, problems: Mapping[str, Problem], k: int, sampling: SamplingConfig,
    batch_size: int, seed: int, thinking, progress: bool, verify: Callable[[str, Problem], bool],
) -> dict[str, float]:  # fmt: skip
    """k sampled completions per problem (`model.rollout`), scored by `verify`."""
    ids = list(problems)
    cfg = RolloutConfig(sampling, n=k, batch_size=batch_size, seed=seed)
    done = sample_questions(model, tok, [problems[i].question for i in ids], thinking, cfg,
                            progress=progress, desc="pass rates")  # fmt: skip
    correct = dict.fromkeys(ids, 0)
    for j, ok in enumerate(check_answers(verify, done.texts, [problems[i] for i in ids for _ in range(k)])):
        correct[ids[j // k]] += ok
    return {i: c / k for i, c in correct.items()}


def estimate_pass_rates(
    model,
    tokenizer: ChatTokenizer,
    problems: Sequence[Problem],
    k: int,
    *,
    sampling: SamplingConfig | None = None,
    batch_size: int = 64,
    seed: int = 0,
    cache_path: str | Path | None = None,
    model_id: str | None = None,
    thinking: bool | None = True,
    progress: bool = False,
    verify: Callable[[str, Problem], bool] = is_correct,
) -> dict[str, float]:
    """{problem_id: fraction of k sampled completions with the correct final answer}.

    Completions come from the KV-cache sampler (`sampling`, default temperature 1, 64 new
    tokens; EOS is always a stop token), prompts rendered in the `thinking` mode as in
    `evaluate.py`; `batch_size` counts sequences (prompt x sample) per generate call, and a
    torch generator seeded with `seed` makes the estimate reproducible. With `cache_path`, the
    result is stored there atomically, keyed by (`model_id`, k, seed, sampling, thinking,
    problem ids); a cache written for other settings is ignored and overwritten.
    """
    if k < 1:
        raise ValueError(f"k={k}: expected >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if not problems:
        raise ValueError("estimate_pass_rates: no problems given")
    if cache_path is not None and not model_id:
        raise ValueError(f"model_id={model_id!r}: expected a non-empty model identity when cache_path is set")
    by_id = problems_by_id(problems)
    tokenizer = as_chat(tokenizer)
    sampling = _pass_rate_sampling(sampling, tokenizer.stop_ids)
    key = _cache_key(model_id or "", k, seed, sampling, thinking, list(by_id))
    if cache_path is not None:
        cached = _read_cache(Path(cache_path), key)
        if cached is not None:
            return cached
    rates = _sample_pass_rates(model, tokenizer, by_id, k, sampling, batch_size, seed, thinking, progress, verify)
    if cache_path is not None:
        write_json_atomic(cache_path, {"key": key, "pass_rates": rates})
    return rates
