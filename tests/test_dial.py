"""The cost dial: `compression="auto:lambda=X"`, an inference-time knob on one trained model that trades accuracy
for prefill FLOPs (dpn_model.configuration.parse_compression, DPNModel._route), in forward, generate, the
evaluation job and the serving API."""

from __future__ import annotations

import pytest
import torch
from small_config import IMAGE, ROUTER, make_config

from dpn_model import DPNForConditionalGeneration
from dpn_model.configuration import compression_label, parse_compression, router_cost, routing_mode


def prompt() -> list[int]:
    return [1, 5, 6, 7, *[IMAGE] * 64, 20, 21, 22, ROUTER, 30, 31]


@pytest.fixture(scope="module")
def model() -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config()).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"input_ids": torch.tensor([prompt()] * 4), "pixel_values": images}


@pytest.mark.parametrize(
    "value, canonical, cost",
    [("auto:lambda=0.5", "auto:lambda=0.5", 0.5), ("AUTO:lambda=2.0", "auto:lambda=2", 2.0),
     ("auto:lambda=-1", "auto:lambda=-1", -1.0), ("auto:lambda=0", "auto", 0.0), ("auto", "auto", 0.0)],
)  # fmt: skip
def test_the_dial_parses_to_one_canonical_spelling(value, canonical, cost):
    parsed = parse_compression(value, make_config())
    assert parsed == canonical and compression_label(value) == canonical
    assert routing_mode(parsed) == "auto" and router_cost(parsed) == cost


@pytest.mark.parametrize(
    "value", ["auto:lambda=x", "auto:cost=1", "auto:lambda=inf", "auto:lambda=nan", "auto:"]
)
def test_a_bad_dial_is_an_error_naming_the_form(value):
    with pytest.raises(ValueError, match="auto:lambda=X"):
        parse_compression(value)


def test_lambda_zero_is_the_routers_own_choice(model, batch):
    with torch.no_grad():
        auto = model(**batch, compression="auto")
        zero = model(**batch, compression="auto:lambda=0")
    assert torch.equal(auto.logits, zero.logits) and torch.equal(auto.expert_choices, zero.expert_choices)


def test_the_dial_moves_flops_monotonically_between_dense_and_the_cheapest_feasible_path(model, batch):
    flops, experts = [], []
    with torch.no_grad():
        for lam in (-100.0, -4.0, -1.0, 0.0, 1.0, 4.0, 100.0):
            out = model(**batch, compression=f"auto:lambda={lam}")
            flops.append(float(out.prefill_flops.sum()))
            experts.append(out.expert_choices)
        dense = model(**batch, compression=1)
    assert all(a >= b for a, b in zip(flops, flops[1:]))  # more cost, never more FLOPs
    # a large negative cost keeps every visual token (the routers' own FLOPs aside, which dense runs without)
    assert flops[0] == pytest.approx(float(dense.prefill_flops.sum()), rel=1e-3)
    assert (experts[0] == 0).all()
    # a large positive cost takes the most compressing expert the token floor (18) allows: on the 64-token grid
    # 2x2 would leave 16, so 1x2 (32 tokens), then nothing further fits above the floor
    cheapest = experts[-1]
    assert (cheapest[:, 0] == 1).all() and flops[-1] < flops[0]
    with torch.no_grad():
        forced = model(**batch, compression=[2, 1, 1])
    assert flops[-1] == pytest.approx(float(forced.prefill_flops.sum()), rel=1e-3)


def test_generate_takes_the_dial(model, batch):
    kwargs = dict(**batch, max_new_tokens=3, do_sample=False)
    cached = model.generate(**kwargs, compression="auto:lambda=4")
    assert torch.equal(cached, model.generate(**kwargs, compression="auto:lambda=4", use_cache=False))


def test_training_config_refuses_the_dial():
    from dpn_base.config_models import ConfigError
    from jobs.training.config import load_train_config

    with pytest.raises((ConfigError, ValueError), match="inference-time knob"):
        load_train_config("configs/train_tiny.yaml", ["model.compression=auto:lambda=1"])


def test_dpn_eval_dial_adds_the_sweep_to_models_evaluated_in_auto():
    import argparse

    from jobs.evaluation import job as evaluate

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(
        ["--data", "d", "--model", "a=/x", "--model", "b=/y", "--compression", "b=1,2", "--dial", "1,-2"]
    )
    cfg = evaluate.config_from_args(args)
    assert cfg.dial == [1.0, -2.0]
    by_label = {m.label: m for m in cfg.models}
    config = make_config()
    assert evaluate._model_modes(by_label["a"], config, cfg)[-2:] == ["auto:lambda=1", "auto:lambda=-2"]
    assert "auto:lambda=1" not in evaluate._model_modes(by_label["b"], config, cfg)  # b has no auto mode
    unlabelled = evaluate.config_from_args(
        parser.parse_args(["--data", "d", "--model", "a=/x", "--compression", "auto:lambda=2"])
    )
    assert unlabelled.models[0].compressions == ["auto:lambda=2"]


def test_serving_accepts_the_dial_and_runs_it_as_its_own_rate():
    from serve_apps import compression

    config = make_config()
    assert compression.for_model("auto:lambda=0.50", config) == "auto:lambda=0.5"
    assert compression.for_model("auto:lambda=0", config) == "auto"
    with pytest.raises(ValueError, match="auto:lambda=X"):
        compression.check_form("auto:lambda=fast")
