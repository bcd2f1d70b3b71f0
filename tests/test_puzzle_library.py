"""Puzzle block library, BLD (incl. resume), replace-one-block scoring, costs and realization."""

import pytest
import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.arch import accounting as acc
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.puzzle import bld as bld_mod
from nemo_plugins.puzzle.activations import capture, run_student, student_io
from nemo_plugins.puzzle.bld import BLDConfig, load_variant_state, normalized_mse, run_bld, variant_path
from nemo_plugins.puzzle.build import InitConfig, build_students
from nemo_plugins.puzzle.costs import (
    CostConfig, block_stats, layout_layer, measure_in_model, non_block_stats, swapped_layers, timed_forward,
    timing_layouts, variant_stats,
)  # fmt: skip
from nemo_plugins.puzzle.library import LibraryConfig, build_variants, groups, is_parent_variant
from nemo_plugins.puzzle.realize import realize_child
from nemo_plugins.model.metrics import model_metrics
from nemo_plugins.puzzle.scoring import score_variants

VOCAB = 61




def tiny_parent(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = homogeneous(vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_attention_heads=4, num_kv_heads=4,
                      intermediate_size=96, rope_theta=10000.0)  # fmt: skip
    return HeteroLlamaForCausalLM(cfg).eval()


def batches(n=3, B=4, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (B, T), generator=g)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, T - 3 :] = False  # right padding on one row
        ids[~valid] = 0
        out.append((ids, valid))
    return out


def examples(n=32, T=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, VOCAB, (T,), generator=g).tolist(), [1] * T) for _ in range(n)]


LIB = LibraryConfig(kv_heads=[2, 1], ffn_fractions=[0.5], ffn_multiple=16)


def test_variants_decoupled_and_coupled():
    parent = tiny_parent()
    vs = build_variants(parent.config, LIB)
    names = {v.group: [] for v in vs}
    for v in vs:
        names[v.group].append(v.name)
    assert list(names) == groups(parent.config, LIB)
    assert names["0.attention"] == ["gqa_kv4", "gqa_kv2", "gqa_kv1", "linear", "no_op"]
    assert names["0.ffn"] == ["swiglu_96", "swiglu_48", "linear", "no_op"]
    assert all(is_parent_variant(parent.config, v) == (v.name in ("gqa_kv4", "swiglu_96")) for v in vs)
    coupled = build_variants(parent.config, LibraryConfig(kv_heads=[2, 1], ffn_fractions=[0.5], ffn_multiple=16, mode="coupled"))
    assert len([v for v in coupled if v.group == "0"]) == 5 * 4  # product, vs 5 + 4 decoupled
    with pytest.raises(ValueError, match="library.mode"):
        LibraryConfig(mode="both")
    # widths round to the nearest multiple: 0.67 of 768 is 512 with multiple 256
    big = homogeneous(vocab_size=10, hidden_size=192, num_layers=1, num_attention_heads=8, num_kv_heads=4, intermediate_size=768)
    widths = [v.name for v in build_variants(big, LibraryConfig(ffn_fractions=[0.67, 0.33])) if v.subblock == "ffn"]
    assert widths == ["swiglu_768", "swiglu_512", "swiglu_256", "linear", "no_op"]


