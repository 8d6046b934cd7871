"""Samplers as pure functions: ``sample_heun(denoiser, x, sigmas, ...)``, denoiser(x, sigma) -> D.

Noise is drawn per seed, so image k depends only on seed k and not on the batch it was drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then a final 0: (steps + 1,)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device=None) -> torch.Tensor:
    """Standard normal noise of shape (len(seeds), *shape); row k drawn from seed k alone."""
    rows = [torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, math.inf),
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """EDM Algorithm 2: 2nd-order Heun steps along sigmas (descending, ending at 0).

    ``x`` is the initial noise already scaled by sigmas[0]. With churn > 0 each step first raises the
    noise level to sigma_hat = sigma (1 + gamma), gamma = min(churn / n, sqrt(2) - 1), inside churn_range.
    The last step (to sigma = 0) is a plain Euler step: 2n - 1 denoiser calls for n steps.
    """
    x = x.double()
    sigmas = sigmas.to(torch.float64)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if churn_range[0] <= sigma <= churn_range[1] else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * s_noise
            x = x + (sigma_hat**2 - sigma**2).sqrt() * eps
        d = (x - denoiser(x, sigma_hat).double()) / sigma_hat  # dx/dsigma
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = (x_next - denoiser(x_next, sigma_next).double()) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x)
    return x


def guided_denoiser(precond, captions: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Denoiser:
    """Classifier-free guidance: D_u + scale (D_c - D_u), the unconditional input an all-zero caption.

    Both branches run in one batched call. scale == 1 runs the conditional branch alone.
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sig = torch.full((n,), float(sigma), device=x.device)
        if scale == 1.0:
            return precond(x.to(dtype), sig, captions)
        null = torch.zeros_like(captions)
        both = precond(torch.cat([x, x]).to(dtype), torch.cat([sig, sig]), torch.cat([captions, null]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return denoise


def generate_latents(
    precond,
    captions: torch.Tensor,
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    steps: int = 30,
    guidance_scale: float = 5.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    churn: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Latents (N, C, H, W) for N captions, image k from seed k; the network sees inputs in ``dtype``."""
    device = captions.device
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).to(device)
    x = seeded_noise(seeds, latent_shape, device).double() * sigmas[0]
    denoiser = guided_denoiser(precond, captions.to(dtype), guidance_scale, dtype)
    generator = torch.Generator(device=device).manual_seed(int(seeds[0])) if churn > 0 else None
    return sample_heun(denoiser, x, sigmas, churn=churn, generator=generator).float()


def sample_images(
    precond,
    text_encoder,
    vae,
    captions: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    steps: int,
    guidance_scale: float,
    diffusion,
    churn: float = 0.0,
    precision: str = "fp32",
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for N caption strings, image k from seed k.

    Captions are encoded by ``text_encoder`` (its per-token features condition the model), latents are
    sampled with ``generate_latents`` under ``diffusion``'s sigma range and rho, and ``vae`` decodes
    them. ``precision="bf16"`` runs the networks in bfloat16 autocast.
    """
    device = text_encoder.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        tokens, _ = text_encoder.encode(list(captions))  # (N, L, W)
        latents = generate_latents(
            precond,
            tokens,
            seeds=seeds,
            latent_shape=latent_shape,
            steps=steps,
            guidance_scale=guidance_scale,
            sigma_min=diffusion.sigma_min,
            sigma_max=diffusion.sigma_max,
            rho=diffusion.rho,
            churn=churn,
        )  # (N, C, h, w)
        return vae.decode(latents)  # (N, 3, H, W)
