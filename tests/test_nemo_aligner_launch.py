"""The NeMo-Aligner stages on NeMo-Run (`nemo_plugins.nemo.aligner_stages`, `pipeline.aligner_rl`,
the pipeline's `aligner=` stages, recipes/nemo_aligner.py), dry-run on the CPU: every RL stage is
one heterogeneous Slurm job whose sbatch script starts the reward server and the trainer in the
Aligner image with the requested resources; the boundary names its conversion. Nothing is submitted.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_nemo_recipes import ACCOUNT, IMAGE, RECOVERY_DATA, SLURM_ARGS, run_cli, slurm

pytestmark = pytest.mark.nemo

REPO = Path(__file__).resolve().parent.parent
ALIGNER_IMAGE = "registry.example/nemo_plugins-aligner:0.7.0"
RL_ARGS = [f"aligner_image={ALIGNER_IMAGE}", "rl_prompts=['/results/data/aligner_prompts.jsonl']",
           "reward_prompts=['/results/data/rl_prompts.jsonl']", "rpo_prompts=/results/data/chat_prompts.jsonl"]  # fmt: skip


@pytest.fixture(scope="module")
def nr(tmp_path_factory):
    """The NeMo-Run modules (as test_nemo_recipes' fixture of that name), NeMo-Run's home in a temp dir."""
    import types

    from nemo_run.config import get_nemorun_home, set_nemorun_home

    from nemo_plugins.nemo import executors, pipeline, recipes  # recipes first, as the entry point loads them

    old_home = get_nemorun_home()
    set_nemorun_home(str(tmp_path_factory.mktemp("nemorun_home")))
    yield types.SimpleNamespace(pipeline=pipeline, executors=executors, recipes=recipes)
    set_nemorun_home(old_home)


@pytest.fixture
def stdin(monkeypatch):
    """NeMo-Run packages code through `invoke`, which reads stdin; pytest's stdin refuses reads."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO())


def _scripts(out: str) -> dict[str, str]:
    """{job name: its sbatch script, whitespace-joined} from NeMo-Run's dry-run print."""
    parts = re.split(r"Task(?: Group)? (\w+) +experiment\.py", out)[1:]
    return {name: " ".join(text.split()) for name, text in zip(parts[::2], parts[1::2])}


def test_aligner_rl_dry_run_renders_a_reward_server_beside_each_trainer(nr, tmp_path, monkeypatch, stdin):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(nr, nr.pipeline.aligner_rl, ["--dryrun", "--yes", *SLURM_ARGS, *RL_ARGS, "nodes=2",
                                                            "start=/results/p/logs/sft", "work_dir=/results/rl",
                                                            "aligner_overrides={'rloo': ['trainer.reinforce.max_steps=50']}"])  # fmt: skip
    assert status == 0, (out + err)[-3000:]
    scripts = _scripts(out)
    assert sorted(scripts) == ["export_hf", "grpo", "rloo", "rpo", "to_aligner"]
    # the boundary: NeMo 2.7's export in the project image, Aligner's converter in the Aligner image
    assert f"--container-image {IMAGE}" in scripts["export_hf"] and ALIGNER_IMAGE not in scripts["export_hf"]
    assert f"--container-image {ALIGNER_IMAGE}" in scripts["to_aligner"]
    # the shell tasks' commands (the sbatch scripts run them from files) are listed with their jobs
    assert "    $ python -m nemo_plugins.aligner.to_nemo hf_dir=/results/rl/hf/policy out=/results/rl/aligner/policy.nemo" in out
    assert "    $ exec python -m nemo_plugins.aligner.reward_server 'prompts=[/results/data/rl_prompts.jsonl]' " in out
    assert "    $ RM_HOST=$(python -m nemo_plugins.aligner.rm_host host_file=/results/rl/aligner/rloo/rm_host port=5555)" in out
    for stage in ("grpo", "rloo", "rpo"):
        s = scripts[stage]
        # one heterogeneous job: the server's group, then the trainer's, both in the Aligner image
        assert s.count("#SBATCH hetjob") == 1 and s.count(f"#SBATCH --account={ACCOUNT}") == 2, stage
        assert s.count(f"--container-image {ALIGNER_IMAGE}") == 2 and IMAGE not in s, stage
        assert "srun --het-group=0" in s and "srun --het-group=1" in s, stage
        groups = s.split("#SBATCH hetjob")
        assert "#SBATCH --nodes=1 #SBATCH --ntasks-per-node=1" in groups[0], stage  # the reward server
        assert "#SBATCH --gpus-per-node=1 " in groups[0], stage  # see server_and_trainer_executors
        trainer_nodes, trainer_tasks = (1, 1) if stage == "rpo" else (2, 8)  # RPO: one driver task on one node
        assert f"#SBATCH --nodes={trainer_nodes} #SBATCH --ntasks-per-node={trainer_tasks}" in groups[1], stage
        assert "#SBATCH --gpus-per-node=8" in groups[1], stage
    lines = nr.pipeline.describe_stages(nr.pipeline.aligner_stage_list(
        slurm(nr, nodes=2), ["grpo", "rloo", "rpo"], ALIGNER_IMAGE, "/results/rl", "/results/p/logs/sft", (), nodes=2,
        rl_prompts=["/r/a.jsonl"], rpo_prompts="/r/c.jsonl", reward_prompts=["/r/p.jsonl"]))  # fmt: skip
    assert "rloo           reward_server    1 node(s) x 1 process(es)  after: grpo" in lines
    assert "  +rloo        train_gpt_reinforce_actor.py 2 node(s) x 8 process(es)  after: grpo" in lines
    assert "  +rpo         online_rpo       1 node(s) x 1 process(es)  after: rloo" in lines


def test_aligner_stage_commands_chain_policies_and_pass_hydra_overrides(nr):
    P, A = nr.pipeline, nr.pipeline.A
    stages = P.aligner_stage_list(slurm(nr), ["grpo", "rloo", "rpo"], ALIGNER_IMAGE, "/w", "/w/logs/sft", ("sft",),
                                  rl_prompts=["/d/a.jsonl"], rpo_prompts="/d/c.jsonl", reward_prompts=["/d/p.jsonl"],
                                  reward_model="/m/rm.nemo", overrides={"rloo": ["trainer.reinforce.max_steps=50"]})  # fmt: skip
    by = {s.name: s for s in stages}
    assert [(s.name, s.after) for s in stages] == [("export_hf", ("sft",)), ("to_aligner", ("export_hf",)),
                                                   ("grpo", ("to_aligner",)), ("rloo", ("grpo",)), ("rpo", ("rloo",))]  # fmt: skip
    assert by["export_hf"].task.nemo_path == "/w/logs/sft" and by["export_hf"].task.output == "/w/hf/policy"
    server, grpo = (t.inline for t in by["grpo"].task)
    assert server.startswith("hostname > /w/aligner/grpo/rm_host\nexec python -m nemo_plugins.aligner.reward_server ")
    assert "'prompts=[/d/p.jsonl]' tokenizer=/w/hf/policy port=5555" in server
    assert grpo.startswith("RM_HOST=$(python -m nemo_plugins.aligner.rm_host host_file=/w/aligner/grpo/rm_host port=5555)\n")
    assert "python -m nemo_plugins.aligner.train_grpo pretrained_checkpoint.restore_from_path=/w/aligner/policy.nemo" in grpo
    assert "'model.data.data_prefix={train: [/d/a.jsonl], validation: [/d/a.jsonl], test: [/d/a.jsonl]}'" in grpo
    assert grpo.rstrip().endswith('"remote_rm.reward_model.ip=$RM_HOST"')
    rloo = by["rloo"].task[1].inline
    assert (f"python {A.ALIGNER_DIR}/examples/nlp/gpt/train_gpt_reinforce_actor.py --config-path={A.PROJECT_DIR}/conf/aligner "
            "--config-name=rloo pretrained_checkpoint.restore_from_path=/w/aligner/grpo/checkpoints/megatron_gpt.nemo") in rloo
    assert "trainer.reinforce.max_steps=50" in rloo and "trainer.reinforce.max_steps=50" not in grpo
    rpo_server, rpo = (t.inline for t in by["rpo"].task)
    assert "serve_reward_model.py rm_model_file=/m/rm.nemo" in rpo_server  # a trained reward model for RPO
    assert "policy=/w/aligner/rloo/checkpoints/megatron_gpt.nemo prompts=/d/c.jsonl work_dir=/w/aligner/rpo" in rpo
    assert by["rpo"].executor[0].gpus_per_node == 8  # the reward model's server has GPUs
    for kwargs, words in (
        ({"names": ["ppo"]}, ["aligner=['ppo']", "grpo, rloo, rpo"]),
        ({"image": None}, ["aligner_image is not set"]),
        ({"rl_prompts": None}, ["rl_prompts is not set"]),
        ({"overrides": {"sft": ["x=1"]}}, ["aligner_overrides.sft"]),
    ):
        args = dict(executor=slurm(nr), names=["grpo"], image=ALIGNER_IMAGE, work_dir="/w", start="/s", after=(),
                    rl_prompts=["/d/a.jsonl"], reward_prompts=["/d/p.jsonl"])  # fmt: skip
        with pytest.raises(ValueError) as e:
            P.aligner_stage_list(**{**args, **kwargs})
        assert all(w in str(e.value) for w in words), str(e.value)
    with pytest.raises(ValueError, match="need run.executor=slurm_h100"):
        P.aligner_stage_list(nr.executors.local_executor(), ["grpo"], ALIGNER_IMAGE, "/w", "/s", (),
                             rl_prompts=["/a"], reward_prompts=["/p"])  # fmt: skip


def test_pipeline_gains_the_aligner_stages(nr, tmp_path, monkeypatch, stdin):
    """The whole pipeline with aligner=[...]: the RL stages after SFT (or after prepare on the parent
    with aligner_from=parent), every sbatch script printed."""
    monkeypatch.chdir(tmp_path)
    P = nr.pipeline
    status, out, err = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, RECOVERY_DATA, "sft_data=['/data/sft.jsonl']",
                                                "aligner=['grpo','rloo','rpo']", *RL_ARGS, "work_dir=/results/p"])  # fmt: skip
    assert status == 0, (out + err)[-3000:]
    scripts = _scripts(out)
    assert set(scripts) == set(P.STAGE_NAMES)
    assert out.count("#SBATCH --account=acct_llm") == len(P.STAGE_NAMES) + 3  # each RL stage: two groups
    stages = {s.name: s for s in P.pipeline_stages(slurm(nr), recovery_data=["/d/t"], sft_data=["/d/s.jsonl"],
                                                   aligner=["rloo"], aligner_image=ALIGNER_IMAGE, rl_prompts=["/a"],
                                                   reward_prompts=["/p"], work_dir="/w")}  # fmt: skip
    assert stages["export_hf"].after == ("sft",) and stages["export_hf"].task.nemo_path == "/w/logs/sft"
    parent = {s.name: s for s in P.pipeline_stages(slurm(nr), recovery_data=["/d/t"], aligner=["rloo"], aligner_from="parent",
                                                   aligner_image=ALIGNER_IMAGE, rl_prompts=["/a"], reward_prompts=["/p"],
                                                   work_dir="/w")}  # fmt: skip
    assert "export_hf" not in parent and parent["to_aligner"].after == ("prepare",)
    assert "hf_dir=/w/outputs/parent/model " in parent["to_aligner"].task.inline
    with pytest.raises(ValueError, match="aligner_from='child'"):
        P.pipeline_stages(slurm(nr), recovery="none", aligner=["rloo"], aligner_from="child", aligner_image=ALIGNER_IMAGE,
                          rl_prompts=["/a"], reward_prompts=["/p"])  # fmt: skip
    with pytest.raises(ValueError, match="'rloo' runs in aligner_image"):
        P.pipeline_stages(slurm(nr), recovery="none", images={"rloo": ALIGNER_IMAGE})
    assert os.listdir(tmp_path) == []


