"""Grouped expert MLPs: all local experts run as one batched matmul over (E, M, D)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """E independent bias-free MLPs stored as stacked weights.

    GELU experts: y = gelu(x W_in) W_out.  Gated (SwiGLU) experts: y = (silu(x W_gate) * x W_up) W_out,
    with W_gate and W_up stacked in ``w_in`` (E, D, 2F).
    """

    def __init__(self, num_experts: int, dim: int, hidden: int, gated: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.gated = gated
        self.hidden = hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, (2 if gated else 1) * hidden))  # (E, D, F)
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, F, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default for each expert's matrices.
        for w, fan_in in ((self.w_in, self.w_in.shape[1]), (self.w_out, self.w_out.shape[1])):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x, self.w_in.to(x.dtype))  # (E, M, F) or (E, M, 2F)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return torch.bmm(h, self.w_out.to(x.dtype))  # (E, M, D)
