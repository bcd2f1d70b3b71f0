"""The training recipes built the way NeMo-Run's job runner builds them.

`python -m nemo_run.core.runners.fdl_runner -n <name> <serialized>` (what every sbatch script of
a training recipe runs) deserializes the recipe with `ZlibJSONSerializer`, casts it to
`run.Partial` and calls `fdl.build` on it; only then does it call the task. Everything a recipe
reads from a checkpoint (the model class and config, the tokenizer) is read during that build,
where a nested `fdl.build` (e.g. NeMo's `io.load_context`) is forbidden.

Here each training recipe is built that way on a real NeMo checkpoint: the cached tiny parent
(tests/conftest.py) imported with `import_hf` (no patch needed for that on a CPU), inside the
test-only `nemo_cpu_shim`'s gloo world. The recipes are sized to one device (TP1/PP1) and the
trainer is pointed at the CPU with an override, since building a Lightning trainer for GPUs fails
without one; nothing else changes.
"""

import json
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.nemo

CPU_TRAINER = ["trainer.accelerator=cpu"]  # the recipes are sized to one device below


@pytest.fixture(scope="module")
def nt(tmp_path_factory, parent_checkpoint):
    """NeMo-Run, the recipes, and the tiny parent as a NeMo checkpoint plus training data."""
    import fiddle as fdl
    import nemo_cpu_shim
    import nemo_run as run
    from nemo_run.config import get_nemorun_home, set_nemorun_home
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from nemo_plugins.nemo import puzzle_tasks, recipes

    root = tmp_path_factory.mktemp("training_build")
    old_home = get_nemorun_home()
    set_nemorun_home(str(root / "nemorun_home"))
    with nemo_cpu_shim.megatron_cpu():
        nemo_ckpt = puzzle_tasks.import_hf(str(parent_checkpoint), str(root / "nemo" / "parent"))
    yield types.SimpleNamespace(
        run=run, fdl=fdl, recipes=recipes, zlib=ZlibJSONSerializer(), ckpt=nemo_ckpt,
        text=write_text_dataset(root / "text" / "tiny_text_document", parent_checkpoint),
        sft=write_sft_jsonl(root / "sft" / "train.jsonl"), root=root, hf=Path(parent_checkpoint),
    )  # fmt: skip
    set_nemorun_home(old_home)


def write_text_dataset(prefix: Path, hf_dir) -> str:
    """A Megatron indexed dataset (prefix.bin / prefix.idx) of the tiny world's tokens."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(hf_dir) / "tokenizer.json"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for i in range(64):
        ids = tok.encode(f"the answer to {i} plus {i + 1} is {2 * i + 1}. " * 8).ids
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def write_sft_jsonl(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for a in range(12):
        user = {"role": "user", "content": f"What is {a}+1?"}
        records.append({"messages": [{"role": "system", "content": "detailed thinking on"}, user,
                                     {"role": "assistant", "content": f"<think>{a} plus 1</think>{a + 1}"}]})
        records.append({"messages": [{"role": "system", "content": "detailed thinking off"}, user,
                                     {"role": "assistant", "content": f"{a + 1}"}]})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def training_recipes(nt) -> dict:
    R, ckpt = nt.recipes, nt.ckpt
    small = dict(parent_size="8b", tp=1, pp=1, num_nodes=1, num_gpus_per_node=1, seq_length=32, global_batch_size=2, micro_batch_size=1, max_steps=1)
    return {
        "puzzle_recovery": R.recovery_recipe(student=ckpt, teacher=ckpt, data_paths=[nt.text], **small),
        "puzzle_cpt": R.cpt_recipe(child=ckpt, data_paths=[nt.text], **small),
        "puzzle_toggle_sft": R.toggle_sft_recipe(
            start=ckpt, data_paths=[nt.sft], data_format="messages", dataset_root=str(nt.root / "sft_chat"),
            val_fraction=0.3, **small,
        ),
    }  # fmt: skip


def build_as_fdl_runner(nt, recipe):
    """What `fdl_runner.fdl_direct_run` does with the serialized task, short of calling it."""
    serialized = nt.zlib.serialize(recipe)  # what the executor hands to the job
    buildable = nt.zlib.deserialize(serialized)
    buildable = nt.fdl.cast(nt.run.Partial, buildable)
    return nt.fdl.build(buildable)


@pytest.mark.parametrize("name", ["puzzle_recovery", "puzzle_cpt", "puzzle_toggle_sft"])
def test_training_recipe_builds_as_the_job_runner_builds_it(nt, name):
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    from nemo_plugins.nemo.model import PuzzleChildModel, arch_of

    recipe = nt.recipes.apply_overrides(training_recipes(nt)[name], CPU_TRAINER)
    fn = build_as_fdl_runner(nt, recipe)
    assert callable(fn)
    kw = fn.keywords
    assert kw["trainer"].max_steps == 1
    if name == "puzzle_recovery":
        assert kw["student_model_path"] == kw["teacher_model_path"] == nt.ckpt
        assert isinstance(kw["data"].tokenizer, AutoTokenizer)
        assert Path(kw["distillation_config_path"]).is_file()
    else:
        model = kw["model"]
        assert type(model) is PuzzleChildModel and model.config.seq_length == 32
        from nemo_plugins.model.checkpoint import read_config

        assert arch_of(model) == read_config(nt.hf)  # the checkpoint's architecture
        assert isinstance(model.tokenizer, AutoTokenizer)
        assert kw["resume"].restore_config.path == nt.ckpt
    if name == "puzzle_cpt":
        assert isinstance(kw["data"].tokenizer, AutoTokenizer)
