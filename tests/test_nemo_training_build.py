"""The training recipes built the way NeMo-Run's job runner builds them.

`python -m nemo_run.core.runners.fdl_runner -n <name> <serialized>` (what every sbatch script of
a training recipe runs) deserializes the recipe with `ZlibJSONSerializer`, casts it to
`run.Partial` and calls `fdl.build` on it; only then does it call the task. Everything a recipe
reads from a checkpoint (the model class and config, the tokenizer) is read during that build,
where a nested `fdl.build` (e.g. NeMo's `io.load_context`) is forbidden.

Here each training recipe is built that way, and then run for one optimizer step, on a real NeMo checkpoint: the cached tiny parent
(tests/conftest.py) imported with `import_hf` (no patch needed for that on a CPU), inside the
test-only `nemo_cpu_shim`'s gloo world (plus its `training_cpu()` for the run). The recipes are sized to one device (TP1/PP1) and the
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


def training_recipes(nt, **settings) -> dict:
    R, ckpt = nt.recipes, nt.ckpt
    small = dict(parent_size="8b", tp=1, pp=1, num_nodes=1, num_gpus_per_node=1, seq_length=32, global_batch_size=2, micro_batch_size=1, max_steps=1)
    small.update(settings)
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


# A CPU run of one step: no sub-processes for data loading, one validation batch, and validation
# documents in the tiny text dataset (64 documents split 998,1,1 leave none, and megatron's
# dataset builder then loops forever looking for them).
CPU_RUN = [*CPU_TRAINER, "trainer.limit_val_batches=1", "data.num_workers=0"]
TEXT_SPLIT = ["data.split=8,1,1"]


def record_step(trainer):
    """A callback on the built trainer recording the parameters when training starts (after the
    checkpoint is restored) and after the first optimizer step, with that step's loss."""
    import lightning as L

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.before = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}
            self.loss = outputs["loss"].detach().float()

    record = Record()
    trainer.callbacks.append(record)
    return record


@pytest.mark.parametrize("name", ["puzzle_recovery", "puzzle_cpt", "puzzle_toggle_sft"])
def test_training_recipe_takes_an_optimizer_step_on_a_cpu(nt, name, tmp_path):
    """The job runner's build, then the task itself (`fdl_runner` calls it next): one real step of
    llm.distill / pretrain / finetune on the tiny parent's checkpoint and data written here."""
    import nemo_cpu_shim
    from safetensors.torch import load_file

    from nemo_plugins.nemo.connectors import _lightning_loops_restored
    from nemo_plugins.nemo.host_io import HostCheckpointIO

    settings = dict(lr=1e-3, min_lr=1e-4, warmup_steps=1, dir=str(tmp_path / "logs"))
    if name == "puzzle_toggle_sft":
        settings["seq_length"] = 128  # the chat template's headers leave no answer tokens in 32
    recipe = training_recipes(nt, **settings)[name]
    recipe = nt.recipes.apply_overrides(recipe, CPU_RUN + (TEXT_SPLIT if name != "puzzle_toggle_sft" else []))
    # the job's checkpoints are saved without CUDA (NeMo's own IO needs it even on a CPU trainer)
    recipe.trainer.strategy.checkpoint_io = nt.run.Config(HostCheckpointIO)
    fn = build_as_fdl_runner(nt, recipe)
    record = record_step(fn.keywords["trainer"])
    # _lightning_loops_restored: NeMo's strategy patches Lightning's loops for the whole process,
    # which would break the plain Lightning trainers of later tests in this one
    with nemo_cpu_shim.megatron_cpu(), nemo_cpu_shim.training_cpu(), _lightning_loops_restored():
        log_dir = fn()

    assert fn.keywords["trainer"].global_step == 1
    assert torch.isfinite(record.loss), record.loss
    student = [n for n in record.before if "teacher" not in n]
    embedding = next(n for n in student if n.endswith("embedding.word_embeddings.weight"))
    hf = load_file(str(next(nt.hf.glob("*.safetensors"))))["model.embed_tokens.weight"]
    # it started from the tiny parent's weights (bf16 training params) and the step changed them
    assert torch.allclose(record.before[embedding], hf.float(), rtol=1e-2, atol=1e-2)
    changed = [n for n in student if not torch.equal(record.before[n], record.after[n])]
    assert len(changed) > len(student) // 2, f"only {changed} of {len(student)} parameters changed"
    teacher = [n for n in record.before if "teacher" in n]
    assert bool(teacher) == (name == "puzzle_recovery")
    assert all(torch.equal(record.before[n], record.after[n]) for n in teacher)  # the teacher is frozen
    assert Path(log_dir).is_dir() and any(Path(log_dir).rglob("weights"))  # a checkpoint was saved


def test_optimizer_drops_only_nemo_keywords_at_their_defaults(nt):
    """NeMo 2.7.3 passes get_megatron_optimizer keywords megatron-core 0.16 removed; they are
    dropped only at their "unset" values, anything else is an error naming the key."""
    import megatron.core.optimizer as mcore_optimizer

    from nemo_plugins.nemo import optim

    recipe = training_recipes(nt)["puzzle_cpt"]
    assert recipe.optim.__fn_or_cls__ is optim.MegatronOptimizer
    original = mcore_optimizer.get_megatron_optimizer
    with optim._accepted_keywords_only():
        with pytest.raises(TypeError, match=r"optim.lr_mult=2.0: .* expected 1.0"):
            mcore_optimizer.get_megatron_optimizer(None, [], no_weight_decay_cond=None, lr_mult=2.0)
    assert mcore_optimizer.get_megatron_optimizer is original
