"""EDM (Karras et al. 2022, arXiv 2206.00364): preconditioning, noise distribution, weighted loss.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))
    c_skip = sd^2 / (sigma^2 + sd^2)     c_out = sigma sd / sqrt(sigma^2 + sd^2)
    c_in   = 1 / sqrt(sigma^2 + sd^2)    c_noise = ln(sigma) / 4
    training: ln sigma ~ N(P_mean, P_std^2), loss = lambda(sigma) |D(y + n; sigma) - y|^2,
    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.
With patch masking the loss averages over the kept patches only.
"""

from __future__ import annotations

import torch
from torch import nn

from sedit.masking import gather_tokens, patchify, random_keep_indices


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for each sigma."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, which makes the effective target unit-variance."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """Wraps the raw network F into the denoiser D(x; sigma, captions)."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, captions: torch.Tensor, keep_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        sigma = sigma.float().reshape(-1, 1, 1, 1)  # (N, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        f = self.net((c_in * x).to(x.dtype), c_noise.flatten(), captions, keep_index)  # (N, C, H, W)
        return c_skip * x.float() + c_out * f.float()


def drop_captions(captions: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each image's caption by the all-zero (unconditional) embedding with probability p."""
    if p <= 0:
        return captions
    keep = torch.rand(captions.shape[0], generator=generator, device=captions.device) >= p  # (N,)
    return captions * keep[:, None, None].to(captions.dtype)


class EDMLoss:
    """EDM training loss with log-normal sigma and optional random patch masking."""

    def __init__(self, p_mean: float, p_std: float, sigma_data: float, patch_size: int):
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data
        self.patch_size = patch_size

    @classmethod
    def from_config(cls, cfg) -> EDMLoss:
        """The loss of a run config (``sedit.config.Config``): its diffusion settings and patch size."""
        d = cfg.diffusion
        return cls(d.p_mean, d.p_std, d.sigma_data, cfg.model.patch_size)

    def sample_sigma(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def __call__(
        self,
        precond: EDMPrecond,
        latents: torch.Tensor,
        captions: torch.Tensor,
        mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        n, _, h, w = latents.shape
        y = latents.float()
        sigma = self.sample_sigma(n, generator, y.device)  # (N,)
        noise = torch.randn(y.shape, generator=generator, device=y.device) * sigma[:, None, None, None]
        keep_index = None
        if mask_ratio > 0:
            tokens = (h // self.patch_size) * (w // self.patch_size)
            keep_index = random_keep_indices(n, tokens, mask_ratio, generator, y.device)  # (N, K)
        denoised = precond((y + noise).to(latents.dtype), sigma, captions, keep_index)  # (N, C, H, W)
        error = loss_weight(sigma, self.sigma_data)[:, None, None, None] * (denoised - y) ** 2
        if keep_index is not None:
            error = gather_tokens(patchify(error, self.patch_size), keep_index)  # (N, K, p*p*C)
        return error.mean()
