"""Server-side evaluation of a generator against the real test split.

``mmd_pixels``: unbiased pixel-space MMD^2 (Gaussian kernels, ``objectives.MMD_BANDWIDTHS``)
between ``n`` generated images and ``n`` real test images, both in [-1, 1]. Lower is better; it
is ~0 for two samples of the same distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from .data import load_dataset
from .masked import set_mask_mode
from .objectives import mmd2_unbiased


@torch.no_grad()
def generate(model: nn.Module, n: int, seed: int, device: torch.device | str = "cpu", batch: int = 500) -> torch.Tensor:
    """``n`` images from ``model`` (its current mask mode); latents and masks seeded by ``seed``.

    Runs inside ``fork_rng`` so the caller's global RNG state is left as it was.
    """
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        out = [model(torch.randn(min(batch, n - i), model.spec.nz, generator=gen).to(device)).cpu()
               for i in range(0, n, batch)]
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))


class Evaluator:
    """Scores generators against a fixed random subset of the real test split."""

    def __init__(self, dataset: str, data_dir: str | Path, n: int, seed: int, device: torch.device | str = "cpu",
                 download: bool = False) -> None:
        data = load_dataset(dataset, data_dir, train=False, download=download)
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        self.real = data.to_float(idx.numpy())
        self.n = len(idx)
        self.seed = seed
        self.device = device

    @torch.no_grad()
    def evaluate(self, model: nn.Module, mask_mode: str = "sample") -> tuple[dict[str, float], torch.Tensor]:
        set_mask_mode(model, mask_mode)
        fake = generate(model, self.n, self.seed, self.device)
        return {"mmd_pixels": float(mmd2_unbiased(fake, self.real))}, fake
