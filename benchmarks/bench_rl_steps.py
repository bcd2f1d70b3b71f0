"""RL step time: one step of RLOO and of online RPO against one step of GRPO, at equal tokens.

Each algorithm runs ONE step of the shared loop (`rl.loop.run_loop`: sample -> score -> prepare
-> update) through its own public pieces: GRPO `rl.grpo.run_grpo`, RLOO `rl.rloo.run_rloo`, RPO
`rl.loop.run_loop` with `rl.rpo.RPO` (what `run_rpo` runs per round; called directly so that the
round's seed is the same as the others', see below). The time of a step is the loop's own
`time_s` of that step (its metrics row): from the start of the step to its metrics, so it leaves
out the Trainer's start, the reference copy, the checkpoint and the plot the run writes after.

Equal work where the algorithms share it: every run starts from the same policy (a fresh copy of
the starting weights, so every repetition does the same work), with the same prompts (the `rloo`
stage's instruction-augmented training prompts, `rloo_stage.training_prompts`, in random order,
which RLOO needs and GRPO and RPO read like any prompt), the same prompts_per_step x group_size,
max_new_tokens, temperature, top_p, thinking on, generate batch, micro-batch and seed. The loop
seeds the rollout by (seed, step) alone, so all three sample the SAME completions: the same
generated tokens per step (printed and checked: same prompt batch hash and same lengths).
`--prompt-set own` gives GRPO and RPO the same problems WITHOUT the instruction (what their
stages train on; a policy not trained on instructions answers those differently): the same
problems are drawn, the completions and their token counts then differ, hence per-token figures.
Everything else is each algorithm's own setting from the pipeline's config (conf/*/tiny.yaml;
`key=value` overrides as for the pipeline): GRPO drops zero-variance groups and logs the KL to
the reference, RLOO trains every sequence with its KL loss term, RPO scores every sequence with
the reward model and trains the best/worst pairs against the reference. What each step includes
is printed beside the figures, with the sequences and tokens each one trained on.

The reward model of RPO: `--reward-model DIR` (a directory `reward_model.save_reward_model`
wrote, e.g. the pipeline's reward_model stage output); by default the architecture the stage
trains, `RewardModel` on a copy of the starting policy with a fresh seeded head: the same
forward cost, untrained scores (which only decide which responses pair up).

Repetitions are interleaved (GRPO, RLOO, RPO, GRPO, ...) after `--warmup` untimed rounds (the
first also starts each algorithm's reward pool); per algorithm it prints the median seconds per
step, generated tokens per step, seconds per 1k generated tokens, and RLOO/GRPO and RPO/GRPO per
token, as the ratio of medians and as the median of the per-round ratios ("paired").

    python benchmarks/bench_rl_steps.py                            # tiny parent, 16 x 8, <= 64 tokens
    python benchmarks/bench_rl_steps.py --prompts 32 --group-size 8 --reps 3
    python benchmarks/bench_rl_steps.py --model DIR --reward-model RM_DIR --json steps.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.data.curriculum import problems_by_id
from nemo_plugins.data.problems import ProblemSet
from nemo_plugins.data.reasoning_world import Problem
from nemo_plugins.data.tiny_world import build_world
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.pipeline import load_pipeline_config, parent_source
from nemo_plugins.rl.grpo import run_grpo
from nemo_plugins.rl.loop import run_loop
from nemo_plugins.rl.reward_model import RewardModel, RewardModelScorer, load_reward_model
from nemo_plugins.rl.rloo import run_rloo
from nemo_plugins.rl.rloo_stage import training_prompts
from nemo_plugins.rl.rpo import RPO

ALGORITHMS = ("grpo", "rloo", "rpo")
PROMPT_SETS = ("instructed", "own")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF Llama directory, .gguf file or package:NAME (default: the tiny parent from the cache)")  # fmt: skip
    p.add_argument("--reward-model", default=None,
                   help="RPO's reward model directory (default: a fresh head on a copy of the starting policy)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=16, help="prompts per step, all three algorithms")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (GRPO's G, RLOO's k, RPO's n)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompt-set", choices=PROMPT_SETS, default="instructed",
                   help="instructed: all three on RLOO's instruction-augmented prompts (the same completions); "
                        "own: GRPO and RPO on the same problems without the instruction, as their stages train")  # fmt: skip
    p.add_argument("--reps", type=int, default=3, help="timed steps per algorithm")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of the three first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: stable on a shared machine)")  # fmt: skip
    p.add_argument("--reward-workers", type=int, default=None,
                   help="reward sandbox processes for all three (default: each config's own; 0: in-process)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing (for tests)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="pipeline config overrides, e.g. grpo.loss.kl_beta=0.01 rpo.loss=dpo")  # fmt: skip
    args = p.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected >= 1")
    if args.group_size < 2:
        p.error(f"--group-size={args.group_size}: expected >= 2 (a group needs a baseline)")
    if not args.temperature > 0:
        p.error(f"--temperature={args.temperature}: expected > 0 (the algorithms sample)")
    for name in ("warmup", "seed"):
        if getattr(args, name) < 0:
            p.error(f"--{name}={getattr(args, name)}: expected >= 0")
    if args.reward_workers is not None and args.reward_workers < 0:
        p.error(f"--reward-workers={args.reward_workers}: expected >= 0 (0: in-process)")
    return args


# ----------------------------------------------------------------------------- setup


def shared_settings(args) -> dict:
    """The loop settings all three get: the same prompts, tokens, sampling and seed, one step."""
    return {"steps": 1, "prompts_per_step": args.prompts, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": 1.0,
            "off_fraction": 0.0, "generation_batch_size": 256, "micro_batch_size": 64, "seed": args.seed,
            "eval_every": 0, "ckpt_every": 1, "keep_last": 1}  # fmt: skip


def configs(pipeline_cfg, args) -> dict:
    """Each algorithm's loop config: its own settings, the shared ones replaced, and one prompt
    order for all (RLOO's random sampler settings: the sampler draws the step's prompts)."""
    shared = shared_settings(args)
    order = {**dataclasses.asdict(pipeline_cfg.rloo.curriculum), "kind": "random"}
    out = {}
    for name in ALGORITHMS:
        cfg = getattr(pipeline_cfg, name)
        rewards = cfg.rewards if args.reward_workers is None else dataclasses.replace(cfg.rewards, workers=args.reward_workers)
        curriculum = type(cfg.curriculum)(**order)
        extra = {"iterations": 1} if name == "rpo" else {}
        out[name] = dataclasses.replace(cfg, rewards=rewards, curriculum=curriculum, **shared, **extra)
    return out


def load_setup(args, cache_dir: str | None = None) -> dict:
    """The starting policy, its chat tokenizer, the prompts, the three configs and RPO's reward model."""
    overrides = ["progress=false", *([f"parent.path={args.model}"] if args.model else []),
                 *([f"cache_dir={cache_dir}"] if cache_dir else []), *args.overrides]  # fmt: skip
    pcfg = load_pipeline_config(None, overrides)
    world = build_world(pcfg.world, Path(pcfg.cache_dir) if pcfg.cache_dir else None)
    source = parent_source(pcfg, world)
    policy = load_checkpoint(source, dtype=torch.float32).eval()
    cfgs = configs(pcfg, args)
    instructed = problems_by_id(training_prompts(ProblemSet(world), cfgs["rloo"]))
    # The same problems under the same ids (so the sampler draws the same ones), without the instruction.
    plain = {pid: Problem(p.base_question, p.steps, p.answer, p.difficulty) for pid, p in instructed.items()}
    prompts = {name: instructed if name == "rloo" or args.prompt_set == "instructed" else plain for name in ALGORITHMS}
    if args.reward_model:
        rm, rm_source = load_reward_model(args.reward_model), str(Path(args.reward_model).resolve())
    else:
        torch.manual_seed(args.seed)
        rm, rm_source = RewardModel(copy.deepcopy(policy)), "fresh head on a copy of the starting policy (untrained)"
    return {"source": source, "policy": policy, "chat": ChatTokenizer.from_dir(source), "prompts": prompts,
            "cfgs": cfgs, "reward_model": rm.eval(), "reward_model_source": rm_source}  # fmt: skip


