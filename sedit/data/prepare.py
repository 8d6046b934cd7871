"""Prepare tool: images + captions -> webdataset shards of VAE latents and text embeddings.

    python -m sedit.data.prepare --folder photos/ --out data/photos --resolutions 256 512
    python -m sedit.data.prepare --tars 'raw/{00000..00099}.tar' --out data/raw
    python -m sedit.data.prepare --coco-json captions_train2017.json --coco-images train2017/ --out data/coco
    torchrun --nproc_per_node 8 -m sedit.data.prepare ...      # every GPU of a node

Inputs are listed in a fixed order and cut into shards of ``--shard-size`` inputs; rank r of a launch of
W processes encodes shards r, r+W, r+2W, ... on its own device. A shard is finished once its record
``shard-NNNNNN.json`` exists (the tar is renamed into place first), so a rerun with the same settings
skips finished shards and redoes only unfinished ones. Unreadable images, images smaller than the largest
resolution and empty captions are skipped, counted by reason in ``manifest.json`` and listed in
``skipped.jsonl``; they never stop the run. The last rank to finish writes the manifest.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from sedit.data import shards
from sedit.data.encoders import DEFAULT_TEXT_ENCODER, DEFAULT_VAE, VAE, TextEncoder, load_text_encoder, load_vae
from sedit.data.images import BadInput, square_crops, to_tensor
from sedit.data.sources import InputItem, coco_items, folder_items, read_caption, read_image, tar_items
from sedit.data.topology import local_device, rank_and_world
from sedit.files import atomic_write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Loaded:
    """An input that passed every check, decoded and cropped at each resolution."""

    item: InputItem
    caption: str
    crops: dict[int, np.ndarray]  # resolution -> (R, R, 3) uint8
    size: tuple[int, int]  # original (width, height)


@dataclass
class Skipped:
    item: InputItem
    reason: str
    detail: str


def load_input(item: InputItem, resolutions: Sequence[int]) -> Loaded | Skipped:
    """Read and check one input (caption first: it is cheaper than decoding the image)."""
    try:
        caption = read_caption(item)
        crops, size = square_crops(read_image(item), resolutions)
    except BadInput as bad:
        return Skipped(item, bad.reason, bad.detail)
    return Loaded(item, caption, crops, size)


def latent_seed(seed: int, key: str, resolution: int) -> int:
    """Seed of the noise that samples this latent: the same on every rank, batch and rerun."""
    return zlib.crc32(f"{seed}/{key}/{resolution}".encode())


def _batches(
    items: Sequence[InputItem], resolutions: Sequence[int], batch_size: int, pool: ThreadPoolExecutor
) -> Iterator[list[Loaded | Skipped]]:
    """Loaded batches in input order; the next batch is read by the pool while this one is encoded."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def submit(chunk: Sequence[InputItem]) -> list[Future]:
        return [pool.submit(load_input, item, resolutions) for item in chunk]

    ahead = submit(chunks[0]) if chunks else []
    for i in range(len(chunks)):
        current, ahead = ahead, (submit(chunks[i + 1]) if i + 1 < len(chunks) else [])
        yield [f.result() for f in current]


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------


