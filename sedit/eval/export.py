"""Load an exported checkpoint: ``model.safetensors`` (SparseDiT state dict, fp32) + ``config.yaml``.

A stand-in for main's ``sedit.checkpoint.load_consolidated`` until the branches meet.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from sedit.config import Config, build_config
from sedit.edm import EDMPrecond
from sedit.model import build_model


def load_export(path: str | Path, device: torch.device | str = "cpu") -> tuple[EDMPrecond, Config]:
    """(EDM-preconditioned denoiser in eval mode, the run config) from an export directory."""
    path = Path(path)
    config_file, weights = path / "config.yaml", path / "model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{path}: not an export directory (missing {f.name})")
    cfg = build_config(yaml.safe_load(config_file.read_text()) or {}, source=str(config_file))
    net = build_model(cfg.model)
    net.load_state_dict(load_file(str(weights)), strict=True)
    return EDMPrecond(net, cfg.diffusion.sigma_data).to(device).eval().requires_grad_(False), cfg
