"""`nemo-plugins` command line.

    nemo-plugins inspect PATH [--json] [--dtype bf16] [--batch-size 1] [--seq-len 4096]
    nemo-plugins pipeline [--config conf/pipeline/tiny.yaml] [key=value ...]
    nemo-plugins config pipeline [key=value ...]      # print the resolved config

Errors in configs, overrides or checkpoints print one message naming what is wrong and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..arch.accounting import DTYPE_BYTES, report
from ..arch.config import ArchConfigError
from ..config import CONF_DIR, ConfigError, load_config, to_yaml
from ..model.checkpoint import CheckpointError, read_config

USER_ERRORS = (ConfigError, ArchConfigError, CheckpointError)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
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


def _pipeline_config(args):
    from ..pipeline import PipelineConfig

    yaml_path = args.config or CONF_DIR / "pipeline" / "tiny.yaml"
    return load_config(PipelineConfig, yaml_path, args.overrides)


def cmd_pipeline(args) -> int:
    from ..pipeline import run_pipeline

    cfg = _pipeline_config(args)
    summary = run_pipeline(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    return 0


def cmd_config(args) -> int:
    print(to_yaml(_pipeline_config(args)), end="")
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

    for name, func, help_ in (
        ("pipeline", cmd_pipeline, "run the main job (tiny world -> parent -> evaluate -> export)"),
        ("config", cmd_config, "print the resolved pipeline config"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", help="YAML file (default: conf/pipeline/tiny.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parent.steps=200")
        sp.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
