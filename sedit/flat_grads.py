"""Data parallelism through one flat gradient buffer, for a model whose training state fits one GPU.

Every parameter's ``.grad`` is a view into one contiguous buffer ``g``. Autograd accumulates into
those views in place, so an optimizer step over R ranks and M micro-batches per rank is

    g = sum_r sum_m grad L_{r,m} / (R * M)      each rank back-propagates L_{r,m} / (R * M),
                                                 then one all-reduce (sum) of g
    g <- g * min(1, c / (||g||_2 + 1e-6))       clipping: one norm over the buffer

and then the optimizer. Nothing reads a value back to the host, and reducing and clipping take one
collective and one norm however many parameter tensors there are, where DeepSpeed's reduction walks
them one by one. The price: the gradient is exchanged after the backward, not overlapped with it,
once per optimizer step.

Every rank must start from the same weights (nothing is broadcast here: seed the model's construction
alike). Unlike ``zero_grad(set_to_none=True)``, a parameter that got no gradient in a step is stepped
with a zero one, so AdamW's weight decay and moment decay still move it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class FlatGradients:
    """Binds the gradients of ``params`` to one flat buffer; reduces, clips and zeroes it as a whole.

    Call ``zero_()`` instead of the optimizer's ``zero_grad``: setting ``.grad`` to None would cut a
    parameter loose from the buffer (``bound()`` checks that none was).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None = None):
        self.params = list({id(p): p for p in params if p.requires_grad}.values())  # each tensor once
        if not self.params:
            raise ValueError("FlatGradients: no parameter requires a gradient")
        for i, p in enumerate(self.params):
            if not p.is_contiguous():  # a gradient view must have its parameter's strides
                raise ValueError(f"FlatGradients: parameter {i} (shape {tuple(p.shape)}) is not contiguous")
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) > 1:
            found = sorted(map(str, kinds))
            raise ValueError(f"FlatGradients: parameters must share one dtype and device, got {found}")
        self.group = group
        first = self.params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)  # (P,)
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    def loss_scale(self, micro_batches: int) -> float:
        """1 / (R * M): what each micro-batch's loss is multiplied by before its backward."""
        return 1.0 / (self.world_size() * micro_batches)

    def all_reduce_(self) -> None:
        """Sum the buffer over ranks (the losses were pre-divided, so the sum is the mean gradient)."""
        if self.world_size() > 1:
            dist.all_reduce(self.buffer, group=self.group)

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient to at most ``max_norm`` in L2 norm; returns the norm before clipping, on device."""
        norm = torch.linalg.vector_norm(self.buffer)
        clip_in_place([self.buffer], max_norm, norm)
        return norm

    def zero_(self) -> None:
        self.buffer.zero_()

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
        """The end of an optimizer step: reduce, clip and step (``clipped_step``), zero. Returns the norm
        before clipping, on device."""
        self.all_reduce_()
        norm = clipped_step(optimizer, [self.buffer], max_norm)
        self.zero_()
        return norm

    def bound(self) -> bool:
        """Whether every parameter's gradient is still a view of the buffer."""
        storage = self.buffer.untyped_storage().data_ptr()
        return all(p.grad is not None and p.grad.untyped_storage().data_ptr() == storage for p in self.params)


def clip_in_place(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """g <- g * min(1, c / (||g|| + eps)) for the gradients (on one device) whose joint norm is ``norm``."""
    if grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0))


def clipped_step(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """One optimizer step on ``grads`` (the gradients of the optimizer's parameters, on one device) clipped
    to ``max_norm`` in their joint L2 norm, as ``clip_grad_norm_`` then ``step``. Returns the norm before
    clipping, on device.

    A fused optimizer (``fused=True`` AdamW, Adam, SGD) divides every gradient by its ``grad_scale`` as it
    reads it; that is how GradScaler unscales. Clipping then rides on that division,

        g * min(1, c / (||g|| + eps))  =  g / max(1, (||g|| + eps) / c),

    and needs no pass of its own over the gradients (the kernel writes each divided gradient back as it
    goes, so ``.grad`` is left clipped, as ``clip_grad_norm_`` leaves it). The same kernel skips the step
    where ``found_inf`` is set: a gradient with an infinite or NaN value leaves weights and moments as they
    were (the returned norm shows it). Other optimizers get the gradients clipped first, and no such guard.
    """
    norm = torch.nn.utils.get_total_norm(grads).float()  # foreach kernels where the device has them
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        clip_in_place(grads, max_norm, norm)
        optimizer.step()
        return norm
    optimizer.grad_scale = torch.clamp((norm + CLIP_EPS) / max_norm, min=1.0)
    optimizer.found_inf = (~torch.isfinite(norm)).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm
