"""The paper's mechanism, applied correctly: Gaussian noise on a client's probabilities theta.

``clamp(theta, c, 1-c) + N(0, sigma^2) -> clamp(c, 1-c)`` over the concatenation of all masked
tensors, ``sigma = z (1 - 2c) sqrt(N)``: one Gaussian mechanism (one accountant step) per round,
client-level DP. Derivation and the size of the noise: docs/privacy.md, "dp = theta".
"""

from __future__ import annotations

import math

import torch

from prism_flwr.privacy.randomness import fresh_generator


def check_clip(clip: float) -> None:
    if not 0 <= clip < 0.5:
        raise ValueError(f"dp clip c must be in [0, 0.5), got {clip!r}")


def theta_sensitivity(numel: int, clip: float) -> float:
    """L2 sensitivity ``(1 - 2c) sqrt(n)`` of a vector of n probabilities in ``[c, 1-c]``."""
    if int(numel) != numel or numel < 1:
        raise ValueError(f"numel must be a positive integer, got {numel!r}")
    check_clip(clip)
    return (1.0 - 2.0 * clip) * math.sqrt(numel)


def privatize_theta(
    thetas: list[torch.Tensor], clip: float, noise_multiplier: float, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """New detached tensors ``clamp(clamp(theta, c, 1-c) + N(0, sigma^2), c, 1-c)``, one sigma for all.

    ``generator=None`` (what a client uses): fresh noise from the OS's CSPRNG for this release
    (``fresh_generator``); tests pass a generator to reproduce a draw.
    """
    check_clip(clip)
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    thetas = list(thetas)
    if not thetas:
        return []
    sigma = noise_multiplier * theta_sensitivity(sum(t.numel() for t in thetas), clip)
    generator = generator if generator is not None else fresh_generator(thetas[0].device)
    out = []
    with torch.no_grad():
        for theta in thetas:
            base = theta.detach().clamp(clip, 1.0 - clip)
            noise = torch.randn(
                theta.shape, generator=generator, dtype=torch.float32, device=generator.device
            )
            noisy = base + (noise * sigma).to(device=theta.device, dtype=base.dtype)
            out.append(noisy.clamp_(clip, 1.0 - clip))
    return out
