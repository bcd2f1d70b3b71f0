"""The exact solver behind `mip.solve` and `mip.pareto_sweep`, fast on Puzzle-sized libraries.

It solves the program of `mip.py` exactly, with OR-Tools, exploiting the structure of the problem:

1. Dominance pruning. In a group, a variant that another variant beats or ties in the objective
   and in every constrained direction (smaller for a `<=` bound, larger for a `>=` bound) is
   never needed; exact duplicates are kept once. With several solutions, a variant is dropped
   only if one of its dominators was not chosen by an earlier solution (so the cuts stay exact).
2. Lagrangian bound. For multipliers `lam >= 0` of the bounds, every feasible x has
   `objective(x) >= L(lam) + sum_g rc[g, x_g]`, with `rc >= 0` the reduced costs. This holds for
   *any* `lam >= 0` and is evaluated here in float64, so the multipliers need not be exact; the
   best ones are the LP relaxation's duals. With one bound they are found exactly without an LP
   (L is concave piecewise-linear in one variable); with several, each bound alone first (if its
   LP optimum meets the others, it is optimal for all: the usual case), else GLOP by column
   generation. A variant whose rc exceeds `incumbent - L` cannot improve the incumbent.
3. Incumbent. The LP choice, repaired greedily, then improved by single and paired swaps (or,
   in a Pareto sweep, the previous point's solution).
4. Core solve. CP-SAT solves the problem restricted to variants with `rc <= delta`; groups left
   with one candidate are constants, and `sum rc <= incumbent - L` is added (valid for every
   better choice). If the restricted optimum `z` has `z - L <= min rc of the excluded variants`,
   no excluded variant can do better: `z` is proven optimal. Otherwise `delta` grows (to `z - L`,
   or by a batch of variants when the restricted problem is infeasible) and it solves again.
   When the core that proves the incumbent is large, a smaller one (a quarter of the gap) is
   searched first for a better incumbent, which shrinks the proof. The LP gap of these problems
   is small: a core of a few dozen groups remains out of thousands of variants.

CP-SAT needs integers. Each bound is scaled on its own, coefficients rounded *down* and the
right-hand side *up*: the integer problem is a relaxation of the true one (no truly feasible
choice is lost) whose solutions exceed a bound by at most ~2e-10 of the bound's magnitude
(max(|bound|, sum over groups of the largest |value|)); objective coefficients are rounded to
nearest, 1e-10 of the objective's magnitude in all. So "optimal" means: no choice meeting the
bounds exactly is better by more than ~1e-10 of the objective's magnitude. Every returned
solution is checked against the float bounds (relative tolerance FEAS_RTOL = 1e-9) and the
diversity cuts before it is returned.

`mip.solve_plain` states the same program directly, with no accelerator; the tests check the two
against each other (and against PuLP/CBC).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from .library_file import InfeasibleBudgetError, MipTimeoutError, canonical_key, scan_library

FEAS_RTOL = 1e-9  # returned totals: <= bound + FEAS_RTOL * max(|bound|, sum_g max_v |value|)
_MODEL_RTOL = 1e-10  # CP-SAT integer scaling: rounding error of a row / the objective, relative
_EPS = 1e-12  # float guard on Lagrangian comparisons, relative to their magnitude
# When the core that proves an incumbent has more than this many free groups, CP-SAT first
# searches a core cut at this fraction of the incumbent's gap (measured on Puzzle-like 80x16
# libraries with two binding budgets: about 20% less time in all).
_SEARCH_FIRST_ABOVE = 12
_SEARCH_FRACTION = 0.25

# ---------------------------------------------------------------------------------------------
# Dense arrays of one problem: G groups x V (max variants per group), padded.


@dataclass(frozen=True)
class Row:
    key: str  # canonical "stats.KEY"
    sense: str  # "max" (<=) or "min" (>=)
    bound: float


@dataclass
class _Lin:
    """min obj . x  s.t.  rows . x <= rhs, one variant per group (all rows in <= form)."""

    obj: np.ndarray  # (G, V) float64, minimization direction
    obj_scale: float
    rows: np.ndarray  # (R, G, V)
    rhs: np.ndarray  # (R,)
    row_scale: np.ndarray  # (R,) magnitude used for tolerances and integer scaling
    valid: np.ndarray  # (G, V) bool

    @property
    def num_groups(self) -> int:
        return self.obj.shape[0]

    def totals(self, x: np.ndarray) -> np.ndarray:
        g = np.arange(len(x))
        return np.array([math.fsum(r[g, x]) for r in self.rows])

    def value(self, x: np.ndarray) -> float:
        return math.fsum(self.obj[np.arange(len(x)), x])

    def feasible(self, x: np.ndarray, rtol: float = 0.0) -> bool:
        return bool(np.all(self.totals(x) <= self.rhs + rtol * self.row_scale))


def magnitude(a: np.ndarray, valid: np.ndarray) -> float:
    """sum over groups of the largest |value|: the scale of any total."""
    return float(np.where(valid, np.abs(a), 0.0).max(axis=1).sum())


class Problem:
    """The library as arrays, for one objective and one set of constrained keys."""

    def __init__(self, library: dict, objective: str, maximize: bool, rows: Sequence[Row]):
        if not isinstance(library, dict) or not library:
            scan_library(library)  # raises the LibraryError
        self.objective_key = canonical_key(library, objective)
        self.maximize = maximize
        self.rows = list(rows)
        keys = [self.objective_key] + sorted({r.key for r in self.rows} - {self.objective_key})
        columns = np.array(scan_library(library, keys), dtype=float)  # validates the whole library
        self.groups = list(library)
        self.variants = [list(library[g]) for g in self.groups]
        G, V = len(self.groups), max(len(v) for v in self.variants)
        sizes = [len(v) for v in self.variants]
        valid = np.arange(V)[None, :] < np.array(sizes)[:, None]
        raw = np.zeros((len(keys), G, V))
        raw[:, valid] = columns
        self.raw = dict(zip(keys, raw))
        self.valid = valid
        obj = -raw[0] if maximize else raw[0]
        rows_arr = np.stack([self.raw[r.key] * (1.0 if r.sense == "max" else -1.0) for r in self.rows]) if self.rows \
            else np.zeros((0, G, V))  # fmt: skip
        rhs = np.array([r.bound if r.sense == "max" else -r.bound for r in self.rows], dtype=float)
        scale = np.array([max(abs(r.bound), magnitude(self.raw[r.key], valid)) for r in self.rows], dtype=float)
        self.lin = _Lin(obj, max(magnitude(obj, valid), 1e-300), rows_arr, rhs, np.maximum(scale, 1e-300), valid)

    def choices(self, x: np.ndarray) -> dict[str, str]:
        return {g: self.variants[gi][int(v)] for gi, (g, v) in enumerate(zip(self.groups, x))}


# ---------------------------------------------------------------------------------------------
# 1. dominance pruning


def dominance(lin: _Lin) -> np.ndarray:
    """dom[g, w, u]: variant w dominates u in group g (no worse in every direction; strictly
    better somewhere, or identical with a smaller index). A strict partial order per group."""
    dims = [lin.obj, *lin.rows]
    G, V = lin.obj.shape
    dom = np.zeros((G, V, V), bool)
    tie = np.arange(V)[:, None] < np.arange(V)[None, :]
    step = max(1, int(2e6 // (V * V)))
    for s in range(0, G, step):  # chunks keep the (g, V, V) temporaries small
        le = np.ones((min(step, G - s), V, V), bool)
        eq = le.copy()
        for d in dims:
            d = d[s : s + step]
            le &= d[:, :, None] <= d[:, None, :]
            eq &= d[:, :, None] == d[:, None, :]
        dom[s : s + step] = le & (~eq | tie)
    return dom & lin.valid[:, :, None] & lin.valid[:, None, :]


def keep_mask(dom: np.ndarray, valid: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Variants that may be needed: those chosen before, and those all of whose dominators were
    chosen before (else a maximal unchosen dominator replaces it without breaking any cut)."""
    removable = (dom & ~used[:, :, None]).any(axis=1)
    return valid & (used | ~removable)


