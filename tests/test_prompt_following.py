"""Prompt following on Fashion-MNIST: the scoring tools, and the CPU-sized proof that training learns
what the prompts say (and that the check notices when the caption path is cut)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import run_stage

from sedit.data import fashion_mnist as fm
from sedit.eval import prompt_following as pf
from sedit.eval.classifier import save_classifier, train_classifier
from sedit.eval.classifier_fid import classifier_metrics

# ----------------------------------------------------------------------------------------------
# Fixtures: real Fashion-MNIST (Debian dataset-fashion-mnist) and a classifier trained on it
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return {split: fm.load_split(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory, splits):
    """A classifier trained on 10,000 real training images (one epoch, about 10 s)."""
    images, labels = splits["train"]
    model = train_classifier(fm.to_pixels(images[:10000]), torch.from_numpy(labels[:10000]), epochs=1, width=16)
    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    return save_classifier(model, path, {"train_images": 10000, "epochs": 1})


def class_major(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` images of each class, class-major (the order generate writes)."""
    return np.concatenate([images[labels == k][:per_class] for k in range(10)])


def write_generated(path, settings: dict[str, np.ndarray], per_class: int):
    about = {"settings": list(settings), "per_class": per_class}
    np.savez_compressed(path, labels=pf.intended_labels(per_class).numpy(), about=json.dumps(about), **settings)
    return path


# ----------------------------------------------------------------------------------------------
# Scoring on real images standing in for generated ones
# ----------------------------------------------------------------------------------------------


def test_score_separates_class_faithful_images_from_prompt_blind_ones(tmp_path, splits, classifier_file):
    images, labels = splits["test"]
    faithful = class_major(images, labels, 50)  # "generated" images that show what was asked
    blind = faithful[np.random.default_rng(0).permutation(len(faithful))]  # real clothes, any class
    noise = np.random.default_rng(1).integers(0, 256, faithful.shape, dtype=np.uint8)
    settings = {"guided_w1": faithful, "unconditional": blind, "noise": noise}
    generated = write_generated(tmp_path / "g.npz", settings, 50)

    scores = pf.score(generated, classifier_file)
    rows = scores["rows"]
    assert rows["guided_w1"]["accuracy"] > 0.7
    lo, hi = scores["chance_band_3sigma"]
    assert lo < rows["unconditional"]["accuracy"] < hi
    assert lo < rows["shuffled"]["accuracy"] < hi and rows["shuffled"]["images_of"] == "guided_w1"
    assert sum(rows["guided_w1"]["predicted_counts"]) == 500
    # proxy FID: real test images are close to the test split, uniform noise is far from it
    proxy = {name: rows[name]["classifier_space"]["fid"] for name in ("guided_w1", "unconditional", "noise")}
    assert proxy["guided_w1"] < 0.2 * proxy["noise"] and proxy["unconditional"] < 0.2 * proxy["noise"]
    assert pf.passes(scores, margin=0.3)[0]
    swapped = {**scores, "rows": {**rows, "guided_w1": rows["unconditional"], "unconditional": rows["guided_w1"]}}
    verdict, reason = pf.passes(swapped, margin=0.3)
    assert not verdict and "<" in reason
    assert "| guided_w1 |" in pf.markdown_table(scores)


def test_proxy_fid_is_zero_for_identical_sets_and_grows_with_distortion(splits, classifier_file):
    images = splits["test"][0][:600]
    same = classifier_metrics(images, images, classifier_file)
    assert abs(same["fid"]) < 1e-3
    blurred = (images.astype(np.float32) * 0.5 + 64).astype(np.uint8)  # lower contrast
    assert classifier_metrics(blurred, images, classifier_file)["fid"] > 1.0


def test_bad_inputs_are_refused_naming_the_file(tmp_path, classifier_file):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a file written by"):
        pf.read_generated(tmp_path / "other.npz")
    score = ["score", "--classifier", str(classifier_file), "--out", str(tmp_path / "s.json")]
    with pytest.raises(SystemExit, match="error: .*other.npz: not a file written by"):
        pf.main([*score, "--generated", str(tmp_path / "other.npz")])
    good = write_generated(tmp_path / "good.npz", {"guided_w1": np.zeros((20, 28, 28), np.uint8)}, 2)
    with pytest.raises(ValueError, match="good.npz: no setting 'guided_w9'"):  # before any Inception work
        pf.score(good, classifier_file, inception=True, inception_settings=["guided_w9"])
    bad = write_generated(tmp_path / "bad.npz", {"guided_w1": np.zeros((20, 32, 32), np.uint8)}, 2)
    with pytest.raises(ValueError, match="bad.npz: setting 'guided_w1' has shape"):
        pf.read_generated(bad)


