"""`nemo-plugins` command line.

    nemo-plugins inspect PATH [--json] [--dtype bf16] [--batch-size 1] [--seq-len 4096]
    nemo-plugins import-gguf FILE.gguf OUT_DIR [--dtype float32] [--overwrite]   # GGUF Llama -> HF directory
    nemo-plugins pipeline [--config FILE ...] [key=value ...]
    nemo-plugins puzzle [--config FILE ...] [key=value ...]   # = pipeline stages=[world,parent,puzzle]
    nemo-plugins fusion [--config FILE ...] [key=value ...]   # ... up to FFN Fusion of the Puzzle child
    nemo-plugins recovery [--config FILE ...] [key=value ...] # ... up to recovery distillation
    nemo-plugins sft [--config FILE ...] [key=value ...]      # ... up to reasoning-toggle SFT
    nemo-plugins grpo [--config FILE ...] [key=value ...]     # ... up to GRPO with the curriculum
    nemo-plugins rloo [--config FILE ...] [key=value ...]     # ... up to RLOO instruction following
    nemo-plugins reward_model [...] / nemo-plugins rpo [...]  # ... up to the reward model / iterative online RPO
    nemo-plugins recovery model=DIR teacher=DIR [key=value ...]  # a stage alone, from model directories
    nemo-plugins config [--config FILE] [key=value ...]   # print the resolved pipeline config
    nemo-plugins mip --library library.json --objective metrics.kl_div --max stats.memory_mib=40000 [--json]

Errors in configs, overrides, checkpoints, MIP libraries or budgets print one message naming what is
wrong and exit 2 (an infeasible budget too: the message names the binding bound and how far it can go).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys

from ..arch.accounting import DTYPE_BYTES, report
from ..arch.config import ArchConfigError
from ..config import DEFAULT_CONFIGS, ConfigError, load_config, preset_path, to_yaml
from ..data.chat_tokenizer import ChatTemplateError
from ..data.sft_data import BadRecord, RecordError
from ..data.sources import DataError
from ..errors import CheckpointError, InputFileError
from ..puzzle.library_file import MipError, resolve_key

USER_ERRORS = (ConfigError, ArchConfigError, CheckpointError, ChatTemplateError, DataError, RecordError, BadRecord, MipError,
               InputFileError, FileNotFoundError)
# A disk the user pointed at that cannot take the output: read-only, full, over quota, not ours.
DISK_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}
STAGE_COMMANDS = {
    "puzzle": ("world", "parent", "puzzle"),
    "fusion": ("world", "parent", "puzzle", "fusion"),
    "recovery": ("world", "parent", "puzzle", "fusion", "recovery"),
    "sft": ("world", "parent", "puzzle", "fusion", "recovery", "sft"),
    "grpo": ("world", "parent", "puzzle", "fusion", "recovery", "sft", "grpo"),
    "rloo": ("world", "parent", "puzzle", "fusion", "recovery", "sft", "grpo", "rloo"),
    "reward_model": ("world", "parent", "puzzle", "fusion", "recovery", "sft", "grpo", "rloo", "reward_model"),
    "rpo": ("world", "parent", "puzzle", "fusion", "recovery", "sft", "grpo", "rloo", "reward_model", "rpo"),
}


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    from ..model.checkpoint import read_config

    cfg = read_config(args.path)
    rep = report(cfg, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
        return 0
    header = f"{'layer':>5}  {'attention':<12} {'ffn':<34} {'params':>16} {'kv B/tok':>9} {'prefill FLOP/tok':>17} {'decode FLOP/tok':>16}"
    print(header)
    print("-" * len(header))
    for layer in rep.layers:
        print(
            f"{layer.index:>5}  {layer.attention:<12} {layer.ffn:<34} {_fmt_int(layer.params):>16} "
            f"{layer.kv_cache_bytes_per_token:>9} {_fmt_int(layer.prefill_flops_per_token):>17} "
            f"{_fmt_int(layer.decode_flops_per_token):>16}"
        )
    print("-" * len(header))
    n_attn = sum(1 for b in cfg.blocks if b.attention.kind == "gqa")
    print(f"layers: {cfg.num_layers} ({n_attn} with attention KV cache)")
    print(f"params: {_fmt_int(rep.params)} ({rep.params / 1e9:.2f}B; blocks {_fmt_int(rep.block_params)}, "
          f"embeddings/head {_fmt_int(rep.non_block_params)})")  # fmt: skip
    print(f"KV cache: {_fmt_int(rep.kv_cache_bytes_per_token)} bytes/token ({args.dtype})")
    print(f"FLOPs/token at seq {args.seq_len}: prefill {_fmt_int(rep.prefill_flops_per_token)}, "
          f"decode {_fmt_int(rep.decode_flops_per_token)}")  # fmt: skip
    print(f"memory at batch {args.batch_size}, seq {args.seq_len}, {args.dtype}: {_fmt_bytes(rep.memory_bytes)} "
          f"(weights {_fmt_bytes(rep.weight_bytes)} + KV cache {_fmt_bytes(rep.kv_cache_bytes)})")  # fmt: skip
    return 0


def cmd_import_gguf(args) -> int:
    from ..model.checkpoint import read_config
    from ..model.gguf_import import import_gguf

    out = import_gguf(args.file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    cfg = report(read_config(out))
    print(f"wrote {out}: {cfg.params:,} parameters; use it as parent.path={out}")
    return 0


def _pipeline_config(args, extra_overrides: tuple[str, ...] = ()):
    from ..pipeline import PipelineConfig

    yaml_paths = args.config or list(DEFAULT_CONFIGS)
    if args.preset:  # the defaults, then the preset on top (then any --config files)
        yaml_paths = [*DEFAULT_CONFIGS, preset_path(args.preset), *(args.config or [])]
    return load_config(PipelineConfig, yaml_paths, [*extra_overrides, *args.overrides])


def cmd_pipeline(args) -> int:
    from ..pipeline import run_pipeline

    # `nemo-plugins puzzle|fusion|...` is the pipeline up to that stage, or with model=DIR that stage
    # alone (still overridable: stages=[...])
    extra: tuple[str, ...] = ()
    if args.command in STAGE_COMMANDS:
        alone = any(o.startswith("model=") for o in args.overrides)
        extra = (f"stages=[{args.command if alone else ','.join(STAGE_COMMANDS[args.command])}]",)
    cfg = _pipeline_config(args, extra)
    summary = run_pipeline(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


def cmd_config(args) -> int:
    print(to_yaml(_pipeline_config(args)), end="")
    return 0


def _parse_bounds(items: list[str] | None, flag: str) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise MipError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {flag} stats.memory_mib=40000")
        try:
            bound = float(value)
        except ValueError:
            raise MipError(f"{flag} {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(bound):
            raise MipError(f"{flag} {item!r}: the bound must be a finite number")
        if key in bounds:
            raise MipError(f"{flag} {key} is given twice")
        bounds[key] = bound
    return bounds


def _fmt_num(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:.6g}"


def cmd_mip(args) -> int:
    from ..puzzle import mip

    max_bounds = _parse_bounds(args.max, "--max")
    min_bounds = _parse_bounds(args.min, "--min")
    library = mip.load_library(args.library)
    solutions = mip.solve(
        library, args.objective, maximize=args.maximize, max_bounds=max_bounds, min_bounds=min_bounds,
        num_solutions=args.num_solutions, min_diversity=args.min_diversity, time_limit_s=args.time_limit,
    )  # fmt: skip
    if args.json:
        payload = [s.to_json() for s in solutions]
        print(json.dumps(payload if args.num_solutions > 1 else payload[0], indent=2))
        return 0
    goal = "maximize" if args.maximize else "minimize"
    print(f"{goal} {args.objective} over {len(library)} groups; {len(solutions)} solution(s)")
    print(f"{'solution':>8}  {'status':<8} {'objective':>14} {'seconds':>8}")
    for i, s in enumerate(solutions, 1):
        print(f"{i:>8}  {s.status:<8} {s.objective:>14.6g} {s.solve_seconds:>8.3f}")
    names = [f"solution {i}" for i in range(1, len(solutions) + 1)]
    width = max([5, *(len(g) for g in library)])
    cols = [max([len(n), *(len(v) for v in s.choices.values())]) for n, s in zip(names, solutions)]
    print()
    print(f"{'group':<{width}}  " + "  ".join(f"{n:<{c}}" for n, c in zip(names, cols)).rstrip())
    for g in library:
        print(f"{g:<{width}}  " + "  ".join(f"{s.choices[g]:<{c}}" for s, c in zip(solutions, cols)).rstrip())
    bounds: dict[str, list[str]] = {}
    for op, given in (("<=", max_bounds), (">=", min_bounds)):
        for k, v in given.items():
            bounds.setdefault(".".join(resolve_key(library, k)), []).append(f"{op} {_fmt_num(v)}")
    keys = list(solutions[0].totals)
    kw = max(len(k) for k in keys)
    print()
    print(f"{'total':<{kw}}  " + "  ".join(f"{n:>16}" for n in names) + "  bound")
    for k in keys:
        row = "  ".join(f"{_fmt_num(s.totals.get(k, float('nan'))):>16}" for s in solutions)
        print(f"{k:<{kw}}  {row}  {', '.join(bounds.get(k, []))}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemo-plugins", description="Llama-Nemotron recipe plugins for NeMo")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="per-layer table and totals of a config.json or checkpoint")
    ins.add_argument("path", help="a config.json or a checkpoint directory")
    ins.add_argument("--json", action="store_true", help="print JSON (totals + layers)")
    ins.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    ins.add_argument("--batch-size", type=int, default=1)
    ins.add_argument("--seq-len", type=int, default=4096)
    ins.set_defaults(func=cmd_inspect)

    gg = sub.add_parser("import-gguf", help="a GGUF Llama (llama.cpp format, any quantization) to a Hugging Face directory")
    gg.add_argument("file", help="the .gguf file")
    gg.add_argument("out", help="the output directory (config.json, model.safetensors, tokenizer with chat template)")
    gg.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default float32)")
    gg.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    gg.set_defaults(func=cmd_import_gguf)

    for name, func, help_ in (
        ("pipeline", cmd_pipeline, "run the main job (tiny world -> parent -> evaluate -> puzzle -> fusion -> recovery -> sft -> grpo -> rloo -> reward_model -> rpo)"),
        ("puzzle", cmd_pipeline, "Puzzle NAS on the parent: library, BLD, scores, costs, MIP, child, report"),
        ("fusion", cmd_pipeline, "FFN Fusion of the Puzzle child: dependency analysis, exact fusion, report"),
        ("recovery", cmd_pipeline, "recovery of the compressed child: KD from the parent (and LM-loss training to compare)"),
        ("sft", cmd_pipeline, "reasoning-toggle SFT (detailed thinking on/off) of the recovered child, or of the parent"),
        ("grpo", cmd_pipeline, "GRPO with pass-rate filtering and curriculum (and random order to compare) after SFT"),
        ("rloo", cmd_pipeline, "RLOO for instruction following (verifier reward, KL to the start) after GRPO"),
        ("reward_model", cmd_pipeline, "a reward model (Bradley-Terry on preference pairs) from the policy after GRPO"),
        ("rpo", cmd_pipeline, "iterative online RPO of the policy against the reward model (two rounds)"),
        ("config", cmd_config, "print the resolved pipeline config"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument(
            "--config", action="append",
            help="YAML file, merged in order when given several times (default: conf/pipeline/tiny.yaml "
            "then conf/{puzzle,fusion,recovery,sft,grpo,rloo,reward_model,rpo}/tiny.yaml)",
        )  # fmt: skip
        sp.add_argument("--preset", help="conf/pipeline/NAME.yaml on top of the defaults, e.g. --preset smollm2")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parent.steps=200")
        sp.set_defaults(func=func)

    mp = sub.add_parser("mip", help="Puzzle's MIP: pick one variant per group of a block library under budgets")
    mp.add_argument("--library", required=True, help="library JSON: {group: {variant: {stats: {...}, metrics: {...}}}}")
    mp.add_argument("--objective", default="metrics.kl_div", help="summed key to minimize (default: metrics.kl_div)")
    mp.add_argument("--maximize", action="store_true", help="maximize the objective instead")
    mp.add_argument("--max", action="append", metavar="KEY=VALUE", help="budget: sum of KEY <= VALUE (repeatable)")
    mp.add_argument("--min", action="append", metavar="KEY=VALUE", help="floor: sum of KEY >= VALUE (repeatable)")
    mp.add_argument("--num-solutions", type=int, default=1, help="several solutions, each differing from the earlier ones")
    mp.add_argument("--min-diversity", type=int, default=1, help="... in at least this many groups (default 1)")
    mp.add_argument("--time-limit", type=float, default=60.0, help="seconds for the whole solve (default 60)")
    mp.add_argument("--json", action="store_true", help="print JSON (an object; a list with --num-solutions > 1)")
    mp.set_defaults(func=cmd_mip)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # utils.training.TrainingInterrupted: SIGTERM, the step is saved
        if hasattr(e, "what"):
            print(f"interrupted: {e.what} stopped on SIGTERM; rerun the same command to resume", file=sys.stderr)
        raise
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror or e} (a read-only or full disk? choose another "
              "output_dir / cache_dir, or free space)", file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