# ----------------------------------------------------------------------------- one step


def one_step(name: str, setup: dict, scorers: dict, out_dir: Path) -> dict:
    """Run one loop step of algorithm `name` from a fresh copy of the starting policy; its metrics row."""
    policy = copy.deepcopy(setup["policy"])
    cfg, chat, prompts = setup["cfgs"][name], setup["chat"], setup["prompts"][name]
    rates = dict.fromkeys(prompts, 0.0)
    if name == "grpo":
        summary = run_grpo(policy, chat, prompts, rates, cfg, out_dir, rewarder=scorers[name])
    elif name == "rloo":
        summary = run_rloo(policy, chat, prompts, cfg, out_dir, scorer=scorers[name])
    else:
        algorithm = RPO(cfg, RewardModelScorer(setup["reward_model"], chat, cfg.score_batch_size))
        summary = run_loop(policy, chat, prompts, rates, cfg, algorithm, out_dir, scorer=scorers[name])
    (row,) = summary["history"]
    return row


def generated_tokens(row: dict, sequences: int) -> int:
    """Tokens the step generated: the mean response length (EOS included) x sequences (thinking on)."""
    return round(row["len_on"] * sequences)


def step_contents(cfgs: dict) -> dict[str, str]:
    """What one timed step of each algorithm does, from its config."""
    g, r, p = cfgs["grpo"], cfgs["rloo"], cfgs["rpo"]
    n = g.prompts_per_step * g.group_size

    def reference(cfg, what: str) -> str:
        if not cfg.needs_reference:
            return "no reference forward"
        why = f"KL loss term, kl_beta {cfg.loss.kl_beta}" if cfg.loss.kl_beta > 0 else "KL only logged (log_ref_kl)"
        return f"reference forward (no grad) on {what} ({why})"

    def updates(cfg) -> str:
        old = "; the old policy's forward first" if cfg.updates_per_rollout > 1 else ""
        return f"{cfg.updates_per_rollout} optimizer step(s) (forward + backward + AdamW){old}"

    return {
        "grpo": f"rollout of {n} sequences; rule reward in the reward pool (accuracy + format) + overlong penalty; "
                f"group advantages, zero-variance groups {'dropped' if g.loss.drop_zero_variance else 'kept'}; "
                f"{reference(g, 'the kept sequences')}; {updates(g)} over the kept sequences, clipped loss",
        "rloo": f"rollout of {n} sequences; instruction verifier + rule reward in the reward pool + overlong penalty; "
                f"leave-one-out advantages, every sequence kept; {reference(r, 'every sequence')}; "
                f"{updates(r)} over every sequence, REINFORCE loss",
        "rpo": f"rollout of {n} sequences; rule reward in the reward pool (logged only); reward-model forward (no grad) "
               f"on all {n} sequences ({p.score_batch_size} per forward); best/worst pair per prompt, ties skipped; "
               f"reference forward (no grad) on the paired sequences (the loss's log-ratio to the previous round's "
               f"policy); {updates(p)} over the pairs, {p.loss} loss (beta {p.beta}, eta {p.eta})",
    }  # fmt: skip


