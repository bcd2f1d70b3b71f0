"""What the package says about itself is backed by code: the methods its descriptions name have
their modules, every extra installs something the code or docs use, and each conf default that
departs from the paper says so beside it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "nemo_plugins"

# a method a description may name -> the module that implements it
METHODS = {
    "Puzzle": "puzzle/stage.py", "FFN Fusion": "fusion/fuse.py", "GRPO": "rl/grpo.py", "RLOO": "rl/rloo.py",
    "RPO": "rl/rpo.py", "NeMo-Aligner": "aligner/__init__.py", "reasoning toggle": "sft/stage.py",
}  # fmt: skip


def _setup_strings() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return " ".join(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_named_methods_have_their_modules():
    text = _setup_strings() + (PKG / "__init__.py").read_text()
    for method, module in METHODS.items():
        if re.search(rf"\b{re.escape(method)}\b", text):
            assert (PKG / module).is_file(), f"setup.py or nemo_plugins/__init__.py names {method}, but {module} is missing"


# the module each extra's requirement is imported as (a requirement not listed here fails the test)
MODULES = {"nemo-toolkit": "nemo", "transformer-engine": "transformer_engine", "gguf": "gguf",
           "champ-dataset": "champ_dataset", "pytest": "pytest", "nemo-aligner": "nemo_aligner"}  # fmt: skip


def test_every_extra_is_used():
    """An extra nobody uses is a claim (e.g. `aligner` before any Aligner code existed): some
    requirement of each extra is imported by the package, its tests or benchmarks."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(n.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "EXTRAS")
    files = [f for d in ("nemo_plugins", "tests", "benchmarks") for f in (ROOT / d).rglob("*.py") if f.name != "test_claims.py"]
    code = " ".join(f.read_text() for f in files)
    package = " ".join(f.read_text() for f in (ROOT / "nemo_plugins").rglob("*.py"))
    for key, reqs in zip(extras.keys, extras.values):
        names = [re.split(r"[\[=<>~ ]", r.value)[0] for r in reqs.elts]
        modules = [MODULES[n] for n in names if n in MODULES]
        assert modules, f"extra {key.value!r}: none of {names} is in MODULES"
        imported = any(re.search(rf"(import|from) [\w.]*\b{m}\b", code) for m in modules)
        loaded = any(re.search(rf"[\"']{m}[\"']", package) for m in modules)  # importlib by name, in the package
        assert imported or loaded, f"extra {key.value!r}: nothing imports {modules}"


PAPER_DEPARTURES = {  # conf file -> keys whose default differs from the paper's setting
    "grpo/tiny.yaml": ["kl_beta"], "fusion/tiny.yaml": ["threshold"], "recovery/tiny.yaml": ["cosine_weight"],
    "puzzle/tiny.yaml": ["max_attention_layers"], "rloo/tiny.yaml": ["kl_beta"],
}  # fmt: skip


def test_defaults_that_depart_from_the_paper_say_so():
    """Each such key's comment (its line and the comment lines under it) names the paper's setting
    and gives the measured reason (a number)."""
    for conf, keys in PAPER_DEPARTURES.items():
        lines = (ROOT / "conf" / conf).read_text().splitlines()
        for key in keys:
            i = next(i for i, line in enumerate(lines) if re.match(rf"\s*{key}:", line))
            block = [lines[i]] + [line for line in lines[i + 1 :][:8] if line.strip().startswith("#")]
            comment = " ".join(line.split("#", 1)[1] for line in block if "#" in line)
            assert "Paper" in comment or "paper" in comment, (conf, key)
            assert re.search(r"\d\.\d", comment), (conf, key, "no measured figure")
