"""Does the Puzzle cost model predict the child's speed-up on this machine?

For the tiny world's Puzzle child (the MIP's choice under the default budget), at several
operating points (batch size; prompt and generated lengths from the puzzle config):

  predicted  from the library alone, as the puzzle stage computes it: every variant's
             prefill and decode time measured inside the model (`measure_in_model`), plus
             the measured time of what no variant touches, summed for parent and for child;
             the median over timing rounds of their ratio (`predicted_speedup`)
  measured   whole parent and whole child timed in alternation; the median over rounds of
             the paired ratio (`measure_speedup`)

and the roofline prediction for the configured GPU (costs.hardware) next to them. Each
trial re-measures the library and the two models; the table shows every trial, so the
spread between trials is visible. Goal: predicted within 10% of measured.

    python benchmarks/bench_child_runtime.py [--batch-sizes 1 8 32] [--trials 3] [--json out.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.data.tiny_world import build_world
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.tiny_parent import train_parent
from nemo_plugins.pipeline import PipelineConfig
from nemo_plugins.puzzle import mip
from nemo_plugins.puzzle.costs import PHASES, measure_in_model, measure_speedup, non_block_stats, predicted_speedup
from nemo_plugins.puzzle.library import is_parent_variant
from nemo_plugins.puzzle.realize import realize_child
from nemo_plugins.model.train import token_batches
from nemo_plugins.puzzle.scoring import score_variants
from nemo_plugins.model.checkpoint import fingerprint
from nemo_plugins.puzzle.stage import (
    budget_bounds, build_library_file, choice_totals, roofline_speedup, trained_library,
)  # fmt: skip


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", help="also write the rows as JSON")
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides (same as nemo-plugins pipeline)")
    args = ap.parse_args(argv)

    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, [*args.overrides, "progress=false"])
    pz = cfg.puzzle
    world = build_world(cfg.world)
    ckpt = train_parent(world, cfg.parent, progress=False)
    parent = load_checkpoint(ckpt)
    variants, students, _, _ = trained_library(parent, fingerprint(parent), world, pz, progress=False)
    pc = parent.config

    batches = token_batches(world.eval_examples(), pz.score_batch_size, pz.score_batches, 0, response_only=True)
    library = build_library_file(pc, variants, score_variants(parent, students, batches, progress=False), {}, pz.costs)
    parent_choice = {v.group: v.name for v in variants if is_parent_variant(pc, v)}
    bounds = budget_bounds(pz.budget, choice_totals(library, parent_choice), non_block_stats(pc, pz.costs), pz.costs)
    choice = mip.solve(library, pz.objective, max_bounds=bounds)[0].choices
    child = realize_child(parent, choice, variants, lambda v: students[v].state_dict())
    print(f"child: {choice}")
    print(f"threads {pz.costs.threads or 'default'}, prompt {pz.costs.prefill_len}, generated {pz.costs.decode_len}, "
          f"{pz.costs.measure_reps} library rounds, {2 * pz.costs.measure_reps} model rounds per trial")  # fmt: skip

    rows = []
    head = f"{'batch':>5} {'trial':>5} {'phase':<8} {'parent ms':>10} {'child ms':>9} {'measured':>9} {'predicted':>10} {'error':>7} {'roofline':>9}"
    print(head)
    for batch in args.batch_sizes:
        costs = replace(pz.costs, batch_size=batch)
        lib = build_library_file(pc, variants, {v.key: {} for v in variants}, {}, costs)
        roof = non_block_stats(pc, costs)
        for trial in range(args.trials):
            predicted = predicted_speedup(measure_in_model(parent, variants, students, costs, seed=trial), parent_choice, choice)
            timed = measure_speedup(parent, child, costs, reps=2 * costs.measure_reps, seed=trial)
            for phase in PHASES:
                t = timed[phase]
                roofline = roofline_speedup(lib, parent_choice, choice, roof, phase)
                row = {"batch": batch, "trial": trial, "phase": phase, "parent_ms": t["parent_ms"], "child_ms": t["child_ms"],
                       "measured_speedup": t["speedup"], "predicted_speedup": predicted[phase],
                       "error": predicted[phase] / t["speedup"] - 1, "roofline_speedup": roofline}  # fmt: skip
                rows.append(row)
                print(f"{batch:>5} {trial:>5} {phase:<8} {row['parent_ms']:>10.1f} {row['child_ms']:>9.1f} "
                      f"{t['speedup']:>8.2f}x {predicted[phase]:>9.2f}x {row['error']:>+7.1%} {roofline:>8.2f}x", flush=True)  # fmt: skip
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest |predicted/measured - 1| over {len(rows)} rows: {worst:.1%} (goal: within 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
