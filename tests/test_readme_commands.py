"""Every `nemo-plugins` command the README shows is checked, so the docs cannot drift from the
code: commands that run stages are resolved as a dry run through `nemo-plugins config` with the
same arguments (every key and value validated); the others must parse, and `inspect` runs on the
fixture. The two set-up commands are checked to be what .ci/run runs."""

import re
import shlex
from pathlib import Path

import pytest

from nemo_plugins.cli.main import STAGE_COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[list[str]]:
    """Argument lists of every `.venv/bin/nemo-plugins ...` line in the README's bash blocks
    (backslash continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "bin/nemo-plugins" not in line:
                continue
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0].endswith("bin/nemo-plugins"):
                    out.append(words[1:])
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    names = {argv[0] for argv in COMMANDS}
    assert {"pipeline", "config", "puzzle", "mip", "inspect", "import-gguf", "recovery"} <= names


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_readme_command(argv, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    args = build_parser().parse_args(argv)  # flags and subcommands exist
    if args.command in ("pipeline", "config", *STAGE_COMMANDS):
        rest = list(argv[1:])
        for i, word in enumerate(rest[:-1]):  # a placeholder YAML of the user's ("my.yaml"): an empty one
            if word == "--config" and not (ROOT / rest[i + 1]).is_file():
                rest[i + 1] = str(tmp_path / "empty.yaml")
                Path(rest[i + 1]).write_text("{}\n")
        assert main(["config", *rest]) == 0, capsys.readouterr().err  # keys and values validate
        assert "output_dir:" in capsys.readouterr().out
    elif args.command == "inspect" and Path(args.path).exists():
        assert main(argv) == 0


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"Run the tests.*?```bash\n(.*?)\n```", README, flags=re.S).group(1).strip()
    assert test_cmd in ci
