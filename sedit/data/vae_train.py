"""Train the built-in set's tiny AutoencoderKL, so the embedded default decodes to real pictures.

    python -m sedit.data.vae_train --images data/emoji/images --out data/emoji/encoders/vae

A randomly initialised ``tiny_vae_model((16, 16, 32))`` (4 latent channels, downsampling 4, 0.18M
parameters) learns to reconstruct the images at 32 px: ``steps`` AdamW steps (cosine learning rate)
on random batches, loss = MSE(decode(z), x) + ``kl_weight`` * KL, z sampled from the posterior. 700
steps take about 1.5 minutes on two CPU cores. Being convolutional it also encodes the 64 px crops.
Afterwards ``scaling_factor`` is set to 1 / std of sampled latents over the whole set (unit-variance
latents, as diffusers' VAEs intend) and the model is saved with ``save_pretrained``, next to
``train_report.json`` (steps, seconds, loss, reconstruction PSNR per resolution on the first 64
images) and ``reconstruction.png`` (16 inputs above their reconstructions).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from sedit.data.encoders import tiny_vae_model
from sedit.data.images import BadInput, square_crops, to_tensor
from sedit.data.sources import folder_items, read_image
from sedit.images import save_grid

TINY_VAE_CHANNELS = (16, 16, 32)


def load_pixels(image_dir: str | Path, resolution: int, limit: int | None = None) -> torch.Tensor:
    """The images of a folder (the first ``limit``), cropped to ``resolution``: (N, 3, R, R) in [-1, 1]."""
    crops = []
    for item in folder_items(image_dir)[:limit]:
        try:
            crops.append(square_crops(read_image(item), [resolution])[0][resolution])
        except BadInput:
            continue  # the prepare tool reports bad inputs; training just leaves them out
    if not crops:
        raise ValueError(f"{image_dir}: no usable images")
    return to_tensor(crops)


@torch.no_grad()
def psnr(model: AutoencoderKL, x: torch.Tensor, generator: torch.Generator) -> float:
    """Reconstruction PSNR in dB (peak-to-peak 2 for pixels in [-1, 1]), latents sampled."""
    rec = model.decode(model.encode(x).latent_dist.sample(generator)).sample.clamp(-1, 1)
    return float(10 * torch.log10(4 / ((rec - x) ** 2).mean()))


def train_tiny_vae(
    image_dir: str | Path,
    out: str | Path,
    steps: int = 700,
    resolution: int = 32,
    eval_resolutions: tuple[int, ...] = (32, 64),
    batch_size: int = 32,
    lr: float = 3e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Train on the folder's first ``limit`` images (all by default), calibrate ``scaling_factor`` on
    them, save to ``out``; return the report."""
    start = time.time()
    pixels = load_pixels(image_dir, resolution, limit)  # (N, 3, R, R)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_vae_model(TINY_VAE_CHANNELS)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    losses = []
    for _ in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)]  # (B, 3, R, R)
        posterior = model.encode(x).latent_dist
        rec = model.decode(posterior.sample(gen)).sample
        loss = ((rec - x) ** 2).mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode(x).latent_dist.sample(gen) for x in pixels.split(256)])  # (N, 4, R/4, R/4)
    model.register_to_config(scaling_factor=float(1 / z.std()))
    report = {
        "images": len(pixels),
        "steps": steps,
        "seconds": round(time.time() - start, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "latent_std": float(z.std()),
        "scaling_factor": float(1 / z.std()),
        "psnr_db": {str(r): round(psnr(model, load_pixels(image_dir, r, 64), gen), 2) for r in eval_resolutions},
    }
    out = Path(out)
    model.save_pretrained(str(out))
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    with torch.no_grad():  # top row: inputs, bottom row: reconstructions
        x = pixels[torch.linspace(0, len(pixels) - 1, 16).long()]
        rec = model.decode(model.encode(x).latent_dist.sample(gen)).sample.clamp(-1, 1)
    save_grid(torch.cat([x, rec]), out / "reconstruction.png", nrow=16, min_side=64)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m sedit.data.vae_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", required=True, help="folder of images (e.g. the built-in set's images/)")
    parser.add_argument("--out", required=True, help="output folder for the AutoencoderKL (save_pretrained)")
    parser.add_argument("--steps", type=int, default=700, help="AdamW steps")
    parser.add_argument("--resolution", type=int, default=32, help="training crop size in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="train on the folder's first N images only")
    args = parser.parse_args(argv)
    report = train_tiny_vae(
        args.images,
        args.out,
        args.steps,
        args.resolution,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        limit=args.limit,
    )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
