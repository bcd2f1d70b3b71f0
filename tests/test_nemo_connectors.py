"""NeMo 2 HF importer/exporter of Puzzle children (`nemo_plugins.nemo.connectors`).

The full `llm.import_ckpt` -> `llm.export_ckpt` round trip runs here on the CPU for three tiny
HF directories built locally from the reference model with random weights: a plain Llama
(bfloat16, tied embeddings, the project's bare tokenizer.json), a nemotron-nas child (per-layer
KV heads, no-op and linear sub-blocks, a HF tokenizer with tokenizer_config.json) and a fused
child (parallel FFN groups, which only the project schema can hold). The exported weights must
equal the source's bit for bit, and the config and tokenizer files must come back unchanged.

The connectors save and load through `host_io.HostCheckpointIO`, which needs no CUDA, so
conversion itself needs no patch: the last tests run it in a plain process (no test code, CUDA
hidden, a script without a main guard). The module fixture still runs under the test-only
`nemo_cpu_shim` (gloo world of 1, CPU patches) for the tests that run the megatron model's
forward pass. NeMo is imported inside fixtures, so collecting this file costs nothing where the
`nemo` extra is missing.
"""

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch

from nemo_plugins.arch.config import (
    ATTENTION_LINEAR,
    ATTENTION_NO_OP,
    FFN_LINEAR,
    FFN_NO_OP,
    BlockConfig,
    ModelConfig,
    gqa,
    homogeneous,
    parallel,
    swiglu,
)
from nemo_plugins.data.tokenizer import encode, train_tokenizer
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.checkpoint import NATIVE_CONFIG, config_file, load_state_dict, read_config, save_checkpoint
from nemo_plugins.model.llama import HeteroLlamaForCausalLM

pytestmark = pytest.mark.nemo

