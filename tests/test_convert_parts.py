"""`dpn convert --llm --vision --projector`: LLaVA-1.5's stage-1 parts (tiny random ones) become a DPN checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

import dpn_model  # noqa: F401  (registers the Auto classes)
from dpn_cli import main as cli
from dpn_model.convert import assemble_llava_from_parts, load_projector

WORDS = ["USER:", "ASSISTANT:", "what", "colour", "is", "the", "shape", "?", "red", "blue"]
LLM_HIDDEN, CLIP_HIDDEN = 32, 24  # different, so a transposed or swapped projector cannot pass


def vicuna_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer that knows neither <image> nor <router>, as Vicuna's does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class NotATensor:
    """What a malicious or careless pickle may hold: weights_only must refuse to build it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tok = vicuna_style_tokenizer()
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=LLM_HIDDEN,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            tie_word_embeddings=False,
        )
    ).eval()
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=CLIP_HIDDEN,
            image_size=32,
            patch_size=8,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
        )
    ).eval()
    vision.save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": 32, "size": 32}
        )
    )  # openai's
    # LLaVA-1.5 stage-1 output: mm_projector.bin, nn.Sequential(Linear, GELU, Linear) under model.mm_projector
    projector = {
        "model.mm_projector.0.weight": torch.randn(LLM_HIDDEN, CLIP_HIDDEN) * 0.2,
        "model.mm_projector.0.bias": torch.randn(LLM_HIDDEN) * 0.1,
        "model.mm_projector.2.weight": torch.randn(LLM_HIDDEN, LLM_HIDDEN) * 0.2,
        "model.mm_projector.2.bias": torch.randn(LLM_HIDDEN) * 0.1,
    }
    torch.save({k: v.half() for k, v in projector.items()}, root / "mm_projector.bin")  # LLaVA saves fp16
    projector = {k: v.half().float() for k, v in projector.items()}
    save_file(projector, str(root / "mm_projector.safetensors"))
    return {"root": root, "tok": tok, "llm": llm, "vision": vision, "projector": projector}


def convert(parts, projector_name, out_name):
    root = parts["root"]
    out = root / out_name
    assert (
        cli(
            [
                "convert",
                "--llm",
                str(root / "llm"),
                "--vision",
                str(root / "clip"),
                "--projector",
                str(root / projector_name),
                "--out",
                str(out),
                "--pooling-layers",
                "2",
            ]
        )
        == 0
    )
    return out