# ---------------------------------------------------------------------------------------------
# 2. Lagrangian bound from the LP relaxation


class _LagrangeLP:
    """GLOP on the LP relaxation, by column generation: it starts from the variants that minimize
    obj + lam.rows for the single-row duals and their mixes (or trial multipliers), prices every
    candidate with the duals and adds the improving ones until none is left (usually one round;
    a few hundred columns instead of all). Kept to re-solve warm with other right-hand sides."""

    def __init__(self, lin: _Lin, cand: np.ndarray, seeds: Sequence[np.ndarray] = ()):
        self.lin, self.cand = lin, cand
        self.solver = s = pywraplp.Solver.CreateSolver("GLOP")
        inf = s.infinity()
        self.cons = [s.Constraint(-inf, float(b)) for b in lin.rhs]
        self.groups = [s.Constraint(1.0, 1.0) for _ in range(lin.num_groups)]
        self.obj = s.Objective()
        self.obj.SetMinimization()
        self.added = np.zeros_like(cand)
        gi = np.arange(lin.num_groups)
        start = np.zeros_like(cand)
        start[gi, np.argmin(np.where(cand, lin.obj, np.inf), axis=1)] = True
        for k in range(len(lin.rhs)):
            start[gi, np.argmin(np.where(cand, lin.rows[k], np.inf), axis=1)] = True
        if not len(seeds):  # multipliers of the right order of magnitude for each row
            seeds = [np.eye(len(lin.rhs))[k] * lin.obj_scale / lin.row_scale[k] * t
                     for k in range(len(lin.rhs)) for t in (1 / 16, 1 / 2, 4.0)]  # fmt: skip
        else:  # the single-row duals and their mixes: the LP optimum lies among them
            total = np.sum(seeds, axis=0)
            seeds = [*seeds, *(total * t for t in (0.25, 0.5, 0.75, 1.0))]
        for lam in seeds:
            start[gi, np.argmin(np.where(cand, lin.obj + np.tensordot(lam, lin.rows, axes=1), np.inf), axis=1)] = True
        self._add(start)

    def _add(self, mask: np.ndarray) -> None:
        new = mask & self.cand & ~self.added
        self.added |= new
        gs, vs = np.nonzero(new)
        coefs = self.lin.rows[:, gs, vs].T.tolist()
        for g, c, col in zip(gs.tolist(), self.lin.obj[gs, vs].tolist(), coefs):
            var = self.solver.NumVar(0.0, 1.0, "")
            self.groups[g].SetCoefficient(var, 1.0)
            self.obj.SetCoefficient(var, c)
            for ct, a in zip(self.cons, col):
                if a != 0.0:
                    ct.SetCoefficient(var, a)

    def duals(self, rhs: np.ndarray) -> np.ndarray | None:
        lin = self.lin
        for c, b in zip(self.cons, rhs):
            c.SetUb(float(b))
        lam = None
        for _ in range(12):
            if self.solver.Solve() != pywraplp.Solver.OPTIMAL:
                if self.added.sum() == self.cand.sum():
                    return None  # the LP relaxation itself is infeasible
                self._add(self.cand)  # the restricted one was: use every column
                continue
            # a <= row of a minimization has a dual <= 0; lam = -dual, clipped (any lam >= 0 is valid)
            lam = np.maximum(0.0, -np.array([c.dual_value() for c in self.cons]))
            mu = np.array([c.dual_value() for c in self.groups])
            val = np.where(self.cand, lin.obj + np.tensordot(lam, lin.rows, axes=1), np.inf)
            best = np.argmin(val, axis=1)
            gi = np.arange(lin.num_groups)
            price = val[gi, best] - mu
            improving = (price < -1e-9 * (np.abs(mu) + lin.obj_scale / lin.num_groups)) & ~self.added[gi, best]
            if not improving.any():
                break
            mask = np.zeros_like(self.cand)
            mask[gi[improving], best[improving]] = True
            self._add(mask)
        return lam


