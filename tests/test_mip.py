"""Puzzle's MIP (`nemo_plugins.puzzle.mip`): exactness against brute force, constraints, diversity
cuts, infeasibility diagnosis, Pareto sweeps, pruning, library validation and the `mip` CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import numpy as np
import pytest

from nemo_plugins.cli.main import main
from nemo_plugins.puzzle import mip
from nemo_plugins.puzzle.mip import InfeasibleBudgetError, LibraryError

from benchmark_scripts import load_benchmark

KEYS = ("a", "b", "c")


def random_library(rng: random.Random, groups: int, variants: int, ints: bool) -> dict:
    """Small random library; sometimes a group has fewer variants or an exact duplicate."""
    lib = {}
    for g in range(groups):
        n = rng.randint(1, variants) if rng.random() < 0.2 else variants
        entries = {}
        for v in range(n):
            stats = {k: float(rng.randint(0, 9)) if ints else round(rng.uniform(0, 10), 3) for k in KEYS}
            entries[f"v{v}"] = {"stats": stats, "metrics": {"kl": float(rng.randint(0, 4)) if ints else rng.random()}}
        if n > 1 and rng.random() < 0.2:
            entries["dup"] = json.loads(json.dumps(entries["v0"]))
        lib[f"g{g}"] = entries
    return lib


def enumerate_all(lib: dict, keys: list[str]):
    """Every choice (one variant per group) with the exact (fsum) totals of `keys`."""
    groups = list(lib)
    combos = list(itertools.product(*[list(lib[g]) for g in groups]))
    totals = {}
    for key in keys:
        section, name = key.split(".")
        totals[key] = np.array([math.fsum(lib[g][v][section][name] for g, v in zip(groups, c)) for c in combos])
    return groups, combos, totals


def brute_force(lib, objective, maximize=False, max_bounds=None, min_bounds=None, cuts=(), min_diversity=1):
    """(best objective, choices) among choices meeting the bounds exactly and the diversity cuts."""
    max_bounds, min_bounds = max_bounds or {}, min_bounds or {}
    groups, combos, totals = enumerate_all(lib, sorted({objective, *max_bounds, *min_bounds}))
    ok = np.ones(len(combos), bool)
    for k, b in max_bounds.items():
        ok &= totals[k] <= b
    for k, b in min_bounds.items():
        ok &= totals[k] >= b
    for cut in cuts:
        same = np.array([sum(cut[g] == v for g, v in zip(groups, c)) for c in combos])
        ok &= same <= len(groups) - min_diversity
    if not ok.any():
        return None, None
    obj = np.where(ok, totals[objective], -np.inf if maximize else np.inf)
    i = int(np.argmax(obj) if maximize else np.argmin(obj))
    return float(obj[i]), dict(zip(groups, combos[i]))


def random_problem(rng: random.Random):
    ints = rng.random() < 0.4
    lib = random_library(rng, rng.randint(1, 5), 4, ints)
    G = len(lib)
    max_bounds, min_bounds = {}, {}
    for k in rng.sample(KEYS, rng.randint(1, 3)):
        if rng.random() < 0.7:
            max_bounds[f"stats.{k}"] = float(rng.randint(0, 9 * G)) if ints else rng.uniform(0, 8 * G)
        else:
            min_bounds[f"stats.{k}"] = float(rng.randint(0, 9 * G)) if ints else rng.uniform(0, 5 * G)
    objective = rng.choice(["metrics.kl", "stats.c"])
    return lib, objective, rng.random() < 0.35, max_bounds, min_bounds


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def assert_meets_bounds(lib, sol: mip.Solution, max_bounds, min_bounds):
    for k, b in max_bounds.items():
        section, name = k.split(".")
        total = math.fsum(lib[g][v][section][name] for g, v in sol.choices.items())
        assert total <= b + 1e-9 * max(1.0, abs(b)), (k, total, b)
        assert close(sol.totals[k], total)
    for k, b in min_bounds.items():
        section, name = k.split(".")
        total = math.fsum(lib[g][v][section][name] for g, v in sol.choices.items())
        assert total >= b - 1e-9 * max(1.0, abs(b)), (k, total, b)


def test_optimal_equals_brute_force_over_many_random_libraries():
    rng = random.Random(1234)
    solved = infeasible = 0
    for _ in range(250):
        lib, objective, maximize, max_b, min_b = random_problem(rng)
        best, _ = brute_force(lib, objective, maximize, max_b, min_b)
        if best is None:
            with pytest.raises(InfeasibleBudgetError):
                mip.solve(lib, objective, maximize=maximize, max_bounds=max_b, min_bounds=min_b)
            infeasible += 1
            continue
        (sol,) = mip.solve(lib, objective, maximize=maximize, max_bounds=max_b, min_bounds=min_b)
        assert sol.status == "optimal"
        assert close(sol.objective, best), (lib, objective, maximize, max_b, min_b, sol.objective, best)
        assert_meets_bounds(lib, sol, max_b, min_b)
        assert set(sol.choices) == set(lib) and all(sol.choices[g] in lib[g] for g in lib)
        section, name = objective.split(".")
        assert close(sol.objective, math.fsum(lib[g][v][section][name] for g, v in sol.choices.items()))
        solved += 1
    assert solved > 120 and infeasible > 20  # both branches were exercised


def test_kth_solution_is_the_best_that_respects_the_diversity_cuts():
    rng = random.Random(99)
    checked = 0
    for _ in range(60):
        lib, objective, maximize, max_b, min_b = random_problem(rng)
        if len(lib) < 2 or brute_force(lib, objective, maximize, max_b, min_b)[0] is None:
            continue
        d = rng.randint(1, len(lib))
        sols = mip.solve(lib, objective, maximize=maximize, max_bounds=max_b, min_bounds=min_b,
                         num_solutions=4, min_diversity=d)  # fmt: skip
        cuts = []
        for sol in sols:
            best, _ = brute_force(lib, objective, maximize, max_b, min_b, cuts, d)
            assert best is not None and close(sol.objective, best), (len(cuts), sol.objective, best)
            assert_meets_bounds(lib, sol, max_b, min_b)
            for earlier in cuts:
                assert sum(earlier[g] != sol.choices[g] for g in lib) >= d
            cuts.append(sol.choices)
            checked += 1
        if len(sols) < 4:  # it stopped only because no further diverse choice exists
            assert brute_force(lib, objective, maximize, max_b, min_b, cuts, d)[0] is None
    assert checked > 60


def test_duplicate_variants_count_as_different_choices_for_diversity():
    lib = {
        "a": {"x": {"stats": {"m": 1.0}, "metrics": {"kl": 0.0}}, "x_copy": {"stats": {"m": 1.0}, "metrics": {"kl": 0.0}},
              "y": {"stats": {"m": 5.0}, "metrics": {"kl": 9.0}}},
        "b": {"p": {"stats": {"m": 1.0}, "metrics": {"kl": 1.0}}, "q": {"stats": {"m": 2.0}, "metrics": {"kl": 5.0}}},
    }  # fmt: skip
    s1, s2 = mip.solve(lib, "metrics.kl", max_bounds={"stats.m": 10}, num_solutions=2, min_diversity=1)
    assert (s1.objective, s2.objective) == (1.0, 1.0)
    assert {s1.choices["a"], s2.choices["a"]} == {"x", "x_copy"}


def test_infeasible_budget_names_the_constraint_and_its_smallest_feasible_value():
    rng = random.Random(7)
    seen_joint = seen_alone = 0
    for _ in range(200):
        lib = random_library(rng, rng.randint(1, 5), 4, ints=rng.random() < 0.5)
        _, _, totals = enumerate_all(lib, ["stats.a", "stats.b"])
        two = rng.random() < 0.6
        max_b = {"stats.a": float(np.quantile(totals["stats.a"], rng.uniform(0.0, 0.5))) - rng.uniform(0, 1)}
        min_b = {"stats.b": float(np.quantile(totals["stats.b"], rng.uniform(0.5, 1))) + rng.uniform(0, 3)} if two else {}
        if brute_force(lib, "metrics.kl", max_bounds=max_b, min_bounds=min_b)[0] is not None:
            continue
        with pytest.raises(InfeasibleBudgetError) as info:
            mip.solve(lib, "metrics.kl", max_bounds=max_b, min_bounds=min_b)
        e = info.value
        msg = str(e)
        assert msg.startswith(f"infeasible: {e.key} ") and "cannot be met" in msg
        value = float(re.search(r"feasible value is (\S+?)(?: \(|$)", msg).group(1))
        assert close(value, e.best_value)
        # brute force: the best value the named bound can take, subject to the other bound (when
        # the message says so) or alone (the bound cannot be met whatever the others are)
        given_others = "(given the other constraints)" in msg
        others_max = {k: b for k, b in max_b.items() if k != e.key and given_others}
        others_min = {k: b for k, b in min_b.items() if k != e.key and given_others}
        if e.sense == "max":
            assert f"{e.key} <= " in msg and "smallest" in msg
            expect, _ = brute_force(lib, e.key, False, others_max, others_min)
            assert value > max_b[e.key]
        else:
            assert f"{e.key} >= " in msg and "largest" in msg
            expect, _ = brute_force(lib, e.key, True, others_max, others_min)
            assert value < min_b[e.key]
        assert close(value, expect), (msg, expect)
        if given_others:
            seen_joint += 1
        else:
            seen_alone += 1
    assert seen_joint >= 3 and seen_alone >= 10


def test_single_max_budget_message_uses_the_sum_of_group_minima():
    lib = {str(g): {v: {"stats": {"mem": 10.0 * g + i}, "metrics": {"kl": 1.0 / (1 + i)}} for i, v in enumerate("xyz")}
           for g in range(4)}  # fmt: skip
    with pytest.raises(InfeasibleBudgetError, match=re.escape(
            "infeasible: stats.mem <= 50 cannot be met; the smallest feasible value is 60")):  # fmt: skip
        mip.solve(lib, "metrics.kl", max_bounds={"stats.mem": 50})


def test_tight_budget_equal_to_a_reachable_total_is_feasible():
    lib = {str(g): {"big": {"stats": {"m": 3.0}, "metrics": {"kl": 0.0}}, "small": {"stats": {"m": 1.0}, "metrics": {"kl": 1.0}}}
           for g in range(6)}  # fmt: skip
    (sol,) = mip.solve(lib, "metrics.kl", max_bounds={"stats.m": 14.0})
    assert sol.objective == 2.0 and sol.totals["stats.m"] == 14.0


def test_pareto_sweep_is_monotone_and_matches_direct_solves():
    rng = random.Random(5)
    lib = random_library(rng, 12, 6, ints=False)
    lo = sum(min(e["stats"]["a"] for e in lib[g].values()) for g in lib)
    hi = sum(max(e["stats"]["a"] for e in lib[g].values()) for g in lib)
    budgets = [lo - 1.0] + list(np.linspace(lo, hi, 15))
    budgets = [budgets[i] for i in rng.sample(range(len(budgets)), len(budgets))]  # any order
    others = {"stats.b": 0.8 * sum(max(e["stats"]["b"] for e in lib[g].values()) for g in lib)}
    frontier = mip.pareto_sweep(lib, "metrics.kl", "stats.a", budgets, max_bounds=others)
    assert len(frontier) == len(budgets)
    points = sorted((b, s) for b, s in zip(budgets, frontier) if s is not None)
    assert frontier[budgets.index(lo - 1.0)] is None and len(points) >= 14
    for (_, s1), (_, s2) in zip(points, points[1:]):
        assert s2.objective <= s1.objective + 1e-12  # looser budget, no worse
    for b, s in zip(budgets, frontier):
        if s is None:
            with pytest.raises(InfeasibleBudgetError):
                mip.solve(lib, "metrics.kl", max_bounds={**others, "stats.a": b})
            continue
        assert s.status == "optimal" and s.totals["stats.a"] <= b + 1e-9 * abs(b)
        (direct,) = mip.solve(lib, "metrics.kl", max_bounds={**others, "stats.a": b})
        assert close(s.objective, direct.objective)
        assert close(s.objective, brute_force_small(lib, {**others, "stats.a": b}))


def brute_force_small(lib, max_bounds):
    """Exact optimum for a 12-group library by dynamic programming over Pareto-pruned partial sums."""
    partial = [(0.0, 0.0, 0.0)]  # (kl, a, b) of partial choices
    for g in lib:
        nxt = [(kl + e["metrics"]["kl"], a + e["stats"]["a"], b + e["stats"]["b"]) for kl, a, b in partial
               for e in lib[g].values()]  # fmt: skip
        nxt = [p for p in nxt if p[1] <= max_bounds["stats.a"] + 1e-9 and p[2] <= max_bounds["stats.b"] + 1e-9]
        nxt.sort()
        kept = []  # drop states worse in kl, a and b than a kept one
        for p in nxt:
            if not any(q[1] <= p[1] and q[2] <= p[2] for q in kept):
                kept.append(p)
        partial = kept
    return min(p[0] for p in partial)


def test_pruning_never_changes_the_optimum():
    rng = random.Random(11)
    for _ in range(40):
        lib, objective, maximize, max_b, min_b = random_problem(rng)
        kwargs = dict(maximize=maximize, max_bounds=max_b, min_bounds=min_b, num_solutions=3, min_diversity=1)
        try:
            pruned = mip.solve(lib, objective, **kwargs)
        except InfeasibleBudgetError:
            with pytest.raises(InfeasibleBudgetError):
                mip.solve(lib, objective, prune=False, **kwargs)
            continue
        full = mip.solve(lib, objective, prune=False, **kwargs)
        assert [round(s.objective, 9) for s in pruned] == [round(s.objective, 9) for s in full]
    # a Puzzle-like library: many dominated variants, both settings agree
    lib = puzzle_like(24, seed=3)
    budget = {"stats.mem": 0.5 * sum(max(e["stats"]["mem"] for e in lib[g].values()) for g in lib)}
    a = mip.solve(lib, max_bounds=budget, num_solutions=2, min_diversity=3)
    b = mip.solve(lib, max_bounds=budget, num_solutions=2, min_diversity=3, prune=False)
    assert [s.objective for s in a] == pytest.approx([s.objective for s in b], rel=1e-9)


def puzzle_like(layers: int, seed: int) -> dict:
    """Layer x (attention, FFN) variants: cheaper ones have larger KL, with layer sensitivity."""
    rng = np.random.default_rng(seed)
    lib = {}
    for layer in range(layers):
        sens = 0.3 + 2 * np.exp(-layer / 3) + rng.gamma(2, 0.1)
        lib[str(layer)] = {
            f"attn{a}|ffn{f}": {
                "stats": {"mem": 100.0 * a + 200.0 * f, "runtime": float(a * 0.3 + f * 0.7 + 0.01 * rng.random())},
                "metrics": {"kl_div": float(sens * ((1 - a) ** 2 * 0.02 + (1 - f) ** 1.5 * 0.03) * rng.lognormal(0, 0.2))},
            }
            for a in (1.0, 0.5, 0.25, 0.0)
            for f in (1.0, 0.5, 0.25, 0.0)
        }
    return lib


def test_matches_cbc_on_a_puzzle_like_library():
    pulp = pytest.importorskip("pulp")
    lib = puzzle_like(40, seed=0)
    mem = 0.45 * sum(max(e["stats"]["mem"] for e in lib[g].values()) for g in lib)
    run = 0.5 * sum(max(e["stats"]["runtime"] for e in lib[g].values()) for g in lib)
    (sol,) = mip.solve(lib, "metrics.kl_div", max_bounds={"stats.mem": mem, "stats.runtime": run})
    prob = pulp.LpProblem("p", pulp.LpMinimize)
    x = {(g, v): pulp.LpVariable(f"x_{g}_{i}", cat="Binary") for g in lib for i, v in enumerate(lib[g])}
    for g in lib:
        prob += pulp.lpSum(x[g, v] for v in lib[g]) == 1
    prob += pulp.lpSum(lib[g][v]["metrics"]["kl_div"] * x[g, v] for g, v in x)
    prob += pulp.lpSum(lib[g][v]["stats"]["mem"] * x[g, v] for g, v in x) <= mem
    prob += pulp.lpSum(lib[g][v]["stats"]["runtime"] * x[g, v] for g, v in x) <= run
    prob.solve(pulp.PULP_CBC_CMD(msg=False))
    assert pulp.LpStatus[prob.status] == "Optimal"
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(pulp.value(prob.objective), rel=1e-6)
    assert sol.totals["stats.mem"] <= mem and sol.totals["stats.runtime"] <= run * (1 + 1e-9)


def scip_reference(lib, objective, max_bounds, cuts=(), min_diversity=1) -> float:
    """Independent referee: the plain model in SCIP (bundled with OR-Tools), zero gap."""
    from ortools.linear_solver import pywraplp

    s = pywraplp.Solver.CreateSolver("SCIP")
    s.SetSolverSpecificParametersAsString("limits/gap = 0\nlimits/absgap = 0\nnumerics/feastol = 1e-9\n")
    x = {(g, v): s.BoolVar("") for g in lib for v in lib[g]}
    for g in lib:
        s.Add(sum(x[g, v] for v in lib[g]) == 1)
    for k, b in max_bounds.items():
        section, name = k.split(".")
        s.Add(sum(lib[g][v][section][name] * var for (g, v), var in x.items()) <= b)
    for cut in cuts:
        s.Add(sum(x[g, v] for g, v in cut.items()) <= len(lib) - min_diversity)
    section, name = objective.split(".")
    s.Minimize(sum(lib[g][v][section][name] * var for (g, v), var in x.items()))
    assert s.Solve() == pywraplp.Solver.OPTIMAL
    return math.fsum(lib[g][v][section][name] for (g, v), var in x.items() if var.solution_value() > 0.5)


def test_plain_formulation_matches_brute_force_and_the_fast_solver():
    """`solve_plain` (the program as written) and `solve` (pruning, Lagrangian bound, CP-SAT core)
    give the same optimum as brute force on random libraries: max and min bounds, maximizing,
    several diverse solutions, infeasible budgets."""
    rng = random.Random(77)
    solved = infeasible = 0
    for _ in range(60):
        lib, objective, maximize, max_b, min_b = random_problem(rng)
        kw = dict(maximize=maximize, max_bounds=max_b, min_bounds=min_b)
        best, _ = brute_force(lib, objective, **kw)
        if best is None:
            for solver in (mip.solve, mip.solve_plain):
                with pytest.raises(InfeasibleBudgetError):
                    solver(lib, objective, **kw)
            infeasible += 1
            continue
        n, div = rng.randint(1, 3), rng.randint(1, len(lib))
        plain = mip.solve_plain(lib, objective, num_solutions=n, min_diversity=div, **kw)
        fast = mip.solve(lib, objective, num_solutions=n, min_diversity=div, **kw)
        assert close(plain[0].objective, best) and close(fast[0].objective, best)
        for sols in (plain, fast):  # ties may pick other choices, so each list is checked on its own cuts
            cuts = []
            for sol in sols:  # the best that respects the cuts of the ones before it
                want, _ = brute_force(lib, objective, **kw, cuts=cuts, min_diversity=div)
                assert sol.status == "optimal" and close(sol.objective, want)
                assert_meets_bounds(lib, sol, max_b, min_b)
                cuts.append(sol.choices)
            assert brute_force(lib, objective, **kw, cuts=cuts, min_diversity=div)[0] is None or len(sols) == n
        solved += 1
    assert solved > 25 and infeasible > 5


def test_larger_cores_and_diverse_solutions_match_scip():
    """Large enough that the core search, its growth and the proof condition all matter (the
    small brute-force cases solve their whole library in one core)."""
    lib = puzzle_like(30, seed=4)
    mem = 0.45 * sum(max(e["stats"]["mem"] for e in lib[g].values()) for g in lib)
    (alone,) = mip.solve(lib, max_bounds={"stats.mem": mem})
    budgets = {"stats.mem": mem, "stats.runtime": 0.97 * alone.totals["stats.runtime"]}  # both bind
    sols = mip.solve(lib, max_bounds=budgets, num_solutions=3, min_diversity=4)
    assert len(sols) == 3
    cuts = []
    for sol in sols:
        assert sol.status == "optimal"
        assert close(sol.objective, scip_reference(lib, "metrics.kl_div", budgets, cuts, 4))
        cuts.append(sol.choices)


def good_library() -> dict:
    return {
        "0": {"full": {"stats": {"mem": 10, "params": 5}, "metrics": {"kl_div": 0.0}},
              "small": {"stats": {"mem": 4, "params": 2}, "metrics": {"kl_div": 0.5}}},
        "1": {"full": {"stats": {"mem": 10, "params": 5}, "metrics": {"kl_div": 0.0}},
              "no_op": {"stats": {"mem": 0, "params": 0}, "metrics": {"kl_div": 2.0}}},
    }  # fmt: skip


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda lib: lib["1"]["no_op"].pop("stats"), r"group '1', variant 'no_op': missing 'stats'"),
        (lambda lib: lib["0"]["small"]["stats"].update(mem="4 MiB"), r"group '0', variant 'small': stats.mem = '4 MiB' is not a finite number"),
        (lambda lib: lib["0"]["small"]["metrics"].update(kl_div=float("nan")), r"variant 'small': metrics.kl_div = nan is not a finite number"),
        (lambda lib: lib["0"]["small"]["stats"].update(mem=True), r"stats.mem = True is not a finite number"),
        (lambda lib: lib["1"]["full"]["stats"].pop("mem"), r"group '1', variant 'full': has no stats.mem \(needed for 'stats.mem'\)"),
        (lambda lib: lib["1"]["full"]["metrics"].pop("kl_div"), r"group '1', variant 'full': has no metrics.kl_div"),
        (lambda lib: lib.update({"2": {}}), r"group '2' has no variants"),
        (lambda lib: lib.update({"2": ["full"]}), r"group '2': expected an object of variants, got list"),
        (lambda lib: lib["0"].update(bad=3), r"group '0', variant 'bad': expected an object with 'stats' and 'metrics', got int"),
        (lambda lib: lib["1"]["no_op"]["stats"].update(params=-1e9), r"variant 'no_op': stats.params = -1000000000.0 is negative"),
    ],
)  # fmt: skip
def test_malformed_library_raises_library_error_naming_the_problem(mutate, pattern):
    lib = good_library()
    mutate(lib)
    with pytest.raises(LibraryError, match=pattern):
        mip.solve(lib, "metrics.kl_div", max_bounds={"stats.mem": 12})


def test_library_file_errors(tmp_path):
    with pytest.raises(LibraryError, match="has no groups"):
        mip.validate_library({})
    with pytest.raises(LibraryError, match="is ambiguous"):
        mip.solve({"g": {"v": {"stats": {"x": 1}, "metrics": {"x": 1}}}}, "x")
    bad = tmp_path / "lib.json"
    bad.write_text("{not json")
    with pytest.raises(LibraryError, match="is not valid JSON"):
        mip.load_library(bad)
    with pytest.raises(LibraryError, match="cannot read library file"):
        mip.load_library(tmp_path / "missing.json")
    bad.write_text(json.dumps({"0": {"v": {"stats": {"mem": "x"}, "metrics": {}}}}))
    with pytest.raises(LibraryError, match=r"lib.json.*group '0', variant 'v': stats.mem = 'x'"):
        mip.load_library(bad)
    assert mip.load_library(write(tmp_path, good_library())) == good_library()


def write(tmp_path, lib) -> str:
    path = tmp_path / "library.json"
    path.write_text(json.dumps(lib))
    return str(path)


def test_cli_json_schema_single_and_several(tmp_path, capsys):
    path = write(tmp_path, good_library())
    assert main(["mip", "--library", path, "--objective", "metrics.kl_div", "--max", "stats.mem=14", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"status", "objective", "choices", "totals", "solve_seconds"}
    assert out["status"] == "optimal" and out["objective"] == 0.5
    assert out["choices"] == {"0": "small", "1": "full"}
    assert out["totals"] == {"stats.mem": 14.0, "stats.params": 7.0, "metrics.kl_div": 0.5}
    assert out["solve_seconds"] >= 0
    argv = ["mip", "--library", path, "--max", "stats.mem=20", "--min", "params=1", "--num-solutions", "3",
            "--min-diversity", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and len(out) == 3
    assert [s["objective"] for s in out] == [0.0, 0.5, 2.0]
    assert len({tuple(s["choices"].values()) for s in out}) == 3


def test_cli_table(tmp_path, capsys):
    path = write(tmp_path, good_library())
    assert main(["mip", "--library", path, "--max", "stats.mem=14", "--min", "stats.params=1"]) == 0
    out = capsys.readouterr().out
    assert "optimal" in out and "small" in out and "stats.mem" in out and "<= 14" in out and ">= 1" in out


def test_cli_infeasible_and_bad_arguments_exit_2(tmp_path, capsys):
    path = write(tmp_path, good_library())
    assert main(["mip", "--library", path, "--max", "stats.mem=3"]) == 2
    err = capsys.readouterr().err
    assert "error: infeasible: stats.mem <= 3 cannot be met; the smallest feasible value is 4" in err
    assert main(["mip", "--library", path, "--max", "foo"]) == 2
    assert "--max 'foo': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["mip", "--library", path, "--max", "stats.mem=lots"]) == 2
    assert "'lots' is not a number" in capsys.readouterr().err
    assert main(["mip", "--library", path, "--max", "stats.nope=3"]) == 2
    assert "has no stats.nope" in capsys.readouterr().err
    assert main(["mip", "--library", str(tmp_path / "missing.json"), "--max", "stats.mem=3"]) == 2
    assert "cannot read library file" in capsys.readouterr().err


def test_benchmark_script_runs_on_a_tiny_library(tmp_path):
    """Smoke test of benchmarks/bench_mip.py (no timing assertion: this machine's speed is not tested)."""
    pytest.importorskip("pulp")

    bench = load_benchmark("bench_mip")
    out = tmp_path / "bench.json"
    argv = ["--layers", "8", "--large-layers", "3", "--budgets", "2", "--reps", "1", "--sweep-points", "5",
            "--quiet", "--json", str(out)]  # fmt: skip
    res = bench.main(argv)
    for key in ("one_constraint", "two_constraints", "two_constraints_both_binding"):
        assert res[key]["agree"] and res[key]["ours_median_s"] > 0 and res[key]["pulp_median_s"] > 0
    assert res["pareto_sweep"]["all_optimal"] and res["pareto_sweep"]["monotone"]
    assert all(s["status"] == "optimal" for s in res["large"]["solves"])
    assert json.loads(out.read_text())["goals"] == res["goals"]
