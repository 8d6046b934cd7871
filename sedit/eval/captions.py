"""Caption files: COCO caption annotations (JSON) or plain text, one caption per line.

COCO protocol (``captions_val2014.json``): ``num`` distinct images are drawn uniformly without
replacement from all images of the file (sorted by image id) with ``numpy.random.default_rng(seed)``,
and one of each image's captions is drawn with the same generator. Every prompt keeps its image's
file name, so FID can compare against exactly those images. A text file gives its non-empty lines in
order (the first ``num`` of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Prompt:
    caption: str
    reference: str | None = None  # the image this caption describes (COCO file name), if known


def read_captions(path: str | Path, num: int | None = None, seed: int = 0) -> list[Prompt]:
    """Prompts from a COCO caption JSON or a text file; ``num`` None takes all."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _coco_prompts(json.loads(path.read_text()), num, seed, path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [Prompt(line) for line in lines if line]
    if num is not None:
        if num > len(prompts):
            raise ValueError(f"{path}: asked for {num} captions, the file has {len(prompts)}")
        prompts = prompts[:num]
    return prompts


def _coco_prompts(data: dict, num: int | None, seed: int, path: Path) -> list[Prompt]:
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path}: not a COCO caption file (needs 'images' and 'annotations')")
    files = {img["id"]: img["file_name"] for img in data["images"]}
    by_image: dict[int, list[str]] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(ann["image_id"], []).append(" ".join(ann["caption"].split()))
    image_ids = sorted(i for i in by_image if i in files)
    num = len(image_ids) if num is None else num
    if num > len(image_ids):
        raise ValueError(f"{path}: asked for {num} captions of distinct images, the file has {len(image_ids)} images")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(image_ids), size=num, replace=False)
    prompts = []
    for k in chosen:
        image_id = image_ids[int(k)]
        captions = by_image[image_id]
        prompts.append(Prompt(captions[int(rng.integers(len(captions)))], files[image_id]))
    return prompts
