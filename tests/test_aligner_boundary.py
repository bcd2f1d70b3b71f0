"""The Aligner boundary pieces that need no Aligner: the HF -> .nemo conversion's uniform-layer
check (a Puzzle child is refused, naming the layer and the routes; a homogeneous nemotron-nas
directory is rewritten as plain Llama, weights unchanged), the trainer's wait for the reward
server of its allocation (`rm_host`) and the reward server's settings checks."""

import http.server
import json
import threading

import pytest
import torch

TINY = dict(vocab_size=64, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, intermediate_size=64)


def test_to_nemo_refuses_a_heterogeneous_child_with_the_routes(tmp_path):
    from nemo_plugins.aligner.to_nemo import HeterogeneousModelError, check_uniform, converter_command
    from nemo_plugins.arch.config import BlockConfig, gqa, homogeneous, swiglu
    from nemo_plugins.model.checkpoint import write_config

    plain = homogeneous(**TINY)
    write_config(plain, tmp_path / "plain")
    check_uniform(tmp_path / "plain")  # a plain Llama crosses
    child = plain.replace_blocks([plain.blocks[0], BlockConfig(gqa(1), swiglu(64)), plain.blocks[2]])
    write_config(child, tmp_path / "child")
    with pytest.raises(HeterogeneousModelError, match=r"layer 1: .*run the Aligner stages before compression.*homogeneous student"):
        check_uniform(tmp_path / "child")
    cmd = converter_command("/opt/NeMo", tmp_path / "plain", "/o/p.nemo")
    assert cmd[1:] == ["/opt/NeMo/scripts/checkpoint_converters/convert_llama_hf_to_nemo.py",
                       f"--input_name_or_path={tmp_path / 'plain'}", "--output_path=/o/p.nemo", "--precision=bf16"]  # fmt: skip


def test_to_nemo_rewrites_a_homogeneous_nemotron_nas_directory_as_plain_llama(tmp_path):
    from nemo_plugins.aligner.to_nemo import as_plain_llama
    from nemo_plugins.arch.config import homogeneous
    from nemo_plugins.model.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
    from nemo_plugins.model.llama import HeteroLlamaForCausalLM

    torch.manual_seed(0)
    model = HeteroLlamaForCausalLM(homogeneous(**{**TINY, "intermediate_size": 256}))  # a width nemotron-nas can hold
    save_checkpoint(model, tmp_path / "nas", architecture="nemotron-nas")
    (tmp_path / "nas" / "tokenizer.json").write_text("{}")
    assert json.loads((tmp_path / "nas" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    out = as_plain_llama(tmp_path / "nas", tmp_path / "scratch")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").is_file()
    before, after = load_state_dict(tmp_path / "nas"), load_state_dict(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert as_plain_llama(out, tmp_path / "unused") == out  # already plain Llama: used in place
    assert load_checkpoint(out).config == model.config


class _Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/models/reward_model/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_rm_host_waits_for_the_file_and_a_ready_server(tmp_path):
    from nemo_plugins.aligner.rm_host import server_ready, wait_for_server

    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host_file = tmp_path / "rm_host"
        with pytest.raises(TimeoutError, match="it was never written"):
            wait_for_server(host_file, port, timeout_s=0.3, poll_s=0.1)
        host_file.write_text("127.0.0.1\n")
        assert server_ready("127.0.0.1", port) and not server_ready("127.0.0.1", port, model="other")
        assert wait_for_server(host_file, port, timeout_s=5, poll_s=0.1) == "127.0.0.1"
        with pytest.raises(TimeoutError, match="names '127.0.0.1', not serving 'other'"):
            wait_for_server(host_file, port, model="other", timeout_s=0.3, poll_s=0.1)
    finally:
        server.shutdown()


@pytest.mark.parametrize(("override", "named"), [("workers=-1", "workers=-1"), ("timeout_s=0", "timeout_s=0"),
                                                 ("accuracy_weight=-1", "accuracy_weight=-1"), ("port=0", "port=0")])
def test_reward_server_settings_are_checked_under_their_own_key_names(override, named):
    """The reward server shares the RL loops' reward weights and sandbox limits (ScoringSettings),
    checks included, but under its own flat keys (workers=, not grpo.rewards.workers=)."""
    from nemo_plugins.aligner.reward_server import RewardServerConfig
    from nemo_plugins.config import load_config

    with pytest.raises(ValueError, match=named) as e:
        load_config(RewardServerConfig, overrides=[override])
    assert "grpo" not in str(e.value)
    cfg = load_config(RewardServerConfig, overrides=["workers=0", "format_weight=0.5", "max_chars=99"])
    assert (cfg.limits().workers, cfg.limits().max_chars) == (0, 99)
    assert cfg.reward_config_for("math").format_weight == 0.5
