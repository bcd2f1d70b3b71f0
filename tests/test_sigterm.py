"""SIGTERM during training: the loop stops after the current step, checkpoints it where it has
checkpoints, and the process exits with status 143 (not 0, which a scheduler reads as success);
a rerun resumes from the checkpoint.

Lightning turns SIGTERM into a flag and, after the step, raises `SIGTERMException` (a
SystemExit without a code); `utils.training.fit_module` checkpoints and re-raises it as
`TrainingInterrupted(143)`."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.distill import RecoveryConfig, RecoveryLossConfig, run_recovery
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model import train as train_mod
from nemo_plugins.puzzle import bld as bld_mod
from nemo_plugins.puzzle.bld import BLDConfig, run_bld, variant_path
from nemo_plugins.puzzle.build import InitConfig, build_students
from nemo_plugins.puzzle.library import LibraryConfig, build_variants
from nemo_plugins.utils.resume import latest

VOCAB = 40
EXIT_SIGTERM = 143  # 128 + SIGTERM
REPO = Path(__file__).resolve().parents[1]


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = homogeneous(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                      intermediate_size=64, rope_theta=10000.0)  # fmt: skip
    return HeteroLlamaForCausalLM(cfg)


def examples(n, seed):
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(10)], [0] * 3 + [1] * 7) for _ in range(n)]


def run_small(out_dir, callbacks=()):
    """A 6-step continued-pretraining run that checkpoints only at its end (so a checkpoint at
    step 1 can only come from the SIGTERM)."""
    cfg = RecoveryConfig(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, val_every=100, ckpt_every=100, val_batches=1,
                         loss=RecoveryLossConfig(mode="cpt"))  # fmt: skip
    model = tiny(1)
    summary = run_recovery(model, None, examples(32, 0), examples(8, 1), cfg, out_dir, callbacks=callbacks)
    return model, summary


class WaitForSigterm(L.Callback):
    """After step 1: tell the test (a marker file) and wait for its SIGTERM to arrive."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.step_count == 1:
            self.marker.write_text("step 1 done")
            deadline = time.monotonic() + 120
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


