"""FID (and KID, precision/recall) of generated images against reference images, via torch-fidelity.

    python -m sedit.eval.fid --generated runs/eval/g5 --reference coco/val2014 --reference-set manifest \\
        --resolution 256 --kid --prc

Protocol: every image, generated or reference, is center-cropped to its largest square and resized
to ``--resolution`` with PIL bicubic (antialiased) resampling, then handed to torch-fidelity as uint8;
torch-fidelity resizes it to 299 px (TF1-style bilinear) for the 2015 TensorFlow Inception network
(``inception-v3-compat``, pool3 2048-d features, weights from ``sedit.eval.weights``). KID uses
100 subsets of min(1000, N) images; precision/recall use the same Inception features (k = 3).

``--reference-set manifest`` takes exactly the reference images that the generation manifest names
(COCO protocol: the images of the sampled captions); ``all`` takes every image under ``--reference``.
Reference features and statistics are cached in ``--cache-dir`` under a name made from the file
list, the resize protocol and the SHA-256 of the weights file, so statistics from different weights
or references are never mixed; later runs read the cache instead of the images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sedit.eval.files import list_images, write_json
from sedit.eval.weights import EXTRACTOR, file_digest, require_inception, run_metric_cli

RESIZE_PROTOCOL = "center-crop to square, PIL bicubic resize to R px, uint8; torch-fidelity TF1 bilinear to 299"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEDIT_CACHE", Path.home() / ".cache" / "sedit")) / "fid-stats"


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Largest centered square, then PIL bicubic (antialiased) to resolution x resolution."""
    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s))
    if s != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return image


class ImageFiles(Dataset):
    """uint8 (3, R, R) tensors of image files under the fixed protocol (what torch-fidelity takes)."""

    def __init__(self, files: list[Path], resolution: int):
        self.files = list(files)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            pixels = np.asarray(center_crop_resize(im, self.resolution))  # (R, R, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()  # (3, R, R)


