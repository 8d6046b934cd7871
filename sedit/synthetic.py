"""Synthetic training data (``stage.data: synthetic``): random latents and caption embeddings.

For smoke tests and throughput benchmarks only: it exercises every code path at the real shapes
but carries nothing to learn. Each rank draws from its own seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sedit.config import Config


def synthetic_batches(cfg: Config, rank: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    side = cfg.stage.resolution // cfg.stage.latent_downsample
    g = torch.Generator().manual_seed(cfg.stage.seed * 1000 + rank)
    n = cfg.stage.micro_batch
    while True:
        latents = torch.randn(n, cfg.model.in_channels, side, side, generator=g) * cfg.diffusion.sigma_data
        captions = torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim, generator=g)
        yield {"latents": latents.to(device), "captions": captions.to(device)}
