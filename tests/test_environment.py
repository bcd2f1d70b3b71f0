"""report.json's environment and weight digests: what tells two runs apart."""

import shutil
from pathlib import Path

import pytest
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


def test_a_source_edit_changes_the_cache_keys_of_what_that_code_makes(tmp_path, monkeypatch):
    """The tiny world, the tiny parent and a block library are cached across runs: their keys
    carry a digest of the code that makes them, so edited code never reuses a stale entry."""
    from nemo_plugins.utils import hashing

    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "a.py").write_text("x = 1\n")
    (pkg / "model.py").write_text("y = 2\n")
    monkeypatch.setattr(hashing, "PACKAGE_DIR", pkg)
    hashing.source_digest.cache_clear()
    before = hashing.source_digest("data", "model.py")
    hashing.source_digest.cache_clear()
    (pkg / "data" / "a.py").write_text("x = 3\n")
    assert hashing.source_digest("data", "model.py") != before
    hashing.source_digest.cache_clear()
    with pytest.raises(FileNotFoundError, match="missing.py"):
        hashing.source_digest("missing.py")
    hashing.source_digest.cache_clear()


def test_the_cached_stages_name_sources_that_exist():
    from nemo_plugins.data.tiny_world import WORLD_SOURCE
    from nemo_plugins.model.tiny_parent import PARENT_SOURCE
    from nemo_plugins.puzzle.stage import LIBRARY_SOURCE
    from nemo_plugins.utils.hashing import source_digest

    digests = {source_digest(*parts) for parts in (WORLD_SOURCE, PARENT_SOURCE, LIBRARY_SOURCE)}
    assert len(digests) == 3 and all(len(d) == 12 for d in digests)


def test_generation_code_is_not_in_the_parent_or_library_keys_but_the_model_is(tmp_path, monkeypatch):
    """Editing the sampler must not retrain the tiny parent and every block library (it reads
    them, never makes them); editing the model's forward pass must."""

    import nemo_plugins
    from nemo_plugins.model.tiny_parent import PARENT_SOURCE
    from nemo_plugins.puzzle.stage import LIBRARY_SOURCE
    from nemo_plugins.utils import hashing

    pkg = tmp_path / "nemo_plugins"
    shutil.copytree(Path(nemo_plugins.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(hashing, "PACKAGE_DIR", pkg)

    def keys():
        hashing.source_digest.cache_clear()
        return hashing.source_digest(*PARENT_SOURCE), hashing.source_digest(*LIBRARY_SOURCE)

    before = keys()
    for name in ("generate.py", "rollout.py", "gguf_import.py"):
        with open(pkg / "model" / name, "a") as f:
            f.write("# edited\n")
    assert keys() == before
    with open(pkg / "model" / "llama.py", "a") as f:
        f.write("# edited\n")
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]
    hashing.source_digest.cache_clear()
