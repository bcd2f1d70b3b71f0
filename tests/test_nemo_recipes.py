"""NeMo-Run recipes, Puzzle tasks, executors, the toggle-chat data module and the pipeline
experiment (`nemo_plugins.nemo.recipes`, `.puzzle_tasks`, `.pipeline`, `.executors`, `.data`,
`recipes/nemo_*.py`).

Everything runs on the CPU and offline: recipes are built as configs, serialized to YAML and
back, and dry-run into sbatch scripts through a local tunnel in a temporary directory; nothing
is submitted. The Puzzle shard tasks run for real on the tiny parent with a tiny library (BLD
and scoring split over two ranks, then the search that must reuse their results). NeMo is
imported inside fixtures (~20 s), so collecting this file costs nothing without the extra.
"""

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.nemo

REPO = Path(__file__).resolve().parent.parent
ACCOUNT, PARTITION, IMAGE = "acct_llm", "batch_h100", "nvcr.io/nvidia/nemo:test"
MOUNTS = ["/lustre/ckpt:/checkpoints", "/lustre/data:/data"]


@pytest.fixture(scope="module")
def nr(tmp_path_factory):
    """NeMo-Run, the recipe modules and NeMo's llm collection, with NeMo-Run's home in a temp dir.
    `recipes` first: the nemo_run.cli entry point imports it alone, and it imports the others."""
    import fiddle as fdl
    import nemo_run as run
    from nemo.collections import llm
    from nemo_run.config import get_nemorun_home, set_nemorun_home
    from nemo_run.core.serialization.yaml import YamlSerializer
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from nemo_plugins.nemo import data, executors, recipes
    from nemo_plugins.nemo import pipeline, puzzle_tasks

    old_home = get_nemorun_home()
    set_nemorun_home(str(tmp_path_factory.mktemp("nemorun_home")))
    yield types.SimpleNamespace(run=run, fdl=fdl, llm=llm, recipes=recipes, puzzle_tasks=puzzle_tasks,
                                pipeline=pipeline, executors=executors, data=data, yaml=YamlSerializer(),
                                zlib=ZlibJSONSerializer())  # fmt: skip
    set_nemorun_home(old_home)


def slurm(nr, **kw):
    args = dict(account=ACCOUNT, partition=PARTITION, time="03:30:00", container_image=IMAGE, container_mounts=MOUNTS)
    return nr.executors.slurm_executor(**{**args, **kw})


def sbatch_lines(text: str) -> dict[str, str]:
    """{option: value} of the #SBATCH lines ('' for flags such as --exclusive)."""
    lines = [line[len("#SBATCH --"):] for line in text.splitlines() if line.startswith("#SBATCH --")]
    return {k: v for k, _, v in (line.partition("=") for line in lines)}


# ----------------------------------------------------------------------------- parallelism table


