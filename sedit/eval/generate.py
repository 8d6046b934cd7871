"""Sample images for a caption file from an exported checkpoint.

    python -m sedit.eval.generate --checkpoint EXPORT --captions captions_val2014.json --num 30000 \\
        --vae VAE_DIR --text-encoder TEXT_DIR --guidance 5 --steps 30 --out runs/eval/g5

Image i uses caption i and seed ``--seed + i`` (per-seed noise, so it does not depend on the batch,
the rank or the number of GPUs). Under torchrun/deepspeed/srun each rank takes the indices
i with i % WORLD_SIZE == RANK. Images are written atomically as ``images/{i:06d}.png``; a rerun skips
the ones that exist, so a killed job resumes where it stopped. ``manifest.json`` holds the settings
and, per image, file, caption, seed and reference image; a folder made with other settings is refused.
Each rank records what it wrote and skipped in ``logs/rank{r}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sedit.checkpoint import load_consolidated
from sedit.edm import EDMPrecond
from sedit.eval.captions import read_captions
from sedit.eval.files import atomic_write_bytes, dist_env, local_rank, write_json
from sedit.eval.weights import MissingWeightsError
from sedit.images import png_bytes, to_uint8
from sedit.sampling import sample_images

MANIFEST = "manifest.json"


def image_name(index: int) -> str:
    return f"images/{index:06d}.png"


def build_manifest(prompts, seed: int, settings: dict) -> dict:
    items = [
        {"index": i, "file": image_name(i), "caption": p.caption, "seed": seed + i, "reference": p.reference}
        for i, p in enumerate(prompts)
    ]
    return {"settings": settings, "items": items}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not a folder written by sedit.eval.generate)")
    return json.loads(path.read_text())


def claim_manifest(out: Path, manifest: dict) -> None:
    """Write the manifest, or check that the one already there describes the same images.

    Every rank computes the same manifest; each writes it atomically, so concurrent writers race harmlessly.
    """
    path = out / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != manifest:
            diff = {k: (existing["settings"].get(k), v) for k, v in manifest["settings"].items()}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            raise ValueError(
                f"{out}: holds images made with other settings or captions {diff or '(captions differ)'}; "
                "use a new --out folder"
            )
        return
    write_json(path, manifest)


def require_local(name: str, what: str, how: str, allow_download: bool) -> str:
    """``name`` if it points at something on this machine (a path, local-dir:PATH or ARCH:PATH); else fail now."""
    path = name.split(":", 1)[1] if ":" in name and not os.path.exists(name) else name
    if allow_download or os.path.exists(path):
        return name
    raise MissingWeightsError(f"{what} not found on this machine: {name!r}. {how} (or pass --allow-download)")


def generate(args: argparse.Namespace) -> dict:
    from sedit.data.encoders import load_encoders

    rank, world = dist_env()
    device = torch.device(args.device or (f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    vae_name = require_local(
        args.vae,
        "VAE",
        "Give a local diffusers AutoencoderKL directory (e.g. stabilityai/sdxl-vae)",
        args.allow_download,
    )
    text_name = require_local(
        args.text_encoder,
        "text encoder",
        "Give a local OpenCLIP directory (open_clip_config.json + weights) or ARCH:/path/to/weights",
        args.allow_download,
    )
    net, cfg = load_consolidated(args.checkpoint, device)
    precond = EDMPrecond(net, cfg.diffusion.sigma_data).eval().requires_grad_(False)
    vae, text = load_encoders(vae_name, text_name, cfg.model.caption_dim, device)

    resolution = args.resolution or cfg.stage.resolution
    side = args.latent_side or resolution // vae.downsample
    steps = args.steps if args.steps is not None else cfg.diffusion.sample_steps
    guidance = args.guidance if args.guidance is not None else cfg.diffusion.guidance_scale
    d = cfg.diffusion
    settings = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "captions": str(Path(args.captions).resolve()),
        "num": args.num,
        "caption_seed": args.caption_seed,
        "seed": args.seed,
        "steps": steps,
        "guidance_scale": guidance,
        "sigma_min": d.sigma_min,
        "sigma_max": d.sigma_max,
        "rho": d.rho,
        "churn": args.churn,
        "sampler": "EDM Heun (2nd order), Karras sigmas; CFG with an all-zero caption",
        "latent_shape": [cfg.model.in_channels, side, side],
        "resolution": side * vae.downsample,
        "vae": vae.describe(),
        "text_encoder": text.describe(),
        "precision": args.precision,
    }
    prompts = read_captions(args.captions, args.num, args.caption_seed)
    manifest = build_manifest(prompts, args.seed, settings)
    out.mkdir(parents=True, exist_ok=True)
    claim_manifest(out, manifest)

    mine = [item for item in manifest["items"] if item["index"] % world == rank]
    todo = [item for item in mine if not (out / item["file"]).is_file()]
    skipped = [item["index"] for item in mine if (out / item["file"]).is_file()]
    written: list[int] = []
    start = time.time()
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b : b + args.batch_size]
        images = sample_images(
            precond,
            text,
            vae,
            [item["caption"] for item in batch],
            seeds=[item["seed"] for item in batch],
            latent_shape=settings["latent_shape"],
            steps=steps,
            guidance_scale=guidance,
            diffusion=d,
            churn=args.churn,
            precision=args.precision,
        )  # (N, 3, H, W) in [-1, 1]
        for item, pixels in zip(batch, to_uint8(images), strict=True):
            atomic_write_bytes(out / item["file"], png_bytes(pixels))
            written.append(item["index"])
        if rank == 0:
            done = len(written)
            rate = done / max(time.time() - start, 1e-9)
            print(f"[generate] rank 0: {done}/{len(todo)} images ({rate:.2f} img/s)", flush=True)
    log = {"rank": rank, "world_size": world, "written": written, "skipped": skipped, "seconds": time.time() - start}
    write_json(out / "logs" / f"rank{rank}.json", log)
    return log


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sedit.eval.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="export directory (model.safetensors + config.yaml)")
    p.add_argument("--captions", required=True, help="COCO caption JSON (captions_val2014.json) or text file")
    p.add_argument("--num", type=int, default=None, help="number of captions/images (default: all)")
    p.add_argument("--caption-seed", type=int, default=0, help="seed of the COCO caption selection")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed SEED + i")
    p.add_argument("--steps", type=int, default=None, help="Heun steps (default: the config's, 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: config's)")
    p.add_argument("--churn", type=float, default=0.0, help="EDM S_churn (0: deterministic)")
    p.add_argument("--vae", required=True, help="local AutoencoderKL directory (the SDXL VAE for sedit runs)")
    p.add_argument("--text-encoder", required=True, help="local OpenCLIP directory or ARCH:/path/to/weights")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: stage.resolution)")
    p.add_argument("--latent-side", type=int, default=None, help="latent side (default: resolution / VAE downsampling)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampler call and rank")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 runs the networks in autocast")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--allow-download", action="store_true", help="let --vae/--text-encoder be model-hub names")
    p.add_argument("--out", required=True, help="output folder (images/, manifest.json, logs/)")
    return p


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        log = generate(args)
        print(json.dumps({k: log[k] for k in ("rank", "world_size", "seconds")} | {"written": len(log["written"])}))
    except MissingWeightsError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