def test_library_of_parent_variants_reproduces_the_parent_exactly(tmp_path):
    parent = tiny_parent()
    vs = build_variants(parent.config, LIB)
    students = build_students(parent, vs, batches(), InitConfig())
    parent_choice = {v.group: v.name for v in vs if is_parent_variant(parent.config, v)}
    child = realize_child(parent, parent_choice, vs, lambda v: students[v].state_dict())
    ids, _ = batches()[0]
    with torch.no_grad():
        assert torch.equal(child(ids), parent(ids))
    scores = score_variants(parent, {v: students[v] for v in vs if v.group.startswith("1.")}, batches())
    assert scores["1.attention/gqa_kv4"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert scores["1.ffn/swiglu_96"]["cosine"] == pytest.approx(0.0, abs=1e-6)
    assert scores["1.attention/no_op"]["kl_div"] > 1e-4  # removing attention changes the output
    # the parent's own sub-blocks need not run: their scores are the parent's metrics
    layer1 = {v: students[v] for v in vs if v.group.startswith("1.")}
    exact = {v for v in layer1 if is_parent_variant(parent.config, v)}
    skipped = score_variants(parent, layer1, batches(), exact=exact)
    assert len(exact) == 2 and skipped.keys() == scores.keys()
    for key in scores:
        for m, val in scores[key].items():
            assert skipped[key][m] == pytest.approx(val, rel=1e-5, abs=1e-6), (key, m)


def test_scores_equal_a_full_child_run():
    """Replace-one-block scoring from cached activations equals running the realized child."""
    parent = tiny_parent()
    vs = build_variants(parent.config, LIB)
    students = build_students(parent, vs, batches(), InitConfig())
    base = {v.group: v.name for v in vs if is_parent_variant(parent.config, v)}
    for key in ("1.attention/linear", "2.ffn/swiglu_48", "0.ffn/no_op"):
        group, name = key.split("/")
        child = realize_child(parent, {**base, group: name}, vs, lambda v: students[v].state_dict())
        direct = model_metrics(parent, child, batches())
        v = next(v for v in vs if v.key == key)
        scored = score_variants(parent, {v: students[v]}, batches())[key]
        for m in ("kl_div", "lm_loss", "cosine"):
            assert scored[m] == pytest.approx(direct[m], rel=1e-4, abs=1e-6), (key, m)


def test_bld_lowers_the_loss_and_resumes_without_retraining(tmp_path, monkeypatch):
    parent = tiny_parent()
    vs = [v for v in build_variants(parent.config, LIB) if v.layer == 1 and v.name in ("linear", "gqa_kv1", "no_op")]
    students = build_students(parent, vs, batches(), InitConfig())
    acts = capture(parent, batches(seed=9)[0][0])  # held out from calibration and training

    @torch.no_grad()
    def loss_of(v, block):
        x, t = student_io(v, acts)
        return float(normalized_mse(run_student(block, v, x, acts), t, torch.ones(t.shape[:2], dtype=torch.bool)))

    before = {v.key: loss_of(v, students[v]) for v in vs}
    cfg = BLDConfig(steps=30, batch_size=8, lr=3e-3)
    losses = run_bld(parent, students, examples(), tmp_path, cfg, progress=False)
    assert set(losses) == {"1.attention/linear", "1.attention/gqa_kv1", "1.ffn/linear"}  # no-ops: nothing to train
    assert all(variant_path(tmp_path, v).is_file() for v in vs)
    for v in vs:  # the linear FFN starts at its least-squares optimum; the attention variants must improve
        if v.subblock == "attention" and v.name != "no_op":
            trained = build_students(parent, [v], batches(), InitConfig())[v]
            trained.load_state_dict(load_variant_state(tmp_path, v))
            assert loss_of(v, trained) < before[v.key], v.key

    # simulate a crash that lost one variant: only that one is trained again
    lost = next(v for v in vs if v.name == "linear")
    variant_path(tmp_path, lost).unlink()
    stamps = {v.key: variant_path(tmp_path, v).stat().st_mtime_ns for v in vs if v is not lost}
    fits = []
    monkeypatch.setattr(bld_mod.L.Trainer, "fit", lambda self, module, loader: fits.append(set(module.variants.values())) or None)
    again = run_bld(parent, build_students(parent, vs, batches(), InitConfig()), examples(), tmp_path, cfg, progress=False)
    assert fits == [{lost}] and set(again) == {lost.key}
    assert {k: variant_path(tmp_path, v).stat().st_mtime_ns for v in vs if v is not lost for k in [v.key]} == stamps


def test_bld_splits_work_across_ranks(tmp_path, monkeypatch):
    parent = tiny_parent()
    vs = [v for v in build_variants(parent.config, LIB) if v.name in ("linear", "gqa_kv2")]
    students = build_students(parent, vs, batches(), InitConfig())
    seen = []
    monkeypatch.setattr(bld_mod.L.Trainer, "fit", lambda self, module, loader: seen.append(set(module.variants.values())))
    for rank in range(2):
        run_bld(parent, students, examples(), tmp_path / str(rank), BLDConfig(steps=1, rank=rank, world_size=2), progress=False)
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(vs)


def test_bld_processes_split_the_library_and_match_one_process(tmp_path):
    from nemo_plugins.puzzle.launch import run_bld_processes
    from nemo_plugins.model.train import token_batches
    from nemo_plugins.puzzle.stage import PuzzleConfig

    parent = tiny_parent(layers=2)
    cfg = PuzzleConfig(library=LIB, init=InitConfig(calibration_batches=2), bld=BLDConfig(steps=3, batch_size=8))
    vs = build_variants(parent.config, LIB)
    run_bld_processes(parent, vs, examples(), tmp_path / "two", cfg, processes=2)
    assert all(variant_path(tmp_path / "two", v).is_file() for v in vs)

    students = build_students(parent, vs, token_batches(examples(), 8, 2, 0), cfg.init)
    exact = {v for v in vs if is_parent_variant(parent.config, v)}
    run_bld(parent, students, examples(), tmp_path / "one", cfg.bld, exact=exact, progress=False)
    for v in vs:  # per-variant optimizers, clipping and the same data order: the split changes nothing
        one, two = load_variant_state(tmp_path / "one", v), load_variant_state(tmp_path / "two", v)
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one), v.key


