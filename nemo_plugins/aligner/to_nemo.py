"""The checkpoint boundary into NeMo-Aligner: a Hugging Face directory -> a NeMo 1 `.nemo`.

The NeMo 2.7 stages hand over NeMo 2 checkpoints; `nemo nemo_plugins export_hf` (NeMo 2.7 image)
writes one as a HF directory, and this module (Aligner image) turns it into the `.nemo` Aligner
0.7.0 restores, through the converter of the NeMo inside that image,
`scripts/checkpoint_converters/convert_llama_hf_to_nemo.py` (LlamaForCausalLM -> MegatronGPTModel).
Back out, `convert_llama_nemo_to_hf.py` of the same NeMo writes a HF directory again.

Aligner's NeMo `nlp` GPT model builds identical layers, so only a plain Llama (every layer the
same GQA + SwiGLU block) crosses: a Puzzle child (layers with their own KV heads, FFN widths,
no-op or linear blocks, fused FFNs) is refused with the routes that work. A homogeneous model
saved as nemotron-nas (DeciLM) is rewritten as plain Llama first, weights unchanged.

    python -m nemo_plugins.aligner.to_nemo hf_dir=/results/hf/sft out=/results/aligner/policy.nemo
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..arch.hf_json import is_plain_llama
from ..model.checkpoint import read_config

CONVERTER = "scripts/checkpoint_converters/convert_llama_hf_to_nemo.py"
HETEROGENEOUS_ROUTES = (
    "NeMo-Aligner 0.7.0's GPT model builds identical layers and cannot hold it. Routes: run the Aligner "
    "stages before compression (on the parent, e.g. `aligner_from=parent` in the NeMo-Run pipeline, then "
    "Puzzle on the aligned parent), or distil the child into a homogeneous student first"
)


class HeterogeneousModelError(ValueError):
    """The model's layers differ, which Aligner's uniform-layer GPT model cannot express."""


def check_uniform(hf_dir: str | Path) -> None:
    """Raise HeterogeneousModelError naming the first layer that differs from layer 0."""
    cfg = read_config(hf_dir)
    if is_plain_llama(cfg):
        return
    first = cfg.blocks[0]
    differs = next((i for i, b in enumerate(cfg.blocks) if b != first), 0)
    raise HeterogeneousModelError(
        f"{hf_dir}: not a plain Llama (layer {differs}: attention {cfg.blocks[differs].attention}, "
        f"FFN {cfg.blocks[differs].ffn}; layer 0: {first.attention}, {first.ffn}). {HETEROGENEOUS_ROUTES}"
    )


def as_plain_llama(hf_dir: str | Path, scratch: str | Path) -> Path:
    """`hf_dir` itself when its config is LlamaForCausalLM; else (a homogeneous nemotron-nas or
    project-schema directory) the same weights rewritten as plain Llama under `scratch`, with the
    tokenizer files copied."""
    from ..model.checkpoint import load_checkpoint, save_checkpoint

    hf_dir = Path(hf_dir)
    check_uniform(hf_dir)
    config = hf_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("architectures") == ["LlamaForCausalLM"]:
        return hf_dir
    out = Path(scratch) / "llama"
    save_checkpoint(load_checkpoint(hf_dir), out, architecture="llama")
    for f in hf_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens_map", "generation_config")) and f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def converter_command(nemo_dir: str, hf_dir: str | Path, out: str, precision: str = "bf16") -> list[str]:
    """NeMo's HF -> .nemo Llama converter, as the Aligner image runs it."""
    return [sys.executable, f"{nemo_dir}/{CONVERTER}", f"--input_name_or_path={hf_dir}", f"--output_path={out}",
            f"--precision={precision}"]  # fmt: skip


@dataclass
class ToNemoConfig:
    hf_dir: str = ""
    out: str = ""
    nemo_dir: str = "/opt/NeMo"  # the NeMo checkout inside Aligner's image (its converter scripts)
    precision: str = "bf16"


def main(argv: list[str] | None = None) -> int:
    from ..config import load_config

    cfg = load_config(ToNemoConfig, overrides=sys.argv[1:] if argv is None else argv)
    for key in ("hf_dir", "out"):
        if not getattr(cfg, key):
            raise SystemExit(f"{key} is not set: expected hf_dir=HF_DIR out=MODEL.nemo")
    if Path(cfg.out).exists():
        print(f"{cfg.out} exists; not converting again")
        return 0
    try:
        check_uniform(cfg.hf_dir)
    except HeterogeneousModelError as e:
        raise SystemExit(str(e)) from None
    scratch = Path(cfg.out).parent / f".{Path(cfg.out).name}.hf"
    source = as_plain_llama(cfg.hf_dir, scratch)
    subprocess.run(converter_command(cfg.nemo_dir, source, cfg.out, cfg.precision), check=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
