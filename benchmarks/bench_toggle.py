"""Reasoning-toggle adherence of a saved model on the training or the held-out problems.

The sft stage reports the toggle on the held-out problems only. Settings that are chosen by
looking at adherence (a decoding penalty, a loss weight) should be chosen on other problems, so
the held-out figure stays a measurement: this script scores the same thing (`sft.evaluate_toggle`:
greedy answers in both modes, per mode adherence, mode entry, cut share, length, accuracy) on the
first `--n` *training* problems (`--split train`, the default) or on the held-out ones
(`--split heldout`, what the stage reports). Problems, tokenizer and decoding come from the
pipeline config (`--preset` plus `key=value` overrides: `data.problems`, `sft.max_new_tokens`,
`sft.eval_batch_size`, `sft.repetition_penalty`, `sft.repetition_penalty_off`), so the figures
are comparable with the stage's.

    python benchmarks/bench_toggle.py --model outputs/smollm2/sft/model --preset smollm2
    python benchmarks/bench_toggle.py --model DIR --preset smollm2 sft.repetition_penalty=1.0 --json on_train.json

On SmolLM2-135M with CHAMP (40 problems, 384 new tokens) one run takes 2-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nemo_plugins.data.chat_tokenizer import ChatTokenizer
from nemo_plugins.data.problems import ProblemSet
from nemo_plugins.data.tiny_world import build_world
from nemo_plugins.model.checkpoint import load_checkpoint
from nemo_plugins.pipeline import load_pipeline_config
from nemo_plugins.rl.rewards import answer_checker
from nemo_plugins.sft import evaluate_toggle
from nemo_plugins.utils.atomic import write_json_atomic


def toggle_scores(model_dir: str | Path, split: str, n: int, preset: str | None, overrides=()) -> dict:
    """{"settings": ..., "result": evaluate_toggle's {"on", "off"}} for the model in `model_dir`."""
    cfg = load_pipeline_config(preset, overrides)
    world = build_world(cfg.world, Path(cfg.cache_dir) if cfg.cache_dir else None)
    problems = ProblemSet(world, cfg.data.problems)
    chosen = (problems.train if split == "train" else problems.eval)[:n]
    if not chosen:
        raise SystemExit(f"bench_toggle: no {split} problems in data.problems={cfg.data.problems.source}")
    model = load_checkpoint(model_dir, dtype=torch.float32)
    chat = ChatTokenizer.from_dir(model_dir)
    sft = cfg.sft
    result = evaluate_toggle(
        model, chat, chosen, batch_size=sft.eval_batch_size, max_new_tokens=sft.max_new_tokens,
        verify=answer_checker(problems.task), repetition_penalty=sft.repetition_penalty,
        repetition_penalty_off=sft.penalty_off,
    )  # fmt: skip
    settings = {"model": str(model_dir), "split": split, "n": len(chosen), "problems": cfg.data.problems.source,
                "max_new_tokens": sft.max_new_tokens, "repetition_penalty": sft.repetition_penalty,
                "repetition_penalty_off": sft.penalty_off}  # fmt: skip
    return {"settings": settings, "result": result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model directory (e.g. <output_dir>/sft/model)")
    ap.add_argument("--split", choices=("train", "heldout"), default="train")
    ap.add_argument("--n", type=int, default=40, help="problems from the start of the split (default 40)")
    ap.add_argument("--preset", default=None, help="pipeline preset whose data and sft settings to use")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("overrides", nargs="*", help="pipeline key=value overrides")
    args = ap.parse_args(argv)
    if args.n <= 0:
        ap.error(f"--n {args.n}: expected a positive integer")
    out = toggle_scores(args.model, args.split, args.n, args.preset, args.overrides)
    st = out["settings"]
    print(f"{args.model}: {st['n']} {args.split} problems, penalty {st['repetition_penalty']:g} "
          f"(thinking off: {st['repetition_penalty_off']:g})")
    for mode, s in out["result"].items():
        print(f"  thinking {mode}: adherence {s['adherence']:.3f}, opens in mode {s['enters_mode']:.3f}, "
              f"cut {s['truncated']:.3f}, mean tokens {s['mean_response_tokens']:.1f}, accuracy {s['accuracy']:.3f}")  # fmt: skip
    if args.json:
        write_json_atomic(Path(args.json), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