TEXTS = ["<|bos|>the cat sat on the mat 12 + 30 = 42<|eos|>", "a dog ran to the park, then 7 * 6 = 42"] * 20


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nm():
    """NeMo modules, the connectors, and the CPU environment for the whole module (~20 s import)."""
    import nemo_cpu_shim
    from nemo.collections import llm
    from nemo.lightning import io

    from nemo_plugins.nemo import connectors, convert, model

    with nemo_cpu_shim.megatron_cpu():
        yield types.SimpleNamespace(
            llm=llm, io=io, connectors=connectors, convert=convert, model=model, shim=nemo_cpu_shim
        )


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def llama_arch(vocab: int) -> ModelConfig:
    return homogeneous(
        vocab_size=vocab, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
        intermediate_size=96, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def nas_arch(vocab: int) -> ModelConfig:
    """Every sub-block kind nemotron-nas can hold (widths 256/512 are ffn_mult 6 and 12 at hidden 64)."""
    blocks = (
        BlockConfig(gqa(2), swiglu(256)),
        BlockConfig(ATTENTION_NO_OP, swiglu(512)),
        BlockConfig(gqa(1), FFN_LINEAR),
        BlockConfig(ATTENTION_LINEAR, swiglu(256)),
        BlockConfig(gqa(4), FFN_NO_OP),
    )
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_attention_heads=4, blocks=blocks, rope_theta=10000.0,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip


def fused_arch(vocab: int) -> ModelConfig:
    """Per-layer KV heads, no-op and linear sub-blocks, and parallel FFN groups (with and without
    a linear member): only the project schema can hold it."""
    blocks = (
        BlockConfig(gqa(2), swiglu(128)),
        BlockConfig(ATTENTION_NO_OP, swiglu(96)),
        BlockConfig(gqa(1), FFN_LINEAR),
        BlockConfig(ATTENTION_LINEAR, parallel(swiglu(64), swiglu(32))),
        BlockConfig(gqa(4), parallel(swiglu(64), FFN_LINEAR)),
        BlockConfig(gqa(2), FFN_NO_OP),
    )
    return ModelConfig(vocab_size=vocab, hidden_size=64, num_attention_heads=4, blocks=blocks, rope_theta=10000.0,
                       max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip


def write_hf_dir(path: Path, arch: ModelConfig, tok, *, dtype=torch.float32, hf_tokenizer=False, seed=0) -> Path:
    """A HF directory of the reference model with random weights, written by the project's saver."""
    torch.manual_seed(seed)
    model = HeteroLlamaForCausalLM(arch).to(dtype)
    files = {}
    if tok is not None and hf_tokenizer:
        from transformers import PreTrainedTokenizerFast

        tok_dir = path.parent / f"{path.name}.tok"
        specials = dict(bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
        hf.save_pretrained(str(tok_dir))
        files = {p.name: p.read_bytes() for p in tok_dir.iterdir()}
    elif tok is not None:
        files = {"tokenizer.json": tok.to_str()}
    return save_checkpoint(model, path, extra_files=files)


CASES = {
    # name: (arch builder, dtype, HF tokenizer files?, file holding the config)
    "llama": (llama_arch, torch.bfloat16, False, "config.json"),
    "nas_child": (nas_arch, torch.float32, True, "config.json"),
    "fused_child": (fused_arch, torch.float32, False, NATIVE_CONFIG),
}


@pytest.fixture(scope="module")
def roundtrips(nm, tok, tmp_path_factory):
    """name -> the round trip of that case (run on first use): source HF dir -> llm.import_ckpt
    -> NeMo checkpoint -> llm.export_ckpt -> HF dir."""
    done = {}

    def run(name):
        if name not in done:
            build, dtype, hf_tokenizer, config_file = CASES[name]
            root = tmp_path_factory.mktemp(name)
            arch = build(tok.get_vocab_size())
            src = write_hf_dir(root / "src", arch, tok, dtype=dtype, hf_tokenizer=hf_tokenizer)
            model = nm.model.PuzzleChildModel(nm.model.nemo_config(arch))
            nemo = nm.llm.import_ckpt(model=model, source=f"hf://{src}", output_path=root / "nemo")
            out = nm.llm.export_ckpt(nemo, "hf", output_path=root / "hf")
            done[name] = types.SimpleNamespace(
                name=name, arch=arch, dtype=dtype, src=src, nemo=Path(nemo), out=Path(out), root=root,
                config_file=config_file, model=model,
            )
        return done[name]

    return run


@pytest.fixture(params=list(CASES))
def roundtrip(request, roundtrips):
    return roundtrips(request.param)


# ----------------------------------------------------------------------------- registration, errors


def test_connectors_are_registered_for_hf(nm):
    PuzzleChildModel = nm.model.PuzzleChildModel
    assert type(PuzzleChildModel.importer("hf:///some/dir")) is nm.connectors.HFPuzzleImporter
    assert type(PuzzleChildModel.exporter("hf", "/some/ckpt")) is nm.connectors.HFPuzzleExporter
    assert str(PuzzleChildModel.importer("hf:///some/dir")) == "/some/dir"


def test_import_errors_name_the_path_and_what_was_expected(nm, tmp_path, tok):
    importer = nm.model.PuzzleChildModel.importer
    missing = tmp_path / "missing"
    expected = rf"{re.escape(str(missing))}: no such directory .*config\.json.*safetensors"
    with pytest.raises(CheckpointError, match=expected):
        importer(f"hf://{missing}").config
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))}/config\.json: no such file .*{NATIVE_CONFIG}"):
        importer(f"hf://{empty}").config
    no_weights = tmp_path / "no_weights"
    write_hf_dir(no_weights, llama_arch(tok.get_vocab_size()), tok)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(no_weights))}: no \*\.safetensors weights"):
        importer(f"hf://{no_weights}").config
    # Weights that do not match the config: refused before anything is written.
    wrong = tmp_path / "wrong"
    write_hf_dir(wrong, llama_arch(tok.get_vocab_size()), tok)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    out = tmp_path / "out"
    shape_error = r"model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 64\), expected \(128, 64\)"
    with pytest.raises(CheckpointError, match=shape_error):
        nm.llm.import_ckpt(model=nm.model.PuzzleChildModel(nm.model.nemo_config(read_config(wrong))),
                           source=f"hf://{wrong}", output_path=out)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".out.*")), "partial output left behind"


