"""`dpn convert`: a tiny random llava-hf checkpoint directory (weights + tokenizer) becomes a DPN one."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

import dpn_model  # noqa: F401  (registers the Auto classes)
from dpn_cli import main as cli

WORDS = ["USER:", "ASSISTANT:", "what", "colour", "is", "the", "shape", "?", "red", "blue"]


def llava_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer that knows <image> but not <router>, as llava-hf's does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<pad>": 4}
    vocab.update({w: i + 5 for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    return tok


def test_convert_llava_directory(tmp_path):
    tok = llava_style_tokenizer()
    vocab = len(tok) + 3  # padded vocabulary, as llava-hf pads 32002 -> 32064
    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            pad_token_id=4,
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            image_size=32,
            patch_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        image_token_id=3,
        image_seq_length=16,
    )
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    (tmp_path / "llava" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
                "crop_size": {"height": 32, "width": 32},
                "size": {"shortest_edge": 32},
            }
        )
    )

    assert (
        cli(
            [
                "convert",
                "--llava",
                str(tmp_path / "llava"),
                "--out",
                str(tmp_path / "dpn"),
                "--pooling-layers",
                "2",
            ]
        )
        == 0
    )

    files = {p.name for p in (tmp_path / "dpn").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "dpn").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "dpn")
    router_id = processor.tokenizer.convert_tokens_to_ids("<router>")
    # <router> took the first free id, a padded row of the vocabulary: no resize needed
    assert model.config.router_token_id == router_id == len(tok)
    assert model.config.text_config.vocab_size == vocab
    assert model.config.pooling_layers == [2]
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]

    from PIL import Image

    prompt = processor.build_prompt(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour ?"}]}]
    )
    inputs = processor(text=[prompt], images=[Image.new("RGB", (40, 20), (200, 10, 10))], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs, compression=1).logits
        ref_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == router_id, 4)  # LLaVA has no router
        ref = llava(input_ids=ref_ids, pixel_values=inputs["pixel_values"]).logits
        # identical up to the router token, which LLaVA never saw, except the router's own new logit column
        stop = int((inputs["input_ids"][0] == router_id).nonzero()[0, 0])
        keep = torch.arange(vocab) != router_id
        assert (ours[0, :stop, keep] - ref[0, :stop, keep]).abs().max().item() <= 1e-4
        routed = model(**inputs)
    assert routed.expert_choices.shape == (1, 1) and int(routed.expert_choices[0, 0]) in (0, 1, 2)
    # the router's embedding row starts at the mean of the others
    emb = model.get_input_embeddings().weight
    others = torch.cat([emb[:router_id], emb[router_id + 1 :]]).mean(0)
    assert torch.allclose(emb[router_id], others, atol=1e-6)


def test_info_reports_savings(capsys):
    assert cli(["info", "--preset", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    modes = {row["compression"]: row for row in report["modes"]}
    assert modes[1]["saving"] == 0.0
    assert 0 < modes[2]["saving"] < modes[4]["saving"] < 1
    assert report["parameters"] > 0 and report["router_parameters"] > 0
