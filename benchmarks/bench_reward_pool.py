"""Reward throughput: the sandboxed reward pool vs calling the reward function in-process.

For each reward task, a GRPO-like batch of completions (P prompts x G samples, mixed correct
and incorrect) is scored two ways, on the same items:

  sandboxed: `sandbox.RewardPool(partial(rewards.combined_reward, config=...), workers=2)` (with
             its default limits: 2 s and 512 MiB per sample, 100k chars), `pool.map(items)`
  direct:    `sandbox.direct_map(pool.fn, items, ...)`: the same function in a loop in this
             process, same failure accounting, no limits

Tasks: "world" (tiny-world completions `<think>3 + 4 = 7 ...</think>The answer is 42.`, scored
by exact integer match and the strict format) and "math" (math-verify equivalence:
`\\boxed{\\frac{1}{2}}`, `\\boxed{0.5}` or "The answer is 1/2." against the reference "0.5").

Every repetition scores a fresh batch (math-verify and sympy cache parses, and a trainer never
sees the same completions twice); both contestants score the same batch back to back. The pool
is started and warmed up (untimed batches) first; its start-up (constructor, then the first,
cold batch, which waits for the workers) is reported on its own. Figures: samples/s (median
over repetitions), the overhead ratio direct/sandboxed (of medians, and paired: the median of
back-to-back ratios), and the pool's failure counts (0 expected on this clean batch).

Sanity (exit status 1 otherwise): the pool's rewards equal the direct ones on every batch and
neither side counts a failure.

    python benchmarks/bench_reward_pool.py                  # ~1 min on 2 cores
    python benchmarks/bench_reward_pool.py --tasks math --prompts 16 --samples 8 --reps 11
    python benchmarks/bench_reward_pool.py --workers 1 --json pool.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from functools import partial
from collections import Counter
from fractions import Fraction

from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data.chat import THINK_END, THINK_START
from nemo_plugins.rl.rewards import ZERO_REWARD, RewardConfig, combined_reward
from nemo_plugins.rl.sandbox import RewardPool
from nemo_plugins.rl.sandbox import direct_map

TASKS = ("world", "math")
TERMINATING = (2, 4, 5, 8, 10, 16, 20, 25, 40, 50, 100)  # denominators whose fractions end as decimals


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO group size)")
    p.add_argument("--workers", type=int, default=2, help="reward pool worker processes")
    p.add_argument("--reps", type=int, default=9, help="timed batches per contestant and task")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (the first one is the cold start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing (for tests)")
    args = p.parse_args(argv)
    if min(args.prompts, args.samples, args.workers, args.reps, args.warmup) < 1:
        p.error("--prompts, --samples, --workers, --reps and --warmup must be >= 1")
    return args


# ----------------------------------------------------------------------------- completions


def world_sample(p: rw.Problem, rng: random.Random) -> tuple[tuple, bool]:
    """((completion, reference, thinking), intended correct) for one tiny-world problem."""
    thinking = rng.random() < 0.75
    kind = rng.choice(("right", "right", "wrong_answer", "truncated"))
    if kind == "right" or (kind == "truncated" and not thinking):
        return (rw.response_for(p, thinking), p.answer, thinking), True
    if kind == "wrong_answer":
        wrong = p.answer + rng.choice((-3, -2, -1, 1, 2, 3))
        text = rw.response_for(p, thinking).replace(rw.answer_text(p.answer), rw.answer_text(wrong))
        return (text, p.answer, thinking), False
    # ran out of tokens while thinking: the right number only inside the unclosed think block
    steps = "\n".join(p.steps)
    return (f"{THINK_START}{steps}\nso {rw.answer_text(p.answer)}", p.answer, thinking), False


def _decimal(x: Fraction) -> str | None:
    """Exact decimal string of x if its expansion terminates, else None."""
    q = x.denominator
    for f in (2, 5):
        while q % f == 0:
            q //= f
    if q != 1:
        return None
    places = 0
    while (x * 10**places).denominator != 1:
        places += 1
    return f"{float(x):.{places}f}"


def _latex(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


def _math_reasoning(a: int, b: int, rng: random.Random) -> str:
    """A few hundred characters of plausible working for a / b."""
    g = math.gcd(a, b)
    lines = [
        f"We want the value of $\\frac{{{a}}}{{{b}}}$ in lowest terms.",
        f"The greatest common divisor of {a} and {b} is {g}.",
        f"Dividing both by {g}: $\\frac{{{a // g}}}{{{b // g}}}$.",
    ]
    for _ in range(rng.randint(1, 4)):
        k = rng.randint(2, 9)
        p, q = a // g, b // g
        lines.append(f"Check: $\\frac{{{p} \\cdot {k}}}{{{q} \\cdot {k}}} = \\frac{{{p * k}}}{{{q * k}}}$, same ratio.")
    return "\n".join(lines)


def math_sample(a: int, b: int, rng: random.Random) -> tuple[tuple, bool]:
    """((completion, reference, thinking), intended correct) for the fraction a / b."""
    x = Fraction(a, b)
    reference = _decimal(x) or _latex(x)
    thinking = rng.random() < 0.75
    right = [f"\\boxed{{{_latex(x)}}}"]
    k = rng.randint(2, 6)
    right.append(f"\\boxed{{\\frac{{{x.numerator * k}}}{{{x.denominator * k}}}}}")
    if _decimal(x):
        right.append(f"\\boxed{{{_decimal(x)}}}")
    flipped = Fraction(x.denominator, x.numerator) if x != 1 else x + 1
    wrong = [f"\\boxed{{{_latex(x + Fraction(1, x.denominator))}}}", f"\\boxed{{{_latex(flipped)}}}"]
    correct = rng.random() < 0.5
    final = "So the final answer is " + rng.choice(right if correct else wrong) + "."
    if correct and rng.random() < 0.2:  # no box: the "The answer is ..." phrase
        final = f"The answer is {x.numerator}/{x.denominator}."
    if not thinking:
        return (final, reference, False), correct
    working = _math_reasoning(a, b, rng)
    if not correct and rng.random() < 0.3:  # truncated: still thinking when the budget ran out
        return (f"{THINK_START}{working}", reference, True), False
    return (f"{THINK_START}{working}{THINK_END}{final}", reference, True), correct


def make_batch(task: str, prompts: int, samples: int, seed: int) -> tuple[list[tuple], list[bool]]:
    """(items, intended labels): `prompts` problems, `samples` completions each, grouped like GRPO."""
    rng = random.Random(seed)
    items, labels = [], []
    if task == "world":
        for p in rw.generate_problems(prompts, seed=seed):
            for _ in range(samples):
                item, ok = world_sample(p, rng)
                items.append(item)
                labels.append(ok)
    else:
        for _ in range(prompts):
            # half the references are terminating decimals ("0.5"), half LaTeX fractions
            b = rng.choice(TERMINATING if rng.random() < 0.5 else range(3, 100))
            a = rng.randint(1, 2 * b)
            for _ in range(samples):
                item, ok = math_sample(a, b, rng)
                items.append(item)
                labels.append(ok)
    return items, labels


# ----------------------------------------------------------------------------- timing


def timed(fn, *args):
    """(seconds, fn(*args))."""
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def timed_reps(scorers: dict, batches: list[tuple[list, list[bool]]]) -> tuple[dict, dict, dict]:
    """Score every batch with each scorer in turn (back to back): (times, failure counts, checks).

    checks: whether all scorers gave the first one's rewards, its mean accuracy, and how many of
    its rewards agree with the labels the completions were built with.
    """
    times = {k: [] for k in scorers}
    fail = {k: Counter() for k in scorers}
    mismatches, accuracy, label_agree = 0, [], 0
    for items, labels in batches:
        values = {}
        for name, score in scorers.items():
            t, (values[name], failures) = timed(score, items)
            times[name].append(t)
            fail[name].update(failures)
        first, *others = values.values()
        mismatches += sum(a != b for other in others for a, b in zip(first, other))
        accuracy += [v.accuracy for v in first]
        label_agree += sum((v.accuracy == 1.0) == ok for v, ok in zip(first, labels))
    checks = {
        "rewards_equal": mismatches == 0,
        "reward_mismatches": mismatches,
        "accuracy_mean": statistics.fmean(accuracy),
        "intended_labels_agreeing": f"{label_agree}/{len(accuracy)}",
    }
    return times, fail, checks


def run_task(task: str, args) -> dict:
    """Start and warm a pool, then score fresh batches direct and sandboxed, back to back."""
    n = args.prompts * args.samples
    seeds = [args.seed * 100_003 + i for i in range(args.warmup + args.reps)]
    batches = [make_batch(task, args.prompts, args.samples, seed) for seed in seeds]
    reward = partial(combined_reward, config=RewardConfig(task=task))
    construct_s, pool = timed(lambda: RewardPool(reward, workers=args.workers, failure_value=ZERO_REWARD))
    try:

        def direct(items):
            return direct_map(pool.fn, items, max_chars=pool.max_chars, failure_value=pool.failure_value)

        first_pool_s, _ = timed(pool.map, batches[0][0])
        first_direct_s, _ = timed(direct, batches[0][0])
        for items, _ in batches[1 : args.warmup]:
            pool.map(items)
            direct(items)
        times, fail, checks = timed_reps({"direct": direct, "sandboxed": pool.map}, batches[args.warmup :])
        lifetime_failures = dict(pool.failures)
    finally:
        pool.close()

    res = {"batch": n, "reps": args.reps}
    for who, t in times.items():
        med = statistics.median(t)
        res[who] = {"median_s": med, "samples_per_s": n / med, "times_s": t, "failures": dict(fail[who])}
    res["overhead_direct_over_sandboxed"] = res["direct"]["samples_per_s"] / res["sandboxed"]["samples_per_s"]
    res["paired_overhead_direct_over_sandboxed"] = statistics.median(
        p / d for d, p in zip(times["direct"], times["sandboxed"])
    )
    res["startup"] = {
        "construct_s": construct_s, "first_batch_pool_s": first_pool_s, "first_batch_direct_s": first_direct_s,
    }  # fmt: skip
    res["pool_failures_lifetime"] = lifetime_failures
    res.update(checks)
    return res


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    tasks = {task: run_task(task, args) for task in args.tasks}
    result = {
        "env": {"python": platform.python_version(), "cpus": os.cpu_count(), "workers": args.workers},
        "settings": {"prompts": args.prompts, "samples": args.samples, "reps": args.reps, "warmup": args.warmup},
        "tasks": tasks,
        "sanity": sanity(tasks),
    }
    say(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        say(f"wrote {args.json}")
    return result


def sanity(tasks: dict) -> dict:
    """Rewards identical both ways, and no failure on either side, for every task."""
    return {
        "rewards_equal": all(t["rewards_equal"] for t in tasks.values()),
        "failures_zero": all(
            not t["direct"]["failures"] and not t["sandboxed"]["failures"] and not t["pool_failures_lifetime"]
            for t in tasks.values()
        ),
    }


def format_report(r: dict) -> str:
    e, s = r["env"], r["settings"]
    lines = [
        f"python={e['python']} cpus={e['cpus']} pool workers={e['workers']} (default limits) | "
        f"batch = {s['prompts']} prompts x {s['samples']} samples, a fresh batch per rep | "
        f"{s['reps']} reps after {s['warmup']} warm-up batch(es), direct and sandboxed back to back, median",
        "",
        f"{'task':6s} {'direct samples/s':>17s} {'sandboxed samples/s':>20s} "
        f"{'direct/sandboxed':>17s} {'paired':>7s}  {'pool failures':>13s}  accuracy (labels agreeing)",
    ]
    for task, t in r["tasks"].items():
        fails = t["sandboxed"]["failures"]
        lines.append(
            f"{task:6s} {t['direct']['samples_per_s']:17.0f} {t['sandboxed']['samples_per_s']:20.0f} "
            f"{t['overhead_direct_over_sandboxed']:16.2f}x {t['paired_overhead_direct_over_sandboxed']:6.2f}x  "
            f"{sum(fails.values()) if fails else 0:>13d}  {t['accuracy_mean']:.2f} ({t['intended_labels_agreeing']})"
        )
    lines += ["", "pool start-up (untimed above): constructor, then the first (cold) batch, which waits for workers:"]
    for task, t in r["tasks"].items():
        su = t["startup"]
        lines.append(
            f"  {task:6s} constructor {su['construct_s'] * 1e3:7.1f} ms; first batch {su['first_batch_pool_s']:.3f} s "
            f"sandboxed vs {su['first_batch_direct_s']:.3f} s direct; pool failures over its lifetime: "
            f"{t['pool_failures_lifetime'] or 0}"
        )
    st = r["sanity"]
    lines += [
        "",
        f"sanity: rewards sandboxed == direct: {'yes' if st['rewards_equal'] else 'NO'}; "
        f"failures zero (both sides): {'yes' if st['failures_zero'] else 'NO'}",
    ]
    return "\n".join(lines)


def passed(r: dict) -> bool:
    """The exit criterion: sanity holds and every figure is a positive finite number."""
    ratios = ("overhead_direct_over_sandboxed", "paired_overhead_direct_over_sandboxed")
    figures = [t[k] for t in r["tasks"].values() for k in ratios]
    figures += [t[c]["samples_per_s"] for t in r["tasks"].values() for c in ("direct", "sandboxed")]
    return r["sanity"]["rewards_equal"] and r["sanity"]["failures_zero"] and all(
        math.isfinite(v) and v > 0 for v in figures
    )


if __name__ == "__main__":
    sys.exit(0 if passed(main()) else 1)