def test_importer_config_keeps_arch_and_dtype(nm, tmp_path, tok):
    arch = nas_arch(tok.get_vocab_size())
    src = write_hf_dir(tmp_path / "src", arch, tok, dtype=torch.bfloat16)
    importer = nm.model.PuzzleChildModel.importer(f"hf://{src}")
    cfg = importer.config
    assert isinstance(cfg, nm.model.PuzzleChildConfig)
    assert nm.model.arch_of(cfg) == arch
    assert (cfg.params_dtype, cfg.bf16, cfg.fp16) == (torch.bfloat16, True, False)
    assert cfg.persist_layer_norm is False  # megatron's local (non-TE) RMSNorm refuses it


def test_tokenizers(nm, tmp_path, tok):
    """A bare tokenizer.json gets a minimal tokenizer_config.json; HF tokenizer files are used as
    they are; a directory without tokenizer files gives no tokenizer."""
    arch = llama_arch(tok.get_vocab_size())
    bare = write_hf_dir(tmp_path / "bare", arch, tok)
    t = nm.model.PuzzleChildModel.importer(f"hf://{bare}").tokenizer
    text = "the cat sat 12 + 30 = 42<|eos|>"
    assert t.text_to_ids(text) == encode(tok, text)
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.vocab_size == tok.get_vocab_size()
    written = json.loads((Path(t.tokenizer.name_or_path) / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert sorted(os.listdir(t.tokenizer.name_or_path)) == ["tokenizer.json", "tokenizer_config.json"]  # no weights

    hf = write_hf_dir(tmp_path / "hf", arch, tok, hf_tokenizer=True)
    t = nm.model.PuzzleChildModel.importer(f"hf://{hf}").tokenizer
    copied = Path(t.tokenizer.name_or_path)
    assert (copied / "tokenizer_config.json").read_bytes() == (hf / "tokenizer_config.json").read_bytes()
    assert t.text_to_ids(text) == encode(tok, text) and t.pad_id == 0

    none = write_hf_dir(tmp_path / "none", arch, None)
    assert nm.model.PuzzleChildModel.importer(f"hf://{none}").tokenizer is None


def test_convert_state_gives_the_reference_logits(nm, tmp_path, tok):
    """The importer's conversion into a CPU-built megatron model computes the reference model's logits."""
    arch = fused_arch(tok.get_vocab_size())
    src = write_hf_dir(tmp_path / "src", arch, tok)
    importer = nm.model.PuzzleChildModel.importer(f"hf://{src}")
    cfg = nm.model.nemo_config(arch, seq_length=16, **nm.shim.CPU_OVERRIDES)
    target = nm.model.PuzzleChildModel(cfg)
    target.configure_model()
    importer.convert_state(importer.source_state(), target)
    got = {k: v for k, v in target.module.state_dict().items() if not k.endswith("_extra_state")}
    want = nm.convert.to_mcore(arch, importer.source_state())
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)

    from nemo_plugins.model.checkpoint import load_checkpoint

    reference = load_checkpoint(src)
    ids = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)[None].expand(2, -1)
    causal = ~torch.tril(torch.ones(16, 16, dtype=torch.bool)).view(1, 1, 16, 16)
    target.module.eval()
    with torch.no_grad():
        torch.testing.assert_close(target.module(ids, positions, causal), reference(ids), atol=1e-4, rtol=1e-4)