def test_parallelism_defaults_per_parent_size(nr):
    E = nr.executors
    assert (E.parallelism_for("8b").tp, E.parallelism_for("8b").pp, E.parallelism_for("8b").nodes) == (2, 1, 1)
    assert (E.parallelism_for("49B").tp, E.parallelism_for("49B").pp, E.parallelism_for("49B").nodes) == (8, 2, 2)
    assert (E.parallelism_for("70b").tp, E.parallelism_for("70b").pp, E.parallelism_for("70b").nodes) == (8, 4, 4)
    # sizes as numbers: billions or parameter counts, bucketed to the nearest table row above
    assert E.parallelism_for(70) == E.parallelism_for(7.06e10) == E.parallelism_for("70b")
    assert E.parallelism_for(45) == E.parallelism_for("49b")
    assert E.parallelism_for(2.3e6) == E.parallelism_for("8b")  # the tiny parent
    # every default tiles its nodes of 8 GPUs and keeps TP inside a node
    for p in E.PARALLELISM.values():
        assert (p.nodes * 8) % (p.tp * p.pp * p.cp) == 0 and p.tp <= 8
    # overrides win, the rest stays the table's
    p = E.parallelism_for("70b", tp=4, nodes=8)
    assert (p.tp, p.pp, p.nodes) == (4, 4, 8)
    assert E.parallelism_for("70b", tp=None).tp == 8


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(parent_size="405b"), ["405b", "tp=", "nodes="]),
        (dict(parent_size="huge"), ["huge", "'70b'"]),
        (dict(parent_size="70b", tp=3), ["3*4*1=12", "32 GPUs"]),
        (dict(parent_size="70b", tp=16, pp=1, nodes=4), ["tp=16", "inside one node"]),
        (dict(parent_size="8b", dp=2), ["'dp'", "expected one of"]),
        (dict(parent_size="8b", nodes=0), ["nodes=0", "positive integer"]),
    ],
)
def test_bad_parallelism_fails_naming_the_value(nr, kwargs, words):
    with pytest.raises(nr.executors.ExecutorConfigError) as e:
        nr.executors.parallelism_for(**kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


# ----------------------------------------------------------------------------- discovery


def test_factories_are_registered_by_name(nr):
    run, R, T, E, llm = nr.run, nr.recipes, nr.puzzle_tasks, nr.executors, nr.llm
    from nemo_run.config import get_type_namespace

    assert run.cli.resolve_factory(llm.distill, "puzzle_recovery") is R.recovery_recipe
    assert run.cli.resolve_factory(llm.pretrain, "puzzle_cpt") is R.cpt_recipe
    assert run.cli.resolve_factory(llm.finetune, "puzzle_toggle_sft") is R.toggle_sft_recipe
    assert R.toggle_sft_recipe in run.cli.list_factories(get_type_namespace(llm.finetune))
    for task, factory in ((T.puzzle_bld, T.puzzle_bld_h100), (T.puzzle_score, T.puzzle_score_h100),
                          (T.puzzle_search, T.puzzle_search_h100)):  # fmt: skip
        assert run.cli.resolve_factory(task, "h100_preset") is factory
    assert run.cli.resolve_factory(run.SlurmExecutor, "slurm_h100") is E.slurm_h100
    assert run.cli.resolve_factory(run.LocalExecutor, "local_gpus") is E.local_gpus
    # what `nemo llm distill --factory "puzzle_recovery(...)"` does with a factory string
    from nemo_run.cli.cli_parser import parse_factory

    built = parse_factory(llm.distill, "", object,
                          "puzzle_recovery(parent_size='8b', max_steps=5, data_paths=['/data/mix_text_document'])")
    assert built.trainer.max_steps == 5 and built.trainer.strategy.tensor_model_parallel_size == 2
    # the pipeline and the Puzzle tasks are NeMo-Run entrypoints (`nemo nemo_plugins <name>`)
    P = nr.pipeline
    for fn in (P.pipeline, T.puzzle_prepare, T.puzzle_bld, T.puzzle_score, T.puzzle_search, T.import_hf):
        assert fn.cli_entrypoint.namespace == "nemo_plugins"
    assert P.pipeline.cli_entrypoint.type == "experiment"


def test_entry_point_loads_the_recipes_when_installed(nr):
    eps = [ep for ep in importlib.metadata.entry_points().select(group="nemo_run.cli")
           if ep.value == "nemo_plugins.nemo.recipes"]  # fmt: skip
    if not eps:
        pytest.skip("nemo_run.cli entry point not installed (setup.py entry_points)")
    assert eps[0].load() is nr.recipes


def test_the_entry_point_module_alone_registers_every_task(nr):
    """NeMo-Run imports only `nemo_plugins.nemo.recipes`; the Puzzle tasks and the pipeline live in
    modules of their own, which it must import (their decorators register them)."""
    code = "import json, sys, nemo_plugins.nemo.recipes; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert {"nemo_plugins.nemo.puzzle_tasks", "nemo_plugins.nemo.pipeline"} <= loaded


# ----------------------------------------------------------------------------- recipes build and serialize

FACTORIES = ["recipes.recovery_recipe", "recipes.cpt_recipe", "recipes.toggle_sft_recipe",
             "puzzle_tasks.puzzle_bld_h100", "puzzle_tasks.puzzle_score_h100",
             "puzzle_tasks.puzzle_search_h100"]  # fmt: skip
TEXT = ["/data/mix_text_document"]  # Megatron-indexed text (a dataset prefix)
SFT = ["/data/sft.jsonl"]
DATA_ARGS = {"recovery_recipe": {"data_paths": TEXT}, "cpt_recipe": {"data_paths": TEXT},
             "toggle_sft_recipe": {"data_paths": SFT}}  # fmt: skip


@pytest.mark.parametrize("factory", FACTORIES)
def test_recipe_builds_and_round_trips_through_yaml(nr, factory):
    module, factory = factory.split(".")
    recipe = getattr(getattr(nr, module), factory)(**DATA_ARGS.get(factory, {}))
    assert isinstance(recipe, nr.run.Partial)
    text = nr.yaml.serialize(recipe)
    assert nr.yaml.deserialize(text) == recipe, text
    assert nr.yaml.serialize(nr.yaml.deserialize(text)) == text
    assert nr.zlib.deserialize(nr.zlib.serialize(recipe)) == recipe  # what the job reads on the cluster
    assert callable(nr.fdl.build(recipe)) if factory.startswith("puzzle_") else True


def test_training_recipes_target_nemo_and_carry_the_project_settings(nr, tmp_path):
    R, llm, fdl = nr.recipes, nr.llm, nr.fdl
    kd = R.recovery_recipe(data_paths=TEXT)
    assert kd.__fn_or_cls__ is llm.distill
    assert issubclass(kd.data.__fn_or_cls__, llm.PreTrainingDataModule) and kd.data.paths == TEXT
    st = kd.trainer.strategy
    assert (st.tensor_model_parallel_size, st.pipeline_model_parallel_size, st.sequence_parallel) == (8, 4, True)
    assert (kd.trainer.num_nodes, int(kd.trainer.devices), kd.trainer.max_steps) == (4, 8, 19000)
    assert st.ckpt_async_save is False
    opt = kd.optim
    assert (opt.config.lr, opt.lr_scheduler.min_lr) == (1e-4, 1e-5)
    assert (opt.config.weight_decay, opt.config.clip_grad) == (0.01, 1.0)
    assert (kd.data.seq_length, kd.data.global_batch_size) == (8192, 256)
    precision = fdl.build(kd.trainer.plugins)
    import torch

    assert precision.dtype_config.bf16 and precision.dtype_config.params_dtype == torch.bfloat16
    # the KD config NeMo reads: logits KL only by default, final hidden states cosine on request
    from nemo.collections.llm.modelopt.distill.utils import DistillationConfig

    for hidden_cosine, pairs in ((False, []), (True, [["decoder.final_layernorm", "decoder.final_layernorm"]])):
        cfg = R.recovery_recipe(hidden_cosine=hidden_cosine, data_paths=TEXT).distillation_config_path
        cfg.path = str(tmp_path / f"kd_{hidden_cosine}.yaml")
        import yaml

        loaded = DistillationConfig(**yaml.safe_load(Path(fdl.build(cfg)).read_text()))
        assert [list(p) for p in loaded.intermediate_layer_pairs] == pairs
        assert list(loaded.logit_layers) == ["output_layer", "output_layer"] and loaded.skip_lm_loss

    cpt = R.cpt_recipe(child="/ckpt/child", parent_size="49b", data_paths=TEXT)
    assert cpt.__fn_or_cls__ is llm.pretrain and cpt.model.path == "/ckpt/child"
    assert cpt.resume.restore_config.path.path == "/ckpt/child"
    cpt_st = cpt.trainer.strategy
    assert (cpt_st.tensor_model_parallel_size, cpt_st.pipeline_model_parallel_size) == (8, 2)

    sft = R.toggle_sft_recipe(data_paths=["/data/a.jsonl"], data_format="messages", parent_size="8b")
    assert sft.__fn_or_cls__ is llm.finetune and sft.peft is None and sft.tokenizer == "model"
    assert sft.data.__fn_or_cls__ is nr.data.ToggleChatDataModule
    assert (sft.data.sources, sft.data.source_format) == (["/data/a.jsonl"], "messages")
    assert sft.data.dataset_root == "/data/a_toggle_chat"
    assert sft.optim.config.lr == 5e-6 and sft.trainer.strategy.tensor_model_parallel_size == 2


def test_factory_arguments_are_checked(nr):
    R = nr.recipes
    with pytest.raises(R.RecipeError, match=r"global_batch_size=102.*data-parallel size \(4"):
        R.recovery_recipe(parent_size="8b", global_batch_size=102)
    with pytest.raises(ValueError, match=r"tp\*pp\*cp=3\*1\*1"):
        R.toggle_sft_recipe(parent_size="8b", tp=3)
    with pytest.raises(nr.data.ToggleDataError, match="source_format='csv'"):
        nr.fdl.build(R.toggle_sft_recipe(data_format="csv", data_paths=SFT).data)
    with pytest.raises(R.RecipeError, match="kd_loss_scale=0"):
        R.write_distillation_config(kd_loss_scale=0)
    with pytest.raises(R.RecipeError, match="pairs of"):
        R.write_distillation_config(intermediate_layer_pairs=[["decoder.final_layernorm"]])


# ----------------------------------------------------------------------------- overrides


def test_overrides_apply_to_a_copy(nr):
    R = nr.recipes
    base = R.recovery_recipe(data_paths=TEXT)
    out = R.apply_overrides(base, [
        "trainer.max_steps=10", "optim.config.lr=3e-4", "trainer.strategy.tensor_model_parallel_size=4",
        "data.global_batch_size=64",
    ])  # fmt: skip
    assert (out.trainer.max_steps, out.optim.config.lr) == (10, 3e-4)
    assert (out.trainer.strategy.tensor_model_parallel_size, out.data.global_batch_size) == (4, 64)
    assert base.trainer.max_steps == 19000  # the original is untouched
    # NeMo-Run's own parser gives the same result (what `nemo llm distill ... key=value` does)
    same = nr.run.cli.parse_cli_args(R.recovery_recipe(data_paths=TEXT), ["trainer.max_steps=10"])
    assert same.trainer.max_steps == 10
    R.check_recipe(out)


@pytest.mark.parametrize(
    "override, words",
    [
        ("trainer.max_stepz=10", ["unknown key 'trainer.max_stepz'", "did you mean max_steps"]),
        # MegatronStrategy takes **kwargs, so NeMo-Run alone would let this typo through to the cluster
        ("trainer.strategy.tensor_model_paralel_size=2", ["unknown key", "tensor_model_parallel_size"]),
        ("nosuch.x=1", ["unknown key 'nosuch.x'", "'nosuch'"]),
        ("trainer.max_steps=abc", ["'abc' is not a valid int", "'trainer.max_steps'"]),
        ("optim.config.lr=fast", ["'fast' is not a valid", "float", "'optim.config.lr'"]),
        ("max_steps", ["expected key=value"]),
    ],
)
def test_bad_overrides_fail_naming_key_value_and_type(nr, override, words):
    with pytest.raises(nr.recipes.RecipeError) as e:
        nr.recipes.apply_overrides(nr.recipes.recovery_recipe(data_paths=TEXT), [override])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_strategy_keys_that_nemo_run_lets_through_are_caught(nr):
    """MegatronStrategy takes **kwargs, so NeMo-Run's parser keeps a misspelt key; check_recipe
    names it. torch DDP's arguments, where those **kwargs go, are real keys."""
    R = nr.recipes
    typo = nr.run.cli.parse_cli_args(R.recovery_recipe(data_paths=TEXT),
                                     ["trainer.strategy.tensor_model_paralel_size=4"])  # fmt: skip
    assert typo.trainer.strategy.tensor_model_paralel_size == 4
    with pytest.raises(R.RecipeError, match=r"trainer.strategy.tensor_model_paralel_size=4: MegatronStrategy has "
                                            r"no parameter .*did you mean tensor_model_parallel_size"):  # fmt: skip
        R.check_recipe(typo)
    ddp = R.apply_overrides(R.recovery_recipe(data_paths=TEXT), ["trainer.strategy.gradient_as_bucket_view=False",
                                                                 "trainer.strategy.bucket_cap_mb=50"])  # fmt: skip
    R.check_recipe(ddp)
    assert ddp.trainer.strategy.bucket_cap_mb == 50


def test_inconsistent_overrides_are_caught_before_launch(nr):
    R = nr.recipes
    with pytest.raises(R.RecipeError, match=r"trainer: tp\*pp\*cp=8\*3\*1=24 does not divide the 32 GPUs.*"
                                            r"trainer.strategy.pipeline_model_parallel_size=3"):  # fmt: skip
        R.check_recipe(R.apply_overrides(R.recovery_recipe(data_paths=TEXT), ["trainer.strategy.pipeline_model_parallel_size=3"]))
    with pytest.raises(R.RecipeError, match="global_batch_size=102"):
        R.check_recipe(R.apply_overrides(R.recovery_recipe(parent_size="8b", data_paths=TEXT), ["data.global_batch_size=102"]))


# ----------------------------------------------------------------------------- executors and sbatch


def test_slurm_sbatch_has_the_requested_resources(nr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    R, E = nr.recipes, nr.executors
    for recipe, nodes in ((R.recovery_recipe(data_paths=TEXT), 4), (R.cpt_recipe(parent_size="49b", data_paths=TEXT), 2),
                          (R.toggle_sft_recipe(parent_size="8b", data_paths=SFT), 1)):  # fmt: skip
        text = E.sbatch_script(recipe, E.for_trainer(slurm(nr), recipe), name="train")
        sb = sbatch_lines(text)
        assert (sb["nodes"], sb["gpus-per-node"], sb["ntasks-per-node"]) == (str(nodes), "8", "8")
        assert (sb["time"], sb["account"], sb["partition"]) == ("03:30:00", ACCOUNT, PARTITION)
        assert f"--container-image {IMAGE}" in text
        assert "--container-mounts /lustre/ckpt:/checkpoints,/lustre/data:/data," in text
        assert "nemo_run.core.runners.fdl_runner -n train" in text
    # torchrun instead of srun tasks: one task per node, torchrun starts the 8 ranks
    text = E.sbatch_script(nr.puzzle_tasks.puzzle_bld_h100(), slurm(nr, nodes=2, launcher="torchrun"), name="bld")
    sb = sbatch_lines(text)
    assert (sb["nodes"], sb["ntasks-per-node"]) == ("2", "1") and "--nproc-per-node 8" in text and "--nnodes 2" in text
    assert os.listdir(tmp_path) == []


def test_executor_settings(nr):
    run, E = nr.run, nr.executors
    local = E.local_executor(gpus=2)
    assert (local.ntasks_per_node, local.launcher, local.nproc_per_node()) == (2, "torchrun", 2)
    ex = slurm(nr, nodes=3, env_vars={"HF_HOME": "/data/hf"})
    assert isinstance(ex.tunnel, run.LocalTunnel) and isinstance(ex.packager, run.Packager)
    assert (ex.nodes, ex.gpus_per_node, ex.ntasks_per_node, ex.exclusive) == (3, 8, 8, True)
    assert ex.env_vars["HF_HOME"] == "/data/hf" and ex.env_vars["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    ssh = slurm(nr, host="login.cluster", user="me", job_dir="/lustre/me/jobs")  # nothing is contacted
    assert isinstance(ssh.tunnel, run.SSHTunnel)
    assert (ssh.tunnel.host, ssh.tunnel.job_dir) == ("login.cluster", "/lustre/me/jobs")
    # the CLI factory is a config of slurm_executor: overrides are checked when it is built
    cfg = E.slurm_h100(account=ACCOUNT, partition=PARTITION, container_image=IMAGE)
    cfg.nodes = 2
    built = nr.fdl.build(cfg)
    assert isinstance(built, run.SlurmExecutor) and built.nodes == 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(account=""), ["account=''", "executor.account="]),
        (dict(partition=None), ["partition=None"]),
        (dict(container_image=""), ["container_image=''"]),
        (dict(time="4h"), ["time='4h'", "HH:MM:SS"]),
        (dict(nodes=0), ["nodes=0", "positive integer"]),
        (dict(container_mounts=["/lustre/data"]), ["container_mounts[0]='/lustre/data'", "SRC:DST"]),
        (dict(host="login"), ["host='login'", "job_dir"]),
        (dict(launcher="mpirun"), ["launcher='mpirun'"]),
    ],
)
def test_bad_executor_settings_fail_naming_the_field(nr, kwargs, words):
    with pytest.raises(nr.executors.ExecutorConfigError) as e:
        slurm(nr, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


# ----------------------------------------------------------------------------- pipeline experiment

EXPECTED_DAG = {
    "prepare": [], "bld": ["prepare"], "score": ["bld"], "search": ["score"], "import_parent": ["prepare"],
    "import_child": ["search"], "recovery": ["import_parent", "import_child"], "sft": ["recovery"],
}  # fmt: skip


@pytest.fixture
def stdin(monkeypatch):
    """NeMo-Run packages code through `invoke`, which reads stdin; pytest's stdin refuses reads."""
    monkeypatch.setattr(sys, "stdin", io.StringIO())


def test_pipeline_experiment_dry_runs_with_its_dependencies(nr, tmp_path, stdin):
    run, P = nr.run, nr.pipeline
    stages = P.pipeline_stages(slurm(nr), work_dir="/results/p", puzzle_nodes=2, sft_data=["/data/sft.jsonl"],
                               recovery_data=["/data/mix_text_document"])  # fmt: skip
    by = {s.name: s for s in stages}
    assert {s.name: list(s.after) for s in stages} == EXPECTED_DAG
    # BLD and scoring spread over 2 nodes x 8 GPUs, one process each; single-process tasks stay alone
    assert (by["bld"].executor.nodes, by["bld"].executor.ntasks_per_node) == (2, 8)
    assert by["search"].executor.ntasks_per_node == 1 and by["import_child"].executor.ntasks_per_node == 1
    assert by["recovery"].task.__fn_or_cls__ is nr.llm.distill
    assert by["recovery"].task.student_model_path.path == "/results/p/nemo/child"
    assert by["sft"].task.model.path == "/results/p/logs/recovery"  # newest checkpoint of recovery
    assert by["import_child"].task.hf_dir == "/results/p/outputs/puzzle/model"
    assert by["import_parent"].task.hf_dir == "/results/p/outputs/parent/model"
    assert "cache_dir=/results/p/cache" in by["bld"].task.overrides
    with run.Experiment("dag", executor=slurm(nr), base_dir=str(tmp_path), log_level="WARN") as exp:
        P.add_stages(exp, stages)
        assert {j.id: j.dependencies for j in exp.jobs} == EXPECTED_DAG
        exp.dryrun(log=False)
    # CPT instead of KD waits only for the child; no SFT without data
    names = {s.name: list(s.after) for s in P.pipeline_stages(slurm(nr), recovery="cpt", recovery_data=TEXT)}
    assert names["recovery"] == ["import_child"] and "sft" not in names
    with pytest.raises(nr.recipes.RecipeError, match="recovery='kdd'"):
        P.pipeline_stages(slurm(nr), recovery="kdd")
    with pytest.raises(ValueError, match="trainer.num_nodes=4: a local executor runs one node"):
        P.pipeline_stages(nr.executors.local_executor(), parent_size="70b", recovery_data=TEXT)


def run_cli(nr, fn, args, default_factory=None):
    """(status, stdout, stderr) of the NeMo-Run command line for `fn`, in this process."""
    old, out, err = sys.argv, io.StringIO(), io.StringIO()
    sys.argv = ["recipe.py", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = nr.pipeline.cli_main(fn, default_factory=default_factory)
    finally:
        sys.argv = old
    return status, out.getvalue(), err.getvalue()


RECOVERY_DATA = "recovery_data=['/data/mix_text_document']"
SLURM_ARGS = ["run.executor=slurm_h100", f"run.executor.account={ACCOUNT}", f"run.executor.partition={PARTITION}",
              f"run.executor.container_image={IMAGE}"]  # fmt: skip


def test_pipeline_cli_dry_run_and_bad_overrides(nr, tmp_path, monkeypatch, stdin):
    monkeypatch.chdir(tmp_path)
    P = nr.pipeline
    status, out, _ = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, "sft_data=['/data/sft.jsonl']",
                                              "puzzle_nodes=2", "work_dir=/results/cli", RECOVERY_DATA])  # fmt: skip
    assert status == 0, out
    for name in EXPECTED_DAG:
        assert f"Task {name}" in out
    assert "recovery       distill          1 node(s) x 8 process(es)  after: import_parent, import_child" in out
    assert "bld            puzzle_bld       2 node(s) x 8 process(es)  after: prepare" in out
    assert out.count("#SBATCH --account=acct_llm") == len(EXPECTED_DAG)
    for bad, words in (
        (["nosuch=1"], ["nosuch"]),
        (["puzzle_nodes=abc"], ["puzzle_nodes", "abc", "int"]),
        (["recovery=kdd"], ["recovery='kdd'", "expected 'kd', 'cpt' or 'none'"]),
        (["run.executor.time=4h"], ["time='4h'", "HH:MM:SS"]),
    ):
        status, out, err = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, RECOVERY_DATA, *bad])
        assert status == 1, (bad, out[-2000:], err[-2000:])
        assert all(w in out + err for w in words), (bad, (out + err)[-2000:])
    # a training recipe through its NeMo entrypoint, as `nemo llm distill --factory puzzle_recovery`
    factory = ["--factory", "puzzle_recovery(data_paths=['/data/mix_text_document'])"]
    status, out, _ = run_cli(nr, nr.llm.distill, [*factory, "--dryrun", "--yes", "trainer.max_steps=7"])
    assert status == 0 and "max_steps=7" in out and "mix_text_document" in out
    status, out, err = run_cli(nr, nr.llm.distill, [*factory, "--dryrun", "--yes", "trainer.max_stepz=7"])
    assert status == 1 and "No parameter named 'max_stepz'" in out + err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("factory", ["recovery_recipe", "cpt_recipe", "toggle_sft_recipe"])
