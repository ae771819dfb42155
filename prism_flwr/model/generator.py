"""The paper's ResNet generator (official ``ResnetG``) built from masked layers.

32x32 output for every dataset; 3,543,616 masked weights at ``ngf = 64``. BatchNorm has no affine
parameters and always uses batch statistics, so nothing local leaks into sampling. Weights and
initial scores come from seeded streams: the server and every client rebuild the same network
from ``(nz, ngf, nc, seed)`` alone. Architecture: docs/algorithm.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prism_flwr.model.masked import MaskedConv2d, MaskedConvTranspose2d, masked_layers, masked_weights
from prism_flwr.model.matmul_conv import head_conv, narrow_conv3x3, narrow_pays
from prism_flwr.model.upconv import phase_pays, up2_conv3x3


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything needed to rebuild the frozen network bit for bit."""

    nz: int = 128
    ngf: int = 64
    nc: int = 1
    seed: int = 30

    def to_dict(self) -> dict:
        return asdict(self)


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, wg: torch.Generator, sg: torch.Generator) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, affine=False, track_running_stats=False)
        self.conv1 = MaskedConv2d(cin, cout, 3, padding=1, weight_gen=wg, score_gen=sg)
        self.bn2 = nn.BatchNorm2d(cout, affine=False, track_running_stats=False)
        self.conv2 = MaskedConv2d(cout, cout, 3, padding=1, weight_gen=wg, score_gen=sg)
        self.skip = MaskedConv2d(cin, cout, 1, weight_gen=wg, score_gen=sg)

    def forward(
        self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w_skip: torch.Tensor
    ) -> torch.Tensor:
        # ReLU in place on the batch norm's fresh output (its backward needs only its input): one
        # tensor less per layer.
        h = F.relu(self.bn1(x), inplace=True)
        if phase_pays(h):  # conv1(up2(h)) in the phase form: 16/36 of the work, no upsampled copy
            h = up2_conv3x3(h, w1)
        else:
            h = self.conv1(F.interpolate(h, scale_factor=2, mode="nearest"), w1)
        h = self.conv2(F.relu(self.bn2(h), inplace=True), w2)
        # The 1x1 skip conv commutes with nearest upsampling: convolve first, at a quarter of the cost.
        return h + F.interpolate(self.skip(x, w_skip), scale_factor=2, mode="nearest")


class ResnetGenerator(nn.Module):
    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        wg = torch.Generator().manual_seed(spec.seed)
        sg = torch.Generator().manual_seed(spec.seed + 1)
        ngf = spec.ngf
        self.head = MaskedConvTranspose2d(spec.nz, 8 * ngf, 4, weight_gen=wg, score_gen=sg)
        self.blocks = nn.Sequential(
            _UpBlock(8 * ngf, 4 * ngf, wg, sg),
            _UpBlock(4 * ngf, 2 * ngf, wg, sg),
            _UpBlock(2 * ngf, ngf, wg, sg),
        )
        self.bn = nn.BatchNorm2d(ngf, affine=False, track_running_stats=False)
        self.out = MaskedConv2d(ngf, spec.nc, 3, padding=1, weight_gen=wg, score_gen=sg)

    def forward(self, z: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Images from latents ``z``; ``weights`` overrides the layers' ``W * m`` (benchmarks)."""
        # Masked layers in registration order: head, (conv1, conv2, skip) x 3, out.
        w = masked_weights(masked_layers(self)) if weights is None else weights
        # On the CPU the head is one matmul into NHWC: oneDNN's fast (and bf16) convolutions want it.
        cpu = z.device.type == "cpu"
        h = head_conv(z, w[0]) if cpu else self.head(z.view(z.shape[0], -1, 1, 1), w[0])
        for i, block in enumerate(self.blocks):
            h = block(h, *w[1 + 3 * i : 4 + 3 * i])
        h = F.relu(self.bn(h), inplace=True)
        return torch.tanh(narrow_conv3x3(h, w[-1]) if narrow_pays(h, w[-1]) else self.out(h, w[-1]))


@torch.no_grad()
def generate(
    model: nn.Module, n: int, seed: int, device: torch.device | str = "cpu", batch: int = 500
) -> torch.Tensor:
    """``n`` images from ``model`` (its current mask mode); latents and masks seeded by ``seed``.

    Runs inside ``fork_rng`` so the caller's global RNG state is left as it was.
    """
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        out = [
            model(torch.randn(min(batch, n - i), model.spec.nz, generator=gen).to(device)).cpu()
            for i in range(0, n, batch)
        ]
    return torch.cat(out)