def test_convert_state_refuses_a_model_of_another_arch(nm, tmp_path, tok):
    src = write_hf_dir(tmp_path / "src", nas_arch(tok.get_vocab_size()), tok)
    importer = nm.model.PuzzleChildModel.importer(f"hf://{src}")
    other = nm.model.PuzzleChildModel(
        nm.model.nemo_config(llama_arch(tok.get_vocab_size()), seq_length=16, **nm.shim.CPU_OVERRIDES)
    )
    other.configure_model()
    missing = r"converted weights miss .*decoder\.layers\.1\.input_layernorm"
    with pytest.raises(nm.convert.ConversionError, match=missing):
        importer.convert_state(importer.source_state(), other)


# ----------------------------------------------------------------------------- the full round trip


def test_roundtrip_weights_are_exact(roundtrip):
    src, out = load_state_dict(roundtrip.src), load_state_dict(roundtrip.out)
    assert sorted(src) == sorted(out)
    for name, tensor in src.items():
        assert out[name].dtype == roundtrip.dtype, name
        assert torch.equal(out[name], tensor), name


def test_roundtrip_config_is_unchanged(roundtrip):
    assert read_config(roundtrip.out) == roundtrip.arch
    src_cfg = json.loads((roundtrip.src / roundtrip.config_file).read_text())
    out_cfg = json.loads((roundtrip.out / roundtrip.config_file).read_text())
    assert out_cfg == src_cfg  # key for key, including architectures and torch_dtype
    expected_arch = {"llama": ["LlamaForCausalLM"], "nas_child": ["DeciLMForCausalLM"], "fused_child": None}
    assert out_cfg.get("architectures") == expected_arch[roundtrip.name]
    if roundtrip.name == "fused_child":
        assert not (roundtrip.out / "config.json").exists()


