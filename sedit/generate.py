"""Sample images from a trained model for a few prompts.

    python -m sedit.generate --ckpt runs/x/stage1 --prompt "a red apple" --steps 30 --cfg 5 --out apple.png
    python -m sedit.generate --ckpt runs/x/stage1 --prompts-file prompts.txt --out samples/

``--ckpt`` takes any stage's output: an export directory (``config.yaml`` + ``model.safetensors``,
e.g. ``runs/x/stage1/final/``), a run directory (its ``final/``, else the export of the checkpoint
named by ``checkpoints/latest``) or a checkpoint tag directory (its ``export/``). EMA weights
(``ema.safetensors``) are used when the export has them, unless ``--weights raw``.

Prompts are encoded with the text encoder the training data was prepared with and latents decoded
with its VAE, both read from the manifest of the config's ``stage.data`` unless ``--vae`` and
``--text-encoder`` are given. Image i uses noise seed ``--seed + i``, so (with the deterministic sampler,
``diffusion.churn: 0``, the default) it does not depend on the batch it is drawn in.

Output: ``--out FILE.png`` writes the image of one prompt, or a grid of several; ``--out DIR`` writes
``0000.png``, ``0001.png``, ... plus ``grid.png`` and ``prompts.json`` (index, file, prompt and seed
of each image, and the settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sedit.checkpoint import load_consolidated, resolve_export
from sedit.config import Config
from sedit.edm import EDMPrecond
from sedit.eval.generate import require_local
from sedit.files import atomic_write_bytes, atomic_write_text
from sedit.images import png_bytes, save_grid, to_uint8
from sedit.sampling import sample_images

ENCODER_HINT = "Pass --vae and --text-encoder (local folders of the encoders the training data was prepared with)"


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the non-blank lines of ``--prompts-file``."""
    prompts = list(prompts)
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def encoder_names(cfg: Config, vae: str | None, text_encoder: str | None) -> tuple[str, str]:
    """(VAE, text encoder) names: the ones given, else those in the manifest of ``stage.data``."""
    if vae and text_encoder:
        return vae, text_encoder
    from sedit.data.shards import read_manifest

    data = cfg.stage.data
    if not data or data == "synthetic":
        raise FileNotFoundError(f"the checkpoint's stage.data is {data!r}, which names no encoders. {ENCODER_HINT}")
    try:
        manifest = read_manifest(data)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"cannot read the encoders of stage.data: {err}. {ENCODER_HINT}") from None
    return vae or manifest["vae"]["name"], text_encoder or manifest["text_encoder"]["name"]


def is_png_file(out: Path) -> bool:
    """``--out`` names one PNG file (else it is a directory)."""
    return out.suffix.lower() == ".png"


def output_files(out: Path, count: int) -> tuple[list[Path | None], Path | None]:
    """(path of each image or None, grid path or None) for ``--out``."""
    if is_png_file(out):
        return ([out], None) if count == 1 else ([None] * count, out)
    return [out / f"{i:04d}.png" for i in range(count)], out / "grid.png"


def generate(args: argparse.Namespace) -> list[Path]:
    """Sample every prompt and write the files; returns the paths written."""
    from sedit.data.encoders import load_encoders

    prompts = read_prompts(args.prompt, args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    export, weights_file = resolve_export(args.ckpt, args.weights)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, cfg = load_consolidated(export, device, weights_file)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data).eval().requires_grad_(False)

    vae_name, text_name = encoder_names(cfg, args.vae, args.text_encoder)
    vae_name = require_local(vae_name, "VAE", ENCODER_HINT, args.allow_download)
    text_name = require_local(text_name, "text encoder", ENCODER_HINT, args.allow_download)
    vae, text = load_encoders(vae_name, text_name, cfg.model.caption_dim, device)

    resolution = args.resolution or cfg.stage.resolution
    side = resolution // vae.downsample
    if resolution % vae.downsample or side % cfg.model.patch_size:
        raise ValueError(
            f"--resolution {resolution}: must be a multiple of the VAE downsampling {vae.downsample} "
            f"times the patch size {cfg.model.patch_size}"
        )
    steps = args.steps if args.steps is not None else cfg.diffusion.sample_steps
    guidance = args.cfg if args.cfg is not None else cfg.diffusion.guidance_scale
    seeds = [args.seed + i for i in range(len(prompts))]

    batches = []
    for b in range(0, len(prompts), args.batch_size):
        batches.append(
            sample_images(
                precond,
                text,
                vae,
                prompts[b : b + args.batch_size],
                seeds=seeds[b : b + args.batch_size],
                latent_shape=[cfg.model.in_channels, side, side],
                steps=steps,
                guidance_scale=guidance,
                diffusion=cfg.diffusion,
                churn=cfg.diffusion.churn,
                precision=args.precision,
            )  # (B, 3, H, W) in [-1, 1]
        )
    images = torch.cat(batches).cpu()  # (N, 3, H, W)

    out = Path(args.out)
    files, grid = output_files(out, len(prompts))
    written = []
    for path, pixels in zip(files, to_uint8(images), strict=True):
        if path is not None:
            written.append(atomic_write_bytes(path, png_bytes(pixels)))
    if grid is not None:
        written.append(save_grid(images, grid))
    if not is_png_file(out):
        record = {
            "checkpoint": str(export),
            "weights": weights_file,
            "steps": steps,
            "guidance_scale": guidance,
            "resolution": side * vae.downsample,
            "vae": vae_name,
            "text_encoder": text_name,
            "images": [
                {"index": i, "file": path.name, "prompt": prompt, "seed": seed}
                for i, (path, prompt, seed) in enumerate(zip(files, prompts, seeds, strict=True))
            ],
        }
        written.append(atomic_write_text(out / "prompts.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n"))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sedit.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="export directory, run directory or checkpoint tag directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line (blank lines ignored)")
    p.add_argument("--steps", type=int, default=None, help="Heun steps (default: the config's diffusion.sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: diffusion.guidance_scale)")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed SEED + i")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: stage.resolution)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler call")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder (default: the one named by stage.data)")
    p.add_argument("--text-encoder", default=None, help="OpenCLIP folder or ARCH:FILE (default: stage.data's)")
    p.add_argument("--allow-download", action="store_true", help="let the encoders be model-hub names")
    p.add_argument("--weights", choices=["ema", "raw"], default=None, help="default: ema when the export has it")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 runs the networks in autocast")
    p.add_argument("--out", required=True, help="FILE.png (one image, or a grid of several) or a directory")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("error: --batch-size must be >= 1")
    try:
        written = generate(args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