def test_costs_follow_accounting_and_subtract_non_block():
    parent = tiny_parent()
    cfg = CostConfig(batch_size=2, prefill_len=8, decode_len=4, dtype="bf16")
    vs = {v.key: v for v in build_variants(parent.config, LIB)}
    full = variant_stats(parent.config, vs["0.attention/gqa_kv4"], cfg)
    half = variant_stats(parent.config, vs["0.attention/gqa_kv2"], cfg)
    assert full["num_params"] == acc.attention_params(parent.config, parent.config.blocks[0])
    assert half["kv_cache_mib"] == pytest.approx(full["kv_cache_mib"] / 2)
    assert full["kv_cache_mib"] * 2**20 == 2 * 4 * 8 * 2 * 2 * (8 + 4)  # 2 (k,v) * kv * head_dim * bytes * batch * ctx
    assert variant_stats(parent.config, vs["0.ffn/no_op"], cfg)["num_params"] == 0
    assert variant_stats(parent.config, vs["0.attention/linear"], cfg)["kv_cache_mib"] == 0
    total = sum(variant_stats(parent.config, v, cfg)["num_params"] for v in vs.values()
                if is_parent_variant(parent.config, v)) + non_block_stats(parent.config, cfg)["num_params"]  # fmt: skip
    assert total == acc.count_params(parent.config)
    assert block_stats(parent.config, parent.config.blocks[0], CostConfig(hardware="h200"))["runtime_ms"] < \
        block_stats(parent.config, parent.config.blocks[0], CostConfig(hardware="a100-80gb"))["runtime_ms"]  # fmt: skip
    with pytest.raises(ValueError, match="costs.hardware"):
        CostConfig(hardware="tpu")


def test_in_model_timing_covers_every_variant_and_no_op_is_free():
    parent = tiny_parent()
    vs = {v.key: v for v in build_variants(parent.config, LIB)}
    students = build_students(parent, list(vs.values()), batches(), InitConfig())
    cfg = CostConfig(batch_size=2, prefill_len=16, decode_len=8, measure_reps=3)
    before = [id(layer) for layer in parent.model.layers], parent.config
    out = measure_in_model(parent, list(vs.values()), students, cfg)
    assert ([id(layer) for layer in parent.model.layers], parent.config) == before  # restored
    assert set(out["variants"]) == set(vs)
    full, none = out["variants"]["0.attention/gqa_kv4"], out["variants"]["0.attention/no_op"]
    assert full["measured_prefill_ms"] > 0 and full["measured_decode_ms"] > 0
    assert none["measured_decode_ms"] < 0.2 * full["measured_decode_ms"]
    assert out["non_block"]["measured_decode_ms"] > 0


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_timing_layouts_hold_every_variant_and_compute_the_realized_child(mode):
    parent = tiny_parent(layers=2)
    lib = LibraryConfig(kv_heads=[2, 1], ffn_fractions=[0.5], ffn_multiple=16, mode=mode)
    vs = build_variants(parent.config, lib)
    students = build_students(parent, vs, batches(), InitConfig())
    layouts = timing_layouts(vs)
    assert {v for layout in layouts for parts in layout.values() for v in parts} == set(vs)
    ids = torch.randint(0, parent.config.vocab_size, (2, 6))
    for layout in layouts:
        choices = {v.group: v.name for parts in layout.values() for v in parts}
        child = realize_child(parent, choices, vs, lambda v: students[v].state_dict())
        layers = [layout_layer(parent, i, parts, students) for i, parts in layout.items()]
        with torch.no_grad(), swapped_layers(parent, layers):
            clock = {}
            got = timed_forward(parent, ids, parent.new_cache(2, 8), clock)
            step = timed_forward(parent, ids[:, -1:], _cache_after(parent, ids), clock)
        with torch.no_grad():
            torch.testing.assert_close(got, child(ids))
            cache = child.new_cache(2, 8)
            child(ids, cache=cache)
            torch.testing.assert_close(step, child(ids[:, -1:], cache=cache))
        assert set(clock) == {(i, part) for i in range(2) for part in ("attention", "ffn")}


def _cache_after(model, ids):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + 2)
    model(ids, cache=cache)
    return cache


