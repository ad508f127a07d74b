"""Canaries for the library internals our code relies on (issue 29's audit): each test names the transformers or
Ray symbol it watches and fails loudly when a release changes it, where our code would otherwise go on, wrong,
without an error. No Ray cluster: the Ray contracts are checked on the installed classes themselves.

The behaviour behind the audit's three bugs is tested where it lives: the conv experts' init
(`test_modeling.py::test_conv_experts_*`), the causal prefill under every attention implementation
(`test_modeling.py::test_prefill_is_causal`), the validated `from_pretrained` overrides
(`test_modeling.py::test_from_pretrained_overrides_*`, `::test_load_config_*`). The image processor's hooks
(`BaseImageProcessor._preprocess_image_like_inputs`, `_set_attributes`) are covered by `test_processing.py`:
`test_uint8_path_equals_direct_path_and_accepts_many_input_types` asserts that `processor(images)` equals our own
two steps bit for bit (the base `_preprocess` raises if the hook is not called) and
`test_image_processor_save_load` / `test_pad_to_square_uses_llava_mean_colour_and_normalises` that constructor
arguments take effect.
"""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from small_config import make_config
from test_modeling import pad_batch, prompt
from transformers import LlavaConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from dpn_model import DPNCache, DPNConfig, DPNForConditionalGeneration

# ---- transformers: DynamicLayer (dpn_model/cache.py writes layer.keys / layer.values directly) ------------------


@pytest.fixture(scope="module")
def model() -> DPNForConditionalGeneration:
    torch.manual_seed(0)
    return DPNForConditionalGeneration(make_config()).eval()


def test_dpn_cache_layers_are_plain_dynamic_layers_whose_length_is_their_keys():
    """`transformers.cache_utils.DynamicCache(config=...)` / `DynamicLayer`: `DPNCache.append_rows` and
    `drop_leading_padding` replace `layer.keys` / `layer.values` and nothing else. That is right only while every
    layer is a `DynamicLayer` whose state is exactly those tensors (its length read from `keys.shape[-2]`). A
    layer type with its own counter (as the sliding-window layers keep `cumulative_length`) would be left stale
    by those edits, and decoding would attend to the wrong positions, without an error."""
    cache = DPNCache(config=make_config().text_config)
    assert [type(layer) for layer in cache.layers] == [DynamicLayer] * 4
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    assert set(vars(cache.layers[0])) == {"device", "is_initialized", "keys", "values"}
    assert cache.get_seq_length(0) == 3


