"""Data pipeline: precomputed VAE latents and text embeddings in webdataset shards.

- ``sedit.data.encoders``: load the VAE (AutoencoderKL) and the OpenCLIP text encoder; tiny builders.
- ``sedit.data.prepare``: ``python -m sedit.data.prepare``, images + captions -> shards (``shards``
  describes the format; ``sources`` lists inputs; ``images`` decodes, resizes and crops them).
"""