def _dual_row(lin: _Lin, cand: np.ndarray, k: int) -> tuple[float, np.ndarray] | None:
    """The LP relaxation with row k alone. Its dual is the maximizer of the concave piecewise-
    linear L(lam) = sum_g min_v (obj + lam row_k) - lam rhs_k, found exactly without an LP:
    bracket it, then intersect the supporting lines at both ends until the slopes change sign
    (a few steps). Returns lam and the row totals of an optimal LP point, or None when row k
    cannot be met."""
    gs, vs = np.nonzero(cand)
    o, a = lin.obj[gs, vs], lin.rows[k, gs, vs]
    starts = np.searchsorted(gs, np.arange(lin.num_groups))
    b = lin.rhs[k]
    if np.minimum.reduceat(a, starts).sum() > b:
        return None

    def at(lam: float, point: bool = False):  # L(lam), right and left derivatives
        val = o + lam * a
        m = np.minimum.reduceat(val, starts)
        tied = val <= (m + 1e-12 * np.abs(m))[gs]
        cheap = np.minimum.reduceat(np.where(tied, a, np.inf), starts)
        dear = np.maximum.reduceat(np.where(tied, a, -np.inf), starts)
        if point:  # an optimal LP point: the cheapest and the dearest tied choices, mixed to meet the row
            one_per_group = lambda idx: idx[np.unique(gs[idx], return_index=True)[1]]  # noqa: E731
            xr = one_per_group(np.nonzero(tied & (a == cheap[gs]))[0])
            xl = one_per_group(np.nonzero(tied & (a == dear[gs]))[0])
            tr, tl = lin.rows[:, gs[xr], vs[xr]].sum(axis=1), lin.rows[:, gs[xl], vs[xl]].sum(axis=1)
            span = tl[k] - tr[k]
            t = 0.0 if lam == 0.0 or span <= 0 else min(1.0, max(0.0, (b - tr[k]) / span))
            return t * tl + (1 - t) * tr
        return math.fsum(m) - lam * b, float(cheap.sum() - b), float(dear.sum() - b)

    lam = _maximize_dual(at, lin.obj_scale / lin.row_scale[k])
    return None if lam is None else (lam, at(lam, point=True))


