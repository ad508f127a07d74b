"""DPNForConditionalGeneration: exactness against HF LLaVA, pooling, routing, cache, batching, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from small_config import IMAGE, PAD, ROUTER, VOCAB, make_config
from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from dpn_model import DPNConfig, DPNForConditionalGeneration, routing_loss
from dpn_model import flops as flops_lib
from dpn_model.loading import load_dpn_config


def llava_twin(model: DPNForConditionalGeneration) -> LlavaForConditionalGeneration:
    """HF's own LLaVA with the same weights (the router weights have no counterpart)."""
    cfg = model.config
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            text_config=cfg.text_config.to_dict(),
            vision_config=cfg.vision_config.to_dict(),
            image_token_id=cfg.image_token_id,
            image_seq_length=cfg.num_visual_tokens,
        )
    ).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.pyramid.")}
    llava.load_state_dict(state, strict=True)
    return llava


def prompt(n_visual: int, pre: int, post: int, router: bool = True, image: bool = True) -> list[int]:
    ids = [1, *range(5, 5 + pre)]
    ids += [IMAGE] * n_visual if image else []
    ids += [*range(20, 20 + post)]
    ids += [ROUTER] if router else []
    return ids + [30, 31]


def pad_batch(samples: list[list[int]], side: str = "left"):
    width = max(map(len, samples))
    ids, mask = [], []
    for s in samples:
        pad = [PAD] * (width - len(s))
        ids.append(pad + s if side == "left" else s + pad)
        ones, zeros = [1] * len(s), [0] * (width - len(s))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def model() -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config()).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pooling_layers=[4]), "pooling_layers"),
        (dict(pooling_layers=[2, 1]), "strictly increasing"),
        (dict(pooling_type="median"), "pooling_type"),
        (dict(expert_strides=[[1, 1], [0, 2]]), "positive integers"),
        (dict(expert_strides=[[1, 2], [2, 1]]), "distinct"),
        (dict(router_temperature=0), "router_temperature"),
        (dict(routing_loss_scales=[0, 1]), "one scale per expert"),
        (dict(router_token_id=VOCAB + 5), "outside the text vocabulary"),
        (dict(router_token_id=IMAGE), "must differ"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)


def test_config_round_trip(tmp_path):
    cfg = make_config(pooling_type="avg", router_temperature=5.0)
    cfg.save_pretrained(tmp_path)
    loaded = DPNConfig.from_pretrained(tmp_path)
    assert loaded.pooling_type == "avg" and loaded.router_temperature == 5.0
    assert loaded.expert_strides == [[1, 1], [1, 2], [2, 2]]
    assert loaded.image_seq_length == 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router_estimator="reinforc"), "router_estimator"),
        (dict(pooling_layers=[3, 1]), "strictly increasing"),
        (dict(router_token_id="x"), "router_token_id"),
        (dict(text_config={"num_hidden_layers": 3}), "valid: 1..2"),  # pooling after layer 3 of 3
    ],
)
def test_from_pretrained_overrides_are_validated(tmp_path, overrides, message):
    """Overrides given to `from_pretrained` are checked as constructor arguments are (the library would set them
    on the finished config, past every check), for the config and for the model alike."""
    make_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        DPNConfig.from_pretrained(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        DPNForConditionalGeneration.from_pretrained(tmp_path, **overrides)


def test_from_pretrained_overrides_are_normalised_and_merged(tmp_path):
    make_config().save_pretrained(tmp_path)
    cfg = DPNConfig.from_pretrained(tmp_path, pooling_layers=(1, 2), expert_strides=((1, 1), (2, 2)),
                                    routing_loss_scales=(0, 2), text_config={"num_hidden_layers": 3})  # fmt: skip
    assert cfg.pooling_layers == [1, 2] and cfg.expert_strides == [[1, 1], [2, 2]]
    assert cfg.routing_loss_scales == [0.0, 2.0]
    # a sub-config dict updates the saved one (as transformers does), it does not replace it
    assert cfg.text_config.num_hidden_layers == 3 and cfg.text_config.hidden_size == 64
    assert DPNConfig.from_pretrained(tmp_path, image_token_id=97).image_token_id == 97  # an alias of a field
    # a field of PreTrainedConfig itself is left to the library, as before
    assert DPNConfig.from_pretrained(tmp_path, dtype="bfloat16").dtype == "bfloat16"


def test_load_config_applies_overrides_and_names_unknown_keys(tmp_path):
    make_config().save_pretrained(tmp_path)
    assert (
        load_dpn_config(tmp_path, {"pooling_type": "avg", "routing_loss_weight": 0.1}).pooling_type == "avg"
    )
    assert load_dpn_config(tmp_path).pooling_type == "max"
    with pytest.raises(ValueError, match=r"'routing_los_weight' \(did you mean routing_loss_weight"):
        load_dpn_config(tmp_path, {"routing_los_weight": 1})
    with pytest.raises(ValueError, match="router_estimator"):
        load_dpn_config(tmp_path, {"router_estimator": "bogus"})


# ---- pooling experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling_type", ["max", "avg", "conv"])
def test_pooling_odd_grid_keeps_partial_windows(pooling_type):
    # the stage of a built model: its conv experts are averaging as the model's init leaves them
    stage = DPNForConditionalGeneration(make_config(pooling_type=pooling_type)).model.pyramid[0]
    grid = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5).expand(1, 64, 5, 5).contiguous()
    assert stage.pool(grid, 0).shape == (1, 64, 5, 5)
    assert stage.pool(grid, 1).shape == (1, 64, 5, 3)
    quarter = stage.pool(grid, 2)
    assert quarter.shape == (1, 64, 3, 3)
    # the bottom-right window holds only the real corner token 24: no padding value leaks in
    assert quarter[0, 0, 2, 2].item() == pytest.approx(24.0, abs=1e-5)
    first = {"max": 6.0, "avg": 3.0, "conv": 3.0}[pooling_type]  # window {0, 1, 5, 6}
    assert quarter[0, 0, 0, 0].item() == pytest.approx(first, abs=1e-5)


