"""Loader: exactly-once coverage across ranks and workers, exact resume, dropout, failing shards."""

import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from data_helpers import tiny_encoders, write_images

from sedit.data.loader import LatentLoader, buffer_shuffle, epoch_shards
from sedit.data.prepare import prepare
from sedit.data.sources import folder_items

N = 24  # samples, in 8 shards of 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    vae, text = tiny_encoders(tmp_path_factory.getbasetemp())
    write_images(base / "images", N)
    prepare(folder_items(base / "images"), base / "out", vae=vae, text_encoder=text, resolutions=[32], shard_size=3,
            batch_size=8, workers=2, progress=False)  # fmt: skip
    return base / "out"


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def test_batches_hold_latents_caption_tokens_and_pooled(data):
    batch = next(iter(LatentLoader(data, 32, 5, num_workers=0)))
    assert batch["latents"].shape == (5, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["captions"].shape == (5, 77, 32) and batch["pooled"].shape == (5, 32)
    assert len(batch["keys"]) == 5 and batch["texts"][0].startswith("a picture number")
    assert [f"img{int(t.split()[-1]):03d}" for t in batch["texts"]] == batch["keys"]  # caption alignment
    with pytest.raises(ValueError, match="no latents at 64px"):
        LatentLoader(data, 64, 5)


def test_two_ranks_two_workers_cover_each_sample_once_per_epoch(data):
    per_rank = []
    for rank in range(2):
        loader = LatentLoader(data, 32, 2, num_workers=2, epochs=2, rank=rank, world_size=2, shuffle_buffer=4)
        per_rank.append(keys_of(loader))
    every = [f"img{i:03d}" for i in range(N)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(every * 2)  # two epochs: each sample exactly twice
    first_epoch = LatentLoader(data, 32, 2, num_workers=2, epochs=1, rank=0, world_size=2, shuffle_buffer=4)
    second = LatentLoader(data, 32, 2, num_workers=2, epochs=1, rank=1, world_size=2, shuffle_buffer=4)
    a, b = keys_of(first_epoch), keys_of(second)
    assert not set(a) & set(b) and sorted(a + b) == every


def test_order_depends_on_seed_and_epoch(data):
    one = keys_of(LatentLoader(data, 32, 4, num_workers=0, epochs=2, seed=0))
    assert sorted(one[:N]) == sorted(one[N:]) and one[:N] != one[N:]
    assert keys_of(LatentLoader(data, 32, 4, num_workers=0, epochs=2, seed=0)) == one
    assert keys_of(LatentLoader(data, 32, 4, num_workers=0, epochs=2, seed=1)) != one


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_continues_with_next_unseen_samples(data, workers):
    kw = {"num_workers": workers, "shuffle_buffer": 5, "caption_dropout": 0.5, "seed": 3}
    loader = LatentLoader(data, 32, 4, **kw)
    stream = iter(loader)
    seen = [next(stream) for _ in range(5)]  # 20 samples: some readers are mid-epoch, mid-shard
    state = loader.state_dict()
    expected = [next(stream) for _ in range(7)]  # crosses into the next epoch

    resumed = LatentLoader(data, 32, 4, **kw)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(7), resumed, strict=False)]
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g["latents"], e["latents"]) and torch.equal(g["captions"], e["captions"])
        assert torch.equal(g["dropped"], e["dropped"])
    # in the first epoch, nothing delivered before the checkpoint comes again before all others
    first_epoch_rest = N - len(keys_of(seen))
    assert not set(keys_of(seen)) & set(keys_of(got)[:first_epoch_rest])


def test_state_from_another_topology_is_refused(data):
    state = LatentLoader(data, 32, 4, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers: saved 2, now 1"):
        LatentLoader(data, 32, 4, num_workers=1).load_state_dict(state)


def test_caption_dropout_zeroes_tokens_and_pooled(data):
    batch = next(iter(LatentLoader(data, 32, N, num_workers=0, caption_dropout=0.5, epochs=1)))
    dropped = batch["dropped"]
    assert 0 < int(dropped.sum()) < N
    assert not batch["captions"][dropped].any() and not batch["pooled"][dropped].any()
    assert batch["captions"][~dropped].abs().sum(dim=(1, 2)).min() > 0
    assert batch["pooled"][~dropped].abs().sum(dim=1).min() > 0
    clean = next(iter(LatentLoader(data, 32, N, num_workers=0, epochs=1)))
    assert not clean["dropped"].any()


def test_failing_shard_is_logged_counted_and_skipped(data, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    shard = broken / "shard-000002.tar"  # samples img006, img007, img008
    with tarfile.open(shard) as tar:
        end_of_first = max(m.offset_data + m.size for m in tar.getmembers() if m.name.startswith("img006."))
    shard.write_bytes(shard.read_bytes()[: end_of_first + 700])  # cut inside the second sample
    loader = LatentLoader(broken, 32, 4, num_workers=0, epochs=1)
    with caplog.at_level(logging.WARNING, logger="sedit.data.loader"):
        got = keys_of(loader)
    assert sorted(got) == [f"img{i:03d}" for i in range(N) if i not in (7, 8)]
    assert loader.skipped == {"failed_shards": 1, "missing_samples": 2}
    assert "shard-000002.tar failed after" in caplog.text

    shard.write_bytes(b"garbage" * 100)
    loader = LatentLoader(broken, 32, 4, num_workers=0, epochs=1)
    assert len(keys_of(loader)) == N - 3 and loader.skipped == {"failed_shards": 1, "missing_samples": 3}


def test_resampled_stream_is_endless(data):
    loader = LatentLoader(data, 32, 5, num_workers=2, resample=True, world_size=4, rank=3)  # 8 readers
    batches = [b for _, b in zip(range(12), loader, strict=False)]
    assert len(batches) == 12 and all(len(b["keys"]) == 5 for b in batches)
    with pytest.raises(ValueError, match="cannot be split"):
        LatentLoader(data, 32, 5, num_workers=2, world_size=8)  # 16 readers for 8 shards


def test_epoch_shards_partition_and_buffer_never_emits_unread_samples():
    parts = [epoch_shards(10, epoch=3, seed=0, reader=g, readers=4, resample=False) for g in range(4)]
    assert sorted(sum(parts, [])) == list(range(10))
    rng = np.random.default_rng(0)
    order = buffer_shuffle(100, 8, rng)
    assert sorted(order.tolist()) == list(range(100))
    assert (order < np.arange(100) + 8).all()  # emitted at most buffer-1 reads after being read
    assert (buffer_shuffle(10, 1, rng) == np.arange(10)).all()


def test_rank_and_world_come_from_arguments_then_environment(monkeypatch):
    from sedit.data.topology import rank_and_world

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_and_world() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_and_world() == (3, 4)
    assert rank_and_world(rank=1) == (1, 4)
    with pytest.raises(ValueError, match="rank 5 is not in a world of size 4"):
        rank_and_world(rank=5)


def test_reader_whose_shards_all_fail_raises_instead_of_spinning(data, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    for shard in broken.glob("shard-*.tar"):
        shard.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="no shard of epoch 0 could be read"):
        next(iter(LatentLoader(broken, 32, 4, num_workers=0)))
