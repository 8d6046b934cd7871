"""Sample grids during training: the same prompts and noise seeds every time, so grids compare.

Prompts come from ``stage.sample_prompts`` (encoded once with the text encoder the data was prepared
with) or, by default, are the first ``stage.sample_count`` captions of the prepared data. Every rank
runs the sampler (ZeRO-3 and expert parallelism need all ranks in each forward); rank 0 decodes with
the data's VAE and writes ``samples/step_NNNNNNN.png``. The grid shows the current (not the EMA)
weights; the stage's final export and ``python -m sedit.generate`` show the EMA ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from sedit.config import Config
from sedit.images import save_grid
from sedit.sampling import generate_latents
from sedit.stage_data import SYNTHETIC, data_captions, prompt_lines

log = logging.getLogger(__name__)


def _broadcast(obj, device: torch.device):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


class SampleGrid:
    """Writes a grid of ``stage.sample_count`` images for fixed prompts (collective ``write``)."""

    def __init__(self, cfg: Config, out: Path, device: torch.device, main: bool):
        self.cfg, self.out, self.device, self.main = cfg, Path(out), device, main
        self.enabled = cfg.stage.sample_every > 0 and cfg.stage.data != SYNTHETIC
        self.vae = None
        if not self.enabled:
            return
        prompts = None
        if main:
            prompts = self._prompts()
        self.texts, tokens = _broadcast(prompts, device)
        self.tokens = tokens.to(device)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "prompts.json").write_text(json.dumps(self.texts, indent=1, ensure_ascii=False) + "\n")
            self.vae = self._load_vae()

    def _prompts(self) -> tuple[list[str], torch.Tensor]:
        stage = self.cfg.stage
        if not stage.sample_prompts:
            return data_captions(self.cfg, stage.sample_count)
        from sedit.data import read_manifest
        from sedit.data.encoders import load_text_encoder

        texts = prompt_lines(stage.sample_prompts, stage.sample_count)
        encoder = load_text_encoder(read_manifest(stage.data)["text_encoder"]["name"], device="cpu")
        tokens, _ = encoder.encode(texts)
        return texts, tokens.float().cpu()

    def _load_vae(self):
        from sedit.data import read_manifest
        from sedit.data.encoders import load_vae

        name = read_manifest(self.cfg.stage.data)["vae"]["name"]
        try:
            return load_vae(name, device=self.device)
        except Exception as err:  # a VAE we cannot load must not stop training; say so once
            log.warning("sample grids: cannot load the VAE %r (%s); writing latents only", name, err)
            return None

    @torch.no_grad()
    def write(self, precond: torch.nn.Module, step: int, dtype: torch.dtype) -> Path | None:
        """Sample with ``precond``'s current weights and write the grid on rank 0 (collective)."""
        if not self.enabled:
            return None
        cfg, d = self.cfg, self.cfg.diffusion
        side = cfg.stage.resolution // cfg.stage.latent_downsample
        latents = generate_latents(
            precond,
            self.tokens,
            seeds=list(range(len(self.texts))),
            latent_shape=(cfg.model.in_channels, side, side),
            steps=d.sample_steps,
            guidance_scale=d.guidance_scale,
            sigma_min=d.sigma_min,
            sigma_max=d.sigma_max,
            rho=d.rho,
            dtype=dtype,
        )
        if not self.main:
            return None
        path = self.out / f"step_{step:07d}.png"
        if self.vae is None:
            torch.save(latents.cpu(), path.with_suffix(".latents.pt"))
            return path.with_suffix(".latents.pt")
        save_grid(self.vae.decode(latents.float()), path, nrow=min(len(self.texts), 8), min_side=128)
        return path