@torch.no_grad()
def test_dpn_cache_lengths_stay_consistent_after_append_rows_and_drop_leading_padding(model):
    """`DynamicLayer.get_seq_length` (what `generate` and `DPNCache.get_seq_length` read): after our direct edits
    of `keys` / `values` (rows of another compression appended, finished rows dropped, common padding removed),
    every layer's reported length must still equal its keys' length and its segment mask's width."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    caches = []
    for samples, pix, compression in (
        ([prompt(64, 3, 4), prompt(64, 1, 2)], images[:2], 1),
        ([prompt(64, 2, 6)], images[2:], 4),
    ):
        ids, mask = pad_batch(samples)
        caches.append(
            model(
                input_ids=ids, attention_mask=mask, pixel_values=pix, compression=compression, use_cache=True
            ).cache
        )
    running, joining = caches
    running.append_rows(joining, keep=torch.tensor([1]))
    segments = model.model._segments()
    widths = [m.shape[1] for m in running.segment_masks]
    running.drop_leading_padding(segments)
    assert running.segment_masks[0].shape[0] == 2
    assert sum(m.shape[1] for m in running.segment_masks) < sum(widths)  # the dropped row's padding went
    for s, segment in enumerate(segments):
        for i in segment:
            layer = running.layers[i]
            assert running.get_seq_length(i) == layer.keys.shape[-2] == running.segment_masks[s].shape[1], (
                s,
                i,
            )
            assert layer.values.shape == layer.keys.shape


# ---- transformers: PreTrainedModel class flags (dpn_model/modeling.py, DPNPreTrainedModel) ---------------------


@pytest.mark.parametrize(
    "flag", ["_no_split_modules", "_can_compile_fullgraph", "_supports_flash_attn", "_supports_flex_attn"]
)
def test_class_flags_we_set_are_ones_the_library_reads(flag):
    """`PreTrainedModel._supports_flash_attn`, `_supports_flex_attn`, `_can_compile_fullgraph`,
    `_no_split_modules`: we set them on `DPNPreTrainedModel`. If transformers renamed one, ours would silently
    stop counting: flash or flex attention would be allowed (they ignore our 4D float mask, so padding and the
    pooled sequence's layout would leak into attention), or a full-graph compile of a data-dependent length
    would be attempted."""
    assert flag in vars(PreTrainedModel), f"PreTrainedModel no longer declares {flag}: ours is inert"


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_implementations_that_ignore_our_mask_are_refused(model, implementation):
    """`PreTrainedModel.set_attn_implementation` reading `_supports_flash_attn` / `_supports_flex_attn = False`:
    the model must refuse these implementations (flex is installed with torch, so a flag the library no longer
    reads would let it through)."""
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="does not support"):
        m.set_attn_implementation(implementation)


def test_no_split_modules_name_modules_of_the_model(model):
    """`PreTrainedModel._no_split_modules` (read by `device_map="auto"` placement): the class names must exist
    in the model, or accelerate would split a decoder layer across devices without saying so."""
    names = {type(module).__name__ for module in model.modules()}
    assert set(DPNForConditionalGeneration._no_split_modules) <= names


def test_model_has_no_reorder_cache_hook():
    """`GenerationMixin` beam search calls `self._reorder_cache(cache, beam_idx)` when the *model* has one,
    and `cache.reorder_cache(beam_idx)` otherwise. `DPNCache.reorder_cache` also reorders the per-segment masks;
    a model-level `_reorder_cache` (ours or inherited) would bypass it and leave the masks of the wrong beams."""
    assert not hasattr(DPNForConditionalGeneration, "_reorder_cache")


# ---- transformers: dataclass configs call __post_init__ (dpn_model/configuration.py) ---------------------------


def test_config_post_init_runs_on_every_construction_path(tmp_path):
    """The dataclass `PreTrainedConfig` calls `DPNConfig.__post_init__` (and through it
    `LlavaConfig.__post_init__`) on construction. Our checks, the list normalisation and `image_seq_length`
    live there; if it were no longer called, an invalid config would load, and `image_seq_length` would stay
    LLaVA's 576 (the 7B recipe's grid, so the real recipe would not notice). Checked for the constructor,
    `from_dict` and `from_pretrained`."""
    assert "__post_init__" in vars(LlavaConfig)
    cfg = make_config(pooling_layers=(1, 2))
    assert cfg.pooling_layers == [1, 2] and cfg.image_seq_length == 64 != LlavaConfig().image_seq_length
    assert cfg.text_config.num_hidden_layers == 4  # the sub-config is built before our checks read it
    cfg.save_pretrained(tmp_path)
    for build in (
        lambda: DPNConfig.from_dict({**cfg.to_dict(), "pooling_layers": [2, 1]}),
        lambda: DPNConfig.from_pretrained(tmp_path, pooling_layers=[2, 1]),
        lambda: make_config(pooling_layers=[2, 1]),
    ):
        with pytest.raises(ValueError, match="strictly increasing"):
            build()
    assert DPNConfig.from_pretrained(tmp_path).image_seq_length == 64


# ---- Ray Data: FileBasedDatasource and NumpyBatchCollateFn (pipelines/formats.py, pipelines/preprocess.py) ----
# Building a FileBasedDatasource puts its paths in the object store (it starts a local Ray), so these check the
# installed classes instead: the methods we override are still the ones the base's read path calls.


def test_file_based_datasource_still_calls_our_read_overrides():
    """`ray.data.datasource.FileBasedDatasource._open_input_source` / `_read_stream`: `WebDatasetShards` and
    `ParquetFiles` override them to read damaged shards member by member (and Parquet with random access). If
    the base's read path stopped calling them, or changed their signatures, Parquet would be read as a stream
    (every file one `truncated_shard` row) or the readers would not run at all."""
    from ray.data.datasource import FileBasedDatasource

    from pipelines.formats import ParquetFiles, WebDatasetShards

    read_path = inspect.getsource(FileBasedDatasource.get_read_tasks)
    for name in ("_open_input_source", "_read_stream"):
        assert name in vars(FileBasedDatasource), f"FileBasedDatasource no longer defines {name}"
        assert f"self.{name}(" in read_path, f"FileBasedDatasource.get_read_tasks no longer calls {name}"
    base_params = {n: list(inspect.signature(getattr(FileBasedDatasource, n)).parameters) for n in
                   ("_open_input_source", "_read_stream")}  # fmt: skip
    assert (
        list(inspect.signature(ParquetFiles._open_input_source).parameters)
        == base_params["_open_input_source"]
    )
    for ours in (ParquetFiles, WebDatasetShards):
        assert list(inspect.signature(ours._read_stream).parameters) == base_params["_read_stream"]


def test_numpy_collate_fn_is_dispatched_as_numpy_batches():
    """`ray.data.collate_fn.NumpyBatchCollateFn`, which `DataIterator.iter_torch_batches` recognises with
    `isinstance` to hand our `Collator` numpy batches. If the dispatch went (a plain callable is deprecated since
    Ray 2.47), training batches would reach `collate_batch` in another format, or be refused."""
    from ray.data.collate_fn import ArrowBatchCollateFn, NumpyBatchCollateFn
    from ray.data.iterator import DataIterator

    from pipelines.preprocess import Collator

    assert issubclass(Collator, NumpyBatchCollateFn) and not issubclass(Collator, ArrowBatchCollateFn)
    source = inspect.getsource(DataIterator.iter_torch_batches)
    assert re.search(r'isinstance\(collate_fn, NumpyBatchCollateFn\):\s*batch_format = "numpy"', source)
