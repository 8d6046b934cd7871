"""Prompt following on Fashion-MNIST: do images generated from "a photo of a sneaker" show sneakers?

    python -m sedit.eval.prompt_following generate --ckpt runs/fmnist-s/fmnist-s-stage4 \\
        --out eval/fmnist/generated.npz --per-class 100 --guidance 1 2 3 5
    python -m sedit.eval.prompt_following score --generated eval/fmnist/generated.npz \\
        --classifier data/fmnist/classifier.safetensors --inception --out eval/fmnist/scores.json

``generate`` samples ``--per-class`` images for each class caption (image i of every setting from
noise seed ``--seed + i``, so settings differ only in what they condition on) for these settings:

| setting | what |
|---|---|
| ``guided_w{w}`` | class captions, classifier-free guidance scale w (w = 1: the conditional denoiser alone) |
| ``unconditional`` | the caption embedding zeroed (all-zero tokens, what caption dropout trains) |
| ``untrained`` | the same architecture at its initial weights (step 0), class captions, ``--control-guidance`` |
| ``real`` | the first ``--per-class`` training images of each class, untouched (needs the dataset) |
| ``vae_roundtrip`` | those images at the stage resolution, through the VAE encoder and decoder: the ceiling |

All are stored at Fashion-MNIST's native form, 28 x 28 gray uint8 (channel mean, antialiased
resize: what the classifier sees), in one ``.npz`` with the intended labels, plus a PNG grid per
setting (10 rows = classes) at the generated resolution.

``score`` reports per setting: the classifier's accuracy against the intended labels (the
prompt-following score; chance 10%), per-class accuracy, the histogram of predicted classes, FID/KID in
the classifier's feature space (a proxy, ``sedit.eval.classifier_fid``) and with ``--inception`` FID/KID
with the 2015 Inception network (``sedit.eval.fid``), each against the real test split (10,000 images).
One more control row, ``shuffled``: the images of the most accurate guided setting scored against a
fixed random permutation of their labels, which must land at chance.

``check`` compares a score file with the pass rule of the CI check: the best guided accuracy beats the
unconditional accuracy by at least ``--margin``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sedit.data import fashion_mnist
from sedit.eval.classifier import predict, to_gray_28
from sedit.eval.classifier_fid import GrayImages, classifier_metrics, reference_cache_name
from sedit.eval.files import write_json
from sedit.eval.weights import EXTRACTOR, require_inception
from sedit.images import save_grid

CHANCE = 1.0 / len(fashion_mnist.CLASSES)
GRID_COLUMNS = 8  # images per class in the grids


def guided_name(scale: float) -> str:
    return f"guided_w{scale:g}"


def intended_labels(per_class: int, num_classes: int = len(fashion_mnist.CLASSES)) -> torch.Tensor:
    """(num_classes * per_class,) labels, class-major: 0, 0, ..., 1, 1, ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def to_native(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, 28, 28) uint8 gray: the classifier's view, Fashion-MNIST's format."""
    gray = to_gray_28(images.float().cpu())[:, 0]  # (N, 28, 28)
    return ((gray.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def class_major_grid(images: torch.Tensor, per_class: int, path: Path) -> Path:
    """The first ``GRID_COLUMNS`` images of each class, one class per row."""
    columns = min(GRID_COLUMNS, per_class)
    rows = images.view(-1, per_class, *images.shape[1:])[:, :columns]  # (classes, columns, C, H, W)
    return save_grid(rows.flatten(0, 1), path, nrow=columns)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_settings(
    precond,
    text,
    vae,
    cfg,
    per_class: int,
    guidance: list[float],
    steps: int,
    seed: int = 0,
    batch_size: int = 500,
    template: str = fashion_mnist.TEMPLATE,
    unconditional: bool = True,
) -> dict[str, torch.Tensor]:
    """Images (N, 3, H, W) in [-1, 1] for every guidance scale (and the unconditional control)."""
    from sedit.sampling import generate_latents

    labels = intended_labels(per_class)
    captions = [fashion_mnist.caption(int(k), template) for k in labels]
    tokens, _ = text.encode(captions)  # (N, L, W)
    side = cfg.stage.resolution // vae.downsample
    runs = [(guided_name(w), tokens, w) for w in guidance]
    if unconditional:
        runs.append(("unconditional", torch.zeros_like(tokens), 1.0))
    out = {}
    for name, conditioning, scale in runs:
        chunks = []
        for b in range(0, len(labels), batch_size):
            latents = generate_latents(
                precond,
                conditioning[b : b + batch_size],
                seeds=[seed + i for i in range(b, min(b + batch_size, len(labels)))],
                latent_shape=[cfg.model.in_channels, side, side],
                steps=steps,
                guidance_scale=scale,
                sigma_min=cfg.diffusion.sigma_min,
                sigma_max=cfg.diffusion.sigma_max,
                rho=cfg.diffusion.rho,
            )  # (B, C, h, w)
            chunks.append(vae.decode(latents).cpu())  # (B, 3, H, W)
        out[name] = torch.cat(chunks)
    return out


def real_images(per_class: int, resolution: int, root: str | Path) -> tuple[np.ndarray, torch.Tensor]:
    """(the first ``per_class`` training images of each class, uint8 (N, 28, 28); the same images at
    ``resolution`` as the builder materialises them (bicubic), (N, 3, R, R) in [-1, 1])."""
    images, labels = fashion_mnist.load_split("train", root)
    picked = np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in range(len(fashion_mnist.CLASSES))])
    native = images[picked]  # (N, 28, 28)
    upscaled = np.stack([np.asarray(fashion_mnist.upscale(im, resolution)) for im in native])  # (N, R, R)
    return native, fashion_mnist.to_pixels(upscaled).expand(-1, 3, -1, -1)  # (N, 3, R, R)


def untrained_model(cfg, device: torch.device):
    """The architecture of ``cfg`` at its initial weights, as the trainer builds it (seed stage.seed)."""
    from sedit.edm import EDMPrecond
    from sedit.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.stage.seed)
        net = build_model(cfg.model)
    return EDMPrecond(net.to(device), cfg.diffusion.sigma_data).eval().requires_grad_(False)


def generate(args: argparse.Namespace) -> Path:
    from sedit.checkpoint import load_consolidated, resolve_export
    from sedit.data.encoders import load_encoders
    from sedit.edm import EDMPrecond
    from sedit.eval.generate import require_local
    from sedit.generate import ENCODER_HINT, encoder_names

    export, weights_file = resolve_export(args.ckpt, args.weights)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, cfg = load_consolidated(export, device, weights_file)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data).eval().requires_grad_(False)
    vae_name, text_name = encoder_names(cfg, args.vae, args.text_encoder)
    vae, text = load_encoders(
        require_local(vae_name, "VAE", ENCODER_HINT, False),
        require_local(text_name, "text encoder", ENCODER_HINT, False),
        cfg.model.caption_dim,
        device,
    )
    steps = args.steps or cfg.diffusion.sample_steps
    control = args.control_guidance if args.control_guidance is not None else cfg.diffusion.guidance_scale
    common = {"per_class": args.per_class, "steps": steps, "seed": args.seed, "batch_size": args.batch_size}

    images = sample_settings(precond, text, vae, cfg, guidance=args.guidance, **common)
    untrained = untrained_model(cfg, device)
    controls = sample_settings(untrained, text, vae, cfg, guidance=[control], unconditional=False, **common)
    images["untrained"] = controls[guided_name(control)]
    stored = {name: to_native(x) for name, x in images.items()}
    if args.root:
        native, upscaled = real_images(args.per_class, cfg.stage.resolution, args.root)
        stored["real"] = native
        seeds = list(range(args.seed, args.seed + len(upscaled)))  # the encoder samples its latent: seeded
        chunks = zip(upscaled.split(args.batch_size), torch.tensor(seeds).split(args.batch_size), strict=True)
        roundtrip = torch.cat([vae.decode(vae.encode(x.to(device), s.tolist())).cpu() for x, s in chunks])
        images["real"], images["vae_roundtrip"] = upscaled, roundtrip
        stored["vae_roundtrip"] = to_native(roundtrip)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, x in images.items():
        class_major_grid(x, args.per_class, out.with_name(f"{out.stem}-{name}.png"))
    about = {
        "checkpoint": str(export),
        "weights": weights_file,
        "stage": cfg.stage.name,
        "resolution": cfg.stage.resolution,
        "sampler": {"steps": steps, "seed": args.seed, "control_guidance": control},
        "per_class": args.per_class,
        "template": fashion_mnist.TEMPLATE,
        "classes": list(fashion_mnist.CLASSES),
        "settings": list(stored),
    }
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, labels=intended_labels(args.per_class).numpy(), about=json.dumps(about), **stored)
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def read_generated(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """(images per setting, intended labels, the generation record) of a ``generate`` file."""
    with np.load(path) as f:
        if "about" not in f or "labels" not in f:
            raise ValueError(f"{path}: not a file written by `sedit.eval.prompt_following generate`")
        about = json.loads(str(f["about"]))
        labels = f["labels"]
        images = {name: f[name] for name in about["settings"]}
    for name, x in images.items():
        if x.shape != (len(labels), 28, 28):
            raise ValueError(f"{path}: setting {name!r} has shape {x.shape}, expected ({len(labels)}, 28, 28)")
    return images, labels, about


def chance_band(n: int, sigmas: float = 3.0) -> tuple[float, float]:
    """Accuracy range a prompt-blind generator stays in (binomial, +- ``sigmas`` standard deviations)."""
    half = sigmas * math.sqrt(CHANCE * (1 - CHANCE) / n)
    return max(0.0, CHANCE - half), min(1.0, CHANCE + half)


def accuracy_row(classifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, per-class accuracy and predicted-class counts of uint8 (N, 28, 28) images."""
    predicted = predict(classifier, fashion_mnist.to_pixels(images)).numpy()
    classes = range(len(fashion_mnist.CLASSES))
    return {
        "accuracy": float((predicted == labels).mean()),
        "per_class": {fashion_mnist.CLASSES[k]: float((predicted[labels == k] == k).mean()) for k in classes},
        "predicted_counts": [int((predicted == k).sum()) for k in classes],
    }