def test_bld_saves_exact_parent_variants_without_training(tmp_path, monkeypatch):
    parent = tiny_parent()
    vs = [v for v in build_variants(parent.config, LIB) if v.layer == 0 and v.name in ("gqa_kv4", "swiglu_96")]
    students = build_students(parent, vs, batches(), InitConfig())
    monkeypatch.setattr(bld_mod.L.Trainer, "fit", lambda *a, **k: pytest.fail("trained an exact variant"))
    assert run_bld(parent, students, examples(), tmp_path, BLDConfig(steps=1), exact=set(vs), progress=False) == {}
    for v in vs:
        saved = load_variant_state(tmp_path, v)
        assert all(torch.equal(saved[k], t) for k, t in students[v].state_dict().items())


def test_coupled_library_trains_whole_blocks_and_realizes(tmp_path):
    parent = tiny_parent(layers=2)
    lib = LibraryConfig(kv_heads=[2], ffn_fractions=[0.5], ffn_multiple=16, attention_linear=False,
                        ffn_linear=False, mode="coupled")  # fmt: skip
    vs = build_variants(parent.config, lib)
    assert {v.group for v in vs} == {"0", "1"} and all(v.subblock == "block" for v in vs)
    students = build_students(parent, vs, batches(), InitConfig())
    exact = {v for v in vs if is_parent_variant(parent.config, v)}
    losses = run_bld(parent, students, examples(), tmp_path, BLDConfig(steps=3, batch_size=8), exact=exact, progress=False)
    assert set(losses) == {v.key for v in vs if v not in exact and list(students[v].parameters())}
    choice = {"0": "gqa_kv2+swiglu_48", "1": "no_op+no_op"}
    child = realize_child(parent, choice, vs, lambda v: load_variant_state(tmp_path, v))
    assert child.config.blocks[0].attention.num_kv_heads == 2 and child.config.blocks[1].ffn.kind == "no_op"
    scored = score_variants(parent, {v: students[v] for v in vs if v.key == "0/gqa_kv4+swiglu_96"}, batches())
    assert scored["0/gqa_kv4+swiglu_96"]["kl_div"] == pytest.approx(0.0, abs=1e-6)


def test_importance_kv_init_copies_one_head_per_group():
    parent = tiny_parent()
    v = next(v for v in build_variants(parent.config, LIB) if v.key == "0.attention/gqa_kv2")
    student = build_students(parent, [v], batches(), InitConfig(kv_heads="importance"))[v]
    pk = parent.model.layers[0].self_attn.k_proj.weight.view(4, 8, 32)  # 4 KV heads of dim 8
    sk = student.self_attn.k_proj.weight.view(2, 8, 32)
    for j in range(2):  # new head j is one of the old heads {2j, 2j+1}, copied exactly
        assert any(torch.equal(sk[j], pk[2 * j + r]) for r in range(2))
    mean = build_students(parent, [v], batches(), InitConfig(kv_heads="mean"))[v]
    torch.testing.assert_close(mean.self_attn.k_proj.weight.view(2, 8, 32), pk.view(2, 2, 8, 32).mean(1))


def test_bld_step_equals_one_step_on_the_summed_losses(tmp_path):
    """BLD backpropagates each student on its own (one graph alive at a time); the step must be the
    one of the textbook formulation: backward of the summed losses, per-variant clipping, AdamW."""
    import copy

    parent = tiny_parent()
    vs = [v for v in build_variants(parent.config, LIB) if v.layer == 1 and v.name in ("gqa_kv1", "linear")]
    students = build_students(parent, vs, batches(), InitConfig())
    reference = {v: copy.deepcopy(b) for v, b in students.items()}
    data = examples(n=8)
    cfg = BLDConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=0, grad_clip=0.05)  # a clip that binds
    run_bld(parent, students, data, tmp_path, cfg, progress=False)

    ids = torch.tensor([e[0] for e in data])  # one batch holds every example; the losses ignore row order
    acts = capture(parent, ids)
    valid = torch.ones(ids.shape, dtype=torch.bool)
    total = sum(normalized_mse(run_student(b, v, *student_io(v, acts)[:1], acts), student_io(v, acts)[1], valid)
                for v, b in reference.items())  # fmt: skip
    total.backward()
    for b in reference.values():
        torch.nn.utils.clip_grad_norm_(b.parameters(), cfg.grad_clip)
    params = [p for b in reference.values() for p in b.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    opt.step()
    for v, b in reference.items():
        saved = load_variant_state(tmp_path, v)
        for k, t in b.state_dict().items():
            torch.testing.assert_close(saved[k], t, rtol=1e-5, atol=1e-6, msg=f"{v.key}: {k}")
        assert any(not torch.equal(saved[k], t) for k, t in build_students(parent, [v], batches(), InitConfig())[v].state_dict().items())