CHILD = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_sigterm import WaitForSigterm, run_small
run_small({out!r}, callbacks=[WaitForSigterm({marker!r})])
print("finished without being stopped")
"""


def test_sigterm_checkpoints_the_step_exits_143_and_a_rerun_resumes(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(out), marker=str(marker))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the child never finished step 1:\n{proc.communicate(timeout=60)[0][-3000:]}"
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_SIGTERM, log[-3000:]
    assert "finished without being stopped" not in log
    assert latest(out / "checkpoints").name == "step-00000001"

    resumed, summary = run_small(out)  # the rerun continues from step 1 ...
    assert summary["start_step"] == 1 and summary["steps"] == 6
    clean, _ = run_small(tmp_path / "clean")  # ... and ends where an uninterrupted run does
    for k, v in clean.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


# ----------------------------------------------------------------------------- in-process: BLD and parent training


@pytest.fixture
def sigterm_guard():
    """A harmless SIGTERM handler under Lightning's (which chains it), so a SIGTERM sent outside
    a fit cannot end pytest; the previous handler is restored afterwards."""
    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGTERM, old)


def sigterm_at(module_cls, monkeypatch, when):
    """Make `module_cls.training_step` send this process SIGTERM when `when(module, batch_idx)`."""
    step = module_cls.training_step

    def training_step(self, batch, batch_idx):
        out = step(self, batch, batch_idx)
        if when(self, batch_idx):
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(module_cls, "training_step", training_step)


def test_sigterm_in_bld_keeps_finished_waves_exits_143_and_a_rerun_trains_the_rest(tmp_path, monkeypatch, sigterm_guard):
    parent = tiny().eval()
    lib = LibraryConfig(kv_heads=[1], ffn_fractions=[0.5], ffn_multiple=16)
    vs = [v for v in build_variants(parent.config, lib) if v.group == "1.attention" and v.name in ("linear", "gqa_kv1")]
    calib = [(torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)), torch.ones(4, 10, dtype=torch.bool))]
    cfg = BLDConfig(steps=3, batch_size=4, wave_size=1)  # one variant per wave
    waves = []

    def first_step_of_second_wave(module, batch_idx):
        if batch_idx == 0:
            waves.append(module)
        return batch_idx == 0 and len(waves) == 2

    sigterm_at(bld_mod.BLDModule, monkeypatch, first_step_of_second_wave)
    with pytest.raises(SystemExit) as stopped:
        run_bld(parent, build_students(parent, vs, calib, InitConfig()), examples(16, 0), tmp_path, cfg, progress=False)
    assert stopped.value.code == EXIT_SIGTERM
    first, second = sorted(vs, key=lambda v: v.key)  # the order BLD trains them in
    assert variant_path(tmp_path, first).is_file()  # the finished wave is saved
    assert not variant_path(tmp_path, second).is_file()  # the interrupted one is not

    monkeypatch.undo()
    assert set(run_bld(parent, build_students(parent, vs, calib, InitConfig()), examples(16, 0), tmp_path, cfg,
                       progress=False)) == {second.key}  # fmt: skip


def test_a_bld_wave_killed_midway_resumes_from_its_checkpoint_bit_exactly(tmp_path, monkeypatch, sigterm_guard):
    """SIGTERM at step 3 of a 6-step wave (checkpoints every 2 steps and on SIGTERM): the rerun
    trains steps 4-6 only and saves the weights an uninterrupted wave does."""
    from safetensors.torch import load_file

    parent = tiny().eval()
    lib = LibraryConfig(kv_heads=[1], ffn_fractions=[0.5], ffn_multiple=16)
    vs = [v for v in build_variants(parent.config, lib) if v.group == "1.attention" and v.name in ("linear", "gqa_kv1")]
    calib = [(torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)), torch.ones(4, 10, dtype=torch.bool))]
    cfg = BLDConfig(steps=6, batch_size=4, ckpt_every=2)  # 16 examples: 4 batches an epoch, so 2 epochs

    def run(out):
        return run_bld(parent, build_students(parent, vs, calib, InitConfig()), examples(16, 0), out, cfg, progress=False)

    run(tmp_path / "clean")
    steps = []
    sigterm_at(bld_mod.BLDModule, monkeypatch, lambda m, i: steps.append(m.step_count) or m.step_count == 3)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "killed")
    assert stopped.value.code == EXIT_SIGTERM and steps == [1, 2, 3]
    assert latest(tmp_path / "killed" / "wave-rank0").name == "step-00000003"
    assert not any(variant_path(tmp_path / "killed", v).is_file() for v in vs)

    monkeypatch.undo()
    resumed_steps = []
    sigterm_at(bld_mod.BLDModule, monkeypatch, lambda m, i: resumed_steps.append(m.step_count) and False)
    run(tmp_path / "killed")
    assert resumed_steps == [4, 5, 6]  # it continued, it did not start over
    assert not (tmp_path / "killed" / "wave-rank0").exists()  # the finished wave needs no checkpoint
    for v in vs:
        want, got = load_file(variant_path(tmp_path / "clean", v)), load_file(variant_path(tmp_path / "killed", v))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), v.key


def test_wave_batches_are_the_batches_lightning_drew_from_the_shuffled_loader():
    """ShuffledBatches reproduces, over several epochs, DataLoader(shuffle=True, drop_last=True, seeded
    generator) read as Lightning reads it (len(loader) batches an epoch, the iterator never
    exhausted): the order BLD trained in before waves could resume. It starts midway when asked."""
    import itertools

    from torch.utils.data import DataLoader

    for n, bs, seed in [(16, 4, 0), (19, 4, 0), (19, 5, 3), (7, 7, 1)]:
        loader = DataLoader(range(n), batch_size=bs, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        want = [b.tolist() for _ in range(11) for b in itertools.islice(iter(loader), len(loader))][:11]
        assert list(train_mod.ShuffledBatches(n, bs, seed, 0, 11)) == want
        assert list(train_mod.ShuffledBatches(n, bs, seed, 6, 11)) == want[6:]


def test_sigterm_in_parent_training_exits_143_after_the_step(monkeypatch, sigterm_guard):
    steps = []
    sigterm_at(train_mod.LMTrainingModule, monkeypatch, lambda m, i: steps.append(i) or i == 0)
    with pytest.raises(SystemExit) as stopped:
        train_mod.fit_lm(tiny(), examples(32, 0), steps=5, batch_size=4, progress=False)
    assert stopped.value.code == EXIT_SIGTERM
    assert steps == [0]  # stopped after the step it was in


def test_parent_training_killed_midway_resumes_from_its_checkpoint_bit_exactly(tmp_path, monkeypatch, sigterm_guard):
    """SIGTERM after step 3 of 7 (19 examples, 4 a batch: the run crosses two epochs) saves that
    step; the rerun trains steps 4-7 only and ends with the weights and losses of an
    uninterrupted run."""
    from nemo_plugins.utils.training import OptimConfig

    kw = dict(steps=7, batch_size=4, optim=OptimConfig(lr=1e-2, warmup_steps=2), progress=False, ckpt_every=2)
    clean = tiny()
    clean_losses = train_mod.fit_lm(clean, examples(19, 0), checkpoints=tmp_path / "clean", **kw)
    assert latest(tmp_path / "clean").name == "step-00000006"  # saved every 2 steps, the newest kept

    sigterm_at(train_mod.LMTrainingModule, monkeypatch, lambda m, i: m.step_count == 2)  # in step 3
    with pytest.raises(SystemExit) as stopped:
        train_mod.fit_lm(tiny(), examples(19, 0), checkpoints=tmp_path / "run", **kw)
    assert stopped.value.code == EXIT_SIGTERM
    assert latest(tmp_path / "run").name == "step-00000003"

    monkeypatch.undo()
    started = []
    sigterm_at(train_mod.LMTrainingModule, monkeypatch, lambda m, i: started.append(m.step_count) and False)
    resumed = tiny(seed=5)  # other initial weights: the checkpoint must replace them
    losses = train_mod.fit_lm(resumed, examples(19, 0), checkpoints=tmp_path / "run", **kw)
    assert started == [3, 4, 5, 6]  # step counts before each step it trained: it did not start over
    assert losses == clean_losses
    for k, v in clean.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
