"""Sample-quality metrics on feature vectors, computed by well-kept libraries.

- Fréchet distance (torchmetrics' ``FrechetInceptionDistance``, fed precomputed features): fit a
  Gaussian to each feature set (mean, unbiased covariance, float64) and return
  ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``; torchmetrics takes the trace of the
  square root as the sum of square roots of the eigenvalues of ``S_r S_f``. Lower is better,
  ~0 (plus a small-sample bias) for two samples of one distribution. It is "FID" only on
  Inception-V3 features; ``feature_net`` names it.
- Precision, recall, density, coverage (Naeem et al. 2020, the ``prdc`` package): k-nearest-
  neighbour balls around real (resp. fake) features; precision and density measure how much of
  the fake set lies in the real manifold (density counts ball memberships / k, ~1 for matching
  distributions), recall and coverage how much of the real set is reached by fakes.
"""

from __future__ import annotations

import contextlib
import io

import torch
from prdc import compute_prdc
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

NEAREST_K = 5


class _Precomputed(nn.Identity):
    """Feature "network" for torchmetrics when features are already computed.

    torchmetrics reads ``num_features`` (so it never probes the module with a dummy image) and
    passes ``update``'s tensor straight to the module when it is a custom one.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


class FrechetDistance:
    """Fréchet distance from one fixed real feature set to any number of fake ones.

    The real statistics are accumulated once: ``reset_real_features=False`` keeps them across
    ``reset``, which clears only the fake side.
    """

    def __init__(self, real: torch.Tensor) -> None:
        self._fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False)
        self._fid.update(real.detach().cpu().double(), real=True)

    def __call__(self, fake: torch.Tensor) -> float:
        self._fid.reset()
        self._fid.update(fake.detach().cpu().double(), real=False)
        return float(self._fid.compute())


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two (N, D) feature sets."""
    return FrechetDistance(real)(fake)


def prdc_metrics(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """``prdc.compute_prdc`` on (N, D) and (M, D) features, as plain floats.

    Each set needs more than ``nearest_k + 1`` points (prdc's k-th neighbour counts the point
    itself). float32 halves the memory of prdc's three pairwise-distance matrices (3 x 400 MB at
    N = M = 10k).
    """
    if min(len(real), len(fake)) <= nearest_k + 1:
        raise ValueError(
            f"precision/recall/density/coverage with k = {nearest_k} need more than {nearest_k + 1} "
            f"samples per set, got {len(real)} real and {len(fake)} fake"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sample counts on every call
        out = compute_prdc(
            real_features=real.detach().cpu().float().numpy(),
            fake_features=fake.detach().cpu().float().numpy(),
            nearest_k=nearest_k,
        )
    return {name: float(value) for name, value in out.items()}