# ----------------------------------------------------------------------------- timing


def interleaved(setup: dict, reps: int, warmup: int, work_dir: Path) -> dict:
    """`warmup` untimed then `reps` timed rounds of one step each of GRPO, RLOO, RPO in turn; per
    algorithm the metrics rows of the timed steps."""
    cfgs = setup["cfgs"]
    scorers = {"grpo": cfgs["grpo"].rewards.scorer(), "rloo": cfgs["rloo"].scorer(), "rpo": cfgs["rpo"].rewards.scorer()}
    rows: dict[str, list[dict]] = {name: [] for name in ALGORITHMS}
    try:
        for i in range(warmup + reps):
            for name in ALGORITHMS:
                row = one_step(name, setup, scorers, work_dir / f"{name}-{i}")
                if i >= warmup:
                    rows[name].append(row)
    finally:
        for s in scorers.values():
            s.close()
    return rows


def summarize(rows: dict[str, list[dict]], sequences: int) -> dict:
    """Per algorithm: step times, tokens, medians, s per 1k tokens; ratios against GRPO per token."""
    out: dict = {"algorithms": {}}
    for name, rs in rows.items():
        times = [r["time_s"] for r in rs]
        tokens = [generated_tokens(r, sequences) for r in rs]
        per_1k = [1000 * t / n for t, n in zip(times, tokens)]
        out["algorithms"][name] = {
            "times_s": times, "generated_tokens": tokens, "median_s": statistics.median(times),
            "median_generated_tokens": statistics.median(tokens), "s_per_1k_tokens": statistics.median(per_1k),
            "s_per_1k_tokens_each": per_1k, "batches": [r["batch"] for r in rs],
            "seqs_trained": [r["seqs_trained"] for r in rs], "tokens_trained": [r["tokens_trained"] for r in rs],
            "updates": [r["updates"] for r in rs], "groups_dropped": [r.get("groups_dropped") for r in rs],
            "pairs": [r.get("pairs") for r in rs], "pass_rate": [r["pass_rate"] for r in rs],
        }  # fmt: skip
    a = out["algorithms"]
    for name in ("rloo", "rpo"):
        out[f"ratio_{name}_over_grpo"] = a[name]["s_per_1k_tokens"] / a["grpo"]["s_per_1k_tokens"]
        out[f"paired_ratio_{name}_over_grpo"] = statistics.median(
            x / g for x, g in zip(a[name]["s_per_1k_tokens_each"], a["grpo"]["s_per_1k_tokens_each"])
        )  # fmt: skip
    out["same_prompt_batch"] = len({b for al in a.values() for b in al["batches"]}) == 1
    out["same_generated_tokens"] = len({n for al in a.values() for n in al["generated_tokens"]}) == 1
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None, cache_dir: str | None = None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    load = _loadavg()
    setup = load_setup(args, cache_dir)
    sequences = args.prompts * args.group_size
    with tempfile.TemporaryDirectory(prefix="bench-rl-steps-") as tmp:
        t0 = time.perf_counter()
        rows = interleaved(setup, args.reps, args.warmup, Path(tmp))
        wall = time.perf_counter() - t0
    cfgs, policy = setup["cfgs"], setup["policy"]
    result = {
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
                "dtype": "fp32", "device": str(policy.lm_head.weight.device), "loadavg_before": load,
                "loadavg_after": _loadavg(), "wall_s": wall},  # fmt: skip
        "model": {"source": str(setup["source"]), "params": policy.num_parameters(),
                  "layers": policy.config.num_layers, "reward_model": setup["reward_model_source"]},  # fmt: skip
        "workload": {"prompts_per_step": args.prompts, "group_size": args.group_size, "sequences": sequences,
                     "max_new_tokens": args.max_new_tokens, "requested_token_budget": sequences * args.max_new_tokens,
                     "prompt_set": args.prompt_set, "temperature": args.temperature, "top_p": 1.0, "thinking": "on", "reps": args.reps,
                     "warmup": args.warmup, "seed": args.seed,
                     "reward_workers": {n: c.rewards.workers for n, c in cfgs.items()},
                     "budgets": {n: c.prompts_per_step * c.group_size * c.max_new_tokens for n, c in cfgs.items()}},  # fmt: skip
        "includes": step_contents(cfgs),
        **summarize(rows, sequences),
    }
    say(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        say(f"wrote {args.json}")
    return result


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def format_report(r: dict) -> str:
    e, m, w, a = r["env"], r["model"], r["workload"], r["algorithms"]
    la = lambda v: "n/a" if v is None else " ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [
        f"device={e['device']} dtype=fp32 threads={e['threads']} torch={e['torch']}; "
        f"load average before {la(e['loadavg_before'])}, after {la(e['loadavg_after'])}",
        f"policy: {m['source']} ({m['params']:,} params, {m['layers']} layers); RPO reward model: {m['reward_model']}",
        f"workload per step, all three: {w['prompts_per_step']} prompts x {w['group_size']} = {w['sequences']} sequences, "
        f"<= {w['max_new_tokens']} new tokens (requested budget {w['requested_token_budget']} tokens), "
        f"temperature {w['temperature']}, thinking on, seed {w['seed']}; reward workers {w['reward_workers']}",
        f"prompts: {'all three on RLOO instruction-augmented prompts' if w['prompt_set'] == 'instructed' else 'RLOO instruction-augmented, GRPO and RPO the same problems without the instruction'}",
        f"{w['reps']} timed steps + {w['warmup']} warm-up per algorithm, interleaved GRPO/RLOO/RPO, "
        f"each from a fresh copy of the same start; time = the loop's time_s of the step; medians",
        "",
        f"{'algo':5s} {'median s/step':>13s} {'gen tokens':>10s} {'s/1k gen tok':>12s} {'min..max s':>15s} "
        f"{'seqs trained':>12s} {'tokens trained':>14s}",
    ]
    for name, d in a.items():
        lines.append(f"{name.upper():5s} {d['median_s']:13.3f} {d['median_generated_tokens']:10.0f} "
                     f"{d['s_per_1k_tokens']:12.3f} {min(d['times_s']):7.3f}..{max(d['times_s']):.3f} "
                     f"{statistics.median(d['seqs_trained']):12.0f} {statistics.median(d['tokens_trained']):14.0f}")  # fmt: skip
    lines += ["", f"{'per token':10s} {'of medians':>10s} {'paired':>8s}"]
    for name in ("rloo", "rpo"):
        lines.append(f"{name.upper() + '/GRPO':10s} {r[f'ratio_{name}_over_grpo']:9.2f}x "
                     f"{r[f'paired_ratio_{name}_over_grpo']:7.2f}x")  # fmt: skip
    lines += ["", "what one step includes:"]
    lines += [f"  {name.upper()}: {text}" for name, text in r["includes"].items()]
    pairs = [p for p in a["rpo"]["pairs"] if p is not None]
    dropped = [g for g in a["grpo"]["groups_dropped"] if g is not None]
    lines += [
        f"  (measured: GRPO dropped {statistics.median(dropped):.0f} of {w['prompts_per_step']} groups; "
        f"RPO trained {statistics.median(pairs):.0f} pairs; pass rate of the samples {a['grpo']['pass_rate'][0]:.3f})"
        if pairs and dropped else "",
        f"sanity: the same problems drawn in every step of all three: {'yes' if r['same_prompt_batch'] else 'NO'}; "
        f"the same number of generated tokens: {'yes' if r['same_generated_tokens'] else 'no'}"
        f"{' (expected with --prompt-set instructed: the same prompts, seed and weights)' if w['prompt_set'] == 'instructed' else ''}",
        f"(wall {e['wall_s']:.0f} s for the steps and their runs' set-up; timings on a shared machine: trust the "
        "interleaved ratios, not the absolute figures)",
    ]
    return "\n".join(line for line in lines if line is not None)


def passed(result: dict) -> bool:
    """Sanity: the same problems in every step; with the instructed set, also the same tokens."""
    same_tokens = result["same_generated_tokens"] or result["workload"]["prompt_set"] != "instructed"
    return bool(result["same_prompt_batch"] and same_tokens)


if __name__ == "__main__":
    res = main()
    sys.exit(0 if passed(res) else 1)
