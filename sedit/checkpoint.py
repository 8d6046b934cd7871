"""Checkpoints: DeepSpeed training state (same topology) and a consolidated export (any topology).

Training state: ``engine.save_checkpoint`` into ``<dir>/<tag>.tmp``, renamed to ``<dir>/<tag>`` by
rank 0 once every rank has written, then ``<dir>/latest`` is replaced atomically. A half-written
checkpoint therefore never carries a final name. Resuming needs the same world and expert-parallel
size (DeepSpeed stores optimizer partitions per rank).

Consolidated export: every parameter whole, in fp32, experts of each MoE layer gathered from the
expert-parallel group in global order, under the single-process names (``...ffn.experts.w1`` is
(E, F, D)). Written by rank 0 as ``model.safetensors`` plus ``config.yaml``; it loads into a
single-process model and can be re-sharded for any expert-parallel size. An export may also hold
``ema.safetensors``, the EMA weights under the same names, which sampling prefers.

Where the export of a run is (``resolve_export``): the run's ``final/``, else the export inside its
newest checkpoint, ``checkpoints/<latest>/export/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from sedit.config import Config, build_config, to_dict
from sedit.files import atomic_write_text
from sedit.model import SparseDiT, build_model
from sedit.moe.expert_parallel import ExpertChoiceEPLayer

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------
# Training state (DeepSpeed, same topology)
# ----------------------------------------------------------------------------------------------


def save_training_state(engine, directory: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
    """Write a resumable checkpoint ``<directory>/<tag>`` (collective: every rank calls it)."""
    directory = Path(directory)
    final = directory / tag
    engine.save_checkpoint(str(directory), tag=f"{tag}.tmp", client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        if final.exists():
            import shutil

            shutil.rmtree(final)
        os.replace(directory / f"{tag}.tmp", final)
        atomic_write_text(directory / "latest", tag)
    if dist.is_initialized():
        dist.barrier()
    return final


def load_training_state(engine, directory: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state; returns the client state saved with it."""
    directory = Path(directory)
    tag = tag or (directory / "latest").read_text().strip()
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{directory / tag}: no DeepSpeed checkpoint could be loaded")
    return client_state or {}


# ----------------------------------------------------------------------------------------------
# Consolidated export (any topology)
# ----------------------------------------------------------------------------------------------


def consolidated_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters of a DeepSpeed-wrapped model (collective; complete on every rank).

    Reads the optimizer's fp32 master weights where DeepSpeed keeps them (ZeRO 1-3), so the export
    carries no bf16 rounding.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    expert_owner = {
        id(p): layer
        for layer in module.modules()
        if isinstance(layer, ExpertChoiceEPLayer)
        for p in layer.experts.parameters()
    }
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        full = (param if full is None else full).detach().float().contiguous()
        layer = expert_owner.get(id(param))
        if layer is not None and layer.ep_size > 1:
            shards = [torch.empty_like(full) for _ in range(layer.ep_size)]
            dist.all_gather(shards, full, group=layer.ep_group)
            full = torch.cat(shards)  # (E, ...) in global expert order
        state[name] = full.cpu().clone()
    return state


def export_consolidated(module: torch.nn.Module, cfg: Config, directory: str | Path) -> Path | None:
    """Write ``model.safetensors`` + ``config.yaml`` of the raw network (collective; rank 0 writes)."""
    net = module.net if hasattr(module, "net") else module
    state = consolidated_state_dict(net)
    directory = Path(directory)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "sedit-consolidated-v1"})
    os.replace(tmp, directory / MODEL_FILE)
    atomic_write_text(directory / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return directory


def export_config(directory: str | Path) -> Config:
    """The run config saved with an export directory (checks that its weights file is there too)."""
    directory = Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name} (not a sedit export directory)")
    return build_config(yaml.safe_load((directory / CONFIG_FILE).read_text()), str(directory / CONFIG_FILE))


def load_consolidated(
    directory: str | Path, device: str | torch.device = "cpu", weights_file: str = MODEL_FILE
) -> tuple[SparseDiT, Config]:
    """Single-process model and its config from an export directory.

    ``weights_file`` picks the weights inside it: ``model.safetensors`` (the trained weights) or
    ``ema.safetensors`` (their EMA).
    """
    directory = Path(directory)
    cfg = export_config(directory)
    weights = directory / weights_file
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: no {weights_file} in this export directory")
    net = build_model(cfg.model)
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: missing keys {missing}, unexpected keys {unexpected}")
    return net.to(device), cfg


def is_export_dir(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / MODEL_FILE).is_file()


def export_candidates(path: Path) -> list[Path]:
    """Where the export may be, in order: ``path`` itself, its ``final/``, the export of the checkpoint
    that ``checkpoints/latest`` (or ``latest``) names, and ``export/`` inside a checkpoint tag."""
    candidates = [path, path / "final"]
    for checkpoints in (path / "checkpoints", path):
        latest = checkpoints / "latest"
        if latest.is_file():
            candidates.append(checkpoints / latest.read_text().strip() / "export")
    candidates.append(path / "export")
    return candidates


def resolve_export(path: str | Path, weights: str | None = None) -> tuple[Path, str]:
    """(export directory, weights file name) for a path to any stage's output.

    ``path`` may be an export directory (``config.yaml`` + ``model.safetensors``), a run directory
    (its ``final/``, else ``checkpoints/<latest>/export/``) or a checkpoint tag directory (its
    ``export/``). ``weights``: ``"ema"`` (``ema.safetensors``, which must exist), ``"raw"``
    (``model.safetensors``) or None (EMA when the export has it, else the raw weights).
    """
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights {weights!r}: expected 'ema', 'raw' or None")
    path = Path(path)
    found = next((c for c in export_candidates(path) if is_export_dir(c)), None)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no sedit export found; looked for {CONFIG_FILE} + {MODEL_FILE} in the directory itself, "
            "in final/, in checkpoints/<tag>/export/ (tag read from checkpoints/latest, or latest) and in export/"
        )
    has_ema = (found / EMA_FILE).is_file()
    if weights == "ema" and not has_ema:
        raise FileNotFoundError(f"{found}: no {EMA_FILE} (this export has no EMA weights; use the raw weights)")
    return found, EMA_FILE if has_ema and weights != "raw" else MODEL_FILE