def reference_llava(parts, vocab: int, image_token_id: int) -> LlavaForConditionalGeneration:
    """HF LLaVA built by hand from the same parts (embeddings padded with zero rows to DPN's vocabulary)."""
    llm, vision, projector = parts["llm"], parts["vision"], parts["projector"]
    config = LlavaConfig(
        text_config=dict(llm.config.to_dict(), vocab_size=vocab),
        vision_config=vision.config.to_dict(),
        image_token_id=image_token_id,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    ref = LlavaForConditionalGeneration(config).eval()
    state = {f"model.language_model.{k}": v for k, v in llm.model.state_dict().items()}
    state.update({f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()})
    for src, dst in (("0", "linear_1"), ("2", "linear_2")):
        for param in ("weight", "bias"):
            state[f"model.multi_modal_projector.{dst}.{param}"] = projector[
                f"model.mm_projector.{src}.{param}"
            ]
    pad = vocab - llm.config.vocab_size
    for key, table in (
        ("model.language_model.embed_tokens.weight", llm.model.embed_tokens.weight),
        ("lm_head.weight", llm.lm_head.weight),
    ):
        state[key] = torch.cat([table.detach(), table.new_zeros(pad, table.shape[1])])
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref


def test_parts_convert_to_dpn_with_llava_outputs(parts):
    from PIL import Image

    out = convert(parts, "mm_projector.bin", "dpn")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    n_words = len(parts["tok"])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    router_id = processor.tokenizer.convert_tokens_to_ids("<router>")
    # Vicuna has neither token: both appended, vocabulary padded to a multiple of 64 as llava-hf does
    assert (image_id, router_id) == (n_words, n_words + 1)
    cfg = model.config
    assert (cfg.image_token_id, cfg.router_token_id, cfg.text_config.vocab_size) == (image_id, router_id, 64)
    assert cfg.pooling_layers == [2] and cfg.vision_feature_layer == -2 and cfg.image_seq_length == 16
    assert cfg.projector_hidden_act == "gelu"
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert processor.image_processor.crop_size["height"] == 32

    # every weight of the parts is copied exactly
    state = model.state_dict()
    llm, vision = parts["llm"], parts["vision"]
    for key, value in llm.model.state_dict().items():
        if key != "embed_tokens.weight":
            assert torch.equal(state[f"model.language_model.{key}"], value), key
    assert torch.equal(
        state["model.language_model.embed_tokens.weight"][:n_words], llm.model.embed_tokens.weight
    )
    assert torch.equal(state["lm_head.weight"][:n_words], llm.lm_head.weight)  # Vicuna's lm head stays untied
    for key, value in vision.state_dict().items():
        assert torch.equal(state[f"model.vision_tower.{key}"], value), key
    for src, dst in (("0", "linear_1"), ("2", "linear_2")):
        for param in ("weight", "bias"):
            assert torch.equal(
                state[f"model.multi_modal_projector.{dst}.{param}"],
                parts["projector"][f"model.mm_projector.{src}.{param}"],
            )

    # at compression 1 the DPN model is the hand-built HF LLaVA of the same parts
    ref = reference_llava(parts, cfg.text_config.vocab_size, image_id)
    prompt = processor.build_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}]
    )
    inputs = processor(text=[prompt], images=[Image.new("RGB", (40, 20), (200, 10, 10))], return_tensors="pt")
    assert int((inputs["input_ids"] == image_id).sum()) == 16
    with torch.no_grad():
        ours = model(**inputs, compression=1).logits
        ref_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == router_id, 0)  # LLaVA has no router
        theirs = ref(input_ids=ref_ids, pixel_values=inputs["pixel_values"]).logits
    stop = int((inputs["input_ids"][0] == router_id).nonzero()[0, 0])
    assert stop > 16
    diff = (ours[0, :stop, :n_words] - theirs[0, :stop, :n_words]).abs().max().item()
    assert diff <= 1e-4, diff


def test_safetensors_projector_gives_the_same_checkpoint(parts):
    a = load_file(str(convert(parts, "mm_projector.safetensors", "dpn_st") / "model.safetensors"))
    b = load_file(str(convert(parts, "mm_projector.bin", "dpn_bin") / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        if not key.startswith("model.pyramid."):  # fresh router weights
            assert torch.allclose(a[key], b[key], atol=1e-4), (
                key
            )  # new vocabulary rows: mean (+1e-9 cov noise)


def test_full_clip_model_directory_gives_its_vision_half(parts, tmp_path):
    vision_cfg = parts["vision"].config.to_dict()
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision_cfg,
            text_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=32,
                vocab_size=50,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            ),
        )
    )
    clip.save_pretrained(tmp_path / "clip_full")
    llava, tok = assemble_llava_from_parts(
        parts["root"] / "llm", tmp_path / "clip_full", parts["root"] / "mm_projector.safetensors"
    )
    ours = llava.model.vision_tower.state_dict()
    theirs = {
        k[len("vision_model.") :]: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")
    }
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "<image>" in tok.get_vocab() and "<router>" in tok.get_vocab()


