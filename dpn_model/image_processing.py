"""`DPNImageProcessor`: LLaVA-1.5 image preprocessing (pad to square, CLIP resize/crop, normalise), no torchvision.

Two public steps so a data pipeline can keep images as compact uint8 arrays until the last moment:

1. [`DPNImageProcessor.to_uint8`]: decode, convert to RGB, pad to square, resize, center crop -> `(N, S, S, 3)` uint8.
2. [`DPNImageProcessor.normalize`]: rescale by 1/255 and normalise with mean/std, vectorised -> `(N, 3, S, S)` float.

Calling the processor does both and returns a [`BatchFeature`] with `pixel_values`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import BaseImageProcessor, BatchFeature
from transformers.image_processing_utils import get_size_dict
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
    SizeDict,
)

ImageLike = PIL.Image.Image | np.ndarray | torch.Tensor | bytes | str | os.PathLike


def open_image(data: bytes | str | os.PathLike, formats: Sequence[str] | None = None) -> PIL.Image.Image:
    """Open an encoded image (bytes or a file path) lazily: the header only, no pixels decoded yet.

    Raises:
        `ValueError` for empty data; PIL's errors (`OSError`, `PIL.Image.DecompressionBombError`, ...) for files
        that are not images of `formats` (default: any format PIL reads).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if not data:
            raise ValueError("empty image file")
        return PIL.Image.open(io.BytesIO(bytes(data)), formats=formats)
    return PIL.Image.open(data, formats=formats)


def decode_image(
    data: bytes | str | os.PathLike | PIL.Image.Image,
    formats: Sequence[str] | None = None,
    max_side: int | None = None,
) -> PIL.Image.Image:
    """The one image decoder (data pipeline, serving, pyfunc): decode every pixel, to RGB, or raise.

    Encoded data is first checked with `verify()` (the file's structure), then reopened and fully decoded, which is
    what catches truncated files. An image already opened with [`open_image`] (serving checks its header against
    its limits first) is decoded as it is. With `max_side`, the longer side is scaled down to at most `max_side`
    (aspect kept; JPEG decodes at 1/2, 1/4 or 1/8 scale when it can, as `thumbnail()`).

    Raises:
        `ValueError` for empty data; PIL's errors (`OSError`, `SyntaxError`, ...) for corrupt or truncated files.
    """
    if isinstance(data, PIL.Image.Image):
        image = data
    else:
        with open_image(data, formats) as probe:
            probe.verify()
        image = open_image(data, formats)
    target = image.size if max_side is None else _bounded_size(*image.size, max_side)
    if target != image.size:
        image.draft(None, (2 * target[0], 2 * target[1]))
    image.load()
    rgb = image.convert("RGB")
    if rgb.size != target:
        rgb = rgb.resize(target, PIL.Image.Resampling.BICUBIC, reducing_gap=3.0)
    return rgb


