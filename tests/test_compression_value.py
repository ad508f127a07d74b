"""`CompressionSpec`, the one typed value of a `compression`: every form, its label, its expert indices, the
`RoutingPlan` the model builds from it, and the parser's promise to raise only `ValueError`."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from small_config import make_config

from dpn_model import CompressionSpec, DPNConfig
from dpn_model.configuration import (
    compression_label,
    forced_expert_indices,
    parse_compression,
    router_cost,
    routing_mode,
)
from dpn_model.pyramid import RoutingPlan
from jobs.evaluation.config import parse_compressions
from serve_apps import compression as serving


@pytest.fixture(scope="module")
def config() -> DPNConfig:
    """Pooling after layers 1, 2, 3; the default experts (factors 1, 2, 4)."""
    return make_config()


# value -> (mode, cost, factors, label, expert indices on `config`)
FORMS = [
    ("auto", ("auto", 0.0, None, "auto", None)),
    (" AUTO ", ("auto", 0.0, None, "auto", None)),
    ("auto:lambda=0", ("auto", 0.0, None, "auto", None)),
    ("auto:lambda=0.50", ("auto", 0.5, None, "auto:lambda=0.5", None)),
    ("AUTO:LAMBDA=-1.5", ("auto", -1.5, None, "auto:lambda=-1.5", None)),
    ("auto:lambda=0.123456789", ("auto", 0.123457, None, "auto:lambda=0.123457", None)),  # the %g spelling
    ("random", ("random", 0.0, None, "random", None)),
    (1, ("forced", 0.0, 1, "1", [0, 0, 0])),
    (2, ("forced", 0.0, 2, "2", [1, 1, 1])),
    ("4", ("forced", 0.0, 4, "4", [2, 2, 2])),
    ([1, 2, 4], ("forced", 0.0, (1, 2, 4), "1-2-4", [0, 1, 2])),
    ((4, 2, 1), ("forced", 0.0, (4, 2, 1), "4-2-1", [2, 1, 0])),
    ((4, 4, 4), ("forced", 0.0, (4, 4, 4), "4-4-4", [2, 2, 2])),
    ("1,2,4", ("forced", 0.0, (1, 2, 4), "1-2-4", [0, 1, 2])),
    ("1 2 4", ("forced", 0.0, (1, 2, 4), "1-2-4", [0, 1, 2])),
    ("1-2-4", ("forced", 0.0, (1, 2, 4), "1-2-4", [0, 1, 2])),
    ("[1, 2, 4]", ("forced", 0.0, (1, 2, 4), "1-2-4", [0, 1, 2])),
]


@pytest.mark.parametrize("value, expected", FORMS, ids=[repr(v) for v, _ in FORMS])
def test_every_form_parses_to_one_typed_value(config, value, expected):
    mode, cost, factors, label, indices = expected
    spec = CompressionSpec.parse(value, config)
    assert (spec.mode, spec.cost, spec.factors, spec.label) == (mode, cost, factors, label)
    assert type(spec.cost) is float
    assert spec.expert_indices(config) == indices
    assert CompressionSpec.parse(value) == spec  # the config checks, it does not change the value
    # the thin functions are the typed value's views
    assert parse_compression(value, config) == spec.raw
    assert compression_label(value) == label
    assert forced_expert_indices(value, config) == indices
    assert router_cost(value) == cost
    assert routing_mode(value) == (None if mode == "forced" else mode)
    assert routing_mode(label) == routing_mode(value)  # a report row's label reads the same as the value


@pytest.mark.parametrize(
    "value", ["auto:lambda=x", "auto:", "autox", "junk", "(1, 2, 4)", "", None, 2.5, True]
)
def test_routing_mode_of_what_does_not_parse_is_none(value):
    """The lenient view asks the one parser: text it refuses, even text that starts like the dial, is not routed
    (a second reading of the syntax used to call "auto:" and "auto:lambda=x" routed)."""
    assert routing_mode(value) is None


@pytest.mark.parametrize("value", [v for v, _ in FORMS], ids=[repr(v) for v, _ in FORMS])
def test_label_round_trips_through_parse(config, value):
    spec = CompressionSpec.parse(value, config)
    assert CompressionSpec.parse(spec.label, config) == spec
    assert CompressionSpec.parse(spec, config) is spec


def test_raw_is_what_parse_compression_always_returned(config):
    assert CompressionSpec.parse("AUTO:lambda=0.50").raw == "auto:lambda=0.5"
    assert CompressionSpec.parse("2").raw == 2 and type(CompressionSpec.parse("2").raw) is int
    assert CompressionSpec.parse([1, 2, 4]).raw == (1, 2, 4)
    # a one-factor schedule stays a tuple; its label is the factor's, which reads back as that factor
    one = CompressionSpec.parse("[2]")
    assert (one.factors, one.label, CompressionSpec.parse(one.label).factors) == ((2,), "2", 2)


def test_factors_per_layer_and_expert_indices_are_distinct(config):
    spec = CompressionSpec.parse(4)
    assert spec.factors_per_layer(3) == (4, 4, 4)  # factors
    assert spec.expert_indices(config) == [2, 2, 2]  # indices into config.expert_strides
    assert CompressionSpec.parse("1-2-4").factors_per_layer(7) == (1, 2, 4)
    assert CompressionSpec.parse("auto").factors_per_layer(3) is None


@pytest.mark.parametrize(
    "value, message, late",
    [
        (
            [1, 2],
            r"compression schedule \[1, 2\] has 2 factor\(s\) but the model pools after 3 layer\(s\)",
            r"compression schedule \(1, 2\) has 2 factor\(s\)",
        ),
        (
            "1-2-8",
            r"compression '1-2-8': factor\(s\) \[8\] match no pooling expert.*factors \[1, 2, 4\]",
            r"compression \(1, 2, 8\): factor\(s\) \[8\] match no pooling expert",
        ),
    ],
)
def test_config_errors_quote_the_value_as_given(config, value, message, late):
    with pytest.raises(ValueError, match=message):
        CompressionSpec.parse(value, config)
    with pytest.raises(ValueError, match=late):  # checked late, the same rule, quoting the parsed form
        CompressionSpec.parse(value).expert_indices(config)


@pytest.mark.parametrize(
    "fields",
    [
        {"mode": "fast"},
        {"mode": "forced"},
        {"mode": "auto", "factors": 2},
        {"mode": "random", "cost": 1.0},
        {"mode": "auto", "cost": float("inf")},
    ],
)
def test_a_spec_built_by_hand_must_be_consistent(fields):
    with pytest.raises(ValueError, match="CompressionSpec"):
        CompressionSpec(**fields)


# ---- the model's plan: the same fields for every input as before the typed value ----------------------------

PLANS = [
    ("auto", RoutingPlan("auto", None, 0.0)),
    ("auto:lambda=0.5", RoutingPlan("auto", None, 0.5)),
    ("auto:lambda=0.123456789", RoutingPlan("auto", None, 0.123457)),
    ("auto:lambda=0", RoutingPlan("auto", None, 0.0)),
    ("random", RoutingPlan("random", None, 0.0)),
    (1, RoutingPlan("forced", [0, 0, 0])),
    (2, RoutingPlan("forced", [1, 1, 1])),
    (4, RoutingPlan("forced", [2, 2, 2])),
    ("1-2-4", RoutingPlan("forced", [0, 1, 2])),
    ([1, 2, 4], RoutingPlan("forced", [0, 1, 2])),
    ((4, 4, 4), RoutingPlan("forced", [2, 2, 2])),
    ("[1, 2, 4]", RoutingPlan("forced", [0, 1, 2])),
]


@pytest.mark.parametrize("value, plan", PLANS, ids=[repr(v) for v, _ in PLANS])
def test_routing_plan_of_every_form(config, value, plan):
    got = RoutingPlan.from_compression(value, config)
    assert got == plan
    assert type(got.cost) is float and (got.expert_indices is None or type(got.expert_indices) is list)
    assert RoutingPlan.from_compression(CompressionSpec.parse(value), config) == plan


# ---- the callers read the typed value -----------------------------------------------------------------------


def test_serving_rates_and_evaluation_modes_are_unchanged(config):
    rates = [serving.for_model(v, config) for v in ("auto", "AUTO:lambda=0.50", 2, "2", [2, 2, 2], "1-2-4")]
    assert rates == ["auto", "auto:lambda=0.5", 2, 2, 2, "1-2-4"]
    assert serving.as_rate([1, 2, 4]) == "1-2-4" and serving.as_rate("4") == 4
    assert serving.factors_per_layer(2, 3) == (2, 2, 2) and serving.factors_per_layer("1-2-4", 3) == (1, 2, 4)
    with pytest.raises(ValueError, match="is routed"):
        serving.factors_per_layer("auto", 3)
    assert parse_compressions("auto,1,[1,2,4],1-2-4,auto:lambda=0.50,[2]") == [
        "auto",
        1,
        "1-2-4",
        "auto:lambda=0.5",
        "2",
    ]


# ---- the parser raises ValueError and nothing else ------------------------------------------------------------

_SYNTAX = st.text(alphabet="autolambdrn:=0123456789,-[] .eE+_\t", max_size=24)
_VALUES = st.one_of(
    st.text(max_size=24),
    _SYNTAX,
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(),
    st.lists(st.one_of(st.integers(min_value=-2, max_value=8), st.text(max_size=3), st.floats()), max_size=5),
    st.tuples(st.integers(), st.integers()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUES)
def test_parse_raises_only_value_error(config, value):
    for given_config in (None, config):
        try:
            spec = CompressionSpec.parse(value, given_config)
        except ValueError:
            continue
        assert CompressionSpec.parse(spec.label).label == spec.label
        assert spec.raw == parse_compression(value, given_config)
        if given_config is not None:
            indices = spec.expert_indices(config)
            assert indices is None or len(indices) == len(config.pooling_layers)
