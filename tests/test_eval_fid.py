"""FID/KID/precision-recall with the real FID Inception weights, fully offline."""

import json

import numpy as np
import pytest
import torch
from eval_helpers import inception_weights, noise_images, smooth_images
from PIL import Image
from torch.utils.data import Dataset

from sedit.eval.fid import ImageFiles, center_crop_resize, compute_metrics, reference_cache_name


@pytest.fixture(scope="module")
def weights():
    path, real = inception_weights()
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("fid")
    return smooth_images(base / "a", 12, seed=0), noise_images(base / "b", 12, seed=1), base


class Unreadable(Dataset):
    """A reference set of the right size whose images must not be read (they come from the cache)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        raise AssertionError("reference image read although its features are cached")


def test_converted_weights_match_the_source_network(weights):
    record_file = weights.with_name(weights.name + ".json")
    if not record_file.is_file():
        pytest.fail("FALLBACK in use: no conversion record (random Inception weights)")
    record = json.loads(record_file.read_text())
    assert record["source_sha1"] == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert record["max_feature_abs_diff"] < 1e-4


def test_fid_kid_prc_self_near_zero_other_distribution_large_and_cached(weights, folders, tmp_path):
    a, b, _ = folders
    cache = tmp_path / "cache"
    same = compute_metrics(a, a, 64, weights, kid=True, reference_cache_name="ref-a", cache_dir=cache)
    assert abs(same["fid"]) < 1e-2
    # KID is unbiased: identical sets give a value at or slightly below 0 (self-similarity excluded)
    assert same["kid_mean"] < 1e-3
    assert any(cache.iterdir())  # reference features/statistics written

    cached = Unreadable(len(a))
    other = compute_metrics(b, cached, 64, weights, kid=True, prc=True, reference_cache_name="ref-a", cache_dir=cache)
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-3) and other["fid"] > 10
    assert other["kid_mean"] > 0 and other["kid_mean"] > 10 * abs(same["kid_mean"])  # KID agrees with FID
    assert 0 <= other["precision"] <= 1 and 0 <= other["recall"] <= 1
    assert other["precision"] < 0.5


def test_reference_cache_name_tracks_files_resolution_and_weights(folders):
    a, _, base = folders
    root = base / "a"
    name = reference_cache_name(a, root, 256, "w1")
    assert name == reference_cache_name(list(a), root, 256, "w1")
    assert name != reference_cache_name(a, root, 512, "w1")
    assert name != reference_cache_name(a, root, 256, "w2")  # never mix statistics of different weights
    assert name != reference_cache_name(a[:-1], root, 256, "w1")


def test_center_crop_resize_protocol():
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)
    pixels[:, 20:80] = 255  # the centered 60x60 square is white, the side bands black
    out = center_crop_resize(Image.fromarray(pixels), 30)
    assert out.size == (30, 30)
    assert np.asarray(out).min() == 255


def test_image_files_give_uint8_chw_at_the_protocol_resolution(folders):
    a, _, _ = folders
    x = ImageFiles(a[:1], 32)[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
