"""Patches and random patch masking.

A latent (N, C, H, W) becomes T = (H/p)(W/p) tokens of p*p*C values, row-major. Masking keeps an
exact number of tokens per image, chosen independently for every image; the kept indices travel
with the batch so the loss and the unpatchify step use the same ones.
"""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C)."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W); inverse of ``patchify``."""
    n = tokens.shape[0]
    x = tokens.view(n, h // p, w // p, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, channels, h, w)


def kept_count(tokens: int, mask_ratio: float) -> int:
    """Tokens kept per image: T - round(T * ratio) (64 of 256 at ratio 0.75)."""
    keep = tokens - int(round(tokens * mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no token of {tokens}")
    return keep


def random_keep_indices(
    batch: int, tokens: int, mask_ratio: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Sorted indices of the tokens each image keeps: (N, K), an independent draw per image."""
    keep = kept_count(tokens, mask_ratio)
    noise = torch.rand(batch, tokens, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (N, K)


def gather_tokens(x: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """Kept tokens: x (N, T, D), index (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, keep_index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(kept: torch.Tensor, keep_index: torch.Tensor, tokens: int) -> torch.Tensor:
    """Put kept tokens back in place, zeros elsewhere: (N, K, D) -> (N, T, D)."""
    n, _, d = kept.shape
    out = kept.new_zeros(n, tokens, d)
    return out.scatter(1, keep_index[..., None].expand(-1, -1, d), kept)