def score(
    generated: str | Path,
    classifier_file: str | Path,
    root: str | Path = fashion_mnist.DEFAULT_ROOT,
    inception_weights: str | Path | None = None,
    inception: bool = False,
    shuffle_seed: int = 0,
    reference_images: int | None = None,
    inception_settings: list[str] | None = None,
) -> dict:
    """The score table of a ``generate`` file (see the module docstring); FID/KID against the first
    ``reference_images`` test images (all 10,000 by default); Inception FID/KID for the settings in
    ``inception_settings`` (all by default) when ``inception`` is set."""
    from sedit.eval.classifier import load_classifier

    classifier = load_classifier(classifier_file)
    images, labels, about = read_generated(generated)
    test_images = fashion_mnist.load_split("test", root)[0][:reference_images]
    inception_names = (inception_settings or list(images)) if inception else []
    unknown = [name for name in inception_names if name not in images]
    if unknown:
        raise ValueError(f"{generated}: no setting {unknown[0]!r} (it has {', '.join(images)})")
    if inception_names:
        inception_weights = require_inception(inception_weights)
        cache_name = reference_cache_name(test_images, inception_weights, EXTRACTOR)  # hashes the weights once
    rows = {name: accuracy_row(classifier, x, labels) for name, x in images.items()}
    guided = [name for name in images if name.startswith("guided_w")]
    if guided:
        best = max(guided, key=lambda name: rows[name]["accuracy"])
        permuted = labels[np.random.default_rng(shuffle_seed).permutation(len(labels))]
        rows["shuffled"] = accuracy_row(classifier, images[best], permuted) | {"images_of": best}
    with tempfile.TemporaryDirectory() as cache:
        for name, x in images.items():
            rows[name]["classifier_space"] = classifier_metrics(x, test_images, classifier_file, cache)
    for name in inception_names:
        rows[name]["inception"] = inception_metrics(images[name], test_images, inception_weights, cache_name)
    return {
        "generated": str(generated),
        "generation": about,
        "classifier": {"file": str(classifier_file), "report": classifier_report(classifier_file)},
        "reference": {"split": "test", "images": len(test_images)},
        "images_per_setting": len(labels),
        "chance": CHANCE,
        "chance_band_3sigma": chance_band(len(labels)),
        "rows": rows,
    }