CONV_KEYS = [f"model.pyramid.{s}.convs.{e}.weight" for s in range(3) for e in range(3)]


def conv_weights(model: DPNForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".convs." in k}


def assert_averaging(model: DPNForConditionalGeneration) -> None:
    """Every conv expert is average pooling: weight 1 / (sh * sw) for its stride."""
    for stage in model.model.pyramid:
        for conv, (sh, sw) in zip(stage.convs, stage.strides):
            assert conv.weight.shape == (64, 1, sh, sw)
            assert torch.equal(conv.weight, torch.full_like(conv.weight, 1.0 / (sh * sw)))


def test_conv_experts_start_as_average_pooling():
    """transformers skips `_init_weights` for a custom module without direct parameters, so the init must be
    keyed on the conv itself; the state-dict names stay those of a plain Conv2d (older checkpoints load)."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(make_config(pooling_type="conv"))
    assert sorted(conv_weights(model)) == sorted(CONV_KEYS)
    assert_averaging(model)


def test_conv_experts_missing_from_a_checkpoint_start_as_average_pooling(model, tmp_path):
    """A max-pooling checkpoint loaded as conv has no conv weights: they are initialised, as averaging."""
    model.save_pretrained(tmp_path)
    loaded, info = DPNForConditionalGeneration.from_pretrained(
        tmp_path, pooling_type="conv", output_loading_info=True
    )
    assert loaded.config.pooling_type == "conv"
    assert sorted(info["missing_keys"]) == sorted(CONV_KEYS)
    assert_averaging(loaded)


def test_conv_experts_saved_in_a_checkpoint_load_unchanged(tmp_path):
    """The init leaves loaded conv weights alone (a trained conv expert is not reset to averaging)."""
    torch.manual_seed(0)
    model = DPNForConditionalGeneration(make_config(pooling_type="conv"))
    with torch.no_grad():
        for conv in (c for stage in model.model.pyramid for c in stage.convs):
            conv.weight.fill_(0.123)
    model.save_pretrained(tmp_path)
    loaded, info = DPNForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, weight in conv_weights(loaded).items():
        assert torch.equal(weight, torch.full_like(weight, 0.123)), key


def test_routing_loss_sampled_per_layer_option_on_hand_made_probabilities():
    """The pre-reference option (checkpoints of config version 1): sampled expert, one hinge per layer.
    The reference default (argmax expert, one global hinge) is tested in test_fidelity.py."""
    probs = torch.tensor(
        [[[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], [[0.1, 0.8, 0.1], [0.5, 0.25, 0.25]]]
    )  # (batch 2, layers 2, experts 3)
    choices = torch.tensor([[2, 0], [1, 2]])
    routed = torch.ones(2, 2, dtype=torch.bool)
    old = dict(expert="sampled", reduction="per_layer")
    # layer 0: mean(2 * 0.5, 1 * 0.8) = 0.9 -> 1.5 - 0.9 = 0.6; layer 1: mean(0, 2 * 0.25) = 0.25 -> 1.25
    loss = routing_loss(probs, choices, routed, [0.0, 1.0, 2.0], 1.5, **old)
    assert loss.item() == pytest.approx((0.6 + 1.25) / 2)
    # a layer above target contributes 0; unrouted samples are left out of the mean
    routed = torch.tensor([[True, False], [False, True]])
    loss = routing_loss(probs, choices, routed, [0.0, 1.0, 2.0], 0.5, **old)
    # layer 0: 2 * 0.5 = 1.0 >= 0.5 -> 0; layer 1: 2 * 0.25 = 0.5 -> 0
    assert loss.item() == pytest.approx(0.0)


def test_router_receives_gradient(model, images):
    m = copy.deepcopy(model).train()
    ids, mask = pad_batch([prompt(64, 3, 4), prompt(64, 1, 2)])
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    out = m(input_ids=ids, attention_mask=mask, pixel_values=images[:2], labels=labels)
    assert out.routing_loss is not None and out.lm_loss is not None
    weight = m.config.routing_loss_weight
    assert weight == 0.001  # the reference's weight
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + weight * out.routing_loss.item(), rel=1e-5)
    out.loss.backward()
    for stage in m.model.pyramid:
        assert stage.router.out.weight.grad.abs().sum() > 0


# ---- exactness against Hugging Face LLaVA ---------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_matches_hf_llava(model, images, attn):
    m = copy.deepcopy(model)
    m.set_attn_implementation(attn)
    llava = llava_twin(m)
    llava.set_attn_implementation(attn)
    ids, mask = pad_batch([prompt(64, 3, 4), prompt(64, 1, 2), prompt(64, 2, 6)])
    with torch.no_grad():
        ours = m(input_ids=ids, attention_mask=mask, pixel_values=images[:3], compression=1)
        ref = llava(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=images[:3],
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0) * mask,
        )
    real = mask.bool()
    assert (ours.logits - ref.logits)[real].abs().max().item() <= 1e-4
    gen_ours = m.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=images[:3],
        compression=1,
        max_new_tokens=8,
        do_sample=False,
    )
    gen_ref = llava.generate(
        input_ids=ids, attention_mask=mask, pixel_values=images[:3], max_new_tokens=8, do_sample=False
    )
    assert torch.equal(gen_ours, gen_ref)


def text_logits(out, row: int) -> torch.Tensor:
    """Logits of one sample's text positions (pooled visual tokens and padding left out), in input order."""
    return out.logits[row][out.token_positions[row] >= 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["text", "image", "ragged"])
