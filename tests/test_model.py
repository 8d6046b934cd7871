import dataclasses

import pytest
import torch

from helpers import perturb_zero_init
from sedit.layers import grid_coordinates, sincos_2d
from sedit.masking import gather_tokens, kept_count, patchify, random_keep_indices, scatter_tokens, unpatchify
from sedit.model import backbone_shapes, build_model, mixer_shapes, parameter_counts
from sedit.presets import PRESETS


def test_xl_preset_matches_reference_size():
    counts = parameter_counts(build_model(PRESETS["XL"], "meta"))
    print(f"XL: {counts['total'] / 1e9:.4f}B total, {counts['active'] / 1e9:.4f}B active per token")
    assert abs(counts["total"] / 1.16e9 - 1) < 0.03
    assert abs(counts["active"] / 0.71e9 - 1) < 0.03


def test_xl_gelu_experts_keep_size():
    counts = parameter_counts(build_model(dataclasses.replace(PRESETS["XL"], expert_gated=False), "meta"))
    assert abs(counts["total"] / 1.16e9 - 1) < 0.03


def test_xl_layerwise_scaling_and_moe_placement():
    shapes = backbone_shapes(PRESETS["XL"])
    assert len(shapes) == 28
    assert shapes[0].attn_dim == 512 and shapes[-1].attn_dim == 1024  # 8 -> 16 heads of 64
    assert [s.attn_dim for s in shapes] == sorted(s.attn_dim for s in shapes)
    assert [i for i, s in enumerate(shapes) if s.moe] == list(range(1, 27, 2))  # 13 of 28, never the last
    assert shapes[-1].ffn_hidden == 2816  # SwiGLU 2/3 of ratio 4.0 * 1024, rounded to 256
    assert [i for i, s in enumerate(mixer_shapes(PRESETS["XL"])) if s.moe] == [1, 3, 5]


