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
    grouped GEMM would, without its alignment demands on the weights' storage.
    """
    x = x.to(compute_dtype(x))  # one dtype for every operand: the backward runs outside autocast
    h = expert_linear(x, w1.to(x.dtype))  # (E, M, F)
    if w3 is not None:
        h = F.silu(h) * expert_linear(x, w3.to(x.dtype))  # SwiGLU
    else:
        h = F.gelu(h, approximate="tanh")
    return expert_linear(h, w2.to(x.dtype))  # (E, M, D)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on ``x`` run in: autocast's, where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y_e = x_e w_e^T for every expert e: x (E, M, K), w (E, N, K) -> (E, M, N)."""
    return _ExpertLinear.apply(x, w)


class _ExpertLinear(torch.autograd.Function):
    """``bmm(x, w^T)`` whose two gradients come out in their operands' own (contiguous) layouts:

        dL/dx = dL/dy w   (E, M, K)        dL/dw = (dL/dy)^T x   (E, N, K)

    Autograd's own backward of ``bmm(x, w.transpose(1, 2))`` returns dL/dw transposed, which
    AccumulateGrad then copies into place every step (~5 ms per XL stage-1 step); taking the product
    token-minor instead (w x^T) fixes the weights but returns dL/dx transposed, and the dispatch's
    backward (a scatter over tokens) then reads it across rows (~12 ms per step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_x = torch.bmm(grad_y, w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad_y.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w
