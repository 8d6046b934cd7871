"""Moving tokens between the image layout (N, T, D) and the expert-major layout (E, N*C, D).

Both directions are index gathers/scatters: no one-hot [tokens, experts, capacity] tensors.
"""

from __future__ import annotations

import torch


def dispatch(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Gather every expert's chosen tokens: x (N, T, D), index (N, E, C) -> (E, N*C, D)."""
    n, e, c = token_index.shape
    d = x.shape[-1]
    picked = torch.gather(x, 1, token_index.reshape(n, e * c, 1).expand(-1, -1, d))  # (N, E*C, D)
    return picked.view(n, e, c, d).transpose(0, 1).reshape(e, n * c, d)  # (E, N*C, D)


def combine(expert_out: torch.Tensor, gates: torch.Tensor, token_index: torch.Tensor, tokens: int) -> torch.Tensor:
    """Weighted sum back to image layout: y_t = sum over (e, slot) holding t of gate * expert_out.

    expert_out (E, N*C, D), gates and index (N, E, C) -> (N, T, D).
    """
    n, e, c = token_index.shape
    d = expert_out.shape[-1]
    per_image = expert_out.view(e, n, c, d).transpose(0, 1)  # (N, E, C, D)
    weighted = per_image * gates.to(expert_out.dtype)[..., None]  # (N, E, C, D)
    flat_index = token_index + tokens * torch.arange(n, device=token_index.device)[:, None, None]  # (N, E, C)
    out = expert_out.new_zeros(n * tokens, d)
    out.index_add_(0, flat_index.reshape(-1), weighted.reshape(-1, d))  # (N*T, D)
    return out.view(n, tokens, d)
