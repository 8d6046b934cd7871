"""Typed, validated configuration: YAML in, dataclasses inside.

Every section is a dataclass whose fields carry a docstring-style comment. ``from_dict`` refuses
unknown keys and wrong types with an error that names the full dotted key, so a typo in a stage
file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of the sparse diffusion transformer (DESIGN.md §1). Presets live in ``sedit.presets``."""

    width: int = 1024  # backbone width D
    depth: int = 28  # backbone blocks
    head_dim: int = 64  # attention head size (self- and cross-attention)
    attn_ratio: tuple[float, float] = (0.5, 1.0)  # self-attention width / D, first -> last block
    ffn_ratio: tuple[float, float] = (0.5, 4.0)  # FFN hidden / D, first -> last block
    ffn_multiple: int = 256  # FFN hidden sizes are rounded to multiples of this
    mixer_width: int = 768  # patch-mixer width
    mixer_depth: int = 6  # patch-mixer blocks (run on all tokens, before masking)
    mixer_ffn_ratio: float = 4.0  # patch-mixer FFN hidden / mixer width
    num_experts: int = 8  # experts per MoE layer
    capacity: float = 2.0  # expert-choice capacity factor: each expert takes capacity*T/E tokens
    moe_every: int = 2  # FFNs of blocks 1, 3, 5, ... are MoE (never the last backbone block)
    expert_gated: bool = True  # SwiGLU experts (DeepSpeed's expert kernels); False: 2-layer GELU MLPs
    in_channels: int = 4  # latent channels
    patch_size: int = 2
    base_grid: int = 16  # token grid whose position coordinates define the reference range
    caption_dim: int = 1024  # text-encoder token width
    caption_len: int = 77  # text-encoder tokens per caption
    freq_dim: int = 256  # sinusoidal noise-level embedding size
    norm_eps: float = 1e-6

    def validate(self, prefix: str = "model") -> None:
        _require(self.width % self.head_dim == 0, f"{prefix}.width", "must be a multiple of head_dim")
        _require(self.mixer_width % self.head_dim == 0, f"{prefix}.mixer_width", "must be a multiple of head_dim")
        _require(self.depth >= 1, f"{prefix}.depth", "must be >= 1")
        _require(self.mixer_depth >= 0, f"{prefix}.mixer_depth", "must be >= 0")
        _require(self.num_experts >= 1, f"{prefix}.num_experts", "must be >= 1")
        _require(0 < self.capacity <= self.num_experts, f"{prefix}.capacity", "must be in (0, num_experts]")
        _require(self.moe_every >= 0, f"{prefix}.moe_every", "must be >= 0 (0 disables MoE)")
        for name in ("attn_ratio", "ffn_ratio"):
            lo, hi = getattr(self, name)
            _require(0 < lo and 0 < hi, f"{prefix}.{name}", "ratios must be positive")