def test_roundtrip_tokenizer_files_are_unchanged(roundtrip):
    src_files = {p.name for p in roundtrip.src.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    assert "tokenizer.json" in src_files
    for name in src_files:
        assert (roundtrip.out / name).read_bytes() == (roundtrip.src / name).read_bytes(), name
    # A bare tokenizer.json leaves with the minimal tokenizer_config.json it was given.
    assert (roundtrip.out / "tokenizer_config.json").is_file()


def test_nemo_checkpoint_structure(nm, roundtrip, tok):
    ckpt = roundtrip.nemo
    assert (ckpt / "weights" / "metadata.json").is_file() and (ckpt / "context" / "io.json").is_file()
    tokenizer_dir = ckpt / "context" / nm.connectors.TOKENIZER_DIR
    assert (tokenizer_dir / "tokenizer.json").read_bytes() == (roundtrip.src / "tokenizer.json").read_bytes()
    assert not list(ckpt.parent.glob(".nemo.*")), "temporary directories left behind"
    loaded = nm.io.load_context(str(ckpt), subpath="model")
    assert type(loaded) is nm.model.PuzzleChildModel
    # the architecture file is the source's, copied into the checkpoint, and read from there
    source_config = config_file(roundtrip.src)
    assert (ckpt / "context" / source_config.name).read_bytes() == source_config.read_bytes()
    assert Path(loaded.config.arch_path) == ckpt / "context" / source_config.name
    assert nm.model.arch_of(loaded) == roundtrip.arch
    assert loaded.config.params_dtype == roundtrip.dtype
    assert loaded.tokenizer.text_to_ids("the cat 42") == encode(tok, "the cat 42")
    # on_import_ckpt gave the model passed to import_ckpt the checkpoint's tokenizer.
    assert Path(roundtrip.model.tokenizer.tokenizer.name_or_path) == tokenizer_dir


def test_roundtrip_keeps_hf_passthrough_keys(nm, tok, tmp_path):
    src = write_hf_dir(tmp_path / "src", nas_arch(tok.get_vocab_size()), tok)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    (src / "config.json").write_text(json.dumps(cfg))
    arch = read_config(src)
    nemo = nm.llm.import_ckpt(model=nm.model.PuzzleChildModel(nm.model.nemo_config(arch)), source=f"hf://{src}",
                              output_path=tmp_path / "nemo")  # fmt: skip
    out = nm.llm.export_ckpt(nemo, "hf", output_path=tmp_path / "hf")
    assert json.loads((Path(out) / "config.json").read_text()).get("auto_map") == cfg["auto_map"]


# ----------------------------------------------------------------------------- overwrite, atomicity


def test_import_reuses_an_existing_checkpoint(nm, roundtrips):
    """Without overwrite an existing import is reused untouched (NeMo's import cache), and the
    importer's tokenizer is then the checkpoint's copy."""
    rt = roundtrips("llama")
    before = {p: p.stat().st_mtime_ns for p in rt.nemo.rglob("*")}
    importer = nm.model.PuzzleChildModel.importer(f"hf://{rt.src}")
    assert importer(output_path=rt.nemo) == rt.nemo
    assert {p: p.stat().st_mtime_ns for p in rt.nemo.rglob("*")} == before
    assert Path(importer.tokenizer.tokenizer.name_or_path) == rt.nemo / "context" / nm.connectors.TOKENIZER_DIR


def test_export_never_overwrites_without_overwrite_and_is_atomic(nm, roundtrips, monkeypatch):
    roundtrip = roundtrips("llama")
    existing = roundtrip.root / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    for path in (existing, str(existing)):  # llm.export_ckpt itself checks only a str path
        with pytest.raises(FileExistsError, match="exists"):
            nm.llm.export_ckpt(roundtrip.nemo, "hf", output_path=path)
    exporter = nm.model.PuzzleChildModel.exporter("hf", roundtrip.nemo)
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(existing))} exists; pass overwrite=True"):
        exporter(output_path=existing)
    assert sorted(os.listdir(existing)) == ["keep.txt"]

    def broken(arch, state):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(nm.connectors, "from_mcore", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        exporter(output_path=existing, overwrite=True)
    assert sorted(os.listdir(existing)) == ["keep.txt"]  # the old output survives a failed overwrite
    assert not [p for p in roundtrip.root.iterdir() if p.name.startswith(".existing")], "temporaries left behind"
    monkeypatch.undo()

    assert nm.llm.export_ckpt(roundtrip.nemo, "hf", output_path=existing, overwrite=True) == existing
    assert "keep.txt" not in os.listdir(existing)
    assert read_config(existing) == roundtrip.arch


def test_converting_leaves_plain_lightning_trainers_working(roundtrips, tmp_path):
    """NeMo's MegatronStrategy patches Lightning's loop modules process-wide; the connectors undo
    it, so the project's own Lightning loops still train after an import and export."""
    import lightning as L
    from lightning.pytorch.loops import evaluation_loop, fit_loop, prediction_loop, utilities

    roundtrips("llama")
    for module in (fit_loop, evaluation_loop, prediction_loop):
        assert module._select_data_fetcher is utilities._select_data_fetcher

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def training_step(self, batch, batch_idx):
            return (self.w * batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2))
    assert trainer.global_step == 2 and not torch.equal(model.w.detach(), torch.ones(2))


# ----------------------------------------------------------------------------- a plain process on a CPU

