"""`router_estimator="outcome"` (ours): a contextual-bandit router that predicts, per expert, whether the answer
survives, learnt from uniformly explored paths at one path's compute.

Hand-made tensors check the fit's direction and what it ignores; the model checks that training routes exactly
as `compression="random"` does (same draws, unscaled tokens), that the fit is the routers' own term, and that
inference and the cost dial read the predictions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small_config import IMAGE, ROUTER, make_config, set_constant_router

from dpn_model import DPNForConditionalGeneration
from dpn_model.losses import outcome_loss


def _batch():
    prompt = [1, 5, 6, *[IMAGE] * 64, 20, 21, ROUTER, 30, 31, 40, 41]
    ids = torch.tensor([prompt, prompt[:-1] + [42], prompt[:-1] + [43], prompt[:-2] + [44, 45]])
    labels = ids.clone()
    labels[:, :-2] = -100
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, labels, images


def _model(**overrides) -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config(router_estimator="outcome", **overrides))


def test_outcome_fit_moves_the_taken_experts_prediction_toward_the_answers_probability():
    z = torch.zeros(2, 1, 3, requires_grad=True)
    probs = torch.sigmoid(z)  # 0.5 everywhere
    # sample 0 answered on expert 1 (loss 0.01: p ~ 0.99), sample 1 lost its answer on expert 2 (loss 5)
    loss = outcome_loss(probs, torch.tensor([[1], [2]]), torch.tensor([0.01, 5.0]))
    loss.backward()
    assert z.grad[0, 0, 1] < 0 and z.grad[1, 0, 2] > 0  # descent raises the first, lowers the second
    untaken = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.all(z.grad[0, 0][untaken[0]] == 0) and torch.all(z.grad[1, 0][untaken[1]] == 0)
    targets = torch.exp(-torch.tensor([0.01, 5.0]))
    want = F.binary_cross_entropy(torch.full((2,), 0.5), targets)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_outcome_fit_ignores_unrouted_pairs_and_is_zero_without_any():
    z = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = torch.sigmoid(z)
    choices = torch.tensor([[0, 1], [2, -1], [-1, -1]])
    outcome_loss(probs, choices, torch.tensor([0.3, 1.0, 9.0])).backward()
    assert torch.all(z.grad[2] == 0) and torch.all(z.grad[1, 1] == 0)
    none = outcome_loss(probs, torch.full((3, 2), -1), torch.zeros(3))
    assert none.item() == 0.0 and none.requires_grad


def test_training_routes_as_random_routing_does():
    # same draws, same tokens (no gate scales them): the decoder learns exactly what compression="random" teaches
    model = _model()
    ids, labels, images = _batch()
    model.train()
    torch.manual_seed(3)
    routed = model(input_ids=ids, pixel_values=images, labels=labels)
    torch.manual_seed(3)
    random = model(input_ids=ids, pixel_values=images, labels=labels, compression="random")
    assert torch.equal(routed.expert_choices, random.expert_choices)
    assert torch.allclose(routed.logits, random.logits, atol=1e-6)
    assert routed.lm_loss.item() == pytest.approx(random.lm_loss.item(), rel=1e-6)
    # and the routers ran: per-expert predictions, not a distribution
    probs = routed.router_probs
    assert probs.shape[-1] == 3 and ((probs > 0) & (probs < 1)).all()
    assert not torch.allclose(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_training_explores_every_feasible_expert_whatever_the_router_predicts():
    model = _model()
    set_constant_router(model, (1000.0, -1000.0, -1000.0))  # expert 0 predicted certain, the others hopeless
    ids, labels, images = _batch()
    model.train()
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        seen |= set(model.model(input_ids=ids, pixel_values=images).expert_choices[:, 0].tolist())
    assert len(seen - {-1}) > 1
    model.eval()
    assert set(model.model(input_ids=ids, pixel_values=images).expert_choices[:, 0].tolist()) - {-1} == {0}


def test_the_fit_is_the_routers_own_term_and_replaces_the_routing_loss():
    model = _model(router_reinforce_weight=2.0)
    ids, labels, images = _batch()
    model.train()
    out = model(input_ids=ids, pixel_values=images, labels=labels)
    assert out.routing_loss is None  # the paper's routing loss prices softmax probabilities: not applied
    assert out.loss.item() == pytest.approx((out.lm_loss + 2.0 * out.reinforce_loss).item(), rel=1e-6)
    out.reinforce_loss.backward()
    assert all(stage.router.out.weight.grad.abs().sum() > 0 for stage in model.model.pyramid)
    # the fit shapes what the routers read (the decoder's state at <router>), as the REINFORCE term does
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert model(input_ids=ids, pixel_values=images, labels=labels).reinforce_loss is None


def test_inference_takes_the_likeliest_expert_and_the_dial_trades_it_for_tokens():
    model = _model(inference_token_floor=None)
    # every expert predicted to answer at ~0.8 (sigmoid(logit / temperature)), the dense one a little more surely:
    # 0.79 for expert 0 (dense), 0.77 for the others
    set_constant_router(model, (1.0, 0.9, 0.9))
    model.eval()
    ids, _, images = _batch()
    plain = model.model(input_ids=ids, pixel_values=images).expert_choices
    dialled = model.model(input_ids=ids, pixel_values=images, compression="auto:lambda=2").expert_choices
    assert (plain[:, 0] == 0).all()  # the likeliest to answer
    assert (dialled[:, 0] > 0).all()  # a small loss of likelihood bought with most of the tokens