def inception_metrics(images: np.ndarray, reference: np.ndarray, weights: Path, cache_name: str) -> dict[str, float]:
    """FID and KID with the 2015 Inception network (torch-fidelity), both sides 28 px gray as RGB; the
    reference features are cached (``sedit.eval.fid``'s cache folder) as ``cache_name``."""
    from sedit.eval.fid import compute_metrics

    return compute_metrics(
        GrayImages(images), GrayImages(reference), images.shape[-1], weights, kid=True,
        reference_cache_name=cache_name, device="cpu",
    )  # fmt: skip


def classifier_report(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("report", "{}"))


def passes(scores: dict, margin: float) -> tuple[bool, str]:
    """The CI rule: best guided accuracy >= unconditional accuracy + margin. (verdict, one-line reason)"""
    rows = scores["rows"]
    guided = {name: row["accuracy"] for name, row in rows.items() if name.startswith("guided_w")}
    if not guided or "unconditional" not in rows:
        raise ValueError("the score file needs guided_w* rows and an unconditional row")
    best = max(guided, key=guided.get)
    uncond = rows["unconditional"]["accuracy"]
    verdict = guided[best] >= uncond + margin
    relation = ">=" if verdict else "<"
    return verdict, f"{best} {guided[best]:.3f} {relation} unconditional {uncond:.3f} + margin {margin:.3f}"


