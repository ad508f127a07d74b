"""What the data readers may open and how much of it they may hold (:class:`ReadPolicy`).

Its own module, light to import (pydantic only; PIL when image formats are checked), because every job's config
embeds it: loading a config must not import Ray, pyarrow or the model. The readers that apply it are in
:mod:`pipelines.formats`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from dpn_base.config_models import ConfigModel

MIB = 1 << 20
DEFAULT_IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
TarCompression = Literal["gzip", "bzip2", "xz"]


class ReadPolicy(ConfigModel):
    """What the readers may open and how much of it they may hold: the data side of the threat model.

    Training data is not trusted to name files or to be small: an image ref is read only inside its image root
    (or a root or scheme listed here), a shard only in the formats listed here, every member, sample and image
    only within a cap, so that one hostile record costs one counted bad sample, never a read of the cluster's
    other data (with its credentials) nor a worker's memory. A job's data section is one of these (its keys sit
    next to ``image_folder``); the readers take it as ``policy=`` (default: these defaults).

    Attributes:
        allowed_image_roots: extra roots an image ref may name absolutely: absolute local paths (``/mnt/coco``) or
            URIs (``s3://bucket/images``); a ref must use the root's own form (a plain path is not ``file://``).
        allowed_image_schemes: URI schemes a ref may use anywhere (``[s3]``: any ``s3://`` URI, read with the
            job's credentials). Default none.
        tar_compression: compressions accepted for tar shards; default none (a compressed shard is one
            ``unsupported_format`` sample, nothing of it inflated). Caps apply to the inflated members.
        max_member_bytes: largest tar member read (image or ``.json``), and largest image file of a LLaVA JSON
            row; larger: ``oversized_member``, skipped without being read into memory.
        max_sample_bytes: largest sample (the members read, together); larger: ``oversized_member``.
        image_formats: image formats decoded for training and evaluation (PIL names, e.g. ``PNG``, ``JPEG``,
            ``WEBP``, ``GIF``); another format: ``unsupported_format``.
        max_image_pixels: largest image (width x height), read from its header before any pixel is decoded;
            larger, or past PIL's own decompression-bomb guard: ``oversized_member``.
    """

    allowed_image_roots: list[str] = Field(default_factory=list)
    allowed_image_schemes: list[str] = Field(default_factory=list)
    tar_compression: list[TarCompression] = Field(default_factory=list)
    max_member_bytes: int = Field(64 * MIB, ge=1)
    max_sample_bytes: int = Field(128 * MIB, ge=1)
    image_formats: list[str] = Field(default_factory=lambda: list(DEFAULT_IMAGE_FORMATS), min_length=1)
    max_image_pixels: int = Field(8192 * 8192, ge=1)

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, formats: list[str]) -> list[str]:
        import PIL.Image

        known = set(PIL.Image.registered_extensions().values())
        upper = [f.upper() for f in formats]
        unknown = [f for f in upper if f not in known]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not an image format PIL reads; it reads {', '.join(sorted(known))}"
            )
        return upper

    @field_validator("allowed_image_schemes")
    @classmethod
    def _bare_schemes(cls, schemes: list[str]) -> list[str]:
        for scheme in schemes:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
                raise ValueError(f"{scheme!r} is not a URI scheme: write it bare, e.g. s3 (not s3://)")
        return [s.lower() for s in schemes]

    @field_validator("allowed_image_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[str]) -> list[str]:
        for root in roots:
            if not (root.startswith("/") or "://" in root) or "\\" in root or "\x00" in root:
                raise ValueError(
                    f"{root!r} is not an absolute path or a URI: name roots in full (/mnt/images, s3://bucket/images)"
                )
        return roots

    def read_policy(self) -> ReadPolicy:
        """This policy alone (a job's data section is a subclass with more keys): what the readers are given."""
        return ReadPolicy(**{name: getattr(self, name) for name in ReadPolicy.model_fields})
