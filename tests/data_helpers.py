"""Shared helpers of the data tests: tiny encoders on disk and generated image folders."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the data tests must never reach a model hub


def tiny_encoders(base: Path) -> tuple[str, str]:
    """(vae_dir, text_dir) of randomly initialised tiny encoders, written once under ``base``."""
    from sedit.data.encoders import save_tiny_text_encoder, save_tiny_vae

    vae, text = base / "tiny_vae", base / "tiny_text"
    if not (vae / "config.json").is_file():
        save_tiny_vae(vae)
    if not (text / "open_clip_config.json").is_file():
        save_tiny_text_encoder(text)
    return str(vae), str(text)


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[str]:
    """n distinct random RGB images (sizes between 64 and 90 px, not square) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = []
    for i in range(n):
        key = f"{prefix}{i:03d}"
        h, w = rng.integers(64, 91, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{key}.png")
        (folder / f"{key}.txt").write_text(f"a picture number {i}\n")
        keys.append(key)
    return keys


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """A shard's members grouped by sample key, read with the standard library's tarfile."""
    import tarfile

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, field = member.name.partition(".")
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples
