"""The `data.text` source: the user's documents as the text Puzzle, fusion and recovery train and
measure on, split by document, packed in the model's tokenizer; the tiny world when unset."""

import json
import re

import pytest

from nemo_plugins.config import DEFAULT_CONFIGS, ConfigError, load_config
from nemo_plugins.data.sources import Corpus, TextSourceConfig
from nemo_plugins.data.text_data import is_heldout
from nemo_plugins.pipeline import PipelineConfig, run_pipeline

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def write_docs(path, n=40):
    with open(path, "w") as f:
        f.write("{broken\n")  # line 1: counted and skipped (later lines may never be read: streaming)
        for i in range(n):
            marker = f"doc{i:03d}"
            text = " ".join(f"{marker} {WORDS[(i + j) % len(WORDS)]}" for j in range(30))
            f.write(json.dumps({"id": marker, "text": text}) + "\n")


def test_without_text_the_corpus_is_the_tiny_world(tiny_world):
    corpus = Corpus(tiny_world)
    assert corpus.directory == tiny_world.directory and corpus.key is None
    assert corpus.eval_examples() == tiny_world.eval_examples()


def test_text_rows_are_packed_split_by_document_and_keyed(tiny_world, tmp_path):
    write_docs(tmp_path / "docs.jsonl")
    cfg = TextSourceConfig(paths=[str(tmp_path / "docs.jsonl")], id_field="id", heldout_fraction=0.25, seq_len=32,
                           train_tokens=32 * 20, heldout_tokens=32 * 4)  # fmt: skip
    corpus = Corpus(tiny_world, cfg)
    chat = tiny_world.chat
    train, held = corpus.training_examples(chat), corpus.eval_examples(chat)
    assert len(train) == 20 and len(held) == 4
    assert all(len(ids) == 32 and mask == [1] * 32 for ids, mask in train + held)
    markers = lambda rows: {m for ids, _ in rows for m in re.findall(r"\bdoc\d{3}\b", chat.decode(ids))}  # noqa: E731
    seen_train, seen_held = markers(train), markers(held)
    assert seen_train and seen_held and not seen_train & seen_held
    assert all(is_heldout(m, 0.25) for m in seen_held) and not any(is_heldout(m, 0.25) for m in seen_train)
    assert corpus.report["train_files"]["skipped"] == 1 and "docs.jsonl:1" in corpus.report["train_files"]["problems"][0]
    assert corpus.directory != tiny_world.directory and corpus.directory.name == corpus.key
    other = Corpus(tiny_world, TextSourceConfig(**{**cfg.__dict__, "seq_len": 16}))
    assert other.key != corpus.key


def test_too_little_text_is_a_clear_error(tiny_world, tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    corpus = Corpus(tiny_world, TextSourceConfig(paths=[str(tmp_path / "a.txt")], heldout_fraction=0.5, seq_len=64,
                                                 train_tokens=64, heldout_tokens=64))  # fmt: skip
    with pytest.raises(ValueError, match="fewer than seq_len=64 tokens"):
        corpus.training_examples()
        corpus.eval_examples()


def test_text_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.text.builtin='wiki'"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, ["data.text.builtin=wiki"])
    with pytest.raises(ConfigError, match="data.text.train_tokens=10"):
        load_config(PipelineConfig, DEFAULT_CONFIGS, ["data.text.train_tokens=10"])


def test_champ_is_built_in_distillation_text(tiny_world):
    corpus = Corpus(tiny_world, TextSourceConfig(builtin="champ", seq_len=64, train_tokens=64 * 8, heldout_tokens=64 * 2))
    rows = corpus.training_examples()
    assert len(rows) == 8 and corpus.report["train"]["documents"] >= 1


def test_puzzle_fusion_and_recovery_train_on_the_text_source(tmp_path):
    write_docs(tmp_path / "docs.jsonl", n=60)
    overrides = [
        f"output_dir={tmp_path / 'out'}", f"cache_dir={tmp_path / 'cache'}", "progress=false",
        "stages=[world,parent,puzzle,fusion,recovery]", "world.n_train=64", "world.n_eval=8",
        "parent.steps=5", "parent.batch_size=8", "parent.hidden_size=64", "parent.intermediate_size=512",
        "parent.num_layers=3", "parent.num_attention_heads=4", "parent.num_kv_heads=4",
        "puzzle.library.kv_heads=[2]", "puzzle.library.ffn_fractions=[0.5]", "puzzle.library.attention_linear=false",
        "puzzle.bld.steps=2", "puzzle.bld.batch_size=4", "puzzle.init.calibration_batches=1",
        "puzzle.score_batches=1", "puzzle.score_batch_size=4", "puzzle.pareto_points=2",
        "puzzle.costs.measure=false", "puzzle.budget.max_attention_layers=1",
        "fusion.calibration_batches=1", "fusion.batch_size=4",
        "recovery.steps=2", "recovery.batch_size=4", "recovery.val_every=2", "recovery.ckpt_every=2",
        "recovery.val_batches=1", "recovery.eval_problems=2", "recovery.eval_batches=1", "recovery.warmup_steps=1",
        f"data.text.paths=[{tmp_path / 'docs.jsonl'}]", "data.text.id_field=id", "data.text.seq_len=48",
        "data.text.train_tokens=480", "data.text.heldout_tokens=192",
    ]  # fmt: skip
    summary = run_pipeline(load_config(PipelineConfig, DEFAULT_CONFIGS, overrides))
    assert summary["data"]["text"]["train"]["rows"] == 10 and summary["data"]["text"]["heldout"]["rows"] == 4
    puzzle = json.loads((tmp_path / "out" / "puzzle" / "report.json").read_text())
    assert "/text/" in puzzle["library_dir"]  # the trained library is keyed by the data
    rec = json.loads((tmp_path / "out" / "recovery" / "report.json").read_text())
    assert rec["kd"]["examples_seen"] == 2 * 4 and rec["parent"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
