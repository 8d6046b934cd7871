"""Building blocks of the sparse DiT: embedders, attention, dense feed-forward, modulation.

Shape notation: N images, T tokens, L caption tokens, D width, H heads, K head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest positive multiple of ``multiple`` (layer-wise scaling rounds widths this way)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, per image."""
    return x * (1 + scale[:, None]) + shift[:, None]  # (N, T, D)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input's precision (statistics are accumulated in fp32 by the kernel).

    Under bf16 autocast ``F.layer_norm`` would upcast to fp32 and back around every norm; with 243
    norms per XL step those casts cost as much GPU time as the matmuls (docs/benchmarks.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


# ----------------------------------------------------------------------------------------------
# Position and noise-level embeddings
# ----------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of real-valued positions: (P,) -> (P, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * freqs[None]  # (P, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def grid_coordinates(grid: int, base_grid: int) -> torch.Tensor:
    """Token coordinates along one axis, rescaled so any grid spans the base grid's range.

    With scale s = grid / base_grid, coordinate i / s: a 32x32 grid at s=2 covers [0, 16) like the
    16x16 base grid at s=1, so the 512px stage sees the positions the 256px stage learned.
    """
    scale = grid / base_grid
    return torch.arange(grid, dtype=torch.float64) / scale


def sincos_2d(dim: int, grid: int, base_grid: int) -> torch.Tensor:
    """2-D sinusoidal position embedding for a square token grid: (grid*grid, dim), row-major."""
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be a multiple of 4")
    coords = grid_coordinates(grid, base_grid)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_rows = sincos_1d(dim // 2, rows.reshape(-1))
    emb_cols = sincos_1d(dim // 2, cols.reshape(-1))
    return torch.cat([emb_rows, emb_cols], dim=1).float()  # (T, dim)


class NoiseLevelEmbedder(nn.Module):
    """c_noise (N,) -> sinusoidal features -> MLP -> (N, D)."""

    def __init__(self, dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        # c_noise = ln(sigma)/4 lies in about [-2, 1.5]; scale it up so the sinusoids resolve it.
        angles = 1000.0 * c_noise.float()[:, None] * freqs[None]  # (N, freq/2)
        feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def split_heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None = None) -> torch.Tensor:
    """(N, T, H*K) -> (N, H, T, K), optionally normalising each head's K values first (QK-norm)."""
    n, t, d = x.shape
    x = x.view(n, t, d // head_dim, head_dim)  # (N, T, H, K)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)  # (N, H, T, K)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, t, k = x.shape
    return x.transpose(1, 2).reshape(n, t, h * k)  # (N, T, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-LayerNorm, no biases; width may differ from the stream."""

    def __init__(self, dim: int, attn_dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=False)
        self.q_norm = LayerNorm(head_dim, eps=eps, bias=False)
        self.k_norm = LayerNorm(head_dim, eps=eps, bias=False)
        self.proj = nn.Linear(attn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (N, T, A) each
        q = split_heads(q, self.head_dim, self.q_norm)  # (N, H, T, K)
        k = split_heads(k, self.head_dim, self.k_norm)
        v = split_heads(v, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, K)
        return self.proj(merge_heads(out))  # (N, T, D)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens (kv_dim wide), QK-LayerNorm, no biases."""

    def __init__(self, dim: int, kv_dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.q_norm = LayerNorm(head_dim, eps=eps, bias=False)
        self.k_norm = LayerNorm(head_dim, eps=eps, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(x), self.head_dim, self.q_norm)  # (N, H, T, K)
        k, v = self.kv(context).chunk(2, dim=-1)  # (N, L, D) each
        k = split_heads(k, self.head_dim, self.k_norm)  # (N, H, L, K)
        v = split_heads(v, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, K)
        return self.proj(merge_heads(out))


# ----------------------------------------------------------------------------------------------
# Dense feed-forward and caption path
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    """Dense FFN: W_out(silu(x W_gate) * x W_up), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (N, T, F) each
        return self.out(F.silu(gate) * up)


class CaptionEncoder(nn.Module):
    """Refines text-encoder tokens: MLP projection to the backbone width, then one
    self-attention + SwiGLU block. (N, L, Dc) -> (N, L, D)."""

    def __init__(self, caption_dim: int, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.project = nn.Sequential(
            nn.Linear(caption_dim, dim, bias=False), nn.GELU(approximate="tanh"), nn.Linear(dim, dim, bias=False)
        )
        self.norm1 = LayerNorm(dim, eps=eps, bias=False)
        self.attn = SelfAttention(dim, dim, head_dim, eps)
        self.norm2 = LayerNorm(dim, eps=eps, bias=False)
        self.ffn = SwiGLU(dim, 4 * dim)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        x = self.project(captions)  # (N, L, D)
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
