"""benchmarks/headroom.py's analysis on hand-made evaluation tables (no training): the gain it reports is the
family router's over the static frontier, both chosen on dev and scored on test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.evaluation.oracle import PathTable

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def headroom():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("headroom", BENCH / "headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# per path: FLOPs ratio of the path (dense 1.0), and whether coarse / fine questions are answered
FLOPS = {"4-4-4": 0.46, "2-4-4": 0.52, "2-2-4": 0.55, "2-2-2": 0.56, "1-4-4": 0.66, "1-2-4": 0.71,
         "1-1-4": 0.84, "1-1-1": 1.0}  # fmt: skip


def _fine_ok(path: str) -> bool:
    return path.startswith("1")  # fine questions need the first pooling layer dense


def _tables(headroom, split: str, n: int = 80) -> dict[str, PathTable]:
    family = np.array(["coarse_a"] * (3 * n // 4) + ["fine_a"] * (n // 4))
    kind = np.where(family == "fine_a", "fine", "coarse")
    ids = np.array([f"{split}-{i}" for i in range(n)])

    def table(paths: list[str]) -> PathTable:
        correct = np.array([[kind[i] == "coarse" or _fine_ok(p) for p in paths] for i in range(n)])
        flops = np.tile([FLOPS.get(p, 0.6) for p in paths], (n, 1))
        return PathTable(paths, correct, flops, np.ones(n), family, kind, ids, split=split)

    tables = {name: table([path]) for name, path in headroom.STATIC.items()}
    tables[headroom.RANDOM] = table([headroom.RANDOM, *headroom.STATIC.values()])
    return tables


def test_the_gain_is_the_family_routers_over_the_static_frontier(headroom):
    result = headroom.analyse_seed(_tables(headroom, "dev"), _tables(headroom, "eval"))
    at = {c["budget"]: c for c in result["separate"]}
    # at 0.55: coarse on 4-4-4 (0.46), fine on 1-4-4 (0.66) costs 0.75 * 0.46 + 0.25 * 0.66 = 0.51: all right;
    # the static frontier's best mix at 0.55 sends (0.55 - 0.46) / 0.2 = 45% of all questions to 1-4-4 and
    # loses the fine questions of the rest: 0.75 + 0.45 * 0.25 = 86% in expectation (the split is by id hash)
    c = at[0.55]
    assert c["family_router"]["accuracy"] == pytest.approx(1.0)
    assert c["family_router"]["flops_ratio"] <= 0.55 + 1e-9
    assert 0.8 <= c["static"]["accuracy"] <= 0.9 and c["gain"] >= 0.1
    assert c["mcnemar"]["only_static"] == 0 and c["mcnemar"]["p"] < 0.05
    assert c["family_router"]["shares"]["coarse_a"] == [("sched-4-4-4", 1.0)]
    # the shared decoder (random model's paths) gives the same here, since its paths answer alike
    assert {s["budget"] for s in result["shared"]} == {s["budget"] for s in result["separate"]}
    assert result["points"]["sched-1-4-4"]["per_family"] == {"coarse_a": 1.0, "fine_a": 1.0}


def test_summary_over_seeds_and_its_verdict(headroom):
    per_seed = {
        s: headroom.analyse_seed(_tables(headroom, "dev"), _tables(headroom, "eval")) for s in (0, 1, 2)
    }
    summary = headroom.summarise(per_seed)
    assert summary["target"]["met"] and summary["target"]["gain_sd"] == 0.0
    text = headroom.markdown(summary, type("A", (), {"steps": 300, "init": "ckpt", "data": "d"})(), 60.0)
    assert headroom.SECTION in text and "MET" in text and "| sched-4-4-4 | 4-4-4 |" in text
    # one seed has no spread: the same gain is reported but the target is not judged on it
    one = headroom.summarise({0: per_seed[0]})
    assert one["target"]["gain_mean"] == summary["target"]["gain_mean"]
    assert not one["target"]["decided"] and not one["target"]["met"]
    text = headroom.markdown(one, type("A", (), {"steps": 300, "init": "ckpt", "data": "d"})(), 60.0)
    assert "NOT DECIDED (1 seed; the target is judged over 3)" in text and "MET" not in text


@pytest.fixture(scope="module")
def quality(headroom):
    spec = importlib.util.spec_from_file_location("quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dpn_table(quality, split: str, n: int = 80) -> PathTable:
    """A DPN model that routes like the family router: coarse questions on 4-4-4, fine ones on 1-4-4 (auto);
    the dial's larger lambdas send fine questions to 4-4-4 too, its negative ones everything to 1-4-4."""
    family = np.array(["coarse_a"] * (3 * n // 4) + ["fine_a"] * (n // 4))
    kind = np.where(family == "fine_a", "fine", "coarse")
    paths = quality.modes()
    fine = kind == "fine"
    correct, flops = np.ones((n, len(paths)), dtype=bool), np.zeros((n, len(paths)))
    for p, mode in enumerate(paths):
        cost = 0.0 if mode == "auto" else float(mode.split("=")[1])
        coarse_f = 0.66 if cost < 0 else 0.46
        fine_f = 0.46 if cost >= 2 else 0.66
        flops[:, p] = np.where(fine, fine_f, coarse_f)
        correct[:, p] = ~fine | (fine_f > 0.5)
    ids = np.array([f"{split}-{i}" for i in range(n)])
    return PathTable(paths, correct, flops, np.ones(n), family, kind, ids, split=split)


def test_dpn_that_routes_like_the_family_router_beats_the_frontier(headroom, quality):
    tables = {split: _tables(headroom, split) for split in ("dev", "eval")}
    statics = tuple(
        headroom.columns_table({n: tables[s][n] for n in headroom.STATIC}, dict(headroom.STATIC), s)
        for s in ("dev", "eval")
    )
    dpn = (_dpn_table(quality, "dev"), _dpn_table(quality, "eval"))
    result = quality.analyse_seed(statics, tables["eval"]["dense"], dpn)
    assert result["auto"]["accuracy"] == 1.0 and result["auto"]["flops_ratio"] == pytest.approx(0.51)
    assert result["vs_frontier"]["diff"] > 0.1 and result["vs_frontier"]["p"] < 0.05
    assert abs(result["vs_family_router"]["diff"]) < 1e-9
    assert result["vs_dense"]["diff"] == 0.0
    budgets = {b["budget"]: b for b in result["dial_at_budget"]}
    assert budgets[0.55]["mode"] in ("auto", "auto:lambda=-0.5", "auto:lambda=0.5", "auto:lambda=1")
    summary = quality.summarise({0: result, 1: result, 2: result})
    verdict = {t["target"].split(" ")[2]: t["passed"] for t in summary["targets"]}
    assert verdict["static"] and verdict["1"] and verdict["dense"]
    text = quality.markdown({"dpn": summary}, {"dpn": {}}, type("A", (), {})(), 1.0)
    assert quality.SECTION in text and "**MET** auto >= static frontier" in text


def test_outcome_auto_is_the_dev_point_furthest_above_the_static_frontier(headroom, quality):
    # dev statics: coarse questions answered everywhere, fine ones only on 1-x-x paths; the frontier at 0.51 mixes
    # 4-4-4 and 1-4-4 (~0.78), at 0.66 it is 1-4-4 (all right)
    statics = _tables(headroom, "dev")
    s_dev = headroom.columns_table({n: statics[n] for n in headroom.STATIC}, dict(headroom.STATIC), "dev")
    n = len(s_dev.ids)
    fine = s_dev.kind == "fine"
    # the dial: plain auto dense-ish (all right at 0.84), lambda=1 routes per family (all right at 0.51),
    # lambda=4 everything on 4-4-4 (0.46, the fine ones lost), lambda=9 below every trained schedule
    paths = ["auto", "auto:lambda=1", "auto:lambda=4", "auto:lambda=9"]
    correct = np.stack([np.ones(n, bool), np.ones(n, bool), ~fine, ~fine], axis=1)
    flops = np.stack(
        [np.full(n, 0.84), np.where(fine, 0.66, 0.46), np.full(n, 0.46), np.full(n, 0.3)], axis=1
    )
    dial = PathTable(paths, correct, flops, np.ones(n), s_dev.family, s_dev.kind, s_dev.ids, split="dev")
    assert quality.auto_column(dial) == 0  # a router's own auto unless the variant chooses on dev
    assert quality.auto_column(dial, s_dev) == 1
    correct[
        :, 1
    ] = ~fine  # lambda=1 loses the fine questions too: now no point beats the frontier; the cheaper tie
    dial = PathTable(paths, correct, flops, np.ones(n), s_dev.family, s_dev.kind, s_dev.ids, split="dev")
    assert quality.auto_column(dial, s_dev) in (1, 2)
