"""Regenerate the README's comparisons of the main command from fresh runs, with their spread.

For each seed s in 0..N-1 the main command (`nemo-plugins pipeline`, the tiny world unless
--preset) runs into OUT/seed<s> with `recovery.seed`, `sft.seed` and `grpo.seed` set to s. The
world, the parent, Puzzle and fusion keep their committed settings (seed 0, cached, so every seed
starts recovery from the same fused child), and seed 0 is exactly the main command. Puzzle's
comparison runs `bench_puzzle_quality.py` over BLD seeds 0..N-1 (each seed's library cached).

Tables (mean ± 95% Student-t interval over seeds, and per-seed paired differences; where a
difference's interval includes zero the table says "no measurable difference here"):
- Puzzle vs uniform shrink vs layer drop at one budget: KL(parent||child) on held-out text;
- recovery: the share of the child's KL gap that KD closes against the LM loss alone, equal tokens;
- SFT: toggle adherence per mode and thinking-on accuracy, before and after;
- GRPO: held-out thinking-on accuracy before, after the curriculum run and after random order.

    python benchmarks/reproduce_readme.py [--seeds 5] [--grpo-seeds 3] [--puzzle-seeds 3] [--out DIR] [key=value ...]

Time on a 2-core CPU with the default settings (parent and seed-0 Puzzle library cached): about
13 minutes per seed, 11 of them GRPO's two runs, plus about 5 minutes per Puzzle seed after the
first (BLD trains each seed's library); --seeds 5 takes about 95 minutes, --seeds 5 --grpo-seeds 3
--puzzle-seeds 3 about 60. A rerun resumes every finished stage from OUT. Writes OUT/summary.json
(every per-seed figure, the environment) and OUT/tables.md (what the README quotes).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

from nemo_plugins.pipeline import load_pipeline_config, run_pipeline
from nemo_plugins.utils.atomic import write_json_atomic, write_text_atomic
from nemo_plugins.utils.stats import mean_interval

HERE = Path(__file__).resolve().parent
NO_DIFFERENCE = "no measurable difference here"


def _bench_puzzle_quality():
    spec = importlib.util.spec_from_file_location("bench_puzzle_quality", HERE / "bench_puzzle_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- runs


def seed_overrides(seed: int, with_grpo: bool) -> list[str]:
    """The main command's overrides for one seed of the chain after fusion."""
    stages = "[world,parent,evaluate,puzzle,fusion,recovery,sft" + (",grpo]" if with_grpo else "]")
    return [f"recovery.seed={seed}", f"sft.seed={seed}", f"grpo.seed={seed}", f"stages={stages}"]


def figures(summary: dict) -> dict:
    """The compared figures of one run's report.json (what the tables are made of)."""
    out: dict = {"environment": summary.get("environment")}
    if rec := summary.get("recovery"):
        out["recovery"] = {
            "kd_gap_closed": rec["kd_gap_closed"], "lm_gap_closed": rec.get("cpt_gap_closed"),
            "kl_before": rec["before"]["kl_div"], "kl_kd": rec["kd"]["kl_div"],
            "kl_lm": rec["cpt"]["kl_div"] if "cpt" in rec else None,
        }  # fmt: skip
    if sft := summary.get("sft"):
        out["sft"] = {
            f"{when}_{mode}_{key}": sft[when][mode][key]
            for when in ("before", "after") for mode in ("on", "off") for key in ("adherence", "accuracy")
        }  # fmt: skip
    if grpo := summary.get("grpo"):
        out["grpo"] = {row["model"]: row["accuracy_on"] for row in grpo["table"]}
    return out


