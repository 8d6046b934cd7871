"""The sparse diffusion transformer (DESIGN.md §1), readable top to bottom.

    latent (N, C, H, W) --patchify--> (N, T, pC) --embed + pos--> patch-mixer (all T tokens)
      --project to D, keep K of T tokens--> backbone (K tokens) --refill masked slots with zeros-->
      final layer --unpatchify--> F(x) (N, C, H, W)

Every block is conditioned on c = embed(c_noise) + MLP(mean caption token) through adaLN-Zero,
and cross-attends to the refined caption tokens. FFNs of blocks 1, 3, 5, ... are expert-choice MoE.
Shape notation: N images, T tokens, K kept tokens, L caption tokens, D width, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sedit.config import ModelConfig
from sedit.layers import (
    CaptionEncoder,
    CrossAttention,
    LayerNorm,
    NoiseLevelEmbedder,
    SelfAttention,
    SwiGLU,
    modulate,
    round_to_multiple,
    sincos_2d,
)
from sedit.masking import gather_tokens, patchify, scatter_tokens, unpatchify
from sedit.moe import ExpertChoiceMoE

# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockShape:
    """Widths of one block after layer-wise scaling."""

    dim: int
    attn_dim: int
    ffn_hidden: int
    moe: bool


class Block(nn.Module):
    """adaLN-Zero block: gated self-attention, cross-attention to captions, gated FFN (dense or MoE).

    x = x + g_a * SelfAttn(modulate(LN(x), b_a, s_a))
    x = x + CrossAttn(LN(x), captions)
    x = x + g_f * FFN(modulate(LN(x), b_f, s_f))
    """

    def __init__(self, shape: BlockShape, cond_dim: int, kv_dim: int, cfg: ModelConfig):
        super().__init__()
        dim, eps = shape.dim, cfg.norm_eps
        self.norm_attn = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, shape.attn_dim, cfg.head_dim, eps)
        self.norm_cross = LayerNorm(dim, eps=eps, bias=False)
        self.cross = CrossAttention(dim, kv_dim, cfg.head_dim, eps)
        self.norm_ffn = LayerNorm(dim, eps=eps, elementwise_affine=False)
        if shape.moe:
            self.ffn = ExpertChoiceMoE(dim, shape.ffn_hidden, cfg.num_experts, cfg.capacity, cfg.expert_gated)
        else:
            self.ffn = SwiGLU(dim, shape.ffn_hidden)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))  # zero-initialised

    def forward(self, x: torch.Tensor, cond: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(cond).chunk(6, dim=-1)  # (N, D) each
        x = x + gate_a[:, None] * self.attn(modulate(self.norm_attn(x), shift_a, scale_a))
        x = x + self.cross(self.norm_cross(x), captions)
        return x + gate_f[:, None] * self.ffn(modulate(self.norm_ffn(x), shift_f, scale_f))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised linear map to p*p*C values per token."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


# ----------------------------------------------------------------------------------------------
# Layer-wise scaling
# ----------------------------------------------------------------------------------------------


def is_moe_block(index: int, depth: int, every: int, last_allowed: bool) -> bool:
    """MoE in blocks every-1, 2*every-1, ... (1, 3, 5, ... for every=2); optionally never the last."""
    if every <= 0 or (index == depth - 1 and not last_allowed):
        return False
    return index % every == every - 1


def ffn_hidden(dim: int, ratio: float, multiple: int, gated: bool) -> int:
    """FFN hidden size for an MLP ratio. Gated (SwiGLU) FFNs have three matrices instead of two, so
    they take 2/3 of the hidden size to keep the parameter count of a ratio-r GELU MLP."""
    return round_to_multiple(dim * ratio * (2 / 3 if gated else 1), multiple)


def block_shape(dim: int, attn_dim: int, ratio: float, moe: bool, cfg: ModelConfig) -> BlockShape:
    gated = cfg.expert_gated if moe else True  # dense FFNs are always SwiGLU
    return BlockShape(dim, attn_dim, ffn_hidden(dim, ratio, cfg.ffn_multiple, gated), moe)


def backbone_shapes(cfg: ModelConfig) -> list[BlockShape]:
    """Self-attention width and FFN size rise linearly from the first block to the last."""
    shapes = []
    for i in range(cfg.depth):
        t = i / (cfg.depth - 1) if cfg.depth > 1 else 1.0
        attn_ratio = cfg.attn_ratio[0] + t * (cfg.attn_ratio[1] - cfg.attn_ratio[0])
        ffn_ratio = cfg.ffn_ratio[0] + t * (cfg.ffn_ratio[1] - cfg.ffn_ratio[0])
        attn_dim = round_to_multiple(cfg.width * attn_ratio, cfg.head_dim)
        moe = is_moe_block(i, cfg.depth, cfg.moe_every, last_allowed=False)
        shapes.append(block_shape(cfg.width, attn_dim, ffn_ratio, moe, cfg))
    return shapes


def mixer_shapes(cfg: ModelConfig) -> list[BlockShape]:
    moe = [is_moe_block(i, cfg.mixer_depth, cfg.moe_every, last_allowed=True) for i in range(cfg.mixer_depth)]
    return [block_shape(cfg.mixer_width, cfg.mixer_width, cfg.mixer_ffn_ratio, m, cfg) for m in moe]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class SparseDiT(nn.Module):
    """F_theta(c_in * x; c_noise, captions) of EDM: the raw network, without preconditioning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p, c = cfg.width, cfg.patch_size, cfg.in_channels
        self.patch_embed = nn.Linear(p * p * c, cfg.mixer_width)
        self.register_buffer("pos_embed", sincos_2d(cfg.mixer_width, cfg.base_grid, cfg.base_grid), persistent=False)
        self.noise_embed = NoiseLevelEmbedder(d, cfg.freq_dim)
        self.pooled_caption_embed = nn.Sequential(nn.Linear(cfg.caption_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.caption_encoder = CaptionEncoder(cfg.caption_dim, d, cfg.head_dim, cfg.norm_eps)
        self.mixer = nn.ModuleList(Block(s, d, d, cfg) for s in mixer_shapes(cfg))
        self.mixer_to_backbone = nn.Linear(cfg.mixer_width, d, bias=False)
        self.blocks = nn.ModuleList(Block(s, d, d, cfg) for s in backbone_shapes(cfg))
        self.final = FinalLayer(d, d, p * p * c, cfg.norm_eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears; router small-normal; every adaLN and the output map start at zero,
        so each block starts as the identity on its gated paths and F starts at 0 (D = c_skip x)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ExpertChoiceMoE):
                nn.init.normal_(module.router.weight.weight, std=0.02)
                module.experts.reset_parameters()
        for block in [*self.mixer, *self.blocks]:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        nn.init.zeros_(self.final.modulation[-1].weight)
        nn.init.zeros_(self.final.modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def use_grid(self, grid: int) -> None:
        """Hold the position embedding of a grid x grid token layout (the buffer is not saved, so
        checkpoints never go stale). Call it before compiling for a resolution other than the base
        grid's: a compiled forward must not replace the buffer (under CUDA graphs the graph would own
        the new one and overwrite it on the next replay)."""
        if self.pos_embed.shape[0] != grid * grid:
            self.pos_embed = sincos_2d(self.cfg.mixer_width, grid, self.cfg.base_grid).to(self.pos_embed.device)

    def position_embedding(self, grid: int) -> torch.Tensor:
        """(T, Dm) embedding for a grid x grid token layout, rescaled to the base grid's range."""
        self.use_grid(grid)  # a no-op unless the resolution changed
        return self.pos_embed

    def condition(self, c_noise: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """c = embed(c_noise) + MLP(mean over caption tokens): (N, D)."""
        return self.noise_embed(c_noise) + self.pooled_caption_embed(captions.mean(dim=1))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        captions: torch.Tensor,
        keep_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.cfg.patch_size
        if h != w or h % p:
            raise ValueError(f"latent must be square with side a multiple of {p}, got {h}x{w}")
        captions = captions.to(x.dtype)
        cond = self.condition(c_noise, captions)  # (N, D)
        context = self.caption_encoder(captions)  # (N, L, D)

        tokens = self.patch_embed(patchify(x, p))  # (N, T, Dm), in the compute dtype (bf16 under autocast)
        tokens = tokens + self.position_embedding(h // p).to(tokens.dtype)  # the residual stream stays in it
        for block in self.mixer:
            tokens = block(tokens, cond, context)
        tokens = self.mixer_to_backbone(tokens)  # (N, T, D)

        t = tokens.shape[1]
        if keep_index is not None:
            tokens = gather_tokens(tokens, keep_index)  # (N, K, D)
        for block in self.blocks:
            tokens = block(tokens, cond, context)
        if keep_index is not None:
            tokens = scatter_tokens(tokens, keep_index, t)  # (N, T, D), zeros where masked

        out = self.final(tokens, cond)  # (N, T, p*p*C)
        return unpatchify(out, p, c, h, w)

    def moe_layers(self) -> list[ExpertChoiceMoE]:
        return [m for m in self.modules() if isinstance(m, ExpertChoiceMoE)]


# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------


def parameter_counts(model: SparseDiT) -> dict[str, int]:
    """Total parameters, expert parameters, and parameters active per token.

    Under expert choice a token is processed by capacity experts on average (2 of 8), so the
    active count is the dense part plus capacity/E of every MoE layer's expert weights.
    """
    total = sum(p.numel() for p in model.parameters())
    expert = 0
    active_expert = 0.0
    for moe in model.moe_layers():
        n = sum(p.numel() for p in moe.experts.parameters())
        expert += n
        active_expert += n * moe.capacity / moe.num_experts
    return {"total": total, "expert": expert, "active": int(total - expert + active_expert)}


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> SparseDiT:
    """Construct a model (``device='meta'`` builds shapes only, for counting)."""
    with torch.device(device or "cpu"):
        return SparseDiT(cfg)
