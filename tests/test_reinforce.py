"""`router_estimator="reinforce"` (ours, not the authors'): a score-function term that prices each sample's path.

Hand-made tensors check the estimator's direction, its baseline and the token floor; the model checks that the
term is added in training only and that the reference (`"scale"`) is unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from small_config import IMAGE, ROUTER, make_config

from dpn_model import DPNForConditionalGeneration
from dpn_model.modeling import per_sample_lm_loss, reinforce_loss


def _probs(logits: list[list[list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.tensor(logits, requires_grad=True)
    return z, torch.softmax(z, -1)


def test_reinforce_raises_the_path_that_answered_better_and_lowers_the_one_that_lost():
    # two samples, one pooling layer, uniform routers; sample 0 took expert 0 and did well, sample 1 expert 2 badly
    z, probs = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    choices = torch.tensor([[0], [2]])
    loss = reinforce_loss(probs, feasible, choices, torch.tensor([0.1, 2.0]), torch.zeros(2), 0.0)
    loss.backward()
    # gradient descent on z moves against the gradient: sample 0's expert 0 up, sample 1's expert 2 down
    assert z.grad[0, 0, 0] < 0 and z.grad[1, 0, 2] > 0
    # advantages are +-1.9 against the other sample: -mean(A * log(1/3)) = 0 since they cancel
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_reinforce_prices_visual_tokens():
    # equal LM losses: the sample whose path kept fewer tokens has the larger reward
    z, probs = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    choices = torch.tensor([[0], [2]])
    reinforce_loss(
        probs, feasible, choices, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.25]), 0.5
    ).backward()
    assert z.grad[0, 0, 0] > 0 and z.grad[1, 0, 2] < 0
    # with no price on tokens the same batch carries no signal
    z2, probs2 = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    reinforce_loss(
        probs2, feasible, choices, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.25]), 0.0
    ).backward()
    assert torch.allclose(z2.grad, torch.zeros_like(z2.grad))


def test_reinforce_uses_the_distribution_the_floor_allowed():
    # only expert 0 was feasible for sample 0 at layer 1: that choice was forced and gets no gradient
    z, probs = _probs([[[0.3, -0.2, 0.5], [0.1, 0.4, -0.3]], [[0.0, 0.2, 0.1], [0.2, 0.0, 0.0]]])
    feasible = torch.ones(2, 2, 3, dtype=torch.bool)
    feasible[0, 1, 1:] = False
    choices = torch.tensor([[1, 0], [2, 1]])
    reinforce_loss(probs, feasible, choices, torch.tensor([0.2, 1.5]), torch.zeros(2), 0.0).backward()
    assert torch.allclose(z.grad[0, 1], torch.zeros(3), atol=1e-7)
    assert z.grad[0, 0].abs().sum() > 0 and z.grad[1].abs().sum() > 0


def test_reinforce_ignores_unrouted_samples_and_needs_two_routed():
    z, probs = _probs([[[0.0, 1.0, 0.0]], [[0.5, 0.0, 0.0]], [[0.0, 0.0, 2.0]]])
    feasible = torch.ones(3, 1, 3, dtype=torch.bool)
    # sample 2 had no image (-1): neither in the baseline nor in the gradient
    loss = reinforce_loss(
        probs, feasible, torch.tensor([[1], [0], [-1]]), torch.tensor([0.1, 1.0, 9.0]), torch.zeros(3), 0.0
    )
    loss.backward()
    assert torch.allclose(z.grad[2], torch.zeros(3))
    two = reinforce_loss(
        probs[:2], feasible[:2], torch.tensor([[1], [0]]), torch.tensor([0.1, 1.0]), torch.zeros(2), 0
    )
    assert loss.item() == pytest.approx(two.item())
    one = reinforce_loss(
        probs, feasible, torch.tensor([[1], [-1], [-1]]), torch.zeros(3), torch.zeros(3), 0.0
    )
    assert one.item() == 0.0 and one.requires_grad


def test_per_sample_lm_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, -100, -100, 6]])
    got = per_sample_lm_loss(logits, labels)
    for b in range(2):
        want = F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100)
        assert got[b].item() == pytest.approx(want.item(), rel=1e-6)


def _batch():
    prompt = [1, 5, 6, *[IMAGE] * 64, 20, 21, ROUTER, 30, 31, 40, 41]
    ids = torch.tensor([prompt, prompt[:-1] + [42], prompt[:-1] + [43]])
    labels = ids.clone()
    labels[:, :-2] = -100
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, labels, images


def test_model_adds_the_term_in_training_only():
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(
        make_config(router_estimator="reinforce", router_reinforce_weight=2.0)
    )
    ids, labels, images = _batch()
    model.train()
    torch.manual_seed(1)
    out = model(input_ids=ids, pixel_values=images, labels=labels)
    assert out.reinforce_loss is not None
    expected = out.lm_loss + 0.001 * out.routing_loss + 2.0 * out.reinforce_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert model.model.pyramid[0].router.out.weight.grad.abs().sum() > 0

    reference = copy.deepcopy(model)
    reference.config.router_estimator = "scale"
    torch.manual_seed(1)
    ref = reference(input_ids=ids, pixel_values=images, labels=labels)
    assert ref.reinforce_loss is None
    assert ref.loss.item() == pytest.approx((ref.lm_loss + 0.001 * ref.routing_loss).item(), rel=1e-6)
    model.eval()
    assert model(input_ids=ids, pixel_values=images, labels=labels).reinforce_loss is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_estimator": "gumbel"}, "router_estimator must be one of"),
        ({"router_cost_weight": -1.0}, "router_cost_weight must be >= 0"),
        ({"router_reinforce_weight": float("nan")}, "router_reinforce_weight must be >= 0"),
    ],
)
def test_estimator_fields_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_reference_estimator_is_the_default():
    assert make_config().router_estimator == "scale"
