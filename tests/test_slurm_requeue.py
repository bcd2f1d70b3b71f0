"""Under Slurm (SLURM_* variables set), Lightning's auto-requeue is off in every loop the
project runs: SIGUSR1 writes no `hpc_ckpt_<n>.ckpt` (a pickle) into the working directory, and
a fit never restores one that is there."""

import random
import signal

import pytest
import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.distill import RecoveryConfig, RecoveryLossConfig, run_recovery
from nemo_plugins.utils.training import LossModule
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model import train as train_mod
from nemo_plugins.puzzle import bld as bld_mod
from nemo_plugins.puzzle.build import InitConfig, build_students
from nemo_plugins.puzzle.library import LibraryConfig, build_variants

VOCAB = 40
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = homogeneous(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=64, rope_theta=10000.0)  # fmt: skip
    return HeteroLlamaForCausalLM(cfg)


def examples(n=16, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(10)], [1] * 10) for _ in range(n)]


def fit_parent(out):
    train_mod.fit_lm(tiny(), examples(), steps=2, batch_size=4, progress=False)


def fit_bld(out):
    parent = tiny().eval()
    vs = [v for v in build_variants(parent.config, LibraryConfig(kv_heads=[1], ffn_fractions=[0.5], ffn_multiple=16))
          if v.key == "1.attention/linear"]  # fmt: skip
    calib = [(torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1)), torch.ones(4, 10, dtype=torch.bool))]
    students = build_students(parent, vs, calib, InitConfig())
    bld_mod.run_bld(parent, students, examples(), out, bld_mod.BLDConfig(steps=2, batch_size=4), progress=False)


def fit_recovery(out):
    cfg = RecoveryConfig(steps=2, batch_size=4, warmup_steps=1, val_batches=1, loss=RecoveryLossConfig(mode="cpt"))
    run_recovery(tiny(), None, examples(), examples(4, 1), cfg, out)


LOOPS = {  # loop: (how it runs, its Lightning module)
    "parent": (fit_parent, train_mod.LMTrainingModule),
    "bld": (fit_bld, bld_mod.BLDModule),
    "recovery": (fit_recovery, LossModule),
}


@pytest.fixture
def slurm_job(tmp_path, monkeypatch):
    """A Slurm-looking environment whose working directory is tmp_path/cwd."""
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("loop", list(LOOPS))
def test_sigusr1_writes_no_hpc_checkpoint(loop, slurm_job, tmp_path, monkeypatch):
    run, module_cls = LOOPS[loop]
    step, delivered = module_cls.training_step, []

    def training_step(self, *args):
        out = step(self, *args)
        handler = signal.getsignal(signal.SIGUSR1)  # Slurm's requeue warning, delivered to its handler
        delivered.append(handler)
        if callable(handler):
            handler(signal.SIGUSR1, None)
        return out

    monkeypatch.setattr(module_cls, "training_step", training_step)
    run(tmp_path / "out")
    assert delivered and not any(callable(h) for h in delivered)  # no requeue handler was installed
    assert list(tmp_path.rglob("hpc_ckpt_*")) == []


@pytest.mark.parametrize("loop", list(LOOPS))
def test_an_hpc_checkpoint_in_the_working_directory_is_not_restored(loop, slurm_job, tmp_path):
    (slurm_job / "hpc_ckpt_1.ckpt").write_bytes(b"not a checkpoint: restoring it would fail")
    LOOPS[loop][0](tmp_path / "out")  # trains from its own start, never reading the file
    assert [p.name for p in tmp_path.rglob("hpc_ckpt_*")] == ["hpc_ckpt_1.ckpt"]
