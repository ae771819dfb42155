"""Server-side evaluation of a generator against the real test split.

``Evaluator.evaluate`` draws ``n`` images (fixed latents from ``seed``) and scores them against
``n`` real test images (a fixed random subset) with:

- the Fréchet distance on a feature network's features, named for the network: "FID" on
  Inception-V3 (``inception_weights`` given), else e.g. "FD-FMNIST-CNN" on the dataset's own
  classifier (``feature_net``);
- ``precision``, ``recall``, ``density``, ``coverage`` (k = 5, as the ``prdc`` package defines
  them) on the same features (these two items are skipped with ``feature_metrics=False``);
- ``mmd_pixels``: unbiased pixel-space MMD^2 (Gaussian kernels of the fixed widths
  ``PIXEL_METRIC_BANDWIDTHS`` times ``sqrt(d / 1024)``, so values compare across runs whatever the
  training objective's widths) between the two image sets in [-1, 1]. Lower is better; ~0 for two
  samples of one distribution.

The features of the whole real test split are computed once per (dataset, feature network): kept
in memory for the process and saved as ``<data_dir>/feature-nets/<dataset>-<net>.test-features.pt``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from prism_flwr.data.datasets import ImageData, load_dataset
from prism_flwr.evaluation.feature_net import atomic_write, build_feature_net
from prism_flwr.evaluation.metrics import NEAREST_K, FrechetDistance, NearestNeighbours
from prism_flwr.model.generator import generate
from prism_flwr.model.masked import set_mask_mode
from prism_flwr.model.objectives import mmd2_unbiased
from prism_flwr.progress import Progress

_REFERENCE_CHUNK = 1000  # test images per feature pass (and per progress line) when caching the reference
_FEATURE_BATCH = 200  # images per feature-network call: bounds Inception's activations at 299 x 299
_REFERENCE: dict[Path, torch.Tensor] = {}
PIXEL_METRIC_BANDWIDTHS = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)  # the metric's widths since its first release


def mmd_pixels(fake: torch.Tensor, real: torch.Tensor) -> float:
    """The ``mmd_pixels`` metric: fixed-width MMD^2 on flat pixels (see the module docstring)."""
    scale = (real[0].numel() / 1024) ** 0.5
    return float(mmd2_unbiased(fake, real, tuple(b * scale for b in PIXEL_METRIC_BANDWIDTHS)))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))


@torch.no_grad()
def extract_features(
    net: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``net`` applied to float images in [-1, 1], in batches on ``device``; float32 on the CPU."""
    return torch.cat(
        [
            net(images[i : i + _FEATURE_BATCH].to(device)).float().cpu()
            for i in range(0, len(images), _FEATURE_BATCH)
        ]
    )


def reference_features(
    net: nn.Module, data: ImageData, data_dir: str | Path, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Features of every image of ``data`` (a test split), cached in memory and on disk."""
    path = (
        Path(data_dir).expanduser().resolve() / "feature-nets" / f"{data.name}-{net.ident}.test-features.pt"
    )
    if path not in _REFERENCE:
        if path.is_file():
            _REFERENCE[path] = torch.load(path, weights_only=True)
        else:
            progress, parts = (
                Progress(f"features of the {data.name} test split ({net.metric_name})", len(data), "images"),
                [],
            )
            for i in range(0, len(data), _REFERENCE_CHUNK):  # a chunk at a time: bounds the float copy
                progress.update(i)
                parts.append(
                    extract_features(
                        net, data.to_float(torch.arange(i, min(i + _REFERENCE_CHUNK, len(data)))), device
                    )
                )
            feats = torch.cat(parts)
            progress.close(f"cached in {path}")
            atomic_write(path, lambda tmp: torch.save(feats, tmp))
            _REFERENCE[path] = feats
    return _REFERENCE[path]


class Evaluator:
    """Scores generators against a fixed random subset of the real test split.

    ``inception_weights``: path of torchvision's Inception-V3 checkpoint (metric "FID"); empty or
    None uses the dataset's classifier trained with ``feature_seed`` (trained and cached on first
    use). ``feature_metrics=False`` computes ``mmd_pixels`` only (no feature network: quick smoke
    runs). ``metric_name`` and ``feature_info`` (a description for summaries) are None then.
    """

    def __init__(
        self,
        dataset: str,
        data_dir: str | Path,
        n: int,
        seed: int,
        device: torch.device | str = "cpu",
        download: bool = False,
        inception_weights: str | None = None,
        feature_seed: int = 0,
        nearest_k: int = NEAREST_K,
        feature_metrics: bool = True,
    ) -> None:
        data = load_dataset(dataset, data_dir, train=False, download=download)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        self.real = data.to_float(idx.numpy())
        self.n = len(idx)
        self.seed = seed
        self.device = device
        self.features: nn.Module | None = None
        self.metric_name: str | None = None
        self.feature_info: dict | None = None
        if feature_metrics:
            if self.n <= nearest_k + 1:  # fail before any training, not at the first evaluation
                raise ValueError(
                    f"feature metrics need more than {nearest_k + 1} evaluation samples, got {self.n}"
                )
            self.features, self.feature_info = build_feature_net(
                dataset, data_dir, inception_weights, feature_seed, device, download
            )
            self.metric_name = self.features.metric_name
            self.real_features = reference_features(self.features, data, data_dir, device)[idx]
            self._fd = FrechetDistance(self.real_features)
            self._knn = NearestNeighbours(self.real_features, nearest_k)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, mask_mode: str = "sample") -> tuple[dict[str, float], torch.Tensor]:
        set_mask_mode(model, mask_mode)
        fake = generate(model, self.n, self.seed, self.device)
        metrics = {}
        if self.features is not None:
            fake_features = extract_features(self.features, fake, self.device)
            metrics = {
                self.metric_name: self._fd(fake_features),
                **self._knn(fake_features),
            }
        metrics["mmd_pixels"] = mmd_pixels(fake, self.real)
        return metrics, fake
