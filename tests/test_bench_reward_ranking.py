"""benchmarks/bench_reward_ranking.py: the error kinds and ranking figures on hand-made cases, and
a run on the tiny parent with an untrained reward model (every figure in range, counts consistent)."""

from __future__ import annotations

import json

import pytest

from nemo_plugins.data.reasoning_world import Problem

from benchmark_scripts import load_benchmark

P = Problem("What is (7 + 5) * 3?", ("7 + 5 = 12", "12 * 3 = 36"), 36, 2)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_reward_ranking")


@pytest.mark.parametrize("response, kind", [
    ("<think>7 + 5 = 12\n12 * 3 = 38</think>The answer is 38.", "slip"),
    ("<think>7 + 5 = 13\n13 * 3 = 39</think>The answer is 39.", "slip"),         # carried slip
    ("<think>7 + 5 = 12\n12 * 4 = 48</think>The answer is 48.", "misread"),      # right arithmetic, wrong operand
    ("<think>7 - 5 = 2\n2 * 3 = 6</think>The answer is 6.", "misread"),          # wrong operation
    ("<think>7 + 5 = 12</think>The answer is 12.", "other"),                     # a step short
    ("<think>7 + 5 = 12\n12 times 3 = 36</think>The answer is 35.", "other"),    # unparsable step
])  # fmt: skip
def test_error_kind(bench, response, kind):
    assert bench.error_kind(response, P) == kind


def test_ranking_counts_every_right_wrong_pair_and_the_groups(bench):
    scores = [[3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [5.0, 4.0]]
    right = [[True, False, True, False], [True, False, True], [False, False]]
    kinds = [[None, "slip", None, "misread"], [None, "misread", None], ["slip", "other"]]
    res = bench.ranking(scores, right, kinds, group_size=2)
    # prompt 0: 4 pairs all won; prompt 1: (0,1) lost, (2,1) tied; prompt 2: no right response
    assert res["pairs"] == 6 and res["pair_accuracy"] == pytest.approx((4 + 0 + 0.5) / 6)
    assert res["accuracy_by_error"] == {"misread": {"accuracy": pytest.approx(2.5 / 4), "pairs": 4},
                                        "slip": {"accuracy": 1.0, "pairs": 2}}  # fmt: skip
    # groups of the first 2: prompt 0 mixed (top right), prompt 1 mixed (top wrong), prompt 2 all wrong
    assert res["mixed_groups"] == 2 and res["top_pass"] == 0.5 and res["bottom_pass"] == 0.5
    assert bench.ranking([[1.0, 2.0]], [[True, True]], [[None, None]], 2)["pair_accuracy"] is None


def test_bench_runs_on_the_tiny_parent(bench, parent_checkpoint, tmp_path):
    from nemo_plugins.model.checkpoint import load_checkpoint
    from nemo_plugins.rl.reward_model import RewardModel, save_reward_model

    rm_dir = save_reward_model(RewardModel(load_checkpoint(parent_checkpoint)), tmp_path / "rm")
    out = tmp_path / "ranking.json"
    res = bench.main(["--policy", str(parent_checkpoint), "--reward-models", str(rm_dir), "--sets", "tuning",
                      "--prompts", "6", "--samples", "4", "--group-size", "2", "--max-new-tokens", "40",
                      "--threads", "1", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    s = res["samples"]["tuning"]
    assert s["prompts"] == 6 and s["responses"] == 24
    assert s["right"] + sum(s["errors"].values()) == 24
    r = res["reward_models"][str(rm_dir)]["tuning"]
    assert r["pairs"] <= s["right"] * (24 - s["right"])
    assert sum(v["pairs"] for v in r["accuracy_by_error"].values()) == r["pairs"]
    assert r["pair_accuracy"] is None or 0 <= r["pair_accuracy"] <= 1
