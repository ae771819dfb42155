"""The generator's compute precision: float32, or bfloat16 autocast where the CPU computes it natively.

``precision = "auto"`` picks ``bf16`` on a CPU with AVX512-BF16 or AMX-BF16 (oneDNN then runs the
convolutions on bf16 units: a step about 1.7x the float32 one here) and ``float32`` everywhere else (a CPU
without them, any GPU); ``"float32"`` and ``"bf16"`` force either way. Only the generator's forward
(and so its backward) runs under autocast: the masks, scores, Adam state, the features and the loss
stay float32. Measured: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "float32", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names of native bf16 arithmetic


def cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags (empty where the file is missing: not Linux, or hidden)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@cache
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), per torch or /proc/cpuinfo."""
    try:
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except AttributeError:  # a torch without these probes: the kernel's flags decide
        pass
    return bool(cpuinfo_flags() & set(BF16_FLAGS))


def resolve_precision(name: str, device: torch.device | str) -> str:
    """``"float32"`` or ``"bf16"`` for ``name`` (one of ``PRECISIONS``) on ``device``."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_bf16() else "float32"


def generator_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the generator's forward runs in: bf16 autocast, or nothing for float32.

    ``cache_enabled=False``: the masked weights are new every step (nothing to cache), and a CUDA
    graph capture needs it off."""
    if resolve_precision(precision, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)
