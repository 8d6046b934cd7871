import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    from sedit.presets import PRESETS

    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def builtin_small(tmp_path_factory):
    """The built-in emoji set, cut to 48 samples in 4 shards (real rendering, VAE, text encoder, prepare)."""
    from sedit.data.builtin import build

    out = tmp_path_factory.mktemp("builtin-small")
    build(out, vae_steps=30, limit=48, shard_size=12, progress=False)
    return out / "shards"
