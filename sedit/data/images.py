"""Decoding, resizing and center-cropping input images for the prepare tool.

Every image becomes RGB (transparent pixels composited on white, EXIF rotation applied), is resized so
its short side equals the target resolution (bicubic, which in PIL filters over the whole source
footprint and so also anti-aliases when shrinking), then center-cropped to a square. Images whose short
side is below the largest requested resolution are refused (never upsampled).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class BadInput(Exception):
    """An input that the prepare tool skips: ``reason`` is a manifest counter, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image; raises ``BadInput('unreadable_image', ...)``."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return image.convert("RGB")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        message = re.sub(r" ?<[^>]* at 0x[0-9a-f]+>", "", str(err))  # drop object addresses
        raise BadInput("unreadable_image", f"{type(err).__name__}: {message}") from None


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Short side to ``resolution`` (bicubic), then the central ``resolution`` x ``resolution`` square."""
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def square_crops(data: bytes, resolutions: Sequence[int]) -> tuple[dict[int, np.ndarray], tuple[int, int]]:
    """Decode once and crop at every resolution: ({res: (res, res, 3) uint8}, original (width, height)).

    Raises ``BadInput`` for undecodable images and for images smaller than the largest resolution.
    """
    image = open_rgb(data)
    w, h = image.size
    if min(w, h) < max(resolutions):
        raise BadInput("too_small", f"{w}x{h} is below {max(resolutions)}px on the short side")
    return {res: np.asarray(resize_center_crop(image, res)) for res in resolutions}, (w, h)


def to_tensor(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack (H, W, 3) uint8 arrays into a float tensor in [-1, 1]: (N, 3, H, W)."""
    x = torch.from_numpy(np.stack(pixels))  # (N, H, W, 3)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
