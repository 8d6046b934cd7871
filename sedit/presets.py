"""Model size presets. ``XL`` matches the reference MicroDiT_XL_2 in size and shape (DESIGN.md §1)."""

from __future__ import annotations

from sedit.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the embedded default: seconds per step on two cores.
    "tiny": ModelConfig(
        width=64,
        depth=4,
        head_dim=16,
        mixer_width=32,
        mixer_depth=2,
        num_experts=4,
        ffn_multiple=32,
        caption_dim=32,
        caption_len=8,
        freq_dim=32,
        base_grid=4,
    ),
    "S": ModelConfig(width=384, depth=12, head_dim=64, mixer_width=256, mixer_depth=2, ffn_multiple=128),
    "B": ModelConfig(width=768, depth=16, head_dim=64, mixer_width=512, mixer_depth=4),
    "L": ModelConfig(width=1024, depth=20, head_dim=64, mixer_width=768, mixer_depth=4),
    "XL": ModelConfig(),
}


def preset(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a preset, by name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
