"""The two frozen encoders: an ``AutoencoderKL`` for image latents and an OpenCLIP text tower for captions.

Both load from a model-hub name or from a local directory, with no network needed for local ones:

- ``load_vae("stabilityai/stable-diffusion-xl-base-1.0/vae")`` (hub repository + subfolder),
  ``load_vae("stabilityai/sdxl-vae")`` or ``load_vae("/path/to/dir")``: any ``diffusers`` AutoencoderKL
  directory (``config.json`` + weights, as written by ``save_pretrained``).
- ``load_text_encoder("hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")``, ``load_text_encoder("/path/to/dir")``
  (a directory with ``open_clip_config.json`` + ``open_clip_model.safetensors``, the layout of OpenCLIP
  hub repositories, loaded through OpenCLIP's ``local-dir:`` schema) or
  ``load_text_encoder("ViT-H-14-378-quickgelu:/path/to/weights.bin")`` (a built-in OpenCLIP architecture
  plus a local weights file or a pretrained tag).

Text features follow the reference: ``tokens`` are all 77 per-token outputs of the text transformer
after its final LayerNorm, ``pooled`` is OpenCLIP's own ``encode_text`` output (the end-of-text token,
projected, not normalised). ``save_tiny_vae`` / ``save_tiny_text_encoder`` write small randomly
initialised encoders of the same classes, for tests and the built-in dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from sedit.sampling import seeded_noise

DEFAULT_VAE = "stabilityai/stable-diffusion-xl-base-1.0/vae"
DEFAULT_TEXT_ENCODER = "hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"

# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


class VAE:
    """An AutoencoderKL whose latents are in diffusion space: z = (sample - shift) * scaling_factor."""

    def __init__(self, model: AutoencoderKL, name: str):
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.scaling_factor = float(model.config.scaling_factor)
        self.shift_factor = float(model.config.shift_factor or 0.0)
        self.latent_channels = int(model.config.latent_channels)
        self.downsample = 2 ** (len(model.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, seeds: Sequence[int] | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> latents (N, C, H/f, W/f), sampled from the latent distribution.

        With ``seeds``, latent k uses noise drawn from seed k alone (independent of batching and device).
        """
        dist = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        if seeds is not None:
            noise = seeded_noise(seeds, dist.mean.shape[1:], self.device).to(dist.mean.dtype)  # (N, C, h, w)
            z = dist.mean + dist.std * noise
        else:
            z = dist.sample(generator)
        return ((z.float() - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) in diffusion space -> images (N, 3, h*f, w*f), clamped to [-1, 1]."""
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.model.decode(z.to(self.device, self.dtype)).sample.float().clamp(-1, 1)

    def describe(self) -> dict:
        """What the manifest records about this VAE."""
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }


def load_vae(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """Load an AutoencoderKL from a local directory, a hub repository id, or ``org/repo/subfolder`` for a
    VAE inside a pipeline repository (the default, ``stabilityai/stable-diffusion-xl-base-1.0/vae``, is
    the SDXL VAE the reference used). The SDXL VAE overflows in float16: keep float32 or bfloat16.
    """
    name = str(name_or_path)
    repo, subfolder = name, None
    if not os.path.isdir(name) and name.count("/") >= 2:
        org, repo_name, subfolder = name.split("/", 2)
        repo = f"{org}/{repo_name}"
    model = AutoencoderKL.from_pretrained(repo, subfolder=subfolder, torch_dtype=dtype, low_cpu_mem_usage=False)
    return VAE(model.to(device), name)


def save_tiny_vae(
    path: str | Path,
    block_out_channels: Sequence[int] = (8, 16, 16),
    scaling_factor: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised AutoencoderKL with 4 latent channels and downsampling
    2**(len(block_out_channels) - 1) (4 by default: 32px images -> 8x8 latents)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tiny_vae_model(block_out_channels, scaling_factor)
    model.save_pretrained(str(path))
    return Path(path)


def tiny_vae_model(block_out_channels: Sequence[int] = (8, 16, 16), scaling_factor: float = 1.0) -> AutoencoderKL:
    """A small AutoencoderKL (no mid-block attention, one ResNet layer per block, GroupNorm of 8 groups)."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        scaling_factor=scaling_factor,
    )


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------


