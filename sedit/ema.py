"""Exponential moving average of the weights, kept where the optimizer keeps its fp32 master copy.

    ema <- decay * ema + (1 - decay) * theta        after every optimizer step from ``stage.ema_start`` on
    ema  = theta                                     before it

theta is the fp32 master weight, not the bf16 compute copy, so the average carries no bf16 rounding.
Under ZeRO each rank owns only a piece of every master weight; the average is kept for that same
piece (``LocalMaster``), so it costs 4 bytes per locally owned parameter and no communication per
step. ``full_value`` assembles one whole parameter (a collective) for exports.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LocalMaster:
    """This rank's piece of a parameter's fp32 master weight, and how to assemble the whole of it.

    - ZeRO-3: the rank's partition of the flattened parameter (``ds_tensor`` layout: equal pieces over
      ``param.ds_process_group``, the last one padded);
    - ZeRO-1/2: the rank's fragment of the flattened parameter (``_hp_mapping``, possibly empty);
    - no ZeRO: the parameter itself.
    """

    def __init__(self, param: nn.Parameter):
        self.param = param
        if hasattr(param, "ds_id"):
            self.kind = "zero3"
        elif getattr(param, "_hp_mapping", None) is not None or hasattr(param, "_dp_group"):
            self.kind = "zero12"
        else:
            self.kind = "plain"

    def read(self) -> torch.Tensor:
        """The local fp32 master values (a view where DeepSpeed allows it; do not modify)."""
        p = self.param
        if self.kind == "zero3":
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(p)
        if self.kind == "zero12":
            mapping = getattr(p, "_hp_mapping", None)
            return mapping.get_hp_fragment() if mapping is not None else p.new_zeros(0, dtype=torch.float32)
        return p.detach().float()

    def assemble(self, local: torch.Tensor) -> torch.Tensor:
        """The whole parameter (its own shape, fp32) from every rank's ``local`` piece (collective)."""
        p = self.param
        if self.kind == "zero3":
            group = p.ds_process_group
            pieces = torch.empty(local.numel() * dist.get_world_size(group), dtype=torch.float32, device=local.device)
            dist.all_gather_into_tensor(pieces, local.float().contiguous(), group=group)
            return pieces[: p.ds_numel].view(p.ds_shape)
        if self.kind == "zero12":
            whole = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                address = mapping.lp_fragment_address
                whole.narrow(0, address.start, address.numel).copy_(local)
            dist.all_reduce(whole, group=p._dp_group)  # pieces are disjoint: the sum places them
            return whole.view(p.shape)
        return local.view(p.shape)


class EMA:
    """Moving average of every trainable parameter of ``module`` (use the DeepSpeed engine's module)."""

    def __init__(self, module: nn.Module, decay: float, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.masters = {name: LocalMaster(p) for name, p in module.named_parameters() if p.requires_grad}
        self.average = {name: m.read().detach().clone() for name, m in self.masters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based count of steps taken)."""
        names = list(self.masters)
        current = [self.masters[n].read() for n in names]
        averages = [self.average[n] for n in names]
        if step <= self.start_step:
            torch._foreach_copy_(averages, current)
        else:
            torch._foreach_lerp_(averages, current, 1.0 - self.decay)

    def full_value(self, name: str, _param: nn.Parameter | None = None) -> torch.Tensor:
        """The whole averaged parameter ``name`` in fp32 (collective under ZeRO); an export's value function."""
        return self.masters[name].assemble(self.average[name])

    def state_dict(self) -> dict:
        """This rank's local pieces (store one per rank)."""
        return {
            "decay": self.decay,
            "start_step": self.start_step,
            "average": {n: t.cpu() for n, t in self.average.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["average"]
        if set(saved) != set(self.average):
            raise ValueError(f"EMA state has different parameters: {sorted(set(saved) ^ set(self.average))[:5]} ...")
        for name, value in saved.items():
            if value.shape != self.average[name].shape:
                raise ValueError(
                    f"EMA state of {name}: shape {tuple(value.shape)}, expected {tuple(self.average[name].shape)}"
                )
            self.average[name].copy_(value)
