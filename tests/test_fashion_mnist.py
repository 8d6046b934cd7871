"""Fashion-MNIST: the IDX reader, the Debian files, the caption folder, and the prompt-following classifier."""

import gzip
import json

import numpy as np
import pytest
import torch
from data_helpers import read_shard
from PIL import Image

from sedit.data import fashion_mnist as fm
from sedit.eval.classifier import (
    accuracy,
    features,
    load_classifier,
    predict,
    prompt_following,
    save_classifier,
    train_classifier,
)


def idx_bytes(values: np.ndarray, type_code: int) -> bytes:
    """An IDX file written by hand: magic 00 00 <type> <ndim>, big-endian uint32 sizes, big-endian values."""
    header = bytes([0, 0, type_code, values.ndim]) + b"".join(n.to_bytes(4, "big") for n in values.shape)
    return header + values.astype(values.dtype.newbyteorder(">")).tobytes()


# ----------------------------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_round_trip(tmp_path, gzipped):
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    counts = np.array([1, -2, 70000], dtype=np.int32)  # big-endian on disk, native after reading
    for name, values, code in (("pixels", pixels, 0x08), ("counts", counts, 0x0C)):
        data = idx_bytes(values, code)
        path = tmp_path / (f"{name}.gz" if gzipped else name)
        path.write_bytes(gzip.compress(data) if gzipped else data)
        read = fm.read_idx(path)
        assert read.shape == values.shape and read.dtype == values.dtype
        np.testing.assert_array_equal(read, values)


def test_read_idx_names_the_file_it_refuses(tmp_path):
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8), 0x08)
    bad_magic, truncated, corrupt_gzip = tmp_path / "magic", tmp_path / "short", tmp_path / "broken.gz"
    bad_magic.write_bytes(b"\x01\x02" + good[2:])
    truncated.write_bytes(good[:-1])
    corrupt_gzip.write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(ValueError, match=f"{bad_magic}: not an IDX file"):
        fm.read_idx(bad_magic)
    with pytest.raises(ValueError, match=f"{truncated}: 17 bytes, but an IDX file .* has 18$"):
        fm.read_idx(truncated)
    with pytest.raises(ValueError, match=f"{corrupt_gzip}: corrupt gzip"):
        fm.read_idx(corrupt_gzip)


# ----------------------------------------------------------------------------------------------
# The Debian files and the caption folder
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return {split: fm.load_split(split) for split in ("train", "test")}


@pytest.mark.parametrize("split, size", [("train", 60_000), ("test", 10_000)])
def test_debian_files_have_the_documented_sizes(splits, split, size):
    images, labels = splits[split]
    assert images.shape == (size, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [size // 10] * 10
    assert fm.SPLIT_SIZES[split] == size and len(fm.CLASSES) == 10


def test_captions_follow_the_template():
    assert fm.caption(7) == "a photo of a sneaker"
    assert fm.caption(0, "{name}, product photo") == "t-shirt/top, product photo"
    with pytest.raises(ValueError, match="no \\{name\\} field"):
        fm.caption(0, "a photo")


def test_materialise_writes_captioned_pngs(tmp_path, splits):
    images, labels = splits["test"]
    assert fm.materialise(tmp_path, "test", limit=20, template="an image of a {name}") == 20
    pngs, captions = sorted(tmp_path.glob("*.png")), sorted(tmp_path.glob("*.txt"))
    assert len(pngs) == 20 and len(captions) == 20
    for index, png in enumerate(pngs):
        label = fm.label_of(png.stem)
        assert png.stem == fm.sample_name("test", index, label) and label == labels[index]
        assert png.with_suffix(".txt").read_text() == f"an image of a {fm.CLASSES[label].lower()}\n"
    picture = Image.open(pngs[0])
    assert picture.size == (fm.SIZE, fm.SIZE) and picture.mode == "RGB"
    small = np.asarray(picture.convert("L").resize((28, 28), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(small - images[0]).mean() < 10  # the original image, upscaled


def test_build_prepares_shards_whose_keys_carry_labels(tmp_path):
    manifest = fm.build(tmp_path, limit=12, vae_steps=2, vae_images=12, shard_size=6, progress=False)
    assert manifest["samples"] == 12 and manifest["resolutions"] == [32, 64]
    assert manifest["source"]["kind"] == "fashion-mnist"
    assert json.loads((tmp_path / "fashion_mnist.json").read_text())["samples"] == 12
    samples = read_shard(tmp_path / "shards" / "shard-000000.tar")
    labels = fm.load_split("train")[1]
    for key, members in samples.items():
        assert members["txt"].decode() == fm.caption(int(labels[int(key.split("-")[1])]))
        assert fm.label_of(key) == labels[int(key.split("-")[1])]
    with pytest.raises(ValueError, match="another materialisation"):
        fm.build(tmp_path, limit=13, progress=False)


# ----------------------------------------------------------------------------------------------
# Classifier
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(splits):
    """Trained on 4000 real training images for 2 epochs (about 6 s on one thread)."""
    images, labels = splits["train"]
    return train_classifier(fm.to_pixels(images[:4000]), torch.from_numpy(labels[:4000]), epochs=2, width=16)


@pytest.fixture(scope="module")
def test_set(splits):
    images, labels = splits["test"]
    return fm.to_pixels(images[:2000]), torch.from_numpy(labels[:2000])


def test_classifier_learns_fashion_mnist(trained, test_set):
    images, labels = test_set
    assert accuracy(trained, images, labels) > 0.7  # measured 0.81; chance 0.1
    rgb_64 = torch.nn.functional.interpolate(images, size=64, mode="bilinear").expand(-1, 3, -1, -1)
    assert accuracy(trained, rgb_64, labels) > 0.7  # what a 64 px sampler would hand it


def test_prompt_following_is_chance_for_shuffled_prompts(trained, test_set):
    images, labels = test_set
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    assert prompt_following(trained, images, shuffled) < 0.2
    assert prompt_following(trained, images, labels) > 0.7


def test_classifier_save_load_and_features(tmp_path, trained, test_set):
    images = test_set[0][:64]
    path = save_classifier(trained, tmp_path / "classifier.safetensors", {"test_accuracy": 0.8})
    loaded = load_classifier(path)
    assert torch.equal(predict(loaded, images), predict(trained, images))
    assert features(loaded, images).shape == (64, 128)
    (tmp_path / "other.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="other.safetensors: not a safetensors file"):
        load_classifier(tmp_path / "other.safetensors")


def test_classifier_training_is_deterministic(splits):
    images, labels = splits["train"]
    x, y = fm.to_pixels(images[:128]), torch.from_numpy(labels[:128])
    first, second = (train_classifier(x, y, epochs=1, seed=3, width=8) for _ in range(2))
    other = train_classifier(x, y, epochs=1, seed=4, width=8)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.head.weight, other.head.weight)