def test_training_recipes_need_data_or_an_explicit_mock(nr, factory):
    """No silent mock data: without data_paths a training recipe fails naming it; mock=True
    (and only that) trains on NeMo's random tokens."""
    R, llm = nr.recipes, nr.llm
    make = getattr(R, factory)
    with pytest.raises(R.RecipeError) as e:
        make()
    assert "data_paths=None" in str(e.value) and "mock=True" in str(e.value), str(e.value)
    with pytest.raises(R.RecipeError, match="data_paths=\\[\\]"):
        make(data_paths=[])
    with pytest.raises(R.RecipeError, match="not both"):
        make(data_paths=DATA_ARGS[factory]["data_paths"], mock=True)
    with pytest.raises(R.RecipeError, match="expected a list"):
        make(data_paths="/data/one")
    mock = make(mock=True)
    assert mock.data.__fn_or_cls__ is llm.MockDataModule
    assert mock.data.tokenizer.__fn_or_cls__ is R.checkpoint_tokenizer  # never the downloaded default
    real = make(**DATA_ARGS[factory])
    assert real.data.__fn_or_cls__ is not llm.MockDataModule


def test_cli_needs_data_for_training(nr, tmp_path, monkeypatch, stdin):
    """`nemo llm pretrain --factory puzzle_cpt` with the data given as an override of the built
    recipe (which used to land on mock data) fails naming data_paths; the README's command runs."""
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(nr, nr.llm.pretrain, ["--factory", "puzzle_cpt", "--dryrun", "--yes",
                                                     "data.paths=['/data/mix_text_document']"])  # fmt: skip
    assert status == 1 and "data_paths=None" in out + err, (out + err)[-2000:]
    status, out, err = run_cli(nr, nr.llm.pretrain, ["--factory", "puzzle_cpt(data_paths=['/data/mix_text_document'])",
                                                     "--dryrun", "--yes"])  # fmt: skip
    assert status == 0 and "TextDataModule" in out and "mix_text_document" in out, (out + err)[-2000:]
    status, out, err = run_cli(nr, nr.llm.distill, [
        "--factory", "puzzle_recovery(parent_size='49b', data_paths=['/data/mix_text_document'])", "--dryrun", "--yes",
        "trainer.max_steps=1000"])  # fmt: skip
    assert status == 0 and "max_steps=1000" in out, (out + err)[-2000:]
    status, out, err = run_cli(nr, nr.llm.distill, ["--factory", "puzzle_recovery(mock=True)", "--dryrun", "--yes"])
    assert status == 0 and "MockDataModule" in out, (out + err)[-2000:]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- checks on the `nemo llm` path


