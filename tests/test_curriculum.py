"""Pass-rate filtering and curriculum sampling for GRPO: schedule, allocation, leftovers, resume, cache."""

import json
import math
from collections import Counter

import pytest
import torch

from nemo_plugins.arch import homogeneous
from nemo_plugins.data import curriculum as C
from nemo_plugins.rl.pass_rates import estimate_pass_rates
from nemo_plugins.data import reasoning_world as rw
from nemo_plugins.data import tokenizer as T
from nemo_plugins.data.chat import EOS, render_prompt
from nemo_plugins.model import HeteroLlamaForCausalLM
from nemo_plugins.model import rollout as engine
from nemo_plugins.model.generate import SamplingConfig


RATES = (0.9, 0.7, 0.5, 0.3, 0.1)  # five levels, easiest first


def five_levels(per_level: int = 40) -> dict[str, float]:
    return {f"l{lvl}-{j}": r for lvl, r in enumerate(RATES) for j in range(per_level)}


def sampler(rates=None, **kw) -> C.CurriculumSampler:
    cfg = dict(batch_size=20, total_batches=10, seed=0)
    cfg.update(kw)
    return C.CurriculumSampler(five_levels() if rates is None else rates, C.CurriculumConfig(**cfg))


def run(s, n: int) -> list[list]:
    return [s.next_batch() for _ in range(n)]


# ----------------------------------------------------------------------------- allocation


def test_gaussian_allocation_by_hand():
    # centre 0, std 1 over 3 levels: weights ∝ (1, e^-1/2, e^-2) = (.5741, .3482, .0777);
    # x10 -> floors (5, 3, 0), the two units left go to the largest fractions (.777, .741).
    assert C.largest_remainder(C.gaussian_weights(3, 0.0, 1.0), 10) == [6, 3, 1]
    # centre 1: (.2741, .4519, .2741) x10 -> floors (2, 4, 2), fractions .741 twice beat .519.
    assert C.largest_remainder(C.gaussian_weights(3, 1.0, 1.0), 10) == [3, 4, 3]
    assert sum(C.largest_remainder([0.3, 0.3, 0.4], 7)) == 7


def test_sampler_allocation_by_hand():
    rates = {f"a{j}": 0.8 for j in range(10)} | {f"b{j}": 0.5 for j in range(10)} | {f"c{j}": 0.2 for j in range(10)}
    s = C.CurriculumSampler(rates, C.CurriculumConfig(batch_size=10, total_batches=3, std=1.0, seed=0))
    assert [s.centre(b) for b in range(4)] == [0.0, 1.0, 2.0, 2.0]
    first, second = run(s, 2)
    assert s.batch_composition(first) == [6, 3, 1]
    assert s.batch_composition(second) == [3, 4, 3]


def test_leftover_filled_from_largest_pools():
    # Easy level holds only 2: target (6, 3, 1) -> take (2, 3, 1), 4 left over; remaining pools
    # (0, 7, 4): three to the middle (7, 6, 5 left), then a tie 4:4 goes to the level nearest
    # the centre (the middle) -> (2, 7, 1).
    rates = {f"a{j}": 0.8 for j in range(2)} | {f"b{j}": 0.5 for j in range(10)} | {f"c{j}": 0.2 for j in range(5)}
    s = C.CurriculumSampler(rates, C.CurriculumConfig(batch_size=10, total_batches=3, seed=0))
    assert s.batch_composition(s.next_batch()) == [2, 7, 1]
    assert C.fill_leftover([2, 3, 1], [2, 10, 5], 10, centre=0.0) == [2, 7, 1]


def test_level_runs_dry_mid_run():
    s = sampler(std=0.2, total_batches=40)  # sharp target that stays on the easy level for a while
    batches = run(s, 3)
    assert [s.batch_composition(b) for b in batches[:2]] == [[20, 0, 0, 0, 0]] * 2  # 40 easy prompts
    # Easy level dry while the target still asks for it: the 20 slots go to the largest
    # remaining pools (40 each, ties nearest the centre first), so evenly to the other four.
    assert s.target_weights(2)[0] > 0.99 and s.batch_composition(batches[2]) == [0, 5, 5, 5, 5]
    assert all(len(set(b)) == 20 for b in batches)


# ----------------------------------------------------------------------------- schedule


def test_schedule_easy_to_hard_one_epoch():
    s = sampler()  # 200 prompts, 10 batches of 20 = one epoch over the schedule
    batches = run(s, 10)
    comps = [s.batch_composition(b) for b in batches]
    means = [s.mean_pass_rate(b) for b in batches]
    assert comps[0][0] + comps[0][1] >= 15 and comps[0][4] == 0  # early: mostly easy
    assert comps[7][3] + comps[7][4] >= 15 and comps[7][0] == 0  # late: mostly hard
    assert sum(means[:3]) / 3 > sum(means[3:6]) / 3 > sum(means[6:9]) / 3
    assert all(a >= b for a, b in zip(means[:8], means[1:8]))  # decreasing while every level has prompts
    every = [i for b in batches for i in b]
    assert sorted(every) == sorted(five_levels())  # without replacement: each prompt once per epoch
    assert s.epoch == 0


