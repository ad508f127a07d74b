"""Turn LLaVA weights into a DPN checkpoint directory.

Two sources, one conversion:

- a llava-hf checkpoint directory (`convert_llava_checkpoint`, `dpn convert --llava DIR`), e.g.
  llava-1.5-7b-hf: a finished dense LLaVA;
- LLaVA-1.5's stage-1 parts (`convert_llava_parts`, `dpn convert --llm DIR --vision DIR --projector FILE`): a
  Llama/Vicuna directory, a CLIP vision directory and the projector trained by LLaVA's stage-1 pretraining
  (`mm_projector.bin`). This is where the paper's recipe starts: DPN replaces stage-2 instruction tuning.

The parts are assembled into an in-memory `LlavaForConditionalGeneration` (no weight is copied twice), then both
sources take the same path: weights are copied unchanged (vision tower, projector, Llama decoder, lm head);
`<router>` (and, for the parts, `<image>`) is added to the tokenizer and, if the vocabulary has no free row for
it, the embeddings grow (new rows: the mean embedding). The new router weights are freshly initialised: a
converted model at `compression=1` gives exactly the LLaVA model's outputs.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from dpn_model.image_processing import DPNImageProcessor
from dpn_model.modeling import DPNForConditionalGeneration
from dpn_model.processing import DPNProcessor
from dpn_model.tokenization import add_dpn_special_tokens

logger = logging.getLogger(__name__)

# Decoders the DPN layer loop is written (and tested) for.
SUPPORTED_LLM_TYPES = ("llama",)
# Key prefixes of a stage-1 projector: LLaVA's own training code saves `model.mm_projector.{0,2}.*`
# (nn.Sequential(Linear, GELU, Linear)); llava-hf names the same layers `multi_modal_projector.linear_{1,2}`.
_PROJECTOR_PREFIXES = (
    "model.mm_projector.",
    "mm_projector.",
    "model.multi_modal_projector.",
    "multi_modal_projector.",
)
_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2", "linear_1": "linear_1", "linear_2": "linear_2"}
_PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin")


def _image_processor_from(source_dir: Path, image_size: int) -> DPNImageProcessor:
    """DPN image processor with the directory's CLIP mean/std and sizes (defaults when not saved)."""
    kwargs: dict[str, Any] = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    }
    path = source_dir / "preprocessor_config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for key in ("image_mean", "image_std", "size", "crop_size", "rescale_factor"):
            if key in saved:
                kwargs[key] = saved[key]
    return DPNImageProcessor(**kwargs)


