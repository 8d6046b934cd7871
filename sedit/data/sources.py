"""Where the prepare tool's inputs come from: a folder, webdataset tars, or a COCO captions file.

Each source lists its inputs once, in a fixed order, as ``InputItem``s (cheap: file names only). The
prepare tool cuts that list into shards and reads an item's bytes only when it encodes it.

- folder: every image (``IMAGE_EXTENSIONS``, any depth) with a same-name ``.txt`` caption beside it;
- tars: local webdataset tars; a sample is its ``jpg/jpeg/png/webp`` image with a ``txt`` caption or a
  ``json`` caption (key ``caption``, else ``text``);
- coco: a COCO captions JSON (``images`` + ``annotations``) and its image folder; one sample per
  caption (``captions='all'``, key ``<image_id>_<annotation_id>``) or per image with its
  lowest-id caption (``captions='first'``, key ``<image_id>``).

Sample keys are made webdataset-safe (letters, digits, ``_`` and ``-``; at most 80 characters) and
unique; the original name is kept in ``origin``.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sedit.data.images import IMAGE_EXTENSIONS, BadInput

MAX_KEY = 80


@dataclass(frozen=True)
class Ref:
    """Bytes on disk: a plain file (``member`` empty) or a member of a tar file."""

    path: str
    member: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclass(frozen=True)
class InputItem:
    """One input: where its image is, and its caption (inline, or in a ``.txt``/``.json`` file)."""

    key: str
    origin: str
    image: Ref | None
    caption: str | None = None
    caption_ref: Ref | None = None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

_local = threading.local()


def read_ref(ref: Ref) -> bytes:
    """The bytes of a file or tar member. Tar files stay open per thread (TarFile is not thread-safe)."""
    if not ref.member:
        return Path(ref.path).read_bytes()
    cache = _local.__dict__.setdefault("tars", {})
    if ref.path not in cache:
        cache[ref.path] = tarfile.open(ref.path)
    member = cache[ref.path].extractfile(ref.member)
    if member is None:
        raise OSError(f"{ref}: not a regular file")
    return member.read()


def read_caption(item: InputItem) -> str:
    """The item's caption, whitespace-collapsed; raises ``BadInput('empty_caption', ...)``."""
    text = item.caption
    if text is None and item.caption_ref is not None:
        try:
            raw = read_ref(item.caption_ref)
        except OSError as err:
            raise BadInput("empty_caption", f"caption unreadable: {err}") from None
        if item.caption_ref.member.endswith(".json") or item.caption_ref.path.endswith(".json"):
            try:
                meta = json.loads(raw)
            except ValueError as err:
                raise BadInput("empty_caption", f"caption JSON unreadable: {err}") from None
            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            text = text if isinstance(text, str) else None
        else:
            text = raw.decode("utf-8", errors="replace")
    text = " ".join((text or "").split())
    if not text:
        why = "no caption" if item.caption is None and item.caption_ref is None else "caption is empty"
        raise BadInput("empty_caption", why)
    return text


def read_image(item: InputItem) -> bytes:
    """The item's encoded image bytes; raises ``BadInput('unreadable_image', ...)``."""
    if item.image is None:
        raise BadInput("unreadable_image", "no image file in this sample")
    try:
        return read_ref(item.image)
    except (OSError, KeyError) as err:
        raise BadInput("unreadable_image", f"{type(err).__name__}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------


def safe_key(name: str) -> str:
    """A webdataset key: no dots or slashes (webdataset splits the key at the first dot), short enough
    for a ustar member name with our longest suffix."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", name) or "_"
    if len(key) > MAX_KEY:
        key = f"{key[: MAX_KEY - 9]}_{zlib.crc32(name.encode()):08x}"
    return key


def unique_keys(items: Iterable[InputItem]) -> list[InputItem]:
    """Make keys unique in list order: a repeated key gets ``_2``, ``_3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        key = item.key
        if key in seen:
            seen[key] += 1
            key = f"{key}_{seen[item.key]}"
            while key in seen:
                key += "_"
        seen.setdefault(key, 1)
        out.append(InputItem(key, item.origin, item.image, item.caption, item.caption_ref))
    return out


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def folder_items(root: str | Path) -> list[InputItem]:
    """Images under ``root`` (sorted by relative path) with their same-name ``.txt`` captions."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name)):
        rel = path.relative_to(root)
        caption = path.with_suffix(".txt")
        items.append(
            InputItem(
                key=safe_key(str(rel.with_suffix(""))),
                origin=str(rel),
                image=Ref(str(path)),
                caption_ref=Ref(str(caption)) if caption.is_file() else None,
            )
        )
    return unique_keys(items)


def expand_patterns(patterns: Iterable[str]) -> list[str]:
    """Glob patterns and webdataset brace ranges (``data-{000..009}.tar``) to a sorted file list."""
    import braceexpand

    files: set[str] = set()
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = glob.glob(expanded)
            if not matches:
                raise FileNotFoundError(f"{expanded}: no such file")
            files.update(matches)
    return sorted(files)


def tar_items(patterns: Iterable[str]) -> tuple[list[InputItem], list[dict]]:
    """Samples of local webdataset tars, plus one skip record per tar that cannot be listed."""
    items, broken = [], []
    for path in expand_patterns(patterns):
        try:
            with tarfile.open(path) as tar:
                names = [m.name for m in tar.getmembers() if m.isreg()]
        except (OSError, tarfile.TarError) as err:
            broken.append({"key": Path(path).name, "reason": "unreadable_image", "detail": f"unreadable tar: {err}"})
            continue
        groups: dict[str, dict[str, str]] = {}
        for name in names:
            base, _, ext = name.rpartition("/")[2].partition(".")
            prefix = name.rpartition("/")[0]
            groups.setdefault(f"{prefix}/{base}" if prefix else base, {})[ext.lower()] = name
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption = members.get("txt") or members.get("json")
            items.append(
                InputItem(
                    key=safe_key(key),
                    origin=f"{path}:{key}",
                    image=Ref(path, image) if image else None,
                    caption_ref=Ref(path, caption) if caption else None,
                )
            )
    return unique_keys(items), broken


def coco_items(captions_json: str | Path, image_dir: str | Path, captions: str = "all") -> list[InputItem]:
    """COCO captions: one item per annotation (``all``) or per image's lowest-id annotation (``first``)."""
    if captions not in ("all", "first"):
        raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
    data = json.loads(Path(captions_json).read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    by_image: dict[int, list[dict]] = {image_id: [] for image_id in files}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    items = []
    for image_id in sorted(by_image):
        anns = sorted(by_image[image_id], key=lambda a: a["id"])
        name = files.get(image_id)
        image = Ref(str(Path(image_dir) / name)) if name else None
        if not anns:  # an image nobody captioned: kept so that it is counted as skipped
            items.append(InputItem(str(image_id), str(name), image, caption=None))
        for ann in anns if captions == "all" else anns[:1]:
            key = f"{image_id}_{ann['id']}" if captions == "all" else str(image_id)
            items.append(InputItem(safe_key(key), f"{name}#{ann['id']}", image, caption=ann.get("caption") or ""))
    return unique_keys(items)
