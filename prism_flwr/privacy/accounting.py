"""Privacy accounting: one Renyi-DP accountant (Opacus) for every Gaussian release a client makes.

Every release (a round's theta, the one-off statistics) is a Gaussian mechanism with sample rate 1
and a noise multiplier z (noise std / L2 sensitivity); any list of them composes in RDP and is
converted to (epsilon, delta) by Opacus (docs/privacy.md, "Accounting").
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable

# Renyi orders: denser near 1 (large epsilon) and wider (small epsilon) than Opacus' default.
_RDP_ORDERS = (
    [1.0 + x / 100.0 for x in range(1, 10)]
    + [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0]
)
_MAX_NOISE_MULTIPLIER = 1e7
REL_TOL = 1e-9  # tolerance on a budget (floating-point noise only)


def check_eps_delta(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def epsilon_of_releases(multipliers: Iterable[float], delta: float) -> float:
    """Epsilon at ``delta`` of the adaptive composition of Gaussian mechanisms with these noise
    multipliers (sample rate 1). 0.0 for none."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    counts = Counter(float(z) for z in multipliers)
    if not counts:
        return 0.0
    if not all(z > 0 and math.isfinite(z) for z in counts):
        raise ValueError(f"noise multipliers must be finite and > 0, got {sorted(counts)}")
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, 1.0, n) for z, n in sorted(counts.items())]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest/smallest alpha": still a valid bound
        return float(acc.get_epsilon(delta=float(delta), alphas=_RDP_ORDERS))


def compute_epsilon(noise_multiplier: float, delta: float, steps: int) -> float:
    """Epsilon at ``delta`` of ``steps`` Gaussian mechanisms with one noise multiplier."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    return epsilon_of_releases([float(noise_multiplier)] * int(steps), delta)


def within(epsilon: float, budget: float) -> bool:
    """``epsilon <= budget`` up to floating-point noise."""
    return epsilon <= budget * (1.0 + REL_TOL)


def noise_multiplier_for_budget(epsilon: float, delta: float, rounds: int) -> float:
    """Smallest z (to 1e-6 relative, conservative end) with which ``rounds`` releases spend at most
    ``epsilon`` at ``delta``: bisection on ``compute_epsilon`` in log z."""
    check_eps_delta(epsilon, delta)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")

    def over(z: float) -> bool:
        return compute_epsilon(z, delta, int(rounds)) > epsilon

    lo = hi = 1.0
    while over(hi):
        lo, hi = hi, hi * 2.0
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ValueError(f"budget epsilon={epsilon} too small for {rounds} rounds")
    if lo == hi:  # z = 1 is within budget: search downwards
        while not over(lo):
            lo, hi = lo / 2.0, lo
            if lo < 1e-6:
                return hi
    while (hi - lo) / hi > 1e-6:  # invariant: over(lo) and not over(hi)
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if over(mid) else (lo, mid)
    return hi