def test_aligner_script_dry_runs_in_a_fresh_process(nr, tmp_path):
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "nemo_aligner.py"), "--dryrun", "--yes", *SLURM_ARGS, *RL_ARGS,
         "start=/results/p/logs/sft", "stages=['rloo']"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_scripts(proc.stdout)) == ["export_hf", "rloo", "to_aligner"]
    assert "--config-name=rloo" in " ".join(proc.stdout.split())


def test_readme_aligner_recipe_command_dry_runs(nr, tmp_path):
    """The README's recipes/nemo_aligner.py command, placeholders filled, in a fresh process."""
    import shlex

    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python recipes/nemo_aligner.py "))
    args = [a.replace("ACCOUNT", ACCOUNT).replace("ALIGNER_IMAGE", ALIGNER_IMAGE).replace("=IMAGE", f"={IMAGE}")
            for a in shlex.split(line)[2:]]  # fmt: skip
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / "nemo_aligner.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = _scripts(proc.stdout)
    assert sorted(scripts) == ["export_hf", "grpo", "rloo", "rpo", "to_aligner"]
    assert all(scripts[s].count(f"--container-image {ALIGNER_IMAGE}") == 2 for s in ("grpo", "rloo", "rpo"))


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_trainer_overrides_compose_with_the_stage_config(nr, stage):
    """Every Hydra override a GRPO/RLOO job passes exists in its config (Hydra's struct mode, as the
    Aligner scripts' hydra_runner), and lands where Aligner reads it."""
    import shlex

    from hydra import compose, initialize_config_dir

    A = nr.pipeline.A
    cmd = A.reinforce_command(stage, "/w/policy.nemo", ["/d/a.jsonl"], "/w/aligner/" + stage, 2, 8, 5555,
                              overrides=["trainer.reinforce.max_steps=7"]).replace("$RM_HOST", "node017")  # fmt: skip
    words = shlex.split(cmd.splitlines()[1])
    overrides = [w for w in words if "=" in w and not w.startswith("--")]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "aligner"), version_base=None):
        cfg = compose(config_name=stage, overrides=overrides)
    assert cfg.pretrained_checkpoint.restore_from_path == "/w/policy.nemo"
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.reinforce.max_steps) == (2, 8, 7)
    assert (cfg.remote_rm.reward_model.ip, cfg.remote_rm.reward_model.port) == ("node017", 5555)
    assert cfg.exp_manager.explicit_log_dir == f"/w/aligner/{stage}" and cfg.exp_manager.name == A.NEMO_NAME
    assert cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end is True
    assert list(cfg.model.data.data_prefix.train) == ["/d/a.jsonl"]
