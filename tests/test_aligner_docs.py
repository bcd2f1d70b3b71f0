"""The aligner venv's README commands against the code (these run in the main venv too): the install
line lists exactly the `aligner` extra, the prompt-file command writes Aligner's rows, and a missing
framework is reported with the extra to install."""

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _extras() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "EXTRAS")
    return ast.literal_eval(node.value)


def test_readme_aligner_install_lists_the_extra():
    line = re.search(r"^aligner-venv/bin/pip install -q -c constraints-aligner.txt (.*)$", README, flags=re.M).group(1)
    assert shlex.split(line) == _extras()["aligner"]


def test_prompt_file_command_writes_one_row_per_problem_and_mode(tmp_path):
    from nemo_plugins.aligner.prompt_set import main
    from nemo_plugins.data.chat_tokenizer import ChatTokenizer
    from nemo_plugins.data.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(["What is 1 + 2? The answer is 3."] * 20, 300), tmp_path / "tok")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "answer": i + 2, "task": "world",
                                                          "id": i}) + "\n" for i in range(3)))  # fmt: skip
    cmd = re.search(r"python -m nemo_plugins\.aligner\.prompt_set (.*)$", README, flags=re.M).group(1)
    argv = [a.replace("aligner_train.jsonl", str(tmp_path / "out.jsonl")).replace("[train.jsonl]", f"[{tmp_path / 'p.jsonl'}]")
            .replace("MODEL_DIR", str(tmp_path / "tok")) for a in shlex.split(cmd)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok = ChatTokenizer.from_dir(tmp_path / "tok")
    assert [r["text"] for r in rows] == [tok.prompt(f"What is {i} + 2?", t) for i in range(3) for t in (True, False)]


def test_missing_framework_names_the_extra():
    from nemo_plugins.aligner.deps import require

    with pytest.raises(ImportError, match=r"the reward server needs 'no_such_aligner_module'.*`aligner` extra"):
        require("no_such_aligner_module", "the reward server")