def _maximize_dual(at, scale: float) -> float | None:
    """argmax over lam >= 0 of a concave piecewise-linear function, given `at(lam)` -> (value,
    right derivative, left derivative) and the scale of lam; None if it increases forever."""
    vlo, rlo, _ = at(0.0)
    if rlo <= 0:
        return 0.0
    lo, hi = 0.0, scale
    while True:
        vhi, rhi, lhi = at(hi)
        if rhi <= 0:
            break
        lo, vlo, rlo, hi = hi, vhi, rhi, hi * 16
        if hi > 1e300:
            return None
    for _ in range(200):
        if lhi >= 0:
            return hi
        x = (vhi - vlo + rlo * lo - lhi * hi) / (rlo - lhi)  # where the two supporting lines meet
        if not lo < x < hi:
            x = 0.5 * (lo + hi)
            if not lo < x < hi:
                break
        vx, rx, lx = at(x)
        if rx <= 0 <= lx:
            return x
        if rx > 0:
            lo, vlo, rlo = x, vx, rx
        else:
            hi, vhi, lhi = x, vx, lx
    return hi if vhi >= vlo else lo


def duals(lin: _Lin, cand: np.ndarray, lp_cache: dict | None = None) -> np.ndarray | None:
    """Lagrange multipliers of the rows (optimal LP duals). Each row alone is solved exactly
    first; if its LP optimum meets the other rows too, it is optimal for all of them (the usual
    case: one budget binds). Otherwise GLOP. None when the LP relaxation is infeasible."""
    R = len(lin.rhs)
    seeds = []
    for k in range(R):
        res = _dual_row(lin, cand, k)
        if res is None:
            return None
        lam, totals = res
        seeds.append(np.eye(R)[k] * lam)
        if np.all(totals <= lin.rhs + 1e-12 * lin.row_scale):
            return seeds[-1]
    if R == 0:
        return np.zeros(0)
    cache = {} if lp_cache is None else lp_cache  # a sweep keeps the GLOP model to re-solve warm
    if "lp" not in cache:
        cache["lp"] = _LagrangeLP(lin, cand, seeds)
    return cache["lp"].duals(lin.rhs)


@dataclass
class _Bound:
    L: float  # Lagrangian lower bound on the objective of any (exactly) feasible choice
    rc: np.ndarray  # (G, V) reduced costs >= 0, +inf off the candidates
    eta: float  # float-noise guard for comparisons against L and rc


