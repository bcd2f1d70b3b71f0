"""The package's layers, read from its imports (module level and inside functions alike):

    errors, utils  <  arch, config  <  data  <  model  <  evaluate
        <  puzzle, fusion, distill, sft, rl (stages: none imports another)  <  pipeline  <  cli, nemo, aligner

A module imports only from its own package or a lower layer; no modules import each other in a
cycle; and outside the adapters (`nemo`, `aligner`, `cli`) nothing imports NeMo, Megatron or NeMo-Aligner.
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nemo_plugins"
LAYERS = [("errors",), ("utils",), ("arch", "config"), ("data",), ("model",), ("evaluate",),
          ("puzzle", "fusion", "distill", "sft", "rl"), ("pipeline",), ("cli", "nemo", "aligner")]  # fmt: skip
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
FRAMEWORKS = ("nemo", "megatron", "nemo_aligner", "nemo_run", "pytriton")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute dotted names; `from x import y` gives x.y when y is a module)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names if (ROOT.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                    or (ROOT.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()}  # fmt: skip
    return out


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: {t for t in imports(p) if t in MODULES} for m, p in MODULES.items()}


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    assert {package(m) for m in MODULES} - {""} == set(LEVEL)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = package(module)
    for target in GRAPH[module]:
        theirs = package(target)
        if not mine or not theirs or theirs == mine:
            continue
        assert LEVEL[theirs] < LEVEL[mine], f"{module} imports {target}: {theirs} is not below {mine}"


def test_no_import_cycles():
    """Depth-first search for a back edge; names the cycle it finds."""
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str):
        state[m], _ = 1, stack.append(m)
        for t in sorted(GRAPH[m]):
            if t.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state[t] == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state[t] == 0:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if state[m] == 0:
            visit(m)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if package(m) not in ("nemo", "aligner", "cli")))
def test_the_core_imports_no_framework(module):
    for target in imports(MODULES[module]):
        assert target.split(".")[0] not in FRAMEWORKS, f"{module} imports {target}"
