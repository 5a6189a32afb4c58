"""Multiple-choice knapsack (MCKP) for mixed-precision allocation.

Choosing one precision per node (each with a cost such as bytes, bit-ops or ms, and an additive predicted loss) so
that total loss is minimal under a total-cost budget is exactly a multiple-choice knapsack. The greedy promotion that
peer toolchains use (upgrade whichever node gives the best loss-drop per cost) is not optimal: one cheap, efficient
upgrade can use up the slack that a single more valuable upgrade needed. `solve_exact` solves it by dynamic
programming instead; `solve_greedy` is kept as the baseline to compare against.

Discretisation: each group's cheapest cost is subtracted first, so the DP only spans the extra cost. Extra costs are
divided by a unit and rounded UP, so whatever the DP picks also fits the true costs (up to float rounding). When all
costs are integers the unit is the gcd of the extra costs (1 at worst); if the slack is then at most `resolution` units,
the answer is exact. Otherwise the unit is slack / resolution: rounding up strands at most one unit per group, so the
answer is at least as good as the true optimum under `budget - len(groups) * unit`; the stranded slack is then spent
by greedy promotion, and the greedy baseline is returned instead if it happens to be better.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    """One choice for one group, e.g. int8 for one Conv."""

    name: str
    cost: float
    loss: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cost) and math.isfinite(self.loss) and self.cost >= 0 and self.loss >= 0):
            raise ValueError(f"option {self.name!r}: cost and loss must be finite and >= 0")


@dataclass(frozen=True)
class Group:
    """A node (or tensor) that must take exactly one of its options."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        names = [o.name for o in self.options]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"group {self.name!r}: needs at least one option, with unique names")


@dataclass(frozen=True)
class Solution:
    choice: dict[str, str]  # group name -> option name
    cost: float  # true (undiscretised) total cost
    loss: float


def _prune(groups: Sequence[Group]) -> list[tuple[Option, ...]]:
    """Per group, options by increasing cost with strictly decreasing loss: the rest can never help."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError("group names must be unique (they key the solution)")
    kept: list[tuple[Option, ...]] = []
    for g in groups:
        ordered = sorted(enumerate(g.options), key=lambda io: (io[1].cost, io[1].loss, io[0]))
        front: list[Option] = []
        for _, opt in ordered:
            if not front or opt.loss < front[-1].loss:
                front.append(opt)
        kept.append(tuple(front))
    return kept


def _solution(groups: Sequence[Group], picks: Sequence[Option]) -> Solution:
    return Solution(
        choice={g.name: o.name for g, o in zip(groups, picks, strict=True)},
        cost=math.fsum(o.cost for o in picks),
        loss=math.fsum(o.loss for o in picks),
    )


def _units(kept: list[tuple[Option, ...]], unit: float, cap: int) -> list[np.ndarray]:
    """Extra cost over the group's cheapest, in whole units rounded up; anything above `cap` becomes cap + 1."""
    out = []
    for opts in kept:
        extra = np.array([o.cost - opts[0].cost for o in opts]) / unit
        with np.errstate(over="ignore", invalid="ignore"):
            out.append(np.where(extra > cap, cap + 1, np.ceil(extra)).astype(np.int64))
    return out


def _dp(kept: list[tuple[Option, ...]], weights: list[np.ndarray], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """best[b] = min loss with discretised extra cost exactly b; back[g, b] = option taken by group g there."""
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(kept), cap + 1), dtype=np.int32)
    cols = np.arange(cap + 1)
    for g, (opts, w) in enumerate(zip(kept, weights, strict=True)):
        cand = np.full((len(opts), cap + 1), np.inf)
        for j, (opt, wj) in enumerate(zip(opts, w, strict=True)):
            if wj <= cap:
                cand[j, wj:] = best[: cap + 1 - wj] + opt.loss
        back[g] = np.argmin(cand, axis=0)  # first minimum: the cheaper option on ties
        best = cand[back[g], cols]
    return best, back


def _trace(back: np.ndarray, weights: list[np.ndarray], ends: np.ndarray) -> np.ndarray:
    """Option index per (end cell, group), walking the back-pointers for all end cells at once."""
    picks = np.zeros((len(ends), len(weights)), dtype=np.int64)
    b = ends.copy()
    for g in range(len(weights) - 1, -1, -1):
        picks[:, g] = back[g, b]
        b -= weights[g][picks[:, g]]
    return picks


def _step(kept: list[tuple[Option, ...]]) -> int:
    """Largest whole unit dividing every extra cost (0 if any cost is fractional): with it the DP is exact."""
    extras = [o.cost - opts[0].cost for opts in kept for o in opts]
    return math.gcd(*(int(e) for e in extras)) if all(float(e).is_integer() for e in extras) else 0


def _promote(kept: list[tuple[Option, ...]], cur: np.ndarray, budget: float) -> np.ndarray:
    """Keep taking the single upgrade with the best loss drop per extra cost that still fits the budget."""
    width = max((len(opts) for opts in kept), default=1)
    pad = [[(o.cost, o.loss) for o in opts] + [(np.inf, np.inf)] * (width - len(opts)) for opts in kept]
    cost, loss = np.moveaxis(np.array(pad, dtype=float).reshape(len(kept), width, 2), 2, 0)
    rows, cur = np.arange(len(kept)), cur.copy()
    total = math.fsum(cost[rows, cur])
    while len(kept):
        d_cost = cost - cost[rows, cur][:, None]
        with np.errstate(invalid="ignore"):
            d_loss = loss[rows, cur][:, None] - loss
            ok = (d_loss > 0) & (d_cost > 0) & (total + d_cost <= budget)
            ratio = np.where(ok, d_loss / np.where(ok, d_cost, 1.0), -np.inf)
        flat = int(np.argmax(ratio))  # ties: earliest group, then cheapest option
        if not np.isfinite(ratio.flat[flat]):
            break
        g, j = divmod(flat, width)
        total += float(d_cost[g, j])
        cur[g] = j
    return cur


