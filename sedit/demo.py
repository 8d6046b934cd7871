"""Embedded default: train the ``tiny`` model briefly on a synthetic batch, sample, write a PNG grid.

    python -m sedit.demo --out runs/demo

The "latents" are four-channel colour patterns, one per caption; the grid shows the first three
channels of the sampled latents as RGB next to the training targets.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sedit.config import DiffusionConfig
from sedit.edm import EDMLoss, EDMPrecond
from sedit.images import save_grid
from sedit.model import build_model, parameter_counts
from sedit.presets import PRESETS
from sedit.sampling import generate_latents


def synthetic_batch(n: int, side: int, caption_len: int, caption_dim: int, seed: int = 0):
    """n distinct smooth 4-channel patterns (std ~0.9) and a random caption embedding for each."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    freq = torch.randint(1, 4, (n, 4, 2), generator=g).float()
    phase = torch.rand(n, 4, 1, 1, generator=g) * 6.28
    latents = 1.2 * torch.sin(freq[..., 0, None, None] * 3.14 * xs + freq[..., 1, None, None] * 3.14 * ys + phase)
    captions = torch.randn(n, caption_len, caption_dim, generator=g)
    return latents, captions


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder for grid.png")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--side", type=int, default=8, help="latent side (tiny preset, patch 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = PRESETS["tiny"]
    diff = DiffusionConfig()
    net = build_model(cfg)
    counts = parameter_counts(net)
    print(f"tiny preset: {counts['total']:,} parameters ({counts['active']:,} active per token)")
    precond = EDMPrecond(net, diff.sigma_data)
    loss_fn = EDMLoss(diff.p_mean, diff.p_std, diff.sigma_data, cfg.patch_size)
    latents, captions = synthetic_batch(8, args.side, cfg.caption_len, cfg.caption_dim, args.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)

    start = time.time()
    first = last = None
    for step in range(args.steps):
        mask = 0.75 if step < args.steps // 2 else 0.0  # masked, then unmasked, as in the recipe
        loss = loss_fn(precond, latents, captions, mask_ratio=mask, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {last:.4f}  mask {mask}")
    print(f"trained {args.steps} steps in {time.time() - start:.1f}s, loss {first:.3f} -> {last:.3f}")

    net.eval()
    samples = generate_latents(
        precond, captions, seeds=range(len(captions)), latent_shape=latents.shape[1:], steps=12, guidance_scale=2.0
    )
    images = torch.cat([latents[:, :3], samples[:, :3]]) / 1.2  # top row: targets, bottom row: samples
    path = save_grid(images, Path(args.out) / "grid.png", nrow=len(captions))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
