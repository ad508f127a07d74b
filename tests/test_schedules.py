"""`compression` as a per-layer schedule (a static pyramid) and as random routing: parsing, shapes, FLOPs, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from small_config import IMAGE, PAD, ROUTER, VOCAB, make_config

from dpn_model import DPNConfig, DPNForConditionalGeneration
from dpn_model import flops as flops_lib
from dpn_model.configuration import compression_label, forced_expert_indices, parse_compression


def prompt(pre: int = 3, post: int = 4) -> list[int]:
    return [1, *range(5, 5 + pre), *[IMAGE] * 64, *range(20, 20 + post), ROUTER, 30, 31]


@pytest.fixture(scope="module")
def config() -> DPNConfig:
    return make_config()


@pytest.fixture(scope="module")
def model(config) -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- parsing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("auto", "auto"), ("AUTO", "auto"), ("random", "random"), (2, 2), ("2", 2), (1, 1),
        ([1, 2, 4], (1, 2, 4)), ((4, 4, 1), (4, 4, 1)), ("1,2,4", (1, 2, 4)), ("1, 2, 4", (1, 2, 4)),
        ("1-2-4", (1, 2, 4)), ("[1, 2, 4]", (1, 2, 4)),
    ],
)  # fmt: skip
def test_parse_compression_accepted_forms(config, value, parsed):
    assert parse_compression(value, config) == parsed
    assert parse_compression(compression_label(value), config) == parsed  # the label reads back


@pytest.mark.parametrize(
    "value, message",
    [
        ([1, 2], r"has 2 factor\(s\) but the model pools after 3 layer\(s\)"),
        ("1,2,4,4", r"has 4 factor\(s\)"),
        ([1, 2, 3], r"factor\(s\) \[3\] match no pooling expert.*factors \[1, 2, 4\]"),
        (8, r"factor\(s\) \[8\] match no pooling expert"),
        ("fast", r"'fast' is not a compression factor.*\('auto', 'random'\)"),
        ("1,,2", "not understood"),
        ("", "not understood"),
        ([], "schedule is empty"),
        (0, "not a compression factor"),
        (True, "not a compression factor"),
        (2.5, "not a compression factor"),
        ([1, "x", 4], "'x' is not a compression factor"),
    ],
)
def test_parse_compression_errors_are_clear(config, value, message):
    with pytest.raises(ValueError, match=message):
        parse_compression(value, config)


def test_allowed_factors_come_from_the_experts():
    config = make_config(expert_strides=[[1, 1], [2, 2], [4, 4]], routing_loss_scales=[0, 1, 2])
    assert parse_compression("1,4,16", config) == (1, 4, 16)
    assert forced_expert_indices("1,4,16", config) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"\[2\] match no pooling expert"):
        parse_compression([1, 2, 4], config)
    # any object with the two fields will do (the training config checks before a model exists)
    pyramid = SimpleNamespace(expert_strides=[[1, 1], [1, 2]], pooling_layers=[8, 16])
    assert parse_compression([1, 2], pyramid) == (1, 2)
    with pytest.raises(ValueError, match="pools after 2"):
        parse_compression([1, 2, 2], pyramid)
    # without a config only the form is checked
    assert parse_compression("3,5") == (3, 5)


def test_forced_expert_indices_and_label(config):
    assert forced_expert_indices(2, config) == [1, 1, 1]
    assert forced_expert_indices([1, 2, 4], config) == [0, 1, 2]
    assert forced_expert_indices("auto", config) is None and forced_expert_indices("random", config) is None
    assert [compression_label(v) for v in ("auto", 2, [1, 2, 4], "1,2,4")] == ["auto", "2", "1-2-4", "1-2-4"]


# ---- forward and generate ---------------------------------------------------------------------------------


def test_schedule_shapes_forward(model, images):
    ids = torch.tensor([prompt()])
    text = ids.shape[1] - 64
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images[:1], compression=[1, 2, 4])
        same = model(input_ids=ids, pixel_values=images[:1], compression="1,2,4")
    # 1x after layer 1 (8x8), 1x2 after layer 2 (8x4), 2x2 after layer 3 (4x2)
    assert out.visual_tokens[0].tolist() == [64, 64, 32, 8]
    assert out.layer_seq_lens[0].tolist() == [text + 64, text + 64, text + 32, text + 8]
    assert out.layer_seq_lens[0].tolist() == flops_lib.layer_seq_lens_for(model.config, text, [1, 2, 4])
    assert out.expert_choices[0].tolist() == [0, 1, 2]
    assert out.router_probs is None and out.routing_loss is None
    assert out.logits.shape == (1, text + 8, VOCAB)
    assert torch.equal(out.logits, same.logits)
    with torch.no_grad():
        pyramid = model(input_ids=ids, pixel_values=images[:1], compression=(4, 1, 2))
    assert pyramid.visual_tokens[0].tolist() == [64, 16, 16, 8]


def test_uniform_schedule_equals_the_fixed_rate(model, images):
    ids = torch.tensor([prompt()])
    with torch.no_grad():
        fixed = model(input_ids=ids, pixel_values=images[:1], compression=2)
        schedule = model(input_ids=ids, pixel_values=images[:1], compression=[2, 2, 2])
    assert torch.equal(fixed.logits, schedule.logits)
    assert torch.equal(fixed.visual_tokens, schedule.visual_tokens)


def test_schedule_generate_batched_and_cached(model, images):
    samples = [prompt(3, 4), prompt(1, 2)]
    width = max(map(len, samples))
    ids = torch.tensor([[PAD] * (width - len(s)) + s for s in samples])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in samples])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=4, do_sample=False)
    cached = model.generate(**kwargs, compression=[1, 2, 4])
    assert cached.shape == (2, width + 4)
    assert torch.equal(cached, model.generate(**kwargs, compression="1,2,4", use_cache=False))
    single = model.generate(input_ids=torch.tensor([samples[1]]), pixel_values=images[1:], max_new_tokens=4,
                            do_sample=False, compression=[1, 2, 4])  # fmt: skip
    assert cached[1, width:].tolist() == single[0, len(samples[1]) :].tolist()


def test_random_routing_forward_and_generate(model, images):
    ids = torch.tensor([prompt()] * 2)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images, compression="random", labels=ids)
    assert out.expert_choices.shape == (2, 3) and (out.expert_choices >= 0).all()
    assert out.router_probs is None and out.routing_loss is None and out.loss.item() == out.lm_loss.item()
    assert (out.visual_tokens >= 18).all()  # the token floor holds in evaluation too (inference_token_floor)
    generated = model.generate(input_ids=ids, pixel_values=images, compression="random", max_new_tokens=3,
                               do_sample=False)  # fmt: skip
    assert generated.shape == (2, ids.shape[1] + 3)
    # random routing needs no <router> token (auto does)
    no_router = torch.tensor([[t for t in prompt() if t != ROUTER]])
    with torch.no_grad():
        assert model(input_ids=no_router, pixel_values=images[:1], compression="random").logits is not None
        assert model(input_ids=no_router, pixel_values=images[:1], compression=[1, 2, 4]).logits is not None
    with pytest.raises(ValueError, match="needs a <router> token"):
        model(input_ids=no_router, pixel_values=images[:1])


@pytest.mark.parametrize("value, message", [([1, 2], "has 2 factor"), ([1, 2, 3], "match no pooling expert"),
                                            ("dense", "not a compression factor")])  # fmt: skip
def test_invalid_compression_in_forward_and_generate(model, images, value, message):
    ids = torch.tensor([prompt()])
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=images[:1], compression=value)
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, pixel_values=images[:1], compression=value, max_new_tokens=2)


# ---- FLOPs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [[1, 2, 4], [4, 4, 1], "random"])
def test_schedule_and_random_flops_match_flop_counter(model, images, compression):
    ids = torch.tensor([prompt(6, 9)])
    torch.manual_seed(0)
    with torch.no_grad(), flops_lib.flop_counter() as counter:
        out = model(input_ids=ids, pixel_values=images[:1], compression=compression)
    assert out.prefill_flops[0].item() == pytest.approx(counter.get_total_flops(), rel=0.05)
    # no router runs: exactly the analytic count of the lengths the layers ran on, without routers
    lengths = out.layer_seq_lens[0].tolist()
    assert out.prefill_flops[0].item() == flops_lib.prefill_flops(model.config, lengths, num_routed_layers=0)


def test_estimate_takes_schedules(config):
    text = 15
    est = flops_lib.estimate(config, text_len=text, compression=[1, 2, 4])
    assert est["visual_tokens_per_layer"] == [64, 64, 32, 8]
    assert est["total"] == flops_lib.prefill_flops(config, est["layer_seq_lens"], num_routed_layers=0)
    assert est["total"] == flops_lib.estimate(config, text_len=text, compression="1-2-4")["total"]
    four = flops_lib.estimate(config, text_len=text, compression=4)
    assert four["total"] < est["total"] < est["dense_total"]
    assert (
        flops_lib.estimate(config, text, [2, 2, 2])["total"] == flops_lib.estimate(config, text, 2)["total"]
    )
    with pytest.raises(ValueError, match="routes per sample"):
        flops_lib.estimate(config, text_len=text, compression="auto")
    with pytest.raises(ValueError, match="has 2 factor"):
        flops_lib.layer_seq_lens_for(config, text, [1, 2])
