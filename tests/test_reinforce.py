"""`router_estimator="reinforce"` (ours, not the authors'): a score-function term that prices each sample's path.

Hand-made tensors check the estimator's direction, its baseline and the token floor; the model checks that the
term is added in training only and that the reference (`"scale"`) is unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from small_config import IMAGE, ROUTER, make_config, set_constant_router

from dpn_model import DPNForConditionalGeneration
from dpn_model.losses import exploring, per_sample_lm_loss, reinforce_loss


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


def test_reinforce_groups_compare_a_sample_only_with_its_own_other_paths():
    # rows 0, 1: sample A routed twice; rows 2, 3: sample B (a harder question) routed twice
    logits = [[[0.0, 0.0, 0.0]]] * 4
    feasible = torch.ones(4, 1, 3, dtype=torch.bool)
    choices = torch.tensor([[0], [2], [0], [2]])
    # expert 2 loses 0.1 nats on A and 0.1 on B; B is 3 nats harder whatever the path
    losses = torch.tensor([0.1, 0.2, 3.1, 3.2])
    z, probs = _probs(logits)
    reinforce_loss(
        probs, feasible, choices, losses, torch.zeros(4), 0.0, groups=torch.tensor([0, 0, 1, 1])
    ).backward()
    # within each sample the better path (expert 0) is raised and the worse (2) lowered, on both samples
    assert z.grad[0, 0, 0] < 0 and z.grad[2, 0, 0] < 0
    assert z.grad[1, 0, 2] > 0 and z.grad[3, 0, 2] > 0
    # the batch baseline instead credits B's difficulty to its paths: both of B's experts are lowered
    zb, probs_b = _probs(logits)
    reinforce_loss(probs_b, feasible, choices, losses, torch.zeros(4), 0.0).backward()
    assert zb.grad[2, 0, 0] > 0 and zb.grad[3, 0, 2] > 0
    # a row whose group has no other routed row has no baseline: no gradient reaches it
    zs, probs_s = _probs(logits[:3])
    groups = torch.tensor([0, 0, 1])
    reinforce_loss(
        probs_s, feasible[:3], choices[:3], losses[:3], torch.zeros(3), 0.0, groups=groups
    ).backward()
    assert torch.allclose(zs.grad[2], torch.zeros(3)) and zs.grad[0].abs().sum() > 0


def test_reinforce_entropy_bonus_pulls_a_saturated_router_back_toward_the_allowed_experts():
    # both rows took expert 0 with equal rewards: no REINFORCE signal, only the bonus acts
    logits = [[[4.0, 0.0, 0.0]], [[4.0, 0.0, 0.0]]]
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    feasible[1, 0, 2] = False  # the floor forbids expert 2 for row 1: the bonus ignores it
    choices = torch.tensor([[0], [0]])
    z, probs = _probs(logits)
    loss = reinforce_loss(probs, feasible, choices, torch.ones(2), torch.zeros(2), 0.0, entropy_weight=0.1)
    loss.backward()
    p = torch.softmax(torch.tensor([4.0, 0.0, 0.0]), -1)
    p1 = torch.softmax(torch.tensor([4.0, 0.0]), -1)
    entropy = (-(p * p.log()).sum() - (p1 * p1.log()).sum()) / 2
    assert loss.item() == pytest.approx(-0.1 * entropy.item(), rel=1e-5)
    # descent lowers the favoured expert's logit and raises the allowed others'
    assert z.grad[0, 0, 0] > 0 and z.grad[0, 0, 1] < 0 and z.grad[0, 0, 2] < 0
    assert z.grad[1, 0, 1] < 0 and z.grad[1, 0, 2].abs() < 1e-7
    # without the bonus the same batch carries no gradient
    z0, probs0 = _probs(logits)
    reinforce_loss(probs0, feasible, choices, torch.ones(2), torch.zeros(2), 0.0).backward()
    assert torch.allclose(z0.grad, torch.zeros_like(z0.grad))


def test_reinforce_self_imitation_recovers_an_expert_the_router_had_given_up():
    # the router gives expert 2 almost no probability; exploration took it for row 1, which then did better
    logits = [[[12.0, 0.0, 0.0]], [[12.0, 0.0, 0.0]]]
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    choices = torch.tensor([[0], [2]])
    losses = torch.tensor([0.5, 0.1])

    def grad(**kw):
        z, probs = _probs(logits)
        reinforce_loss(probs, feasible, choices, losses, torch.zeros(2), 0.0, explore=0.3, **kw).backward()
        return z.grad

    plain, imitating = grad(), grad(imitation_weight=1.0)
    # REINFORCE scores the exploration mixture: its gradient on the given-up expert is ~p, i.e. ~0
    assert plain[1, 0, 2].abs() < 1e-4
    # self-imitation scores the router's own probability: the better path is raised at full strength
    assert imitating[1, 0, 2] < -0.1
    # the worse path (row 0, advantage < 0) is not imitated: its gradient is REINFORCE's alone
    assert torch.allclose(imitating[0], plain[0])


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


def test_critic_removes_what_the_question_explains():
    # sample 0 has the easy question (low loss whatever it picks), sample 1 the hard one. With the batch baseline
    # sample 0's choice is raised and sample 1's lowered; a critic that predicts exactly these advantages leaves
    # no policy gradient (the choices were no better or worse than the questions' expectation)
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    choices = torch.tensor([[0], [2]])
    losses, cost = torch.tensor([0.1, 2.0]), torch.zeros(2)
    z, probs = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    reinforce_loss(probs, feasible, choices, losses, cost, 0.0).backward()
    assert z.grad[0, 0, 0] < 0 and z.grad[1, 0, 2] > 0
    z, probs = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    exact = torch.tensor([[1.9], [-1.9]], requires_grad=True)  # reward - leave-one-out baseline
    loss = reinforce_loss(probs, feasible, choices, losses, cost, 0.0, values=exact)
    loss.backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-6)
    assert torch.allclose(exact.grad, torch.zeros(2, 1), atol=1e-6)  # and the critic's error is 0
    # a critic that predicts nothing yet is the batch baseline, and it learns towards the advantage
    z, probs = _probs([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    zero = torch.zeros(2, 1, requires_grad=True)
    loss = reinforce_loss(probs, feasible, choices, losses, cost, 0.0, values=zero)
    loss.backward()
    assert z.grad[0, 0, 0] < 0 and z.grad[1, 0, 2] > 0
    assert zero.grad[0, 0] < 0 and zero.grad[1, 0] > 0  # descent raises sample 0's value, lowers sample 1's


def test_model_critic_starts_at_the_batch_baseline_and_trains_only_itself():
    config = make_config(router_estimator="reinforce", router_baseline="critic")
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(config)
    critic = model.model.pyramid[0].router.critic
    assert critic is not None and critic.weight.abs().sum() == 0 and critic.bias.abs().sum() == 0
    assert (
        DPNForConditionalGeneration(make_config(router_estimator="reinforce")).model.pyramid[0].router.critic
        is None
    )
    ids, labels, images = _batch()
    model.train()
    torch.manual_seed(1)
    out = model(input_ids=ids, pixel_values=images, labels=labels)
    # at zero the critic changes nothing the router learns: the same policy gradient as the batch baseline
    batch_model = DPNForConditionalGeneration(make_config(router_estimator="reinforce"))
    batch_model.load_state_dict(model.state_dict(), strict=False)
    batch_model.train()
    torch.manual_seed(1)
    same = batch_model(input_ids=ids, pixel_values=images, labels=labels)
    assert same.reinforce_loss is not None
    out.reinforce_loss.backward()
    same.reinforce_loss.backward()
    router, batch_router = model.model.pyramid[0].router, batch_model.model.pyramid[0].router
    assert torch.allclose(router.out.weight.grad, batch_router.out.weight.grad, atol=1e-7)
    assert critic.weight.grad.abs().sum() > 0 and critic.bias.grad.abs().sum() > 0
    assert router.norm.weight.grad is None or torch.allclose(
        router.norm.weight.grad, batch_router.norm.weight.grad
    )
    model.eval()
    assert model.model(input_ids=ids, pixel_values=images).router_values is None


def test_exploration_mixes_in_the_uniform_over_feasible_experts_and_is_scored():
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    feasible = torch.tensor([[True, True, True], [True, True, False]])
    mixed = exploring(q, feasible, 0.3)
    assert torch.allclose(mixed, torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.5, 0.0]]))
    assert exploring(q, feasible, 0.0) is q
    # the term scores the mixture the expert was drawn from: a router sure of expert 0 that was overruled by
    # exploration (expert 2) still gets a finite gradient, and a better-than-batch result raises expert 2
    z, probs = _probs([[[9.0, 0.0, 0.0]], [[9.0, 0.0, 0.0]]])
    feasible = torch.ones(2, 1, 3, dtype=torch.bool)
    loss = reinforce_loss(
        probs, feasible, torch.tensor([[2], [0]]), torch.tensor([0.1, 2.0]), torch.zeros(2), 0.0, explore=0.3
    )
    loss.backward()
    assert torch.isfinite(loss) and z.grad[0, 0, 2] < 0


@pytest.mark.parametrize("explore", [0.0, 1.0])
def test_model_explores_in_training_only(explore):
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(make_config(router_estimator="reinforce", router_explore=explore))
    set_constant_router(model, (100.0, 0.0, 0.0))  # a huge logit for expert 0, whatever the sample
    ids, labels, images = _batch()
    model.train()
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        seen |= set(model.model(input_ids=ids, pixel_values=images).expert_choices[:, 0].tolist())
    # without exploration the sure router always gets its way; with it, experts are drawn whatever it says
    assert (len(seen - {-1}) > 1) == (explore > 0)
    model.eval()
    assert set(model.model(input_ids=ids, pixel_values=images).expert_choices[:, 0].tolist()) - {-1} == {0}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"router_estimator": "gumbel"}, "router_estimator must be one of"),
        ({"router_baseline": "ema"}, "router_baseline must be one of"),
        ({"router_explore": 1.5}, r"router_explore must be in \[0, 1\]"),
        ({"router_cost_weight": -1.0}, "router_cost_weight must be >= 0"),
        ({"router_reinforce_weight": float("nan")}, "router_reinforce_weight must be >= 0"),
    ],
)
def test_estimator_fields_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_reference_estimator_is_the_default():
    assert make_config().router_estimator == "scale"


def test_checkpoint_without_critic_starts_one_at_zero(tmp_path):
    # the quickstart turns the critic on over a dense checkpoint that has none: it must start as the batch baseline
    DPNForConditionalGeneration(make_config()).save_pretrained(tmp_path)
    model = DPNForConditionalGeneration.from_pretrained(
        tmp_path, router_estimator="reinforce", router_baseline="critic"
    )
    for stage in model.model.pyramid:
        assert stage.router.critic.weight.abs().sum() == 0 and stage.router.critic.bias.abs().sum() == 0