def test_schedule_with_replacement_follows_target_exactly():
    s = sampler(without_replacement=False, total_batches=5)
    for b in range(8):
        batch = s.next_batch()
        assert len(set(batch)) == 20
        assert s.batch_composition(batch) == C.largest_remainder(s.target_weights(b), 20)
    assert s.centre(7) == 4.0


def test_epoch_boundary_inside_a_batch():
    s = sampler(rates=five_levels(per_level=9), batch_size=20, total_batches=6)  # 45 prompts
    batches = run(s, 9)  # 180 draws = 4 epochs
    assert all(len(set(b)) == 20 for b in batches)
    assert set(Counter(i for b in batches for i in b).values()) == {4}
    assert s.epoch == 3


# ----------------------------------------------------------------------------- determinism and resume


def test_reproducible_under_seed():
    assert run(sampler(seed=1), 6) == run(sampler(seed=1), 6)
    assert run(sampler(seed=1), 6) != run(sampler(seed=2), 6)


@pytest.mark.parametrize("cls", [C.CurriculumSampler, C.RandomSampler])
@pytest.mark.parametrize("without_replacement", [True, False])
def test_resume_matches_uninterrupted(cls, without_replacement):
    cfg = C.CurriculumConfig(batch_size=30, total_batches=12, seed=3, without_replacement=without_replacement)
    full = run(cls(five_levels(), cfg), 16)  # crosses an epoch boundary (200 prompts, 480 draws)
    s = cls(five_levels(), cfg)
    assert run(s, 7) == full[:7]
    state = s.state_dict()
    restored = cls(five_levels(), cfg)
    restored.load_state_dict(state)
    assert run(restored, 9) == full[7:]
    via_json = cls(five_levels(), cfg)
    via_json.load_state_dict(json.loads(json.dumps(state)))
    assert run(via_json, 9) == full[7:]
    assert run(s, 9) == full[7:]  # saving does not disturb the running sampler


def test_load_state_refuses_other_config():
    state = sampler(seed=0).state_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        sampler(seed=0, std=2.0).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        C.RandomSampler(five_levels(), C.CurriculumConfig(batch_size=20, total_batches=10)).load_state_dict(state)


# ----------------------------------------------------------------------------- random sampler, levels, config


def test_random_sampler_covers_each_prompt_once_per_epoch():
    s = C.RandomSampler(five_levels(), C.CurriculumConfig(batch_size=20, seed=0))
    for _ in range(2):
        epoch = run(s, 10)
        assert sorted(i for b in epoch for i in b) == sorted(five_levels())
    odd = C.RandomSampler(five_levels(per_level=10), C.CurriculumConfig(batch_size=20, seed=0))  # 50 prompts
    batches = run(odd, 5)
    assert all(len(set(b)) == 20 for b in batches)
    assert set(Counter(i for b in batches for i in b).values()) == {2}
    assert sum(odd.batch_composition(batches[0])) == 20


def test_levels():
    rates = {"a": 0.0, "b": 0.125, "c": 0.25, "d": 0.5, "e": 0.625, "f": 0.625}
    distinct = C.build_levels(rates, C.CurriculumConfig())
    assert distinct == [["e", "f"], ["d"], ["c"], ["b"], ["a"]]
    # five equal bins over [0, 0.625]: width 0.125, rates on an edge go up; 0.375 bin is empty.
    assert C.build_levels(rates, C.CurriculumConfig(num_levels=5)) == [["d", "e", "f"], ["c"], ["b"], ["a"]]
    assert C.build_levels(rates, C.CurriculumConfig(level_edges=[0.2, 0.5])) == [["d", "e", "f"], ["c"], ["a", "b"]]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"std": -1}, r"curriculum.std=-1: expected > 0"),
        ({"batch_size": 0}, r"curriculum.batch_size=0"),
        ({"level_edges": [0.5, 0.2]}, r"curriculum.level_edges"),
        ({"total_batches": 0}, r"curriculum.total_batches=0"),
        ({"centre_end": 1.5}, r"curriculum.centre_end=1.5"),
    ],
)
def test_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        C.CurriculumConfig(**kw)


def test_sampler_input_errors():
    with pytest.raises(ValueError, match=r"curriculum.batch_size=300: expected <= the number of prompts \(200\)"):
        sampler(batch_size=300)
    with pytest.raises(ValueError, match=r"pass_rates\['x'\]=1.5"):
        sampler(rates={"x": 1.5})


