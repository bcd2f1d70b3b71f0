"""Puzzle child vs two naive compressions at the same budget, on the tiny world.

All three children are assembled from the same BLD-trained block library of the tiny parent,
so the comparison isolates the choice of blocks:

  puzzle   the MIP's choice (minimum summed replace-one-block KL) within the budget
  uniform  every layer shrunk alike: the largest uniform (KV heads, FFN width) within budget
  drop     whole layers removed (attention and FFN no-op), least important first by summed
           replace-one-block KL, until within budget

Reported per child: parameters and KV cache relative to the parent, KL(parent || child),
LM loss, and greedy task accuracy on easy held-out problems. Run after the puzzle stage has
built the library (it reuses the cache):

    python benchmarks/bench_puzzle_quality.py [--params-fraction 0.7 --kv-fraction 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict

from nemo_plugins.arch import accounting as acc
from nemo_plugins.config import DEFAULT_CONFIGS, load_config
from nemo_plugins.data.tiny_world import build_world, config_hash
from nemo_plugins.evaluate import task_accuracy
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.model.tiny_parent import train_parent
from nemo_plugins.pipeline import PipelineConfig
from nemo_plugins.puzzle import mip
from nemo_plugins.puzzle.bld import load_variant_state, run_bld
from nemo_plugins.puzzle.build import build_students
from nemo_plugins.puzzle.costs import non_block_stats
from nemo_plugins.puzzle.library import build_variants, child_config, is_parent_variant
from nemo_plugins.puzzle.realize import realize_child
from nemo_plugins.puzzle.scoring import model_metrics, score_variants
from nemo_plugins.distill.stage import fingerprint
from nemo_plugins.puzzle.stage import BudgetConfig, budget_bounds, build_library_file, choice_totals, library_dir, token_batches


def block_params(cfg) -> int:
    return sum(acc.block_params(cfg, b) for b in cfg.blocks)


def kv_bytes(cfg) -> int:
    return acc.report(cfg).kv_cache_bytes_per_token


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params-fraction", type=float, default=0.7)
    ap.add_argument("--kv-fraction", type=float, default=0.5)
    ap.add_argument("--json", help="also write the table as JSON")
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides (same as nemo-plugins pipeline)")
    args = ap.parse_args(argv)

    cfg = load_config(PipelineConfig, DEFAULT_CONFIGS, [*args.overrides, "progress=false"])
    world = build_world(cfg.world)
    ckpt = train_parent(world, cfg.parent, progress=False)
    parent = load_checkpoint(ckpt)
    pz = cfg.puzzle
    variants = build_variants(parent.config, pz.library)
    lib_dir = library_dir(pz, fingerprint(parent), world.directory)  # the puzzle stage's library
    examples = world.training_examples()
    students = build_students(parent, variants, token_batches(examples, pz.bld.batch_size, pz.init.calibration_batches, 0), pz.init)
    exact = {v for v in variants if is_parent_variant(parent.config, v)}
    run_bld(parent, students, examples, lib_dir, pz.bld, exact=exact, progress=False)  # no-op once the stage ran
    for v, block in students.items():
        block.load_state_dict(load_variant_state(lib_dir, v))
    held_out = world.eval_examples()
    batches = token_batches(held_out, pz.score_batch_size, pz.score_batches, 0, response_only=True)
    scores = score_variants(parent, students, batches)
    library = build_library_file(parent.config, variants, scores, {}, pz.costs)

    pc = parent.config
    budget_params = args.params_fraction * block_params(pc)
    budget_kv = args.kv_fraction * kv_bytes(pc)

    def fits(child_cfg) -> bool:
        return block_params(child_cfg) <= budget_params + 1e-9 and kv_bytes(child_cfg) <= budget_kv + 1e-9

    parent_choice = {v.group: v.name for v in variants if is_parent_variant(pc, v)}
    parent_totals = choice_totals(library, parent_choice)
    bounds = budget_bounds(BudgetConfig(params_fraction=args.params_fraction, kv_cache_fraction=args.kv_fraction),
                           parent_totals, non_block_stats(pc, pz.costs), pz.costs)  # fmt: skip
    puzzle_choice = mip.solve(library, pz.objective, max_bounds=bounds)[0].choices

    # uniform: the same (attention, ffn) variant everywhere; keep the best-quality one within budget
    attn_names = sorted({v.name for v in variants if v.subblock == "attention"})
    ffn_names = sorted({v.name for v in variants if v.subblock == "ffn"})
    uniform_choice, best = None, float("inf")
    for a, f in itertools.product(attn_names, ffn_names):
        choice = {f"{i}.attention": a for i in range(pc.num_layers)} | {f"{i}.ffn": f for i in range(pc.num_layers)}
        if fits(child_config(pc, choice, variants)):
            s = sum(library[g][n]["metrics"]["kl_div"] for g, n in choice.items())
            if s < best:
                uniform_choice, best = choice, s

    # drop whole layers, least important (summed no-op KL) first, until within budget
    order = sorted(range(pc.num_layers), key=lambda i: library[f"{i}.attention"]["no_op"]["metrics"]["kl_div"]
                   + library[f"{i}.ffn"]["no_op"]["metrics"]["kl_div"])  # fmt: skip
    drop_choice = dict(parent_choice)
    for i in order:
        if fits(child_config(pc, drop_choice, variants)):
            break
        drop_choice[f"{i}.attention"] = drop_choice[f"{i}.ffn"] = "no_op"

    easy = [p for p in world.eval if p.difficulty <= 2][:100]
    rows = {}
    for name, choice in (("puzzle", puzzle_choice), ("uniform", uniform_choice), ("drop", drop_choice)):
        if choice is None:
            rows[name] = None
            continue
        child = realize_child(parent, choice, variants, lambda v: students[v].state_dict())
        q = model_metrics(parent, child, batches)
        rows[name] = {
            "params_fraction": block_params(child.config) / block_params(pc),
            "kv_fraction": kv_bytes(child.config) / kv_bytes(pc),
            "kl_div": q["kl_div"],
            "lm_loss": q["lm_loss"],
            "easy_accuracy": task_accuracy(child, world.tokenizer, easy)["accuracy"],
        }
    rows["parent"] = {"params_fraction": 1.0, "kv_fraction": 1.0, "kl_div": 0.0,
                      "lm_loss": model_metrics(parent, parent, batches)["lm_loss"],
                      "easy_accuracy": task_accuracy(parent, world.tokenizer, easy)["accuracy"]}  # fmt: skip

    print(f"budget: block params <= {args.params_fraction:.0%} of parent, KV cache <= {args.kv_fraction:.0%}")
    print(f"{'child':<8} {'params':>7} {'KV':>6} {'KL(parent||child)':>18} {'LM loss':>8} {'easy acc':>9}")
    for name, r in rows.items():
        if r is None:
            print(f"{name:<8} (no configuration fits the budget)")
            continue
        print(f"{name:<8} {r['params_fraction']:>7.2f} {r['kv_fraction']:>6.2f} {r['kl_div']:>18.4f} "
              f"{r['lm_loss']:>8.4f} {r['easy_accuracy']:>9.2f}")  # fmt: skip
    for other in ("uniform", "drop"):
        if rows.get(other) and rows["puzzle"]["kl_div"] > 0:
            print(f"KL ratio {other}/puzzle: {rows[other]['kl_div'] / rows['puzzle']['kl_div']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
