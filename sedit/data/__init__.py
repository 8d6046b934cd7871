"""Data pipeline: precomputed VAE latents and text embeddings in webdataset shards.

- ``sedit.data.encoders``: load the VAE (AutoencoderKL) and the OpenCLIP text encoder; tiny builders.
"""
