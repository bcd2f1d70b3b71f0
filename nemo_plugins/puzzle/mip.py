"""Puzzle's mixed-integer program (arXiv 2411.19146, section 3.3): pick one variant per group.

    minimize (or maximize)  sum_g objective[g, x_g]
    subject to              sum_g stats.KEY[g, x_g] <= max_bounds[KEY]     (any number of these)
                            sum_g stats.KEY[g, x_g] >= min_bounds[KEY]     (and of these)

`library` is the plain dict of `library_file.py`: {group: {variant: {"stats": {...}, "metrics": {...}}}}.
Several solutions: after each one the diversity cut `sum of its chosen x <= num_groups - min_diversity`
is added, so solution k differs from every earlier one in at least `min_diversity` groups.

`solve` and `pareto_sweep` find the optimum exactly and fast (`mip_solver.py`: dominance pruning,
a Lagrangian bound, CP-SAT on the few groups the bound leaves open). `solve_plain` is the program
above written directly as a MIP (binary x[g, v], one per group, the bounds as linear rows) for
SCIP: the formulation to read, and the reference the fast path is tested against.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from ortools.linear_solver import pywraplp

from .library_file import (
    InfeasibleBudgetError, LibraryError, MipError, MipTimeoutError, canonical_key, load_library, validate_library,
)  # fmt: skip
from .mip_solver import (
    FEAS_RTOL, Problem, Row, diagnose, dominance, duals, keep_mask, magnitude, satisfies_cuts, solve_core,
)  # fmt: skip

__all__ = [
    "FEAS_RTOL",
    "InfeasibleBudgetError",
    "LibraryError",
    "MipError",
    "MipTimeoutError",
    "Solution",
    "load_library",
    "pareto_sweep",
    "solve",
    "solve_plain",
    "validate_library",
]


@dataclass
class Solution:
    status: str  # "optimal" when proven, "feasible" otherwise (time limit)
    objective: float
    choices: dict[str, str]  # {group: variant}
    totals: dict[str, float]  # {"stats.KEY" | "metrics.KEY": sum over groups}
    solve_seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def _bound_rows(library: dict, max_bounds: Mapping | None, min_bounds: Mapping | None) -> list[Row]:
    rows = []
    for sense, bounds in (("max", max_bounds or {}), ("min", min_bounds or {})):
        for key, bound in bounds.items():
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise MipError(f"{sense} bound for {key!r} is {bound!r}: expected a finite number")
            rows.append(Row(canonical_key(library, key), sense, float(bound)))
    return rows


# ---------------------------------------------------------------------------------------------
# public API


def _solution_of(library: dict, choices: dict[str, str], objective_key: str, status: str, seconds: float) -> Solution:
    """The Solution of `choices`: its objective and the totals of every key all variants share."""
    chosen = [library[g][v] for g, v in choices.items()]
    totals: dict[str, float] = {}
    for section in ("stats", "metrics"):
        common = set(chosen[0][section]).intersection(*(e[section] for e in chosen[1:]))
        for k in sorted(common, key=list(chosen[0][section]).index):
            totals[f"{section}.{k}"] = math.fsum(e[section][k] for e in chosen)
    objective = math.fsum(_entry_value(e, objective_key) for e in chosen)
    return Solution(status, objective, choices, totals, seconds)


def _solution(prob: Problem, library: dict, status: str, x: np.ndarray, seconds: float) -> Solution:
    """`_solution_of` the fast path's choice, whose bounds are checked again in float arithmetic."""
    sol = _solution_of(library, prob.choices(x), prob.objective_key, status, seconds)
    for row, scale in zip(prob.rows, prob.lin.row_scale):
        total = math.fsum(_entry_value(library[g][v], row.key) for g, v in sol.choices.items())
        slack = row.bound - total if row.sense == "max" else total - row.bound
        if slack < -FEAS_RTOL * scale:
            raise AssertionError(f"internal error: solution violates {row.key} ({row.sense} {row.bound}): {total}")
    return sol


def _entry_value(entry: dict, key: str) -> float:
    section, name = key.split(".", 1)
    return entry[section][name]


