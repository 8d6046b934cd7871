"""sedit: sparse elucidated diffusion transformers (expert-choice MoE DiT trained with EDM)."""

__version__ = "0.1.0"
