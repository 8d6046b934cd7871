"""Prepare tool: round trip through shards, resume, bad inputs, and the three source kinds."""

import importlib
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from data_helpers import read_shard, tiny_encoders, write_images
from PIL import Image

from sedit.data import prepare as prep
from sedit.data.encoders import load_text_encoder, load_vae
from sedit.data.images import square_crops, to_tensor
from sedit.data.shards import npy_load
from sedit.data.sources import coco_items, folder_items, tar_items


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.getbasetemp())


def run(items, out, encoders, **kw):
    kw = {"resolutions": (32, 64), "shard_size": 4, "batch_size": 3, "workers": 2, "progress": False} | kw
    return prep.prepare(items, out, vae=encoders[0], text_encoder=encoders[1], **kw)


TEXT_FIELDS = ["text_pooled.npy", "text_tokens.npy"]


def read_all(folder, manifest):
    """Every sample of a prepared folder, .npy members decoded, by key."""
    samples = {}
    for shard in manifest["shards"]:
        for key, raw in read_shard(folder / shard["name"]).items():
            assert sorted(raw) == ["json", "latent_32.npy", "latent_64.npy", *TEXT_FIELDS, "txt"]
            samples[key] = {k: npy_load(v) if k.endswith(".npy") else v for k, v in raw.items()}
    return samples


def test_round_trip_shapes_dtypes_and_alignment(tmp_path, encoders):
    keys = write_images(tmp_path / "images", 10)
    manifest = run(folder_items(tmp_path / "images"), tmp_path / "out", encoders)
    assert manifest["samples"] == 10 and manifest["skipped_total"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["latents"]["32"]["shape"] == [4, 8, 8] and manifest["latents"]["64"]["shape"] == [4, 16, 16]
    assert manifest["text"]["tokens_shape"] == [77, 32] and manifest["text"]["pooled_shape"] == [32]

    samples = read_all(tmp_path / "out", manifest)
    assert sorted(samples) == keys
    vae, text = load_vae(encoders[0]), load_text_encoder(encoders[1])
    for key in (keys[0], keys[7]):
        s = samples[key]
        caption = (tmp_path / "images" / f"{key}.txt").read_text().strip()
        assert s["txt"].decode() == caption and json.loads(s["json"])["caption"] == caption
        assert s["latent_32.npy"].dtype == np.float16 and s["latent_32.npy"].shape == (4, 8, 8)
        assert s["latent_64.npy"].shape == (4, 16, 16) and s["text_tokens.npy"].shape == (77, 32)
        assert s["text_tokens.npy"].dtype == np.float16 and s["text_pooled.npy"].dtype == np.float16
        # the stored arrays are this sample's own encodings (alignment by key)
        tokens, pooled = text.encode([caption])
        np.testing.assert_allclose(s["text_tokens.npy"], tokens[0].numpy(), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(s["text_pooled.npy"], pooled[0].numpy(), atol=2e-2, rtol=1e-2)
        crops, _ = square_crops((tmp_path / "images" / f"{key}.png").read_bytes(), [64])
        z = vae.encode(to_tensor([crops[64]]), seeds=[prep.latent_seed(0, key, 64)])
        np.testing.assert_allclose(s["latent_64.npy"], z[0].numpy(), atol=2e-2, rtol=1e-2)


def test_resume_encodes_only_unfinished_shards(tmp_path, encoders, monkeypatch):
    write_images(tmp_path / "images", 10)
    items = folder_items(tmp_path / "images")
    encoded = []
    real = prep.encode_shard
    monkeypatch.setattr(prep, "encode_shard", lambda i, *a, **k: encoded.append(i) or real(i, *a, **k))

    # rank 1 of 2 does shard 1 only and leaves no manifest: the run is unfinished
    assert run(items, tmp_path / "out", encoders, rank=1, world_size=2) is None
    assert encoded == [1]
    # a crash mid-shard leaves a temporary tar and no record: that shard is redone
    (tmp_path / "out" / "shard-000000.tar.tmp").write_bytes(b"partial")
    manifest = run(items, tmp_path / "out", encoders)
    assert encoded == [1, 0, 2]
    assert manifest["samples"] == 10
    # everything finished: a rerun encodes nothing and rewrites the same manifest
    assert run(items, tmp_path / "out", encoders) == manifest
    assert encoded == [1, 0, 2]


def test_resume_refuses_other_settings(tmp_path, encoders):
    write_images(tmp_path / "images", 4)
    items = folder_items(tmp_path / "images")
    run(items, tmp_path / "out", encoders)
    with pytest.raises(ValueError, match="resolutions"):
        run(items, tmp_path / "out", encoders, resolutions=(32,))


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path, encoders):
    images = tmp_path / "images"
    write_images(images, 5)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "corrupt.txt").write_text("a broken file")
    Image.new("RGB", (80, 40)).save(images / "tiny.png")  # short side 40 < 64
    (images / "tiny.txt").write_text("a small picture")
    Image.new("RGB", (80, 80)).save(images / "blank.png")
    (images / "blank.txt").write_text("  \n")
    Image.new("RGB", (80, 80)).save(images / "nocaption.png")

    manifest = run(folder_items(images), tmp_path / "out", encoders)
    assert manifest["inputs"] == 9 and manifest["samples"] == 5
    assert manifest["skipped"] == {"unreadable_image": 1, "too_small": 1, "empty_caption": 2}
    lines = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted((x["key"], x["reason"]) for x in lines) == [
        ("blank", "empty_caption"),
        ("corrupt", "unreadable_image"),
        ("nocaption", "empty_caption"),
        ("tiny", "too_small"),
    ]
    assert all(x["shard"].startswith("shard-") and x["detail"] for x in lines)