def solve_plain(
    library: dict | str | os.PathLike,
    objective: str = "metrics.kl_div",
    *,
    maximize: bool = False,
    max_bounds: Mapping[str, float] | None = None,
    min_bounds: Mapping[str, float] | None = None,
    num_solutions: int = 1,
    min_diversity: int = 1,
    time_limit_s: float = 60.0,
) -> list[Solution]:
    """What `solve` returns, from the program as the module docstring writes it: a binary x[g, v]
    per variant, one per group, each bound a linear row, each earlier solution a diversity cut,
    solved by SCIP to a zero gap. No pruning, no bound, no core: slower on big libraries, but
    each line is a line of the formulation. An infeasible budget raises InfeasibleBudgetError
    without `solve`'s diagnosis of which bound binds."""
    deadline = time.perf_counter() + time_limit_s
    if isinstance(library, (str, os.PathLike)):
        library = load_library(library)
    rows = _bound_rows(library, max_bounds, min_bounds) if isinstance(library, dict) and library else []
    objective = canonical_key(library, objective) if isinstance(library, dict) and library else objective
    validate_library(library, [objective, *(r.key for r in rows)])
    _check_args(num_solutions, min_diversity, len(library), time_limit_s)

    solver = pywraplp.Solver.CreateSolver("SCIP")
    solver.SetSolverSpecificParametersAsString("limits/gap = 0\nlimits/absgap = 0\nnumerics/feastol = 1e-9\n")
    x = {(g, v): solver.BoolVar(f"x[{g}][{v}]") for g, variants in library.items() for v in variants}
    for g, variants in library.items():  # exactly one variant per group
        solver.Add(sum(x[g, v] for v in variants) == 1)
    for row in rows:  # sum_g stats.KEY[g, x_g] <= (or >=) the bound
        total = sum(_entry_value(library[g][v], row.key) * var for (g, v), var in x.items())
        solver.Add(total <= row.bound if row.sense == "max" else total >= row.bound)
    score = sum(_entry_value(library[g][v], objective) * var for (g, v), var in x.items())
    solver.Maximize(score) if maximize else solver.Minimize(score)

    solutions: list[Solution] = []
    for k in range(num_solutions):
        t0 = time.perf_counter()
        solver.SetTimeLimit(max(1, int((deadline - t0) * 1000)))
        status = solver.Solve()
        if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            if k == 0 and status == pywraplp.Solver.INFEASIBLE:
                raise InfeasibleBudgetError("infeasible: no choice of one variant per group meets the bounds",
                                            key="", sense="max", bound=math.nan, best_value=None)  # fmt: skip
            if k == 0:
                raise MipTimeoutError("no feasible choice found before the time limit; raise time_limit_s")
            break  # fewer than num_solutions choices differ enough from the earlier ones
        choices = {g: next(v for v in variants if x[g, v].solution_value() > 0.5) for g, variants in library.items()}
        kind = "optimal" if status == pywraplp.Solver.OPTIMAL else "feasible"
        solutions.append(_solution_of(library, choices, objective, kind, time.perf_counter() - t0))
        solver.Add(sum(x[g, v] for g, v in choices.items()) <= len(library) - min_diversity)  # diversity cut
    return solutions


def _check_args(num_solutions: int, min_diversity: int, num_groups: int, time_limit_s: float) -> None:
    if not isinstance(num_solutions, int) or num_solutions < 1:
        raise MipError(f"num_solutions={num_solutions!r}: expected an integer >= 1")
    if not isinstance(min_diversity, int) or not 1 <= min_diversity <= num_groups:
        raise MipError(f"min_diversity={min_diversity!r}: expected an integer in [1, {num_groups}] (the number of groups)")
    if not time_limit_s > 0:
        raise MipError(f"time_limit_s={time_limit_s!r}: expected a positive number of seconds")