def test_prefill_is_causal(model, images, attn, case):
    """A prompt's logits at its first positions equal those of those positions alone, so no token sees a later
    one, with every attention implementation: also where a group runs unpadded ("text", "image" at
    compression 2, and "ragged", whose batch splits into one-sample groups after the first pooling layer)."""
    m = copy.deepcopy(model)
    m.set_attn_implementation(attn)
    full = {
        "text": [prompt(0, 6, 5, router=False, image=False)],
        "image": [prompt(64, 3, 6)],
        "ragged": [prompt(64, 3, 6), prompt(0, 2, 4, router=False, image=False)],
    }[case]
    cut = 5  # the prefix drops the last 5 tokens of each prompt: the image stays whole
    layers = []
    hook = m.model.language_model.layers[-1].register_forward_hook(
        lambda mod, a, o: layers.append(a[0].shape[0])
    )
    with torch.no_grad():
        outs = []
        for samples in (full, [s[:-cut] for s in full]):
            ids, mask = pad_batch(samples)
            pix = images[: sum(IMAGE in s for s in samples)] if any(IMAGE in s for s in samples) else None
            outs.append(m(input_ids=ids, attention_mask=mask, pixel_values=pix, compression=2))
    hook.remove()
    if case == "ragged":  # the padded batch split, and each group ran the last layer alone (unpadded)
        assert layers[:2] == [1, 1]
    for row in range(len(full)):
        whole, prefix = text_logits(outs[0], row), text_logits(outs[1], row)
        assert prefix.shape[0] == whole.shape[0] - cut
        torch.testing.assert_close(whole[: prefix.shape[0]], prefix, atol=1e-5, rtol=0)


