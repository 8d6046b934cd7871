"""Encoders load from local folders (no hub) and produce the documented features."""

import numpy as np
import open_clip
import pytest
import torch
from data_helpers import tiny_encoders
from diffusers import AutoencoderKL

from sedit.data.encoders import load_text_encoder, load_vae


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return tiny_encoders(tmp_path_factory.getbasetemp())


def test_vae_loads_from_local_folder(encoders):
    vae = load_vae(encoders[0])
    assert isinstance(vae.model, AutoencoderKL)
    assert (vae.latent_channels, vae.downsample) == (4, 4)
    z = vae.encode(torch.zeros(2, 3, 32, 32), seeds=[0, 1])
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    assert vae.decode(z).shape == (2, 3, 32, 32)


def test_vae_latents_scaled_and_seeded_per_sample(encoders):
    vae = load_vae(encoders[0])
    vae.scaling_factor = 0.5
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = vae.encode(x, seeds=[7, 8, 9])
    alone = vae.encode(x[2:], seeds=[9])
    torch.testing.assert_close(z[2:], alone, rtol=1e-4, atol=1e-5)  # independent of the batch
    dist = vae.model.encode(x).latent_dist
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(z[1], 0.5 * (dist.mean[1] + dist.std[1] * noise), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.decode(z), vae.model.decode(z / 0.5).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_text_encoder_tokens_and_pooled(encoders):
    text = load_text_encoder(encoders[1])
    assert isinstance(text.tokenizer, open_clip.tokenizer.SimpleTokenizer)  # bundled vocabulary, offline
    assert (text.context_length, text.width, text.pooled_dim) == (77, 32, 32)
    captions = ["red apple", "grinning face", "red apple"]
    tokens, pooled = text.encode(captions)
    assert tokens.shape == (3, 77, 32) and pooled.shape == (3, 32)
    torch.testing.assert_close(tokens[0], tokens[2])
    assert not torch.allclose(tokens[0], tokens[1])
    # pooled = the end-of-text token of the final-LayerNorm output, projected (OpenCLIP's encode_text)
    ids = text.tokenizer(captions)
    eot = ids.argmax(dim=-1)
    expected = tokens[torch.arange(3), eot] @ text.model.text_projection
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    # tokens are normalised per position by the final LayerNorm (unit variance before its affine)
    ln = text.model.ln_final
    raw = (tokens - ln.bias) / ln.weight
    np.testing.assert_allclose(raw.var(dim=-1, unbiased=False).numpy(), 1.0, atol=1e-3)


def test_text_encoder_accepts_local_dir_schema(encoders):
    a = load_text_encoder(encoders[1]).encode(["a cat"])[0]
    b = load_text_encoder(f"local-dir:{encoders[1]}").encode(["a cat"])[0]
    torch.testing.assert_close(a, b)


def test_text_encoder_refuses_unknown_name():
    with pytest.raises(ValueError, match="expected a local directory"):
        load_text_encoder("no-such-model")


def test_vae_hub_names_may_name_a_subfolder(monkeypatch):
    from sedit.data import encoders

    calls = []

    def fake_from_pretrained(repo, subfolder=None, **kw):
        calls.append((repo, subfolder))
        raise OSError("offline")

    monkeypatch.setattr(encoders.AutoencoderKL, "from_pretrained", fake_from_pretrained)
    for name in (encoders.DEFAULT_VAE, "stabilityai/sdxl-vae"):
        with pytest.raises(OSError):
            load_vae(name)
    assert calls == [("stabilityai/stable-diffusion-xl-base-1.0", "vae"), ("stabilityai/sdxl-vae", None)]