def _bounded_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most `side`, aspect kept, no side below 1."""
    scale = side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _flatten(images: Any):
    """Yield the images of a possibly nested list (the processor passes one list per sample)."""
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _flatten(item)
    else:
        yield images


class DPNImageProcessor(BaseImageProcessor):
    r"""LLaVA-1.5 image processor: `expand2square` padding, then the CLIP transform.

    Exactly LLaVA-1.5's `image_aspect_ratio="pad"` recipe: the image is pasted centred on a square canvas whose
    side is its longest edge, filled with the *processor mean colour* `tuple(int(x * 255) for x in image_mean)`
    (`(122, 116, 104)` for CLIP), which normalises to about zero. Then, as CLIP: resize the shortest edge to
    `size["shortest_edge"]` (bicubic), center crop to `crop_size`, rescale by `rescale_factor` (1/255) and
    normalise with `image_mean` / `image_std`. Conversion to RGB uses PIL's `convert("RGB")` (alpha is dropped,
    as LLaVA does).

    Args:
        do_convert_rgb (`bool`, *optional*, defaults to `True`): Convert images to RGB.
        do_pad (`bool`, *optional*, defaults to `True`): Pad to square with the mean colour before resizing.
        do_resize (`bool`, *optional*, defaults to `True`): Resize to `size`.
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 336}`):
            `{"shortest_edge": s}` (aspect-preserving) or `{"height": h, "width": w}`.
        resample (`PILImageResampling`, *optional*, defaults to `BICUBIC`): Resampling filter.
        do_center_crop (`bool`, *optional*, defaults to `True`): Center crop to `crop_size`.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 336, "width": 336}`): Output size.
        do_rescale (`bool`, *optional*, defaults to `True`): Multiply by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`): Scale of uint8 pixels.
        do_normalize (`bool`, *optional*, defaults to `True`): Subtract `image_mean`, divide by `image_std`.
        image_mean (`list[float]`, *optional*, defaults to CLIP's mean): Per-channel mean.
        image_std (`list[float]`, *optional*, defaults to CLIP's std): Per-channel standard deviation.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 336}
    crop_size = {"height": 336, "width": 336}
    default_to_square = False
    do_convert_rgb = True
    do_pad = True
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    @property
    def backend(self) -> str:
        """`str`: PIL does the geometric work, torch the normalisation; torchvision is never needed."""
        return "pil"

    @property
    def background_color(self) -> tuple[int, int, int]:
        """`tuple[int, int, int]`: LLaVA's padding colour, the processor mean in 0..255 (truncated, as LLaVA)."""
        return tuple(int(x * 255) for x in self.image_mean)

    # ----------------------------------------------------------------------------------------------------------
    # Step 1: decode / RGB / pad / resize / crop -> uint8
    # ----------------------------------------------------------------------------------------------------------
    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Like the base class, and also decodes encoded image `bytes` (PNG/JPEG as stored in Parquet/WebDataset)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if isinstance(image_url_or_urls, (bytes, bytearray, memoryview, os.PathLike)):
            return open_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def _to_pil(self, image: ImageLike) -> PIL.Image.Image:
        image = self.fetch_images(image)
        if isinstance(image, PIL.Image.Image):
            return image
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"Unsupported image type {type(image).__name__}: pass PIL images, numpy arrays, torch tensors, "
                "encoded image bytes, file paths or base64 data URLs"
            )
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # (C, H, W) -> (H, W, C)
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3):
            raise ValueError(f"Expected an image of shape (H, W), (H, W, C) or (C, H, W), got {image.shape}")
        if image.dtype != np.uint8:
            if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
                image = image * 255.0
            image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(image)

    def pad_to_square(self, image: PIL.Image.Image, background_color: tuple[int, int, int] | None = None):
        """Paste `image` centred on a square canvas of its longest side (LLaVA's `expand2square`).

        Args:
            image (`PIL.Image.Image`): The image to pad.
            background_color (`tuple[int, int, int]`, *optional*): Fill colour; defaults to [`background_color`].

        Returns:
            `PIL.Image.Image`: The square image (the input itself when already square).
        """
        width, height = image.size
        if width == height:
            return image
        fill = self.background_color if background_color is None else background_color
        if image.mode != "RGB":
            fill = fill[0] if image.mode in ("L", "I", "F") else fill
        side = max(width, height)
        canvas = PIL.Image.new(image.mode, (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    @staticmethod
    def _output_size(width: int, height: int, size: SizeDict) -> tuple[int, int]:
        """(width, height) after resizing, with CLIP's rule: shortest edge to `s`, the other scaled and floored."""
        if size.shortest_edge:
            short, long = min(width, height), max(width, height)
            new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        if size.height and size.width:
            return size.width, size.height
        raise ValueError(
            f"size must be {{'shortest_edge': s}} or {{'height': h, 'width': w}}, got {dict(size)}"
        )

    def to_uint8(
        self,
        images: ImageLike | Sequence[ImageLike],
        do_convert_rgb: bool | None = None,
        do_pad: bool | None = None,
        do_resize: bool | None = None,
        size: dict[str, int] | SizeDict | None = None,
        resample: PILImageResampling | int | None = None,
        do_center_crop: bool | None = None,
        crop_size: dict[str, int] | SizeDict | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Decode, convert to RGB, pad to square, resize and center crop a batch of images.

        Args:
            images (`ImageLike` or `list[ImageLike]`, nested lists are flattened):
                PIL images, `(H, W[, C])` / `(C, H, W)` arrays or tensors (uint8, or float in [0, 1]), encoded image
                bytes, local paths or base64 data URLs.
            do_convert_rgb, do_pad, do_resize, size, resample, do_center_crop, crop_size:
                Override the processor's settings for this call.

        Returns:
            `np.ndarray`: `(N, H, W, 3)` uint8 (`H = W = crop_size` with the defaults).
        """
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        do_pad = self.do_pad if do_pad is None else do_pad
        do_resize = self.do_resize if do_resize is None else do_resize
        do_center_crop = self.do_center_crop if do_center_crop is None else do_center_crop
        resample = self.resample if resample is None else resample
        size = self._as_size_dict(self.size if size is None else size, "size")
        crop_size = self._as_size_dict(self.crop_size if crop_size is None else crop_size, "crop_size")

        images = list(_flatten(images))
        if not images:
            raise ValueError("to_uint8 got an empty list of images")
        outputs = [
            self._image_to_uint8(
                image, do_convert_rgb, do_pad, do_resize, size, resample, do_center_crop, crop_size
            )
            for image in images
        ]
        return self._stack_same_size(outputs)

    def _image_to_uint8(
        self,
        image: ImageLike,
        do_convert_rgb: bool,
        do_pad: bool,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int,
        do_center_crop: bool,
        crop_size: SizeDict,
    ) -> np.ndarray:
        """One image through the LLaVA-1.5 steps, in their order (pad before resize keeps the whole picture).

        Raises `ValueError` when the result is not `(H, W, 3)`: with `do_convert_rgb=False` a grey or RGBA image
        would otherwise reach the model with the wrong number of channels.
        """
        image = self._to_pil(image)
        if do_convert_rgb:
            image = image.convert("RGB")
        if do_pad:
            image = self.pad_to_square(image)
        if do_resize:
            image = image.resize(self._output_size(*image.size, size), resample=PILImageResampling(resample))
        if do_center_crop:
            left = (image.width - crop_size.width) // 2
            top = (image.height - crop_size.height) // 2
            image = image.crop((left, top, left + crop_size.width, top + crop_size.height))
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"Image has mode {image.mode!r} after preprocessing; keep do_convert_rgb=True to get RGB"
            )
        return array

    @staticmethod
    def _stack_same_size(outputs: list[np.ndarray]) -> np.ndarray:
        """Stack the per-image arrays into one batch, with a clear error (not numpy's) when their sizes differ."""
        shapes = {a.shape for a in outputs}
        if len(shapes) > 1:
            raise ValueError(
                f"Images came out with different sizes {sorted(shapes)}: enable do_pad or do_center_crop, or resize "
                "to a fixed {'height', 'width'}"
            )
        return np.stack(outputs)

    # ----------------------------------------------------------------------------------------------------------
    # Step 2: uint8 -> normalised float tensor
    # ----------------------------------------------------------------------------------------------------------
    def normalize(
        self,
        images: np.ndarray | torch.Tensor,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Rescale and normalise channels-last pixels into the model's `pixel_values`, vectorised.

        Works on any device: pass a uint8 tensor already on the GPU to normalise there.

        Args:
            images (`np.ndarray` or `torch.Tensor` of shape `(N, H, W, 3)` or `(H, W, 3)`):
                Pixels as [`to_uint8`] returns them (uint8, channels last).
            image_mean, image_std, do_rescale, rescale_factor, do_normalize:
                Override the processor's settings for this call.
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): Output dtype.

        Returns:
            `torch.Tensor`: `(N, 3, H, W)` normalised pixels.
        """
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        scale = (self.rescale_factor if rescale_factor is None else rescale_factor) if do_rescale else 1.0
        pixels = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"normalize expects a numpy array or torch tensor, got {type(images).__name__}")
        if pixels.ndim == 3:
            pixels = pixels.unsqueeze(0)
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"normalize expects channels-last pixels (N, H, W, 3) as to_uint8 returns, got shape {tuple(pixels.shape)}"
            )
        pixels = pixels.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W)
        if do_normalize:
            mean = torch.tensor(self.image_mean if image_mean is None else image_mean, device=pixels.device)
            std = torch.tensor(self.image_std if image_std is None else image_std, device=pixels.device)
            pixels = (pixels * scale - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        elif scale != 1.0:
            pixels = pixels * scale
        return pixels.to(dtype).contiguous()

    # ----------------------------------------------------------------------------------------------------------
    # Hugging Face entry point: __call__ -> preprocess -> (kwarg validation) -> here
    # ----------------------------------------------------------------------------------------------------------
    def _preprocess_image_like_inputs(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return_tensors = kwargs.pop("return_tensors", None)
        pixel_values = self.normalize(self.to_uint8(images, **kwargs), **kwargs)
        if return_tensors in (None, "pt"):
            return BatchFeature(data={"pixel_values": pixel_values})
        return BatchFeature(data={"pixel_values": pixel_values.numpy()}, tensor_type=return_tensors)

    @staticmethod
    def _as_size_dict(value: dict[str, int] | SizeDict | int, name: str) -> SizeDict:
        if isinstance(value, SizeDict):
            return value
        return SizeDict(**get_size_dict(value, default_to_square=False, param_name=name))


__all__ = ["DPNImageProcessor", "decode_image", "open_image"]
