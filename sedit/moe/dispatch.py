"""Moving tokens between the image layout (N, T, D) and the expert-major layout (E, N*C, D).

Both directions are index gathers/scatters: no one-hot [tokens, experts, capacity] tensors.
``token_index`` (N, E, C) holds distinct tokens for each (image, expert), as top-k gives: a token
sits in at most one slot of an expert, and in the slots of 0..E experts.
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

    expert_out (E, N*C, D), gates and index (N, E, C) -> (N, T, D). Deterministic in both
    directions: the backward pass is a gather, and so is the forward pass when compiled.
    """
    return _Combine.apply(expert_out, gates, token_index, tokens)


class _Combine(torch.autograd.Function):
    """The combine with a hand-written backward, so that neither direction needs atomic adds.

    Forward, y_{n,t} = sum_e g_{n,e,s} * o_{e,n,s} over the experts e holding token t in slot s.
    Backward, with g_{n,e,s} and o_{e,n,s} read at the slot's token t = index_{n,e,s}:
        dL/do_{e,n,s} = g_{n,e,s} * dL/dy_{n,t}        dL/dg_{n,e,s} = <o_{e,n,s}, dL/dy_{n,t}>
    which is ``dispatch`` of dL/dy: one gather.
    """

    @staticmethod
    def forward(ctx, expert_out, gates, token_index, tokens: int):
        ctx.save_for_backward(expert_out, gates, token_index)
        if torch.compiler.is_compiling():  # fused by the compiler into one read of each token's slots
            return combine_by_gather(expert_out, gates, token_index, tokens)
        return combine_by_scatter(expert_out, gates, token_index, tokens)

    @staticmethod
    def backward(ctx, grad_y):
        expert_out, gates, token_index = ctx.saved_tensors
        n, e, c = token_index.shape
        grad_at_slots = dispatch(grad_y, token_index)  # (E, N*C, D): dL/dy at each slot's token
        gates_by_slot = gates.transpose(0, 1).reshape(e, n * c, 1)  # (E, N*C, 1)
        grad_expert_out = grad_at_slots * gates_by_slot.to(grad_y.dtype)
        grad_gates = None
        if ctx.needs_input_grad[1]:
            grad_gates = (grad_at_slots * expert_out).sum(-1).to(gates.dtype)  # (E, N*C)
            grad_gates = grad_gates.view(e, n, c).transpose(0, 1)  # (N, E, C)
        return grad_expert_out, grad_gates, None, None


def combine_by_scatter(
    expert_out: torch.Tensor, gates: torch.Tensor, token_index: torch.Tensor, tokens: int
) -> torch.Tensor:
    """The combine as one ``index_add_`` of the gated slots into their tokens (eager: one kernel)."""
    n, e, c = token_index.shape
    d = expert_out.shape[-1]
    per_image = expert_out.view(e, n, c, d).transpose(0, 1)  # (N, E, C, D)
    weighted = per_image * gates.to(expert_out.dtype)[..., None]  # (N, E, C, D)
    flat_index = token_index + tokens * torch.arange(n, device=token_index.device)[:, None, None]  # (N, E, C)
    out = expert_out.new_zeros(n * tokens, d)
    out.index_add_(0, flat_index.reshape(-1), weighted.reshape(-1, d))  # (N*T, D)
    return out.view(n, tokens, d)


def combine_by_gather(
    expert_out: torch.Tensor, gates: torch.Tensor, token_index: torch.Tensor, tokens: int
) -> torch.Tensor:
    """The combine as a gather: every token reads its slot in each of the E experts, if it has one.

    slot_{n,e,t} inverts the routing (the slot of expert e holding token t of image n, or none).
    Eagerly this materialises an (N, T, E, D) tensor; compiled, the gather, gating and sum over E
    fuse into one kernel that writes each token once, with no atomic adds.
    """
    n, e, c = token_index.shape
    d = expert_out.shape[-1]
    slots = torch.arange(c, device=token_index.device).expand(n, e, c)
    slot = token_index.new_full((n, e, tokens), c).scatter_(2, token_index, slots)  # (N, E, T); c = none
    held = slot < c
    slot = slot.clamp_max(c - 1)  # a valid row for the tokens an expert does not hold; masked below
    gate = torch.gather(gates, 2, slot).to(expert_out.dtype)  # (N, E, T)
    image = torch.arange(n, device=slot.device)[:, None, None]
    expert = torch.arange(e, device=slot.device)[None, :, None]
    row = (expert * n + image) * c + slot  # (N, E, T): row of expert_out viewed as (E*N*C, D)
    rows = expert_out.reshape(e * n * c, d)[row.transpose(1, 2)]  # (N, T, E, D)
    gated = torch.where(held.transpose(1, 2)[..., None], rows * gate.transpose(1, 2)[..., None], 0)
    return gated.sum(2)  # (N, T, D)
