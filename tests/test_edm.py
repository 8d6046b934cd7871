import math

import pytest
import torch

from sedit.edm import EDMLoss, EDMPrecond, drop_captions, edm_coefficients, loss_weight
from sedit.model import build_model
from sedit.sampling import generate_latents, guided_denoiser, karras_sigmas, sample_heun, seeded_noise


@pytest.mark.parametrize("sigma", [0.002, 0.1, 0.9, 5.0, 80.0])
def test_preconditioning_matches_paper(sigma):
    sd = 0.9
    c_skip, c_out, c_in, c_noise = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2))
    assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2))
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma**2 + sd**2))
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4)
    assert loss_weight(torch.tensor(sigma, dtype=torch.float64), sd).item() == pytest.approx(
        (sigma**2 + sd**2) / (sigma * sd) ** 2
    )
    # lambda * c_out^2 == 1: the effective training target has unit weight at every sigma
    assert (loss_weight(torch.tensor(sigma), sd) * c_out.float() ** 2).item() == pytest.approx(1.0, rel=1e-5)


def test_karras_schedule_endpoints():
    s = karras_sigmas(30, 0.002, 80.0, 7.0)
    assert len(s) == 31 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert s[-1] == 0 and (s.diff() < 0).all()


@pytest.mark.parametrize("churn, steps", [(0.0, 30), (20.0, 200)])  # churn adds error: needs more steps
def test_heun_sampler_on_gaussian_data_with_exact_denoiser(churn, steps):
    sd = 0.9
    calls = []

    def exact(x, sigma):  # E[y | x] for y ~ N(0, sd^2), x = y + sigma n
        calls.append(1)
        return x * sd**2 / (sigma**2 + sd**2)

    sigmas = karras_sigmas(steps, 0.002, 80.0)
    noise = torch.randn(100000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (noise - noise.mean()) / noise.std() * sigmas[0]  # exactly N(0, sigma_max^2) moments: tests the sampler alone
    out = sample_heun(exact, x, sigmas, churn=churn, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() / sd - 1) < 0.02
    assert abs(out.mean().item()) < 0.02
    if churn == 0:
        assert len(calls) == 59  # 30 steps, 2nd order except the last


def test_loss_matches_formula_and_masks_patches(tiny_cfg):
    torch.manual_seed(0)
    net = build_model(tiny_cfg)
    precond = EDMPrecond(net, 0.9)
    y = torch.randn(2, 4, 8, 8)
    caps = torch.randn(2, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    loss_fn = EDMLoss(-0.6, 1.2, 0.9, tiny_cfg.patch_size)
    # zero-initialised F: D = c_skip (y + n), so the loss is computable by hand
    g1 = torch.Generator().manual_seed(3)
    loss = loss_fn(precond, y, caps, mask_ratio=0.0, generator=g1)
    g2 = torch.Generator().manual_seed(3)
    sigma = (torch.randn(2, generator=g2) * 1.2 - 0.6).exp()
    noise = torch.randn(y.shape, generator=g2) * sigma[:, None, None, None]
    c_skip = 0.81 / (sigma**2 + 0.81)
    d = c_skip[:, None, None, None] * (y + noise)
    expected = (loss_weight(sigma, 0.9)[:, None, None, None] * (d - y) ** 2).mean()
    torch.testing.assert_close(loss, expected)

    # masked: loss only over kept patches (perturbing dropped patches of the target changes nothing)
    g = torch.Generator().manual_seed(5)
    masked = loss_fn(precond, y, caps, mask_ratio=0.75, generator=g)
    assert torch.isfinite(masked)


def test_masked_loss_ignores_dropped_patches(tiny_cfg):
    from sedit.masking import patchify, random_keep_indices, unpatchify

    net = build_model(tiny_cfg)
    precond = EDMPrecond(net, 0.9)
    loss_fn = EDMLoss(-0.6, 1.2, 0.9, 2)
    y = torch.randn(2, 4, 8, 8)
    caps = torch.zeros(2, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    # the keep indices the loss will draw: sigma (2), noise (2*4*8*8), then the mask
    g = torch.Generator().manual_seed(7)
    torch.randn(2, generator=g)
    torch.randn(y.shape, generator=g)
    keep = random_keep_indices(2, 16, 0.75, g)
    dropped = torch.ones(2, 16, dtype=torch.bool).scatter_(1, keep, False)
    y_changed = patchify(y.clone(), 2)
    y_changed[dropped] += 3.0
    y_changed = unpatchify(y_changed, 2, 4, 8, 8)
    a = loss_fn(precond, y, caps, 0.75, torch.Generator().manual_seed(7))
    b = loss_fn(precond, y_changed, caps, 0.75, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    c = loss_fn(precond, y_changed, caps, 0.0, torch.Generator().manual_seed(7))
    assert not torch.allclose(a, c)


def test_tiny_model_overfits_fixed_batch(tiny_cfg):
    torch.manual_seed(0)
    net = build_model(tiny_cfg)
    precond = EDMPrecond(net, 0.9)
    loss_fn = EDMLoss(-0.6, 1.2, 0.9, 2)
    y = torch.randn(4, 4, 8, 8) * 0.9
    caps = torch.randn(4, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = loss_fn(precond, y, caps, 0.0, torch.Generator().manual_seed(0))  # same sigma and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_caption_dropout_zeroes_whole_captions():
    caps = torch.ones(1000, 3, 2)
    out = drop_captions(caps, 0.1, torch.Generator().manual_seed(0))
    dropped = (out == 0).all(dim=(1, 2))
    assert ((out == 1).all(dim=(1, 2)) | dropped).all()
    assert 60 < dropped.sum().item() < 140


def test_guidance_and_per_seed_noise(tiny_cfg):
    torch.manual_seed(0)
    net = build_model(tiny_cfg)
    for p in net.final.linear.parameters():
        torch.nn.init.normal_(p, std=0.1)
    precond = EDMPrecond(net, 0.9)
    caps = torch.randn(3, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    a = generate_latents(precond, caps, [10, 11, 12], (4, 8, 8), steps=4, guidance_scale=3.0)
    b = generate_latents(precond, caps[1:2], [11], (4, 8, 8), steps=4, guidance_scale=3.0)
    torch.testing.assert_close(a[1:2], b, atol=1e-4, rtol=1e-4)  # image k depends only on seed k
    assert torch.equal(seeded_noise([5], (2,)), seeded_noise([7, 5], (2,))[1:])
    # CFG: D_u + s (D_c - D_u)
    x = torch.randn(3, 4, 8, 8)
    sig = torch.tensor(1.5)
    guided = guided_denoiser(precond, caps, 3.0)(x, sig)
    with torch.no_grad():
        dc = precond(x, torch.full((3,), 1.5), caps)
        du = precond(x, torch.full((3,), 1.5), torch.zeros_like(caps))
    torch.testing.assert_close(guided, du + 3.0 * (dc - du), atol=1e-5, rtol=1e-5)
