"""MCKP solver: exact vs brute force, greedy as a (worse) baseline, Pareto front, edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.mckp import Group, Option, Solution, brute_force, lp_bound, pareto_front, solve_exact, solve_greedy

TOL = 1e-9
SETTINGS = settings(derandomize=True, max_examples=200, deadline=None)


def _build(raw: list[list[tuple[float, float]]]) -> list[Group]:
    return [
        Group(f"g{i}", tuple(Option(f"o{j}", float(c), float(loss)) for j, (c, loss) in enumerate(opts)))
        for i, opts in enumerate(raw)
    ]


def _instances(cost: st.SearchStrategy[float]) -> st.SearchStrategy[list[Group]]:
    option = st.tuples(cost, st.floats(0, 100))
    return st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=6).map(_build)


INT_GROUPS = _instances(st.integers(0, 20).map(float))
FLOAT_GROUPS = _instances(st.floats(0, 20))


def _check_consistent(groups: list[Group], sol: Solution) -> None:
    """The reported cost and loss are those of the reported choice."""
    picked = [next(o for o in g.options if o.name == sol.choice[g.name]) for g in groups]
    assert set(sol.choice) == {g.name for g in groups}
    assert sol.cost == pytest.approx(math.fsum(o.cost for o in picked), abs=TOL)
    assert sol.loss == pytest.approx(math.fsum(o.loss for o in picked), abs=TOL)


@SETTINGS
@given(groups=INT_GROUPS, budget=st.integers(0, 130))
def test_exact_matches_brute_force_on_integer_costs(groups: list[Group], budget: int) -> None:
    exact, brute = solve_exact(groups, budget), brute_force(groups, budget)
    assert (exact is None) == (brute is None)
    if exact is not None and brute is not None:
        _check_consistent(groups, exact)
        assert exact.cost <= budget
        assert exact.loss == pytest.approx(brute.loss, abs=TOL)
    # Byte-sized costs: the slack is far above `resolution`, but the gcd unit keeps the DP exact.
    scaled = [Group(g.name, tuple(Option(o.name, o.cost * 4096, o.loss) for o in g.options)) for g in groups]
    big = solve_exact(scaled, budget * 4096 + 100, resolution=200)
    assert (big is None) == (brute is None)
    if big is not None and brute is not None:
        assert big.cost <= budget * 4096 and big.loss == pytest.approx(brute.loss, abs=TOL)


@SETTINGS
@given(groups=INT_GROUPS, budget=st.integers(0, 130))
def test_greedy_is_feasible_and_never_beats_exact(groups: list[Group], budget: int) -> None:
    exact, greedy = solve_exact(groups, budget), solve_greedy(groups, budget)
    assert (exact is None) == (greedy is None)
    if exact is not None and greedy is not None:
        _check_consistent(groups, greedy)
        assert greedy.cost <= budget
        assert greedy.loss >= exact.loss - TOL


@SETTINGS
@given(groups=FLOAT_GROUPS, budget=st.floats(0, 130), resolution=st.sampled_from([5, 50, 2000]))
def test_exact_float_costs_feasible_and_within_rounding_bound(
    groups: list[Group], budget: float, resolution: int
) -> None:
    """Rounding up keeps answers feasible; it can only lose what fits in len(groups) units of slack."""
    exact, brute = solve_exact(groups, budget, resolution), brute_force(groups, budget)
    assert (exact is None) == (brute is None)
    if exact is None or brute is None:
        return
    _check_consistent(groups, exact)
    assert exact.cost <= budget + TOL
    assert exact.loss >= brute.loss - TOL
    unit = (budget - math.fsum(min(o.cost for o in g.options) for g in groups)) / resolution
    tighter = brute_force(groups, budget - len(groups) * unit)
    if tighter is not None:
        assert exact.loss <= tighter.loss + TOL
    greedy = solve_greedy(groups, budget)
    assert greedy is not None and exact.loss <= greedy.loss + TOL


@SETTINGS
@given(groups=FLOAT_GROUPS, budget=st.floats(0, 130))
def test_lp_bound_is_below_the_optimum_and_tight_with_one_fractional_group(groups: list[Group], budget: float) -> None:
    bound, best = lp_bound(groups, budget), brute_force(groups, budget)
    assert (bound is None) == (best is None)
    if best is None:
        return
    assert bound <= best.loss + TOL
    greedy = solve_greedy(groups, budget)
    assert greedy is not None and greedy.loss >= bound - TOL


def test_lp_bound_interpolates_the_cheapest_missing_step() -> None:
    groups = _build([[(0, 10), (4, 2)], [(0, 6), (1, 5), (10, 0)]])
    # steps by drop per cost: g0 2.0 (cost 4), g1 1.0 (cost 1), g1 0.556 (cost 9); budget 6 takes g0, g1's
    # first step and 1/9 of its second
    assert lp_bound(groups, 6) == pytest.approx(2 + 5 - 5 / 9)
    assert lp_bound(groups, 100) == pytest.approx(2.0)
    assert lp_bound(groups, -1) is None


@SETTINGS
@given(groups=INT_GROUPS)
def test_pareto_front_is_monotone_exact_and_complete(groups: list[Group]) -> None:
    front = pareto_front(groups)
    assert front
    for a, b in itertools.pairwise(front):
        assert a.cost < b.cost and a.loss > b.loss
    cheapest = brute_force(groups, math.fsum(min(o.cost for o in g.options) for g in groups))
    assert cheapest is not None and front[0].cost == cheapest.cost
    assert front[0].loss == pytest.approx(cheapest.loss, abs=TOL)
    unbounded = brute_force(groups, math.inf)
    assert unbounded is not None and front[-1].loss == pytest.approx(unbounded.loss, abs=TOL)
    for point in front:
        _check_consistent(groups, point)
        at = solve_exact(groups, point.cost)
        assert at is not None and at.loss == pytest.approx(point.loss, abs=TOL)
    # Complete: every configuration is weakly dominated by some point of the front.
    for picks in itertools.product(*(g.options for g in groups)):
        cost, loss = math.fsum(o.cost for o in picks), math.fsum(o.loss for o in picks)
        assert any(p.cost <= cost and p.loss <= loss + TOL for p in front)


def test_greedy_counterexample() -> None:
    """Greedy takes the efficient small upgrade first and can no longer afford the one that matters."""
    groups = [
        Group("conv", (Option("int4", 0, 10.0), Option("int8", 1, 8.0))),  # 2.0 loss per unit
        Group("fc", (Option("int4", 0, 10.0), Option("int8", 10, 0.0))),  # 1.0 loss per unit
    ]
    greedy = solve_greedy(groups, 10)
    exact = solve_exact(groups, 10)
    assert greedy == Solution({"conv": "int8", "fc": "int4"}, 1.0, 18.0)
    assert exact == Solution({"conv": "int4", "fc": "int8"}, 10.0, 10.0)
    assert brute_force(groups, 10) == exact


def test_byte_costs_stay_exact_through_the_gcd_unit() -> None:
    """Slack 7 * 4096 bytes over resolution 10: a 0.7 * 4096 unit would round the optimum A+B out of reach."""
    groups = _build([[(0, 5.0), (3 * 4096, 0.0)], [(0, 6.0), (4 * 4096, 0.0)], [(0, 1.8), (4096, 0.0)]])
    exact = solve_exact(groups, 7 * 4096, resolution=10)
    assert exact == Solution({"g0": "o1", "g1": "o1", "g2": "o0"}, 7 * 4096.0, 1.8)
    greedy = solve_greedy(groups, 7 * 4096)  # takes C then A, after which B no longer fits
    assert greedy is not None and greedy.loss == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("raw", "budget", "resolution", "expected"),
    [
        # DP (units 1, 1, 2 of 2) takes g2 alone; promotion spends the stranded 0.5 on g1. Greedy: g1, g0 -> 7.
        (
            [[(0, 1.0), (0.5, 0)], [(0, 5.0), (0.5, 0)], [(0, 7.0), (4.0, 0)]],
            4.5,
            2,
            {"g0": "o0", "g1": "o1", "g2": "o1"},
        ),
        # DP (units 2, 3, 2 of 4) cannot fit g0+g1 = 5.0 and settles for 8; greedy finds it: returned instead.
        (
            [[(0, 9.0), (1.5, 0)], [(0, 8.0), (3.5, 0)], [(0, 1.0), (2.0, 0)]],
            5.0,
            4,
            {"g0": "o1", "g1": "o1", "g2": "o0"},
        ),
    ],
)
def test_coarse_unit_safety_nets(
    raw: list[list[tuple[float, float]]], budget: float, resolution: int, expected: dict[str, str]
) -> None:
    groups = _build(raw)
    exact, brute = solve_exact(groups, budget, resolution), brute_force(groups, budget)
    assert brute is not None and exact is not None and exact.choice == expected == brute.choice


def test_edge_cases() -> None:
    single = Group("s", (Option("only", 3, 1.5),))
    free = Group("free", (Option("a", 2, 5.0), Option("b", 2, 1.0)))  # zero-cost upgrade
    dominated = Group("d", (Option("good", 1, 1.0), Option("bad", 4, 2.0), Option("big", 5, 0.0)))
    groups = [single, free, dominated]
    for solve in (solve_exact, solve_greedy, brute_force):
        zero_slack = solve(groups, 6)  # exactly the all-cheapest cost
        assert zero_slack == Solution({"s": "only", "free": "b", "d": "good"}, 6.0, 3.5)
        assert solve(groups, 5.5) is None
        full = solve(groups, 100)
        assert full == Solution({"s": "only", "free": "b", "d": "big"}, 10.0, 2.5)
    assert [(p.cost, p.loss) for p in pareto_front(groups)] == [(6.0, 3.5), (10.0, 2.5)]
    assert solve_exact([], 0) == Solution({}, 0.0, 0.0) == solve_greedy([], 0)
    assert pareto_front([]) == [Solution({}, 0.0, 0.0)]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        Option("x", -1, 0)
    with pytest.raises(ValueError):
        Group("g", ())
    g = Group("g", (Option("a", 0, 0),))
    with pytest.raises(ValueError):
        solve_exact([g, g], 1)
    with pytest.raises(ValueError):
        brute_force([Group(f"g{i}", tuple(Option(str(j), j, 0) for j in range(10))) for i in range(7)], 1)


def test_large_instance_runs() -> None:
    rng = np.random.default_rng(0)
    groups = []
    for i in range(200):
        costs = np.sort(rng.uniform(0, 100, 4))
        losses = np.sort(rng.uniform(0, 10, 4))[::-1]
        groups.append(
            Group(f"n{i}", tuple(Option(f"p{j}", c, lo) for j, (c, lo) in enumerate(zip(costs, losses, strict=True))))
        )
    budget = math.fsum(g.options[0].cost for g in groups) + 5000
    exact = solve_exact(groups, budget, resolution=2000)
    greedy = solve_greedy(groups, budget)
    assert exact is not None and greedy is not None
    assert exact.cost <= budget + TOL and greedy.cost <= budget + TOL
    front = pareto_front(groups, resolution=2000)
    assert front[0].cost < front[-1].cost