class TextEncoder:
    """OpenCLIP text tower: captions -> (per-token features (N, L, W), pooled feature (N, E))."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], name: str):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in .text; CLIP inlines it
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError(f"{name}: text towers with a CLS token (CoCa) pool before the final LayerNorm")
        self._final_norm = text.ln_final
        self.context_length = int(text.context_length)
        self.width = int(self._final_norm.normalized_shape[0])
        self.pooled_dim = int(model.encode_text(self._tokenize([""])).shape[-1])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions)).to(self.device)  # (N, L) token ids

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (N, L, W), pooled (N, E)), float32. L is the context length (77 for CLIP)."""
        captured: list[torch.Tensor] = []
        hook = self._final_norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pooled = self.model.encode_text(self._tokenize(captions))  # (N, E)
        finally:
            hook.remove()
        tokens = captured[0]  # (N, L, W): output of the final LayerNorm, all positions
        return tokens.float(), pooled.float()

    def describe(self) -> dict:
        """What the manifest records about this text encoder."""
        return {
            "name": self.name,
            "width": self.width,
            "pooled_dim": self.pooled_dim,
            "context_length": self.context_length,
        }


def _open_clip_identifier(name_or_path: str) -> tuple[str, str | None]:
    """Map our names to OpenCLIP's (model_name, pretrained) pair."""
    if os.path.isdir(name_or_path):
        return f"local-dir:{name_or_path}", None
    if name_or_path.startswith(("hf-hub:", "local-dir:")):
        return name_or_path, None
    if ":" in name_or_path:
        arch, pretrained = name_or_path.split(":", 1)
        return arch, pretrained
    raise ValueError(
        f"text encoder {name_or_path!r}: expected a local directory, 'hf-hub:org/repo', "
        "'local-dir:/path' or 'ARCH:WEIGHTS' (a built-in OpenCLIP architecture and a weights file or tag)"
    )


def load_text_encoder(
    name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoder:
    """Load an OpenCLIP model and its tokenizer; see the module docstring for accepted names."""
    model_name, pretrained = _open_clip_identifier(str(name_or_path))
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    model = open_clip.create_model(
        model_name, pretrained=pretrained, device=device, precision=precision, require_pretrained=True
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return TextEncoder(model, tokenizer, str(name_or_path))


def load_encoders(
    vae: str, text_encoder: str, caption_dim: int, device: torch.device | str = "cpu"
) -> tuple[VAE, TextEncoder]:
    """The VAE and text encoder a model samples with; the text width must be the model's caption_dim."""
    text = load_text_encoder(text_encoder, device=device)
    if text.width != caption_dim:
        raise ValueError(
            f"text encoder {text_encoder!r} has width {text.width} but the model's caption_dim is {caption_dim}; "
            "use the text encoder the training data was prepared with"
        )
    return load_vae(vae, device=device), text


def tiny_open_clip_config(width: int = 32, layers: int = 2, heads: int = 2) -> dict:
    """OpenCLIP model config of a tiny CLIP: text tower ``width`` wide with CLIP's 77-token context and
    49408-token BPE vocabulary (OpenCLIP's bundled SimpleTokenizer, so no tokenizer download), and a
    one-layer 32px vision tower that exists only because the CLIP class requires one."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers},
    }


def save_tiny_text_encoder(path: str | Path, width: int = 32, seed: int = 0) -> Path:
    """Write a randomly initialised tiny OpenCLIP model in the hub-repository layout that
    ``load_text_encoder(path)`` reads: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_open_clip_config(width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    return path
