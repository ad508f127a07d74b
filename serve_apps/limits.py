"""Input limits and image validation for the serving API.

Everything a client sends is checked here before it reaches a model replica: the body size, image URLs (data
URLs or raw base64; remote http(s) only when enabled), base64 validity, the image's format, byte size, pixel count
and geometry, the number of images, and `max_tokens`. Each failure is an [`APIError`] (400, or 413 for the body)
that says what was wrong, which field and which limit. Prompt token limits are checked on the model replica, which
owns the tokenizer.

Images are decoded here, once, and handed on as RGB arrays: the geometry is checked from the header before any
pixel is decoded, and an image whose longer side exceeds `max_padded_side` is shrunk before the processor pads it
to a square, so the work and memory of one image are bounded by the limits, whatever the file declares.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Any

import numpy as np
import PIL.Image
from pydantic import Field, field_validator, model_validator

from dpn_model.image_processing import decode_image as decode_image_file
from dpn_model.image_processing import open_image
from pipelines.config_models import ConfigModel, validate_config
from serve_apps.protocol import APIError, invalid_request

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class Limits(ConfigModel):
    """Configurable request limits (the `limits` section of the serve config).

    Attributes:
        max_body_bytes: Largest request body, in bytes (413 beyond it, before parsing). Must hold
            `max_images_per_request` images of `max_image_bytes` in base64.
        max_image_bytes: Largest decoded image file, in bytes.
        max_image_pixels: Largest image, in pixels (width * height), checked before decoding the pixels.
        max_image_side: Longest side of an image, in pixels.
        max_image_aspect_ratio: Largest ratio of an image's longer side to its shorter one.
        max_padded_side: An image whose longer side exceeds this is shrunk to it (aspect kept) before the
            processor pads it to a square, so the padded canvas is at most `max_padded_side` squared.
        max_images_per_request: Images in one request (DPN models take one image per sample).
        max_prompt_tokens: Longest prompt in tokens, counting `image_seq_length` tokens per image.
        max_tokens: Largest `max_tokens` a request may ask for.
        default_max_tokens: `max_tokens` when the request gives none.
        allow_remote_images: Fetch `http(s)://` image URLs (off by default: the server makes no outbound calls).
        remote_timeout_s: Timeout of a remote image fetch.
        image_formats: Accepted image formats (PIL names).
    """

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_side: int = Field(8192, ge=1)
    max_image_aspect_ratio: float = Field(20.0, ge=1)
    max_padded_side: int = Field(1024, ge=1)
    max_images_per_request: int = Field(1, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(512, ge=1)
    default_max_tokens: int = Field(64, ge=1)
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

    @field_validator("image_formats", mode="before")
    @classmethod
    def _upper_case(cls, formats: Any) -> Any:
        if isinstance(formats, (list, tuple)):
            return tuple(str(f).upper() for f in formats)
        return formats

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        images_b64 = 4 * -(-self.max_image_bytes // 3) * self.max_images_per_request
        if self.max_body_bytes < images_b64:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) cannot hold {self.max_images_per_request} image(s) "
                f"of max_image_bytes in base64 ({images_b64} bytes); raise it or lower the image limits"
            )
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Limits:
        """Build from the serve config's `limits` mapping, refusing unknown keys (a typo would otherwise be silently
        ignored); a `pipelines.config_models.ConfigError` (a `ValueError`) names each wrong key."""
        return validate_config(cls, values or {}, section="limits")

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), "image_formats": list(self.image_formats)}


def decode_base64(data: str, param: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, whitespace ignored) -> bytes, or a 400."""
    if not data or not _B64_CHARS.match(data):
        raise invalid_request(
            "image data is not valid base64: expected a data URL 'data:image/png;base64,...' or raw base64",
            param=param,
            code="invalid_base64",
        )
    compact = re.sub(r"\s+", "", data)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid_request(
            f"image data is not valid base64 ({exc})", param=param, code="invalid_base64"
        ) from exc


def check_body_size(size: int, limits: Limits) -> None:
    """A 413 in OpenAI's shape when a request body (declared or read so far) exceeds `max_body_bytes`."""
    if size > limits.max_body_bytes:
        raise APIError(
            413,
            f"request body is larger than the limit of {limits.max_body_bytes} bytes (limits.max_body_bytes); "
            "send smaller images",
            "invalid_request_error",
            code="request_too_large",
        )


def _check_geometry(width: int, height: int, limits: Limits, param: str) -> None:
    """Pixel count, longest side and aspect ratio from the header, before any pixel is decoded."""
    if width * height > limits.max_image_pixels:
        raise invalid_request(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limits.max_image_pixels} pixels (limits.max_image_pixels); resize it first",
            param=param,
            code="image_too_large",
        )
    if max(width, height) > limits.max_image_side:
        raise invalid_request(
            f"image is {width}x{height}, its longer side is more than the limit of {limits.max_image_side} pixels "
            "(limits.max_image_side); resize it first",
            param=param,
            code="image_too_large",
        )
    if max(width, height) > limits.max_image_aspect_ratio * min(width, height):
        raise invalid_request(
            f"image is {width}x{height}, an aspect ratio beyond the limit of {limits.max_image_aspect_ratio:g}:1 "
            "(limits.max_image_aspect_ratio); crop it first",
            param=param,
            code="image_aspect_ratio",
        )


def _open_image(raw: bytes, limits: Limits, param: str) -> PIL.Image.Image:
    """Open `raw` lazily (header only) as one of the accepted formats, enforcing the byte and geometry limits."""
    if len(raw) > limits.max_image_bytes:
        raise invalid_request(
            f"image is {len(raw)} bytes, more than the limit of {limits.max_image_bytes} bytes "
            "(limits.max_image_bytes); send a smaller image",
            param=param,
            code="image_too_large",
        )
    if not raw:
        raise invalid_request("image data is empty", param=param, code="invalid_image")
    try:
        image = open_image(raw, limits.image_formats)
    except PIL.Image.DecompressionBombError as exc:  # PIL's own guard fires at open for huge declared sizes
        raise invalid_request(
            f"image declares more than the limit of {limits.max_image_pixels} pixels (limits.max_image_pixels): "
            f"{exc}",
            param=param,
            code="image_too_large",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - PIL's parsers raise many types on hostile headers; all are the client's
        raise invalid_request(
            f"image data is not a readable image file ({type(exc).__name__}); accepted formats: "
            f"{', '.join(limits.image_formats)}",
            param=param,
            code="invalid_image",
        ) from exc
    _check_geometry(*image.size, limits, param)
    return image


def decode_image(raw: bytes, limits: Limits, param: str) -> np.ndarray:
    """Check and decode an image file once: `(H, W, 3)` uint8 RGB, longer side at most `max_padded_side`.

    Raises:
        APIError: 400 naming `param` and the limit, for anything unreadable or beyond the limits.
    """
    image = _open_image(raw, limits, param)
    try:  # decodes now (dpn_model's one decoder), so a truncated file is a 400 here rather than a failed batch
        return np.asarray(decode_image_file(image, max_side=limits.max_padded_side))
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data; all are the client's
        raise invalid_request(
            f"image file is corrupt or truncated ({type(exc).__name__}: {exc})",
            param=param,
            code="invalid_image",
        ) from exc
    finally:
        image.close()


async def fetch_remote_image(url: str, limits: Limits, param: str) -> bytes:
    """Download an http(s) image with a timeout and a byte cap (only when `allow_remote_images`)."""
    import httpx

    try:
        async with (
            httpx.AsyncClient(timeout=limits.remote_timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise invalid_request(
                    f"fetching the image URL returned HTTP {response.status_code}",
                    param=param,
                    code="image_fetch_failed",
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise invalid_request(
                        f"remote image is larger than the limit of {limits.max_image_bytes} bytes",
                        param=param,
                        code="image_too_large",
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise invalid_request(
            f"could not fetch the image URL ({exc})", param=param, code="image_fetch_failed"
        ) from exc


async def load_image_url(url: str, limits: Limits, param: str) -> np.ndarray:
    """The decoded, checked image (see [`decode_image`]) of an `image_url.url` value, or an [`APIError`] 400."""
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        match = _DATA_URL.match(url)
        if match is None:
            raise invalid_request(
                "malformed data URL: expected 'data:image/<format>;base64,<data>'",
                param=param,
                code="invalid_image_url",
            )
        mime = (match.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise invalid_request(
                f"data URL media type {mime!r} is not an image", param=param, code="invalid_image"
            )
        raw = decode_base64(match.group("data"), param)
    elif scheme in ("http", "https"):
        if not limits.allow_remote_images:
            raise invalid_request(
                "remote image URLs are disabled on this server; send the image inline as "
                "'data:image/png;base64,...' (or enable limits.allow_remote_images)",
                param=param,
                code="remote_images_disabled",
            )
        raw = await fetch_remote_image(url, limits, param)
    elif scheme:
        raise invalid_request(
            f"unsupported image URL scheme {scheme!r}: use a data URL 'data:image/png;base64,...' or raw base64",
            param=param,
            code="unsupported_url_scheme",
        )
    else:
        raw = decode_base64(url, param)
    return await asyncio.to_thread(decode_image, raw, limits, param)  # CPU work: off the event loop


def check_max_tokens(requested: int | None, limits: Limits, param: str = "max_tokens") -> int:
    """The request's `max_tokens` (or the default), or a 400 naming `param` when above the limit."""
    if requested is None:
        return limits.default_max_tokens
    if requested > limits.max_tokens:
        raise invalid_request(
            f"{param}={requested} is more than this server's limit of {limits.max_tokens}",
            param=param,
            code="max_tokens_too_large",
        )
    return requested


def request_max_tokens(max_tokens: int | None, max_completion_tokens: int | None, limits: Limits) -> int:
    """The completion budget of a request from `max_completion_tokens` (newer OpenAI clients) or `max_tokens`
    (the older name), same limit for both; both given and different is a 400 naming both."""
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise invalid_request(
            f"max_tokens={max_tokens} and max_completion_tokens={max_completion_tokens} disagree: "
            "send one of them (max_completion_tokens is the newer name of max_tokens)",
            param="max_completion_tokens",
            code="conflicting_max_tokens",
        )
    if max_completion_tokens is not None:
        return check_max_tokens(max_completion_tokens, limits, "max_completion_tokens")
    return check_max_tokens(max_tokens, limits)


__all__ = [
    "APIError",
    "Limits",
    "check_body_size",
    "check_max_tokens",
    "request_max_tokens",
    "decode_base64",
    "decode_image",
    "load_image_url",
]
