"""``conv3x3(up2(x))`` computed exactly without the upsampling: four 2x2 phase kernels in one
stride-2 transposed convolution.

With ``u = up2(x)`` (nearest) and output pixel ``2p + a``, the 3x3 taps that read the same source
pixel sum. In one dimension phase 0 reads ``x[p-1], x[p]`` with ``(w0, w1 + w2)`` and phase 1 reads
``x[p], x[p+1]`` with ``(w0 + w1, w2)``; the zero padding of ``u`` is the zero padding of ``x``. A
stride-2 transposed convolution (padding 1) with the 4-tap kernel ``(w2, w1 + w2, w0 + w1, w0)``
per dimension computes all four phases, interleaved: ``K = P W P^T`` for ``P`` below, 16 instead
of 36 multiply-adds per output pixel and channel pair, and no upsampled copy. ``W`` may be the
masked weight ``W * m``: the transform is linear, so gradients reach ``W`` (and the scores) exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Row i of P: which of the three taps (w0, w1, w2) the transposed conv's tap i sums.
_PHASE_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``(cout, cin, 3, 3)`` conv weight -> ``(cin, cout, 4, 4)`` transposed-conv weight ``P W P^T``.

    One ``(cout * cin, 9) @ (9, 16)`` matmul with ``P (x) P`` (cheaper than two small products)."""
    cout, cin, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"phase_kernel needs a 3x3 kernel, got {kh}x{kw}")
    p = torch.tensor(_PHASE_TAPS, dtype=weight.dtype, device=weight.device)
    pp = torch.kron(p, p)  # (16, 9): tap (i, j) of K sums taps (k, l) of W where P[i, k] P[j, l] = 1
    return (weight.reshape(cout * cin, 9) @ pp.T).view(cout, cin, 4, 4).transpose(0, 1)


def phase_pays(x: torch.Tensor) -> bool:
    """Where the phase form beat upsampling then convolving (measured, one thread, fwd + bwd, ngf 16-64):
    on the CPU in float32 at every layer (1.1-2.9x); under bf16 autocast only from an 8x8 source up
    (oneDNN's bf16 transposed conv lost on the 4x4 one, by up to 1.7x at ngf 64, and won 2-4x on 16x16)."""
    return x.device.type == "cpu" and (not torch.is_autocast_enabled("cpu") or min(x.shape[-2:]) >= 8)


def up2_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``, exactly
    (up to float rounding), for a ``(cout, cin, 3, 3)`` ``weight``; the output is ``2H x 2W``.

    The kernel transform runs in float32 outside any autocast (an exact sum of at most four taps),
    the convolution in the caller's precision."""
    with torch.autocast(x.device.type, enabled=False):
        kernel = phase_kernel(weight.to(torch.promote_types(weight.dtype, torch.float32)))
    return F.conv_transpose2d(x, kernel.to(x.dtype), bias, stride=2, padding=1)
