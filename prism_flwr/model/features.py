"""Feature maps ``phi`` for the local objectives.

- ``pixels``: the flattened image in [-1, 1]. Needs nothing; the default.
- ``random-conv``: the image plus the ReLU activations of three random 3x3 conv layers from a
  constant seed (``RANDOM_CONV_SEED``): no pretrained weights, the same map in every run.
- ``vgg19``: the official code's choice, the 16 ReLU activations of an ImageNet-pretrained VGG19,
  read from ``weights_path`` or torch's hub cache (never downloaded; a missing file raises
  ``FileNotFoundError`` naming both places).

Details: docs/algorithm.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = ("pixels", "random-conv", "vgg19")
RANDOM_CONV_SEED = 1234
RANDOM_CONV_WIDTHS = (32, 64, 128)
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 checkpoint name
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class RandomConvFeatures(nn.Module):
    """Pixels plus three blocks of seeded random conv-ReLU-avgpool activations (frozen)."""

    def __init__(
        self, in_ch: int = 3, widths: tuple[int, ...] = RANDOM_CONV_WIDTHS, seed: int = RANDOM_CONV_SEED
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        convs = []
        for cin, cout in zip((in_ch, *widths[:-1]), widths):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():  # He init from our own generator: identical on every machine
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            convs.append(conv)
        self.convs = nn.ModuleList(convs).requires_grad_(False)
        self.in_ch = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [x.flatten(1) / x[0].numel() ** 0.5]
        h = x.expand(-1, self.in_ch, -1, -1) if x.shape[1] == 1 else x  # grey: the same map as colour
        for conv in self.convs:
            h = F.avg_pool2d(F.relu(conv(h)), 2)
            blocks.append(h.flatten(1) / h[0].numel() ** 0.5)
        return torch.cat(blocks, dim=1)


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
    if name == "random-conv":
        return RandomConvFeatures()
    if name != "vgg19":
        raise ValueError(f"features must be one of {FEATURES}, got {name!r}")
    places = vgg19_weights_locations(weights_path)
    for place in places:
        if place.is_file():
            return VGG19Features(torch.load(place, map_location="cpu", weights_only=True))
    looked = ", ".join(str(p) for p in places)
    raise FileNotFoundError(
        f"features='vgg19' needs torchvision's ImageNet VGG19 weights ({VGG19_FILE}); looked in: {looked}. "
        f"Nothing is downloaded at run time: copy the file to one of those places or set node-config "
        f"key vgg19-weights to its path (or use features='pixels')."
    )
