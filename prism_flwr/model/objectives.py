"""Local objectives: the paper's feature matching and an unbiased Gaussian-kernel MMD^2.

``feature-matching`` (GFMN, the official code) matches the mean and variance of features through
Adam-smoothed moving-average vectors; ``mmd`` (GMMN, the default) is the unbiased MMD^2 with a sum
of Gaussian kernels, widths scaled by ``sqrt(d / 1024)`` for ``d``-dim features. Formulas:
docs/algorithm.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

OBJECTIVES = ("feature-matching", "mmd")
MMD_BANDWIDTHS = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def gaussian_kernel_sum(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...]) -> torch.Tensor:
    """``K[i, j] = sum_b exp(-|x_i - y_j|^2 / (2 b^2))`` for flat rows ``x`` (n, d), ``y`` (m, d)."""
    # Squared distances straight from the Gram matrix (cdist would take a root only to square it).
    d2 = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T).clamp_min(0)
    return sum(torch.exp(-d2 / (2.0 * b * b)) for b in bandwidths)


def mmd2_unbiased(
    x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None
) -> torch.Tensor:
    """Unbiased MMD^2 estimate: within-set kernel means exclude the diagonal.

    ``bandwidths`` default to ``MMD_BANDWIDTHS`` scaled by ``sqrt(d / 1024)``.
    """
    x, y = x.flatten(1), y.flatten(1)
    if bandwidths is None:
        scale = (x.shape[1] / 1024) ** 0.5
        bandwidths = tuple(b * scale for b in MMD_BANDWIDTHS)
    n, m = x.shape[0], y.shape[0]
    kxx = gaussian_kernel_sum(x, x, bandwidths)
    kyy = gaussian_kernel_sum(y, y, bandwidths)
    kxy = gaussian_kernel_sum(x, y, bandwidths)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2.0 * kxy.mean()


def feature_moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over the batch dimension."""
    mu = feats.mean(0)
    return mu, (feats - mu).pow(2).mean(0)


class FeatureMatching(nn.Module):
    """GFMN loss with Adam-driven moving-average vectors; its state travels across rounds.

    The moving averages' Adam step is written out (``torch.optim.Adam``'s update, bias
    corrections included, step count on the device) rather than run by an inner optimiser and an
    inner ``backward``: the whole local step then stays on the device with no host
    synchronisation, and can be captured in a CUDA graph. The gradient of the MSE
    ``mean((v - gap)^2)`` is ``2 (v - gap) / d``.
    """

    def __init__(
        self,
        mu_real: torch.Tensor,
        var_real: torch.Tensor,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.5, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.register_buffer("mu_real", mu_real.detach().clone())
        self.register_buffer("var_real", var_real.detach().clone())
        for name in ("v_mean", "v_var", "m1_mean", "m2_mean", "m1_var", "m2_var"):
            self.register_buffer(name, torch.zeros_like(self.mu_real))
        self.register_buffer("step", torch.zeros((), dtype=torch.float32, device=self.mu_real.device))

    @torch.no_grad()
    def _adam_toward(self, v: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, gap: torch.Tensor) -> None:
        b1, b2 = self.betas
        grad = 2.0 * (v - gap) / v.numel()
        m1.lerp_(grad, 1 - b1)
        m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bc1 = 1 - torch.pow(b1, self.step)
        bc2 = 1 - torch.pow(b2, self.step)
        v.sub_(self.lr * m1 / bc1 / ((m2 / bc2).sqrt() + self.eps))

    def forward(self, fake_feats: torch.Tensor) -> torch.Tensor:
        mu_f, var_f = feature_moments(fake_feats)
        gap_m, gap_v = self.mu_real - mu_f, self.var_real - var_f
        # First move the moving averages toward the current (detached) gaps ...
        self.step.add_(1)
        self._adam_toward(self.v_mean, self.m1_mean, self.m2_mean, gap_m.detach())
        self._adam_toward(self.v_var, self.m1_var, self.m2_var, gap_v.detach())
        # ... then the generator follows them.
        return (self.v_mean * gap_m).sum() + (self.v_var * gap_v).sum()

    def full_state(self) -> dict[str, torch.Tensor]:
        """Tensors to keep across rounds: statistics, moving averages and their Adam moments."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
    ) -> FeatureMatching:
        fm = cls(state["mu_real"].to(device), state["var_real"].to(device))
        if "step" in state:  # a state with released statistics only (dp = statistics) starts at zero
            fm.load_state_dict(state)
        return fm.to(device)