def _lagrange(lin: _Lin, cand: np.ndarray, lam: np.ndarray) -> _Bound:
    val = lin.obj + np.tensordot(lam, lin.rows, axes=1) if len(lam) else lin.obj.copy()
    val = np.where(cand, val, np.inf)
    mins = val.min(axis=1)
    rc = val - mins[:, None]
    L = math.fsum(mins) - math.fsum(lam * lin.rhs)
    mag = float(np.abs(mins).sum() + np.abs(lam * lin.rhs).sum()) + lin.obj_scale
    return _Bound(L, rc, _EPS * mag)


# ---------------------------------------------------------------------------------------------
# 3. incumbent


def _greedy(lin: _Lin, cand: np.ndarray, rc: np.ndarray) -> np.ndarray | None:
    """LP-guided start: every group at a zero reduced cost variant; violated rows repaired by the
    swap with the least reduced cost added per unit of (scaled) violation removed; then swaps
    that lower the objective and keep every row satisfied, while there are any."""
    G = lin.num_groups
    gi = np.arange(G)
    x = np.argmin(rc, axis=1)
    if not len(lin.rhs):
        return x
    tot = lin.rows[:, gi, x].sum(axis=1)
    scale = lin.row_scale[:, None, None]
    rhs = lin.rhs[:, None, None]
    for _ in range(2 * G + 10):
        viol = np.maximum(tot - lin.rhs, 0.0)
        if not viol.any():
            break
        delta = lin.rows - lin.rows[:, gi, x][:, :, None]
        gain = (viol / lin.row_scale).sum() - (np.maximum(tot[:, None, None] + delta - rhs, 0.0) / scale).sum(axis=0)
        ok = cand & (gain > 1e-15)
        if not ok.any():
            return None
        score = np.where(ok, (rc - rc[gi, x][:, None]) / np.where(ok, gain, 1.0), np.inf)
        g, v = np.unravel_index(np.argmin(score), score.shape)
        x[g] = v
        tot = tot + delta[:, g, v]
    else:
        return None
    for _ in range(G):
        delta = lin.rows - lin.rows[:, gi, x][:, :, None]
        ok = cand & (tot[:, None, None] + delta <= rhs).all(axis=0)
        better = np.where(ok, lin.obj - lin.obj[gi, x][:, None], 0.0)
        g, v = np.unravel_index(np.argmin(better), better.shape)
        if not better[g, v] < 0:
            break
        x[g] = v
        tot = tot + delta[:, g, v]
    return x


def _diverse_start(lin: _Lin, cand: np.ndarray, cuts: Sequence[np.ndarray], min_diversity: int) -> np.ndarray | None:
    """Start for the next diverse solution: the last solution, changed group by group (the change
    that costs least objective among those that keep every row satisfied) until it differs from
    every earlier solution in at least `min_diversity` groups. None if it gets stuck."""
    G = lin.num_groups
    gi = np.arange(G)
    x = cuts[-1].copy()
    tot = lin.rows[:, gi, x].sum(axis=1)
    C = np.array(cuts)  # (K, G)
    limit = G - min_diversity
    for _ in range(G * len(cuts)):
        overlap = (C == x).sum(axis=1)
        if np.all(overlap <= limit):
            return x
        # excess overlap with the cuts after moving group g to variant v
        now = (C == x)[:, :, None]  # (K, G, 1)
        after = C[:, :, None] == np.arange(lin.obj.shape[1])[None, None, :]  # (K, G, V)
        new_overlap = overlap[:, None, None] - now + after
        gain = np.maximum(overlap - limit, 0).sum() - np.maximum(new_overlap - limit, 0).sum(axis=0)
        delta = lin.rows - lin.rows[:, gi, x][:, :, None]
        ok = cand & (gain > 0) & (tot[:, None, None] + delta <= lin.rhs[:, None, None]).all(axis=0)
        if not ok.any():
            return None
        cost = np.where(ok, lin.obj - lin.obj[gi, x][:, None], np.inf)
        g, v = np.unravel_index(np.argmin(cost), cost.shape)
        x[g] = v
        tot = tot + delta[:, g, v]
    return None


