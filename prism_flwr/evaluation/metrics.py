"""Sample-quality metrics on feature vectors.

- Fréchet distance (torchmetrics' ``FrechetInceptionDistance``, fed precomputed features): fit a
  Gaussian to each feature set (mean, unbiased covariance, float64) and return
  ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``; torchmetrics takes the trace of the
  square root as the sum of square roots of the eigenvalues of ``S_r S_f``. Lower is better,
  ~0 (plus a small-sample bias) for two samples of one distribution. It is "FID" only on
  Inception-V3 features; ``feature_net`` names it.
- Precision, recall, density, coverage (Naeem et al. 2020; the ``prdc`` package's definitions,
  computed here in torch, ``tests/test_metrics.py`` checks equality with the package): with
  ``r_k(x)`` the distance from ``x`` to its k-th nearest neighbour in its own set,
  precision = mean over fakes of [some real r has |f - r| < r_k(r)], density = mean over fakes of
  #{r : |f - r| < r_k(r)} / k (~1 for matching distributions), recall = mean over reals of [some
  fake f has |r - f| < r_k(f)], coverage = mean over reals of [min_f |r - f| < r_k(r)].
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

NEAREST_K = 5
_CHUNK = 1024  # rows of a pairwise-distance block: bounds memory at N = M = 10k


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


def _distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, y, compute_mode="use_mm_for_euclid_dist")


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (the k + 1-th, counting itself)."""
    return torch.cat(
        [_distances(x[i : i + _CHUNK], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), _CHUNK)]
    )


class NearestNeighbours:
    """Precision, recall, density and coverage of any number of (M, D) fake sets against one fixed
    (N, D) real set, whose k-NN radii are computed once.

    Each set needs more than ``nearest_k + 1`` points (the k-th neighbour counts the point itself).
    Distances in float64, in blocks of rows; no thread pool of its own (torch's threads only).
    """

    def __init__(self, real: torch.Tensor, nearest_k: int = NEAREST_K) -> None:
        self.real, self.k = real.detach().cpu().double(), nearest_k
        self._check(len(self.real), "real")
        self.real_radii = _kth_neighbour_radii(self.real, nearest_k)

    def _check(self, count: int, name: str) -> None:
        if count <= self.k + 1:
            raise ValueError(
                f"precision/recall/density/coverage with k = {self.k} need more than {self.k + 1} "
                f"samples per set, got {count} {name}"
            )

    def __call__(self, fake: torch.Tensor) -> dict[str, float]:
        self._check(len(fake), "fake")
        fake = fake.detach().cpu().double()
        fake_radii = _kth_neighbour_radii(fake, self.k)
        in_real_balls = torch.zeros(len(fake), dtype=torch.float64)  # per fake: how many real balls hold it
        recalled, covered = [], []
        for i in range(0, len(self.real), _CHUNK):
            d = _distances(self.real[i : i + _CHUNK], fake)  # (chunk of reals, fakes)
            radii = self.real_radii[i : i + _CHUNK, None]
            in_real_balls += (d < radii).sum(dim=0)
            recalled.append((d < fake_radii[None, :]).any(dim=1))
            covered.append(d.min(dim=1).values < radii[:, 0])
        return {
            "precision": float((in_real_balls > 0).double().mean()),
            "recall": float(torch.cat(recalled).double().mean()),
            "density": float(in_real_balls.mean() / self.k),
            "coverage": float(torch.cat(covered).double().mean()),
        }


def prdc_metrics(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """``NearestNeighbours(real, nearest_k)(fake)``: the four metrics of one pair of feature sets."""
    return NearestNeighbours(real, nearest_k)(fake)