def solve(
    library: dict | str | os.PathLike,
    objective: str = "metrics.kl_div",
    *,
    maximize: bool = False,
    max_bounds: Mapping[str, float] | None = None,
    min_bounds: Mapping[str, float] | None = None,
    num_solutions: int = 1,
    min_diversity: int = 1,
    time_limit_s: float = 60.0,
    prune: bool = True,
    threads: int | None = None,
) -> list[Solution]:
    """Best choice of one variant per group of `library` (a dict, or the path of a library JSON
    file); with `num_solutions` > 1, the next best ones that differ
    from every earlier solution in at least `min_diversity` groups (fewer are returned when no more
    exist). `time_limit_s` bounds the whole call; a solution not proven optimal by then is returned
    with status "feasible". `prune=False` disables dominance pruning (for testing); `threads` sets
    CP-SAT's workers (default: 1 for the small core models, which is fastest).

    Raises LibraryError (malformed library), InfeasibleBudgetError (no choice meets the bounds; the
    message names the binding bound and the best value it can take), MipTimeoutError.
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    if isinstance(library, (str, os.PathLike)):
        library = load_library(library)
    rows = _bound_rows(library, max_bounds, min_bounds) if isinstance(library, dict) and library else []
    prob = Problem(library, objective, maximize, rows)  # validates the library
    _check_args(num_solutions, min_diversity, len(prob.groups), time_limit_s)
    lin = prob.lin
    dom = dominance(lin) if prune else None
    used = np.zeros_like(lin.valid)
    cand = keep_mask(dom, lin.valid, used) if prune else lin.valid
    lam = duals(lin, cand)
    solutions: list[Solution] = []
    cuts: list[np.ndarray] = []
    start = t0
    for k in range(num_solutions):
        res = solve_core(lin, cand, lam=lam, cuts=cuts, min_diversity=min_diversity, deadline=deadline, workers=threads)
        if res is None:
            if k == 0:
                raise diagnose(prob, cand, list(range(len(rows))), deadline)
            break
        status, x = res
        if not satisfies_cuts(x, cuts, min_diversity):
            raise AssertionError("internal error: solution breaks a diversity cut")
        now = time.perf_counter()
        solutions.append(_solution(prob, library, status, x, now - start))
        start = now
        cuts.append(x)
        used[np.arange(len(x)), x] = True
        if prune:
            cand = keep_mask(dom, lin.valid, used)
        if time.perf_counter() >= deadline:
            break
    return solutions


def pareto_sweep(
    library: dict | str | os.PathLike,
    objective: str,
    budget_key: str,
    budgets: Sequence[float],
    *,
    maximize: bool = False,
    max_bounds: Mapping[str, float] | None = None,
    min_bounds: Mapping[str, float] | None = None,
    budget_sense: str = "max",
    time_limit_s: float = 60.0,
    prune: bool = True,
    threads: int | None = None,
) -> list[Solution | None]:
    """The optimum for each budget on `budget_key` (a max bound, or a min bound with
    `budget_sense="min"`), the other bounds fixed; None where a budget is infeasible. The
    library is compiled and pruned once; the LP is re-solved warm; each point starts from the
    previous (tighter) point's solution, which is feasible for it. `time_limit_s` is per point."""
    if budget_sense not in ("max", "min"):
        raise MipError(f"budget_sense={budget_sense!r}: expected 'max' or 'min'")
    if isinstance(library, (str, os.PathLike)):
        library = load_library(library)
    budgets = [float(b) for b in budgets]
    if not budgets:
        return []
    bkey = canonical_key(library, budget_key) if isinstance(library, dict) and library else budget_key
    fixed = {"max": dict(max_bounds or {}), "min": dict(min_bounds or {})}
    fixed[budget_sense] = {k: v for k, v in fixed[budget_sense].items() if canonical_key(library, k) != bkey}
    rows = _bound_rows(library, fixed["max"], fixed["min"])
    rows.append(Row(bkey, budget_sense, budgets[0]))
    for b in budgets:
        if not math.isfinite(b):
            raise MipError(f"budget {b!r}: expected a finite number")
    prob = Problem(library, objective, maximize, rows)
    lin = prob.lin
    cand = keep_mask(dominance(lin), lin.valid, np.zeros_like(lin.valid)) if prune else lin.valid
    lp_cache: dict = {}
    sign = 1.0 if budget_sense == "max" else -1.0
    results: list[Solution | None] = [None] * len(budgets)
    prev = None
    for i in sorted(range(len(budgets)), key=lambda i: sign * budgets[i]):  # tightest first
        t0 = time.perf_counter()
        row = Row(bkey, budget_sense, budgets[i])
        prob.rows[-1] = row
        lin.rhs[-1] = sign * budgets[i]
        lin.row_scale[-1] = max(abs(budgets[i]), magnitude(prob.raw[bkey], lin.valid), 1e-300)
        lo = np.where(cand, lin.rows[-1], np.inf).min(axis=1).sum()
        if lo > lin.rhs[-1] + FEAS_RTOL * lin.row_scale[-1]:
            continue
        res = solve_core(lin, cand, lam=duals(lin, cand, lp_cache), deadline=t0 + time_limit_s,
                    incumbents=[] if prev is None else [prev], workers=threads)  # fmt: skip
        if res is None:
            continue
        prev = res[1]
        results[i] = _solution(prob, library, res[0], res[1], time.perf_counter() - t0)
    return results