def nemo_cmd(args: list[str]) -> tuple[int, str]:
    """(status, stdout and stderr) of the `nemo` command with `args`, in this process: NeMo-Run's
    console script is `create_cli()` (which loads the `nemo_run.cli` entry points and builds a
    command per entrypoint, reading sys.argv) called on the arguments."""
    from nemo_run.cli.api import create_cli

    old, out = sys.argv, io.StringIO()
    sys.argv = ["nemo", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = create_cli()(args, standalone_mode=False)
    finally:
        sys.argv = old
    return status or 0, out.getvalue()


NEMO_LLM = {  # `nemo llm <command> --factory ...` for each training recipe (70b default: 4 nodes x 8 GPUs, tp 8 x pp 4)
    "distill": "puzzle_recovery(data_paths=['/data/mix_text_document'])",
    "pretrain": "puzzle_cpt(data_paths=['/data/mix_text_document'])",
    "finetune": "puzzle_toggle_sft(data_paths=['/data/sft.jsonl'])",
}
# issue 17: each was accepted with exit 0; each must fail naming the key, its value and what was expected
BAD_NEMO_LLM_OVERRIDES = {
    "strategy typo": (["trainer.strategy.tensor_model_paralel_size=4"],
                      ["trainer.strategy.tensor_model_paralel_size=4", "did you mean tensor_model_parallel_size"]),
    "pp vs GPUs": (["trainer.strategy.pipeline_model_parallel_size=3"],
                   ["does not divide the 32 GPUs", "trainer.strategy.pipeline_model_parallel_size=3"]),
    "executor nodes": (["run.executor.nodes=2"], ["run.executor.nodes=2: expected 4", "trainer.num_nodes"]),
    "local executor": (["run.executor=local_gpus", "run.executor.gpus=2"],
                       ["run.executor.gpus=2: expected 8", "trainer.devices", "trainer.num_nodes=4"]),
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(NEMO_LLM))
@pytest.mark.parametrize("case", sorted(BAD_NEMO_LLM_OVERRIDES))
def test_nemo_llm_rejects_bad_overrides_naming_the_key(nr, tmp_path, monkeypatch, stdin, command, case):
    monkeypatch.chdir(tmp_path)
    bad, words = BAD_NEMO_LLM_OVERRIDES[case]
    executor = [] if any(a.startswith("run.executor=") for a in bad) else SLURM_ARGS
    status, out = nemo_cmd(["llm", command, "--factory", NEMO_LLM[command], *executor, *bad, "--dryrun", "--yes"])
    assert status == 1, out[-3000:]
    assert all(w in out for w in words), out[-3000:]
    assert os.listdir(tmp_path) == []


def test_nemo_llm_checks_before_launch_and_runs_good_overrides(nr, tmp_path, monkeypatch, stdin):
    """Without --dryrun: a bad override stops before NeMo-Run launches anything; good ones launch
    (run.run recorded instead), with an executor or directly."""
    monkeypatch.chdir(tmp_path)
    launched = []
    monkeypatch.setattr(nr.run, "run", lambda fn_or_script, **kw: launched.append((fn_or_script, kw)))
    sft = NEMO_LLM["finetune"]
    status, out = nemo_cmd(["llm", "finetune", "--factory", sft, *SLURM_ARGS, "run.executor.nodes=2", "--yes"])
    assert status == 1 and "run.executor.nodes=2" in out and launched == [], out[-3000:]
    good = ["trainer.strategy.tensor_model_parallel_size=4", "trainer.strategy.gradient_as_bucket_view=False"]
    status, out = nemo_cmd(["llm", "finetune", "--factory", sft, *SLURM_ARGS, "run.executor.nodes=4", *good, "--yes"])
    assert status == 0 and len(launched) == 1, out[-3000:]
    task, kw = launched[0]
    assert task.trainer.strategy.tensor_model_parallel_size == 4 and kw["executor"].nodes == 4
    small = "puzzle_toggle_sft(parent_size='8b', data_paths=['/data/sft.jsonl'])"  # one node: tp 2
    for args in (["run.executor=local_gpus"], ["trainer.max_steps=5"]):  # torchrun here, or in this process
        status, out = nemo_cmd(["llm", "finetune", "--factory", small, *args, "--yes"])
        assert status == 0, out[-3000:]
    assert [kw["executor"] is None for _, kw in launched[1:]] == [False, True]
    for fn in (nr.llm.distill, nr.llm.pretrain, nr.llm.finetune):
        assert fn.cli_entrypoint.run_ctx_cls is nr.recipes.RecipeRunContext


def test_nemo_console_script_rejects_a_bad_override(nr, tmp_path):
    """The `nemo` console script itself, in a fresh process: NeMo-Run finds this project through
    its entry point and fails the override with exit 1."""
    if not [ep for ep in importlib.metadata.entry_points().select(group="nemo_run.cli") if ep.name == "nemo_plugins"]:
        pytest.skip("nemo_run.cli entry point not installed (setup.py entry_points)")
    script = "import sys; sys.argv[0] = 'nemo'; from nemo_run.__main__ import app; app()"
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]  # this checkout first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "NEMORUN_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script, "llm", "finetune", "--factory", NEMO_LLM["finetune"],
                           "trainer.strategy.pipeline_model_parallel_size=3", "--dryrun", "--yes"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "trainer.strategy.pipeline_model_parallel_size=3" in proc.stderr, proc.stderr[-3000:]


