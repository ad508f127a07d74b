"""Ragged routing: after a pooling stage whose samples took different experts, the rest of the prefill runs per
expert path, each group at its own length; outputs, cache and generation must equal the padded (unragged) run."""

from __future__ import annotations

import pytest
import torch
from small_config import make_config
from test_modeling import pad_batch, prompt

from dpn_model import DPNForConditionalGeneration

TOL = 1e-5


# the expert each sample (row of the batch below) should choose at each pooling layer, where the floor allows
TARGETS = [[0, 1, 2, 0, 1, 2], [1, 2, 0, 0, 2, 1], [2, 1, 1, 0, 0, 2]]


@pytest.fixture(scope="module")
def batch():
    samples = [prompt(64, 2, 3), prompt(64, 4, 1), prompt(64, 1, 6), prompt(0, 3, 2, router=False, image=False),
               prompt(64, 3, 3), prompt(64, 5, 2)]  # fmt: skip
    ids, mask = pad_batch(samples, side="left")
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return ids, mask, images


@pytest.fixture(scope="module")
def model(batch) -> DPNForConditionalGeneration:
    """A random model whose routers' last layers are solved (least squares on their inputs for `batch`) so that
    the samples of the batch choose different experts, `TARGETS`."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(make_config(train_token_floor=2, inference_token_floor=2)).eval()
    ids, mask, images = batch
    with torch.no_grad():
        for stage, target in zip(model.model.pyramid, TARGETS):
            seen: list[torch.Tensor] = []
            hook = stage.router.out.register_forward_hook(
                lambda m, args, out, seen=seen: seen.append(args[0])
            )
            model(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=False,
                  ragged=False)  # fmt: skip
            hook.remove()
            z = seen[0]  # (batch, hidden / 4)
            logits = 200.0 * torch.nn.functional.one_hot(torch.tensor(target), stage.router.out.out_features)
            stage.router.out.weight.copy_(torch.linalg.lstsq(z, logits.float()).solution.T)
    return model


def real_logits(out):
    """Logits by input position (batch, input_len, vocab), NaN where the position was pooled away or padding."""
    pos = out.token_positions
    width = int(pos.max()) + 1
    full = torch.full((pos.shape[0], width, out.logits.shape[-1]), float("nan"))
    for b in range(pos.shape[0]):
        keep = pos[b] >= 0
        full[b, pos[b][keep]] = out.logits[b][keep]
    return full


def assert_same(a, b):
    assert torch.equal(a.expert_choices, b.expert_choices)
    assert torch.equal(a.visual_tokens, b.visual_tokens)
    assert torch.equal(a.layer_seq_lens, b.layer_seq_lens)
    torch.testing.assert_close(a.prefill_flops, b.prefill_flops)
    la, lb = real_logits(a), real_logits(b)
    assert torch.equal(la.isnan(), lb.isnan())
    torch.testing.assert_close(la, lb, atol=TOL, rtol=0, equal_nan=True)


@torch.no_grad()
def test_samples_choose_different_experts(model, batch):
    """The fixture is what the other tests need: one batch, more than one path (else ragged is not exercised)."""
    ids, mask, images = batch
    out = model(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=False)
    paths = {tuple(row) for row in out.expert_choices[out.visual_tokens[:, 0] > 0].tolist()}
    assert len({p[0] for p in paths}) > 1 and len(paths) > 2, paths
    # the last decoder layer runs once per path group, each at its own length: fewer positions than padded
    calls = []
    last = model.model.language_model.layers[-1]
    hook = last.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape[:2])))
    for ragged in (True, False):
        model(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=False,
              ragged=ragged)  # fmt: skip
    hook.remove()
    *groups, (batch_size, padded_len) = calls
    assert len(groups) > 1 and sum(g for g, _ in groups) == batch_size
    assert sum(g * n for g, n in groups) < batch_size * padded_len
    assert (
        sum(g * n for g, n in groups) <= int(out.layer_seq_lens[:, -1].sum()) + 2 * batch_size
    )  # text padding


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_ragged_auto_equals_padded_auto(model, batch, side):
    ids, mask, images = batch
    if side == "right":
        lengths = mask.sum(-1)
        ids = torch.stack([torch.cat([r[-n:], r[:-n]]) for r, n in zip(ids, lengths)])
        mask = torch.stack([torch.cat([m[-n:], m[:-n]]) for m, n in zip(mask, lengths)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=True,
                  output_hidden_states=True)  # fmt: skip
    a, b = model(**kwargs, ragged=True), model(**kwargs, ragged=False)
    assert_same(a, b)
    assert len(a.hidden_states) == len(b.hidden_states)
    for s, (ma, mb) in enumerate(zip(a.cache.segment_masks, b.cache.segment_masks)):
        assert torch.equal(ma.sum(-1), mb.sum(-1)), s
    assert torch.equal(a.token_positions.sort(-1).values[:, -8:], b.token_positions.sort(-1).values[:, -8:])


@torch.no_grad()
def test_cache_decodes_the_same_tokens(model, batch):
    """Greedy generation (prefill + cached decode of the whole batch) gives the same tokens ragged or not."""
    ids, mask, images = batch
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", max_new_tokens=6,
                  do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    a = model.generate(**kwargs, ragged=True)
    b = model.generate(**kwargs, ragged=False)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sa, sb, atol=TOL, rtol=0)


@pytest.mark.parametrize("compression", [1, 2, 4, [1, 2, 4], "2,1,4"])
@torch.no_grad()
def test_static_rates_unchanged(model, batch, compression):
    """A forced rate or schedule takes one path for every sample with an image (the text-only sample, which is
    not pooled, is a group of its own): the same outputs, within float rounding, ragged or not; bit for bit when
    every sample has an image."""
    ids, mask, images = batch
    kwargs = dict(
        input_ids=ids, attention_mask=mask, pixel_values=images, compression=compression, use_cache=True
    )
    a, b = model(**kwargs, ragged=True), model(**kwargs, ragged=False)
    assert_same(a, b)
    for ma, mb in zip(a.cache.segment_masks, b.cache.segment_masks):
        assert torch.equal(ma.sum(-1), mb.sum(-1))
    keep = torch.tensor([0, 1, 2, 4, 5])  # drop the text-only sample
    kwargs.update(input_ids=ids[keep], attention_mask=mask[keep])
    a, b = model(**kwargs, ragged=True), model(**kwargs, ragged=False)
    assert torch.equal(a.logits, b.logits)
    for ma, mb in zip(a.cache.segment_masks, b.cache.segment_masks):
        assert torch.equal(ma, mb)


def test_gradients_flow_in_training(model, batch):
    """Training with ragged routing: same loss as padded, and the routers and decoder get the same gradients."""
    ids, mask, images = batch
    # loss on the answers (and the text after the image, which the pooled visual tokens predict), not on padding
    answer = (ids >= 20) & (ids < 40)
    labels = ids.masked_fill(~answer, -100)
    model.train()
    try:
        grads = []
        for ragged in (True, False):
            model.zero_grad()
            torch.manual_seed(7)  # the same sampled experts
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images, labels=labels, compression="auto",
                        ragged=ragged)  # fmt: skip
            out.loss.backward()
            grads.append((out.loss.detach(), out.expert_choices, {n: p.grad.clone() for n, p in
                          model.named_parameters() if p.grad is not None}))  # fmt: skip
    finally:
        model.zero_grad()
        model.eval()
    (la, ca, ga), (lb, cb, gb) = grads
    if not torch.equal(ca, cb):
        pytest.skip("the sampled experts differed between the two runs")
    torch.testing.assert_close(la, lb, atol=TOL, rtol=0)
    assert ga.keys() == gb.keys() and any(".router." in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-4, rtol=1e-3, msg=n)


@torch.no_grad()
def test_default_is_ragged_at_inference_and_padded_in_training(model, batch):
    """Without `ragged`, eval splits by path and training does not: under ZeRO-3 every rank must run the same
    modules in the same order, so a training forward calls each decoder layer once, whatever the paths."""
    ids, mask, images = batch
    calls = []
    hook = model.model.language_model.layers[-1].register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        model(input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=False)
        at_inference, calls[:] = len(calls), []
        model.train()
        torch.manual_seed(0)
        out = model(
            input_ids=ids, attention_mask=mask, pixel_values=images, compression="auto", use_cache=False
        )
    finally:
        model.eval()
        hook.remove()
    assert at_inference > 1  # the fixture's batch takes several paths (test_samples_choose_different_experts)
    assert len({tuple(r) for r in out.expert_choices.tolist()}) > 1 and len(calls) == 1
