"""Turning tensors into image files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sedit.files import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG file contents of one (H, W, 3) uint8 array or PIL image."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one PIL image, nrow images per row."""
    pixels = to_uint8(images)
    n, h, w, _ = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = pixels[k]
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_side: int = 64) -> Path:
    """Write a PNG grid atomically (small images enlarged, nearest-neighbour, to at least ``min_side``)."""
    factor = max(1, -(-min_side // images.shape[-1]))
    if factor > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest")
    return atomic_write_bytes(path, png_bytes(make_grid(images, nrow)))
