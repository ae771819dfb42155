"""Two convolutions that oneDNN runs far below its matmul rate on a CPU, computed as matmuls.

- ``head_conv``: a transposed conv of a 1x1 input is one matmul,
  ``y[b, o, i, j] = sum_c z[b, c] W[c, o, i, j]``, written straight into NHWC.
- ``narrow_conv3x3``: a 3x3 conv (padding 1) with few output channels (the image layer) as
  ``Z[(k, o), n] = sum_c W[o, c, k] x[n, c]`` over the NHWC pixels ``n``, then
  ``y[o, p] = sum_k Z[(k, o), p + d_k]`` (zero outside): one matmul and nine shifted plane sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_conv(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv_transpose2d(z.view(B, C, 1, 1), weight)`` for ``weight (C, O, kh, kw)``, channels_last."""
    c, o, kh, kw = weight.shape
    y = z.reshape(z.shape[0], c) @ weight.permute(0, 2, 3, 1).reshape(c, kh * kw * o)
    return y.view(z.shape[0], kh, kw, o).permute(0, 3, 1, 2)


def _shift_sum(taps: torch.Tensor) -> torch.Tensor:
    """``(9, O, B, H, W)`` tap planes -> ``(O, B, H, W)``: ``y[p] = sum_k Z[k, p + d_k]``, zero padded."""
    h, w = taps.shape[-2:]
    padded = F.pad(taps, (1, 1, 1, 1))
    y = padded[0, ..., 0:h, 0:w].clone()
    for k in range(1, 9):
        dh, dw = divmod(k, 3)
        y += padded[k, ..., dh : dh + h, dw : dw + w]
    return y


def _unshift(grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``_shift_sum``: ``(O, B, H, W)`` -> ``(9, O, B, H, W)``."""
    h, w = grad.shape[-2:]
    padded = F.pad(grad, (1, 1, 1, 1))
    out = grad.new_empty(9, *grad.shape)
    for k in range(9):
        dh, dw = divmod(k, 3)
        out[k] = padded[..., 2 - dh : 2 - dh + h, 2 - dw : 2 - dw + w]
    return out


class _NarrowConv(torch.autograd.Function):
    """Forward and backward as matmuls over NHWC pixels; the input gradient comes back NHWC."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        o = weight.shape[0]
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when x is channels_last
        taps = weight.permute(2, 3, 0, 1).reshape(9 * o, c)
        ctx.save_for_backward(pixels, taps)
        ctx.shape = (b, c, h, w)
        return _shift_sum((taps @ pixels.T).view(9, o, b, h, w)).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        pixels, taps = ctx.saved_tensors
        b, c, h, w = ctx.shape
        o = taps.shape[0] // 9
        g = _unshift(grad.transpose(0, 1)).view(9 * o, b * h * w)
        grad_x = (g.T @ taps).view(b, h, w, c).permute(0, 3, 1, 2)
        grad_w = (g @ pixels).view(3, 3, o, c).permute(2, 3, 0, 1)
        return grad_x, grad_w


def narrow_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Where ``narrow_conv3x3`` beat oneDNN's conv (measured, one thread, fwd + bwd): float32 on the
    CPU, NHWC, and ``9 O <= 2 C`` (its work grows with ``O``, oneDNN's barely does: 1.4-3x at
    ``O = 1``, even at ``O = 3, C = 16``). bf16 autocast keeps oneDNN's conv (it was faster)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.is_contiguous(memory_format=torch.channels_last)
        and 9 * weight.shape[0] <= 2 * x.shape[1]
    )


def narrow_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a ``(O, C, 3, 3)`` weight, ``x (B, C, H, W)`` (NHWC best)."""
    return _NarrowConv.apply(x, weight)