# ---- batching, padding and the cache -------------------------------------------------------------


def sharp_router(model: DPNForConditionalGeneration) -> DPNForConditionalGeneration:
    """A copy whose routers are decisive, so samples of one batch choose different experts (and, without the
    inference floor, every expert at every layer is open to them)."""
    m = copy.deepcopy(model)
    m.config.inference_token_floor = None
    generator = torch.Generator().manual_seed(5)  # fixed (not the tests run before); samples route apart
    with torch.no_grad():
        for stage in m.model.pyramid:
            weight = stage.router.out.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 50.0)
    return m


@pytest.mark.parametrize("compression", ["auto", 1, 2, 4])
def test_batch_equals_one_by_one(model, images, compression):
    m = sharp_router(model)
    samples = [prompt(64, 3, 4), prompt(64, 1, 2), prompt(64, 5, 1), prompt(0, 2, 3, image=False)]
    ids, mask = pad_batch(samples)
    pix = images[:3]
    batch = m.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pix,
        compression=compression,
        max_new_tokens=6,
        do_sample=False,
    )
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pix, compression=compression)
    if compression == "auto":
        routed = out.expert_choices[:3]
        assert len(set(map(tuple, routed.tolist()))) > 1, "the test needs samples choosing different experts"
        assert (out.expert_choices[3] == -1).all()  # text-only: nothing to pool
    for i, s in enumerate(samples):
        single = m.generate(
            input_ids=torch.tensor([s]),
            pixel_values=pix[i : i + 1] if i < 3 else None,
            compression=compression,
            max_new_tokens=6,
            do_sample=False,
        )
        assert batch[i, ids.shape[1] :].tolist() == single[0, len(s) :].tolist()


@pytest.mark.parametrize("compression", ["auto", 2, 4])
def test_cached_decoding_equals_recomputing(model, images, compression):
    """Per-layer cache lengths and positions: decoding with the cache equals re-running the prefix."""
    m = sharp_router(model)
    ids, mask = pad_batch([prompt(64, 3, 4), prompt(64, 1, 2)])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=images[:2],
        compression=compression,
        max_new_tokens=6,
        do_sample=False,
    )
    assert torch.equal(m.generate(**kwargs, use_cache=True), m.generate(**kwargs, use_cache=False))


@pytest.mark.parametrize("compression", ["auto", 4, [1, 2, 4]])
def test_prefill_then_decode_logits_equal_full_forward(model, images, compression):
    """The logits behind the test above: a prefill, then cached decode steps of one and two tokens, give the
    logits that one forward over the whole sequence gives at those positions."""
    m = sharp_router(model)
    ids, mask = pad_batch([prompt(64, 3, 4), prompt(64, 1, 2)])
    new = torch.tensor([[40, 41, 42], [43, 44, 45]])
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    kwargs = dict(compression=compression)
    with torch.no_grad():
        full = m(input_ids=full_ids, attention_mask=full_mask, pixel_values=images[:2], **kwargs)
        pre = m(input_ids=ids, attention_mask=mask, pixel_values=images[:2], use_cache=True, **kwargs)
        one = m(input_ids=new[:, :1], attention_mask=full_mask[:, :-2], cache=pre.cache, **kwargs)
        two = m(input_ids=new[:, 1:], attention_mask=full_mask, cache=one.cache, **kwargs)
    assert torch.equal(full.expert_choices, pre.expert_choices)
    assert one.logits.shape[1] == 1 and two.logits.shape[1] == 2
    decoded = torch.cat([pre.logits[:, -1:], one.logits, two.logits], dim=1)
    assert torch.allclose(full.logits[:, -4:], decoded, atol=1e-5)


def test_right_padding_matches_unpadded(model, images):
    samples = [prompt(64, 3, 4), prompt(64, 1, 2)]
    ids, mask = pad_batch(samples, side="right")
    for compression in ("auto", 1, 4):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=images[:2], compression=compression)
            for i, s in enumerate(samples):
                single = model(
                    input_ids=torch.tensor([s]), pixel_values=images[i : i + 1], compression=compression
                )
                rows = out.token_positions[i] >= 0
                mapped = out.logits[i][rows]
                ref = single.logits[0][single.token_positions[0] >= 0]
                assert torch.allclose(mapped, ref, atol=1e-5)


