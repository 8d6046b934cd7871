"""Shared test helpers."""

import torch


def perturb_zero_init(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Give every all-zero parameter (adaLN-Zero, output map) small random values, so gradients
    flow through every path in one backward pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(torch.randn(p.shape, generator=g) * scale)
