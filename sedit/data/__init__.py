"""Data pipeline: precomputed VAE latents and text embeddings in webdataset shards (docs/data.md).

- ``sedit.data.encoders``: load the VAE (AutoencoderKL) and the OpenCLIP text encoder; tiny builders.
- ``sedit.data.prepare``: ``python -m sedit.data.prepare``, images + captions -> shards (``shards``
  describes the format; ``sources`` lists inputs; ``images`` decodes, resizes and crops them).
- ``sedit.data.loader``: ``LatentLoader``, the resumable training stream over prepared shards.

``LatentLoader``, ``list_shards`` and ``read_manifest`` are importable from here; ``load_vae`` and
``load_text_encoder`` too, imported on first use (they pull in diffusers and OpenCLIP).
"""

from sedit.data.loader import LatentLoader, list_shards
from sedit.data.shards import read_manifest

__all__ = ["LatentLoader", "list_shards", "read_manifest", "load_vae", "load_text_encoder"]


def __getattr__(name: str) -> object:
    if name in ("load_vae", "load_text_encoder"):
        from sedit.data import encoders

        return getattr(encoders, name)
    raise AttributeError(f"module 'sedit.data' has no attribute {name!r}")
