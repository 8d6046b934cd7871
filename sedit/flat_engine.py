"""A training engine for runs whose whole training state fits one GPU: plain data parallelism.

Selected by ``"engine": "flat"`` in the ``--ds`` config (``ds_configs/flat_dp.json``). Every rank
holds the whole model, fp32 weights and AdamW state; the forward runs under bf16 autocast; the
gradients live in one flat buffer (``sedit.flat_grads``) that is all-reduced once per optimizer step,
clipped with one norm and handed to torch's fused AdamW. Nothing is read back to the host inside a
step, so a model compiled with CUDA graphs (``stage.compile_mode: reduce-overhead``) keeps them, where
DeepSpeed's per-tensor gradient bookkeeping leaves the GPU waiting (docs/benchmarks.md).

It offers the part of DeepSpeed's engine interface that the trainer uses (``backward``/``step`` per
micro-batch, ``save_checkpoint``/``load_checkpoint``, ...), so ``sedit.train`` runs either engine.
What it gives up: experts are not sharded (expert-parallel size 1), and nothing is partitioned, so each
GPU needs ~16 bytes per parameter plus activations (XL: ~20 GB of state).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sedit.flat_grads import FlatGradients

STATE_FILE = "flat_engine.pt"  # model and optimizer state; the same on every rank, so rank 0 writes it


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (and expert weight stacks), none on norms, biases and gains."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class FlatEngine:
    """``module`` (the EDM-preconditioned model) trained by data parallelism over the default process group.

    ``ds_config`` is the resolved config (``sedit.engine.resolve_ds_config``): its batch sizes,
    ``gradient_clipping``, ``optimizer.params`` and ``bf16.enabled`` (autocast) are used.
    """

    def __init__(self, module: nn.Module, ds_config: dict[str, Any], device: torch.device):
        self.module = module.to(device)
        self.device = device
        self.autocast = bool(ds_config.get("bf16", {}).get("enabled", False))
        self.accumulation = int(ds_config["gradient_accumulation_steps"])
        self.max_norm = float(ds_config.get("gradient_clipping", 0.0))
        self.grads = FlatGradients(self.module.parameters())
        params = dict(ds_config["optimizer"]["params"])
        groups = weight_decay_groups(self.module, params.pop("weight_decay", 0.0))
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=params["lr"],
            betas=tuple(params.get("betas", (0.9, 0.999))),
            eps=params.get("eps", 1e-8),
            fused=bool(params.get("fused", True)),
        )
        self.hyperparameters = [  # this run's settings, put back over a checkpoint's by load_checkpoint
            {k: g[k] for k in ("betas", "eps", "weight_decay")} for g in self.optimizer.param_groups
        ]
        self.forward_module: nn.Module = self.module
        self.is_compiled = False
        self.micro_steps = 0  # since the last optimizer step
        self.grad_norm: torch.Tensor | None = None  # before clipping, of the last optimizer step

    # the forward and the step ---------------------------------------------------------------------

    def precision(self):
        """The forward's precision: bf16 autocast over the fp32 weights, or plain fp32 (a context)."""
        return torch.autocast(self.device.type, torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        with self.precision():
            return self.forward_module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate this micro-batch's share of the step's mean loss, L / (ranks x micro-batches)."""
        (loss * self.grads.loss_scale(self.accumulation)).backward()

    def step(self) -> None:
        """Count a micro-batch; at the last one of an optimizer step, reduce, clip, step and zero."""
        self.micro_steps += 1
        if self.micro_steps == self.accumulation:
            max_norm = self.max_norm if self.max_norm > 0 else float("inf")
            self.grad_norm = self.grads.step(self.optimizer, max_norm)
            self.micro_steps = 0

    def compile(self, compile_kwargs: dict[str, Any] | None = None) -> None:
        """torch.compile the forward (the uncompiled ``module`` stays available, e.g. for sampling)."""
        self.forward_module = torch.compile(self.module, **(compile_kwargs or {}))
        self.is_compiled = True

    # what the trainer asks of an engine ------------------------------------------------------------

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def bfloat16_enabled(self) -> bool:
        """False: the weights stay fp32 (inputs too); bf16 comes from autocast inside the forward."""
        return False

    def zero_optimization_stage(self) -> int:
        return 0

    def get_global_grad_norm(self) -> torch.Tensor | None:
        return self.grad_norm

    def train(self, mode: bool = True) -> FlatEngine:
        self.module.train(mode)
        return self

    def eval(self) -> FlatEngine:
        return self.train(False)

    # checkpoints (the layout of sedit.checkpoint.save_training_state) -------------------------------

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict | None = None, save_latest: bool = False):
        """Rank 0 writes ``<save_dir>/<tag>/flat_engine.pt``; every rank makes the directory for its own files."""
        import torch.distributed as dist

        directory = Path(save_dir) / tag
        directory.mkdir(parents=True, exist_ok=True)
        if not dist.is_initialized() or dist.get_rank() == 0:
            state = {
                "module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "client_state": client_state or {},
            }
            torch.save(state, directory / STATE_FILE)
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str | None, dict]:
        """Restore model and optimizer state; (path, client state), or (None, {}) if absent.

        The AdamW moments and step counts come from the checkpoint; betas, eps and weight decay stay
        those of this run's config (a checkpoint is always written between optimizer steps).
        """
        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])  # copies in place: the gradients stay bound to the buffer
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, self.hyperparameters, strict=True):
            group.update(settings)
        self.micro_steps = 0
        return str(path.parent), state["client_state"]
