"""Input limits and image validation for the serving API.

Everything a client sends is checked here before it reaches a model replica: the body size, the prompt's text
bytes and the request's token budget (`n` choices x (prompt + `max_tokens`)), image URLs (data URLs or raw base64;
remote http(s) only when enabled, and then only from public addresses), base64 validity, the image's format, byte
size, pixel count and geometry, the number of images, and `max_tokens`. Each failure is an [`APIError`] (400, or 413
for the body) that says what was wrong, which field and which limit. The exact prompt token limit is checked on the
model replica, which owns the tokenizer; the ingress bounds the prompt by its bytes first, so an oversized prompt is
never forwarded (and tokenized) `n` times.

Images are decoded here, once, and handed on as RGB arrays: the geometry is checked from the header before any
pixel is decoded, and an image whose longer side exceeds `max_padded_side` is shrunk before the processor pads it
to a square, so the work and memory of one image are bounded by the limits, whatever the file declares.

Remote images (`allow_remote_images`) are fetched as a server-side request forgery guard requires: every hop's host
is resolved once and refused unless each of its addresses is public (not loopback, private, link-local, multicast,
reserved, unspecified, shared or a cloud metadata address; IPv4-mapped and 6to4 IPv6 forms are judged by the IPv4
address inside), the connection goes to the address that was checked (the URL is rewritten to that IP; the `Host`
header and TLS SNI / certificate check keep the original name, so a DNS answer that changes between the check and
the connect cannot redirect it), redirects are followed by hand (at most `remote_max_redirects`, each hop checked
again), proxies from the environment are not used, the whole fetch has one deadline (`remote_timeout_s`) and the
body a byte cap (`max_image_bytes`). Errors name no address or internal host; the server log has the details.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
from pydantic import Field, field_validator, model_validator

from dpn_base.config_models import ConfigModel, validate_config
from dpn_model.image_processing import decode_image, open_image
from serve_apps.protocol import APIError, invalid_request

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S
)
_B64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN_BOUND = 64
"""Most UTF-8 bytes of text one token stands for, with a wide margin: the longest pieces of LLaMA-family
vocabularies (Vicuna's included) are runs of spaces and words well under 64 bytes (the tiny preset's longest is 12
bytes). So `BYTES_PER_TOKEN_BOUND * max_prompt_tokens` bytes hold any prompt within `max_prompt_tokens`."""

REQUEST_BUDGET_CHOICES = 4
"""The default `max_request_tokens` is this many full-size choices: `4 * (max_prompt_tokens + max_tokens)`."""

TEMPLATE_BYTES = 256
"""Text the chat template adds once around the messages (vicuna-v1's default system prompt is 156 bytes)."""

TURN_BYTES = 32
"""Text the chat template adds per message (`USER: `, ` <router>`, ` ASSISTANT: `, `</s>`, an image's newline)."""


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
        max_prompt_tokens: Longest prompt in tokens, counting `image_seq_length` tokens per image (checked on the
            replica, which tokenizes).
        max_prompt_bytes: Most UTF-8 bytes of text in all the messages of a request, checked at the ingress before
            anything is forwarded (400 `prompt_too_large`). Default (None): `BYTES_PER_TOKEN_BOUND` (64) x
            `max_prompt_tokens`, so that every prompt within `max_prompt_tokens` fits (no token stands for more
            than 64 bytes of text) while a prompt of megabytes is refused without being tokenized.
        max_request_tokens: Token budget of one request: `n x (prompt + max_tokens)`, the prompt counted by an
            upper bound known at the ingress (its text bytes plus the chat template's, since every token covers at
            least one byte, plus the model's visual tokens per image, at most `max_prompt_tokens`); beyond it a
            400 `request_token_budget_exceeded`. Default (None): `REQUEST_BUDGET_CHOICES` (4) x
            (`max_prompt_tokens` + `max_tokens`). Must be at least `max_prompt_tokens + max_tokens`, so a request
            of one choice within the other limits is never refused by it: it bounds the multiplication by `n`.
        max_tokens: Largest `max_tokens` a request may ask for.
        default_max_tokens: `max_tokens` when the request gives none.
        allow_remote_images: Fetch `http(s)://` image URLs (off by default: the server makes no outbound calls).
            Only public addresses are fetched (see the module docstring).
        remote_timeout_s: Deadline of a whole remote image fetch (name resolution, every redirect, the body), not
            of each read: a server that sends one byte at a time cannot hold the request longer.
        remote_max_redirects: Redirects followed by hand when fetching a remote image, each hop checked as the
            first; 0 follows none.
        remote_image_allowed_networks: Networks (CIDR, e.g. `10.1.2.0/24`, or single addresses) fetched even though
            they are not public: an internal image store. Empty (default): public addresses only. Cloud metadata
            addresses (169.254.169.254, fd00:ec2::254, ...) are refused even when listed.
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
    max_prompt_bytes: int | None = Field(None, ge=1)
    max_request_tokens: int | None = Field(None, ge=1)
    max_tokens: int = Field(512, ge=1)
    default_max_tokens: int = Field(64, ge=1)
    allow_remote_images: bool = False
    remote_timeout_s: float = Field(10.0, gt=0)
    remote_max_redirects: int = Field(3, ge=0, le=10)
    remote_image_allowed_networks: tuple[str, ...] = ()
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

    @field_validator("image_formats", mode="before")
    @classmethod
    def _upper_case(cls, formats: Any) -> Any:
        if isinstance(formats, (list, tuple)):
            return tuple(str(f).upper() for f in formats)
        return formats

    @field_validator("remote_image_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, networks: Any) -> Any:
        if not isinstance(networks, (list, tuple)):
            return networks
        out = []
        for network in networks:
            try:
                out.append(str(ipaddress.ip_network(str(network).strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"{network!r} is not an IP network: give CIDRs such as '10.1.2.0/24' or addresses"
                ) from None
        return tuple(out)

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if self.max_prompt_bytes is None:
            self.max_prompt_bytes = BYTES_PER_TOKEN_BOUND * self.max_prompt_tokens
        one_request = self.max_prompt_tokens + self.max_tokens
        if self.max_request_tokens is None:
            self.max_request_tokens = REQUEST_BUDGET_CHOICES * one_request
        elif self.max_request_tokens < one_request:
            raise ValueError(
                f"max_request_tokens ({self.max_request_tokens}) is less than max_prompt_tokens + max_tokens "
                f"({one_request}): a request of one choice within the limits would be refused; raise it"
            )
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
        ignored); a `dpn_base.config_models.ConfigError` (a `ValueError`) names each wrong key."""
        return validate_config(cls, values or {}, section="limits")

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.model_dump(),
            "image_formats": list(self.image_formats),
            "remote_image_allowed_networks": list(self.remote_image_allowed_networks),
        }


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


def check_prompt_bytes(size: int, limits: Limits) -> None:
    """A 400 when the messages' text (`size` UTF-8 bytes) exceeds `max_prompt_bytes`, before anything is forwarded."""
    if size > limits.max_prompt_bytes:
        raise invalid_request(
            f"the messages hold {size} bytes of text, more than this server's limit of {limits.max_prompt_bytes} "
            "bytes (limits.max_prompt_bytes); shorten the prompt",
            param="messages",
            code="prompt_too_large",
        )


def prompt_token_bound(
    text_bytes: int, messages: int, images: int, visual_tokens: int | None, limits: Limits
) -> int:
    """An upper bound of a prompt's tokens, known before tokenizing: its text bytes and the chat template's (no
    token covers less than one byte), `visual_tokens` per image (0 when not known), at most `max_prompt_tokens`
    (a longer prompt is refused on the replica before anything is generated)."""
    bound = text_bytes + TEMPLATE_BYTES + TURN_BYTES * messages + images * (visual_tokens or 0)
    return min(bound, limits.max_prompt_tokens)


def check_request_tokens(n: int, prompt_tokens: int, max_tokens: int, limits: Limits) -> None:
    """A 400 naming `n` when `n x (prompt_tokens + max_tokens)` exceeds `max_request_tokens`."""
    total = n * (prompt_tokens + max_tokens)
    if total > limits.max_request_tokens:
        raise invalid_request(
            f"n={n} choice(s) x (a prompt of up to {prompt_tokens} tokens + max_tokens={max_tokens}) = {total} "
            f"tokens, more than this server's budget of {limits.max_request_tokens} tokens per request "
            "(limits.max_request_tokens); lower n or max_tokens, or shorten the prompt",
            param="n",
            code="request_token_budget_exceeded",
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


def decode_request_image(raw: bytes, limits: Limits, param: str) -> np.ndarray:
    """Check a request's image file against `limits`, then decode it once with dpn_model's decoder:
    `(H, W, 3)` uint8 RGB, longer side at most `max_padded_side`. Unlike that decoder, every failure is the
    client's 400.

    Raises:
        APIError: 400 naming `param` and the limit, for anything unreadable or beyond the limits.
    """
    image = _open_image(raw, limits, param)
    try:  # decodes now (dpn_model's one decoder), so a truncated file is a 400 here rather than a failed batch
        return np.asarray(decode_image(image, max_side=limits.max_padded_side))
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data; all are the client's
        raise invalid_request(
            f"image file is corrupt or truncated ({type(exc).__name__}: {exc})",
            param=param,
            code="invalid_image",
        ) from exc
    finally:
        image.close()


_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ... instance metadata
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(network)
    for network in (
        # IANA's special-purpose address registries, not globally reachable: refused whatever the Python
        # version's `is_global` says of them (3.11 calls 192.0.0.8 global, for one)
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
        "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::/48`) address leads to, if any."""
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour


def address_refusal(address: str | IPAddress, allowed_networks: tuple[str, ...] = ()) -> str | None:
    """Why a remote image must not be fetched from `address`, or None when it may be.

    Refused: cloud metadata addresses (always), then, unless inside one of `allowed_networks`, unspecified,
    loopback, link-local, multicast, private, reserved and any other address that is not globally routable. An
    IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is judged as its IPv4 address; a NAT64 or 6to4 one is refused
    when the IPv4 address inside it would be.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return address_refusal(ip.ipv4_mapped, allowed_networks)
        inner = _embedded_ipv4(ip)
        if inner is not None and (reason := address_refusal(inner)) is not None:
            return f"{reason} inside an IPv6 address"
    if ip in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if any(ip in ipaddress.ip_network(network) for network in allowed_networks):
        return None
    kinds = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    )
    for kind, matches in kinds:
        if matches:
            return f"a {kind} address"
    if not ip.is_global or any(ip in network for network in _NOT_PUBLIC):
        return "an address that is not globally routable"
    return None


@dataclass(frozen=True)
class _Hop:
    """One checked request of a remote image fetch: the URL with its host replaced by the address that was
    checked (the connection cannot go elsewhere), and the original name for the `Host` header and TLS."""

    url: Any  # httpx.URL
    host_header: str
    extensions: dict[str, Any]


def _not_public(param: str) -> APIError:
    return invalid_request(
        "the image URL's host does not resolve to a public address; this server fetches images from public "
        "addresses only: send the image inline as 'data:image/png;base64,...'",
        param=param,
        code="image_url_not_allowed",
    )


async def _resolve(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def _checked_hop(url: str, limits: Limits, param: str) -> _Hop:
    """Resolve `url`'s host once, refuse it unless every address is allowed (`address_refusal`), pin the first."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise invalid_request(
            "the image URL (or a redirect) is malformed", param=param, code="invalid_image_url"
        ) from None
    if parsed.scheme not in ("http", "https"):
        raise invalid_request(
            f"the image URL redirects to the scheme {parsed.scheme!r}; only http and https are fetched",
            param=param,
            code="unsupported_url_scheme",
        )
    host = parsed.raw_host.decode("ascii")
    try:
        addresses = await _resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except (OSError, UnicodeError, ValueError) as exc:  # socket.gaierror is an OSError
        logger.info("remote image refused: host %r does not resolve (%s)", host, exc)
        raise _not_public(param) from None
    refused = {
        str(a): r for a in addresses if (r := address_refusal(a, limits.remote_image_allowed_networks))
    }
    if refused or not addresses:
        logger.warning("remote image refused: host %r resolves to %s", host, refused or "nothing")
        raise _not_public(param)
    extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
    return _Hop(parsed.copy_with(host=str(addresses[0])), parsed.netloc.decode("ascii"), extensions)


async def _read_capped(response: Any, limits: Limits, param: str) -> bytes:
    """The body of a 200 answer, refused past `max_image_bytes` (declared or while it streams in)."""
    if response.status_code != 200:
        raise invalid_request(
            f"fetching the image URL returned HTTP {response.status_code}",
            param=param,
            code="image_fetch_failed",
        )
    too_large = invalid_request(
        f"remote image is larger than the limit of {limits.max_image_bytes} bytes (limits.max_image_bytes)",
        param=param,
        code="image_too_large",
    )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limits.max_image_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch(url: str, limits: Limits, param: str) -> bytes:
    """Follow at most `remote_max_redirects` redirects by hand, checking every hop's host before connecting."""
    import httpx

    async with httpx.AsyncClient(timeout=limits.remote_timeout_s, trust_env=False) as client:
        for _ in range(limits.remote_max_redirects + 1):
            hop = await _checked_hop(url, limits, param)
            request = client.build_request(
                "GET", hop.url, headers={"Host": hop.host_header}, extensions=hop.extensions
            )
            response = await client.send(request, stream=True, follow_redirects=False)
            try:
                if not response.is_redirect:
                    return await _read_capped(response, limits, param)
                try:
                    url = str(httpx.URL(url).join(response.headers["location"]))
                except httpx.InvalidURL:
                    raise invalid_request(
                        "the image URL redirects to a malformed URL", param=param, code="image_fetch_failed"
                    ) from None
            finally:
                await response.aclose()
    raise invalid_request(
        f"the image URL redirects more than {limits.remote_max_redirects} times (limits.remote_max_redirects)",
        param=param,
        code="image_fetch_failed",
    )


def _fetch_failure(exc: Exception) -> str:
    """What went wrong in a fetch, in words that name no host or address (httpx's messages may)."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "could not connect to its host"
    if isinstance(exc, httpx.DecodingError):
        return "its body could not be decoded"
    if isinstance(exc, httpx.ProtocolError):
        return "its server's answer is not valid HTTP"
    return "the transfer failed"


async def fetch_remote_image(url: str, limits: Limits, param: str) -> bytes:
    """Download an http(s) image (only when `allow_remote_images`) from public addresses only, within one deadline
    (`remote_timeout_s`) and a byte cap (`max_image_bytes`); see the module docstring.

    Raises:
        APIError: 400 naming `param`: a host that is not public, too many redirects, a timeout, a failed
            transfer, a status other than 200, or a body over the cap.
    """
    import httpx

    try:  # one deadline for the whole fetch
        return await asyncio.wait_for(_fetch(url, limits, param), limits.remote_timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise invalid_request(
            f"fetching the image URL took longer than {limits.remote_timeout_s:g} s (limits.remote_timeout_s); "
            "send the image inline as 'data:image/png;base64,...'",
            param=param,
            code="image_fetch_timeout",
        ) from None
    except httpx.HTTPError as exc:
        logger.info("remote image fetch failed: %r", exc)
        raise invalid_request(
            f"could not fetch the image URL ({_fetch_failure(exc)})", param=param, code="image_fetch_failed"
        ) from None


async def load_image_url(url: str, limits: Limits, param: str) -> np.ndarray:
    """The decoded, checked image ([`decode_request_image`]) of an `image_url.url` value, or an [`APIError`]
    400."""
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
    return await asyncio.to_thread(decode_request_image, raw, limits, param)  # CPU work: off the event loop


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
    "address_refusal",
    "check_body_size",
    "check_max_tokens",
    "check_prompt_bytes",
    "check_request_tokens",
    "fetch_remote_image",
    "prompt_token_bound",
    "request_max_tokens",
    "decode_base64",
    "decode_request_image",
    "load_image_url",
]