def test_to_native_and_labels():
    images = torch.linspace(-1, 1, 2 * 3 * 64 * 64).view(2, 3, 64, 64)
    native = pf.to_native(images)
    assert native.shape == (2, 28, 28) and native.dtype == np.uint8
    assert native[0].mean() < native[1].mean()  # the second image is the brighter half of the ramp
    assert pf.intended_labels(2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9]


# ----------------------------------------------------------------------------------------------
# The CPU-sized proof: a tiny model trained on Fashion-MNIST follows class prompts
# ----------------------------------------------------------------------------------------------

CHECK_STEPS = 400
CHECK_MARGIN = 0.2


@pytest.fixture(scope="module")
def fmnist_small(tmp_path_factory):
    """The first 3,000 training images through the real builder (tiny VAE trained for 150 steps)."""
    out = tmp_path_factory.mktemp("fmnist-small")
    fm.build(out, limit=3000, vae_steps=150, vae_images=1000, shard_size=500, progress=False)
    return out / "shards"


def train_and_score(run_dir, shards, classifier_file, caption_dropout: float) -> dict:
    """Train the tiny preset at 32 px (unmasked) and score 20 images per class at two guidance scales."""
    settings = {
        "data": shards,
        "steps": CHECK_STEPS,
        "mask_ratio": 0.0,
        "caption_dropout": caption_dropout,
        "warmup_steps": 50,
        "sample_every": 0,
        "checkpoint_every": CHECK_STEPS,
        "log_every": 100,
    }
    done = run_stage(run_dir, settings, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    generated = run_dir / "pf" / "generated.npz"
    args = ["generate", "--ckpt", str(run_dir), "--out", str(generated), "--per-class", "20", "--steps", "12"]
    assert pf.main([*args, "--guidance", "1", "3", "--batch-size", "200", "--device", "cpu"]) == 0
    scores_file = run_dir / "pf" / "scores.json"
    score = ["score", "--generated", str(generated), "--classifier", str(classifier_file), "--out", str(scores_file)]
    assert pf.main(score) == 0  # prints the score table (shown by pytest when a check fails)
    return json.loads(scores_file.read_text())


def check(run_dir) -> int:
    return pf.main(["check", "--scores", str(run_dir / "pf" / "scores.json"), "--margin", str(CHECK_MARGIN)])


def test_trained_tiny_model_follows_class_prompts(tmp_path, fmnist_small, classifier_file):
    scores = train_and_score(tmp_path / "run", fmnist_small, classifier_file, caption_dropout=0.1)
    rows = scores["rows"]
    verdict, reason = pf.passes(scores, CHECK_MARGIN)
    assert verdict, reason
    assert rows["real"]["accuracy"] > 0.7 and rows["vae_roundtrip"]["accuracy"] > 0.5
    lo, hi = scores["chance_band_3sigma"]
    assert lo < rows["shuffled"]["accuracy"] < hi
    assert rows["untrained"]["accuracy"] < hi
    assert check(tmp_path / "run") == 0


def test_check_fails_when_the_caption_path_is_zeroed(tmp_path, fmnist_small, classifier_file):
    """The same run with every caption replaced by the all-zero embedding (caption dropout 1): the
    model never sees a prompt, so its guided images are no more class-faithful than unconditional ones."""
    scores = train_and_score(tmp_path / "run", fmnist_small, classifier_file, caption_dropout=1.0)
    verdict, reason = pf.passes(scores, CHECK_MARGIN)
    assert not verdict, reason
    assert check(tmp_path / "run") == 1


def test_entry_point_runs_from_anywhere(tmp_path):
    import subprocess
    import sys

    from train_helpers import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "prompt_following.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "generate" in done.stdout and "shuffled" in done.stdout