def solve_exact(groups: Sequence[Group], budget: float, resolution: int = 2000) -> Solution | None:
    """Min-loss choice with total cost <= budget, by DP over the discretised slack; None if nothing fits."""
    if math.isnan(budget) or resolution < 1:
        raise ValueError("budget must be a number and resolution >= 1")
    kept = _prune(groups)
    slack = budget - math.fsum(opts[0].cost for opts in kept)
    if slack < 0:
        return None
    if math.fsum(opts[-1].cost - opts[0].cost for opts in kept) <= slack:  # everything fits: best option each
        return _solution(groups, [opts[-1] for opts in kept])
    step = _step(kept)
    exact = slack == 0 or (step > 0 and slack / step <= resolution)
    unit = float(max(step, 1)) if exact else slack / resolution
    cap = math.floor(slack / unit) if exact else resolution
    weights = _units(kept, unit, cap)
    best, back = _dp(kept, weights, cap)
    end = int(np.argmin(best))  # first minimum: the lowest cost among equal losses
    # Rounding up can strand up to one unit of slack per group: spend what is left greedily (a no-op when exact).
    picks = _promote(kept, _trace(back, weights, np.array([end]))[0], budget)
    sol = _solution(groups, [opts[j] for opts, j in zip(kept, picks, strict=True)])
    greedy = None if exact else solve_greedy(groups, budget)  # inexact DP: never return worse than the baseline
    return greedy if greedy is not None and greedy.loss < sol.loss else sol


def pareto_front(groups: Sequence[Group], resolution: int = 2000) -> list[Solution]:
    """Every non-dominated (cost, loss) choice from one DP over the whole cost range, by increasing cost.

    Exact under the same rule as `solve_exact`; with a fractional unit every point is real and the list monotone,
    but a true Pareto point that rounding up pushed past a cheaper one can be missing.
    """
    if resolution < 1:
        raise ValueError("resolution must be >= 1")
    kept = _prune(groups)
    span = math.fsum(opts[-1].cost - opts[0].cost for opts in kept)
    step = _step(kept)
    exact = span == 0 or (step > 0 and span / step <= resolution)
    unit = float(max(step, 1)) if exact else span / resolution
    weights = _units(kept, unit, resolution + len(kept))  # rounding up adds at most one unit per group
    cap = int(sum(int(w[-1]) for w in weights))
    best, back = _dp(kept, weights, cap)
    running = np.minimum.accumulate(best)
    ends = np.flatnonzero(best < np.r_[np.inf, running[:-1]])  # cells that beat every cheaper cell
    picks = _trace(back, weights, ends)
    sols = sorted(
        (_solution(groups, [opts[j] for opts, j in zip(kept, row, strict=True)]) for row in picks),
        key=lambda s: (s.cost, s.loss),
    )
    front: list[Solution] = []
    for s in sols:  # re-filter on true costs: rounding up may reorder costs of near points
        if not front or s.loss < front[-1].loss:
            front.append(s)
    return front


def solve_greedy(groups: Sequence[Group], budget: float) -> Solution | None:
    """Baseline as peers do it: start all-cheapest, then promote greedily by loss drop per extra cost."""
    if math.isnan(budget):
        raise ValueError("budget must be a number")
    kept = _prune(groups)
    if math.fsum(opts[0].cost for opts in kept) > budget:
        return None
    cur = _promote(kept, np.zeros(len(kept), dtype=np.int64), budget)
    return _solution(groups, [opts[j] for opts, j in zip(kept, cur, strict=True)])


def lp_bound(groups: Sequence[Group], budget: float) -> float | None:
    """Lower bound on the loss of any choice within `budget` (None if nothing fits): the LP relaxation, i.e.
    each group's lower convex hull walked by decreasing loss drop per cost, the last step taken in part.
    Exact and greedy both lie at or above it; where greedy meets it, no solver can do better on this table."""
    kept = _prune(groups)
    slack = budget - math.fsum(opts[0].cost for opts in kept)
    if math.isnan(budget) or slack < 0:
        return None
    loss = math.fsum(opts[0].loss for opts in kept)
    steps: list[tuple[float, float, float]] = []  # (drop per cost, extra cost, drop)
    for opts in kept:
        hull: list[Option] = []
        for opt in opts:  # by increasing cost, strictly decreasing loss
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], opt):
                hull.pop()
            hull.append(opt)
        steps += [
            ((a.loss - b.loss) / (b.cost - a.cost), b.cost - a.cost, a.loss - b.loss)
            for a, b in itertools.pairwise(hull)
        ]
    for _per_cost, extra, drop in sorted(steps, reverse=True):
        if extra > slack:
            return max(loss - drop * (slack / extra), 0.0)  # not per-cost × slack: that ratio may overflow
        loss -= drop
        slack -= extra
    return max(loss, 0.0)


def _slope(a: Option, b: Option) -> float:
    return (b.loss - a.loss) / (b.cost - a.cost)


def brute_force(groups: Sequence[Group], budget: float, limit: int = 1_000_000) -> Solution | None:
    """Reference for tests: every combination, min loss then min cost; refuses more than `limit` combinations."""
    if math.prod(len(g.options) for g in groups) > limit:
        raise ValueError(f"more than {limit} combinations")
    best: Solution | None = None
    for picks in itertools.product(*(g.options for g in groups)):
        s = _solution(groups, picks)
        if s.cost <= budget and (best is None or (s.loss, s.cost) < (best.loss, best.cost)):
            best = s
    return best
