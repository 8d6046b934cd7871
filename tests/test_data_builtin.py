"""The built-in emoji set: its documented size and captions, and the whole pipeline on it."""

import json

import numpy as np
import pytest
import torch
from data_helpers import read_shard  # noqa: F401  (sets HF_HUB_OFFLINE)
from PIL import Image

from sedit.data import emoji
from sedit.data.builtin import build
from sedit.data.encoders import load_vae
from sedit.data.loader import LatentLoader
from sedit.edm import EDMLoss, EDMPrecond
from sedit.model import build_model
from sedit.presets import PRESETS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    manifest = build(out, vae_steps=30, limit=20, shard_size=8, progress=False)
    return out, manifest


def test_font_selection_rules():
    mapped = emoji.font_codepoints(emoji.DEFAULT_FONT)
    assert {0x1F34E, 0x1F600, 0x1F1E6, 0x200D} <= mapped
    assert emoji.is_picture(0x1F34E) and emoji.is_picture(0x00A9)
    for not_picture in (0x0023, 0x200D, 0x20E3, 0xFE0F, 0x1F1E6, 0x1F3FB, 0xE0067, 0x1FAE8):
        assert not emoji.is_picture(not_picture)


def test_emoji_set_has_documented_size_and_captions(built):
    out, _ = built
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == emoji.BUILTIN_SAMPLES == 1361
    assert json.loads((out / "emoji.json").read_text())["samples"] == 1361
    assert len(list((out / "images").glob("*.txt"))) == 1361
    assert (out / "images" / "u1f34e.txt").read_text().strip() == "red apple"
    assert (out / "images" / "u1f600.txt").read_text().strip() == "grinning face"
    pixels = np.asarray(Image.open(out / "images" / "u1f34e.png"))
    assert pixels.shape == (136, 136, 3) and (pixels[..., 0] > 150).mean() > 0.9  # a red apple on white
    assert (pixels[..., 1] < 100).mean() > 0.2


def test_builtin_pipeline_end_to_end(built):
    out, manifest = built
    assert manifest["samples"] == 20 and manifest["skipped_total"] == 0
    assert manifest["resolutions"] == [32, 64]
    assert manifest["latents"]["32"]["shape"] == [4, 8, 8] and manifest["latents"]["64"]["shape"] == [4, 16, 16]
    assert manifest["text"]["tokens_shape"] == [77, PRESETS["tiny"].caption_dim]

    report = json.loads((out / "encoders" / "vae" / "train_report.json").read_text())
    assert report["images"] == 1361 and report["loss_last"] < 0.8 * report["loss_first"]
    vae = load_vae(out / "encoders" / "vae")
    assert vae.scaling_factor == pytest.approx(report["scaling_factor"]) and vae.scaling_factor != 1.0

    batch = next(iter(LatentLoader(out / "shards", 32, 6, num_workers=0, caption_dropout=0.1)))
    assert vae.decode(batch["latents"]).shape == (6, 3, 32, 32)
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    loss = EDMLoss(-0.6, 1.2, 0.9, cfg.patch_size)(EDMPrecond(build_model(cfg), 0.9), batch["latents"],
                                                   batch["captions"], mask_ratio=0.75)  # fmt: skip
    assert torch.isfinite(loss)
    big = next(iter(LatentLoader(out / "shards", 64, 2, num_workers=0)))
    assert big["latents"].shape == (2, 4, 16, 16)
