"""Grouped expert MLPs: all local experts run as one batched matmul over (E, M, D).

Weights use DeepSpeed's expert layout (``deepspeed.moe.ep_experts.GroupedExperts``), so the single-
process and expert-parallel layers share parameter names and shapes:
    w1 (E, F, D) gate,  w3 (E, F, D) up,  w2 (E, D, F) down.
Gated (SwiGLU) experts:  y = (silu(x w1^T) * (x w3^T)) w2^T     (what DeepSpeed's expert kernels run)
GELU experts:            y = gelu(x w1^T) w2^T                  (the reference's 2-layer MLP; single process)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """E independent bias-free expert MLPs stored as stacked weights."""

    def __init__(self, num_experts: int, dim: int, hidden: int, gated: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.gated = gated
        self.hidden = hidden
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, F, D)
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, F)
        if gated:
            self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, F, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's matrices at nn.Linear's default scale, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in self.parameters():
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(E, M, D) -> (E, M, D)."""
        return expert_mlp(x, self.w1, self.w2, self.w3 if self.gated else None)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None) -> torch.Tensor:
    """E expert MLPs on E equal groups of M tokens, as batched matmuls: (E, M, D) -> (E, M, D).

    Expert choice gives every expert the same number of tokens, so a strided batched GEMM does what a
    grouped GEMM would, without its alignment demands on the weights' storage. The products are taken
    token-minor (h^T = w1 x^T, ...) so that each weight's gradient comes out in the weight's own layout;
    the token-major form (x w1^T) returns transposed gradients that autograd then copies into place.
    """
    x_t = x.transpose(1, 2)  # (E, D, M)
    h_t = torch.bmm(w1.to(x.dtype), x_t)  # (E, F, M)
    if w3 is not None:
        h_t = F.silu(h_t) * torch.bmm(w3.to(x.dtype), x_t)  # SwiGLU
    else:
        h_t = F.gelu(h_t, approximate="tanh")
    return torch.bmm(w2.to(x.dtype), h_t).transpose(1, 2)  # (E, D, M) -> (E, M, D)
