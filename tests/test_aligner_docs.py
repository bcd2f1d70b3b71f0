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


def _readme_command(prefix: str) -> list[str]:
    line = next(line for line in README.splitlines() if line.startswith(prefix))
    return shlex.split(line)


def test_readme_online_rpo_command_prints_two_iterations(capsys):
    """The README's online RPO command (dry_run=true): sampling then training per iteration, the
    second iteration starting from (and referenced to) the first one's trained policy."""
    from nemo_plugins.aligner.online_rpo import main

    argv = _readme_command("python -m nemo_plugins.aligner.online_rpo ")[3:]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    first = "/results/rpo/iter0/train/checkpoints/megatron_gpt.nemo"
    assert len(lines) == 4
    assert lines[0].startswith("$ torchrun --nproc-per-node=8 -m nemo_plugins.aligner.rpo_sample policy=/checkpoints/policy.nemo ")
    assert "rm_host=RM_HOST" in lines[0] and "out=/results/rpo/iter0/samples.jsonl" in lines[0]
    assert "/opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_dpo.py" in lines[1] and "--config-name=rpo" in lines[1]
    assert "pretrained_checkpoint.restore_from_path=/checkpoints/policy.nemo" in lines[1]
    assert f"policy={first}" in lines[2] and f"pretrained_checkpoint.restore_from_path={first}" in lines[3]


def test_readme_rloo_command_composes_with_aligners_hydra():
    """The README's RLOO command: its --config-path/--config-name and every override compose with
    Hydra (struct mode, as Aligner's hydra_runner): a key the stock config lacks would fail here."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    args = _readme_command("python /opt/NeMo-Aligner/examples/nlp/gpt/train_gpt_reinforce_actor.py ")[2:]
    assert args[:2] == ["--config-path=/opt/nemo_plugins/conf/aligner", "--config-name=rloo"]
    overrides = args[2:]
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "aligner"), version_base=None):
        cfg = compose(config_name="rloo", overrides=overrides)
        with pytest.raises(Exception, match="no_such_key"):
            compose(config_name="rloo", overrides=["trainer.reinforce.no_such_key=1"])
    assert cfg.pretrained_checkpoint.restore_from_path == "/checkpoints/policy.nemo"
    assert OmegaConf.to_container(cfg.model.data.data_prefix) == {
        "train": ["/data/if_train.jsonl"], "validation": ["/data/if_val.jsonl"], "test": ["/data/if_val.jsonl"]}
    assert cfg.remote_rm.reward_model.ip == "RM_HOST" and cfg.trainer.reinforce.max_steps == 100


def test_aligner_dockerfile_puts_the_project_where_the_stages_look():
    """docker/aligner.Dockerfile installs the project editable at the directory the NeMo-Run stages
    name (their --config-path), with the `aligner` extra's math-verify pin."""
    docker = (ROOT / "docker" / "aligner.Dockerfile").read_text()
    stages = ast.parse((ROOT / "nemo_plugins" / "nemo" / "aligner_stages.py").read_text())
    consts = {n.targets[0].id: n.value.value for n in stages.body if isinstance(n, ast.Assign)
              and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Constant)}  # fmt: skip
    project = consts["PROJECT_DIR"]
    assert f"COPY conf {project}/conf" in docker and f"COPY nemo_plugins {project}/nemo_plugins" in docker
    assert f"pip install --no-cache-dir --no-deps -e {project}" in docker
    pin = next(p for p in _extras()["aligner"] if p.startswith("math-verify"))
    assert f'"{pin}"' in docker
    assert consts["ALIGNER_DIR"] == "/opt/NeMo-Aligner"  # where Aligner's Dockerfile clones it


@pytest.mark.aligner
def test_aligner_venv_script_skips_a_built_venv(tmp_path):
    """scripts/aligner_venv.sh on a venv it built (marker + working imports) does nothing; the
    check runs the venv's own python (here this Aligner venv's)."""
    import os
    import subprocess
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this venv's python, as a venv's
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".nemo_plugins_aligner_built").touch()
    # PYTHON=false: were the check to fail, the rebuild stops at once instead of installing 3 GB
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": "false"}
    proc = subprocess.run([str(ROOT / "scripts" / "aligner_venv.sh"), str(venv)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(p.name for p in venv.iterdir()) == [".nemo_plugins_aligner_built", "bin"]
