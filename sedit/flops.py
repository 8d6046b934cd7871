"""Analytic model FLOPs per image: the matmuls of the model itself (2 FLOPs per multiply-add).

Counted: every linear map, attention scores and weighted sums, the expert MLPs on the tokens
experts actually take (capacity * T token-slots per layer), the caption encoder. Not counted:
routing/dispatch index moves, norms, activations, softmax (elementwise, a few % at most).
Training = forward + backward = 3 x forward.
"""

from __future__ import annotations

from sedit.config import ModelConfig
from sedit.masking import kept_count
from sedit.model import BlockShape, backbone_shapes, mixer_shapes
from sedit.moe.routing import expert_capacity


def _block_flops(
    shape: BlockShape, tokens: int, caption_tokens: int, cond_dim: int, cfg: ModelConfig, attention: bool
) -> float:
    d, a = shape.dim, shape.attn_dim
    flops = 2 * tokens * d * 3 * a  # qkv
    flops += attention * 2 * 2 * tokens * tokens * a  # scores + weighted sum
    flops += 2 * tokens * a * d  # output projection
    flops += 2 * tokens * d * d  # cross-attention q
    flops += 2 * caption_tokens * cond_dim * 2 * d  # cross-attention k, v from captions
    flops += attention * 2 * 2 * tokens * caption_tokens * d  # cross-attention scores + sum
    flops += 2 * tokens * d * d  # cross-attention output
    flops += 2 * cond_dim * 6 * d  # adaLN modulation (once per image)
    matrices = 3 if (not shape.moe or cfg.expert_gated) else 2
    if shape.moe:
        slots = cfg.num_experts * expert_capacity(tokens, cfg.num_experts, cfg.capacity)
        flops += 2 * slots * d * shape.ffn_hidden * matrices + 2 * tokens * d * cfg.num_experts  # experts + router
    else:
        flops += 2 * tokens * d * shape.ffn_hidden * 3  # SwiGLU
    return flops


def forward_flops_per_image(cfg: ModelConfig, latent_side: int, mask_ratio: float, attention: bool = True) -> float:
    """``attention=False`` leaves out the score and weighted-sum products (for comparing with counters
    that do not see fused attention kernels)."""
    p, d, cap = cfg.patch_size, cfg.width, cfg.caption_len
    tokens = (latent_side // p) ** 2
    kept = kept_count(tokens, mask_ratio) if mask_ratio > 0 else tokens
    flops = 2 * tokens * p * p * cfg.in_channels * cfg.mixer_width  # patch embedding
    # caption encoder: projection MLP, one attention block, SwiGLU 4x; pooled-caption and noise MLPs
    flops += 2 * cap * (cfg.caption_dim * d + d * d) + 2 * cap * 4 * d * d  # projection MLP, attention maps
    flops += attention * 2 * 2 * cap * cap * d + 2 * cap * d * 4 * d * 3  # attention products, SwiGLU
    flops += 2 * (cfg.caption_dim * d + d * d) + 2 * (cfg.freq_dim * d + d * d)
    flops += sum(_block_flops(s, tokens, cap, d, cfg, attention) for s in mixer_shapes(cfg))
    flops += 2 * tokens * cfg.mixer_width * d  # mixer -> backbone projection
    flops += sum(_block_flops(s, kept, cap, d, cfg, attention) for s in backbone_shapes(cfg))
    flops += 2 * d * 2 * d + 2 * tokens * d * p * p * cfg.in_channels  # final layer
    return float(flops)


def train_flops_per_image(cfg: ModelConfig, latent_side: int, mask_ratio: float) -> float:
    return 3.0 * forward_flops_per_image(cfg, latent_side, mask_ratio)