# ----------------------------------------------------------------------------- filtering


def test_filter_by_pass_rate():
    rates = {"a": 0.0, "b": 0.5, "c": 0.75, "d": 0.875, "e": 1.0, "f": 0.625}
    result = C.filter_by_pass_rate(rates, 0.75)
    assert result.kept == ["a", "b", "f"] and result.dropped == ["c", "d", "e"]
    assert result.counts() == {"total": 6, "kept": 3, "dropped": 3, "threshold": 0.75}
    assert C.filter_by_pass_rate(rates, 1.0).dropped == ["e"]
    with pytest.raises(ValueError, match="threshold=0"):
        C.filter_by_pass_rate(rates, 0)


# ----------------------------------------------------------------------------- pass-rate estimation


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(rw.chat_texts(rw.generate_problems(300, seed=0)), vocab_size=320)


@pytest.fixture(scope="module")
def problems():
    ps = rw.generate_problems(6, seed=5)
    return ps + ps[:2]  # repeats collapse to one id each


def tiny_model(tok):
    torch.manual_seed(0)
    cfg = homogeneous(vocab_size=tok.get_vocab_size(), hidden_size=32, num_layers=1, num_attention_heads=4,
                      num_kv_heads=2, intermediate_size=64, rope_theta=10000.0, max_position_embeddings=256)  # fmt: skip
    return HeteroLlamaForCausalLM(cfg)


def test_problem_id():
    p, q = rw.generate_problems(2, seed=1)
    assert C.problem_id(p) == C.problem_id(rw.Problem(p.question, (), 0, 1))  # question text only
    assert C.problem_id(p) != C.problem_id(q) and len(C.problem_id(p)) == 16


def test_pass_rate_counting(tok, problems, monkeypatch):
    """A fake generator answers correctly on the first of every k consecutive samples: rate 1/k."""
    eos = T.token_id(tok, EOS)
    by_prompt = {tuple(T.encode(tok, render_prompt(p.question, True))): p for p in problems}
    calls = []

    def fake_generate(model, prompts, cfg, *, pad_id, generator):
        assert cfg.temperature == 1.0 and eos in cfg.stop_token_ids
        calls.append(len(prompts))
        out = []
        for j, prompt in enumerate(prompts):
            answer = by_prompt[tuple(prompt)].answer + (0 if (sum(calls[:-1]) + j) % 3 == 0 else 1)
            out.append(T.encode(tok, f"<think>x</think>The answer is {answer}.") + [eos])
        return out

    monkeypatch.setattr(engine, "generate", fake_generate)
    rates = estimate_pass_rates(tiny_model(tok), tok, problems, 3, batch_size=4)
    assert list(rates) == list(C.problems_by_id(problems)) and len(rates) == 6
    assert set(rates.values()) == {1 / 3}
    assert calls == [4, 4, 4, 4, 2]  # 6 unique problems x 3 samples, 4 sequences per call


def test_estimate_pass_rates_and_cache(tok, problems, tmp_path, monkeypatch):
    model, k = tiny_model(tok), 2
    cache = tmp_path / "rates.json"
    kw = dict(sampling=SamplingConfig(max_new_tokens=12, temperature=1.0), batch_size=8, cache_path=cache)
    rates = estimate_pass_rates(model, tok, problems, k, seed=0, model_id="tiny@0", **kw)
    assert set(rates) == set(C.problems_by_id(problems))
    assert all(0.0 <= r <= 1.0 and math.isclose(r * k, round(r * k)) for r in rates.values())
    assert json.loads(cache.read_text())["pass_rates"] == rates

    def refuse(*a, **kw):
        raise AssertionError("model called although the cache holds the estimate")

    monkeypatch.setattr(engine, "generate", refuse)
    assert estimate_pass_rates(model, tok, problems, k, seed=0, model_id="tiny@0", **kw) == rates
    for other in (dict(seed=1, model_id="tiny@0"), dict(seed=0, model_id="tiny@1")):
        with pytest.raises(AssertionError, match="cache holds"):
            estimate_pass_rates(model, tok, problems, k, **other, **kw)
    with pytest.raises(AssertionError, match="cache holds"):
        estimate_pass_rates(model, tok, problems[:3], k, seed=0, model_id="tiny@0", **kw)


def test_estimate_pass_rates_errors(tok, problems, tmp_path):
    model = tiny_model(tok)
    with pytest.raises(ValueError, match="sampling.temperature=0.0"):
        estimate_pass_rates(model, tok, problems, 2, sampling=SamplingConfig(temperature=0.0))
    with pytest.raises(ValueError, match="model_id=None"):
        estimate_pass_rates(model, tok, problems, 2, cache_path=tmp_path / "x.json")
    with pytest.raises(ValueError, match="k=0"):
        estimate_pass_rates(model, tok, problems, 0)
