"""Puzzle child vs uniform shrinking vs layer dropping at the same budget, over several BLD seeds.

Runs the puzzle stage (world, parent, puzzle) once per seed of `puzzle.bld.seed`, on the tiny
world or any preset (`--preset smollm2`), and reads the comparison the stage reports
(`report.json` -> `baselines`): all three children are assembled from the same trained block
library, chosen on one half of the held-out text and measured on the other half, which no choice
saw. Per child: block parameters and KV cache against the parent's, KL(parent || child), LM loss
and greedy next-token agreement with the parent, as mean ± 95% t-interval over seeds; then the
per-seed KL ratios against Puzzle and how many seeds Puzzle is strictly best on KL.

    python benchmarks/bench_puzzle_quality.py [--preset smollm2] [--seeds 0 1 2] [--json out.json] [key=value ...]

A seed's library stays cached, so a second run re-measures without retraining.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_plugins.pipeline import load_pipeline_config, run_pipeline
from nemo_plugins.utils.stats import format_interval

CHILDREN = ("puzzle", "uniform", "drop")
COLUMNS = (("params_fraction", "params", 3), ("kv_fraction", "KV", 3), ("kl_div", "KL(parent||child)", 4),
           ("lm_loss", "LM loss", 4), ("greedy_agreement", "greedy agree", 3))  # fmt: skip


def run_seeds(preset: str | None, seeds: list[int], out: Path, overrides: list[str]) -> dict[int, dict]:
    """{seed: the puzzle stage's `baselines`} for each BLD seed."""
    per_seed = {}
    for seed in seeds:
        cfg = load_pipeline_config(preset, [*overrides, "stages=[world,parent,puzzle]", f"puzzle.bld.seed={seed}",
                                          f"output_dir={out / f'seed{seed}'}"])  # fmt: skip
        per_seed[seed] = run_pipeline(cfg)["puzzle"]["baselines"]
    return per_seed


def table(per_seed: dict[int, dict]) -> list[str]:
    lines = [f"{'child':<8} " + " ".join(f"{title:>22}" for _, title, _ in COLUMNS)]
    for name in CHILDREN:
        rows = [b["children"][name] for b in per_seed.values() if b["children"].get(name)]
        if not rows:
            lines.append(f"{name:<8} (no configuration of this shape fits the budget)")
            continue
        cells = [format_interval([r[key] for r in rows], digits) for key, _, digits in COLUMNS]
        lines.append(f"{name:<8} " + " ".join(f"{c:>22}" for c in cells))
    for other in ("uniform", "drop"):
        ratios = [b["children"][other]["kl_div"] / b["children"]["puzzle"]["kl_div"]
                  for b in per_seed.values() if b["children"].get(other)]  # fmt: skip
        if ratios:
            lines.append(f"KL {other}/puzzle: {format_interval(ratios, 2)}x  (per seed: "
                         + ", ".join(f"{r:.2f}" for r in ratios) + ")")  # fmt: skip
    best = sum(b["puzzle_strictly_best_kl"] for b in per_seed.values())
    lines.append(f"Puzzle strictly best on KL in {best} of {len(per_seed)} seeds")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="conf/pipeline/NAME.yaml on top of the defaults (default: the tiny world)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="puzzle.bld.seed values")
    ap.add_argument("--out", type=Path, help="output directory (default outputs/bench_puzzle_quality[-PRESET])")
    ap.add_argument("--json", help="also write the per-seed comparisons as JSON")
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides (as for nemo-plugins pipeline)")
    args = ap.parse_args(argv)
    out = args.out or Path("outputs") / ("bench_puzzle_quality" + (f"-{args.preset}" if args.preset else ""))
    per_seed = run_seeds(args.preset, args.seeds, out, ["progress=false", *args.overrides])
    budget = next(iter(per_seed.values()))
    print(f"seeds {args.seeds}; children chosen on one half of the held-out text, measured on the other")
    print("\n".join(table(per_seed)))
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in per_seed.items()}, indent=2))
    return {"per_seed": per_seed, "budget": budget}


if __name__ == "__main__":
    main()
