"""report.json's environment and weight digests: what tells two runs apart."""

import shutil

import torch
from safetensors.torch import save_file

from nemo_plugins.utils.environment import environment, weights_digest


def test_environment_names_torch_threads_and_cpu():
    env = environment()
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["cpu"] and env["cpu_count"] >= 1 and env["python"].count(".") == 2
    assert env["git_commit"] is None or len(env["git_commit"].split("+")[0]) == 40
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_environment_records_kernel_selecting_variables(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = environment()
    assert env["kernel_env"]["ATEN_CPU_CAPABILITY"] == "default" and "OMP_NUM_THREADS" not in env["kernel_env"]


def test_weights_digest_is_equal_for_copies_and_changes_with_one_weight(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(a / "model.safetensors"))
    (a / "config.json").write_text("{}")
    b = shutil.copytree(a, tmp_path / "b")
    assert weights_digest(a) == weights_digest(b)
    (b / "config.json").write_text('{"x": 1}')  # not weights
    assert weights_digest(a) == weights_digest(b)
    t = torch.arange(6.0).reshape(2, 3)
    t[1, 2] += 1e-3
    save_file({"w": t}, str(b / "model.safetensors"))
    assert weights_digest(a) != weights_digest(b)
