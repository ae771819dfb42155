"""A client's images kept as uint8 and turned into float32 only a batch at a time.

``Uint8Images`` holds (N, C, 32, 32) uint8 pixels (on a node: memory-mapped from the client
cache) and answers what training and evaluation ask of a float tensor: ``len``, ``device``,
``shape`` and indexing, where ``images[idx]`` is ``to_float(pixels[idx])`` (x / 127.5 - 1) on the
device, exactly what indexing the whole float tensor would give. A partition then costs 1 byte per
pixel instead of 4, and a batch only its own floats.
"""

from __future__ import annotations

import torch


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images.float().div_(127.5).sub_(1.0)


class Uint8Images:
    """uint8 pixels on ``device``, read as float32 in [-1, 1] one index (or batch) at a time."""

    dtype = torch.float32

    def __init__(self, pixels: torch.Tensor, device: torch.device | str = "cpu") -> None:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels.to(device)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, idx) -> torch.Tensor:
        return to_float(self.pixels[idx])

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    def to(self, device: torch.device | str) -> Uint8Images:
        return self if torch.device(device) == self.device else Uint8Images(self.pixels, device)

    def float(self) -> torch.Tensor:
        """All images as one float32 tensor (4 bytes per pixel: for small sets only)."""
        return to_float(self.pixels)
