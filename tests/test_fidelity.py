"""The authors' training semantics (DESIGN.md, "The model"), each on hand-made tensors, and old checkpoints.

Every rule is a `DPNConfig` field whose default is the reference's; the alternative stays an option, and a
checkpoint saved before these fields existed loads with the values it was trained with.
"""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from small_config import IMAGE, ROUTER, make_config
from torch import nn
from transformers import AutoModelForImageTextToText

from dpn_model import DPNConfig, DPNForConditionalGeneration, routing_loss
from dpn_model.configuration import LEGACY_DEFAULTS
from dpn_model.pooling import DynamicPoolingExperts, router_input

SCALES = [0.0, 1.0, 2.0]


def two_turn_prompt() -> list[int]:
    """<s> text <image x 64> question 1 <router> ASSISTANT answer question 2 <router> ASSISTANT."""
    return [1, 5, 6, *[IMAGE] * 64, 20, 21, ROUTER, 30, 31, 40, 22, 23, ROUTER, 30, 31]


class FixedRouter(nn.Module):
    """A router that returns the same hand-made probabilities for every sample."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.register_buffer("probs", torch.tensor(probs))

    def forward(self, router_hidden: torch.Tensor) -> torch.Tensor:
        return self.probs.expand(router_hidden.shape[0], -1)


@pytest.fixture(scope="module")
def model() -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config()).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_defaults_are_the_references():
    cfg = make_config()
    assert cfg.routing_loss_weight == 0.001
    assert cfg.routing_loss_expert == "argmax" and cfg.routing_loss_reduction == "global"
    assert cfg.train_token_floor == 18 and cfg.min_visual_tokens == 4
    assert DPNConfig.min_visual_tokens == 16  # the class default (the reference's); 4 in this tiny test
    assert cfg.router_bias is False and cfg.router_token_reduction == "mean"
    assert (
        cfg.routing_loss_target == 1.5 and cfg.routing_loss_scales == SCALES and cfg.router_temperature == 10
    )
    assert cfg.dpn_config_version == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(routing_loss_expert="best"), "routing_loss_expert"),
        (dict(routing_loss_reduction="sum"), "routing_loss_reduction"),
        (dict(router_token_reduction="first"), "router_token_reduction"),
        (dict(train_token_floor=-1), "train_token_floor"),
        (dict(inference_token_floor=2.5), "inference_token_floor"),
    ],
)
def test_new_fields_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


# ---- routing loss -------------------------------------------------------------------------------------

PROBS = torch.tensor(
    [[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
     [[0.1, 0.8, 0.1], [0.5, 0.25, 0.25]]]
)  # (batch 2, layers 2, experts 3); argmax experts: [[2, 0], [1, 0]]  # fmt: skip
CHOICES = torch.tensor([[2, 0], [1, 2]])  # sampled experts: differ from the argmax at (sample 1, layer 1)


def test_routing_loss_argmax_expert_global_hinge():
    routed = torch.ones(2, 2, dtype=torch.bool)
    # scale(argmax) * p(argmax): 2 * 0.5, 0 * 0.6, 1 * 0.8, 0 * 0.5 -> mean 0.45 -> 1.5 - 0.45
    loss = routing_loss(PROBS, CHOICES, routed, SCALES, 1.5)
    assert loss.item() == pytest.approx(1.05)
    # the sampled expert instead: 2 * 0.5, 0, 0.8, 2 * 0.25 -> mean 0.575 -> 0.925
    assert routing_loss(PROBS, CHOICES, routed, SCALES, 1.5, expert="sampled").item() == pytest.approx(0.925)


def test_routing_loss_global_differs_from_per_layer():
    # one hinge over the three routed pairs: (1.0 + 0 + 0.8) / 3 = 0.6 -> 0.9
    routed = torch.tensor([[True, True], [True, False]])
    assert routing_loss(PROBS, CHOICES, routed, SCALES, 1.5).item() == pytest.approx(0.9)
    # per layer: layer 0 mean(1.0, 0.8) = 0.9 -> 0.6; layer 1: 0 -> 1.5; averaged 1.05
    per_layer = routing_loss(PROBS, CHOICES, routed, SCALES, 1.5, reduction="per_layer")
    assert per_layer.item() == pytest.approx(1.05)
    # a layer above the target no longer offsets the other one inside a single hinge
    routed = torch.ones(2, 2, dtype=torch.bool)
    assert routing_loss(PROBS, CHOICES, routed, SCALES, 0.5).item() == pytest.approx(0.05)  # 0.5 - 0.45
    assert routing_loss(PROBS, CHOICES, routed, SCALES, 0.5, reduction="per_layer").item() == pytest.approx(
        0.25
    )
    # nothing routed: zero, with a graph
    none = routing_loss(PROBS.requires_grad_(), CHOICES, torch.zeros(2, 2, dtype=torch.bool), SCALES, 1.5)
    assert none.item() == 0.0 and none.requires_grad
    PROBS.requires_grad_(False)


def test_routing_loss_gradient_reaches_the_argmax_probabilities_only():
    probs = PROBS.clone().requires_grad_()
    routing_loss(probs, CHOICES, torch.ones(2, 2, dtype=torch.bool), SCALES, 1.5).backward()
    touched = probs.grad != 0
    assert touched.sum() == 2  # the 1x argmaxes have scale 0: only (0, 0, 2) and (1, 0, 1) get a gradient
    assert touched[0, 0, 2] and touched[1, 0, 1]
    assert probs.grad[0, 0, 2].item() == pytest.approx(-2 / 4)  # d/dp of 1.5 - mean(...) with scale 2


def test_model_uses_the_configured_routing_loss(model, image):
    ids = torch.tensor([two_turn_prompt()])
    for expert, reduction in (("argmax", "global"), ("sampled", "per_layer")):
        m = copy.deepcopy(model).train()
        m.config.routing_loss_expert, m.config.routing_loss_reduction = expert, reduction
        torch.manual_seed(0)
        out = m(input_ids=ids, pixel_values=image, labels=ids)
        routed = out.expert_choices >= 0
        expected = routing_loss(out.router_probs, out.expert_choices, routed, SCALES, 1.5, expert, reduction)
        assert out.routing_loss.item() == pytest.approx(expected.item())
        assert out.loss.item() == pytest.approx(
            out.lm_loss.item() + 0.001 * out.routing_loss.item(), rel=1e-6
        )


# ---- token floors ---------------------------------------------------------------------------------------


def test_feasible_experts_on_hand_made_grids():
    stage = DynamicPoolingExperts(make_config())  # experts 1x1, 1x2, 2x2
    rows, cols = torch.tensor([8, 6, 4, 8, 0]), torch.tensor([8, 6, 4, 4, 0])
    # tokens left: 64 -> 64/32/16; 36 -> 36/18/9; 16 -> 16/8/4; 32 -> 32/16/8; no image -> 0/0/0
    assert stage.tokens_after(rows, cols).tolist() == [
        [64, 32, 16],
        [36, 18, 9],
        [16, 8, 4],
        [32, 16, 8],
        [0, 0, 0],
    ]
    feasible = stage.feasible_experts(rows, cols, 18)
    assert feasible.tolist() == [
        [True, True, False],
        [True, True, False],  # exactly 18 is enough
        [True, False, False],  # nothing keeps 18: the expert keeping the most stays allowed
        [True, False, False],
        [True, True, True],
    ]
    assert stage.feasible_experts(rows, cols, None).all()


def _fixed_router_model(model, probs: list[float], **config) -> DPNForConditionalGeneration:
    m = copy.deepcopy(model)
    for key, value in config.items():
        setattr(m.config, key, value)
    for stage in m.model.pyramid:
        stage.router = FixedRouter(probs)
    return m


def test_training_never_chooses_an_expert_below_the_floor(model, image):
    """A router that wants 4x (98%): 64 -> 16 tokens is below 18, so training samples from 1x and 2x only."""
    m = _fixed_router_model(model, [0.01, 0.01, 0.98]).train()
    batch = 32
    ids = torch.tensor([two_turn_prompt()] * batch)
    torch.manual_seed(0)
    out = m(input_ids=ids, pixel_values=image.expand(batch, -1, -1, -1), labels=ids)
    assert (out.expert_choices[:, 0] != 2).all()
    assert set(out.expert_choices[:, 0].tolist()) == {0, 1}  # the feasible experts, renormalised: 50/50
    assert (out.visual_tokens >= 18).all()
    # the gate is the chosen expert's probability under the full distribution, as in the reference
    torch.testing.assert_close(out.router_probs[0, 0], torch.tensor([0.01, 0.01, 0.98]))
    # without the floor the router's 4x wins almost always
    free = _fixed_router_model(model, [0.01, 0.01, 0.98], train_token_floor=None).train()
    out = free(input_ids=ids, pixel_values=image.expand(batch, -1, -1, -1), labels=ids)
    assert (out.expert_choices[:, 0] == 2).float().mean() > 0.8
    assert out.visual_tokens[:, 1:].min() < 18


def test_inference_floor_default_and_reference_option(model, image):
    ids = torch.tensor([two_turn_prompt()])
    floored = _fixed_router_model(model, [0.02, 0.01, 0.97]).eval()
    with torch.no_grad():
        out = floored(input_ids=ids, pixel_values=image)
    # 4x would leave 16 < 18: the argmax among feasible experts is 1x at every layer
    assert out.expert_choices[0].tolist() == [0, 0, 0] and out.visual_tokens[0].tolist() == [64] * 4
    reference = _fixed_router_model(model, [0.02, 0.01, 0.97], inference_token_floor=None).eval()
    with torch.no_grad():
        out = reference(input_ids=ids, pixel_values=image)
    assert out.expert_choices[0].tolist() == [2, 2, 2] and out.visual_tokens[0].tolist() == [64, 16, 4, 1]


def test_random_routing_respects_the_floor(model, image):
    batch = 32
    ids = torch.tensor([two_turn_prompt()] * batch)
    pixels = image.expand(batch, -1, -1, -1)
    m = copy.deepcopy(model).train()
    torch.manual_seed(0)
    out = m(input_ids=ids, pixel_values=pixels, labels=ids, compression="random")
    assert set(out.expert_choices[:, 0].tolist()) == {0, 1} and (out.visual_tokens >= 18).all()
    assert out.router_probs is None and out.routing_loss is None and out.loss.item() == out.lm_loss.item()
    m.config.train_token_floor = None
    out = m(input_ids=ids, pixel_values=pixels, labels=ids, compression="random")
    assert set(out.expert_choices[:, 0].tolist()) == {0, 1, 2}


# ---- router ---------------------------------------------------------------------------------------------


def test_router_output_layer_has_no_bias_by_default():
    assert DynamicPoolingExperts(make_config()).router.out.bias is None
    assert DynamicPoolingExperts(make_config(router_bias=True)).router.out.bias is not None
    assert DynamicPoolingExperts(make_config()).router.down.bias is None


def test_router_input_on_hand_made_hidden_states():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    is_router = torch.tensor([[False, True, False, True, False], [False, False, False, False, True]])
    mean = router_input(hidden, is_router, "mean")
    torch.testing.assert_close(mean[0], (hidden[0, 1] + hidden[0, 3]) / 2)
    torch.testing.assert_close(mean[1], hidden[1, 4])
    last = router_input(hidden, is_router, "last")
    torch.testing.assert_close(last, torch.stack([hidden[0, 3], hidden[1, 4]]))
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert (
        router_input(hidden, none, "mean").abs().sum() == 0
        and router_input(hidden, none, "last").abs().sum() == 0
    )


@pytest.mark.parametrize("reduction", ["mean", "last"])
def test_model_router_reads_the_mean_over_every_router_position(model, image, reduction):
    """At every pooling layer, through the pooling of the layers before, the router reads its positions."""
    m = copy.deepcopy(model)
    m.config.router_token_reduction = reduction
    ids = torch.tensor([two_turn_prompt()])
    router_at = (ids[0] == ROUTER).nonzero().squeeze(-1)  # input positions, both after the image
    with torch.no_grad():
        out = m(input_ids=ids, pixel_values=image, output_hidden_states=True)
        for s, layer in enumerate(m.config.pooling_layers):
            hidden = out.hidden_states[layer][0]  # output of decoder layer `layer`, on stage s's sequence
            shift = 64 - int(out.visual_tokens[0, s])  # visual tokens pooled away before this stage
            rows = hidden[router_at - shift]
            read = rows.mean(0) if reduction == "mean" else rows[-1]
            expected = m.model.pyramid[s].router(read[None])[0]
            torch.testing.assert_close(out.router_probs[0, s], expected)
            other = rows[-1] if reduction == "mean" else rows.mean(0)
            assert not torch.allclose(out.router_probs[0, s], m.model.pyramid[s].router(other[None])[0])
    assert (out.expert_choices[0] >= 0).all() and out.visual_tokens[0, -1] < 64  # pooling did happen


# ---- checkpoints saved before these fields ----------------------------------------------------------------


def test_checkpoint_saved_before_the_fidelity_fields_loads_and_behaves_as_before(image, tmp_path):
    torch.manual_seed(0)
    old = DPNForConditionalGeneration(make_config(**LEGACY_DEFAULTS)).eval()
    with torch.no_grad():
        for stage in old.model.pyramid:
            stage.router.out.bias.uniform_(-1, 1)  # a trained bias that must come back
    old.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    for key in [*LEGACY_DEFAULTS, "dpn_config_version"]:
        del saved[key]
    path.write_text(json.dumps(saved))  # exactly what the old code wrote: none of the new keys
    assert "model.pyramid.0.router.out.bias" in safetensors.torch.load_file(tmp_path / "model.safetensors")

    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = loaded.config
    assert cfg.dpn_config_version == 1
    assert {key: getattr(cfg, key) for key in LEGACY_DEFAULTS} == LEGACY_DEFAULTS
    assert cfg.routing_loss_weight == 1.0
    for a, b in zip(old.model.pyramid, loaded.model.pyramid):
        torch.testing.assert_close(a.router.out.bias, b.router.out.bias, atol=0, rtol=0)
    # the old one-router prompt gives the same routing and logits as before
    ids = torch.tensor([[1, 5, 6, *[IMAGE] * 64, 20, 21, ROUTER, 30, 31]])
    with torch.no_grad():
        a, b = old(input_ids=ids, pixel_values=image), loaded.eval()(input_ids=ids, pixel_values=image)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.expert_choices, b.expert_choices)
    # and its training loss is the old one: sampled expert, per-layer hinge, weight 1
    loaded.train()
    torch.manual_seed(0)
    out = loaded(input_ids=ids, pixel_values=image, labels=ids)
    old_loss = routing_loss(out.router_probs, out.expert_choices, out.expert_choices >= 0, SCALES, 1.5,
                            expert="sampled", reduction="per_layer")  # fmt: skip
    assert out.routing_loss.item() == pytest.approx(old_loss.item())
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + out.routing_loss.item(), rel=1e-6)

    # saving it again writes the version and its values: it stays the same model
    loaded.save_pretrained(tmp_path / "again")
    resaved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert resaved["dpn_config_version"] == 1 and resaved["router_bias"] is True


def test_new_checkpoint_round_trips_with_the_reference_semantics(model, tmp_path):
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dpn_config_version"] == 2 and saved["routing_loss_weight"] == 0.001
    assert "model.pyramid.0.router.out.bias" not in safetensors.torch.load_file(
        tmp_path / "model.safetensors"
    )
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.routing_loss_expert == "argmax" and loaded.config.router_token_reduction == "mean"
    assert loaded.config.train_token_floor == 18 and loaded.config.router_bias is False
    # a config.json with the version but without a key gets the reference default for it
    del saved["inference_token_floor"]
    assert DPNConfig.from_dict(saved).inference_token_floor == 18