def test_tar_source_with_txt_and_json_captions(tmp_path):
    def png(seed):
        pixels = np.random.default_rng(seed).integers(0, 256, (70, 70, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    with wds.TarWriter(str(tmp_path / "part-000.tar")) as w:
        w.write({"__key__": "a", "png": png(0), "txt": "first"})
        w.write({"__key__": "b", "jpg": png(1), "json": json.dumps({"caption": "second"})})
    with wds.TarWriter(str(tmp_path / "part-001.tar")) as w:
        w.write({"__key__": "sub/c", "png": png(2), "txt": "third"})
        w.write({"__key__": "d", "txt": "no image here"})
    (tmp_path / "part-002.tar").write_bytes(b"not a tar at all" * 64)

    items, broken = tar_items([str(tmp_path / "part-{000..002}.tar")])
    assert [i.key for i in items] == ["a", "b", "sub_c", "d"]
    assert [b["key"] for b in broken] == ["part-002.tar"]
    from sedit.data.sources import read_caption

    assert [read_caption(i) for i in items[:3]] == ["first", "second", "third"]
    assert items[3].image is None


def test_folder_keys_are_webdataset_safe_and_unique(tmp_path):
    write_images(tmp_path / "a", 1, prefix="x.y")
    write_images(tmp_path / "a" / "x", 1, prefix="y")
    items = folder_items(tmp_path / "a")
    assert [(i.key, i.origin) for i in items] == [("x_y000", "x/y000.png"), ("x_y000_2", "x.y000.png")]


def test_coco_source(tmp_path):
    write_images(tmp_path / "imgs", 2)
    coco = {
        "images": [{"id": 5, "file_name": "img000.png"}, {"id": 9, "file_name": "img001.png"}],
        "annotations": [
            {"id": 2, "image_id": 5, "caption": "a cat"},
            {"id": 1, "image_id": 5, "caption": "a kitten"},
            {"id": 3, "image_id": 9, "caption": "a dog"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    every = coco_items(tmp_path / "captions.json", tmp_path / "imgs", "all")
    assert [(i.key, i.caption) for i in every] == [("5_1", "a kitten"), ("5_2", "a cat"), ("9_3", "a dog")]
    first = coco_items(tmp_path / "captions.json", tmp_path / "imgs", "first")
    assert [(i.key, i.caption) for i in first] == [("5", "a kitten"), ("9", "a dog")]


def test_cli_coco_with_limit(tmp_path, encoders):
    write_images(tmp_path / "imgs", 3)
    anns = [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(3)]
    images = [{"id": i, "file_name": f"img{i:03d}.png"} for i in range(3)]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": anns}))
    argv = ["--coco-json", str(tmp_path / "c.json"), "--coco-images", str(tmp_path / "imgs"), "--out"]
    argv += [str(tmp_path / "out"), "--resolutions", "32", "--vae", encoders[0], "--text-encoder", encoders[1]]
    manifest = prep.main([*argv, "--limit", "2", "--no-progress", "--workers", "1"])
    assert manifest["samples"] == 2 and manifest["limit"] == 2
    assert manifest["source"]["kind"] == "coco"
    assert manifest["vae"]["name"] == encoders[0] and manifest["text_encoder"]["name"] == encoders[1]


@pytest.mark.parametrize("module", ["prepare", "builtin", "vae_train"])
def test_entry_points_explain_their_flags(module, capsys):
    main = importlib.import_module(f"sedit.data.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m sedit.data.{module}" in text and "--out" in text


def test_latent_seed_is_stable():
    assert prep.latent_seed(0, "u1f34e", 32) == prep.latent_seed(0, "u1f34e", 32)
    assert prep.latent_seed(0, "u1f34e", 32) != prep.latent_seed(0, "u1f34e", 64)
    assert torch.Generator().manual_seed(prep.latent_seed(1, "k", 256)).initial_seed() >= 0
