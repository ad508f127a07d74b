"""Tokenizers for DPN: a small BPE tokenizer trained locally, and `<router>` support for real LLaVA tokenizers.

The tiny tokenizer mirrors what a Llama tokenizer does, so the same processor code serves both:
SentencePiece-style `▁` word markers (a `▁` is added before the first word of a text, never after a
special token), `<s>` prepended by the post-processor, `</s>` as end of turn, and `<image>` / `<router>` as
special tokens that are never split. Trained on the built-in corpus, every word of the synthetic benchmark
("red", "left", "3", ...) is a single token `▁red`, so short exact-match answers are one token plus `</s>`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
ROUTER_TOKEN = "<router>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, ROUTER_TOKEN)
WORD_MARKER = "\u2581"  # "▁", SentencePiece's word-start marker

# Vocabulary of the synthetic benchmark: these must come out as single tokens.
COLORS = (
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black",
    "cyan", "magenta", "gray", "brown", "pink",
)  # fmt: skip
SHAPES = ("circle", "square", "triangle", "dot", "shape", "shapes", "circles", "squares", "triangles", "dots")
POSITIONS = ("left", "right", "top", "bottom", "center", "middle", "upper", "lower")
SIZES = ("large", "small", "big", "tiny", "huge", "little", "medium")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
CORNERS = (
    "topleft",
    "topright",
    "bottomleft",
    "bottomright",
    "rising",
    "falling",
)  # fine-grained tile answers
ANSWER_WORDS = (
    COLORS
    + SHAPES
    + POSITIONS
    + CORNERS
    + SIZES
    + NUMBER_WORDS
    + tuple(str(d) for d in range(10))
    + ("yes", "no")
)
QUESTION_WORDS = (
    "what", "which", "where", "how", "many", "much", "is", "are", "there", "the", "a", "an", "of", "in",
    "on", "at", "to", "and", "or", "color", "colour", "count", "number", "image", "picture", "this", "that",
    "it", "its", "with", "side", "corner", "answer", "single", "word", "using", "question", "describe",
    "do", "does", "you", "see", "any", "mark", "marks", "letter", "text", "near", "next", "above", "below",
    "between", "largest", "smallest", "biggest", "object", "objects", "please", "briefly", "background",
    "tile", "half", "quadrant", "diagonal", "have", "show", "shows",
)  # fmt: skip


def default_corpus() -> list[str]:
    """Built-in training text: the chat template, the synthetic benchmark's questions and answers.

    The template's text comes from [`render_turns`], its one writer, so the words the tokenizer learns
    whole are the ones prompts are made of.

    Returns:
        `list[str]`: Lines of text; answer words are repeated so BPE merges each into a single token.
    """
    # Imported here: processing imports this module's token names at its top.
    from dpn_model.processing import DEFAULT_SYSTEM_PROMPT, render_turns

    lines = [DEFAULT_SYSTEM_PROMPT]
    templates = (
        "What color is the {size} {shape}?",
        "What colour is the {size} {shape} in the {pos}?",
        "How many {size} {shape}s are there?",
        "Where is the {color} {shape}?",
        "Is there a {color} {shape} at the {pos}?",
        "Which shape is {color}? Answer with a single word.",
        "Count the {color} {shape}s in the image.",
        "Which corner of the {size} tile is {color}?",
        "Is the {color} diagonal of the {size} tile rising or falling?",
    )
    for template, size, shape, color, pos in itertools.product(
        templates, SIZES[:4], SHAPES[:4], COLORS, POSITIONS[:5]
    ):
        question = template.format(size=size, shape=shape, color=color, pos=pos)
        # A routed image turn, its answer, then the question again as a later (unrouted) user turn.
        turns = [("user", f"{IMAGE_TOKEN}\n{question}"), ("assistant", color), ("user", question)]
        lines.append(render_turns("", turns, {0}, add_generation_prompt=False))
    lines.append(" ".join(QUESTION_WORDS))
    lines.extend(" ".join(ANSWER_WORDS) for _ in range(20))
    # Answers right after the template's "ASSISTANT:" and words at the very start of a text.
    lines.extend(
        render_turns("", [("user", "question"), ("assistant", word)], set(), add_generation_prompt=False)
        for word in ANSWER_WORDS
    )
    lines.extend(ANSWER_WORDS)
    return lines


def build_tokenizer(
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    include_default_corpus: bool = True,
    model_max_length: int = 2048,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Train a small byte-pair-encoding tokenizer locally (no download) with DPN's special tokens.

    Args:
        texts (`Iterable[str]`, *optional*):
            Extra training text (e.g. the questions and answers of a dataset). The built-in corpus is added unless
            `include_default_corpus=False`.
        vocab_size (`int`, *optional*, defaults to 1024):
            Upper bound on the vocabulary size, special tokens included. Training stops earlier when every word of
            the corpus is already a single token.
        include_default_corpus (`bool`, *optional*, defaults to `True`):
            Train on [`default_corpus`] too, so chat-template words and benchmark answers are in the vocabulary.
        model_max_length (`int`, *optional*, defaults to 2048):
            Stored as the tokenizer's `model_max_length`.
        padding_side (`str`, *optional*, defaults to `"right"`):
            Default padding side (`"right"` for training; pass `padding_side="left"` to the processor to generate).

    Returns:
        [`PreTrainedTokenizerFast`]: Ids 0..5 are `<unk>`, `<s>`, `</s>`, `<pad>`, `<image>`, `<router>`;
        `tokenizer.image_token` and `tokenizer.router_token` name the last two.
    """
    corpus = _training_corpus(texts, include_default_corpus)
    if vocab_size <= len(SPECIAL_TOKENS) + 100:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must exceed the special tokens plus ASCII (~106)"
        )
    tokenizer = _llama_like_bpe()
    _train_bpe(tokenizer, corpus, vocab_size)
    tokenizer.post_processor = _bos_post_processor(tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "router_token": ROUTER_TOKEN},
        model_max_length=model_max_length,
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],
    )


