"""Build the built-in dataset end to end: emoji images -> tiny encoders -> prepared shards.

    python -m sedit.data.builtin --out data/emoji

Steps (each is skipped when its output already exists, so a rerun is cheap):
1. ``images/``: the 1361 Noto Color Emoji pictures with their Unicode-name captions
   (``sedit.data.emoji``; needs ``apt-get install -y fonts-noto-color-emoji``);
2. ``encoders/text/``: a randomly initialised tiny OpenCLIP model (text width 32 = the ``tiny``
   preset's caption_dim, 77 tokens, OpenCLIP's bundled tokenizer); captions map to distinct but not
   semantically meaningful embeddings;
3. ``encoders/vae/``: a tiny AutoencoderKL trained to reconstruct the set (``sedit.data.vae_train``,
   about 1.5 minutes on two CPU cores; downsampling 4, 4 channels);
4. ``shards/``: ``sedit.data.prepare`` on ``images/`` at 32 and 64 px, giving 8x8 and 16x16 latents,
   the ``tiny`` preset's 256px- and 512px-equivalent grids.

Steps 2-4 are ``prepare_with_tiny_encoders``, which ``sedit.data.fashion_mnist`` uses too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sedit.data import emoji
from sedit.data.encoders import save_tiny_text_encoder
from sedit.data.prepare import prepare
from sedit.data.sources import folder_items
from sedit.data.vae_train import train_tiny_vae

RESOLUTIONS = (32, 64)


def build(
    out: str | Path,
    font: str | Path = emoji.DEFAULT_FONT,
    vae_steps: int = 700,
    limit: int | None = None,
    shard_size: int = 128,
    workers: int = 2,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Run the four steps into ``out``; return the prepared folder's manifest."""
    out = Path(out)
    images, info = out / "images", out / "emoji.json"
    if not info.is_file():
        count = emoji.materialise(images, font)
        license_note = "SIL Open Font License 1.1 (Noto Color Emoji, Debian fonts-noto-color-emoji)"
        about = {"samples": count, "font": str(font), "license": license_note, "captions": "unicodedata.name"}
        info.write_text(json.dumps(about, indent=2) + "\n")
    source = {"kind": "builtin-emoji", "font": Path(font).name}
    return prepare_with_tiny_encoders(
        images, out, source, vae_steps=vae_steps, limit=limit, shard_size=shard_size, workers=workers,
        progress=progress, device=device,
    )  # fmt: skip


def require_same_materialisation(info: Path, settings: dict) -> None:
    """Refuse to reuse a folder's images that ``info`` says were written with other ``settings``."""
    written = json.loads(info.read_text())
    if {k: written.get(k) for k in settings} != settings:
        raise ValueError(f"{info.parent} holds another materialisation ({info}); use a new --out folder")


def prepare_with_tiny_encoders(
    images: str | Path,
    out: str | Path,
    source: dict,
    vae_steps: int = 700,
    vae_images: int | None = None,
    limit: int | None = None,
    shard_size: int = 128,
    workers: int = 2,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Steps 2-4 for any folder of captioned images: ``out/encoders/text`` (tiny OpenCLIP),
    ``out/encoders/vae`` (tiny VAE trained on the folder's first ``vae_images`` images, all by default)
    and ``out/shards`` at ``RESOLUTIONS``; each step is skipped when its output exists. Returns the
    manifest; ``source`` is recorded in it. ``device`` runs the encoders of step 4 (the VAE trains on the CPU)."""
    out = Path(out)
    text, vae = out / "encoders" / "text", out / "encoders" / "vae"
    if not (text / "open_clip_config.json").is_file():
        save_tiny_text_encoder(text, width=32, seed=0)
    if not (vae / "config.json").is_file():
        if progress:
            print(f"training the tiny VAE for {vae_steps} steps (cached in {vae}) ...")
        report = train_tiny_vae(images, vae, steps=vae_steps, limit=vae_images)
        if progress:
            print(f"VAE: {report['seconds']}s, reconstruction PSNR {report['psnr_db']} dB")
    manifest = prepare(
        folder_items(images),
        out / "shards",
        vae=str(vae),
        text_encoder=str(text),
        resolutions=RESOLUTIONS,
        shard_size=shard_size,
        batch_size=64,
        limit=limit,
        workers=workers,
        device=device,
        source=source,
        progress=progress,
    )
    assert manifest is not None  # one process: every shard is finished here
    return manifest


def builder_arguments(prog: str, doc: str, out: str, shard_size: int) -> argparse.ArgumentParser:
    """The command line every tiny-encoder dataset builder shares; each adds its own source options."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--vae-steps", type=int, default=700, help="training steps of the tiny VAE")
    parser.add_argument("--shard-size", type=int, default=shard_size, help="inputs per shard")
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--device", default="cpu", help="where the encoders run while preparing shards (cuda, cpu)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = builder_arguments("python -m sedit.data.builtin", __doc__, "data/emoji", shard_size=128)
    parser.add_argument("--font", default=emoji.DEFAULT_FONT, help="NotoColorEmoji.ttf")
    parser.add_argument("--limit", type=int, help="prepare only the first N images (smoke test)")
    args = parser.parse_args(argv)
    return build(
        args.out, args.font, args.vae_steps, args.limit, args.shard_size, args.workers, not args.no_progress,
        args.device,
    )  # fmt: skip


if __name__ == "__main__":
    main()
