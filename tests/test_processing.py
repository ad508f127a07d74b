"""Tokenizer, image processor and processor: special tokens, LLaVA preprocessing, prompt format, label masking."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from small_config import IMAGE_SIDE, PATCH, make_processor_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoProcessor, PreTrainedTokenizerFast

from dpn_model.configuration import DPNConfig
from dpn_model.image_processing import DPNImageProcessor
from dpn_model.processing import (
    DEFAULT_SYSTEM_PROMPT,
    IGNORE_INDEX,
    DPNProcessor,
    PromptTooLongError,
    ReservedTokenError,
    build_prompt,
    register,
)
from dpn_model.tokenization import ANSWER_WORDS, add_dpn_special_tokens, build_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
    return make_processor_config(tokenizer)


@pytest.fixture(scope="module")
def processor(config, tokenizer):
    return DPNProcessor.from_model_config(config, tokenizer)


def _image(height=20, width=40, color=(255, 0, 0)):
    return PIL.Image.new("RGB", (width, height), color)


def _conversation(question="What color is the large circle?", answer="red"):
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def test_build_tokenizer_special_tokens(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>", "<image>", "<router>"])
    assert ids == [0, 1, 2, 3, 4, 5]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.image_token == "<image>" and tokenizer.router_token == "<router>"
    assert tokenizer("red")["input_ids"][0] == tokenizer.bos_token_id
    for token in ("<image>", "<router>"):  # never split, also inside words
        assert (
            tokenizer.encode(f"a{token}b", add_special_tokens=False).count(
                tokenizer.convert_tokens_to_ids(token)
            )
            == 1
        )
    assert tokenizer.decode(tokenizer("What color is it?\nred")["input_ids"], skip_special_tokens=True) == (
        "What color is it?\nred"
    )


@pytest.mark.parametrize("word", ANSWER_WORDS)
def test_benchmark_answers_are_single_tokens(tokenizer, word):
    # Alone and after "ASSISTANT:" the answer is the same single token.
    ids = tokenizer.encode(word, add_special_tokens=False)
    assert len(ids) == 1
    in_prompt = tokenizer.encode(f"ASSISTANT: {word}</s>", add_special_tokens=False)
    assert in_prompt[-2:] == [ids[0], tokenizer.eos_token_id]


def test_build_tokenizer_with_texts_and_vocab_size():
    tok = build_tokenizer(["the zebra is striped"] * 5, vocab_size=2000)
    assert len(tok.encode("zebra", add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=50)


# ---------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------
def test_pad_to_square_uses_llava_mean_colour_and_normalises():
    image_processor = DPNImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size=IMAGE_SIDE)
    assert image_processor.background_color == (122, 116, 104)  # int(mean * 255), LLaVA's expand2square fill
    pixels = image_processor.to_uint8(_image(20, 40, (255, 0, 0)))  # wide image: padding above and below
    assert pixels.shape == (1, IMAGE_SIDE, IMAGE_SIDE, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0].tolist() == [122, 116, 104] and pixels[0, -1, -1].tolist() == [122, 116, 104]
    assert pixels[0, IMAGE_SIDE // 2, 0].tolist() == [255, 0, 0]
    values = image_processor(_image(20, 40, (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert values.shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE) and values.dtype == torch.float32
    # By hand: (x / 255 - mean) / std per channel.
    red = [
        (255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0],
        (0 - CLIP_MEAN[1]) / CLIP_STD[1],
        (0 - CLIP_MEAN[2]) / CLIP_STD[2],
    ]
    torch.testing.assert_close(values[0, :, IMAGE_SIDE // 2, 0], torch.tensor(red), atol=1e-5, rtol=0)
    pad = [(c / 255 - m) / s for c, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(values[0, :, 0, 0], torch.tensor(pad), atol=1e-5, rtol=0)
    assert values[0, :, 0, 0].abs().max() < 0.02  # the mean colour normalises to ~0


def test_uint8_path_equals_direct_path_and_accepts_many_input_types():
    image_processor = DPNImageProcessor(size={"shortest_edge": IMAGE_SIDE}, crop_size=IMAGE_SIDE)
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((50, 80, 3), (97, 31, 3), (40, 40, 3))
    ]
    images = [PIL.Image.fromarray(a) for a in arrays]
    direct = image_processor(images, return_tensors="pt")["pixel_values"]
    staged = image_processor.normalize(image_processor.to_uint8(images))
    torch.testing.assert_close(direct, staged, atol=0, rtol=0)
    torch.testing.assert_close(
        image_processor.normalize(torch.from_numpy(image_processor.to_uint8(images))), direct
    )
    png = io.BytesIO()
    images[0].save(png, format="PNG")
    for same in (arrays[0], torch.from_numpy(arrays[0]).permute(2, 0, 1), png.getvalue(), arrays[0] / 255.0):
        torch.testing.assert_close(image_processor([same])["pixel_values"], direct[:1], atol=1e-6, rtol=0)
    gray = image_processor.to_uint8(images[0].convert("L"))
    assert gray.shape == (1, IMAGE_SIDE, IMAGE_SIDE, 3)
    with pytest.raises(ValueError, match="channels-last"):
        image_processor.normalize(np.zeros((1, 3, 8, 8), np.uint8))


def test_matches_transformers_llava_pad_preprocessing():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    ours = DPNImageProcessor(size={"shortest_edge": 48}, crop_size=48)(image)["pixel_values"]
    reference = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 48}, crop_size=48)(
        image, return_tensors="pt"
    )["pixel_values"]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_image_processor_save_load(tmp_path):
    image_processor = DPNImageProcessor(size={"shortest_edge": 64}, crop_size=64, do_pad=False)
    image_processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = DPNImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == image_processor.to_dict() and loaded.do_pad is False


# ---------------------------------------------------------------------------------------------------------------
# Prompt format
# ---------------------------------------------------------------------------------------------------------------
def test_build_prompt_format_and_router_position(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Where is it?"},
    ]
    prompt = processor.build_prompt(messages)
    # the reference: <router> after every user turn of a conversation with an image
    assert prompt == (
        f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\nWhat color is it? <router> ASSISTANT: red</s>"
        "USER: Where is it? <router> ASSISTANT:"
    )
    assert prompt.count("<router>") == 2 and prompt.endswith("<router> ASSISTANT:")
    assert "<router>" not in processor.build_prompt(messages, add_router_token=False)
    assert not processor.build_prompt(messages, add_generation_prompt=False).endswith("ASSISTANT:")
    llava_style = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]
    assert build_prompt(llava_style, add_generation_prompt=False).endswith("? <router> ASSISTANT: red</s>")
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert build_prompt(custom) == "Be brief. USER: hi ASSISTANT:"  # no image: never pooled, no router
    with pytest.raises(ValueError, match="alternate"):
        build_prompt([{"role": "assistant", "content": "red"}])
    with pytest.raises(ValueError, match="router_placement"):
        build_prompt(custom, router_placement="first")


def test_build_prompt_last_user_turn_option(processor):
    """The earlier format, kept for checkpoints trained with it: one <router> ending the last user turn."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Where is it?"},
    ]
    prompt = build_prompt(messages, router_placement="last_user_turn")
    assert prompt == (
        f"{DEFAULT_SYSTEM_PROMPT} USER: <image>\nWhat color is it? ASSISTANT: red</s>"
        "USER: Where is it? <router> ASSISTANT:"
    )
    custom = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert build_prompt(custom, router_placement="last_user_turn") == "Be brief. USER: hi <router> ASSISTANT:"