def run_seeds(preset: str | None, seeds: list[int], grpo_seeds: list[int], out: Path, overrides: list[str]) -> dict:
    """{seed: figures} of the main command per seed; each seed's stages resume from OUT/seed<s>."""
    per_seed = {}
    for seed in seeds:
        start = time.perf_counter()
        cfg = load_pipeline_config(
            preset, [*overrides, *seed_overrides(seed, seed in grpo_seeds), f"output_dir={out / f'seed{seed}'}"]
        )  # fmt: skip
        per_seed[seed] = {**figures(run_pipeline(cfg)), "wall_s": round(time.perf_counter() - start, 1)}
        print(f"seed {seed}: {per_seed[seed]['wall_s'] / 60:.1f} min", flush=True)
    return per_seed


# ----------------------------------------------------------------------------- tables


def interval(values: list[float], digits: int = 3) -> str:
    mean, half = mean_interval(values)
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def difference(a: list[float], b: list[float], digits: int = 3) -> str:
    """The paired difference a - b over seeds, flagged when its interval includes zero."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, half = mean_interval(diffs)
    text = f"{mean:+.{digits}f}" if math.isnan(half) else f"{mean:+.{digits}f} ± {half:.{digits}f}"
    if math.isnan(half):
        return text + " (one seed: no interval)"
    return text + (f" ({NO_DIFFERENCE})" if abs(mean) <= half else "")


def _column(per_seed: dict, stage: str, key: str) -> tuple[list[int], list[float]]:
    seeds = [s for s, f in per_seed.items() if stage in f and f[stage].get(key) is not None]
    return seeds, [per_seed[s][stage][key] for s in seeds]


def _seeds_line(seeds: list) -> str:
    return f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)})"


def recovery_table(per_seed: dict) -> list[str]:
    seeds, kd = _column(per_seed, "recovery", "kd_gap_closed")
    _, lm = _column(per_seed, "recovery", "lm_gap_closed")
    if not seeds:
        return []
    lines = [f"Recovery, {_seeds_line(seeds)}: share of the child's KL gap to the parent closed, equal tokens", "",
             "| loss | gap closed | per seed |", "| --- | --- | --- |"]  # fmt: skip
    lines.append(f"| KD | {interval(kd)} | {', '.join(f'{v:.3f}' for v in kd)} |")
    if len(lm) == len(kd):
        lines.append(f"| LM loss alone | {interval(lm)} | {', '.join(f'{v:.3f}' for v in lm)} |")
        lines.append(f"| KD - LM | {difference(kd, lm)} | |")
    return lines


def sft_table(per_seed: dict) -> list[str]:
    seeds, _ = _column(per_seed, "sft", "after_on_adherence")
    if not seeds:
        return []
    lines = [f"SFT, {_seeds_line(seeds)}: the toggle on held-out problems, before and after", "",
             "| figure | before | after | after - before |", "| --- | --- | --- | --- |"]  # fmt: skip
    for mode in ("on", "off"):
        for key in ("adherence", "accuracy"):
            _, before = _column(per_seed, "sft", f"before_{mode}_{key}")
            _, after = _column(per_seed, "sft", f"after_{mode}_{key}")
            lines.append(f"| thinking {mode}: {key} | {interval(before)} | {interval(after)} | {difference(after, before)} |")
    return lines


def grpo_table(per_seed: dict) -> list[str]:
    seeds, before = _column(per_seed, "grpo", "before")
    if not seeds:
        return []
    _, curriculum = _column(per_seed, "grpo", "curriculum")
    lines = [f"GRPO, {_seeds_line(seeds)}: held-out thinking-on accuracy (greedy)", "",
             "| model | accuracy | per seed |", "| --- | --- | --- |"]  # fmt: skip
    rows = [("before (SFT child)", before), ("curriculum", curriculum)]
    _, random = _column(per_seed, "grpo", "random")
    if len(random) == len(before):
        rows.append(("random order", random))
    for name, values in rows:
        lines.append(f"| {name} | {interval(values)} | {', '.join(f'{v:.3f}' for v in values)} |")
    lines.append(f"| curriculum - before | {difference(curriculum, before)} | |")
    if len(random) == len(before):
        lines.append(f"| random - before | {difference(random, before)} | |")
        lines.append(f"| curriculum - random | {difference(curriculum, random)} | |")
    return lines


def puzzle_table(per_seed: dict) -> list[str]:
    if not per_seed:
        return []
    seeds = list(per_seed)
    kl = {name: [b["children"][name]["kl_div"] for b in per_seed.values() if b["children"].get(name)]
          for name in ("puzzle", "uniform", "drop")}  # fmt: skip
    lines = [f"Puzzle at one budget, {_seeds_line(seeds)} of BLD: KL(parent||child) on held-out text that no "
             "choice saw", "", "| child | KL | per seed |", "| --- | --- | --- |"]  # fmt: skip
    for name, title in (("puzzle", "Puzzle"), ("uniform", "uniform shrink"), ("drop", "layer drop")):
        if kl[name]:
            lines.append(f"| {title} | {interval(kl[name], 4)} | {', '.join(f'{v:.4f}' for v in kl[name])} |")
    for name, title in (("uniform", "uniform shrink"), ("drop", "layer drop")):
        if len(kl[name]) == len(kl["puzzle"]):
            lines.append(f"| {title} - Puzzle | {difference(kl[name], kl['puzzle'], 4)} | |")
    best = sum(b["puzzle_strictly_best_kl"] for b in per_seed.values())
    lines += ["", f"Puzzle strictly best on KL in {best} of {len(per_seed)} seeds."]
    return lines


def render(result: dict) -> str:
    """The markdown tables of a summary.json (what the README quotes, verbatim)."""
    per_seed = {int(s): f for s, f in result["per_seed"].items()}
    puzzle = {int(s): b for s, b in result.get("puzzle", {}).items()}
    blocks = [puzzle_table(puzzle), recovery_table(per_seed), sft_table(per_seed), grpo_table(per_seed)]
    return "\n\n".join("\n".join(b) for b in blocks if b) + "\n"


# ----------------------------------------------------------------------------- entry point


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help="conf/pipeline/NAME.yaml on top of the defaults (default: the tiny world)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--grpo-seeds", type=int, help="run GRPO for the first M seeds only (default: all)")
    ap.add_argument("--puzzle-seeds", type=int, help="BLD seeds 0..P-1 for the Puzzle comparison (default: --seeds; 0: none)")
    ap.add_argument("--out", type=Path, help="output directory (default outputs/reproduce_readme[-PRESET])")
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides (as for nemo-plugins pipeline)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or (args.grpo_seeds is not None and not 0 <= args.grpo_seeds <= args.seeds):
        ap.error(f"--seeds {args.seeds} --grpo-seeds {args.grpo_seeds}: expected seeds >= 1 and 0 <= grpo-seeds <= seeds")
    if args.puzzle_seeds is not None and args.puzzle_seeds < 0:
        ap.error(f"--puzzle-seeds {args.puzzle_seeds}: expected >= 0")
    out = args.out or Path("outputs") / ("reproduce_readme" + (f"-{args.preset}" if args.preset else ""))
    seeds = list(range(args.seeds))
    grpo_seeds = seeds[: args.grpo_seeds] if args.grpo_seeds is not None else seeds
    overrides = ["progress=false", *args.overrides]
    start = time.perf_counter()
    result: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                    "preset": args.preset, "overrides": args.overrides}  # fmt: skip
    puzzle_seeds = list(range(args.puzzle_seeds)) if args.puzzle_seeds is not None else seeds
    if puzzle_seeds:
        result["puzzle"] = _bench_puzzle_quality().run_seeds(args.preset, puzzle_seeds, out / "puzzle", overrides)
    result["per_seed"] = run_seeds(args.preset, seeds, grpo_seeds, out, overrides)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    tables = render(result)
    write_json_atomic(out / "summary.json", result, default=str)
    write_text_atomic(out / "tables.md", tables)
    print(tables)
    print(f"{result['wall_s'] / 60:.1f} min; {out / 'summary.json'}, {out / 'tables.md'}")
    return result


if __name__ == "__main__":
    main()
