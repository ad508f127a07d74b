"""The measurement protocol's bookkeeping on hand-made tables (jobs.evaluation.protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.evaluation.oracle import PathTable
from jobs.evaluation.protocol import (
    Point,
    apply_route,
    budgeted_family_router,
    columns_table,
    frontier_at,
    mcnemar,
    mean_sd,
    trained_frontier,
)


def _table(split: str = "dev") -> PathTable:
    """Two families of 4 questions each, three paths. 'easy' is right on every path; 'hard' only on the dense
    path. FLOPs per question: cheap 1, mid 2, dense 4 (dense reference 4)."""
    paths = ["cheap", "mid", "dense"]
    easy = [[True, True, True]] * 4
    hard = [[False, False, True]] * 4
    correct = np.array(easy + hard)
    flops = np.tile([1.0, 2.0, 4.0], (8, 1))
    family = ["easy"] * 4 + ["hard"] * 4
    ids = [f"q{i}" for i in range(8)]
    return PathTable(paths, correct, flops, np.full(8, 4.0), family, family, ids, split=split)


def test_a_choice_made_on_test_is_refused():
    with pytest.raises(ValueError, match="chosen on the 'dev' split"):
        budgeted_family_router(_table(split="eval"), budget=0.5)
    with pytest.raises(ValueError, match="dev"):
        budgeted_family_router(_table(split=""), budget=0.5)


def test_budgeted_family_router_buys_the_best_accuracy_per_flop():
    table = _table()
    # all on cheap: FLOPs ratio 1/4 = 0.25, accuracy 0.5; hard -> dense costs (4-1)/4 * 0.5 = 0.375 more
    route = budgeted_family_router(table, budget=0.25)
    assert route.shares == {"easy": [("cheap", 1.0)], "hard": [("cheap", 1.0)]}
    assert route.accuracy == pytest.approx(0.5) and route.flops_ratio == pytest.approx(0.25)
    full = budgeted_family_router(table, budget=0.625)
    assert full.shares == {"easy": [("cheap", 1.0)], "hard": [("dense", 1.0)]}  # mid is below the hull
    assert full.accuracy == pytest.approx(1.0) and full.flops_ratio == pytest.approx(0.625)
    half = budgeted_family_router(table, budget=0.4375)  # half of the upgrade's cost
    assert half.shares["hard"] == [("cheap", pytest.approx(0.5)), ("dense", pytest.approx(0.5))]
    assert half.accuracy == pytest.approx(0.75) and half.flops_ratio == pytest.approx(0.4375)


def test_budget_below_the_cheapest_columns_is_infeasible():
    route = budgeted_family_router(_table(), budget=0.1)
    assert not route.feasible and "cheapest" in route.notes[0]


def test_apply_route_scores_a_dev_choice_on_test_question_by_question():
    route = budgeted_family_router(_table(), budget=0.4375)
    test = _table(split="eval")
    correct, flops = apply_route(route, test)
    assert correct[:4].all()  # easy on cheap
    assert correct[4:].sum() == 2  # half of hard on dense, half on cheap
    assert sorted(flops[4:]) == [1.0, 1.0, 4.0, 4.0]
    again, _ = apply_route(route, test)
    assert (again == correct).all()  # deterministic split


def test_a_frontier_point_not_trained_is_never_drawn():
    points = [
        Point("fixed4", "4", "4", 0.60, 0.46),
        Point("fixed2", "2", "2", 0.80, 0.56),
        Point("dense", "1", "1", 0.95, 1.00),
        # a path evaluated on a model trained otherwise: better, but not a trained point
        Point("random", "2-2-2", "random", 0.99, 0.56),
    ]
    front = trained_frontier(points)
    assert [p.name for p in front] == ["fixed4", "fixed2", "dense"]
    assert frontier_at(front, 0.56) == pytest.approx(0.80)
    assert frontier_at(front, 0.51) == pytest.approx(0.70)  # linear between trained neighbours
    assert frontier_at(front, 0.40) is None  # never below the cheapest trained point


def test_mcnemar_on_a_known_table():
    # 10 discordant pairs, 9 for A: two-sided exact p = 2 * (C(10,0) + C(10,1)) / 2**10 = 22 / 1024
    a = [True] * 9 + [False] + [True] * 5
    b = [False] * 9 + [True] + [True] * 5
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (9, 1) and result.a_better
    assert result.p_value == pytest.approx(22 / 1024)
    assert mcnemar(a, a).p_value == 1.0
    balanced = mcnemar([True, False] * 5, [False, True] * 5)
    assert balanced.p_value == 1.0
    with pytest.raises(ValueError, match="one entry per question"):
        mcnemar([True], [True, False])


def test_mean_sd_over_seeds():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        mean_sd([])
    assert not math.isnan(mean_sd([0.1, 0.1])[1])


def test_columns_table_joins_separately_trained_models_by_question():
    a = _table()
    b = PathTable(a.paths, a.correct[::-1], a.flops[::-1], a.dense, a.family[::-1], a.kind[::-1], a.ids[::-1])
    joined = columns_table({"m1": a, "m2": b}, {"m1": "cheap", "m2": "dense"}, split="dev")
    assert joined.paths == ["m1", "m2"] and joined.split == "dev"
    assert (joined.correct[:, 0] == a.correct[:, 0]).all() and (joined.correct[:, 1] == a.correct[:, 2]).all()
    other = PathTable(a.paths, a.correct[:4], a.flops[:4], a.dense[:4], a.family[:4], a.kind[:4], a.ids[:4])
    with pytest.raises(ValueError, match="other questions"):
        columns_table({"m1": a, "m3": other}, {"m1": "cheap", "m3": "dense"}, split="dev")


def test_table_from_predictions_reads_the_evaluation_records():
    from jobs.evaluation.protocol import table_from_predictions

    records = [
        {"label": "m", "id": f"q{i}", "compression": c, "correct": ok, "prefill_flops": f, "dense_flops": 4.0,
         "family": "easy", "kind": "coarse"}
        for i in range(3)
        for c, ok, f in (("1", True, 4.0), ("4", i == 0, 1.0))
    ] + [{"label": "other", "id": "q0", "compression": "1", "correct": False, "prefill_flops": 4.0,
          "dense_flops": 4.0, "family": "easy", "kind": "coarse"}]  # fmt: skip
    table = table_from_predictions(records, "m", ["4", "1"], split="dev")
    assert table.paths == ["4", "1"] and table.split == "dev" and list(table.ids) == ["q0", "q1", "q2"]
    assert table.correct[:, 0].tolist() == [True, False, False] and table.correct[:, 1].all()
    assert table.flops[:, 0].tolist() == [1.0, 1.0, 1.0] and table.dense.tolist() == [4.0] * 3
    with pytest.raises(ValueError, match="lack compression 2"):
        table_from_predictions(records, "m", ["2", "1"], split="dev")
