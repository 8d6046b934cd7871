"""generate: manifest round trip, per-seed images, resume, refusal of mixed settings, 2-rank split."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import tiny_encoders
from eval_helpers import REPO, save_export
from PIL import Image

from sedit.eval.captions import read_captions
from sedit.eval.generate import main as generate_main
from sedit.eval.generate import read_manifest

CAPTIONS = ["a red apple", "a blue car", "two dogs on grass", "a lighthouse at night", "a bowl of soup"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    vae, text = tiny_encoders(base)
    export = save_export(base / "export")
    captions = base / "captions.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n\n")
    return {"vae": vae, "text": text, "export": str(export), "captions": str(captions), "base": base}


def args(setup, out, *extra):
    return [
        "--checkpoint", setup["export"], "--captions", setup["captions"], "--vae", setup["vae"],
        "--text-encoder", setup["text"], "--steps", "2", "--guidance", "2.0", "--batch-size", "3",
        "--out", str(out), *extra,
    ]  # fmt: skip


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture(scope="module")
def single(setup):
    out = setup["base"] / "single"
    generate_main(args(setup, out))
    return out


def test_manifest_round_trips_captions_seeds_and_settings(setup, single):
    manifest = read_manifest(single)
    items = manifest["items"]
    assert [i["caption"] for i in items] == CAPTIONS
    assert [i["seed"] for i in items] == list(range(5))
    assert [i["index"] for i in items] == list(range(5))
    s = manifest["settings"]
    assert (s["steps"], s["guidance_scale"], s["resolution"], s["latent_shape"]) == (2, 2.0, 32, [4, 8, 8])
    for item in items:
        image = Image.open(single / item["file"])
        assert image.size == (32, 32) and image.mode == "RGB"
    assert not (pixels(single / items[0]["file"]) == pixels(single / items[1]["file"])).all()


def test_resume_skips_finished_images_and_redoes_only_missing(setup, single):
    victim = single / "images" / "000002.png"
    before = pixels(victim)
    stamps = {p.name: p.stat().st_mtime_ns for p in (single / "images").glob("*.png")}
    victim.unlink()
    (single / "images" / ".000003.png.abc.tmp").write_bytes(b"half an image")  # left by a killed run
    generate_main(args(setup, single))
    log = json.loads((single / "logs" / "rank0.json").read_text())
    assert log["written"] == [2] and log["skipped"] == [0, 1, 3, 4]
    for name, stamp in stamps.items():
        if name != victim.name:
            assert (single / "images" / name).stat().st_mtime_ns == stamp
    assert np.abs(pixels(victim) - before).max() <= 1  # image k depends on seed k only, not on its batch
    generate_main(args(setup, single))
    assert json.loads((single / "logs" / "rank0.json").read_text())["written"] == []


def test_other_settings_in_the_same_folder_are_refused(setup, single):
    with pytest.raises(ValueError, match="guidance_scale"):
        generate_main(args(setup, single)[:-2] + ["--guidance", "3.0", "--out", str(single)])


def test_two_ranks_write_each_image_exactly_once(setup, single):
    out = setup["base"] / "dist"
    cmd = [sys.executable, "-m", "sedit.eval.generate", *args(setup, out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    logs = [json.loads((out / "logs" / f"rank{r}.json").read_text()) for r in range(2)]
    assert logs[0]["written"] == [0, 2, 4] and logs[1]["written"] == [1, 3]
    assert sorted(logs[0]["written"] + logs[1]["written"]) == list(range(5))
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]  # no temp files
    assert read_manifest(out) == read_manifest(single) | {"settings": read_manifest(out)["settings"]}
    for i in range(5):
        assert np.abs(pixels(out / "images" / f"{i:06d}.png") - pixels(single / "images" / f"{i:06d}.png")).max() <= 1


def test_coco_captions_sampled_with_fixed_seed(tmp_path):
    images = [{"id": 10 + k, "file_name": f"COCO_val2014_{10 + k:012d}.jpg"} for k in range(6)]
    anns = [
        {"id": 100 + j, "image_id": 10 + j % 6, "caption": f"caption {j}  of image {10 + j % 6}"} for j in range(18)
    ]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    first = read_captions(path, num=4, seed=3)
    assert first == read_captions(path, num=4, seed=3)
    assert first != read_captions(path, num=4, seed=4)
    assert len({p.reference for p in first}) == 4  # distinct images
    for p in first:
        image_id = int(p.reference[-16:-4])
        assert p.caption.endswith(f"of image {image_id}") and "  " not in p.caption
    with pytest.raises(ValueError, match="asked for 7"):
        read_captions(path, num=7)
