"""Fashion-MNIST as a captioned image set: one caption per class, "a photo of a sneaker".

    python -m sedit.data.fashion_mnist --out data/fmnist [--limit N]

Source: the Debian package ``dataset-fashion-mnist`` (0.0~git20200523.55506a9-1; Zalando Research's
Fashion-MNIST, MIT/Expat license), which installs the original gzipped IDX files in ``DEFAULT_ROOT``:
60,000 training and 10,000 test images, 28 x 28 grayscale, labels 0-9, 6,000 / 1,000 of each class.

IDX format (LeCun's MNIST files): a 4-byte magic ``00 00 <type> <ndim>`` (type 0x08 = unsigned byte),
then ``ndim`` big-endian uint32 sizes, then the values in C order, big-endian.

The command caches each step in ``--out``:
1. ``images/train/``: the training split as ``train-<index>-<label>.png`` (RGB, upscaled to 64 px,
   bicubic) with a same-name ``.txt`` caption; ``fashion_mnist.json`` records what was written;
2. ``encoders/``, ``shards/``: as for the built-in emoji set (``sedit.data.builtin``): a tiny text
   encoder, a tiny VAE trained on the first ``--vae-images`` images, and shards at 32 and 64 px.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian: dataset-fashion-mnist
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
TEMPLATE = "a photo of a {name}"
SIZE = 64  # materialised images: the largest resolution the prepare step crops (it never upsamples)
LICENSE = "MIT (Expat), Zalando SE 2017 (Fashion-MNIST, Debian dataset-fashion-mnist)"

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not); ``ValueError`` naming the file if it is not one."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex() or 'missing'}, expected 0000<type><ndim>)")
    dtype, ndim = np.dtype(IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header cut short ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, but an IDX file of shape {shape} ({dtype}) has {expected}")
    values = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def load_split(split: str, root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of ``split`` ('train' or 'test')."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    image_file, label_file = (Path(root) / name for name in FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; install it with `apt-get install -y dataset-fashion-mnist`")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{image_file}: expected (N, 28, 28) uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),) or labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{label_file}: expected {len(images)} labels in 0..9, got shape {labels.shape}")
    return images, labels.astype(np.int64)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float in [-1, 1], the range the VAE decodes to."""
    return torch.from_numpy(images).float().unsqueeze(1) / 127.5 - 1.0  # (N, 1, 28, 28)


# ----------------------------------------------------------------------------------------------
# Captions and names
# ----------------------------------------------------------------------------------------------


def caption(label: int, template: str = TEMPLATE) -> str:
    """The caption of a class: ``template`` with ``{name}`` = the lower-cased class name."""
    if "{name}" not in template:
        raise ValueError(f"caption template {template!r} has no {{name}} field")
    return template.format(name=CLASSES[label].lower())


def sample_name(split: str, index: int, label: int) -> str:
    """File stem (and shard key) of one image: ``train-00042-7``; the label is its last field."""
    return f"{split}-{index:05d}-{label}"


def label_of(name: str) -> int:
    """The label written into a sample name or key (``train-00042-7`` -> 7)."""
    return int(name.rsplit("-", 1)[1])


# ----------------------------------------------------------------------------------------------
# Materialising a split as a caption folder
# ----------------------------------------------------------------------------------------------


def upscale(image: np.ndarray, size: int = SIZE) -> Image.Image:
    """One 28 x 28 uint8 image as a ``size`` px gray PIL image (bicubic): how the caption folder stores it."""
    return Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)


def materialise(
    out: str | Path,
    split: str = "train",
    limit: int | None = None,
    size: int = SIZE,
    template: str = TEMPLATE,
    root: str | Path = DEFAULT_ROOT,
) -> int:
    """Write the split's first ``limit`` images as ``size`` px RGB PNGs (bicubic upscale of the 28 px
    original) with same-name ``.txt`` captions into ``out``; return how many."""
    images, labels = load_split(split, root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    count = len(images) if limit is None else min(limit, len(images))
    for index in range(count):
        name, label = sample_name(split, index, int(labels[index])), int(labels[index])
        upscale(images[index], size).convert("RGB").save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(caption(label, template) + "\n")
    return count


def build(
    out: str | Path,
    limit: int | None = None,
    template: str = TEMPLATE,
    vae_steps: int = 700,
    vae_images: int = 5000,
    shard_size: int = 1000,
    workers: int = 2,
    root: str | Path = DEFAULT_ROOT,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Materialise the training split (the first ``limit`` images) into ``out/images/train``, then the
    tiny encoders and shards as for the built-in set; return the shards' manifest."""
    from sedit.data.builtin import prepare_with_tiny_encoders, require_same_materialisation

    out = Path(out)
    images, info = out / "images" / "train", out / "fashion_mnist.json"
    about = {"split": "train", "limit": limit, "size": SIZE, "template": template, "classes": list(CLASSES)}
    if info.is_file():
        require_same_materialisation(info, about)
    else:
        count = materialise(images, "train", limit, SIZE, template, root)
        about |= {"samples": count, "license": LICENSE, "source": str(root)}
        info.write_text(json.dumps(about, indent=2) + "\n")
    source = {"kind": "fashion-mnist", "split": "train", "template": template}
    return prepare_with_tiny_encoders(
        images, out, source, vae_steps, vae_images, shard_size=shard_size, workers=workers, progress=progress,
        device=device,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from sedit.data.builtin import builder_arguments

    parser = builder_arguments("python -m sedit.data.fashion_mnist", __doc__, "data/fmnist", shard_size=1000)
    parser.add_argument("--limit", type=int, help="materialise and prepare only the first N training images")
    parser.add_argument("--template", default=TEMPLATE, help="caption template with a {name} field")
    parser.add_argument("--vae-images", type=int, default=5000, help="train the tiny VAE on the first N images")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder of the four gzipped IDX files")
    args = parser.parse_args(argv)
    return build(
        args.out, args.limit, args.template, args.vae_steps, args.vae_images, args.shard_size, args.workers,
        args.root, not args.no_progress, args.device,
    )  # fmt: skip


if __name__ == "__main__":
    main()