def generated_files(folder: Path, allow_partial: bool = False) -> tuple[list[Path], dict | None]:
    """Images of a generate output folder (all the manifest lists, which must exist), or of any folder."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return list_images(folder), None
    manifest = json.loads(manifest_path.read_text())
    files = [folder / item["file"] for item in manifest["items"]]
    missing = [f for f in files if not f.is_file()]
    if missing and not allow_partial:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} of {len(files)} images are missing (e.g. {missing[0].name}); "
            "finish sedit.eval.generate first or pass --allow-partial"
        )
    return [f for f in files if f.is_file()], manifest


def reference_files(reference: Path, reference_set: str, manifest: dict | None) -> list[Path]:
    if reference_set == "all":
        return list_images(reference)
    if manifest is None:
        raise ValueError("--reference-set manifest needs a generated folder with manifest.json")
    names = [item.get("reference") for item in manifest["items"]]
    if any(n is None for n in names):
        raise ValueError("the manifest names no reference image for some captions (text captions?); use 'all'")
    files = [reference / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{reference}: {len(missing)} reference images missing (e.g. {missing[0]})")
    return files


def reference_cache_name(files: list[Path], root: Path, resolution: int, weights_sha256: str) -> str:
    """Cache entry name from the files (relative path and size), the protocol and the weights."""
    h = hashlib.sha256()
    h.update(f"{RESIZE_PROTOCOL}|{resolution}|{EXTRACTOR}|{weights_sha256}\n".encode())
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}|{f.stat().st_size}\n".encode())
    return f"sedit-ref-{resolution}px-{len(files)}-{h.hexdigest()[:20]}"


def compute_metrics(
    generated: list[Path] | Dataset,
    reference: list[Path] | Dataset,
    resolution: int,
    inception_weights: str | Path | None = None,
    kid: bool = False,
    prc: bool = False,
    reference_cache_name: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """torch-fidelity metrics: fid (always), kid_mean/kid_std, precision/recall/f_score where asked."""
    import torch_fidelity

    weights = require_inception(inception_weights)
    gen = generated if isinstance(generated, Dataset) else ImageFiles(generated, resolution)
    ref = reference if isinstance(reference, Dataset) else ImageFiles(reference, resolution)
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"need at least 2 images on each side, got {len(gen)} generated and {len(ref)} reference")
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    kwargs = {
        "input1": gen,
        "input2": ref,
        "fid": True,
        "kid": kid,
        "prc": prc,
        "feature_extractor": EXTRACTOR,  # also for precision/recall (torch-fidelity's default there is VGG16)
        "feature_extractor_weights_path": str(weights),
        "cuda": cuda,
        "batch_size": batch_size,
        "verbose": False,
    }
    if kid:
        kwargs["kid_subset_size"] = min(1000, len(gen), len(ref))
    if reference_cache_name is not None:
        cache_dir = Path(cache_dir or default_cache_dir())
        cache_dir.mkdir(parents=True, exist_ok=True)
        kwargs |= {"cache": True, "cache_root": str(cache_dir), "input2_cache_name": reference_cache_name}
    else:
        kwargs["cache"] = False
    raw = torch_fidelity.calculate_metrics(**kwargs)
    names = {
        "frechet_inception_distance": "fid",
        "kernel_inception_distance_mean": "kid_mean",
        "kernel_inception_distance_std": "kid_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
    }
    return {names[k]: float(v) for k, v in raw.items() if k in names}


def evaluate_folder(args: argparse.Namespace) -> dict:
    weights = require_inception(args.inception_weights)  # fail before touching any image
    generated = Path(args.generated)
    gen_files, manifest = generated_files(generated, args.allow_partial)
    resolution = args.resolution or (manifest["settings"]["resolution"] if manifest else None)
    if resolution is None:
        raise ValueError("--resolution is needed for a folder without manifest.json")
    ref_root = Path(args.reference)
    ref_files = reference_files(ref_root, args.reference_set, manifest)
    weights_sha = file_digest(weights)
    cache_name = None if args.no_cache else reference_cache_name(ref_files, ref_root, resolution, weights_sha)
    metrics = compute_metrics(
        gen_files,
        ref_files,
        resolution,
        weights,
        kid=args.kid,
        prc=args.prc,
        reference_cache_name=cache_name,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        device=args.device,
    )
    report = {
        "metrics": metrics,
        "num_generated": len(gen_files),
        "num_reference": len(ref_files),
        "resolution": resolution,
        "protocol": RESIZE_PROTOCOL,
        "reference": str(ref_root.resolve()),
        "reference_set": args.reference_set,
        "reference_cache": cache_name,
        "feature_extractor": EXTRACTOR,
        "inception_weights_sha256": weights_sha,
        "generation": manifest["settings"] if manifest else None,
    }
    out = Path(args.out) if args.out else (generated / "fid.json" if manifest else None)
    if out is not None:
        write_json(out, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sedit.eval.fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--generated", required=True, help="output folder of sedit.eval.generate, or any image folder")
    p.add_argument("--reference", required=True, help="folder of reference images (e.g. COCO val2014)")
    p.add_argument("--reference-set", choices=["all", "manifest"], default="all", help="which reference images")
    p.add_argument("--resolution", type=int, default=None, help="crop+resize side (default: the manifest's)")
    p.add_argument("--kid", action="store_true", help="also compute KID")
    p.add_argument("--prc", action="store_true", help="also compute precision/recall (Inception features)")
    p.add_argument("--inception-weights", default=None, help="converted Inception file (see sedit.eval.weights)")
    p.add_argument("--cache-dir", default=None, help="reference statistics cache (default: ~/.cache/sedit/fid-stats)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--allow-partial", action="store_true", help="evaluate an unfinished generate folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON report (default: GENERATED/fid.json for a generate folder)")
    return p


def main(argv: list[str] | None = None) -> None:
    run_metric_cli(evaluate_folder, build_parser(), argv)


if __name__ == "__main__":
    main()
