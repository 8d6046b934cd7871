"""Small file and process helpers shared by the evaluation tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sedit.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by relative path; hidden files skipped."""
    folder = Path(folder)
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def dist_env() -> tuple[int, int]:
    """(rank, world size) from RANK/WORLD_SIZE (torchrun, deepspeed) or SLURM_PROCID/SLURM_NTASKS; (0, 1) alone."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    rank, world = int(rank), int(world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return rank, world


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