def test_pipeline_needs_recovery_data(nr):
    P = nr.pipeline
    with pytest.raises(nr.recipes.RecipeError, match=r"recovery_data=None: recovery='kd'.*recovery=none"):
        P.pipeline_stages(slurm(nr))
    names = [s.name for s in P.pipeline_stages(slurm(nr), recovery="none")]
    assert "recovery" not in names and names[-1] == "import_child"


def test_pipeline_takes_the_layout_for_sizes_beyond_the_table(nr, tmp_path, monkeypatch, stdin):
    """parent_size=405b has no default layout: the error asks for tp=, pp=, nodes=, which the
    pipeline (function and command line) now accepts and hands to the training stages."""
    P, E = nr.pipeline, nr.executors
    p = E.parallelism_for("405b", tp=8, pp=8, nodes=8)
    assert (p.tp, p.pp, p.cp, p.nodes) == (8, 8, 1, 8)
    with pytest.raises(E.ExecutorConfigError, match="missing: pp=, nodes="):
        E.parallelism_for("405b", tp=8)
    with pytest.raises(E.ExecutorConfigError, match="give tp=, pp= and nodes= explicitly"):
        P.pipeline_stages(slurm(nr), parent_size="405b", recovery_data=TEXT)
    stages = P.pipeline_stages(slurm(nr), parent_size="405b", tp=8, pp=8, nodes=8, recovery_data=TEXT, sft_data=SFT)
    by = {s.name: s for s in stages}
    for name in ("recovery", "sft"):
        tr = by[name].task.trainer
        assert (tr.num_nodes, tr.strategy.tensor_model_parallel_size, tr.strategy.pipeline_model_parallel_size) == (8, 8, 8)
        assert by[name].executor.nodes == 8
    # the table's sizes take overrides too
    by = {s.name: s for s in P.pipeline_stages(slurm(nr), parent_size="70b", nodes=8, recovery_data=TEXT)}
    assert by["recovery"].task.trainer.num_nodes == 8 and by["recovery"].task.trainer.strategy.pipeline_model_parallel_size == 4
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, RECOVERY_DATA, "parent_size=405b",
                                                "tp=8", "pp=8", "nodes=8"])  # fmt: skip
    assert status == 0, (out + err)[-2000:]
    assert "recovery       distill          8 node(s) x 8 process(es)" in out
    status, out, err = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, RECOVERY_DATA, "parent_size=405b"])
    assert status == 1 and "give tp=, pp= and nodes= explicitly" in out + err


def test_pipeline_script_dry_runs_in_a_fresh_process(nr, tmp_path):
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "nemo_pipeline.py"), "--dryrun", "--yes", *SLURM_ARGS,
         "recovery=cpt", RECOVERY_DATA, "run.executor.time=01:00:00"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Task recovery" in proc.stdout and "#SBATCH --time=01:00:00" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["home"]


# ----------------------------------------------------------------------------- toggle chat data

RECORDS = [
    {"messages": [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "What is 2+3?"},
                  {"role": "assistant", "content": "5"}], "reasoning": "2 plus 3 is 5."},
    {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}], "thinking": False},
    {"messages": [{"role": "user", "content": "no mode"}, {"role": "assistant", "content": "x"}]},  # skipped
    {"messages": [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "<think>no</think>x"}]},  # think tag under off: skipped
] + [
    rec
    for a in range(3, 13)
    for rec in (
        {"messages": [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": f"What is {a}+1?"},
                      {"role": "assistant", "content": f"<think>{a} plus 1 is {a + 1}.</think>{a + 1}"}]},
        {"messages": [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": f"What is {a}+1?"},
                      {"role": "assistant", "content": f"{a + 1}"}]},
    )
]  # fmt: skip

NEMOTRON = [
    {"input": [{"role": "user", "content": f"Compute {a}*2."}], "output": f"<think>double {a}</think>{2 * a}",
     "reasoning": "on", "system_prompt": "detailed thinking on", "category": "math", "license": "cc-by-4.0"}
    for a in range(8)
] + [
    {"input": [{"role": "user", "content": f"Compute {a}*2."}], "output": f"{2 * a}", "reasoning": "off",
     "system_prompt": "detailed thinking off", "category": "math"}
    for a in range(8)
]  # fmt: skip


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_toggle_record(rec: dict) -> None:
    roles = [m["role"] for m in rec["messages"]]
    assert roles[0] == "system" and roles[-1] == "assistant" and "user" in roles
    system, answer = rec["messages"][0]["content"], rec["messages"][-1]["content"]
    if rec["reasoning"] == "on":
        assert system == "detailed thinking on"
        assert answer.startswith("<think>") and answer.count("</think>") == 1 and answer.split("</think>")[1]
    else:
        assert system == "detailed thinking off" and "<think>" not in answer and "</think>" not in answer


@pytest.mark.parametrize("fmt, records, kept", [("messages", RECORDS, 22), ("nemotron", NEMOTRON, 16)])
def test_toggle_files_hold_system_toggle_and_think_blocks(nr, tmp_path, fmt, records, kept):
    D = nr.data
    src = write_jsonl(tmp_path / "in.jsonl", records)
    rep = D.write_toggle_chat_files(src, tmp_path / "out", source_format=fmt, val_fraction=0.3)
    assert (rep["read"], rep["kept"], rep["skipped"]) == (len(records), kept, len(records) - kept)
    files = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in D.SPLITS}
    assert len(files["training"]) + len(files["validation"]) == kept and files["training"] and files["validation"]
    assert files["test"] == files["validation"]  # test_fraction=0: the test file repeats validation
    prompts = {}
    for split in ("training", "validation"):
        for rec in files[split]:
            check_toggle_record(rec)
            prompts.setdefault(json.dumps(rec["messages"][1:-1]), set()).add(split)
        assert {s: rep["splits"][split][s] for s in ("on", "off")} == {
            s: sum(r["reasoning"] == s for r in files[split]) for s in ("on", "off")
        }
    assert all(len(s) == 1 for s in prompts.values())  # both modes of a prompt share its split
    if fmt == "nemotron":
        assert all(r["category"] == "math" for r in files["training"])
    stamp = json.loads((tmp_path / "out" / D.STAMP).read_text())
    assert stamp["report"]["kept"] == kept


def test_toggle_files_are_reused_and_rewritten_when_inputs_change(nr, tmp_path):
    D = nr.data
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    D.prepare_toggle_chat_files([src], tmp_path / "out", val_fraction=0.3)
    train = tmp_path / "out" / "training.jsonl"
    before = train.stat().st_mtime_ns
    D.prepare_toggle_chat_files([src], tmp_path / "out", val_fraction=0.3)
    assert train.stat().st_mtime_ns == before  # same inputs: nothing rewritten
    rep = D.prepare_toggle_chat_files([src], tmp_path / "out", val_fraction=0.3, paired_only=True)
    assert rep["unpaired_dropped"] == 0 and rep["kept"] == 22  # every kept prompt has both modes
    write_jsonl(src, RECORDS[:1] + RECORDS[4:])
    rep = D.prepare_toggle_chat_files([src], tmp_path / "out", val_fraction=0.3, paired_only=True)
    assert rep["unpaired_dropped"] == 1  # "What is 2+3?" lost its off version