def test_projector_file_names_and_refusals(parts, tmp_path, capsys):
    root = parts["root"]
    expected = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert set(load_projector(root / "mm_projector.bin")) == expected
    assert load_projector(root / "mm_projector.bin")["linear_1.weight"].dtype == torch.float32
    hf_names = {f"multi_modal_projector.{k}": v for k, v in load_projector(root / "mm_projector.bin").items()}
    save_file(hf_names, str(tmp_path / "hf.safetensors"))
    assert set(load_projector(tmp_path / "hf.safetensors")) == expected

    # a pickle that holds an object: weights_only refuses it, nothing is executed
    torch.save({"model.mm_projector.0.weight": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(
        ValueError,
        match=r"not a tensors-only file: torch.load\(weights_only=True\) refused it "
        r"\(Unsupported global: GLOBAL print",
    ):
        load_projector(tmp_path / "evil.bin")
    assert "unpickled!" not in capsys.readouterr().out
    # weights_only accepts plain containers, but a projector is tensors only
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "step": "1000"}, tmp_path / "str.bin")
    with pytest.raises(ValueError, match="'step' is a str, not a tensor"):
        load_projector(tmp_path / "str.bin")
    torch.save(
        {k: v for k, v in parts["projector"].items() if ".2.weight" not in k}, tmp_path / "missing.bin"
    )
    with pytest.raises(ValueError, match=r"missing \['model.mm_projector.2.weight'\]"):
        load_projector(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a tensors-only file"):
        load_projector(tmp_path / "junk.bin")
    torch.save({"model.mm_projector.weight": torch.zeros(2, 2)}, tmp_path / "linear.bin")
    with pytest.raises(ValueError, match="unexpected projector keys.*mlp2x_gelu"):
        load_projector(tmp_path / "linear.bin")


@pytest.mark.parametrize(
    "shape, message",
    [
        ((LLM_HIDDEN, 16), "maps 16 -> 32 features, but the CLIP tower gives 24"),  # another vision tower
        ((48, CLIP_HIDDEN), "maps 24 -> 48 features.*LLM's hidden size is 32"),  # another LLM
        ((CLIP_HIDDEN, LLM_HIDDEN), "maps 32 -> 24 features"),  # transposed
    ],
)
def test_mismatched_projector_is_a_clear_error(parts, tmp_path, shape, message):
    bad = dict(parts["projector"], **{"model.mm_projector.0.weight": torch.zeros(shape)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=message):
        assemble_llava_from_parts(parts["root"] / "llm", parts["root"] / "clip", tmp_path / "bad.safetensors")
    bad = dict(parts["projector"], **{"model.mm_projector.2.bias": torch.zeros(7)})
    save_file(bad, str(tmp_path / "bad2.safetensors"))
    with pytest.raises(ValueError, match=r"linear_2.bias has shape \(7,\), expected \(32,\)"):
        assemble_llava_from_parts(
            parts["root"] / "llm", parts["root"] / "clip", tmp_path / "bad2.safetensors"
        )


def test_wrong_directories_and_flags(parts, tmp_path):
    root = parts["root"]
    parts["vision"].save_pretrained(tmp_path / "clip224")
    (tmp_path / "clip224" / "preprocessor_config.json").write_text(
        json.dumps({"crop_size": 224, "size": 224})
    )
    with pytest.raises(ValueError, match="crops images to 224x224, but the vision tower takes 32x32"):
        cli(
            [
                "convert",
                "--llm",
                str(root / "llm"),
                "--vision",
                str(tmp_path / "clip224"),
                "--projector",
                str(root / "mm_projector.bin"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
    with pytest.raises(ValueError, match="expected a CLIP vision tower"):
        assemble_llava_from_parts(root / "llm", root / "llm", root / "mm_projector.bin")
    with pytest.raises(ValueError, match="supports .'llama'"):
        assemble_llava_from_parts(root / "clip", root / "clip", root / "mm_projector.bin")
    with pytest.raises(SystemExit, match="--llm needs --vision DIR and --projector FILE"):
        cli(["convert", "--llm", str(root / "llm"), "--vision", str(root / "clip"), "--out", str(root / "x")])
    with pytest.raises(SystemExit, match="--projector only applies with --llm"):
        cli(
            [
                "convert",
                "--llava",
                str(root / "llm"),
                "--projector",
                str(root / "mm_projector.bin"),
                "--out",
                str(root / "x"),
            ]
        )
    with pytest.raises(SystemExit):  # argparse: --llava and --llm are mutually exclusive
        cli(["convert", "--llava", str(root / "llm"), "--llm", str(root / "llm"), "--out", str(root / "x")])
