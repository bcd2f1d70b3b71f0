"""Latency of k sequential FFN blocks vs the one fused FFN that replaces them (FFN Fusion).

A stack of k attention-free layers (RMSNorm + SwiGLU, residual) is fused exactly into one
wide SwiGLU (`nemo_plugins.fusion.fuse_run`); both run the same input. Timed: one forward of
the layers (no embedding or head) at decode (one token per sequence) for batch sizes 1..64,
and at prefill (batch 1 x --prefill-len tokens). Repetitions alternate sequential and fused;
figures are medians and the ratio is the median of paired ratios (sequential / fused).

The FLOPs are the same; what fusion removes is k-1 sequential steps: k-1 norms and residual
adds, and k-1 rounds of small GEMMs replaced by wider ones (on a GPU also k-1 tensor-parallel
all-reduces). On a CPU the gain is largest where per-op overhead dominates (small batches).

    python benchmarks/bench_ffn_fusion.py [--k 2 4] [--hidden 1024 --ffn 2816] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nemo_plugins.arch.config import ATTENTION_NO_OP, BlockConfig, ModelConfig, swiglu
from nemo_plugins.fusion.analysis import find_ffn_runs
from nemo_plugins.fusion.fuse import fuse_run
from nemo_plugins.model.llama import HeteroLlamaForCausalLM


def ffn_stack(k: int, hidden: int, ffn: int) -> HeteroLlamaForCausalLM:
    cfg = ModelConfig(vocab_size=16, hidden_size=hidden, num_attention_heads=8,
                      blocks=tuple(BlockConfig(ATTENTION_NO_OP, swiglu(ffn)) for _ in range(k)))  # fmt: skip
    model = HeteroLlamaForCausalLM(cfg).eval()
    for layer in model.model.layers:  # non-trivial norm gains, so the fold is exercised
        torch.nn.init.uniform_(layer.post_attention_layernorm.weight, 0.5, 1.5)
    return model


def layers_forward(model: HeteroLlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    for layer in model.model.layers:
        x = layer.ffn(x)
    return x


def depth(model) -> int:
    return sum(b.ffn.kind != "no_op" for b in model.config.blocks)


@torch.no_grad()
def compare(seq, fused, x: torch.Tensor, reps: int, inner: int) -> dict:
    for _ in range(3):
        layers_forward(seq, x), layers_forward(fused, x)
    pairs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            layers_forward(seq, x)
        t1 = time.perf_counter()
        for _ in range(inner):
            layers_forward(fused, x)
        t2 = time.perf_counter()
        pairs.append(((t1 - t0) / inner, (t2 - t1) / inner))
    return {
        "sequential_ms": 1e3 * statistics.median(p for p, _ in pairs),
        "fused_ms": 1e3 * statistics.median(f for _, f in pairs),
        "ratio": statistics.median(p / f for p, f in pairs),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="FFN blocks fused into one")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816, help="width of each FFN")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    print(f"hidden {args.hidden}, FFN width {args.ffn} each, device {args.device}, threads {torch.get_num_threads()}")
    print(f"{'k':>2} {'workload':<18} {'sequential ms':>14} {'fused ms':>9} {'seq/fused':>10} {'layers removed':>15}")
    for k in args.k:
        seq = ffn_stack(k, args.hidden, args.ffn).to(args.device)
        fused = fuse_run(seq, find_ffn_runs(seq.config)[0]).to(args.device)
        removed = depth(seq) - depth(fused)
        x = torch.randn(2, 3, args.hidden, device=args.device)
        with torch.no_grad():  # sanity: fused equals the parallel sum of the original FFNs
            want = x + sum(layer.mlp(layer.post_attention_layernorm(x)) for layer in seq.model.layers)
            torch.testing.assert_close(layers_forward(fused, x), want, rtol=1e-4, atol=1e-4)
        work = [(f"decode batch {b}", torch.randn(b, 1, args.hidden, device=args.device)) for b in args.batch_sizes]
        work.append((f"prefill 1x{args.prefill_len}", torch.randn(1, args.prefill_len, args.hidden, device=args.device)))
        for name, x in work:
            inner = 20 if x.shape[1] == 1 else 2
            r = compare(seq, fused, x, args.reps, inner)
            rows.append({"k": k, "workload": name, "layers_removed": removed, **r})
            print(f"{k:>2} {name:<18} {r['sequential_ms']:>14.3f} {r['fused_ms']:>9.3f} {r['ratio']:>9.2f}x {removed:>15}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