@dataclass
class DiffusionConfig:
    """EDM training and sampling settings (DESIGN.md §2)."""

    sigma_data: float = 0.9  # standard deviation of the (scaled) latents
    p_mean: float = -0.6  # ln(sigma) ~ N(p_mean, p_std^2) during training
    p_std: float = 1.2
    sigma_min: float = 0.002  # sampler noise range
    sigma_max: float = 80.0
    rho: float = 7.0  # Karras schedule exponent
    sample_steps: int = 30  # Heun steps (2*steps - 1 network evaluations)
    guidance_scale: float = 5.0  # classifier-free guidance; 1 disables it
    churn: float = 0.0  # EDM S_churn (0: deterministic sampler)

    def validate(self, prefix: str = "diffusion") -> None:
        _require(self.sigma_data > 0, f"{prefix}.sigma_data", "must be > 0")
        _require(self.p_std > 0, f"{prefix}.p_std", "must be > 0")
        _require(0 < self.sigma_min < self.sigma_max, f"{prefix}.sigma_min", "need 0 < sigma_min < sigma_max")
        _require(self.sample_steps >= 1, f"{prefix}.sample_steps", "must be >= 1")
        _require(self.churn >= 0, f"{prefix}.churn", "must be >= 0")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class StageConfig:
    """One training stage (DESIGN.md §3). Stage files hold only their differences from defaults."""

    name: str = "stage"
    resolution: int = 256  # image resolution in pixels; latent side = resolution / latent_downsample
    latent_downsample: int = 8  # VAE spatial downsampling (1 for pixel-space data)
    mask_ratio: float = 0.75  # fraction of patches dropped after the patch-mixer
    steps: int = 1000
    lr: float = 2.4e-4
    lr_final: float = 8e-5  # cosine decay ends here
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.25
    micro_batch: int = 32  # per device
    global_batch: int = 2048  # micro_batch * world_size * grad_accum
    caption_dropout: float = 0.1  # probability of an all-zero caption (for classifier-free guidance)
    ema_decay: float = 0.0  # 0 disables EMA
    ema_start: int = 0  # step at which EMA starts tracking
    seed: int = 0
    compile: bool = False  # torch.compile the model (the engine's compile()); the first steps pay for compiling
    compile_mode: str = "default"  # torch.compile mode; 'reduce-overhead' adds CUDA graphs (flat engine)
    data: str = ""  # directory of prepared shards (sedit.data.prepare), or 'synthetic'
    num_workers: int = 2  # data-loader worker processes per rank
    shuffle_buffer: int = 1000  # samples in each loader worker's shuffle buffer
    init_from: str = ""  # a previous stage's final/ export whose weights start this stage (fresh optimizer)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2  # newest complete checkpoints kept (>= 2 so a corrupt newest one has a fallback)
    checkpoint_export: bool = True  # whole fp32 weights (+ EMA) in each checkpoint for sedit.generate; XL: +9 GB
    sample_every: int = 1000  # 0 disables sample grids during training
    sample_prompts: str = ""  # text file, one prompt per line; empty: the first captions of the data
    sample_count: int = 8  # images in each sample grid
    log_every: int = 10
    wandb: str = "offline"  # 'offline' (files under the run dir), 'online', or 'disabled'
    wandb_project: str = "sedit"

    def splits_over(self, world_size: int) -> bool:
        """Whether global_batch is a whole number of micro-batches on every one of ``world_size`` processes."""
        return self.global_batch % (self.micro_batch * world_size) == 0

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step so that micro_batch * world_size * accumulation == global_batch."""
        per_step = self.micro_batch * world_size
        if not self.splits_over(world_size):
            raise ConfigError(
                f"stage.global_batch: {self.global_batch} is not a multiple of micro_batch {self.micro_batch} x "
                f"{world_size} processes = {per_step}"
            )
        return self.global_batch // per_step

    def validate(self, prefix: str = "stage") -> None:
        _require(self.resolution > 0, f"{prefix}.resolution", "must be > 0")
        _require(0.0 <= self.mask_ratio < 1.0, f"{prefix}.mask_ratio", "must be in [0, 1)")
        _require(self.steps >= 0, f"{prefix}.steps", "must be >= 0")
        _require(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _require(self.micro_batch >= 1, f"{prefix}.micro_batch", "must be >= 1")
        _require(self.global_batch >= self.micro_batch, f"{prefix}.global_batch", "must be >= micro_batch")
        _require(0.0 <= self.caption_dropout <= 1.0, f"{prefix}.caption_dropout", "must be in [0, 1]")
        _require(0.0 <= self.ema_decay < 1.0, f"{prefix}.ema_decay", "must be in [0, 1)")
        _require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.ema_start >= 0, f"{prefix}.ema_start", "must be >= 0")
        _require(self.num_workers >= 0, f"{prefix}.num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 1, f"{prefix}.shuffle_buffer", "must be >= 1")
        _require(self.checkpoint_every >= 1, f"{prefix}.checkpoint_every", "must be >= 1")
        _require(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", "must be >= 1")
        _require(self.sample_every >= 0, f"{prefix}.sample_every", "must be >= 0 (0 disables sampling)")
        _require(self.sample_count >= 1, f"{prefix}.sample_count", "must be >= 1")
        _require(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _require(self.compile_mode in COMPILE_MODES, f"{prefix}.compile_mode", f"must be one of {list(COMPILE_MODES)}")
        _require(
            self.wandb in ("offline", "online", "disabled"), f"{prefix}.wandb", "must be offline, online or disabled"
        )


@dataclass
class Config:
    """A full run: model shape, diffusion settings and one stage."""

    preset: str = ""  # name in sedit.presets.PRESETS; explicit model keys override it
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def validate(self) -> None:
        self.model.validate("model")
        self.diffusion.validate("diffusion")
        self.stage.validate("stage")
        latent = self.stage.resolution // self.stage.latent_downsample
        _require(
            self.stage.resolution % self.stage.latent_downsample == 0 and latent % self.model.patch_size == 0,
            "stage.resolution",
            f"{self.stage.resolution}px / {self.stage.latent_downsample} must be a multiple of patch_size "
            f"{self.model.patch_size}",
        )


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _check_value(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` converted to ``hint`` where lossless (int -> float, list -> tuple), else raise."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(hint, value, key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it is meant as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(f"{dotted}: unknown key (known keys: {', '.join(names)})")
        kwargs[key] = _check_value(value, hints[key], dotted)
    return cls(**kwargs)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file; a file may name ``inherit: other.yaml`` (relative) to start from another."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = data.pop("inherit", None)
    if parent is not None:
        data = merge(load_yaml(path.parent / parent), data)
    return data


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Resolve a raw mapping (preset first, then explicit keys) into a validated ``Config``."""
    from sedit.presets import PRESETS

    preset = data.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"{source}: preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        model = dataclasses.asdict(PRESETS[preset])
        data = merge({"model": model}, data)
    try:
        cfg = from_dict(Config, data)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load, merge overrides into, and validate a run config file."""
    data = load_yaml(path)
    if overrides:
        data = merge(data, overrides)
    return build_config(data, str(path))


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``stage.lr=1e-4`` into ``{'stage': {'lr': 1e-4}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain mapping of a config (tuples as lists) for saving next to a run."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))
