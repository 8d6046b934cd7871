"""CLIP score of generated images against their captions, with an OpenCLIP model.

    python -m sedit.eval.clip_score --generated runs/eval/g5 \\
        --clip-model ViT-L-14-quickgelu:/models/clip-vit-l-14-openai/open_clip_model.safetensors

score(image, caption) = 100 * max(cos(image embedding, text embedding), 0), averaged over images
(the torchmetrics convention; Hessel et al.'s CLIPScore is 2.5 * max(cos, 0)). Our reported number
uses OpenAI's ViT-L/14 (OpenCLIP ``ViT-L-14-quickgelu``, weights from hf-hub
``timm/vit_large_patch14_clip_224.openai``); ViT-g-14 (``laion2b_s34b_b88k``) is the other common choice.

``--clip-model`` takes a local OpenCLIP directory (``open_clip_config.json`` + weights), or
``ARCH:/path/to/weights`` (a built-in OpenCLIP architecture and a local weights file). A pretrained
tag (``ViT-L-14:openai``) needs ``--allow-download``; without it the tool stops at once and says
which file to fetch from where. Images go through the model's own preprocessing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from PIL import Image

from sedit.eval.files import write_json
from sedit.eval.generate import read_manifest
from sedit.eval.weights import MissingWeightsError, run_metric_cli

DEFAULT_CLIP = "ViT-L-14-quickgelu:openai"


def _open_clip_spec(spec: str, allow_download: bool) -> tuple[str, str | None]:
    """(OpenCLIP model name, pretrained) for a spec; raises MissingWeightsError when not local."""
    import open_clip

    if os.path.isdir(spec):
        return f"local-dir:{spec}", None
    if spec.startswith("local-dir:") and os.path.isdir(spec.split(":", 1)[1]):
        return spec, None
    if ":" in spec and not spec.startswith(("hf-hub:", "local-dir:")):
        arch, weights = spec.split(":", 1)
        if os.path.isfile(weights) or allow_download:
            return arch, weights
        if os.sep in weights or "." in weights:  # meant as a path
            raise MissingWeightsError(f"CLIP weights file not found: {weights}")
        cfg = open_clip.get_pretrained_cfg(arch, weights) or {}
        source = f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "")
        raise MissingWeightsError(
            f"CLIP model {spec!r} is not on this machine. Download its weights (open_clip_model.safetensors or "
            f"open_clip_pytorch_model.bin) from {source or 'its OpenCLIP pretrained source'} on a machine with "
            f"network and pass --clip-model {arch}:/path/to/that/file, or pass --allow-download."
        )
    if spec.startswith("hf-hub:") and allow_download:
        return spec, None
    raise MissingWeightsError(
        f"CLIP model {spec!r} is not on this machine: give a local OpenCLIP directory, ARCH:/path/to/weights, "
        "or pass --allow-download for a hub name"
    )


def load_clip(spec: str, device: torch.device | str = "cpu", allow_download: bool = False):
    """(model, image preprocessing, tokenizer) of an OpenCLIP model given by a local spec."""
    import open_clip

    name, pretrained = _open_clip_spec(spec, allow_download)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_scores(model, preprocess, tokenizer, images: list[Path], captions: list[str], batch_size: int = 64):
    """Per-image 100 * max(cos, 0), as a float tensor (N,)."""
    device = next(model.parameters()).device
    scores = []
    for b in range(0, len(images), batch_size):
        pixels = []
        for f in images[b : b + batch_size]:
            with Image.open(f) as im:
                pixels.append(preprocess(im.convert("RGB")))
        img = model.encode_image(torch.stack(pixels).to(device)).float()  # (N, E)
        txt = model.encode_text(tokenizer(captions[b : b + batch_size]).to(device)).float()  # (N, E)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # (N,)
        scores.append(100 * cos.clamp(min=0).cpu())
    return torch.cat(scores)


def evaluate_folder(args: argparse.Namespace) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load_clip(args.clip_model, device, args.allow_download)  # fails before any work
    folder = Path(args.generated)
    manifest = read_manifest(folder)
    items = [item for item in manifest["items"] if (folder / item["file"]).is_file()]
    if len(items) < len(manifest["items"]) and not args.allow_partial:
        raise FileNotFoundError(
            f"{folder}: {len(manifest['items']) - len(items)} images missing; finish generation or --allow-partial"
        )
    scores = clip_scores(
        model,
        preprocess,
        tokenizer,
        [folder / i["file"] for i in items],
        [i["caption"] for i in items],
        args.batch_size,
    )
    report = {
        "metrics": {
            "clip_score": scores.mean().item(),
            "clip_score_std": scores.std().item() if len(scores) > 1 else 0.0,
        },
        "num_images": len(items),
        "clip_model": args.clip_model,
        "definition": "mean over images of 100 * max(cos(image, caption), 0)",
        "generation": manifest["settings"],
    }
    write_json(Path(args.out) if args.out else folder / "clip_score.json", report)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sedit.eval.clip_score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", required=True, help="output folder of sedit.eval.generate")
    p.add_argument(
        "--clip-model", default=DEFAULT_CLIP, help=f"local OpenCLIP dir or ARCH:/weights (default {DEFAULT_CLIP})"
    )
    p.add_argument("--allow-download", action="store_true", help="allow OpenCLIP pretrained tags / hub names")
    p.add_argument("--allow-partial", action="store_true", help="score an unfinished generate folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON report (default: GENERATED/clip_score.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    run_metric_cli(evaluate_folder, build_parser(), argv)


if __name__ == "__main__":
    main()
