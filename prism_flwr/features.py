"""Feature maps ``phi`` for the local objectives.

- ``pixels``: the flattened image in [-1, 1]. Needs nothing; the default.
- ``vgg19``: the official code's choice: activations of the last 16 ReLU layers of an
  ImageNet-pretrained VGG19 (all 16 ReLUs of ``vgg19.features``), flattened and concatenated.
  Grayscale is repeated to 3 channels and [-1, 1] is mapped to ImageNet normalisation. The
  weights are never downloaded: they are read from ``weights_path`` or torch's hub cache, and a
  missing file raises ``FileNotFoundError`` naming both places.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

FEATURES = ("pixels", "vgg19")
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 checkpoint name
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class VGG19Features(nn.Module):
    """Concatenated activations of every ReLU in ``vgg19.features`` (frozen, eval mode)."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None) -> None:
        super().__init__()
        from torchvision.models import vgg19

        net = vgg19(weights=None)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        self.body = net.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        h = ((x + 1.0) / 2.0 - self.mean) / self.std
        feats = []
        for layer in self.body:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                feats.append(h.flatten(1))
        return torch.cat(feats, dim=1)


def vgg19_weights_locations(weights_path: str | None) -> list[Path]:
    places = [Path(weights_path).expanduser()] if weights_path else []
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()
    return places + [hub / "hub" / "checkpoints" / VGG19_FILE]


def build_features(name: str, weights_path: str | None = None) -> nn.Module:
    if name == "pixels":
        return PixelFeatures()
    if name != "vgg19":
        raise ValueError(f"features must be one of {FEATURES}, got {name!r}")
    places = vgg19_weights_locations(weights_path)
    for place in places:
        if place.is_file():
            return VGG19Features(torch.load(place, map_location="cpu", weights_only=True))
    looked = ", ".join(str(p) for p in places)
    raise FileNotFoundError(
        f"features='vgg19' needs torchvision's ImageNet VGG19 weights ({VGG19_FILE}); looked in: {looked}. "
        f"Nothing is downloaded at run time: copy the file to one of those places or set run-config "
        f"key vgg19-weights to its path (or use features='pixels')."
    )