# Run as a script in its own process: no test shim, no patch, CUDA hidden, and no main guard (a
# helper process started with "spawn" would re-run this top-level code; the save used to start one).
PLAIN_PROCESS_SCRIPT = r'''
import json, multiprocessing, sys, torch
from pathlib import Path
from nemo_plugins.arch.config import ATTENTION_LINEAR, ATTENTION_NO_OP, FFN_LINEAR, BlockConfig, ModelConfig, gqa, parallel, swiglu
from nemo_plugins.model.checkpoint import save_checkpoint
from nemo_plugins.model.llama import HeteroLlamaForCausalLM

root = Path(sys.argv[1])
nas = ModelConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=64,
                  blocks=(BlockConfig(gqa(2), swiglu(256)), BlockConfig(ATTENTION_NO_OP, swiglu(512)),
                          BlockConfig(ATTENTION_LINEAR, FFN_LINEAR)))
fused = ModelConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=64,
                    blocks=(BlockConfig(gqa(1), parallel(swiglu(64), FFN_LINEAR)), BlockConfig(gqa(4), swiglu(96))))
torch.manual_seed(0)
save_checkpoint(HeteroLlamaForCausalLM(nas).to(torch.bfloat16), root / "nas_src")
save_checkpoint(HeteroLlamaForCausalLM(fused), root / "fused_src")

from nemo.collections import llm
from nemo_plugins.nemo import puzzle_tasks
from nemo_plugins.nemo.model import PuzzleChildModel, nemo_config

puzzle_tasks.import_hf(str(root / "nas_src"), str(root / "nas_nemo"))  # `nemo nemo_plugins import_hf`
llm.import_ckpt(model=PuzzleChildModel(nemo_config(fused)), source=f"hf://{root / 'fused_src'}",
                output_path=root / "fused_nemo")
for name in ("nas", "fused"):
    llm.export_ckpt(root / f"{name}_nemo", "hf", output_path=root / f"{name}_out")
print("FACTS " + json.dumps({
    "cuda_available": torch.cuda.is_available(), "cuda_initialized": torch.cuda.is_initialized(),
    "test_modules": sorted(m for m in sys.modules if m.startswith(("nemo_cpu_shim", "test_", "conftest", "pytest"))),
    "child_processes": len(multiprocessing.active_children()),
}))
'''


def test_cpu_round_trip_in_a_plain_process_is_exact(tmp_path):
    """`import_hf` and `llm.import_ckpt`, then `llm.export_ckpt`, in a fresh process that imports
    no test code, with CUDA hidden: the exported weights equal the source's bit for bit."""
    import subprocess
    import sys

    script = tmp_path / "convert.py"
    script.write_text(PLAIN_PROCESS_SCRIPT)
    repo = Path(__file__).resolve().parent.parent
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # the shim's world, if up here
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(repo))
    try:
        proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                              timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the conversion script hung (a helper process re-running the script?): {e}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(proc.stdout.split("FACTS ", 1)[1].splitlines()[0])
    assert facts == {"cuda_available": False, "cuda_initialized": False, "test_modules": [], "child_processes": 0}
    for name, dtype in (("nas", torch.bfloat16), ("fused", torch.float32)):
        src, out = load_state_dict(tmp_path / f"{name}_src"), load_state_dict(tmp_path / f"{name}_out")
        assert sorted(out) == sorted(src), name
        for key, tensor in src.items():
            assert out[key].dtype == dtype and torch.equal(out[key], tensor), f"{name}: {key}"
        assert read_config(tmp_path / f"{name}_out") == read_config(tmp_path / f"{name}_src")


UNGUARDED_SPAWN_SCRIPT = r'''
import multiprocessing
from nemo_plugins.nemo import refuse_in_spawned_import

refuse_in_spawned_import("import_hf")
print("parent passed the check", flush=True)
child = multiprocessing.get_context("spawn").Process(target=print)
child.start()
child.join()
print("child exit code", child.exitcode)
'''


def test_a_script_without_main_guard_gets_a_clear_message(nm, tmp_path, monkeypatch, roundtrips):
    """Where a helper process started with "spawn" re-runs a script's unguarded top-level code,
    the conversion called there fails naming the script and the guard to add (instead of hanging
    on the parent's lock); the connectors make that check before anything else."""
    import multiprocessing
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SPAWN_SCRIPT)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tmp_path)  # fmt: skip
    assert "parent passed the check" in proc.stdout and "child exit code 1" in proc.stdout, proc.stdout + proc.stderr
    assert f"import_hf was called while a helper process (multiprocessing 'spawn') imports {script}" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr

    rt = roundtrips("llama")
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match=r"HFPuzzleExporter .* helper process .* `if __name__ == \"__main__\":`"):
        nm.llm.export_ckpt(rt.nemo, "hf", output_path=tmp_path / "out")
    assert not (tmp_path / "out").exists()
