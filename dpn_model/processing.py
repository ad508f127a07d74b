"""`DPNProcessor`: tokenizer + image processor, the vicuna-v1 chat format with the `<router>` token, label masking.

Prompt format (LLaVA-1.5's vicuna-v1 conversation, plus DPN's router token)::

    {system} USER: <image>\n{question} <router> ASSISTANT: {answer}</s>USER: {question 2} <router> ASSISTANT: {answer 2}</s>

As in the authors' code, `<router>` ends *every* user turn of a conversation with an image (text-only
conversations get none: they are never pooled), right before " ASSISTANT:"; by causal attention each one has
seen the image and its question, and the routers read their mean (`DPNConfig.router_token_reduction`).
`router_placement="last_user_turn"` is the earlier format (one `<router>` at the end of the last user turn,
image or not); a processor saved before `router_placement` existed loads with it, so old checkpoints keep the
prompts they were trained on. Router tokens are prompt tokens: never labels. The processor expands each `<image>` into
`image_seq_length` copies (one per visual token), like [`LlavaProcessor`]. Nothing here depends on the tiny
vocabulary: the same code serves a llava-hf Llama tokenizer extended with [`add_dpn_special_tokens`].

[`DPNProcessor.encode`] is the one conversion of a sample to token ids (`mode="train"`: with labels;
`mode="generate"`: the prompt): the data pipeline, evaluation, serving and the MLflow pyfunc all call it, and all text
is written by [`render_turns`] (the chat template renders the same string, for `apply_chat_template` users).

Special tokens have one rule, owned here ([`DPNProcessor.check_text`], applied by `encode` to the text of every
message): text from users and from data never yields a special or added token of the tokenizer (`</s>` typed into a
question would be token-identical to a real end of turn); such text is refused with [`ReservedTokenError`], which
serving answers as a 400 and the data pipeline counts as `reserved_token`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from dpn_model.image_processing import DPNImageProcessor
from dpn_model.tokenization import EOS_TOKEN, IMAGE_TOKEN, ROUTER_TOKEN

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
IGNORE_INDEX = -100
IMAGE_PART_TYPES = ("image", "image_url")
ROUTER_PLACEMENTS = ("every_user_turn", "last_user_turn")
# The one role table: every spelling a conversation may use -> the processor's role. LLaVA data (pipelines.formats)
# writes the same roles as `LLAVA_ROLES` names them.
ROLE_ALIASES: dict[str, str] = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
LLAVA_ROLES: dict[str, str] = {"user": "human", "assistant": "gpt", "system": "system"}
ENCODE_MODES = ("train", "generate")

# Same output as `build_prompt` for role/content messages. Variables other than `messages`,
# `add_generation_prompt` and `eos_token` are filled in by `DPNProcessor.apply_chat_template`.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set image_token = image_token | default('<image>') -%}"
    "{%- set router_token = router_token | default('<router>') -%}"
    "{%- set eos = eos_token | default('</s>') -%}"
    "{%- set placement = router_placement | default('every_user_turn') -%}"
    "{%- set ns = namespace(system=default_system_prompt | default('"
    + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'")
    + "'), "
    "last_user=-1, has_image=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if message['role'] != 'system' -%}"
    "{%- if message['content'] is string -%}"
    "{%- if image_token in message['content'] -%}{%- set ns.has_image = true -%}{%- endif -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.has_image = true -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system -%}{{ ns.system ~ ' ' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(images='', texts=[]) -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url'] -%}{%- set parts.images = parts.images ~ image_token ~ '\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.texts = parts.texts + [part['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set text = parts.images ~ (parts.texts | join(' ')) -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'USER: ' ~ text }}"
    "{%- if (add_router_token is not defined or add_router_token) and ("
    "(placement == 'every_user_turn' and ns.has_image) or (placement == 'last_user_turn' and loop.index0 == ns.last_user)"
    ") -%}"
    "{{ ' ' ~ router_token }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT: ' ~ text ~ eos }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'user' -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


class PromptTooLongError(ValueError):
    """The prompt (system, image tokens, first question, `<router>`) alone does not fit in `max_length`."""


class ReservedTokenError(ValueError):
    """Text (typed by a user or read from data) that would encode to a special or added token of the tokenizer.

    Args:
        token (`str`): The reserved token found, as the tokenizer spells it (`"</s>"`, `"<router>"`, ...).
        message_index (`int`, *optional*): Position of the message that holds it, when known.
    """

    def __init__(self, token: str, message_index: int | None = None):
        self.token = token
        self.message_index = message_index
        where = "the text" if message_index is None else f"message {message_index}"
        super().__init__(
            f"{where} contains the reserved token {token!r}: special and added tokens of the tokenizer cannot be "
            "typed as text (the processor adds them where the prompt format needs them); remove it from the text"
        )


@dataclass(frozen=True)
class _ReservedTokens:
    """What [`DPNProcessor.check_text`] refuses, computed once per tokenizer state (`vocab_size` changes when
    tokens are added)."""

    vocab_size: int
    strings: re.Pattern[str]  # any reserved token as a substring
    strings_but_image: re.Pattern[str]  # the same without the image placeholder
    ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, image_token: str, router_token: str) -> _ReservedTokens:
        added = tokenizer.added_tokens_decoder
        own = [image_token, router_token]
        tokens = {*tokenizer.all_special_tokens, *(t.content for t in added.values()), *own}
        ids = {*tokenizer.all_special_ids, *added, *tokenizer.convert_tokens_to_ids(own)}
        # The unknown id also stands for characters the vocabulary lacks (the tiny BPE maps "é" to it): that is the
        # text's honest encoding, not a forged token; the literal "<unk>" is still refused by the substring check.
        ids.discard(tokenizer.unk_token_id)

        def pattern(strings: set[str]) -> re.Pattern[str]:  # longest first: report "<s>x" rather than "<s>"
            ordered = sorted(strings, key=lambda t: (-len(t), t))
            return re.compile("|".join(re.escape(t) for t in ordered if t))

        return cls(len(tokenizer), pattern(tokens), pattern(tokens - {image_token}), frozenset(ids) - {None})


def _typed_texts(content: Any) -> list[str]:
    """The text a message's sender typed: a string content, or the text parts of a list (image parts are not
    text: the processor writes their `<image>` itself)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Sequence):
        return []
    return [
        part["text"]
        for part in content
        if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
    ]