@pytest.mark.parametrize("router_placement", ["every_user_turn", "last_user_turn"])
@pytest.mark.parametrize("add_router_token", [True, False])
def test_chat_template_matches_build_prompt(processor, add_router_token, router_placement):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
        {"role": "user", "content": [{"type": "text", "text": "And blue?"}]},
    ]
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, messages[3]]
    for msgs in (messages, messages[1:], messages[1:2], text_only):
        expected = build_prompt(
            msgs, add_router_token=add_router_token, router_placement=router_placement,
            system_prompt=processor.system_prompt,
        )  # fmt: skip
        rendered = processor.apply_chat_template(
            msgs,
            add_generation_prompt=True,
            add_router_token=add_router_token,
            router_placement=router_placement,
        )
        assert rendered == expected
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == processor.build_prompt(
        messages
    )


# ---------------------------------------------------------------------------------------------------------------
# Processor: batches
# ---------------------------------------------------------------------------------------------------------------
def test_processor_expands_image_token(processor, config):
    prompt = processor.build_prompt([{"role": "user", "content": "<image>\nWhat color is the dot?"}])
    out = processor(images=_image(), text=prompt)
    ids = out["input_ids"][0].tolist()
    assert ids.count(config.image_token_id) == config.image_seq_length == (IMAGE_SIDE // PATCH) ** 2
    first = ids.index(config.image_token_id)
    assert ids[first : first + config.image_seq_length] == [config.image_token_id] * config.image_seq_length
    assert out["pixel_values"].shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert ids.count(config.router_token_id) == 1
    # <router> sits right before " ASSISTANT:" (the last tokens of the generation prompt).
    router = ids.index(config.router_token_id)
    assert processor.decode(ids[router + 1 :]) == "ASSISTANT:"
    with pytest.raises(ValueError, match="images"):
        processor(images=[_image(), _image()], text=prompt)


@pytest.mark.parametrize("side", ["left", "right"])
def test_processor_padding_sides(processor, side):
    prompts = [
        processor.build_prompt(
            [{"role": "user", "content": "<image>\nWhat color is the large circle in the top left?"}]
        ),
        processor.build_prompt([{"role": "user", "content": "<image>\nCount?"}]),
    ]
    out = processor(images=[_image(), _image(30, 10)], text=prompts, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2 and out["pixel_values"].shape[0] == 2
    short = mask[1]
    num_pad = int((short == 0).sum())
    assert num_pad > 0 and mask[0].all()
    pad_id = processor.tokenizer.pad_token_id
    if side == "left":
        assert (ids[1, :num_pad] == pad_id).all() and short[:num_pad].sum() == 0 and short[num_pad:].all()
        assert ids[1, -1] == ids[0, -1]  # both end with the generation prompt
    else:
        assert (ids[1, -num_pad:] == pad_id).all() and short[-num_pad:].sum() == 0
    unpadded = processor(images=_image(30, 10), text=prompts[1])["input_ids"][0]
    assert ids[1][short.bool()].tolist() == unpadded.tolist()
    decoded = processor.batch_decode(ids, skip_special_tokens=True)
    assert decoded[1] == processor.decode(unpadded, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# Processor: training sequences
# ---------------------------------------------------------------------------------------------------------------
def test_label_masking_only_answers_are_learned(processor, config):
    conversation = [
        {"from": "human", "value": "What color is the large circle?\n<image>"},  # LLaVA moves the image first
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many small squares are there?"},
        {"from": "gpt", "value": "3"},
    ]
    encoded = processor.encode(conversation, has_image=True, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels) and not encoded["truncated"]
    tokenizer = processor.tokenizer
    learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in learned)
    # Two answers, each followed by </s>; decoding the learned tokens gives back the answers.
    assert tokenizer.decode([labels[i] for i in learned]) == "red</s> 3</s>"
    assert [labels[i] for i in learned].count(tokenizer.eos_token_id) == 2
    assert ids.count(config.image_token_id) == config.image_seq_length
    assert labels[ids.index(config.image_token_id)] == IGNORE_INDEX
    # <router> ends every user turn, right before ASSISTANT, and is never a label.
    routers = [i for i, token in enumerate(ids) if token == config.router_token_id]
    assert len(routers) == 2 and all(labels[i] == IGNORE_INDEX for i in routers)
    assert tokenizer.convert_ids_to_tokens(ids[routers[0] + 1 : learned[0]]) == ["\u2581ASSISTANT:"]
    assert tokenizer.convert_ids_to_tokens(ids[routers[1] + 1 : learned[-2]]) == ["\u2581ASSISTANT:"]
    assert tokenizer.decode(ids[routers[0] - 6 : routers[0]]).rstrip().endswith("large circle?")
    assert tokenizer.decode(ids[routers[1] - 6 : routers[1]]).rstrip().endswith("squares are there?")
    # The same ids as tokenizing the whole (normalised) conversation at once, image tokens expanded.
    normalised = [{"from": "human", "value": "<image>\nWhat color is the large circle?"}] + conversation[1:]
    text = processor.build_prompt(normalised, add_generation_prompt=False)
    text = text.replace("<image>", "<image>" * config.image_seq_length)
    assert tokenizer(text)["input_ids"] == ids


def test_answer_tokens_match_standalone_encoding(processor):
    for answer in ("red", "top left", "3", "yes"):
        encoded = processor.encode(_conversation(answer=answer), has_image=True)
        learned = [label for label in encoded["labels"] if label != IGNORE_INDEX]
        assert learned == processor.tokenizer.encode(answer, add_special_tokens=False) + [
            processor.tokenizer.eos_token_id
        ]


def test_encode_without_image(processor, config):
    encoded = processor.encode(
        [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}], has_image=False
    )
    assert config.image_token_id not in encoded["input_ids"]
    assert (
        config.router_token_id not in encoded["input_ids"]
    )  # text only: never pooled, no router (reference)
    with pytest.raises(ReservedTokenError, match="'<image>'"):  # typed <image>, no image: not a marker
        processor.encode(_conversation(), has_image=False)
    image_part = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}]
    with pytest.raises(ValueError, match="has_image=False"):  # an image part, no image
        processor.encode([*image_part, {"role": "assistant", "content": "red"}], has_image=False)
    added = processor.encode(
        [{"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}], has_image=True
    )
    assert added["input_ids"].count(config.image_token_id) == config.image_seq_length
    with pytest.raises(ValueError, match="no assistant answer"):
        processor.encode([{"from": "human", "value": "<image>\nColor?"}], has_image=True)


def test_encode_takes_whether_there_is_an_image_not_the_images(processor):
    """`encode` reads only whether the sample has an image: the images themselves are refused, so a caller
    written for the old `encode(messages, images)` fails loudly rather than passing a list where a flag goes."""
    with pytest.raises(TypeError, match="has_image must be a bool"):
        processor.encode(_conversation(), [b"png"])
    with pytest.raises(TypeError, match="has_image must be a bool"):
        processor.encode(_conversation(), None, mode="generate")


def test_truncation_drops_rounds_and_never_cuts_image(processor, config):
    conversation = _conversation() + [
        {"from": "human", "value": "Where is the small dot?"},
        {"from": "gpt", "value": "top left"},
    ]
    full = processor.encode(conversation, has_image=True)
    one_round = processor.encode(_conversation(), has_image=True)
    # Too long for two rounds: the second round goes, the router moves to the first question.
    kept = processor.encode(conversation, has_image=True, max_length=len(full["input_ids"]) - 1)
    assert kept["truncated"] and kept["input_ids"] == one_round["input_ids"]
    assert kept["input_ids"].count(config.router_token_id) == 1
    # Too long even for one full answer: the answer is cut, the image tokens stay whole.
    cut = processor.encode(_conversation(answer="top left"), has_image=True)
    short = processor.encode(
        _conversation(answer="top left"), has_image=True, max_length=len(cut["input_ids"]) - 1
    )
    assert short["truncated"] and len(short["input_ids"]) == len(cut["input_ids"]) - 1
    assert short["input_ids"].count(config.image_token_id) == config.image_seq_length
    prompt_length = len(cut["input_ids"]) - sum(label != IGNORE_INDEX for label in cut["labels"])
    with pytest.raises(PromptTooLongError, match="max_length"):
        processor.encode(_conversation(), has_image=True, max_length=prompt_length)
    assert issubclass(PromptTooLongError, ValueError)


def _two_rounds():
    return _conversation() + [
        {"from": "human", "value": "Where is the small dot?"},
        {"from": "gpt", "value": "top left"},
    ]


def test_every_kept_round_has_a_router_after_truncation(processor, config):
    full = processor.encode(_two_rounds(), has_image=True)
    assert full["input_ids"].count(config.router_token_id) == 2
    kept = processor.encode(_two_rounds(), has_image=True, max_length=len(full["input_ids"]) - 1)
    assert kept["truncated"] and kept["input_ids"].count(config.router_token_id) == 1
    # the exact budget of two rounds (with both routers) still keeps both
    exact = processor.encode(_two_rounds(), has_image=True, max_length=len(full["input_ids"]))
    assert not exact["truncated"] and exact["input_ids"] == full["input_ids"]


def test_encode_last_user_turn_option(config, tokenizer):
    legacy = DPNProcessor.from_model_config(config, tokenizer, router_placement="last_user_turn")
    encoded = legacy.encode(_two_rounds(), has_image=True)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids.count(config.router_token_id) == 1
    router = ids.index(config.router_token_id)
    assert labels[router] == IGNORE_INDEX
    assert tokenizer.decode(ids[router - 6 : router]).rstrip().endswith("small dot?")
    text_only = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]
    assert config.router_token_id in legacy.encode(text_only, has_image=False)["input_ids"]
    with pytest.raises(ValueError, match="router_placement"):
        DPNProcessor.from_model_config(config, tokenizer, router_placement="every_turn")
    # a model config of the earlier semantics gets the earlier format
    legacy_config = DPNConfig.from_dict(
        {k: v for k, v in config.to_dict().items() if k != "dpn_config_version"}
    )
    assert legacy_config.dpn_config_version == 1
    assert DPNProcessor.from_model_config(legacy_config, tokenizer).router_placement == "last_user_turn"
    assert DPNProcessor.from_model_config(config, tokenizer).router_placement == "every_user_turn"


def test_processor_saved_before_router_placement_loads_the_old_format(processor, tmp_path):
    import json

    register()
    processor.save_pretrained(tmp_path / "new")
    assert AutoProcessor.from_pretrained(tmp_path / "new").router_placement == "every_user_turn"
    # a processor_config.json written before the key existed
    processor.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "processor_config.json"
    saved = json.loads(path.read_text())
    del saved["router_placement"]
    path.write_text(json.dumps(saved))
    old = AutoProcessor.from_pretrained(tmp_path / "old")
    assert old.router_placement == "last_user_turn"
    # the class's own from_pretrained goes the same way, and an explicit choice wins over the legacy rule
    assert DPNProcessor.from_pretrained(tmp_path / "old").router_placement == "last_user_turn"
    chosen = AutoProcessor.from_pretrained(tmp_path / "old", router_placement="every_user_turn")
    assert chosen.router_placement == "every_user_turn"
    messages = [{"role": "user", "content": "<image>\nColor?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Where?"}]  # fmt: skip
    assert old.build_prompt(messages).count("<router>") == 1
    assert processor.build_prompt(messages).count("<router>") == 2


def test_data_pipeline_puts_a_router_after_every_user_turn(processor, config):
    """pipelines.preprocess (training and evaluation rows) places <router> as the processor does."""
    import json

    from pipelines.preprocess import tokenize_batch

    conversation = _two_rounds()
    batch = {
        "id": np.array(["a", "b"]),
        "bad_reason": np.array(["", ""]),
        "conversations": np.array([json.dumps(conversation), json.dumps(conversation)], dtype=object),
        "image": np.array([b"png", None], dtype=object),  # only whether there is an image matters here
    }
    train = tokenize_batch(batch, processor, max_length=512, mode="train")
    ids, labels = train["input_ids"][0].tolist(), train["labels"][0].tolist()
    routers = [i for i, token in enumerate(ids) if token == config.router_token_id]
    assert len(routers) == 2 and all(labels[i] == IGNORE_INDEX for i in routers)
    assert config.router_token_id not in train["input_ids"][1].tolist()  # no image
    evaluation = tokenize_batch(batch, processor, max_length=512, mode="eval")
    prompt_ids = evaluation["input_ids"][0].tolist()
    assert prompt_ids.count(config.router_token_id) == 2
    assert prompt_ids == processor.encode(conversation[:3], True, mode="generate")["input_ids"]
    assert prompt_ids == ids[: len(prompt_ids)]  # the training sequence starts with the same prompt


# ---------------------------------------------------------------------------------------------------------------
# Save / load and real-LLaVA-style tokenizers
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_round_trip_through_auto_processor(processor, tmp_path):
    register()
    register()  # idempotent
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DPNProcessor and type(loaded.image_processor) is DPNImageProcessor
    assert loaded.image_seq_length == processor.image_seq_length
    assert (loaded.image_token_id, loaded.router_token_id) == (
        processor.image_token_id,
        processor.router_token_id,
    )
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    prompt = processor.build_prompt(_conversation()[:1])
    assert (
        loaded.apply_chat_template(
            [{"role": "user", "content": "<image>\nWhat color is the large circle?"}],
            add_generation_prompt=True,
        )
        == prompt
    )
    a, b = processor(images=_image(), text=prompt), loaded(images=_image(), text=prompt)
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    conversation = _conversation()
    assert loaded.encode(conversation, True) == processor.encode(conversation, True)


def _llava_like_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-shaped tokenizer (Metaspace BPE, <s> prepended) with `<image>` added after the vocabulary, as llava-hf."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    corpus = [DEFAULT_SYSTEM_PROMPT, "USER: What color is the circle? ASSISTANT: red"] * 3
    backend.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    return tokenizer


def test_real_llava_style_tokenizer_with_added_router(tmp_path):
    tokenizer = _llava_like_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    size_before = len(tokenizer)
    with pytest.raises(ValueError, match="add_dpn_special_tokens"):
        DPNProcessor(DPNImageProcessor(), tokenizer)
    ids = add_dpn_special_tokens(tokenizer)
    assert ids == {"image_token_id": image_id, "router_token_id": size_before}
    assert add_dpn_special_tokens(tokenizer) == ids and len(tokenizer) == size_before + 1  # idempotent
    assert tokenizer.pad_token == tokenizer.unk_token  # LLaVA pads with <unk>
    processor = DPNProcessor(
        DPNImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer, image_seq_length=9
    )
    encoded = processor.encode(_conversation("What color is the circle?"), has_image=True)
    assert (
        encoded["input_ids"].count(image_id) == 9 and encoded["input_ids"].count(ids["router_token_id"]) == 1
    )
    learned = [label for label in encoded["labels"] if label != IGNORE_INDEX]
    assert (
        tokenizer.decode(learned, skip_special_tokens=True) == "red" and learned[-1] == tokenizer.eos_token_id
    )
    out = processor(images=[_image(), _image()], text=[processor.build_prompt(_conversation()[:1])] * 2)
    assert (out["input_ids"] == image_id).sum(dim=1).tolist() == [9, 9]
    processor.save_pretrained(tmp_path)
    register()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.router_token_id == ids["router_token_id"] and loaded.image_seq_length == 9


def test_from_model_config_checks_token_ids(config, tokenizer):
    processor = DPNProcessor.from_model_config(config, tokenizer)
    assert processor.image_seq_length == config.image_seq_length
    assert processor.image_processor.crop_size.height == IMAGE_SIDE
    wrong = DPNConfig(**{**config.to_dict(), "router_token_id": config.image_token_id + 100})
    with pytest.raises(ValueError, match="router_token_id"):
        DPNProcessor.from_model_config(wrong, tokenizer)


def test_apply_chat_template_tokenize_with_images(processor, config):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What color?"}],
        }
    ]
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = processor(images=_image(), text=processor.build_prompt(messages))
    assert out["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"])
    assert (out["input_ids"] == config.image_token_id).sum() == config.image_seq_length
