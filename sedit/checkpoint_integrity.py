"""Is a checkpoint complete? A manifest of every file's size and SHA-256, written before it is published.

A checkpoint directory ``step_NNNNNNN/`` gets the name only after every rank has written into
``step_NNNNNNN.tmp/`` and ``MANIFEST`` lists each file with its size and hash; so a directory with a
final name and a matching manifest is whole. ``newest_intact`` checks candidates newest first and
returns the first intact one, with a warning for each one passed over (a disk that filled up, a file
truncated or overwritten afterwards). Hashing is shared out: rank r hashes files r, r + W, ...
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from sedit.distributed import gather_objects
from sedit.files import atomic_write_text

MANIFEST = "sedit_checkpoint.json"
TAG = re.compile(r"^step_(\d{7,})$")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rank_and_world() -> tuple[int, int]:
    """This process's place in the process group (0 of 1 without one), as the collectives here see it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, info: dict) -> None:
    """Hash every file under ``directory`` (shared over ranks) and write ``MANIFEST`` (collective)."""
    rank, world = rank_and_world()
    names = _files(directory)  # every rank sees the same listing once all have written
    mine = {n: {"bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)} for n in names[rank::world]}
    files = {k: v for part in gather_objects(mine) for k, v in part.items()}
    if rank == 0:
        atomic_write_text(directory / MANIFEST, json.dumps({**info, "files": dict(sorted(files.items()))}, indent=1))


def checkpoint_info(directory: Path) -> dict:
    """What was recorded with an intact checkpoint (step, layout, ...), without the file list."""
    manifest = json.loads((directory / MANIFEST).read_text())
    return {k: v for k, v in manifest.items() if k != "files"}


def problem(directory: Path) -> str | None:
    """Why ``directory`` is not an intact checkpoint, or None (collective)."""
    rank, world = rank_and_world()
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{manifest_path}: unreadable manifest ({err})"
    found = []
    for name in sorted(files)[rank::world]:
        path, want = directory / name, files[name]
        if not path.is_file():
            found.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            found.append(f"{path}: {path.stat().st_size} bytes, expected {want['bytes']} (truncated?)")
        elif _sha256(path) != want["sha256"]:
            found.append(f"{path}: contents differ from the manifest's SHA-256")
    problems = [p for part in gather_objects(found) for p in part]
    return "; ".join(problems) or None


def candidates(directory: Path) -> list[Path]:
    """Published checkpoint directories, newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_intact(directory: Path, warn) -> Path | None:
    """The newest intact checkpoint under ``directory`` (collective); ``warn(msg)`` for each one skipped."""
    found = candidates(directory)
    for i, path in enumerate(found):
        why = problem(path)
        if why is None:
            return path
        fallback = found[i + 1].name if i + 1 < len(found) else "none left"
        warn(f"checkpoint {path} is not intact and is skipped ({why}); trying the previous one: {fallback}")
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest published checkpoints, and leftovers of interrupted saves."""
    for path in candidates(directory)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
    for path in directory.glob("*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
