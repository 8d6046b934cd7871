"""The on-disk format shared by the prepare tool and the loader (see docs/data.md).

A prepared dataset is one folder::

    prepare.json                 settings the folder was made with (a resume must use the same ones)
    shard-000000.tar ...         webdataset shards; per sample KEY:
        KEY.txt                  caption, UTF-8
        KEY.json                 {"key", "caption", "origin", "width", "height"} (original input)
        KEY.latent_<R>.npy       float16 (C, R/f, R/f) VAE latent at resolution R, already scaled
        KEY.text_tokens.npy      float16 (L, W) text-encoder tokens after the final LayerNorm
        KEY.text_pooled.npy      float16 (E,) pooled text embedding
    shard-000000.json ...        per-shard record: inputs, samples written, skipped inputs (written last,
                                 so a shard counts as finished only when its record exists)
    manifest.json                totals, skip counts by reason, encoders, resolutions, shard list
    skipped.jsonl                one line per skipped input: {"key", "reason", "detail", "shard"}
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from sedit.files import atomic_write_text

FORMAT = "sedit-shards/1"
TOKENS_FIELD = "text_tokens.npy"
POOLED_FIELD = "text_pooled.npy"
SKIP_REASONS = ("unreadable_image", "too_small", "empty_caption")


def latent_field(resolution: int) -> str:
    """Tar member suffix of the latent at ``resolution`` pixels, e.g. ``latent_256.npy``."""
    return f"latent_{resolution}.npy"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:06d}.json"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder (or of the manifest file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `python -m sedit.data.prepare` to completion first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
