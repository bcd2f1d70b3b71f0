"""Shared fixtures. The trained tiny parent is built once (about 3-4 minutes on 2 CPU cores)
and cached under $NEMO_PLUGINS_CACHE (default ~/.cache/nemo_plugins), shared with the demo."""

import pytest
import torch


def _nemo_installed() -> bool:
    """The `nemo` extra's packages are installed (checked without importing NeMo, which takes ~20 s)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("nemo", "nemo_run", "megatron"))


def _aligner_installed() -> bool:
    """The `aligner` extra's packages (NeMo-Aligner, PyTriton) are installed, checked without importing them."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("nemo_aligner", "pytriton"))


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow tier: run with -m slow")
    skip_nemo = pytest.mark.skip(reason='needs the `nemo` extra: pip install -c constraints.txt -e ".[nemo]"')
    skip_aligner = pytest.mark.skip(reason="needs the `aligner` extra (NeMo-Aligner 0.7.0, PyTriton) in its own venv: "
                                    "see the README section 'NeMo-Aligner plugins'")
    has_nemo = has_aligner = None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "nemo" in item.keywords:
            has_nemo = _nemo_installed() if has_nemo is None else has_nemo
            if not has_nemo:
                item.add_marker(skip_nemo)
        if "aligner" in item.keywords:
            has_aligner = _aligner_installed() if has_aligner is None else has_aligner
            if not has_aligner:
                item.add_marker(skip_aligner)
        if "slow" in item.keywords and "slow" not in markexpr:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run tiny matmuls: one thread is fastest for them and immune to a busy machine
    (two threads on two shared cores can be 20x slower). Session fixtures such as the trained
    parent are built before this applies, with torch's default."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_world():
    from nemo_plugins.data.tiny_world import WorldConfig, build_world

    return build_world(WorldConfig())


@pytest.fixture(scope="session")
def parent_checkpoint(tiny_world):
    from nemo_plugins.model.tiny_parent import ParentConfig, train_parent

    return train_parent(tiny_world, ParentConfig(), progress=False)
