"""Beyond the paper: release a client's feature mean and variance ONCE with sample-level DP.

One Gaussian mechanism on ``[sum phi, sum phi^2, w n]`` of the clipped per-sample features
(add-remove adjacency, the count noised too), as DP-MERF; every later step, mask and round only
reads the released ``(mu, var)``: post-processing. Derivation of the sensitivity and of ``w``:
docs/privacy.md, "dp = statistics".
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from prism_flwr.privacy.accounting import check_eps_delta, compute_epsilon, noise_multiplier_for_budget
from prism_flwr.privacy.randomness import fresh_generator


def clipped_feature_sums(features: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Noise-free ``(sum phi, sum phi^2, n)`` of the rows clipped to L2 norm ``clip_norm`` (float64)."""
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    phi = features.detach().to(torch.float64)
    if not torch.isfinite(phi).all():
        raise ValueError("features contain non-finite values")
    scale = torch.clamp(clip_norm / phi.norm(dim=1, keepdim=True).clamp_min(1e-300), max=1.0)
    phi = phi * scale
    return phi.sum(dim=0), (phi * phi).sum(dim=0), int(phi.shape[0])


def count_weight(clip_norm: float, dim: int) -> float:
    """``w`` with ``w^2 = C sqrt(C^2 + C^4) / sqrt(d)``: the weight of the noised count."""
    c2 = clip_norm * clip_norm
    return math.sqrt(clip_norm * math.sqrt(c2 + c2 * c2) / math.sqrt(dim))


def statistics_sensitivity(clip_norm: float, dim: int) -> float:
    """L2 sensitivity ``sqrt(C^2 + C^4 + w^2)`` of the released vector (add or remove one sample)."""
    c2 = clip_norm * clip_norm
    return math.sqrt(c2 + c2 * c2 + count_weight(clip_norm, dim) ** 2)


def statistics_noise_multiplier(epsilon: float, delta: float) -> float:
    """The noise multiplier of the one release that spends ``epsilon`` at ``delta``."""
    return noise_multiplier_for_budget(epsilon, delta, 1)


def privatize_statistics(
    features: torch.Tensor | Iterable[torch.Tensor],
    clip_norm: float,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mu, var, epsilon_spent)`` of the features ((n, d) or batches of it), released once.

    mu, var: float32 (d,) on the features' device. Each call is a new release whose epsilon adds
    up. ``generator=None`` (what a client uses): fresh noise from the OS's CSPRNG.
    """
    check_eps_delta(epsilon, delta)
    s1, s2, n = None, None, 0
    for batch in [features] if isinstance(features, torch.Tensor) else features:
        b1, b2, k = clipped_feature_sums(batch, clip_norm)  # clipping is per sample: batching is exact
        s1, s2, n = (b1, b2, k) if s1 is None else (s1 + b1, s2 + b2, n + k)
    if n < 1:
        raise ValueError("features must contain at least one sample")
    d = int(s1.shape[0])
    z = statistics_noise_multiplier(epsilon, delta)
    sigma = z * statistics_sensitivity(clip_norm, d)
    generator = generator if generator is not None else fresh_generator(s1.device)
    noise = torch.randn(2 * d + 1, generator=generator, dtype=torch.float64, device=generator.device)
    noise = noise.to(s1.device) * sigma
    n_noisy = max(float(n) + float(noise[2 * d]) / count_weight(clip_norm, d), 1.0)
    mu = (s1 + noise[:d]) / n_noisy
    var = torch.clamp((s2 + noise[d : 2 * d]) / n_noisy - mu * mu, min=0.0)
    return mu.float(), var.float(), compute_epsilon(z, delta, 1)
