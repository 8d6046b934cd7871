"""Checkpoints: training state (same topology) and a consolidated export (any topology).

Training state: ``engine.save_checkpoint`` (DeepSpeed's, or ``FlatEngine``'s) into ``<dir>/<tag>.tmp``,
renamed to ``<dir>/<tag>`` by rank 0 once every rank has written, then ``<dir>/latest`` is replaced
atomically. A half-written checkpoint therefore never carries a final name. Resuming needs the same
engine, world and expert-parallel size (DeepSpeed stores optimizer partitions per rank).

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
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file

from sedit import checkpoint_integrity as integrity
from sedit import distributed
from sedit.config import Config, build_config, to_dict
from sedit.files import atomic_write_text
from sedit.model import SparseDiT, build_model
from sedit.moe.expert_parallel import ExpertChoiceEPLayer

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # moving-average weights, next to model.safetensors in checkpoint exports
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------
# Training state (DeepSpeed, same topology)
# ----------------------------------------------------------------------------------------------


def rank_state_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


def save_training_state(
    engine,
    directory: str | Path,
    tag: str,
    client_state: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    export: Callable[[Path], None] | None = None,
    keep: int | None = None,
) -> Path:
    """Write a resumable checkpoint ``<directory>/<tag>`` (collective: every rank calls it).

    Into ``<tag>.tmp``: DeepSpeed's model/optimizer state, this rank's ``rank_state`` (data-loader
    position, RNG states, EMA piece) as ``trainer_rankNNNNN.pt``, and whatever ``export(dir)`` writes;
    then a manifest of sizes and hashes. Rank 0 then renames it to ``<tag>``, points ``latest`` at it
    and keeps only the ``keep`` newest checkpoints.
    """
    directory = Path(directory)
    final, tmp = directory / tag, directory / f"{tag}.tmp"
    rank = integrity.rank_and_world()[0]
    engine.save_checkpoint(str(directory), tag=tmp.name, client_state=client_state, save_latest=False)
    if rank_state is not None:
        torch.save(rank_state, tmp / rank_state_file(rank))
    if export is not None:
        export(tmp / "export")
    distributed.barrier()
    integrity.write_manifest(tmp, {"tag": tag, **client_state})
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(directory / "latest", tag)
        if keep is not None:
            integrity.prune(directory, keep)
    distributed.barrier()
    return final


def load_training_state(engine, directory: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Restore model, optimizer and scheduler state; returns the client state saved with it.

    With a trainer state file for this rank, it is returned under ``"rank_state"``.
    """
    directory = Path(directory)
    tag = tag or (directory / "latest").read_text().strip()
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise FileNotFoundError(f"{directory / tag}: no DeepSpeed checkpoint could be loaded")
    client_state = dict(client_state or {})
    rank = integrity.rank_and_world()[0]
    state_file = directory / tag / rank_state_file(rank)
    if state_file.is_file():
        client_state["rank_state"] = torch.load(state_file, map_location="cpu", weights_only=True)
    return client_state


# ----------------------------------------------------------------------------------------------
# Consolidated export (any topology)
# ----------------------------------------------------------------------------------------------


FullValue = Callable[[str, torch.nn.Parameter], torch.Tensor]  # (name, param) -> whole fp32 value


def master_value(name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master weight DeepSpeed keeps for ``param`` (ZeRO 1-3), else the parameter itself."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param if full is None else full


def consolidated_state_dict(module: torch.nn.Module, value: FullValue = master_value) -> dict[str, torch.Tensor]:
    """Whole fp32 parameters of a DeepSpeed-wrapped model (collective; complete on every rank).

    ``value`` gives each parameter's whole local value: by default the optimizer's fp32 master weight
    (no bf16 rounding); ``EMA.full_value`` for the moving average. Experts are then gathered over the
    expert-parallel group in global order.
    """
    expert_owner = {
        id(p): layer
        for layer in module.modules()
        if isinstance(layer, ExpertChoiceEPLayer)
        for p in layer.experts.parameters()
    }
    state = {}
    for name, param in module.named_parameters():
        full = value(name, param).detach().float().contiguous()
        layer = expert_owner.get(id(param))
        if layer is not None and layer.ep_size > 1:
            shards = [torch.empty_like(full) for _ in range(layer.ep_size)]
            dist.all_gather(shards, full, group=layer.ep_group)
            full = torch.cat(shards)  # (E, ...) in global expert order
        state[name] = full.cpu().clone()
    return state


def export_consolidated(
    module: torch.nn.Module, cfg: Config, directory: str | Path, weights: dict[str, FullValue] | None = None
) -> Path | None:
    """Write ``config.yaml`` and one safetensors file per entry of ``weights`` (collective; rank 0 writes).

    ``weights`` maps a file name to the value function of ``consolidated_state_dict``; by default
    ``{"model.safetensors": master_value}``, the raw network.
    """
    net = module.net if hasattr(module, "net") else module
    states = {
        file: consolidated_state_dict(net, value) for file, value in (weights or {MODEL_FILE: master_value}).items()
    }
    directory = Path(directory)
    if integrity.rank_and_world()[0] != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for file, state in states.items():
        tmp = directory / (file + ".tmp")
        save_file(state, str(tmp), metadata={"format": "sedit-consolidated-v1"})
        os.replace(tmp, directory / file)
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