def encoders_info(vae: VAE, text: TextEncoder, resolutions: Sequence[int]) -> dict:
    """Encoder descriptions and the per-sample array shapes they produce."""
    f, c = vae.downsample, vae.latent_channels
    return {
        "vae": vae.describe(),
        "text_encoder": text.describe(),
        "latents": {
            str(r): {"field": shards.latent_field(r), "shape": [c, r // f, r // f], "dtype": "float16"}
            for r in resolutions
        },
        "text": {
            "tokens_field": shards.TOKENS_FIELD,
            "tokens_shape": [text.context_length, text.width],
            "pooled_field": shards.POOLED_FIELD,
            "pooled_shape": [text.pooled_dim],
            "dtype": "float16",
        },
    }


def encode_batch(
    good: Sequence[Loaded], vae: VAE, text: TextEncoder, resolutions: Sequence[int], seed: int
) -> list[dict]:
    """Shard samples (tar member name -> bytes) for a batch of checked inputs."""

    def half(x: torch.Tensor) -> np.ndarray:
        return x.to(torch.float16).cpu().numpy()

    tokens, pooled = text.encode([r.caption for r in good])  # (B, L, W), (B, E)
    tokens, pooled = half(tokens), half(pooled)
    latents = {}
    for res in resolutions:
        pixels = to_tensor([r.crops[res] for r in good])  # (B, 3, res, res)
        seeds = [latent_seed(seed, r.item.key, res) for r in good]
        latents[res] = half(vae.encode(pixels, seeds=seeds))  # (B, C, res/f, res/f)
    samples = []
    for j, r in enumerate(good):
        meta = {"key": r.item.key, "caption": r.caption, "origin": r.item.origin}
        meta |= {"width": r.size[0], "height": r.size[1]}
        sample = {
            "__key__": r.item.key,
            "txt": r.caption,
            "json": json.dumps(meta, ensure_ascii=False).encode(),
            shards.TOKENS_FIELD: shards.npy_bytes(tokens[j]),
            shards.POOLED_FIELD: shards.npy_bytes(pooled[j]),
        }
        for res in resolutions:
            sample[shards.latent_field(res)] = shards.npy_bytes(latents[res][j])
        samples.append(sample)
    return samples


def encode_shard(
    index: int,
    items: Sequence[InputItem],
    out: Path,
    vae: VAE,
    text: TextEncoder,
    resolutions: Sequence[int],
    batch_size: int,
    seed: int,
    pool: ThreadPoolExecutor,
    bar: tqdm,
) -> dict:
    """Encode one shard's inputs into ``shard-NNNNNN.tar``; return its record (not yet written)."""
    final = out / shards.shard_name(index)
    tmp = final.with_name(final.name + ".tmp")
    skipped, written = [], 0
    with wds.TarWriter(str(tmp), mtime=0) as writer:
        for batch in _batches(items, resolutions, batch_size, pool):
            bar.update(len(batch))
            bad = [r for r in batch if isinstance(r, Skipped)]
            skipped += [{"key": r.item.key, "reason": r.reason, "detail": r.detail} for r in bad]
            good = [r for r in batch if isinstance(r, Loaded)]
            if good:
                for sample in encode_batch(good, vae, text, resolutions, seed):
                    writer.write(sample)
                written += len(good)
    tmp.replace(final)
    return {
        "shard": final.name,
        "inputs": len(items),
        "samples": written,
        "skipped": skipped,
        "encoders": encoders_info(vae, text, resolutions),
    }


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------


def write_manifest(out: Path, settings: dict, num_shards: int, listing_skipped: list[dict]) -> dict | None:
    """Combine all shard records into ``manifest.json`` + ``skipped.jsonl``; None while any is missing."""
    records = []
    for i in range(num_shards):
        path = shards.record_path(out, i)
        if not path.is_file():
            return None
        records.append(json.loads(path.read_text()))
    skipped = [dict(s, shard=None) for s in listing_skipped]
    skipped += [dict(s, shard=r["shard"]) for r in records for s in r["skipped"]]
    counts = dict.fromkeys(shards.SKIP_REASONS, 0)
    for s in skipped:
        counts[s["reason"]] = counts.get(s["reason"], 0) + 1
    manifest = {
        "format": shards.FORMAT,
        "samples": sum(r["samples"] for r in records),
        "inputs": settings["inputs"] + len(listing_skipped),
        "skipped": counts,
        "skipped_total": len(skipped),
        "shards": [{"name": r["shard"], "samples": r["samples"]} for r in records],
        "resolutions": settings["resolutions"],
        "seed": settings["seed"],
        "source": settings["source"],
        "limit": settings["limit"],
        "shard_size": settings["shard_size"],
        "resize": "short side to resolution (bicubic), center crop; smaller images skipped",
        **(records[0]["encoders"] if records else {"vae": {"name": settings["vae"]}}),
    }
    if not records:
        manifest["text_encoder"] = {"name": settings["text_encoder"]}
    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
    atomic_write_text(out / "skipped.jsonl", lines)
    shards.write_json_atomic(out / "manifest.json", manifest)
    return manifest


def check_settings(out: Path, settings: dict) -> None:
    """Record the settings of a new folder; refuse to resume a folder made with different ones."""
    path = out / "prepare.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(f"{out} was prepared with other settings ({changes}); use a new --out folder")
    else:
        shards.write_json_atomic(path, settings)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def prepare(
    items: Sequence[InputItem],
    out: str | Path,
    *,
    vae: str = DEFAULT_VAE,
    text_encoder: str = DEFAULT_TEXT_ENCODER,
    resolutions: Sequence[int] = (256, 512),
    shard_size: int = 1000,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    workers: int = 8,
    device: torch.device | str | None = None,
    vae_dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype = torch.float32,
    rank: int | None = None,
    world_size: int | None = None,
    source: dict | None = None,
    listing_skipped: Sequence[dict] = (),
    progress: bool = True,
) -> dict | None:
    """Encode this rank's unfinished shards; return the manifest if this call completed the folder.

    ``items`` is the full input list (see ``sedit.data.sources``); ``listing_skipped`` are inputs its
    listing already refused (e.g. unreadable tars), counted in the manifest like any other skip.
    """
    rank, world_size = rank_and_world(rank, world_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)[:limit] if limit is not None else list(items)
    resolutions = sorted(set(resolutions))
    settings = {
        "format": shards.FORMAT,
        "source": source or {},
        "inputs": len(items),
        "limit": limit,
        "shard_size": shard_size,
        "resolutions": resolutions,
        "seed": seed,
        "vae": str(vae),
        "text_encoder": str(text_encoder),
    }
    check_settings(out, settings)
    num_shards = -(-len(items) // shard_size)
    mine = [i for i in range(rank, num_shards, world_size) if not shards.record_path(out, i).is_file()]
    show = progress and rank == 0
    if show:
        done = len(range(rank, num_shards, world_size)) - len(mine)
        print(f"{len(items)} inputs -> {num_shards} shards; rank {rank}/{world_size}: {len(mine)} to do, {done} done")
    if mine:
        device = torch.device(device) if device is not None else local_device()
        vae_model = load_vae(vae, device, vae_dtype)
        text_model = load_text_encoder(text_encoder, device, text_dtype)
        total = sum(len(items[i * shard_size : (i + 1) * shard_size]) for i in mine)
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            tqdm(total=total, unit="img", disable=not show, desc=f"rank {rank}") as bar,
        ):
            for i in mine:
                chunk = items[i * shard_size : (i + 1) * shard_size]
                record = encode_shard(i, chunk, out, vae_model, text_model, resolutions, batch_size, seed, pool, bar)
                shards.write_json_atomic(shards.record_path(out, i), record)
    manifest = write_manifest(out, settings, num_shards, list(listing_skipped))
    if show and manifest is not None:
        print(f"wrote {out / 'manifest.json'}: {manifest['samples']} samples, skipped {manifest['skipped']}")
    return manifest


def list_inputs(args: argparse.Namespace) -> tuple[list[InputItem], list[dict], dict]:
    """(items, skipped while listing, source description) for the CLI's source flags."""
    if args.folder:
        return folder_items(args.folder), [], {"kind": "folder", "path": args.folder}
    if args.tars:
        items, broken = tar_items(args.tars)
        return items, broken, {"kind": "tars", "patterns": args.tars}
    items = coco_items(args.coco_json, args.coco_images, args.coco_captions)
    source = {"kind": "coco", "captions": args.coco_json, "images": args.coco_images, "mode": args.coco_captions}
    return items, [], source


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        prog="python -m sedit.data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_argument_group("source (exactly one)")
    src.add_argument("--folder", help="folder of images, each with a same-name .txt caption")
    src.add_argument("--tars", nargs="+", help="local webdataset tars of jpg/png + txt|json (globs, {000..009})")
    src.add_argument("--coco-json", help="COCO captions JSON (with --coco-images)")
    src.add_argument("--coco-images", help="folder holding the COCO JSON's file_name images")
    src.add_argument("--coco-captions", choices=["all", "first"], default="all", help="a sample per caption / image")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same settings to resume)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="square crop sizes in pixels")
    parser.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL: local folder, hub id or hub id/subfolder")
    parser.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER, help="OpenCLIP: hf-hub:ID, folder or ARCH:FILE")
    parser.add_argument("--shard-size", type=int, default=1000, help="inputs per shard")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    parser.add_argument("--limit", type=int, help="use only the first N inputs (a quick smoke subset)")
    parser.add_argument("--workers", type=int, default=8, help="threads decoding and resizing images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent sampling noise")
    parser.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    parser.add_argument("--vae-dtype", choices=list(DTYPES), default="float32", help="SDXL's VAE overflows in float16")
    parser.add_argument("--text-dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--rank", type=int, help="default: torch.distributed, else $RANK, else 0")
    parser.add_argument("--world-size", type=int, help="default: torch.distributed, else $WORLD_SIZE, else 1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.folder, args.tars, args.coco_json)) != 1:
        parser.error("give exactly one of --folder, --tars, --coco-json")
    if args.coco_json and not args.coco_images:
        parser.error("--coco-json needs --coco-images")
    items, listing_skipped, source = list_inputs(args)
    return prepare(
        items,
        args.out,
        vae=args.vae,
        text_encoder=args.text_encoder,
        resolutions=args.resolutions,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        limit=args.limit,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        vae_dtype=DTYPES[args.vae_dtype],
        text_dtype=DTYPES[args.text_dtype],
        rank=args.rank,
        world_size=args.world_size,
        source=source,
        listing_skipped=listing_skipped,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
