"""The vision-encoder cache: identical images reuse the tower + projector output, answers unchanged, bounded."""

from __future__ import annotations

import pytest
import torch
from small_config import make_config
from test_modeling import pad_batch, prompt

from dpn_model import DPNForConditionalGeneration
from dpn_model.encoder_cache import EncoderCache

ENTRY = 64 * 64 * 4  # one image's features: 64 visual tokens x hidden 64, float32


@pytest.fixture(scope="module")
def model() -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config()).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def tower_calls(model):
    """Images the vision tower ran on, counted by a forward hook."""
    calls = []
    hook = model.model.vision_tower.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(len(kwargs.get("pixel_values", args[0] if args else None))),
        with_kwargs=True,
    )
    yield calls
    hook.remove()
    model.set_encoder_cache(None)


def turn(n_turn: int):
    """The prompt of turn `n_turn` of a chat about one image: the history grows, the image stays."""
    ids, mask = pad_batch([prompt(64, 2, 3 + 4 * n_turn)])
    return ids, mask


def chat(model, image, turns=3):
    """Greedy answers (tokens, scores) of a few turns about `image`."""
    answers = []
    for t in range(turns):
        ids, mask = turn(t)
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=image[None], max_new_tokens=4,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        answers.append((out.sequences, torch.stack(out.scores)))
    return answers


def test_multi_turn_chat_pays_the_tower_once_and_answers_the_same(model, images, tower_calls):
    plain = chat(model, images[0])
    assert sum(tower_calls) == 3
    cache = EncoderCache(max_bytes=10 * ENTRY)
    model.set_encoder_cache(cache)
    assert model.encoder_cache is cache
    cached = chat(model, images[0])
    assert sum(tower_calls) == 4  # one more run, for the first turn only
    assert (cache.hits, cache.misses, len(cache), cache.bytes_in_use) == (2, 1, 1, ENTRY)
    for (seq_a, scores_a), (seq_b, scores_b) in zip(plain, cached):
        assert torch.equal(seq_a, seq_b)
        assert torch.equal(scores_a, scores_b)


def test_batch_mixes_hits_and_misses_in_order(model, images, tower_calls):
    """A batch with a cached image, a new one and a repeat of the new one: the tower runs on the new one once,
    and every sample gets its own image's features (the logits equal the uncached run's)."""
    ids, mask = pad_batch([prompt(64, 2, 3), prompt(64, 1, 5), prompt(64, 3, 2)])
    batch_images = torch.stack([images[0], images[1], images[1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=batch_images, use_cache=False)
    with torch.no_grad():
        plain = model(**kwargs).logits
        model.set_encoder_cache(EncoderCache(max_bytes=10 * ENTRY))
        model(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=images[:1], use_cache=False)
        before = list(tower_calls)
        cached = model(**kwargs).logits
    assert tower_calls[len(before) :] == [1]
    assert torch.equal(plain, cached)


def test_eviction_respects_max_bytes_lru(model, images, tower_calls):
    cache = EncoderCache(max_bytes=2 * ENTRY + ENTRY // 2)  # room for two images
    model.set_encoder_cache(cache)
    ids, mask = pad_batch([prompt(64, 2, 3)])

    def run(i):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=images[i : i + 1], use_cache=False)

    for i in (0, 1, 0, 2):  # 0 is used again before 2 arrives: 1 is the least recently used
        run(i)
        assert cache.bytes_in_use <= cache.max_bytes
    assert (len(cache), cache.evictions, cache.bytes_in_use) == (2, 1, 2 * ENTRY)
    n = sum(tower_calls)
    run(0)  # still cached
    assert sum(tower_calls) == n
    run(1)  # was evicted
    assert sum(tower_calls) == n + 1


def test_entry_larger_than_the_cache_is_not_stored():
    cache = EncoderCache(max_bytes=100)
    cache.put("a", torch.zeros(26))  # 104 bytes
    assert (len(cache), cache.bytes_in_use, cache.get("a")) == (0, 0, None)


def test_zero_bytes_disables(model, images, tower_calls):
    cache = EncoderCache(0)
    model.set_encoder_cache(cache)
    assert not cache.enabled
    chat(model, images[0], turns=2)
    assert sum(tower_calls) == 2 and len(cache) == 0 and cache.hits == 0


def test_not_used_in_training_or_with_gradients(model, images, tower_calls):
    cache = EncoderCache(10 * ENTRY)
    model.set_encoder_cache(cache)
    ids, mask = pad_batch([prompt(64, 2, 3)])
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images[:1], use_cache=False)
    model(**kwargs)  # eval, gradients on: the features must carry a graph
    model.train()
    try:
        with torch.no_grad():
            model(**kwargs)
    finally:
        model.eval()
    assert sum(tower_calls) == 2 and len(cache) == 0 and cache.misses == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1GB", None, True])
def test_bad_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
        EncoderCache(bad)


def test_set_encoder_cache_takes_an_encoder_cache(model):
    with pytest.raises(TypeError, match="EncoderCache or None"):
        model.set_encoder_cache(1024)


def test_serve_replica_attaches_the_configured_cache(tmp_path):
    """`encoder_cache_bytes` in the serve app's args reaches every model the replica loads; 0 attaches none, a
    negative size is refused when the app is built."""
    from pydantic import ValidationError

    from dpn_model.presets import create_checkpoint
    from serve_apps.app import AppArgs
    from serve_apps.model import DPNServer

    ckpt = create_checkpoint("tiny", str(tmp_path / "ckpt"), seed=0)
    server = DPNServer(model=ckpt, device="cpu", encoder_cache_bytes=1 << 20)
    cache = server._current[0].encoder_cache
    assert isinstance(cache, EncoderCache) and cache.max_bytes == 1 << 20
    assert DPNServer(model=ckpt, device="cpu")._current[0].encoder_cache is None
    with pytest.raises(ValidationError, match="encoder_cache_bytes"):
        AppArgs(model=ckpt, encoder_cache_bytes=-1)
