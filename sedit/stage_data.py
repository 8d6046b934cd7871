"""Where a stage's batches come from: prepared shards (``stage.data: DIR``) or random tensors (``synthetic``).

Both sources yield ``{"latents": (N, C, h, w), "captions": (N, L, W), "dropped": (N,) bool}`` on the
CPU, with caption dropout already applied, and both carry a position (``state_dict``) that a
checkpoint stores per rank so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sedit.config import Config, ConfigError
from sedit.data import shards as fmt
from sedit.edm import drop_captions

SYNTHETIC = "synthetic"


def check_prepared(cfg: Config, source: str = "config") -> dict:
    """The manifest of ``stage.data``, checked against the model and stage; errors name both sides."""
    stage, model = cfg.stage, cfg.model
    key = f"{source}: stage.data: {stage.data}"
    try:
        manifest = fmt.read_manifest(stage.data)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
    latents = manifest["latents"]
    if str(stage.resolution) not in latents:
        raise ConfigError(f"{key}: no latents at stage.resolution {stage.resolution} (prepared: {', '.join(latents)})")
    channels, height, width = latents[str(stage.resolution)]["shape"]
    side = stage.resolution // stage.latent_downsample
    if (height, width) != (side, side):
        raise ConfigError(
            f"{key}: latents are {height}x{width} at {stage.resolution}px but stage.latent_downsample "
            f"{stage.latent_downsample} gives {side}x{side} (the VAE downsamples by {manifest['vae']['downsample']})"
        )
    if channels != model.in_channels:
        raise ConfigError(f"{key}: latents have {channels} channels, model.in_channels is {model.in_channels}")
    length, dim = manifest["text"]["tokens_shape"]
    if (length, dim) != (model.caption_len, model.caption_dim):
        raise ConfigError(
            f"{key}: text tokens are ({length}, {dim}) but the model expects model.caption_len "
            f"{model.caption_len} x model.caption_dim {model.caption_dim}"
        )
    return manifest


class SyntheticBatches:
    """Random latents (std sigma_data) and caption embeddings; for smoke tests and benchmarks only.

    Drawn on ``device`` (the training GPU), so that benchmarks time the model, not the host's random
    number generator (an XL batch holds ~10M caption values).
    """

    def __init__(self, cfg: Config, rank: int, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.stage.seed * 1000 + rank)

    def __iter__(self) -> Iterator[dict]:
        cfg, g, device = self.cfg, self.generator, self.device
        side = cfg.stage.resolution // cfg.stage.latent_downsample
        n = cfg.stage.micro_batch
        while True:
            latents = torch.randn(n, cfg.model.in_channels, side, side, generator=g, device=device)
            latents = latents * cfg.diffusion.sigma_data
            captions = torch.randn(n, cfg.model.caption_len, cfg.model.caption_dim, generator=g, device=device)
            keep = drop_captions(torch.ones(n, 1, 1, device=device), cfg.stage.caption_dropout, g)[:, 0, 0]  # (N,)
            yield {"latents": latents, "captions": captions * keep[:, None, None], "dropped": keep == 0}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def training_batches(
    cfg: Config, rank: int, world_size: int, pin_memory: bool = False, device: torch.device | str = "cpu"
):
    """The stage's batch source for this rank (iterable, with ``state_dict``/``load_state_dict``);
    synthetic batches are drawn on ``device``, prepared ones arrive on the host."""
    if cfg.stage.data == SYNTHETIC:
        return SyntheticBatches(cfg, rank, device)
    from sedit.data.loader import LatentLoader

    stage = cfg.stage
    return LatentLoader(
        stage.data,
        resolution=stage.resolution,
        batch_size=stage.micro_batch,
        num_workers=stage.num_workers,
        seed=stage.seed,
        shuffle_buffer=stage.shuffle_buffer,
        caption_dropout=stage.caption_dropout,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )


def data_captions(cfg: Config, count: int) -> tuple[list[str], torch.Tensor]:
    """``count`` captions of the prepared data with their text tokens, spread over the shards.

    The first ceil(count / shards) samples of each shard in manifest order, so the prompts come from
    across the data set (not only its first shard) and are the same on every run.
    """
    from sedit.data.loader import list_shards, read_tar

    texts, tokens = [], []
    shards, _ = list_shards(cfg.stage.data)
    per_shard = -(-count // max(1, len(shards)))
    for shard in shards:
        samples = read_tar(shard.url, {"txt", fmt.TOKENS_FIELD})
        for sample, _ in zip(samples, range(per_shard), strict=False):
            texts.append(sample["txt"].decode("utf-8"))
            tokens.append(torch.from_numpy(fmt.npy_load(sample[fmt.TOKENS_FIELD]).astype(np.float32)))
        if len(texts) >= count:
            break
    if not texts:
        raise ConfigError(f"stage.data: {cfg.stage.data}: no samples to take sample-grid captions from")
    return texts[:count], torch.stack(tokens[:count])


def prompt_lines(path: str | Path, count: int) -> list[str]:
    """The first ``count`` non-empty lines of a prompt file."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as err:
        raise ConfigError(f"stage.sample_prompts: {path}: {err.strerror}") from None
    prompts = [line for line in lines if line][:count]
    if not prompts:
        raise ConfigError(f"stage.sample_prompts: {path}: no prompts (one per line)")
    return prompts