def _message_text(content: Any, image_token: str) -> str:
    """Flatten a message's content (a string, or a list of text/image parts) to text with image placeholders."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    images, texts = "", []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in IMAGE_PART_TYPES:
            images += image_token + "\n"
        elif kind == "text":
            texts.append(part["text"])
        else:
            raise ValueError(
                f"unsupported content part {part!r}: expected {{'type': 'text' | 'image' | 'image_url'}}"
            )
    return images + " ".join(texts)


def normalize_messages(
    messages: Sequence[Mapping[str, Any]], image_token: str = IMAGE_TOKEN
) -> tuple[str | None, list[tuple[str, str]]]:
    """Turn OpenAI/HF (`role`/`content`) or LLaVA (`from`/`value`) messages into `(system, [(role, text)])`.

    Args:
        messages (`list[dict]`):
            `{"role": "user" | "assistant" | "system", "content": str | list[part]}` or
            `{"from": "human" | "gpt" | "system", "value": str}`.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            Placeholder written for `{"type": "image"}` parts (each followed by a newline, before the text).

    Returns:
        `tuple[str | None, list[tuple[str, str]]]`: The system prompt if a system message was given (else `None`),
        and the other turns as `("user" | "assistant", text)`, checked to alternate starting with the user.
    """
    system, turns = None, []
    for index, message in enumerate(messages):
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role not in ROLE_ALIASES or content is None:
            raise ValueError(
                f"message {index} must have role user/assistant/system (or from human/gpt) and content, got {message!r}"
            )
        role = ROLE_ALIASES[role]
        text = _message_text(content, image_token)
        if role == "system":
            if turns:
                raise ValueError(f"the system message must come first, found one at position {index}")
            system = text
            continue
        expected = "user" if not turns or turns[-1][0] == "assistant" else "assistant"
        if role != expected:
            raise ValueError(
                f"messages must alternate user/assistant starting with the user; message {index} is {role!r} "
                f"where {expected!r} was expected"
            )
        turns.append((role, text))
    return system, turns


def _routed_turns(turns: Sequence[tuple[str, str]], image_token: str, placement: str) -> set[int]:
    """Indices of the user turns that end with `<router>` under `placement` (see [`build_prompt`])."""
    if placement not in ROUTER_PLACEMENTS:
        raise ValueError(f"router_placement must be one of {ROUTER_PLACEMENTS}, got {placement!r}")
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if placement == "last_user_turn":
        return set(users[-1:])
    return set(users) if any(image_token in text for _, text in turns) else set()


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    add_router_token: bool = True,
    add_generation_prompt: bool = True,
    image_token: str = IMAGE_TOKEN,
    router_token: str = ROUTER_TOKEN,
    eos_token: str = EOS_TOKEN,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    router_placement: str = "every_user_turn",
) -> str:
    """Render a conversation in the vicuna-v1 format with DPN's `<router>` tokens.

    Args:
        messages (`list[dict]`):
            Role/content or LLaVA from/value messages (see [`normalize_messages`]).
        add_router_token (`bool`, *optional*, defaults to `True`):
            Add `router_token`s (DPN models need them; plain LLaVA does not).
        add_generation_prompt (`bool`, *optional*, defaults to `True`):
            End with `" ASSISTANT:"` when the last message is from the user, for generation.
        image_token, router_token, eos_token (`str`, *optional*):
            The tokenizer's placeholder, router and end-of-turn tokens.
        system_prompt (`str`, *optional*, defaults to LLaVA-1.5's system prompt):
            Used when the messages have no system message; `""` for none.
        router_placement (`str`, *optional*, defaults to `"every_user_turn"`):
            `"every_user_turn"`: `<router>` ends every user turn of a conversation with an image, none without one
            (the reference); `"last_user_turn"`: one `<router>` at the end of the last user turn (earlier format).

    Returns:
        `str`: The prompt, without `<s>` (the tokenizer adds it).
    """
    system, turns = normalize_messages(messages, image_token)
    system = system_prompt if system is None else system
    routed = _routed_turns(turns, image_token, router_placement) if add_router_token else set()
    return render_turns(system, turns, routed, add_generation_prompt, router_token, eos_token)


def render_turns(
    system: str,
    turns: Sequence[tuple[str, str]],
    routed: set[int],
    add_generation_prompt: bool,
    router_token: str = ROUTER_TOKEN,
    eos_token: str = EOS_TOKEN,
) -> str:
    """The one place the vicuna-v1 text is written: `system`, then `USER: ...` / ` ASSISTANT: ...</s>` turns,
    `router_token` after the user turns in `routed`, and ` ASSISTANT:` last when `add_generation_prompt`."""
    out = [system + " "] if system else []
    for i, (role, text) in enumerate(turns):
        if role == "user":
            out.append(f"{USER_ROLE}: {text}")
            if i in routed:
                out.append(f" {router_token}")
        else:
            out.append(f" {ASSISTANT_ROLE}: {text}{eos_token}")
    if add_generation_prompt and turns and turns[-1][0] == "user":
        out.append(f" {ASSISTANT_ROLE}:")
    return "".join(out)


class DPNProcessor(ProcessorMixin):
    r"""Processor of DPN models: a [`DPNImageProcessor`] and a tokenizer, LLaVA-style.

    Args:
        image_processor ([`DPNImageProcessor`]):
            Turns images into `pixel_values`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            Any tokenizer in which `image_token` and `router_token` are single special tokens: [`build_tokenizer`],
            or a llava-hf tokenizer after [`add_dpn_special_tokens`].
        chat_template (`str`, *optional*):
            Jinja template for [`apply_chat_template`]; defaults to one that matches [`build_prompt`].
        image_seq_length (`int`, *optional*, defaults to 576):
            Visual tokens per image, `config.image_seq_length` (`(image_size / patch_size) ** 2`).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            Image placeholder token.
        router_token (`str`, *optional*, defaults to `"<router>"`):
            Router token.
        system_prompt (`str`, *optional*, defaults to LLaVA-1.5's system prompt):
            System line used when a conversation has no system message.
        router_placement (`str`, *optional*, defaults to `"every_user_turn"`):
            Where `<router>` goes, in training, evaluation and serving alike (see [`build_prompt`]). A processor
            saved without this key (before it existed) loads as `"last_user_turn"`, the format it was built for.
    """

    def __init__(
        self,
        image_processor: DPNImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        image_seq_length: int = 576,
        image_token: str = IMAGE_TOKEN,
        router_token: str = ROUTER_TOKEN,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        router_placement: str = "every_user_turn",
        **kwargs: Any,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("DPNProcessor needs both an image_processor and a tokenizer")
        if router_placement not in ROUTER_PLACEMENTS:
            raise ValueError(f"router_placement must be one of {ROUTER_PLACEMENTS}, got {router_placement!r}")
        self.router_placement = router_placement
        if image_seq_length < 1:
            raise ValueError(
                f"image_seq_length must be >= 1 (config.image_seq_length), got {image_seq_length}"
            )
        self.image_seq_length = int(image_seq_length)
        self.image_token = image_token
        self.router_token = router_token
        self.system_prompt = system_prompt
        self.image_token_id = self._special_token_id(tokenizer, image_token, "image_token")
        self.router_token_id = self._special_token_id(tokenizer, router_token, "router_token")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Loading: a `processor_config.json` written before `router_placement` existed gets the one-router format
        its checkpoint was trained with (`"last_user_turn"`); its saved chat template matches that too.

        `get_processor_dict` is the public step every `from_pretrained` of transformers 5.x goes through (5.24
        then calls `from_args_and_dict`, 5.25 `from_dict`), so the rule holds whichever builds the processor.
        """
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        if "router_placement" not in processor_dict and "router_placement" not in kwargs:
            processor_dict = {**processor_dict, "router_placement": "last_user_turn"}
        return processor_dict, kwargs

    @staticmethod
    def _special_token_id(tokenizer: PreTrainedTokenizerBase, token: str, name: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"{name} {token!r} is not a single special token of this tokenizer (it encodes to {ids}); call "
                "dpn_model.tokenization.add_dpn_special_tokens(tokenizer) first, or build it with build_tokenizer()"
            )
        return ids[0]

    @classmethod
    def from_model_config(
        cls, config: Any, tokenizer: PreTrainedTokenizerBase, **kwargs: Any
    ) -> DPNProcessor:
        """Build the processor that matches a [`DPNConfig`]: image size, `image_seq_length` and token ids.

        A config of the earlier semantics (`dpn_config_version` 1) gets the one-router prompt format it was
        trained with (`router_placement="last_user_turn"`) unless `router_placement` is given.

        Args:
            config ([`DPNConfig`]): The model configuration.
            tokenizer ([`PreTrainedTokenizerBase`]): The model's tokenizer.
            **kwargs: Passed to [`DPNProcessor`] (e.g. `system_prompt`, `router_placement`).

        Returns:
            [`DPNProcessor`]
        """
        if getattr(config, "dpn_config_version", 2) < 2:
            kwargs.setdefault("router_placement", "last_user_turn")
        side = config.vision_config.image_size
        image_processor = DPNImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        processor = cls(image_processor, tokenizer, image_seq_length=config.image_seq_length, **kwargs)
        for name in ("image_token_id", "router_token_id"):
            if getattr(processor, name) != getattr(config, name):
                raise ValueError(
                    f"tokenizer and config disagree on {name}: tokenizer {getattr(processor, name)}, "
                    f"config {getattr(config, name)}; build the config from the tokenizer's ids"
                )
        return processor

    # ----------------------------------------------------------------------------------------------------------
    # Inference: prompts and batches
    # ----------------------------------------------------------------------------------------------------------
    def build_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_router_token: bool = True,
        add_generation_prompt: bool = True,
    ) -> str:
        """[`build_prompt`] with this processor's tokens and system prompt."""
        return build_prompt(
            messages,
            add_router_token=add_router_token,
            add_generation_prompt=add_generation_prompt,
            image_token=self.image_token,
            router_token=self.router_token,
            eos_token=self.tokenizer.eos_token,
            system_prompt=self.system_prompt,
            router_placement=self.router_placement,
        )

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """[`ProcessorMixin.apply_chat_template`] with the processor's image/router tokens and system prompt.

        Pass `add_router_token=False` to omit `<router>`; the output string equals [`build_prompt`]'s.
        """
        kwargs.setdefault("image_token", self.image_token)
        kwargs.setdefault("router_token", self.router_token)
        kwargs.setdefault("default_system_prompt", self.system_prompt)
        kwargs.setdefault("add_router_token", True)
        kwargs.setdefault("router_placement", self.router_placement)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Each `<image>` in the text becomes `image_seq_length` image tokens, one per visual token."""
        return self.image_token * self.image_seq_length

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize prompts (expanding `<image>`) and preprocess images.

        Args:
            images (`ImageLike` or `list[ImageLike]`, *optional*):
                One image per `<image>` in `text`, in order (see [`DPNImageProcessor.to_uint8`] for the types).
            text (`str` or `list[str]`, *optional*):
                Prompts, e.g. from [`build_prompt`].
            padding (`bool` or `str`, *optional*, defaults to `True`):
                Pad the batch to its longest prompt.
            padding_side (`str`, *optional*):
                `"left"` (generation) or `"right"` (training); defaults to the tokenizer's.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"`, `"np"` or `None`.
            **kwargs: Further tokenizer / image processor arguments (`truncation`, `max_length`, `size`, ...).

        Returns:
            [`BatchFeature`]: `input_ids`, `attention_mask` (when `text`) and `pixel_values` (when `images`).
        """
        if padding_side is not None:
            kwargs["padding_side"] = padding_side
        return super().__call__(
            images=images, text=text, padding=padding, return_tensors=return_tensors, **kwargs
        )

    # ----------------------------------------------------------------------------------------------------------
    # Text from users and data: the special-token rule
    # ----------------------------------------------------------------------------------------------------------
    def check_text(self, text: str, *, allow_image: bool = False) -> None:
        """Refuse text that would encode to a special or added token of the tokenizer.

        The rule for every text a user types (system, user and assistant turns of a chat request) or a dataset
        holds (every turn of a LLaVA conversation): it never yields `</s>`, `<s>`, `<pad>`, `<unk>`, `<image>`,
        `<router>` or any token of `tokenizer.added_tokens_decoder` (special or not), because such ids are
        indistinguishable from the ones the prompt format writes: `hi</s>USER: x ASSISTANT: y` would forge turns.
        [`encode`] applies it to every message, in both modes, so training, evaluation, serving and the MLflow
        pyfunc share it. The one exception is the data format's own: LLaVA's `<image>` placeholder in a user turn
        of a sample that has an image is the image marker (`allow_image=True` where the format reads it so).

        Detection is exact: a reserved token's spelling anywhere in `text` (case-sensitive: tokens matched on the
        raw text), or a reserved id among `text`'s own ids (tokens matched after the tokenizer's normalizer). The
        unknown-token id alone is let through: it is also how a tokenizer without byte fallback writes a character
        it lacks, not a token anyone typed.

        Why refuse rather than encode with `split_special_tokens=True`: transformers keeps that flag as mutable
        state on the shared backend tokenizer (`backend_tokenizer.encode_special_tokens` stays set after a split
        call, so threads sharing a processor race), and the in-context ids of split text depend on each
        tokenizer's prefix-space rules (Llama's legacy mode versus Metaspace `prepend_scheme="first"`). Refusing is
        exact for every tokenizer, as tiktoken's default of raising on special tokens in text.

        Args:
            text (`str`): The text as typed, before any template is applied.
            allow_image (`bool`, *optional*, defaults to `False`):
                Let `<image>` through (the data format's image marker); every other reserved token is still refused.

        Raises:
            [`ReservedTokenError`] (a `ValueError`): naming the first reserved token found.
        """
        reserved = self._reserved_tokens()
        match = (reserved.strings_but_image if allow_image else reserved.strings).search(text)
        if match:
            raise ReservedTokenError(match.group(0))
        ids = reserved.ids - {self.image_token_id} if allow_image else reserved.ids
        found = next((i for i in self.tokenizer.encode(text, add_special_tokens=False) if i in ids), None)
        if found is not None:
            raise ReservedTokenError(self.tokenizer.convert_ids_to_tokens(found))

    def _reserved_tokens(self) -> _ReservedTokens:
        """The reserved strings and ids, computed on first use and again only if tokens were added since."""
        cached: _ReservedTokens | None = getattr(self, "_reserved", None)
        if cached is None or cached.vocab_size != len(self.tokenizer):
            cached = _ReservedTokens.of(self.tokenizer, self.image_token, self.router_token)
            self._reserved = cached  # a race computes it twice, the same value: no lock needed
        return cached

    def _check_messages(self, messages: Sequence[Mapping[str, Any]], image_marker: str | None) -> None:
        """[`check_text`] on every message's typed text, naming the message in the error.

        `image_marker` says where the format reads a typed `<image>` as the image marker: `"user_turns"` (training:
        any user turn, moved to the first), `"first_message"` (generation with `image_first`: the first message
        when it is the user's, the only one it moves), `None` (nowhere: chat requests send images as parts).
        Malformed messages are left to [`normalize_messages`], which says what is wrong with them.
        """
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                continue
            role = message.get("role", message.get("from"))
            is_user = isinstance(role, str) and ROLE_ALIASES.get(role) == "user"
            allow_image = is_user and (
                image_marker == "user_turns" or (image_marker == "first_message" and index == 0)
            )
            for text in _typed_texts(message.get("content", message.get("value"))):
                try:
                    self.check_text(text, allow_image=allow_image)
                except ReservedTokenError as err:
                    raise ReservedTokenError(err.token, message_index=index) from None

    # ----------------------------------------------------------------------------------------------------------
    # Training: token ids and labels
    # ----------------------------------------------------------------------------------------------------------
    def _encode(self, text: str, after_special_token: bool) -> list[int]:
        """Token ids of `text` exactly as inside a longer prompt.

        SentencePiece-style tokenizers mark the start of a text (`USER` -> `▁USER`) but not a text that follows
        a special token (`</s>USER`); encoding behind the end-of-sequence token and dropping it reproduces the
        in-context ids. Special tokens are never merged with neighbours, so the cut is exact.
        """
        if not after_special_token or self.tokenizer.eos_token is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids = self.tokenizer.encode(self.tokenizer.eos_token + text, add_special_tokens=False)
        return ids[1:]

    def _expand_image(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        for token_id in ids:
            out.extend([token_id] * self.image_seq_length if token_id == self.image_token_id else [token_id])
        return out

    def _conversation_rounds(
        self, conversations: Sequence[Mapping[str, Any]], has_image: bool
    ) -> tuple[str, list[tuple[str, str]]]:
        system, turns = normalize_messages(conversations, self.image_token)
        system = self.system_prompt if system is None else system
        if turns and turns[-1][0] == "user":
            turns = turns[:-1]  # a trailing question without an answer has nothing to learn
        if not turns:
            raise ValueError("conversation has no assistant answer to learn from")
        num_images = sum(text.count(self.image_token) for _, text in turns)
        if not has_image and num_images:
            raise ValueError(
                f"conversation has {num_images} {self.image_token} placeholder(s) but has_image=False"
            )
        if has_image and num_images > 1:
            raise ValueError(
                f"one image per sample is supported, the conversation has {num_images} placeholders"
            )
        if has_image:
            if any(role == "assistant" and self.image_token in text for role, text in turns):
                raise ValueError(f"the {self.image_token} placeholder must be in a user turn, not an answer")
            # LLaVA's preprocess_multimodal: the image goes first in the first user turn, then a newline.
            turns = [(role, text.replace(self.image_token, "").strip()) for role, text in turns]
            turns[0] = ("user", f"{self.image_token}\n{turns[0][1]}")
        rounds = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
        return system, rounds

    def encode(
        self,
        messages: Sequence[Mapping[str, Any]],
        has_image: bool = False,
        mode: str = "train",
        max_length: int | None = None,
        *,
        image_first: bool = True,
    ) -> dict[str, Any]:
        """Token ids of one sample: the single conversion of a conversation used by training, evaluation, serving
        and the MLflow pyfunc alike.

        Args:
            messages (`list[dict]`):
                LLaVA `{"from", "value"}` or `{"role", "content"}` messages (see [`normalize_messages`]).
            has_image (`bool`, *optional*, defaults to `False`):
                Whether the sample has an image: ids do not depend on the image itself, only on its `<image>`
                placeholder, so the image is not passed here (its pixel values come from `self.image_processor`,
                see [`generation_inputs`] and `__call__`). Train mode: `<image>` is moved to (or added at) the start
                of the first user turn, and without an image any `<image>` is an error.
            mode (`str`, *optional*, defaults to `"train"`):
                `"train"`: the whole conversation with `labels` (only the answers and their `</s>` are learned).
                `"generate"`: the prompt up to the trailing ` ASSISTANT:`, no labels.
            max_length (`int`, *optional*):
                Longest sequence, image tokens included. Train mode drops trailing rounds / cuts the answer; generate
                mode raises [`PromptTooLongError`] for a longer prompt.
            image_first (`bool`, *optional*, defaults to `True`):
                Generate mode: LLaVA's data rule, `<image>` moved to the start of the first user turn (as training
                always does). Chat requests (serving, pyfunc) pass `False`: their image parts stay where they are.

        Returns:
            `dict`: `input_ids` (`list[int]`), plus `labels` and `truncated` in train mode.

        Raises:
            [`ReservedTokenError`]: the text of a message (any role) holds a special or added token of the
            tokenizer ([`check_text`]); the error names the message and the token.
            `TypeError`: `has_image` is not a `bool` (e.g. a list of images: pass `len(images) > 0`).
        """
        if not isinstance(has_image, bool):
            raise TypeError(
                f"has_image must be a bool (whether the sample has an image), got {type(has_image).__name__}; "
                "pass `len(images) > 0` rather than the images"
            )
        if mode == "train":
            return self._encode_train(messages, has_image, max_length)
        if mode != "generate":
            raise ValueError(f"mode must be one of {ENCODE_MODES}, got {mode!r}")
        ids = self._prompt_ids(messages, has_image and image_first)
        if max_length is not None and len(ids) > max_length:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens > max_length={max_length}")
        return {"input_ids": ids}

    def _prompt_ids(self, messages: Sequence[Mapping[str, Any]], image_first: bool) -> list[int]:
        """Generation prompt ids: `<s>`, the rendered prompt, each `<image>` expanded to `image_seq_length` ids."""
        if not messages:
            raise ValueError("no question to prompt with")
        self._check_messages(messages, "first_message" if image_first else None)
        if (
            image_first
        ):  # LLaVA's preprocess_multimodal, on the first turn (as the data pipeline has always done)
            first = {**messages[0]}
            key = "value" if "value" in first else "content"
            text = _message_text(first[key], self.image_token).replace(self.image_token, "").strip()
            first[key] = f"{self.image_token}\n{text}"
            messages = [first, *messages[1:]]
        text = self.build_prompt(messages, add_router_token=True, add_generation_prompt=True)
        return self._expand_image(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def generation_inputs(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[Any] | None = None,
        max_length: int | None = None,
        image_first: bool = False,
    ) -> BatchFeature:
        """Model inputs of one chat request for `generate`: [`encode`] (`mode="generate"`) and the images.

        Returns:
            [`BatchFeature`]: `input_ids` and `attention_mask` `(1, L)`, and `pixel_values` when `images`.
        """
        import torch

        has_image = images is not None and len(images) > 0
        ids = self.encode(
            messages, has_image, mode="generate", max_length=max_length, image_first=image_first
        )
        input_ids = torch.tensor([ids["input_ids"]], dtype=torch.long)
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if has_image:
            data["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return BatchFeature(data)

    def _encode_train(
        self,
        conversations: Sequence[Mapping[str, Any]],
        has_image: bool,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        """Token ids and labels of one training conversation; only the answers (and their `</s>`) are learned.

        The prompt and every answer are tokenized separately and concatenated, so an answer has the same ids as
        when tokenized alone (`" red"` -> `▁red`) and as in the inference prompt. `<router>` is placed as
        [`build_prompt`] places it (`router_placement`): after every user turn of a sample with an image, or, in the
        `"last_user_turn"` format, after the last user turn kept. Router tokens are never labels. When the sequence
        exceeds `max_length`, whole trailing rounds are dropped; if one round is still too long its answer is cut.
        The image tokens are never cut.

        Args:
            conversations (`list[dict]`):
                LLaVA `{"from", "value"}` or `{"role", "content"}` messages, alternating user/assistant.
            has_image (`bool`):
                The sample has an image: `<image>` is moved to (or added at) the start of the first user turn, as
                LLaVA does. Without an image, any `<image>` is an error.
            max_length (`int`, *optional*):
                Longest sequence to return, counting the expanded image tokens.

        Returns:
            `dict`: `input_ids` (`list[int]`), `labels` (`list[int]`, -100 where not learned) and `truncated` (`bool`).

        Raises:
            [`PromptTooLongError`] (a `ValueError`): when the first prompt (with its image tokens) plus one answer
            token exceeds `max_length`; count and skip such samples, or raise `max_length`.
            [`ReservedTokenError`] (a `ValueError`): a turn's text holds a special or added token (see
            [`check_text`]; `<image>` is the image marker in a user turn of a sample with an image).
            `ValueError`: malformed conversations (roles out of order, several images, no answer).
        """
        self._check_messages(conversations, "user_turns" if has_image else None)
        system, rounds = self._conversation_rounds(conversations, has_image)
        start_ids = self.tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. [<s>]
        pieces = self._round_ids(system, rounds)
        for num_rounds in range(len(rounds), 0, -1):
            prompts = self._kept_prompts(pieces, num_rounds, has_image)
            answers = [piece.answer for piece in pieces[:num_rounds]]
            length = len(start_ids) + sum(len(ids) for ids in prompts) + sum(len(ids) for ids in answers)
            if max_length is None or length <= max_length:
                return {**_with_labels(start_ids, prompts, answers), "truncated": num_rounds < len(rounds)}
        return self._cut_first_answer(start_ids, pieces, has_image, max_length)

    def _round_ids(self, system: str, rounds: Sequence[tuple[str, str]]) -> list[_RoundIds]:
        """Each round's prompt (with and without `<router>`) and answer, tokenized apart as they are in context.

        Tokenizing apart keeps an answer's ids those of the answer alone (`" red"` -> `▁red`); both prompt variants
        are kept because where `<router>` goes depends on how many rounds survive truncation.
        """
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        pieces = []
        for index, (question, answer) in enumerate(rounds):
            head = system if index == 0 else ""
            plain_text, routed_text = (
                render_turns(head, [("user", question)], routes, True, self.router_token)
                for routes in (set(), {0})
            )
            # Round 0 starts the text (the tokenizer marks its first word); later rounds follow </s>.
            plain = self._expand_image(self._encode(plain_text, after_special_token=index > 0))
            routed = self._expand_image(self._encode(routed_text, after_special_token=index > 0))
            pieces.append(
                _RoundIds(plain, routed, self._encode(f" {answer}", after_special_token=True) + eos)
            )
        return pieces

    def _kept_prompts(self, pieces: Sequence[_RoundIds], num_rounds: int, has_image: bool) -> list[list[int]]:
        """Prompt ids of the first `num_rounds` rounds, `<router>` placed as [`build_prompt`] places it."""
        kept = pieces[:num_rounds]
        if self.router_placement == "last_user_turn":
            return [
                piece.routed if index == num_rounds - 1 else piece.plain for index, piece in enumerate(kept)
            ]
        # "every_user_turn": every user turn of a sample with an image, none of a text-only one
        return [piece.routed if has_image else piece.plain for piece in kept]

    def _cut_first_answer(
        self, start_ids: list[int], pieces: Sequence[_RoundIds], has_image: bool, max_length: int
    ) -> dict[str, Any]:
        """The first round alone with its answer cut to fit `max_length`: the last resort before refusing.

        Raises [`PromptTooLongError`] when not even one answer token fits after the first prompt.
        """
        prompts = self._kept_prompts(pieces, 1, has_image)
        prompt_length = len(start_ids) + len(prompts[0])
        if prompt_length + 1 > max_length:
            raise PromptTooLongError(
                f"the first prompt needs {prompt_length} tokens ({self.image_seq_length if has_image else 0} of them "
                f"image tokens) plus at least one answer token, more than max_length={max_length}; raise max_length "
                "or drop this sample"
            )
        answer = pieces[0].answer[: max_length - prompt_length]
        return {**_with_labels(start_ids, prompts, [answer]), "truncated": True}


@dataclass(frozen=True)
class _RoundIds:
    """One round of a training conversation, tokenized: its prompt without and with `<router>`, its answer + `</s>`."""

    plain: list[int]
    routed: list[int]
    answer: list[int]


def _with_labels(
    start_ids: list[int], prompts: Sequence[list[int]], answers: Sequence[list[int]]
) -> dict[str, list[int]]:
    """Concatenate the rounds after `start_ids`; labels are the answers, `IGNORE_INDEX` on every prompt token."""
    input_ids, labels = list(start_ids), [IGNORE_INDEX] * len(start_ids)
    for prompt_ids, answer in zip(prompts, answers, strict=True):
        input_ids += prompt_ids + answer
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer
    return {"input_ids": input_ids, "labels": labels}


def register() -> None:
    """Register DPN's config, image processor and processor with the Auto classes (idempotent).

    After this, `AutoConfig`, `AutoImageProcessor` and `AutoProcessor.from_pretrained(directory)` load DPN files.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    from dpn_model.configuration import DPNConfig

    AutoConfig.register(DPNConfig.model_type, DPNConfig, exist_ok=True)
    AutoImageProcessor.register(DPNConfig, image_processor_classes={"pil": DPNImageProcessor}, exist_ok=True)
    AutoProcessor.register(DPNConfig, DPNProcessor, exist_ok=True)


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "ENCODE_MODES",
    "IGNORE_INDEX",
    "LLAVA_ROLES",
    "ROLE_ALIASES",
    "ROUTER_PLACEMENTS",
    "DPNProcessor",
    "PromptTooLongError",
    "ReservedTokenError",
    "build_prompt",
    "normalize_messages",
    "register",
    "render_turns",
]
