"""benchmarks/bench_toggle.py: the sft stage's toggle evaluation on the training or the held-out
problems of a saved model, with the pipeline config's data and decoding settings."""

from __future__ import annotations

import json

import pytest

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.data.tiny_world import WorldConfig, build_world
from nemo_plugins.model.checkpoint import save_checkpoint
from nemo_plugins.model.llama import HeteroLlamaForCausalLM

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    world = build_world(WorldConfig())
    cfg = homogeneous(vocab_size=world.tokenizer.get_vocab_size(), hidden_size=32, num_layers=1,
                      num_attention_heads=2, num_kv_heads=1, intermediate_size=64)  # fmt: skip
    path = tmp_path_factory.mktemp("toggle") / "model"
    save_checkpoint(HeteroLlamaForCausalLM(cfg), path, extra_files=world.chat.files())
    return path


def test_scores_the_chosen_split_with_the_configs_decoding(model_dir, tmp_path, monkeypatch):
    bench, world = load_benchmark("bench_toggle"), build_world(WorldConfig())
    asked = []
    real = bench.evaluate_toggle

    def recording(model, chat, problems, **kw):
        asked.append(([p.question for p in problems], kw))
        return real(model, chat, problems, **kw)

    monkeypatch.setattr(bench, "evaluate_toggle", recording)
    out = tmp_path / "train.json"
    assert bench.main(["--model", str(model_dir), "--n", "3", "--json", str(out), "sft.max_new_tokens=4",
                       "sft.eval_batch_size=2", "sft.repetition_penalty=1.3", "sft.repetition_penalty_off=1.0"]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["settings"]["split"] == "train" and saved["settings"]["n"] == 3
    assert set(saved["result"]) == {"on", "off"} and saved["result"]["on"]["n"] == 3
    assert saved["result"]["on"]["mean_response_tokens"] <= 4
    assert asked[0][0] == [p.question for p in world.train[:3]]
    assert asked[0][1]["repetition_penalty"] == 1.3 and asked[0][1]["batch_size"] == 2
    assert asked[0][1]["repetition_penalty_off"] == 1.0 and saved["settings"]["repetition_penalty_off"] == 1.0
    bench.main(["--model", str(model_dir), "--split", "heldout", "--n", "2", "sft.max_new_tokens=2"])
    assert asked[1][0] == [p.question for p in world.eval[:2]]
    with pytest.raises(SystemExit):
        bench.main(["--model", str(model_dir), "--n", "0"])