def test_toggle_data_errors_name_the_setting(nr, tmp_path):
    D = nr.data
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS[:2])
    with pytest.raises(D.ToggleDataError, match="split is empty"):
        D.write_toggle_chat_files(src, tmp_path / "out", val_fraction=0.01)
    assert not (tmp_path / "out" / "training.jsonl").exists()  # nothing half-written
    with pytest.raises(D.ToggleDataError, match="source_format='sharegpt'"):
        D.write_toggle_chat_files(src, tmp_path / "out", source_format="sharegpt")
    with pytest.raises(D.ToggleDataError, match="val_fraction=1.5"):
        D.write_toggle_chat_files(src, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(D.ToggleDataError, match="missing.jsonl is not a file"):
        D.write_toggle_chat_files(tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(ValueError, match="in.jsonl:3"):
        D.write_toggle_chat_files(write_jsonl(tmp_path / "in.jsonl", RECORDS), tmp_path / "out", on_error="raise")
    with pytest.raises(D.ToggleDataError, match="no {% generation %} block"):
        D.resolve_chat_template("{{ messages }}{% for m in messages %}{{ m.content }}{% endfor %}")


def test_toggle_data_module_trains_on_the_final_assistant_turn_only(nr, tmp_path):
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from transformers import PreTrainedTokenizerFast

    from nemo_plugins.data.tokenizer import train_tokenizer

    texts = [m["content"] for r in RECORDS for m in r["messages"]] * 5
    hf = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(texts, vocab_size=300), bos_token="<|bos|>",
                                 eos_token="<|eos|>", pad_token="<|pad|>")  # fmt: skip
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = AutoTokenizer(str(tmp_path / "tok"))
    multi_turn = {"messages": [{"role": "system", "content": "detailed thinking off"},
                               {"role": "user", "content": "What is 3+1?"}, {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "And 4+1?"}, {"role": "assistant", "content": "5"}]}  # fmt: skip
    src = write_jsonl(tmp_path / "in.jsonl", [*RECORDS, multi_turn])
    dm = nr.data.ToggleChatDataModule(sources=[str(src)], dataset_root=str(tmp_path / "chat"), source_format="messages",
                                      val_fraction=0.3, tokenizer=tok, seq_length=256, global_batch_size=2,
                                      micro_batch_size=1, num_workers=0)  # fmt: skip
    dm.prepare_data()
    records = read_jsonl(dm.train_path)
    ds = dm._create_dataset(str(dm.train_path))
    assert len(ds) == len(records)
    for i, rec in enumerate(records):
        item = ds[i]
        ids, mask = item["input_ids"].tolist(), item["loss_mask"].tolist()
        trained = hf.decode([t for t, m in zip(ids, mask) if m])
        context = hf.decode([t for t, m in zip(ids, mask) if not m])
        answer = rec["messages"][-1]["content"]
        assert trained.startswith(answer) and trained[len(answer):].replace("<|eos|>", "") == "<|eot_id|>", trained
        assert rec["messages"][0]["content"] in context and rec["messages"][1]["content"] in context
        if len(rec["messages"]) > 3:  # an earlier assistant turn is context, not a target
            assert "<|end_header_id|>\n\n4<|eot_id|>" in context
    nr.data.install_chat_template(tok, "tokenizer")  # the installed template marks the trained turn
    tok.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(nr.data.ToggleDataError, match="chat_template='tokenizer'"):
        nr.data.install_chat_template(tok, "tokenizer")


# ----------------------------------------------------------------------------- runtime helpers


def fake_checkpoint(path: Path, mtime: float) -> Path:
    for sub in ("context", "weights"):
        (path / sub).mkdir(parents=True)
    os.utime(path, (mtime, mtime))
    return path


def test_resolve_checkpoint_finds_the_newest_below_a_log_dir(nr, tmp_path):
    R = nr.recipes
    ckpts = tmp_path / "logs" / "recovery" / "2026-01-01" / "checkpoints"
    a = fake_checkpoint(ckpts / "model--val_loss=1.00-step=99-consumed_samples=100", 1000)
    b = fake_checkpoint(ckpts / "model--val_loss=0.90-step=199-consumed_samples=200", 3000)
    last = fake_checkpoint(ckpts / "model--val_loss=0.90-step=199-consumed_samples=200-last", 2000)
    assert R.resolve_checkpoint(str(a)) == str(a)
    assert R.resolve_checkpoint(str(tmp_path / "logs")) == str(last)  # *-last wins over a newer one
    shutil.rmtree(last)
    assert R.resolve_checkpoint(str(tmp_path / "logs")) == str(b)
    with pytest.raises(FileNotFoundError, match="no NeMo checkpoint"):
        R.resolve_checkpoint(str(tmp_path / "logs" / "recovery" / "2026-01-01" / "checkpoints" / b.name / "weights"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        R.resolve_checkpoint(str(tmp_path / "nope"))


def test_model_and_import_helpers_call_nemo_with_resolved_paths(nr, tmp_path, monkeypatch):
    R = nr.recipes
    from nemo.lightning import io as nemo_io

    ckpt = fake_checkpoint(tmp_path / "logs" / "x-last", 1000)
    (ckpt / "context" / "io.json").write_text("{}")
    seen = []

    def fake_load_context(path, subpath=None, build=True):
        seen.append((str(path), subpath, build))
        return types.SimpleNamespace(config=types.SimpleNamespace(seq_length=4096))

    monkeypatch.setattr(nemo_io, "load_context", fake_load_context)
    model = R.load_model(str(tmp_path / "logs"), seq_length=16384)
    # never built by NeMo (a nested fdl.build inside the job runner's build of the recipe)
    assert model.config.seq_length == 16384 and seen[-1] == (str(ckpt / "context"), "model", False)
    R.checkpoint_tokenizer(str(ckpt))
    assert seen[-1] == (str(ckpt / "context"), "model.tokenizer", False)
    (ckpt / "context" / "io.json").unlink()
    with pytest.raises(FileNotFoundError, match="no context/io.json"):
        R.load_model(str(ckpt))

    from nemo_plugins.arch.config import homogeneous
    from nemo_plugins.model.checkpoint import save_checkpoint
    from nemo_plugins.model.llama import HeteroLlamaForCausalLM

    arch = homogeneous(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                       intermediate_size=64, rope_theta=10000.0, max_position_embeddings=32)  # fmt: skip
    hf_dir = save_checkpoint(HeteroLlamaForCausalLM(arch), tmp_path / "hf")
    calls = {}

    def fake_import(model, source, output_path=None, overwrite=False):
        calls.update(model=model, source=source, output=output_path, overwrite=overwrite)
        return output_path

    monkeypatch.setattr(nr.llm, "import_ckpt", fake_import)
    out = nr.puzzle_tasks.import_hf(str(hf_dir), str(tmp_path / "nemo" / "child"))
    assert out == str(tmp_path / "nemo" / "child") and calls["source"] == f"hf://{Path(hf_dir).resolve()}"
    from nemo_plugins.nemo.model import PuzzleChildModel, arch_of

    assert isinstance(calls["model"], PuzzleChildModel) and arch_of(calls["model"]).num_layers == 2


# ----------------------------------------------------------------------------- Puzzle shard tasks


def test_launcher_rank_and_gpu_assignment(nr, monkeypatch):
    T = nr.puzzle_tasks
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert T.launcher_rank() == (0, 1, 0)
    assert T.launcher_rank(3, 4) == (3, 4, 0)
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert T.launcher_rank() == (13, 16, 5)
    monkeypatch.setenv("RANK", "6")  # torchrun's variables win over Slurm's
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert T.launcher_rank() == (6, 8, 6)
    with pytest.raises(ValueError, match="rank=9, world_size=8"):
        T.launcher_rank(9, 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    T._own_gpu(6)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert not any(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"))


TINY_PUZZLE = [
    "progress=false", "puzzle.bld.steps=2", "puzzle.bld.batch_size=4", "puzzle.init.calibration_batches=1",
    "puzzle.library.kv_heads=[2]", "puzzle.library.ffn_fractions=[0.33]", "puzzle.library.ffn_linear=false",
    "puzzle.score_batches=1", "puzzle.score_batch_size=8", "puzzle.costs.measure=false", "puzzle.pareto_points=2",
    "puzzle.budget.kv_cache_fraction=null", "puzzle.budget.max_attention_layers=null",
]  # fmt: skip


def test_puzzle_shards_feed_the_search(nr, tmp_path, monkeypatch, parent_checkpoint):
    """BLD and scoring over two ranks write where the Puzzle stage looks: the search then trains
    nothing and reads the merged scores."""
    T = nr.puzzle_tasks
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards (_own_gpu edits it)
    world_dir = Path(parent_checkpoint).parent  # the cached world and parent, copied (no retraining)
    cache = tmp_path / "cache" / "tiny_world" / world_dir.name
    cache.mkdir(parents=True)
    for f in ("world.json", "tokenizer.json"):
        shutil.copy(world_dir / f, cache / f)
    shutil.copytree(parent_checkpoint, cache / Path(parent_checkpoint).name)
    overrides = [f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}", *TINY_PUZZLE]

    with pytest.raises(FileNotFoundError, match="puzzle_bld with the same settings"):
        T.puzzle_score(overrides=overrides, rank=0, world_size=2)
    shards = [T.puzzle_bld(overrides=overrides, rank=r, world_size=2) for r in range(2)]
    lib = Path(shards[0]["library_dir"])
    assert shards[1]["library_dir"] == str(lib)
    a, b = (set(s["variants"]) for s in shards)
    assert a and b and not a & b
    files = {f"{p.parent.name}/{p.stem}" for p in (lib / "variants").rglob("*.safetensors")}
    assert files == a | b
    parts = [T.puzzle_score(overrides=overrides, rank=r, world_size=2) for r in range(2)]
    assert sum(p["scored"] for p in parts) == len(a | b)

    summary = T.puzzle_search(overrides=overrides)
    report = json.loads((tmp_path / "out" / "puzzle" / "report.json").read_text())
    assert report["bld_trained"] == 0  # every variant came from the shards
    merged = [p for p in lib.glob("scores-*.json") if ".part-" not in p.name]
    assert len(merged) == 1  # the stage read the merged file instead of writing its own
    union = {}
    for p in parts:
        union.update(json.loads(Path(p["part"]).read_text()))
    assert json.loads(merged[0].read_text()) == union
    assert summary["puzzle"]["model"] == str(tmp_path / "out" / "puzzle" / "model")
    assert (tmp_path / "out" / "puzzle" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "parent" / "model" / "config.json").is_file()  # for import_parent


def test_puzzle_task_config_errors(nr):
    from nemo_plugins.config import ConfigError

    T = nr.puzzle_tasks
    with pytest.raises(ConfigError, match="preset='h200'"):
        T._project_config("h200", None, [])
    with pytest.raises(ConfigError, match="puzzle.bld.rank=1.*drop these overrides"):
        T._project_config("tiny", None, ["puzzle.bld.rank=1", "puzzle.bld.world_size=2"])
    with pytest.raises(ConfigError, match="puzzle.bld.stepz"):
        T._project_config("tiny", None, ["puzzle.bld.stepz=1"])
    cfg = T._project_config("h100", None, [], stages=("world", "parent"))
    assert cfg.stages == ["world", "parent"] and cfg.puzzle.costs.dtype == "fp8"  # h100.yaml merged


# ----------------------------------------------------------------------------- the model config through YAML


def test_model_config_goes_through_nemo_run_yaml_and_back(nr, tmp_path, monkeypatch, stdin):
    """`nemo llm import model=puzzle_child(...) --to-yaml`, then `--yaml`: the same model config
    comes back (it names its architecture file; the JSON-string field `arch_json` it replaced, and
    any field PuzzleChildConfig declares under postponed annotations, failed with
    UnknownTypeError), an override of a field it declares parses, and the import then runs."""
    import fiddle as fdl
    import torch
    from nemo_run.cli.lazy import LazyEntrypoint

    from nemo_plugins.arch.config import FFN_LINEAR, BlockConfig, ModelConfig, gqa, parallel, swiglu
    from nemo_plugins.model.checkpoint import NATIVE_CONFIG, load_state_dict, read_config, save_checkpoint
    from nemo_plugins.model.llama import HeteroLlamaForCausalLM
    from nemo_plugins.nemo.model import PuzzleChildConfig, arch_of

    monkeypatch.chdir(tmp_path)
    arch = ModelConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, rope_theta=10000.0,
                       max_position_embeddings=64, blocks=(BlockConfig(gqa(1), parallel(swiglu(64), FFN_LINEAR)),
                                                          BlockConfig(gqa(4), swiglu(96))))  # fmt: skip
    child = save_checkpoint(HeteroLlamaForCausalLM(arch), tmp_path / "child")  # fused: the project schema
    # the README's commands, with this test's paths (and an override of a field PuzzleChildConfig declares);
    # output_path goes on the second: NeMo-Run 0.11 parses it as a Path, which its YAML writer refuses
    args = ["llm", "import", f"model=puzzle_child(config='{child}')", f"source=hf://{child}",
            "model.config.seq_length=32"]  # fmt: skip
    status, out = nemo_cmd([*args, "--to-yaml", str(tmp_path / "import.yaml")])
    assert status == 0, out[-3000:]
    text = (tmp_path / "import.yaml").read_text()
    assert f"arch_path: {child / NATIVE_CONFIG}" in text and "arch_json" not in text, text

    direct = LazyEntrypoint(nr.llm.import_ckpt, overwrites=args[2:]).resolve()  # what the command line builds
    back = LazyEntrypoint(nr.llm.import_ckpt, yaml=str(tmp_path / "import.yaml")).resolve()  # what --yaml builds
    assert back.model == direct.model and back.source == direct.source
    config = fdl.build(back.model.config)
    assert type(config) is PuzzleChildConfig and arch_of(config) == arch and config.seq_length == 32

    status, out = nemo_cmd(["llm", "import", "--yaml", str(tmp_path / "import.yaml"), f"output_path={tmp_path / 'nemo'}",
                            "--yes"])  # fmt: skip
    assert status == 0, out[-3000:]
    exported = nr.llm.export_ckpt(tmp_path / "nemo", "hf", output_path=tmp_path / "back")
    assert read_config(exported) == arch
    src, out_state = load_state_dict(child), load_state_dict(exported)
    assert sorted(src) == sorted(out_state) and all(torch.equal(src[k], out_state[k]) for k in src)
    with pytest.raises(nr.recipes.RecipeError, match=r"puzzle_child: config='/nonexistent': expected a model directory"):
        nr.recipes.puzzle_child(config="/nonexistent")


# ----------------------------------------------------------------------------- container images per stage

ALIGNER = "nvcr.io/nvidia/nemo-aligner:test"
DEFAULT_IMAGE = "nvcr.io/nvidia/nemo:default"


def test_pipeline_mixes_container_images_per_stage(nr, tmp_path, monkeypatch, stdin):
    """container_image= sets every job's image and images={stage: image} one stage's: the dry run
    lists each job's image, and each job's sbatch script runs its own."""
    monkeypatch.chdir(tmp_path)
    P = nr.pipeline
    images = f"images={{'recovery': '{ALIGNER}', 'sft': '{ALIGNER}'}}"
    status, out, err = run_cli(nr, P.pipeline, ["--dryrun", "--yes", *SLURM_ARGS, RECOVERY_DATA, "sft_data=['/data/sft.jsonl']",
                                                f"container_image={DEFAULT_IMAGE}", images])  # fmt: skip
    assert status == 0, (out + err)[-3000:]
    lines = {line.split()[0]: line for line in out.splitlines() if "process(es)  after:" in line}
    assert sorted(lines) == sorted(set(P.NEMO_STAGE_NAMES) - {"export_hf"})  # no Aligner stages asked for
    for name, line in lines.items():
        assert line.endswith(f"image: {ALIGNER if name in ('recovery', 'sft') else DEFAULT_IMAGE}"), line
    # each job's sbatch script (NeMo-Run prints them in the dry run after "Task <name>", wrapped)
    import re

    parts = re.split(r"Task (\w+) +experiment\.py", out)[1:]
    scripts = {name: " ".join(text.split()) for name, text in zip(parts[::2], parts[1::2])}
    assert sorted(scripts) == sorted(set(P.NEMO_STAGE_NAMES) - {"export_hf"})
    for name, script in scripts.items():
        expected = ALIGNER if name in ("recovery", "sft") else DEFAULT_IMAGE
        assert script.count("--container-image") == 1 and f"--container-image {expected}" in script, name
        assert IMAGE not in script, name
    # without container_image= the executor's image stays the default
    stages = P.pipeline_stages(slurm(nr), recovery_data=TEXT, images={"recovery": ALIGNER})
    assert {s.name: s.executor.container_image for s in stages} == {
        **{s.name: IMAGE for s in stages}, "recovery": ALIGNER}
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(images={"recovry": ALIGNER}), ["images.recovry=", "'recovry' is not a stage", "recovery, sft"]),
        (dict(images={"sft": ""}), ["images.sft=''", "expected a container image"]),
        (dict(images=["recovery"]), ["images=['recovery']", "expected a mapping"]),
        (dict(container_image="nvcr.io/x y"), ["container_image='nvcr.io/x y'", "expected a container image"]),
    ],
)
def test_bad_images_fail_naming_the_stage(nr, kwargs, words):
    with pytest.raises((nr.recipes.RecipeError, nr.executors.ExecutorConfigError)) as e:
        nr.pipeline.pipeline_stages(slurm(nr), recovery_data=TEXT, sft_data=SFT, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_images_need_a_container_executor(nr, tmp_path, monkeypatch, stdin):
    local = nr.executors.local_executor(8)
    with pytest.raises(nr.executors.ExecutorConfigError, match=r"images\.recovery='.*': a container image needs a container executor"):
        nr.pipeline.pipeline_stages(local, recovery_data=TEXT, images={"recovery": ALIGNER})
    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(nr, nr.pipeline.pipeline, ["--dryrun", "--yes", RECOVERY_DATA, "images={'bldd': 'x'}"])
    assert status == 1 and "'bldd' is not a stage of the pipeline" in out + err, (out + err)[-2000:]
