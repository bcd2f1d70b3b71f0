"""Does a reward model rank a policy's *own* right answers above its wrong ones? (tiny world)

A reward model's accuracy on its held-out pairs says how well it separates the pairs it was
trained on. RPO climbs it on the policy's own samples, so what matters there is how it ranks
those. For each reward model this samples `--samples` responses per prompt from `--policy`
(thinking on, temperature 1.0, `--max-new-tokens`, one fixed seed, so every reward model scores the
same texts) on the reward_model stage's held-out prompt sets ("tuning" and "report", difficulties
2-4, the prompts of `reward_model_stage.pair_prompts`), verifies them, and reports per set:

- `pair_accuracy`: over every (right, wrong) pair of responses to the same prompt, how often the
  right one scores higher (ties ½); 0.5 is chance. A response is right when its answer is correct
  and its think block well formed.
- `accuracy_by_error`: the same, split by what went wrong in the wrong response: `slip` (a step
  whose result is not its own arithmetic), `misread` (every step's arithmetic right, but an operand
  or operation differs from the question's), `other` (a different step count, or unparsable steps).
- `top_pass` / `bottom_pass`: in groups of the first `--group-size` samples that hold both right
  and wrong ones, how often the top-scored and the bottom-scored sample is right: what RPO's
  best-against-worst pairs choose and reject.

    python benchmarks/bench_reward_ranking.py --policy outputs/tiny/rloo/model \\
        --reward-models outputs/tiny/reward_model /tmp/rm_other --json ranking.json

About a minute per reward model on two CPU cores at the defaults (300 prompts a set, 8 samples).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

from nemo_plugins.data.problems import ProblemSet
from nemo_plugins.data.chat import THINK_END, THINK_START
from nemo_plugins.data.reasoning_world import OPS, STEP_SEP, Problem, has_think_block, is_correct
from nemo_plugins.data.tiny_world import build_world
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.generate import SamplingConfig
from nemo_plugins.model.rollout import RolloutConfig, sample_questions
from nemo_plugins.pipeline import load_pipeline_config
from nemo_plugins.rl.reward_model import load_reward_model, score_sequences
from nemo_plugins.rl.reward_model_stage import RewardModelStageConfig, pair_prompts
from nemo_plugins.utils.atomic import write_json_atomic

SETS = ("tuning", "report")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="the policy's model directory")
    p.add_argument("--reward-models", nargs="+", required=True, help="reward model directories (reward_model stage outputs)")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--prompts", type=int, default=300, help="prompts per set")
    p.add_argument("--samples", type=int, default=8, help="responses per prompt")
    p.add_argument("--group-size", type=int, default=4, help="RPO's group: the first this many samples")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if min(args.prompts, args.samples, args.max_new_tokens) < 1 or not 2 <= args.group_size <= args.samples:
        p.error("--prompts, --samples and --max-new-tokens must be >= 1, and 2 <= --group-size <= --samples")
    return args


def error_kind(response: str, problem: Problem) -> str:
    """What went wrong in a wrong thinking-on response: "slip", "misread" or "other" (module doc)."""
    lines = response.split(THINK_END)[0].removeprefix(THINK_START).split(STEP_SEP)
    if len(lines) != len(problem.steps):
        return "other"
    slip = misread = False
    for line, right in zip(lines, problem.steps):
        parts, want = line.split(), right.split()
        if len(parts) != 5 or parts[1] not in OPS or parts[3] != "=" or not all(x.lstrip("-").isdigit() for x in parts[0::2]):
            return "other"
        a, op, b, c = int(parts[0]), parts[1], int(parts[2]), int(parts[4])
        slip |= OPS[op](a, b) != c
        misread |= (op, b) != (want[1], int(want[2]))
    return "slip" if slip else "misread" if misread else "other"


def ranking(scores: list[list[float]], right: list[list[bool]], kinds: list[list[str | None]], group_size: int) -> dict:
    """The module doc's figures from per-prompt scores, verdicts and error kinds (None where right)."""
    wins: list[float] = []
    by_kind: dict[str, list[float]] = {}
    top, bottom = [], []
    for s, ok, kind in zip(scores, right, kinds, strict=True):
        for a, b in itertools.product(range(len(s)), repeat=2):
            if ok[a] and not ok[b]:
                w = 1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0
                wins.append(w)
                by_kind.setdefault(kind[b], []).append(w)
        g = range(min(group_size, len(s)))
        if any(ok[k] for k in g) and not all(ok[k] for k in g):
            top.append(ok[max(g, key=lambda k: s[k])])
            bottom.append(ok[min(g, key=lambda k: s[k])])
    mean = lambda v: statistics.fmean(v) if v else None  # noqa: E731
    return {"pair_accuracy": mean(wins), "pairs": len(wins),
            "accuracy_by_error": {k: {"accuracy": mean(v), "pairs": len(v)} for k, v in sorted(by_kind.items())},
            "mixed_groups": len(top), "top_pass": mean(top), "bottom_pass": mean(bottom)}  # fmt: skip


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_pipeline_config(None, [f"cache_dir={args.cache_dir}"] if args.cache_dir else [])
    world = build_world(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)
    chat = world.chat
    prompts = pair_prompts(ProblemSet(world), RewardModelStageConfig(difficulties=[2, 3, 4], heldout_pairs=args.prompts))
    policy = load_checkpoint(args.policy).eval()
    rollout = RolloutConfig(SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0), n=args.samples,
                            batch_size=256, seed=args.seed)  # fmt: skip
    samples = {}
    for name in args.sets:
        problems = prompts[name]
        done = sample_questions(policy, chat, [p.question for p in problems], True, rollout)
        texts = [done.texts[i * args.samples : (i + 1) * args.samples] for i in range(len(problems))]
        right = [[is_correct(t, p) and has_think_block(t) for t in ts] for p, ts in zip(problems, texts)]
        kinds = [[None if r else error_kind(t, p) for t, r in zip(ts, rs)] for p, ts, rs in zip(problems, texts, right)]
        samples[name] = (problems, texts, right, kinds)
    out = {"policy": args.policy, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "quiet")},
           "samples": {n: {"prompts": len(s[0]), "right": sum(map(sum, s[2])), "responses": len(s[0]) * args.samples,
                           "errors": {k: sum(x == k for ks in s[3] for x in ks) for k in ("slip", "misread", "other")}}
                       for n, s in samples.items()},
           "reward_models": {}}  # fmt: skip
    for rm_dir in args.reward_models:
        rm = load_reward_model(rm_dir).eval()
        out["reward_models"][rm_dir] = {}
        for name, (problems, texts, right, kinds) in samples.items():
            seqs = [chat.example_ids(p.question, t, True)[0] for p, ts in zip(problems, texts) for t in ts]
            with torch.no_grad():
                flat = score_sequences(rm, seqs, chat.pad_id).tolist()
            scores = [flat[i * args.samples : (i + 1) * args.samples] for i in range(len(problems))]
            res = ranking(scores, right, kinds, args.group_size)
            out["reward_models"][rm_dir][name] = res
            if not args.quiet:
                by = ", ".join(f"{k} {_fmt(v['accuracy'])} ({v['pairs']})" for k, v in res["accuracy_by_error"].items())
                print(f"{rm_dir} [{name}]: pair accuracy {_fmt(res['pair_accuracy'])} over {res['pairs']} pairs ({by}); "
                      f"top-scored right {_fmt(res['top_pass'])}, bottom-scored right {_fmt(res['bottom_pass'])} "
                      f"in {res['mixed_groups']} mixed groups")  # fmt: skip
    if args.json:
        write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