@pytest.mark.parametrize("side", [8, 16])  # 256px- and 512px-equivalent token grids for tiny
@pytest.mark.parametrize("mask_ratio", [0.0, 0.75])
def test_forward_backward_reaches_every_part(tiny_cfg, side, mask_ratio):
    torch.manual_seed(0)
    net = build_model(tiny_cfg)
    perturb_zero_init(net)
    n = 3
    x = torch.randn(n, tiny_cfg.in_channels, side, side)
    caps = torch.randn(n, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    tokens = (side // tiny_cfg.patch_size) ** 2
    keep = random_keep_indices(n, tokens, mask_ratio) if mask_ratio else None
    out = net(x, torch.randn(n), caps, keep)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()

    def grad_norm(prefix):
        grads = [p.grad for name, p in net.named_parameters() if prefix in name]
        assert grads, prefix
        return sum(g.abs().sum().item() for g in grads if g is not None)

    for part in ["router", "experts", "mixer.", "modulation", "blocks.", "caption_encoder", "noise_embed"]:
        assert grad_norm(part) > 0, part
    for moe in net.moe_layers():
        assert moe.router.weight.weight.grad.abs().sum() > 0
        assert moe.experts.w1.grad.abs().sum() > 0


def test_zero_init_output_is_zero(tiny_cfg):
    net = build_model(tiny_cfg)
    out = net(torch.randn(2, 4, 8, 8), torch.randn(2), torch.randn(2, tiny_cfg.caption_len, tiny_cfg.caption_dim))
    assert torch.equal(out, torch.zeros_like(out))


def test_masked_tokens_do_not_influence_output(tiny_cfg):
    torch.manual_seed(1)
    net = build_model(tiny_cfg)
    perturb_zero_init(net)
    net.mixer = torch.nn.ModuleList()  # mixer sees all tokens by design; check the backbone path only
    x = torch.randn(2, 4, 8, 8)
    keep = random_keep_indices(2, 16, 0.75, torch.Generator().manual_seed(0))
    caps = torch.randn(2, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    c = torch.randn(2)
    ref = patchify(net(x, c, caps, keep), 2)
    x2 = patchify(x.clone(), 2)
    dropped = torch.ones(2, 16, dtype=torch.bool)
    dropped.scatter_(1, keep, False)
    x2[dropped] += 10.0
    out = patchify(net(unpatchify(x2, 2, 4, 8, 8), c, caps, keep), 2)
    kept_rows = ~dropped
    torch.testing.assert_close(out[kept_rows], ref[kept_rows])


def test_masking_keeps_exact_count_per_image():
    assert kept_count(256, 0.75) == 64 and kept_count(1024, 0.75) == 256
    g = torch.Generator().manual_seed(0)
    idx = random_keep_indices(5, 256, 0.75, g)
    assert idx.shape == (5, 64)
    for row in idx:
        assert len(set(row.tolist())) == 64 and (row.diff() > 0).all()
    assert not torch.equal(idx[0], idx[1])  # independent per image
    x = torch.randn(5, 256, 7)
    back = scatter_tokens(gather_tokens(x, idx), idx, 256)
    mask = torch.zeros(5, 256, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()


def test_patchify_roundtrip():
    x = torch.randn(2, 4, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 4, 8, 12), x)
    assert patchify(x, 2).shape == (2, 24, 16)


def test_position_embedding_scale_rule():
    # a 64x64 grid at scale 2 spans the range of the 32x32 grid at scale 1 ...
    fine, coarse = grid_coordinates(64, 32), grid_coordinates(32, 32)
    assert fine[0] == coarse[0] == 0 and fine[-1] == pytest.approx(31.5) and coarse[-1] == 31
    assert fine[::2].tolist() == coarse.tolist()
    # ... so every second row/column of the fine embedding equals the coarse embedding
    e_fine = sincos_2d(64, 64, 32).view(64, 64, 64)
    e_coarse = sincos_2d(64, 32, 32).view(32, 32, 64)
    torch.testing.assert_close(e_fine[::2, ::2], e_coarse)
    # and the same holds for the token grids of the recipe (16 at 256px, 32 at 512px, patch 2)
    torch.testing.assert_close(sincos_2d(32, 32, 16).view(32, 32, 32)[::2, ::2], sincos_2d(32, 16, 16).view(16, 16, 32))


def test_model_switches_resolution_without_new_state(tiny_cfg):
    net = build_model(tiny_cfg)
    keys = set(net.state_dict())
    caps = torch.randn(1, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    net(torch.randn(1, 4, 16, 16), torch.zeros(1), caps)
    assert net.pos_embed.shape == (64, tiny_cfg.mixer_width)
    assert set(net.state_dict()) == keys


def test_use_grid_prepares_the_embedding_a_forward_then_reuses(tiny_cfg):
    """Compiled forwards (CUDA graphs) must not replace the buffer: use_grid does it beforehand."""
    net = build_model(tiny_cfg)
    net.use_grid(8)
    prepared = net.pos_embed
    torch.testing.assert_close(prepared, sincos_2d(tiny_cfg.mixer_width, 8, tiny_cfg.base_grid))
    caps = torch.randn(1, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    net(torch.randn(1, 4, 16, 16), torch.zeros(1), caps)  # 16 / patch 2 = the 8x8 grid
    assert net.pos_embed is prepared


def test_the_mixer_stream_runs_in_the_autocast_dtype(tiny_cfg):
    """fp32 latents in, bf16 residual stream through the patch-mixer (not fp32 from the position sum)."""
    net = build_model(tiny_cfg)
    seen = []
    for block in net.mixer:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    caps = torch.randn(2, tiny_cfg.caption_len, tiny_cfg.caption_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 4, 8, 8), torch.zeros(2), caps)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * len(net.mixer)
    assert torch.isfinite(out.float()).all()


def test_layer_norm_stays_in_bf16_under_autocast():
    from sedit.layers import LayerNorm

    norm = LayerNorm(32, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.layer_norm(x.float(), (32,), norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)
