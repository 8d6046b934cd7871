"""Moving tokens between the image layout (N, T, D) and the expert-major layout (E, N*C, D).

No one-hot [tokens, experts, capacity] tensors: the dispatch is a gather, and the combine a gather-sum
through the slot map, the inverse of the routing index:

    slot[n, e, t] = c   where token_index[n, e, c] = t;   C (no slot) where expert e did not take token t

    dispatch:  tokens[e, n*C + c] = x[n, token_index[n, e, c]]
    combine:   y[n, t] = sum_e g[n, e, t] * out[e, n*C + slot[n, e, t]]        (g = 0 where there is no slot)

The combine used to be a scatter-add (``index_add_``), which accumulates with atomics: in bf16 under
autocast that took 0.19-0.27 ms per XL layer on an H100 and rounded every partial sum. Read through the
slot map it is a gather with an fp32 sum over the experts, which torch.compile fuses with the residual
add and the next LayerNorm; its backward, written by hand, is a gather too (dL/dout is the dispatch of
dL/dy, scaled by the gates). The dispatch keeps autograd's backward, a scatter-add that torch.compile
turns into one fp32 kernel: the gather-sum in its place, fused into the LayerNorm's backward, ran slower
(docs/benchmarks.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Placement(NamedTuple):
    """Where the chosen tokens sit: ``token_index`` (N, E, C) and its inverse ``slot`` (N, E, T)."""

    token_index: torch.Tensor
    slot: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.token_index.shape[-1]

    def taken(self) -> torch.Tensor:
        """(N, E, T) bool: whether expert e took token t of image n."""
        return self.slot < self.capacity


def place(token_index: torch.Tensor, tokens: int) -> Placement:
    """The slot map of a routing index (N, E, C) over ``tokens`` tokens per image.

    An expert takes a token at most once (top-C of distinct tokens), so the scatter has no collisions.
    """
    n, e, c = token_index.shape
    slots = torch.arange(c, device=token_index.device).expand(n, e, c)
    slot = token_index.new_full((n, e, tokens), c).scatter_(2, token_index, slots)  # (N, E, T)
    return Placement(token_index, slot)


def gather_rows(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """x (N, T, D), index (N, E, C) -> (E, N*C, D): row n*C + c of expert e is x[n, token_index[n, e, c]]."""
    n, e, c = token_index.shape
    d = x.shape[-1]
    picked = torch.gather(x, 1, token_index.reshape(n, e * c, 1).expand(-1, -1, d))  # (N, E*C, D)
    return picked.view(n, e, c, d).transpose(0, 1).reshape(e, n * c, d)  # (E, N*C, D)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, fp64 for fp64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


def gather_sum(rows: torch.Tensor, placement: Placement, weight: torch.Tensor) -> torch.Tensor:
    """y[n, t] = sum_e weight[n, e, t] * rows[e, n*C + slot[n, e, t]], over the experts that took t.

    rows (E, N*C, D), weight (N, E, T) -> (N, T, D) in rows' dtype, summed in fp32 (or wider).

    One reduction over the expert axis, which torch.compile fuses with its indirect loads. Its partitioner
    then saves the (N, T, D) result for the backward (the gate's gradient needs it) instead of recomputing
    it there, by its rule that an op whose output is over 4x smaller than its inputs is kept (so for E > 4).
    A loop of E adds was recomputed inside a reduction over the tokens, at 0.16-0.35 ms per XL layer.
    Outside torch.compile the (N, E, T, D) products are materialised for a moment.
    """
    n, e, _ = placement.slot.shape
    c = placement.capacity
    wide = accumulation_dtype(rows)
    row = torch.arange(n, device=rows.device)[:, None, None] * c + placement.slot.clamp(max=c - 1)  # (N, E, T)
    weight = torch.where(placement.taken(), weight.to(wide), 0.0)  # (N, E, T); an untaken slot reads a row, adds 0
    picked = rows[torch.arange(e, device=rows.device)[None, :, None], row]  # (N, E, T, D)
    return (picked.to(wide) * weight[..., None]).sum(dim=1).to(rows.dtype)


def dispatch(x: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Gather every expert's chosen tokens: x (N, T, D) -> (E, N*C, D)."""
    return gather_rows(x, placement.token_index)


def combine(expert_out: torch.Tensor, gates: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Weighted sum back to the image layout: expert_out (E, N*C, D), gates (N, E, C) -> (N, T, D)."""
    return _Combine.apply(expert_out, gates, placement.token_index, placement.slot)


def gate_map(gates: torch.Tensor, placement: Placement) -> torch.Tensor:
    """(N, E, C) gates -> (N, E, T): each gate at its token, 0 where the expert took nothing."""
    return torch.zeros_like(placement.slot, dtype=gates.dtype).scatter_(2, placement.token_index, gates)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, expert_out: torch.Tensor, gates: torch.Tensor, token_index: torch.Tensor, slot: torch.Tensor
    ) -> torch.Tensor:
        placement = Placement(token_index, slot)
        ctx.save_for_backward(expert_out, gates, token_index, slot)
        return gather_sum(expert_out, placement, gate_map(gates, placement))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        expert_out, gates, token_index, _ = ctx.saved_tensors
        n, e, c = token_index.shape
        wide = accumulation_dtype(grad_y)
        grad_rows = gather_rows(grad_y, token_index).to(wide)  # (E, N*C, D): dL/dy at the token of every slot
        gates_by_row = gates.transpose(0, 1).reshape(e, n * c, 1)  # (E, N*C, 1)
        grad_out = (grad_rows * gates_by_row).to(expert_out.dtype) if ctx.needs_input_grad[0] else None
        grad_gates = None
        if ctx.needs_input_grad[1]:
            per_row = (grad_rows * expert_out.to(wide)).sum(-1)  # (E, N*C)
            grad_gates = per_row.view(e, n, c).transpose(0, 1).to(gates.dtype)  # (N, E, C)
        return grad_out, grad_gates, None, None