def markdown_table(scores: dict) -> str:
    """The score table as markdown (accuracy %, proxy and Inception FID/KID)."""
    lo, hi = scores["chance_band_3sigma"]
    lines = [
        f"{scores['images_per_setting']} images per row; chance 10% (3-sigma band {100 * lo:.1f}-{100 * hi:.1f}%); "
        f"FID/KID against the first {scores['reference']['images']} test images",
        "",
        "| setting | prompt following (classifier accuracy) | proxy FID (classifier) | proxy KID "
        "| Inception FID | Inception KID |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in scores["rows"].items():
        proxy, inc = row.get("classifier_space"), row.get("inception")
        cells = [
            name + (f" (images of {row['images_of']})" if "images_of" in row else ""),
            f"{100 * row['accuracy']:.1f}%",
        ]
        for metrics in (proxy, inc):
            cells += (
                [f"{metrics['fid']:.4g}", f"{metrics['kid_mean']:.3g} ± {metrics['kid_std']:.2g}"]
                if metrics
                else ["-", "-"]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sedit.eval.prompt_following",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="sample the settings into an .npz (GPU if there is one)")
    g.add_argument("--ckpt", required=True, help="export, run or checkpoint directory (as sedit.generate)")
    g.add_argument("--out", required=True, help="the .npz to write (grids go beside it)")
    g.add_argument("--per-class", type=int, default=100, help="images per class and setting")
    g.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], help="guidance scales")
    g.add_argument("--control-guidance", type=float, default=None, help="guidance of the untrained control")
    g.add_argument("--steps", type=int, default=None, help="Heun steps (default: diffusion.sample_steps)")
    g.add_argument("--seed", type=int, default=0, help="image i of every setting uses noise seed SEED + i")
    g.add_argument("--batch-size", type=int, default=500)
    g.add_argument("--root", default=fashion_mnist.DEFAULT_ROOT, help="dataset folder ('' skips real images)")
    g.add_argument("--weights", choices=["ema", "raw"], default=None, help="default: ema when the export has it")
    g.add_argument("--vae", default=None, help="VAE folder (default: the one named by stage.data)")
    g.add_argument("--text-encoder", default=None, help="text encoder folder (default: stage.data's)")
    g.add_argument("--device", default=None)
    s = sub.add_parser("score", help="accuracy, controls, proxy and Inception FID/KID of a generated .npz")
    s.add_argument("--generated", required=True, help=".npz written by generate")
    s.add_argument("--classifier", required=True, help="classifier file (python -m sedit.eval.classifier)")
    s.add_argument("--root", default=fashion_mnist.DEFAULT_ROOT, help="dataset folder (the test split)")
    s.add_argument("--inception", action="store_true", help="also Inception FID/KID (CPU: minutes)")
    s.add_argument("--inception-weights", default=None, help="converted Inception file (sedit.eval.weights)")
    s.add_argument("--inception-settings", nargs="+", default=None, help="Inception only for these (default: all)")
    s.add_argument("--reference-images", type=int, default=None, help="first N test images (default: all)")
    s.add_argument("--out", required=True, help="JSON report; a markdown table is written beside it")
    c = sub.add_parser("check", help="exit 1 unless guided accuracy beats unconditional by --margin")
    c.add_argument("--scores", required=True, help="JSON written by score")
    c.add_argument("--margin", type=float, default=0.2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: one line naming the file, no traceback
        raise SystemExit(f"error: {err}") from None


def run_command(args: argparse.Namespace) -> int:
    if args.command == "generate":
        print(f"wrote {generate(args)}")
        return 0
    if args.command == "score":
        if args.inception:
            require_inception(args.inception_weights)  # fail before any work
        report = score(
            args.generated, args.classifier, args.root, args.inception_weights, args.inception,
            reference_images=args.reference_images, inception_settings=args.inception_settings,
        )  # fmt: skip
        out = write_json(args.out, report)
        table = Path(out).with_suffix(".md")
        table.write_text(markdown_table(report))
        print(table.read_text())
        return 0
    verdict, reason = passes(json.loads(Path(args.scores).read_text()), args.margin)
    print(("pass: " if verdict else "FAIL: ") + reason)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