def _local_search(lin: _Lin, cand: np.ndarray, bnd: _Bound, x: np.ndarray, rounds: int = 100) -> np.ndarray:
    """Improve a feasible choice by the best single or paired swap that keeps every row
    satisfied. Only variants that can appear in a better choice (rc <= incumbent - L) are moved
    to, so this is cheap; a better incumbent shrinks the core that CP-SAT must prove."""
    gi = np.arange(lin.num_groups)
    x = x.copy()
    tot = lin.rows[:, gi, x].sum(axis=1)
    z = lin.value(x)
    for _ in range(rounds):
        moves = cand & (bnd.rc <= z - bnd.L + bnd.eta)
        moves[gi, x] = False
        mg, mv = np.nonzero(moves)
        if len(mg) > 1000:  # keep the pair table small: the most promising moves
            keep = np.argsort(bnd.rc[mg, mv], kind="stable")[:1000]
            mg, mv = mg[keep], mv[keep]
        if len(mg) == 0:
            break
        dobj = lin.obj[mg, mv] - lin.obj[mg, x[mg]]
        da = lin.rows[:, mg, mv] - lin.rows[:, mg, x[mg]]
        slack = lin.rhs - tot
        single = np.where((da <= slack[:, None]).all(axis=0), dobj, np.inf)
        pair = dobj[:, None] + dobj[None, :]
        pair[mg[:, None] == mg[None, :]] = np.inf
        for r in range(len(slack)):
            pair[da[r][:, None] + da[r][None, :] > slack[r]] = np.inf
        i = int(np.argmin(single))
        j, k = np.unravel_index(np.argmin(pair), pair.shape)
        if min(single[i], pair[j, k]) >= 0:
            break
        picks = [i] if single[i] <= pair[j, k] else [j, k]
        for m in picks:
            x[mg[m]] = mv[m]
            tot = tot + da[:, m]
        z = lin.value(x)
    return x


# ---------------------------------------------------------------------------------------------
# 4. CP-SAT on the core


def satisfies_cuts(x: np.ndarray, cuts: Sequence[np.ndarray], min_diversity: int) -> bool:
    return all(int((x == c).sum()) <= len(x) - min_diversity for c in cuts)