def test_sampling_generates_within_vocab(model, images):
    torch.manual_seed(3)
    ids, mask = pad_batch([prompt(64, 3, 4), prompt(64, 1, 2)])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=images[:2],
        do_sample=True,
        top_p=0.9,
        temperature=0.8,
        max_new_tokens=5,
    )
    assert out.shape == (2, ids.shape[1] + 5)
    assert int(out.max()) < VOCAB


def test_text_only_and_forced_without_router(model):
    ids = torch.tensor([prompt(0, 3, 4, router=False, image=False)])
    out = model(input_ids=ids)
    assert (out.expert_choices == -1).all() and out.logits.shape[1] == ids.shape[1]
    out = model(
        input_ids=torch.tensor([prompt(64, 1, 1, router=False)]),
        pixel_values=torch.zeros(1, 3, 32, 32),
        compression=2,
    )
    assert out.visual_tokens[0].tolist() == [64, 32, 16, 8]


def test_auto_without_router_token_is_a_clear_error(model, images):
    with pytest.raises(ValueError, match="needs a <router> token"):
        model(input_ids=torch.tensor([prompt(64, 1, 1, router=False)]), pixel_values=images[:1])


def test_bad_image_inputs_are_clear_errors(model, images):
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=torch.tensor([prompt(10, 1, 1)]), pixel_values=images[:1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=torch.tensor([prompt(64, 1, 1)]))
    with pytest.raises(ValueError, match="compression"):
        model(input_ids=torch.tensor([prompt(64, 1, 1)]), pixel_values=images[:1], compression=3)


def test_pooled_sequence_lengths_and_loss_alignment(model, images):
    s = prompt(64, 3, 4)
    ids = torch.tensor([s])
    labels = ids.masked_fill(ids == IMAGE, -100)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=images[:1], labels=labels, compression=4)
    text = len(s) - 64
    assert out.visual_tokens[0].tolist() == [64, 16, 4, 1]
    assert out.layer_seq_lens[0].tolist() == [text + 64, text + 16, text + 4, text + 1]
    # text tokens keep their order and ids through pooling
    kept = out.token_positions[0][out.token_positions[0] >= 0]
    assert ids[0, kept].tolist() == [t for t in s if t != IMAGE]
    # the LM loss is the next-token loss over the (moved) labels
    moved = labels[0, out.token_positions[0].clamp(min=0)].masked_fill(out.token_positions[0] < 0, -100)
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], moved[1:], ignore_index=-100)
    assert out.lm_loss.item() == pytest.approx(ref.item(), rel=1e-5)


# ---- save / load / convert ---------------------------------------------------------------------


def test_save_load_round_trip(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DPNForConditionalGeneration)
    ids = torch.tensor([prompt(64, 2, 2)])
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=images[:1]).logits
        b = loaded(input_ids=ids, pixel_values=images[:1]).logits
    assert torch.equal(a, b)


def test_convert_llava_checkpoint_directory(model, images, tmp_path):
    llava = llava_twin(model)
    llava.save_pretrained(tmp_path / "llava")
    dpn = DPNForConditionalGeneration.from_llava(str(tmp_path / "llava"), pooling_layers=[2]).eval()
    assert dpn.config.router_token_id == VOCAB and dpn.config.text_config.vocab_size == VOCAB + 1
    assert dpn.config.pooling_layers == [2]
    ids = torch.tensor([prompt(64, 2, 2, router=False)])
    with torch.no_grad():
        ref = llava(input_ids=ids, pixel_values=images[:1]).logits
        ours = dpn(input_ids=ids, pixel_values=images[:1], compression=1).logits
    assert (ours[..., :VOCAB] - ref).abs().max().item() <= 1e-4
    dpn.save_pretrained(tmp_path / "dpn")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "dpn")
    ids_router = torch.tensor([[*ids[0].tolist(), VOCAB]])
    with torch.no_grad():
        assert again(input_ids=ids_router, pixel_values=images[:1]).expert_choices.shape == (1, 1)


# ---- FLOPs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [1, 2, 4, "auto"])
def test_prefill_flops_match_flop_counter(model, images, compression):
    ids = torch.tensor([prompt(64, 6, 9)])
    with torch.no_grad(), flops_lib.flop_counter() as counter:
        out = model(input_ids=ids, pixel_values=images[:1], compression=compression)
    measured = counter.get_total_flops()
    assert out.prefill_flops[0].item() == pytest.approx(measured, rel=0.05)
