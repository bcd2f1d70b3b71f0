"""Training-state checkpoints (utils/resume.py): exact round trip of weights, optimizer,
scheduler, RNG and extra state; pruning; atomic saves; clear errors; no arbitrary unpickling."""

import random

import numpy as np
import pytest
import torch

from nemo_plugins.arch.config import homogeneous
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.llama import HeteroLlamaForCausalLM
from nemo_plugins.utils.training import OptimConfig, make_optimizer
from nemo_plugins.utils import resume
from nemo_plugins.utils.resume import latest, list_checkpoints, load_training_state, save_training_state




def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = homogeneous(
        vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
        intermediate_size=64, tie_word_embeddings=True,  # shared tensors must survive the round trip
    )  # fmt: skip
    return HeteroLlamaForCausalLM(cfg)


def setup(seed=0):
    model = tiny_model(seed)
    opt, sched = make_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=2), total_steps=10)
    return model, opt, sched


def train_steps(model, opt, sched, n, seed=123):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 50, (2, 6), generator=g)
        model(ids).float().pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_round_trip_restores_everything_and_training_continues_identically(tmp_path):
    model, opt, sched = setup()
    train_steps(model, opt, sched, 3)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    extra = {"sampler": {"epoch": 1, "position": 7}, "history": [1.5, None, float("inf")], "name": "run"}
    path = save_training_state(tmp_path, 3, model, opt, sched, extra)
    expected_draws = draws()
    train_steps(model, opt, sched, 2, seed=7)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # scramble everything
    model2, opt2, sched2 = setup(seed=5)
    state = load_training_state(path, model2, opt2, sched2)
    assert state.step == 3 and state.path == path
    assert state.extra == extra
    assert draws() == expected_draws
    assert sched2.last_epoch == 3 and sched2.get_last_lr()[0] == pytest.approx(opt2.param_groups[0]["lr"])
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied
    train_steps(model2, opt2, sched2, 2, seed=7)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_weights[k]), k


def test_lightning_optimizer_wrapper_is_accepted(tmp_path):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model, opt, sched = setup()
    train_steps(model, opt, sched, 1)
    path = save_training_state(tmp_path, 1, model, LightningOptimizer(opt), sched)
    model2, opt2, sched2 = setup(seed=1)
    load_training_state(path, model2, LightningOptimizer(opt2), sched2)
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)


def test_keep_last_prunes_and_latest_picks_newest(tmp_path):
    model, opt, sched = setup()
    assert latest(tmp_path / "nothing") is None
    for step in (1, 2, 3, 10, 11):
        save_training_state(tmp_path, step, model, opt, sched, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000011"]
    assert latest(tmp_path).name == "step-00000011"
    (tmp_path / "step-00000099").mkdir()  # incomplete: ignored
    (tmp_path / "notes").mkdir()
    assert latest(tmp_path).name == "step-00000011"
    for step in (12, 13, 14):
        save_training_state(tmp_path / "all", step, model, keep_last=0)
    assert len(list_checkpoints(tmp_path / "all")) == 3


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = setup()
    save_training_state(tmp_path, 1, model, opt, sched)

    def boom(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(resume, "_write_synced", boom)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path, 2, model, opt, sched)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]  # no partial or temporary dir
    assert load_training_state(latest(tmp_path), model).step == 1


def test_extra_must_be_json(tmp_path):
    model, _, _ = setup()
    with pytest.raises(ValueError, match="extra"):
        save_training_state(tmp_path, 1, model, extra={"x": object()})


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    model, opt, sched = setup()
    path = save_training_state(tmp_path, 1, model, opt, sched)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_training_state(tmp_path / "step-00000002", model)

    state_file = path / resume.STATE_NAME
    data = state_file.read_bytes()
    state_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{state_file}: unreadable"):
        load_training_state(path, model)
    state_file.unlink()
    with pytest.raises(CheckpointError, match=f"{state_file}: missing"):
        load_training_state(path, model)

    path = save_training_state(tmp_path, 2, model, opt, sched)
    weights = path / resume.MODEL_NAME
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{weights}: cannot load"):
        load_training_state(path, model)
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"{weights}: missing"):
        load_training_state(path, model)


def test_wrong_model_is_an_error(tmp_path):
    path = save_training_state(tmp_path, 1, tiny_model())
    cfg = homogeneous(vocab_size=50, hidden_size=32, num_layers=3, num_attention_heads=4, num_kv_heads=2, intermediate_size=64)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot load"):
        load_training_state(path, HeteroLlamaForCausalLM(cfg))


class Payload:
    """An arbitrary class: unpickling it would run attacker-chosen code paths."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_objects_are_refused(tmp_path, monkeypatch, capsys):
    model, opt, sched = setup()
    path = save_training_state(tmp_path, 1, model, opt, sched)
    state_file = path / resume.STATE_NAME
    good = torch.load(state_file, weights_only=True)
    torch.save({**good, "extra_json": Payload()}, state_file)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_training_state(path, model)
    assert "pickled code ran" not in capsys.readouterr().out

    torch.save(good, state_file)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real_load(*a, **k))
    load_training_state(path, model)
    assert seen and all(k.get("weights_only") is True for k in seen)


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_cleans_debris(tmp_path, caplog):
    """A truncated newest checkpoint (e.g. a disk that filled while saving) is skipped for the
    previous intact one; the full-size temporaries and partial step directories that killed saves
    leave are removed; with every checkpoint unreadable the run stops instead of starting afresh
    from a half-loaded model."""
    from nemo_plugins.utils.training import resume_latest

    model, opt, sched = setup()
    train_steps(model, opt, sched, 2)
    save_training_state(tmp_path, 2, model, opt, sched, {"at": 2}, keep_last=0)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, sched, 2)
    newest = save_training_state(tmp_path, 4, model, opt, sched, {"at": 4}, keep_last=0)
    (newest / resume.STATE_NAME).write_bytes((newest / resume.STATE_NAME).read_bytes()[:100])
    (tmp_path / ".step-00000006.abc.tmp").mkdir()
    (tmp_path / ".step-00000006.abc.tmp" / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / "step-00000005").mkdir()  # partial: no state file

    fresh = tiny_model(seed=9)
    got = resume_latest(tmp_path, fresh, "test")
    assert got.step == 2 and got.extra == {"at": 2}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000004"]
    assert "skipping an unreadable checkpoint" in caplog.text

    old = tmp_path / "step-00000002" / resume.MODEL_NAME
    old.write_bytes(old.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="every checkpoint in .* is unreadable"):
        resume_latest(tmp_path, tiny_model(), "test")