def _training_corpus(texts: Iterable[str] | None, include_default_corpus: bool) -> list[str]:
    """The caller's texts plus, by default, [`default_corpus`]; an empty corpus is an error, not an empty vocab."""
    corpus: list[str] = list(texts) if texts is not None else []
    if include_default_corpus:
        corpus.extend(default_corpus())
    if not corpus:
        raise ValueError(
            "build_tokenizer got no training text: pass texts=... or keep include_default_corpus=True"
        )
    return corpus


def _llama_like_bpe() -> Tokenizer:
    """An untrained BPE tokenizer that splits text as Llama's does, so the processor treats both the same.

    Newlines are tokens of their own (as Llama's <0x0A>); Llama-like word markers after that. split=True keeps
    every word its own pre-token, so merges never cross words and a text tokenizes the same whole or cut at a space.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=WORD_MARKER, prepend_scheme="first", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_MARKER, prepend_scheme="first", split=True)
    return tokenizer


def _train_bpe(tokenizer: Tokenizer, corpus: list[str], vocab_size: int) -> None:
    """Learn the merges in place, with the special tokens at ids 0..5 and every printable ASCII character known.

    Special tokens are added whole; their spelling is cut out of the training text so no merge learns it.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n", "\t", WORD_MARKER],
        show_progress=False,
    )
    special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    tokenizer.train_from_iterator(
        (piece for line in corpus for piece in special.split(line)), trainer=trainer
    )


def _bos_post_processor(tokenizer: Tokenizer) -> processors.TemplateProcessing:
    """Prepend `<s>` as Llama's tokenizer does, so `add_special_tokens=True` gives the same layout for both."""
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    return processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )


def add_dpn_special_tokens(
    tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN, router_token: str = ROUTER_TOKEN
) -> dict[str, int]:
    """Add `<router>` (and `<image>` when missing) to an existing tokenizer, e.g. a llava-hf Llama tokenizer.

    Tokens already in the vocabulary keep their ids; `<router>` gets the next free id (`len(tokenizer)` before the
    call). A tokenizer without a padding token gets `pad_token = unk_token`, as LLaVA does. Resize the model's
    embeddings to `len(tokenizer)` afterwards and use the returned ids in the config.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]):
            The tokenizer to extend, in place.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder token.
        router_token (`str`, *optional*, defaults to `"<router>"`):
            The router token.

    Returns:
        `dict[str, int]`: `{"image_token_id": ..., "router_token_id": ...}`, ready to pass to [`DPNConfig`].
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in (image_token, router_token) if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids(image_token),
        "router_token_id": tokenizer.convert_tokens_to_ids(router_token),
    }
    for name, token in (("image_token_id", image_token), ("router_token_id", router_token)):
        if tokenizer.encode(token, add_special_tokens=False) != [ids[name]]:
            raise ValueError(
                f"{token!r} is in the vocabulary but is not a special (unsplittable) token of this tokenizer; "
                f"register it with tokenizer.add_special_tokens before converting"
            )
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    return ids


__all__ = [
    "ANSWER_WORDS",
    "IMAGE_TOKEN",
    "ROUTER_TOKEN",
    "add_dpn_special_tokens",
    "build_tokenizer",
    "default_corpus",
]