def _save_dpn(
    llava: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_processor_dir: Path,
    out_dir: Path,
    dpn_options: dict[str, Any],
) -> Path:
    """The conversion both sources share: add `<router>`, build the DPN model, save model + processor."""
    ids = add_dpn_special_tokens(tokenizer)
    if ids["image_token_id"] != llava.config.image_token_id:
        raise ValueError(
            f"the tokenizer's <image> id {ids['image_token_id']} differs from the model's image_token_id "
            f"{llava.config.image_token_id}: tokenizer and weights do not belong together"
        )
    router_id = ids["router_token_id"]
    vocab = llava.config.text_config.vocab_size
    model = DPNForConditionalGeneration.from_llava(
        llava, router_token_id=router_id if router_id < vocab else None, **dpn_options
    )
    if model.config.router_token_id != router_id:
        raise ValueError(
            f"router token id mismatch: tokenizer {router_id}, model {model.config.router_token_id}"
        )
    image_size = model.config.vision_config.image_size
    image_processor = _image_processor_from(image_processor_dir, image_size)
    crop = image_processor.crop_size
    if image_processor.do_center_crop and (crop["height"], crop["width"]) != (image_size, image_size):
        raise ValueError(
            f"{image_processor_dir / 'preprocessor_config.json'} crops images to {crop['height']}x{crop['width']}, "
            f"but the vision tower takes {image_size}x{image_size} images: processor and tower do not belong together"
        )
    processor = DPNProcessor(image_processor, tokenizer, image_seq_length=model.config.image_seq_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info(
        "wrote DPN checkpoint to %s (router token id %d, pooling after layers %s)",
        out_dir,
        router_id,
        model.config.pooling_layers,
    )
    return out_dir


def convert_llava_checkpoint(llava_dir: str | Path, out_dir: str | Path, **dpn_options: Any) -> Path:
    """Convert a local llava-hf checkpoint directory (weights + tokenizer) to DPN and save it.

    Args:
        llava_dir (`str` or `Path`): directory with a LLaVA `config.json`, weights and tokenizer files.
        out_dir (`str` or `Path`): where the DPN checkpoint (model, tokenizer, processor) is written.
        **dpn_options: DPNConfig pooling fields, e.g. `pooling_layers=[8, 16, 24]`, `pooling_type="max"`.

    Returns:
        `Path`: `out_dir`.
    """
    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if not (llava_dir / "config.json").exists():
        raise FileNotFoundError(f"{llava_dir} is not a checkpoint directory: it has no config.json")
    logger.info("loading LLaVA checkpoint from %s", llava_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    return _save_dpn(llava, tokenizer, llava_dir, out_dir, dpn_options)


# --- LLaVA-1.5 stage-1 parts ----------------------------------------------------------------------------------


def _projector_file(path: Path) -> Path:
    """The projector file itself: ``path``, or the one a stage-1 output directory holds."""
    if path.is_dir():
        found = [path / name for name in _PROJECTOR_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{path} holds no stage-1 projector file ({' or '.join(_PROJECTOR_FILES)})"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"projector file {path} does not exist")
    return path


def _read_tensor_file(path: Path) -> Any:
    """A safetensors file, or a torch file read with ``weights_only=True`` (never a full unpickle)."""
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} is not a tensors-only file: torch.load(weights_only=True) refused it "
            f"({_unpickler_reason(err)}). It is never unpickled in full: it must be safetensors or a "
            f"torch.save'd dict of tensors (re-save the projector's tensors that way and convert again)"
        ) from err
    except Exception as err:  # not a torch file at all: the unpickler fails in many ways
        raise ValueError(
            f"{path} is neither a safetensors file nor a torch.save'd dict of tensors ({type(err).__name__}: {err})"
        ) from err


def load_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a stage-1 projector file into llava-hf's names (`linear_1.weight`, ..., `linear_2.bias`).

    Accepts LLaVA's `mm_projector.bin` (`model.mm_projector.0.weight`, `.0.bias`, `.2.weight`, `.2.bias`) or
    the same tensors as safetensors, or llava-hf's `multi_modal_projector.linear_{1,2}.*` names; a directory is
    searched for `mm_projector.safetensors` / `mm_projector.bin`. A pickle file is read with
    `torch.load(weights_only=True)` only: never a full unpickle, so a file holding anything but tensors fails.

    Args:
        path (`str` or `Path`): the projector file (or the stage-1 output directory holding it).

    Returns:
        `dict[str, torch.Tensor]`: the projector's tensors, keyed as `LlavaMultiModalProjector`'s state dict.
    """
    path = _projector_file(Path(path))
    raw = _read_tensor_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a dict of tensors (name -> tensor), got {type(raw).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        name = str(key)
        for prefix in _PROJECTOR_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        layer, _, param = name.rpartition(".")
        if layer not in _PROJECTOR_LAYERS or param not in ("weight", "bias"):
            unknown.append(str(key))
            continue
        tensors[f"{_PROJECTOR_LAYERS[layer]}.{param}"] = value.to(torch.float32)
    if unknown:
        raise ValueError(
            f"{path}: unexpected projector keys {unknown[:6]}: expected LLaVA-1.5's 2-layer MLP projector "
            f"(mlp2x_gelu) as model.mm_projector.0.weight/.0.bias/.2.weight/.2.bias"
        )
    missing = [k for k in ("linear_1.weight", "linear_2.weight") if k not in tensors]
    biases = [k for k in ("linear_1.bias", "linear_2.bias") if k in tensors]
    if len(biases) == 1:
        missing.append("linear_2.bias" if biases == ["linear_1.bias"] else "linear_1.bias")
    if missing:
        names = {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"}
        wanted = [names[k.split(".")[0]] + "." + k.split(".")[1] for k in missing]
        raise ValueError(f"{path}: the projector is missing {wanted} (found {sorted(raw)})")
    return tensors


def _unpickler_reason(err: Exception) -> str:
    """The informative part of torch's weights_only refusal (its message is mostly generic advice)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if rest:
            return (
                rest[0].split(". Please use")[0].rstrip(".")
            )  # not torch's allow-listing advice: we never do
    return type(err).__name__


def _check_projector(
    tensors: dict[str, torch.Tensor], vision_hidden: int, llm_hidden: int, source: Path
) -> None:
    expected = {"linear_1.weight": (llm_hidden, vision_hidden), "linear_2.weight": (llm_hidden, llm_hidden)}
    if "linear_1.bias" in tensors:
        expected.update({"linear_1.bias": (llm_hidden,), "linear_2.bias": (llm_hidden,)})
    w1 = tuple(tensors["linear_1.weight"].shape)
    if len(w1) == 2 and w1 != expected["linear_1.weight"]:
        raise ValueError(
            f"{source}: the projector's first layer maps {w1[1]} -> {w1[0]} features, but the CLIP tower gives "
            f"{vision_hidden}-dim features (CLIP hidden size) and the LLM's hidden size is {llm_hidden}: "
            f"this projector was trained for another vision tower or LLM"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{source}: projector tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                f"(CLIP hidden size {vision_hidden}, LLM hidden size {llm_hidden})"
            )


def _vision_config(vision_dir: Path) -> CLIPVisionConfig:
    config = AutoConfig.from_pretrained(vision_dir)
    if (
        config.model_type == "clip"
    ):  # a full CLIPModel directory (openai/clip-vit-large-patch14-336): its vision half
        config = config.vision_config
    if config.model_type != "clip_vision_model":
        raise ValueError(
            f"{vision_dir} is a {config.model_type!r} model; expected a CLIP vision tower (CLIPVisionModel or a full "
            f"CLIPModel directory, as LLaVA-1.5's openai/clip-vit-large-patch14-336)"
        )
    return config


def assemble_llava_from_parts(
    llm_dir: str | Path,
    vision_dir: str | Path,
    projector: str | Path,
    vision_feature_layer: int = -2,
    pad_vocab_to_multiple_of: int = 64,
) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """Assemble LLaVA-1.5's stage-1 model (LLM + CLIP tower + stage-1 projector) as a llava-hf model in memory.

    `<image>` and `<router>` are added to the LLM's tokenizer and the embeddings / lm head grow to hold them (new
    rows: the mean embedding), padded to a multiple of `pad_vocab_to_multiple_of` as llava-hf does (32000 ->
    32064). The modules of the loaded parts are used as they are: no weight is copied.

    Args:
        llm_dir (`str` or `Path`): a LlamaForCausalLM directory with its tokenizer (e.g. Vicuna-7B-v1.5).
        vision_dir (`str` or `Path`): a CLIPVisionModel directory, or a full CLIPModel one (its vision half is
            used); its `preprocessor_config.json`, if any, gives the image settings.
        projector (`str` or `Path`): the stage-1 projector file (see [`load_projector`]).
        vision_feature_layer (`int`, *optional*, defaults to -2): CLIP layer whose patch features feed the
            projector (LLaVA-1.5: the penultimate).
        pad_vocab_to_multiple_of (`int`, *optional*, defaults to 64): vocabulary padding (1: none).

    Returns:
        `(LlavaForConditionalGeneration, tokenizer)`: the model (float32, eval mode) and the extended tokenizer.
    """
    llm_dir, vision_dir, projector = Path(llm_dir), Path(vision_dir), Path(projector)
    vision_config, tensors = _check_parts(llm_dir, vision_dir, projector, vision_feature_layer)
    logger.info("loading the LLM from %s and the CLIP vision tower from %s", llm_dir, vision_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    ids = add_dpn_special_tokens(tokenizer)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    vision = CLIPVisionModel.from_pretrained(vision_dir, config=vision_config, dtype=torch.float32)
    vocab = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        llm.resize_token_embeddings(
            len(tokenizer), pad_to_multiple_of=pad_vocab_to_multiple_of, mean_resizing=True
        )
    config = _llava_config_for_parts(llm, vision_config, ids["image_token_id"], tensors, vision_feature_layer)
    return _wire_llava(config, llm, vision, tensors).eval(), tokenizer


def _check_parts(
    llm_dir: Path, vision_dir: Path, projector: Path, vision_feature_layer: int
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """Read the configs and the (small) projector and check they fit together, before any large weight is read.

    A mismatch (wrong directory, unsupported LLM, projector for another tower) then fails in seconds, not after
    gigabytes of weights were loaded. Returns `(vision_config, projector_tensors)`.
    """
    for name, directory in (("--llm", llm_dir), ("--vision", vision_dir)):
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"{name} {directory} is not a model directory: it has no config.json")
    llm_config = AutoConfig.from_pretrained(llm_dir)
    if llm_config.model_type not in SUPPORTED_LLM_TYPES:
        raise ValueError(
            f"{llm_dir} is a {llm_config.model_type!r} model; DPN's decoder loop supports {SUPPORTED_LLM_TYPES} "
            f"(LlamaForCausalLM: Llama-2, Vicuna-7B-v1.5)"
        )
    vision_config = _vision_config(vision_dir)
    num_vision_layers = vision_config.num_hidden_layers
    if not -num_vision_layers - 1 <= vision_feature_layer <= num_vision_layers:
        raise ValueError(
            f"vision_feature_layer {vision_feature_layer} is outside the CLIP tower's hidden states "
            f"(embeddings + {num_vision_layers} layers)"
        )
    tensors = load_projector(projector)
    _check_projector(tensors, vision_config.hidden_size, llm_config.hidden_size, projector)
    return vision_config, tensors


def _llava_config_for_parts(
    llm: PreTrainedModel,
    vision_config: CLIPVisionConfig,
    image_token_id: int,
    tensors: dict[str, torch.Tensor],
    vision_feature_layer: int,
) -> LlavaConfig:
    """The llava-hf config that describes LLaVA-1.5 built from these parts (its projector, its CLIP layer)."""
    return LlavaConfig(
        text_config=llm.config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",  # LLaVA-1.5's mlp2x_gelu: nn.GELU()
        multimodal_projector_bias="linear_1.bias" in tensors,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )


def _wire_llava(
    config: LlavaConfig,
    llm: PreTrainedModel,
    vision: CLIPVisionModel,
    tensors: dict[str, torch.Tensor],
) -> LlavaForConditionalGeneration:
    """Put the loaded parts into a meta-device llava skeleton, so no weight is allocated or copied twice.

    Raises `RuntimeError` if any tensor is still on the meta device: a part the skeleton has and we did not set.
    """
    with torch.device("meta"):  # a skeleton: every module is replaced by a loaded part below
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = vision
    llava.model.language_model = llm.model
    llava.lm_head = llm.lm_head
    proj = LlavaMultiModalProjector(config)
    proj.load_state_dict(tensors, strict=True)
    llava.model.multi_modal_projector = proj
    left = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"assembling LLaVA from parts left tensors unset: {left[:5]}")
    return llava


def convert_llava_parts(
    llm_dir: str | Path,
    vision_dir: str | Path,
    projector: str | Path,
    out_dir: str | Path,
    vision_feature_layer: int = -2,
    **dpn_options: Any,
) -> Path:
    """Assemble LLaVA-1.5's stage-1 model from its parts (see [`assemble_llava_from_parts`]) and save it as DPN.

    The result is what `convert_llava_checkpoint` writes for a llava-hf directory: the starting point of the
    paper's recipe (DPN trained in place of LLaVA-1.5's stage-2 instruction tuning, `configs/train_llava7b.yaml`).

    Args:
        llm_dir, vision_dir, projector: the parts (LLM + tokenizer, CLIP vision tower, stage-1 projector file).
        out_dir (`str` or `Path`): where the DPN checkpoint (model, tokenizer, processor) is written.
        vision_feature_layer (`int`, *optional*, defaults to -2): CLIP layer feeding the projector.
        **dpn_options: DPNConfig pooling fields, e.g. `pooling_layers=[8, 16, 24]`, `pooling_type="max"`.

    Returns:
        `Path`: `out_dir`.
    """
    llava, tokenizer = assemble_llava_from_parts(llm_dir, vision_dir, projector, vision_feature_layer)
    return _save_dpn(llava, tokenizer, Path(vision_dir), Path(out_dir), dpn_options)


__all__ = ["assemble_llava_from_parts", "convert_llava_checkpoint", "convert_llava_parts", "load_projector"]