def _solve_restricted(
    lin: _Lin,
    restrict: np.ndarray,
    cuts: Sequence[np.ndarray],
    min_diversity: int,
    deadline: float,
    workers: int | None,
    hint: np.ndarray | None,
    rc_cut: tuple[np.ndarray, float] | None = None,
) -> tuple[str, np.ndarray | None]:
    """CP-SAT over the variants in `restrict` (relaxed integer scaling, see the module doc).
    `rc_cut=(rc, delta)` adds `sum rc <= delta`, which every choice at least as good as an
    incumbent meets when delta = incumbent - L (it only helps propagation).
    Returns (status, x) with status "optimal" | "feasible" | "infeasible" | "unknown"."""
    G = lin.num_groups
    counts = restrict.sum(axis=1)
    first = np.argmax(restrict, axis=1)
    free = np.nonzero(counts > 1)[0]
    fixed = np.nonzero(counts == 1)[0]
    R = len(lin.rhs)
    if len(free) == 0:
        ok = lin.feasible(first, 2 * _MODEL_RTOL) and satisfies_cuts(first, cuts, min_diversity)
        return ("optimal", first) if ok else ("infeasible", None)

    fg, fv = np.nonzero(restrict[free])  # fg indexes `free`
    gs, vs = free[fg], fv
    nf, n = len(free), len(gs)
    bounds = np.searchsorted(fg, np.arange(nf + 1))
    gmin = lambda arr: np.minimum.reduceat(arr, bounds[:-1])  # noqa: E731  per free group
    gmax = lambda arr: np.maximum.reduceat(arr, bounds[:-1])  # noqa: E731
    # the CpModelProto is written directly (several times faster than one Python call per literal)
    model = cp_model.CpModel()
    proto = model.proto
    for _ in range(n):
        proto.variables.add().domain.extend((0, 1))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        proto.constraints.add().exactly_one.literals.extend(range(a, b))
    everyone = range(n)

    def add_linear(coef: np.ndarray, ub: int, vars_=everyone) -> None:
        lin_ct = proto.constraints.add().linear
        lin_ct.vars.extend(vars_)
        lin_ct.coeffs.extend(coef.astype(np.int64).tolist())
        lin_ct.domain.extend((0, ub))

    for r in range(R):  # coefficients >= 0 after shifting by the group minimum
        a = lin.rows[r, gs, vs]
        m = gmin(a)
        s = nf / (_MODEL_RTOL * lin.row_scale[r])
        coef = np.floor((a - m[fg]) * s)
        b = lin.rhs[r] - math.fsum(lin.rows[r, fixed, first[fixed]]) - math.fsum(m)
        rhs_int = math.floor(b * s) + 1
        if rhs_int < 0:
            return "infeasible", None
        if rhs_int < gmax(coef).sum():  # else it cannot bind inside this core
            add_linear(coef, rhs_int)

    if rc_cut is not None:  # floor the weights, round the bound up: never cuts a valid choice
        rc, dlt = rc_cut
        w = rc[gs, vs]
        m = gmin(w)
        s = 1e6 * nf / max(dlt, 1e-300)
        b = dlt - math.fsum(rc[fixed, first[fixed]]) - math.fsum(m)
        coef = np.floor((w - m[fg]) * s)
        if b >= 0 and math.floor(b * s) + 1 < gmax(coef).sum():
            add_linear(coef, math.floor(b * s) + 1)

    o = lin.obj[gs, vs]
    so = nf / (_MODEL_RTOL * lin.obj_scale)
    proto.objective.vars.extend(everyone)
    proto.objective.coeffs.extend(np.rint((o - gmin(o)[fg]) * so).astype(np.int64).tolist())

    for c in cuts:
        limit = G - min_diversity - int((first[fixed] == c[fixed]).sum())
        sel = np.nonzero(c[gs] == vs)[0]
        if limit < 0:
            return "infeasible", None
        if len(sel) > limit:
            add_linear(np.ones(len(sel)), limit, sel.tolist())

    if hint is not None:
        proto.solution_hint.vars.extend(everyone)
        proto.solution_hint.values.extend((hint[gs] == vs).astype(np.int64).tolist())
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = workers or (1 if n < 3000 else min(4, os.cpu_count() or 1))
    p.max_time_in_seconds = max(0.01, deadline - time.perf_counter())
    # Measured on Puzzle-like cores (20-70 free groups): CP-SAT's cut generators and probing
    # cost more than they save on these tiny knapsack models (3x faster without them).
    p.add_cg_cuts = p.add_mir_cuts = p.add_zero_half_cuts = p.add_clique_cuts = False
    p.cp_model_probing_level = 0
    st = solver.solve(model)
    if st == cp_model.INFEASIBLE:
        return "infeasible", None
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return "unknown", None
    x = first.copy()
    vals = np.array(solver.response_proto.solution[:n], dtype=bool)
    x[gs[vals]] = vs[vals]
    return ("optimal" if st == cp_model.OPTIMAL else "feasible"), x


def solve_core(
    lin: _Lin,
    cand: np.ndarray,
    *,
    lam: np.ndarray | None,
    cuts: Sequence[np.ndarray] = (),
    min_diversity: int = 1,
    deadline: float,
    incumbents: Sequence[np.ndarray] = (),
    workers: int | None = None,
) -> tuple[str, np.ndarray] | None:
    """Exact solve (steps 2-4 of the module doc) over the candidates. Returns (status, x) with
    x[g] the chosen variant index of group g, or None when no choice is feasible."""
    G = lin.num_groups
    if lam is None:  # LP failed or infeasible: a single solve over every candidate decides
        bnd = _lagrange(lin, cand, np.zeros(len(lin.rhs)))
        delta = math.inf
    else:
        bnd = _lagrange(lin, cand, lam)
        delta = bnd.eta
    best = None
    starts = list(incumbents)
    if lam is not None:
        starts.append(_greedy(lin, cand, bnd.rc))
    if cuts:
        starts.append(_diverse_start(lin, cand, cuts, min_diversity))
    for x in starts:
        if x is not None and cand[np.arange(G), x].all() and lin.feasible(x) and satisfies_cuts(x, cuts, min_diversity):
            z = lin.value(x)
            if best is None or z < best[0]:
                best = (z, x)
    if best is not None and lam is not None and not cuts:
        x = _local_search(lin, cand, bnd, best[1])
        if lin.feasible(x) and lin.value(x) < best[0]:
            best = (lin.value(x), x)
    proof_delta = math.inf
    if best is not None:
        proof_delta = max(delta, best[0] - bnd.L + 2 * bnd.eta)  # holds every better choice
        delta = proof_delta
        if ((cand & (bnd.rc <= proof_delta)).sum(axis=1) > 1).sum() > _SEARCH_FIRST_ABOVE:
            # a big core is costly to prove: first look for a better incumbent in a smaller one
            delta = max(bnd.eta, _SEARCH_FRACTION * (best[0] - bnd.L))

    while True:
        restrict = cand & (bnd.rc <= delta)
        excluded = bnd.rc[cand & ~restrict]
        rc_cut = None if best is None else (bnd.rc, best[0] - bnd.L + bnd.eta)
        status, x = _solve_restricted(lin, restrict, cuts, min_diversity, deadline, workers,
                                      None if best is None else best[1], rc_cut)  # fmt: skip
        if status == "infeasible":
            if excluded.size == 0:
                return None
            if delta < proof_delta:  # the smaller core had nothing better: prove the incumbent
                delta = proof_delta
                continue
            excluded.sort()
            n_add = max(G, int(restrict.sum()) // 2)
            delta = max(delta, excluded[min(n_add, excluded.size) - 1] + bnd.eta)
            continue
        if status == "unknown":
            if best is None:
                raise MipTimeoutError("no feasible choice found before the time limit; raise time_limit_s")
            return "feasible", best[1]
        z = lin.value(x)
        if best is None or z <= best[0]:
            best = (z, x)
        if status == "optimal" and (excluded.size == 0 or z - bnd.L + bnd.eta <= excluded.min()):
            return "optimal", x
        if status == "feasible" or time.perf_counter() >= deadline:
            return "feasible", best[1]
        delta = max(z - bnd.L + 2 * bnd.eta, np.nextafter(delta, math.inf))
        proof_delta = min(proof_delta, delta)


# ---------------------------------------------------------------------------------------------
# infeasibility: which bound binds, and how far it can go


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _infeasible_error(row: Row, value: float | None, others: bool, proven: bool = True) -> InfeasibleBudgetError:
    op, word = ("<=", "smallest") if row.sense == "max" else (">=", "largest")
    msg = f"infeasible: {row.key} {op} {_fmt(row.bound)} cannot be met"
    if value is not None:
        msg += f"; the {word} feasible value is {_fmt(value)}" if proven else f"; the {word} value found is {_fmt(value)}"
        if others:
            msg += " (given the other constraints)"
    return InfeasibleBudgetError(msg, key=row.key, sense=row.sense, bound=row.bound, best_value=value)


def diagnose(prob: Problem, cand: np.ndarray, ids: list[int], deadline: float) -> InfeasibleBudgetError:
    lin = prob.lin
    sign = lambda r: 1.0 if prob.rows[r].sense == "max" else -1.0  # noqa: E731
    for r in ids:  # a bound that no choice meets even alone: the sum of per-group best values
        lo = math.fsum(np.where(cand, lin.rows[r], np.inf).min(axis=1))
        if lo > lin.rhs[r] + FEAS_RTOL * lin.row_scale[r]:
            return _infeasible_error(prob.rows[r], sign(r) * lo, others=False)
    if len(ids) > 1:
        for r in ids:  # best value of row r subject to the others
            rest = [o for o in ids if o != r]
            sub = _Lin(lin.rows[r], lin.row_scale[r], lin.rows[rest], lin.rhs[rest], lin.row_scale[rest], lin.valid)
            lam = duals(sub, cand)
            res = solve_core(sub, cand, lam=lam, deadline=deadline)
            if res is None:
                continue
            best = sub.value(res[1])
            if best > lin.rhs[r] + FEAS_RTOL * lin.row_scale[r]:
                return _infeasible_error(prob.rows[r], sign(r) * best, others=True, proven=res[0] == "optimal")
        return diagnose(prob, cand, ids[:-1], deadline)  # the others of the last one already conflict
    return _infeasible_error(prob.rows[ids[0]], None, others=False)
