"""Differential privacy for PRISM clients (framework-free core).

Two modes besides ``"off"`` (see ``DP_MODES``); spec sections 5 and 8.

``dp = "theta"`` -- the paper's mechanism, implemented correctly
=================================================================
Every round a participating client releases its probabilities ``theta`` through
the Gaussian mechanism and samples its mask from the result::

    theta_c  = clamp(theta, c, 1 - c)                 # 1. makes the sensitivity bound true
    theta_n  = theta_c + N(0, sigma^2 I)              # 2. Gaussian mechanism
    theta_dp = clamp(theta_n, c, 1 - c)               # 3. post-processing (valid probability)
    m        ~ Bernoulli(theta_dp)                    # post-processing

*Privacy unit.*  ``theta`` is a function of the client's whole local data set (and of
public things: the global scores, the seed).  The guarantee is **client-level**
(epsilon, delta)-DP: the released output distribution changes little when the client's
``theta`` is replaced by *any* other vector in ``[c, 1-c]^n``, hence when its whole data
set is replaced.  The sensitivity bound ``(1 - 2c) * sqrt(n)`` (L2 distance of two
vectors in ``[c, 1-c]^n``) only holds because of step 1; the paper and its code clamp
only after the noise (the released code clamps the *un-noised* scores and its noise never
reaches the mask).  Step 3 is post-processing, so is the mask and everything the server
does with it.

*Several tensors.*  The paper calibrates per tensor, ``sensitivity_k = (1-2c) sqrt(n_k)``.
Releasing K tensors, each with noise multiplier z relative to its own sensitivity, is K
Gaussian mechanisms per round -- an accountant that steps once per round would
under-count by a factor K.  ``privatize_theta`` therefore spends exactly ONE unit
"Gaussian mechanism with noise multiplier z" per call, whatever the number of tensors:

* ``calibration="joint"`` (default): one mechanism on the concatenation of all tensors,
  ``sensitivity = (1-2c) sqrt(N)``, ``N = sum n_k``; every coordinate gets
  ``sigma = z (1-2c) sqrt(N)``.
* ``calibration="per-tensor"`` (the paper's per-tensor sensitivities): tensor k gets
  ``sigma_k = z sqrt(K) (1-2c) sqrt(n_k)``.  K compositions of a Gaussian mechanism with
  multiplier ``z sqrt(K)`` are *exactly* one with multiplier z (RDP ``K a / (2 K z^2)``;
  GDP ``mu = sqrt(K) / (z sqrt(K))``), so the same accounting applies.
  By Cauchy-Schwarz (``K sum n_k^2 >= N^2``) its total noise energy is never lower than
  the joint calibration's; both agree for a single tensor.

*Accounting.*  The user gives a TOTAL budget (epsilon, delta) and the number R of rounds
the client takes part in; ``noise_multiplier_for_budget`` finds the smallest z such that R
adaptive compositions of the Gaussian mechanism with sample rate 1 (no subsampling
amplification is claimed: every participation releases the full theta) spend at most
epsilon at delta.  ``ThetaAccountant`` tracks the spend round by round, says when the
budget is exhausted, and refuses to step past it.  Accountants (``ACCOUNTANTS``):

* ``"rdp"`` (default): Opacus ``RDPAccountant`` (Renyi DP, conversion of Balle et al.
  2020) with a denser/wider order grid than Opacus' default.  Standard and conservative.
* ``"prv"``: Opacus ``PRVAccountant`` (numerical, tight up to ``eps_error = 0.01``).
* ``"analytic"``: exact, in closed form.  With sample rate 1, R compositions of the
  Gaussian mechanism with multiplier z are exactly mu-GDP with ``mu = sqrt(R) / z``
  (Dong, Roth & Su 2019, Cor. 3.3, adaptive), whose tight (epsilon, delta) curve is
  ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (their Cor. 2.13; Balle &
  Wang 2018).  About 6-8 % less noise than "rdp" at the same guarantee; agrees with
  "prv" to its 0.01 error (tested).  (``"prv"`` gets slow for many rounds: ~15 s for
  ``noise_multiplier_for_budget`` at R = 500.)

Why not a per-round (epsilon_round, delta_round) calibration with the classic formula
``sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon`` (``gaussian_sigma``)?  That
theorem (Dwork & Roth, Thm A.1) only holds for epsilon < 1, and splitting a total budget
over R rounds by basic composition (eps/R, delta/R each) makes sigma grow like R instead
of sqrt(R).  ``gaussian_sigma`` is provided because the spec names it (and for a single
release with epsilon < 1 it is valid, if loose).

Honest note: the noise destroys theta for realistic tensor sizes
-------------------------------------------------------------------
The Gaussian mechanism adds N(0, sigma^2) to EVERY coordinate, where sigma is calibrated
to the L2 sensitivity of the whole vector: ``sigma = z (1 - 2c) sqrt(n)``.  For a
1,000,000-weight tensor, c = 0.1 (sensitivity 800), delta = 1e-5, noise std per weight
(``"rdp"`` / ``"analytic"`` accountant):

====================  ===============  ===============  ===============
total budget          R = 1 round      R = 20 rounds    R = 500 rounds
====================  ===============  ===============  ===============
epsilon = 9.8         431 / 407        1,927 / 1,818    9,634 / 9,090
epsilon = 1.0         3,236 / 2,985    14,473 / 13,347  72,366 / 66,736
====================  ===============  ===============  ===============

(noise multipliers z: 9.8 -> 0.539 / 2.41 / 12.04 with "rdp", 1.0 -> 4.05 / 18.1 / 90.5.)
The classic formula ``gaussian_sigma(800, 1.0, 1e-5)`` gives 3,876 for one release (at
epsilon 9.8 it would give 396, but the theorem does not hold there); a per-round classic
calibration by basic composition (eps/R, delta/R per round) gives 86,849 (eps 1, R 20)
and 244,562 (eps 9.8, R 500) -- 6x and 25x the accountant's noise.  The whole ngf=64 generator
(N = 3.55 M weights, joint calibration) multiplies the table by sqrt(3.55) = 1.88, e.g.
about 18,150 per weight at epsilon 9.8 over 500 rounds (6,240 for ngf=16, N = 0.42 M).

theta itself lives in [0.1, 0.9].  With sigma in the hundreds or thousands, theta_dp is
c or 1-c with probability ~1/2 each, and E[theta_dp] - 1/2 ~ (theta - 1/2)(1-2c) /
(sigma sqrt(2 pi)): at sigma = 9,634 a weight's expected mask bit moves by at most
1.3e-5 from 1/2 -- far below the sampling noise of the 10 x 500 = 5000 bits the server
ever sees per weight.  The 'theta' mechanism with this (correct) calibration therefore
destroys the signal; useful privacy must come from elsewhere (``"statistics"`` below,
or secure aggregation).  The integrator measures and reports the resulting images.

What else leaves the client matters too: any data-dependent metric sent to the server
(training loss, number of examples) is NOT covered by these guarantees.

``dp = "statistics"`` -- beyond the paper (spec section 8)
==========================================================
With ``objective = "feature-matching"`` the client's data enter training only through the
mean ``mu_r`` and variance ``var_r`` of the per-sample feature vectors ``phi(x)`` (d-dim,
features from a *public* pretrained network).  ``privatize_statistics`` releases them
ONCE with **sample-level** (epsilon, delta)-DP (as DP-MERF, Harder et al. 2021):

* each feature vector is clipped to L2 norm C (C must be chosen without looking at the
  data); its elementwise square of the clipped vector has
  ``||phi^2||_2 <= ||phi||_2^2 <= C^2``;
* one Gaussian mechanism on the concatenation ``[sum phi, sum phi^2, w n]``.
  ``adjacency="add-remove"`` (default, the notion Opacus/DP-SGD use): adding or removing a
  sample changes it by at most ``Delta = sqrt(C^2 + C^4 + w^2)``; the count n is then
  private and is noised as the last coordinate, with weight
  ``w^2 = C sqrt(C^2 + C^4) / sqrt(d)`` (minimises the mean's expected squared error;
  for large d it barely increases Delta).  ``adjacency="replace-one"``: n is public,
  ``Delta = sqrt(4 C^2 + 2 C^4)`` (``||a - b||^2 <= 4C^2`` and, the squares being
  non-negative, ``||a^2 - b^2||^2 <= 2C^4``).
* ``mu = S1 / n~``, ``var = clamp(S2 / n~ - mu^2, min=0)``, ``n~ = max(noisy n, 1)``:
  post-processing.  The moments are those of the *clipped* features (a bias if C is
  below typical feature norms).

The noise multiplier is calibrated so that this single release spends exactly the target
epsilon (accountant with one step); that is the epsilon returned.  Every later use of
``mu``/``var`` -- all local steps, all masks, all rounds -- is post-processing, so the
spend does not grow with rounds, PROVIDED the function is called once per client and the
raw data are not used anywhere else in training.

The kernel-MMD objective (``objective = "mmd"``) compares raw real batches with fakes at
every step, so "statistics" DP cannot cover it: ``check_dp_compatible`` raises.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "DP_MODES",
    "OBJECTIVES",
    "ACCOUNTANTS",
    "CALIBRATIONS",
    "ADJACENCIES",
    "DEFAULT_ACCOUNTANT",
    "gaussian_sigma",
    "theta_sensitivity",
    "theta_noise_stds",
    "compute_epsilon",
    "noise_multiplier_for_budget",
    "privatize_theta",
    "ThetaAccountant",
    "clipped_feature_sums",
    "statistics_sensitivity",
    "privatize_statistics",
    "check_dp_compatible",
    "fresh_generator",
]

DP_MODES = ("off", "theta", "statistics")
OBJECTIVES = ("feature-matching", "mmd")
ACCOUNTANTS = ("rdp", "prv", "analytic")
CALIBRATIONS = ("joint", "per-tensor")
ADJACENCIES = ("add-remove", "replace-one")
DEFAULT_ACCOUNTANT = "rdp"

# Renyi orders: denser near 1 (large epsilon) and wider (small epsilon) than Opacus' default.
_RDP_ORDERS = (
    [1.0 + x / 100.0 for x in range(1, 10)]
    + [1.0 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0]
)
_MAX_NOISE_MULTIPLIER = 1e7
_REL_TOL = 1e-9  # tolerance on the budget (floating-point noise only)


# ----------------------------------------------------------------------------- checks


def _check_eps_delta(epsilon: float, delta: float) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_clip(clip: float) -> None:
    if not (0 <= clip < 0.5):
        raise ValueError(f"dp clip c must be in [0, 0.5), got {clip!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


# ----------------------------------------------------------------------- calibration


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Classic single-shot Gaussian mechanism: ``sensitivity * sqrt(2 ln(1.25/delta)) / epsilon``.

    (Dwork & Roth 2014, Thm A.1.)  The theorem requires ``0 < epsilon < 1``; for
    ``epsilon >= 1`` a ``UserWarning`` is issued and the number is NOT a valid guarantee
    (use ``noise_multiplier_for_budget`` instead).  It knows nothing about composition.
    """
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity!r}")
    _check_eps_delta(epsilon, delta)
    if epsilon >= 1:
        warnings.warn(
            f"gaussian_sigma: the classic formula is only proven for epsilon < 1 "
            f"(got {epsilon}); use noise_multiplier_for_budget for a valid calibration",
            UserWarning,
            stacklevel=2,
        )
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def theta_sensitivity(numel: int, clip: float) -> float:
    """L2 sensitivity ``(1 - 2c) sqrt(n)`` of a vector of n probabilities in ``[c, 1-c]``."""
    if int(numel) != numel or numel < 1:
        raise ValueError(f"numel must be a positive integer, got {numel!r}")
    _check_clip(clip)
    return (1.0 - 2.0 * clip) * math.sqrt(numel)


def theta_noise_stds(
    numels: list[int], clip: float, noise_multiplier: float, calibration: str = "joint"
) -> list[float]:
    """Per-coordinate noise std of each tensor as ``privatize_theta`` applies it."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if len(numels) == 0:
        return []
    if calibration == "joint":
        sigma = noise_multiplier * theta_sensitivity(sum(int(n) for n in numels), clip)
        return [sigma] * len(numels)
    k = len(numels)
    return [noise_multiplier * math.sqrt(k) * theta_sensitivity(n, clip) for n in numels]


# ------------------------------------------------------------------------ accounting


def _delta_gdp(eps: float, mu: float) -> float:
    from scipy.special import log_ndtr, ndtr

    return float(ndtr(-eps / mu + mu / 2.0) - math.exp(eps + log_ndtr(-eps / mu - mu / 2.0)))


def _epsilon_analytic(noise_multiplier: float, delta: float, steps: int) -> float:
    from scipy.optimize import brentq

    mu = math.sqrt(steps) / noise_multiplier
    if _delta_gdp(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while _delta_gdp(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(brentq(lambda e: _delta_gdp(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def compute_epsilon(
    noise_multiplier: float, delta: float, steps: int, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Epsilon spent at ``delta`` by ``steps`` Gaussian mechanisms (sample rate 1) with
    noise std ``noise_multiplier * sensitivity``.  0.0 for ``steps == 0``."""
    _check_accountant(accountant)
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    steps = int(steps)
    if steps == 0:
        return 0.0
    if accountant == "analytic":
        return _epsilon_analytic(float(noise_multiplier), float(delta), steps)
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = [(float(noise_multiplier), 1.0, steps)]
        with warnings.catch_warnings():
            # "optimal order is the largest/smallest alpha": the bound is still valid.
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=float(delta), alphas=_RDP_ORDERS))
    import numpy as np
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(noise_multiplier), 1.0, steps)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # sample_rate = 1 makes Opacus evaluate log(1 - q) = -inf harmlessly.
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=float(delta)))


def noise_multiplier_for_budget(
    epsilon: float, delta: float, rounds: int, *, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """Smallest noise multiplier z (to 1e-6 relative) such that ``rounds`` compositions of
    the Gaussian mechanism with sample rate 1 spend at most ``epsilon`` at ``delta``.

    Same job as ``opacus.accountants.utils.get_noise_multiplier(target_epsilon=epsilon,
    target_delta=delta, sample_rate=1.0, steps=rounds)``, with a relative tolerance
    (Opacus' is absolute, 0.01) and the conservative end of the bracket returned.
    Noise std on a tensor is ``z * sensitivity`` (see ``privatize_theta``).
    """
    _check_eps_delta(epsilon, delta)
    _check_accountant(accountant)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")

    def eps_of(z: float) -> float:
        return compute_epsilon(z, delta, int(rounds), accountant)

    lo = hi = 1.0
    if eps_of(hi) > epsilon:
        while eps_of(hi) > epsilon:
            lo, hi = hi, hi * 2.0
            if hi > _MAX_NOISE_MULTIPLIER:
                raise ValueError(f"budget epsilon={epsilon} too small for {rounds} rounds")
    else:
        while eps_of(lo) <= epsilon:
            lo, hi = lo / 2.0, lo
            if lo < 1e-6:
                return hi
    # invariant: eps_of(lo) > epsilon >= eps_of(hi)
    while (hi - lo) / hi > 1e-6:
        mid = math.sqrt(lo * hi)
        if eps_of(mid) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# ------------------------------------------------------------------ theta mechanism


def privatize_theta(
    thetas: list[torch.Tensor],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    *,
    calibration: str = "joint",
) -> list[torch.Tensor]:
    """Gaussian mechanism on the probabilities: ``clamp -> + N(0, sigma^2) -> clamp``.

    For each tensor: ``clamp(theta, c, 1-c) + N(0, sigma_k^2)`` then ``clamp(., c, 1-c)``,
    with ``sigma_k`` from ``theta_noise_stds`` (joint: ``z (1-2c) sqrt(sum n)`` for all;
    per-tensor: ``z sqrt(K) (1-2c) sqrt(n_k)``; for one tensor both are
    ``z (1-2c) sqrt(n)``).  Either way one call is ONE step of a ``ThetaAccountant`` with
    the same ``noise_multiplier``.  Returns new detached tensors (same shape, dtype,
    device); the noise is drawn on the generator's device in float32.

    ``generator=None`` (what a client must use): a fresh generator seeded from the OS's
    cryptographic source for this one release (``fresh_generator``), so no two releases share
    noise and nobody who knows the run's seeds can predict it.  Pass a generator only in tests.
    """
    _check_clip(clip)
    thetas = list(thetas)
    stds = theta_noise_stds([t.numel() for t in thetas], clip, noise_multiplier, calibration)
    if generator is None and thetas:
        generator = fresh_generator(thetas[0].device)
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for theta, sigma in zip(thetas, stds):
            base = theta.detach().clamp(clip, 1.0 - clip)
            noise = torch.randn(
                theta.shape,
                generator=generator,
                dtype=torch.float32,
                device=generator.device,
            )
            noisy = base + (noise * sigma).to(device=theta.device, dtype=base.dtype)
            out.append(noisy.clamp_(clip, 1.0 - clip))
    return out


class ThetaAccountant:
    """Spend of the 'theta' mechanism over rounds (one ``step`` per released round).

    All steps use the same noise multiplier and sample rate 1, so the state is just the
    step count; ``state_dict()`` is a flat dict of Python scalars (checkpoint / Flower
    ``context.state`` friendly).  ``step`` refuses to go over the budget: call
    ``can_release()`` before privatising, then ``step()``.
    """

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        budget_epsilon: float,
        *,
        accountant: str = DEFAULT_ACCOUNTANT,
        steps: int = 0,
    ) -> None:
        _check_eps_delta(budget_epsilon, delta)
        _check_accountant(accountant)
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.budget_epsilon = float(budget_epsilon)
        self.accountant = accountant
        self._steps = int(steps)
        self._cache: dict[int, float] = {}

    @property
    def steps(self) -> int:
        return self._steps

    def epsilon_after(self, steps: int) -> float:
        if steps not in self._cache:
            self._cache[steps] = compute_epsilon(
                self.noise_multiplier, self.delta, steps, self.accountant
            )
        return self._cache[steps]

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``self.delta`` (0.0 before any step)."""
        return self.epsilon_after(self._steps)

    def _within(self, eps: float) -> bool:
        return eps <= self.budget_epsilon * (1.0 + _REL_TOL)

    def can_release(self) -> bool:
        """True if one more release keeps the spend within the budget."""
        return self._within(self.epsilon_after(self._steps + 1))

    def remaining_rounds(self) -> int:
        """How many more releases fit in the budget."""
        if not self.can_release():
            return 0
        lo, hi = self._steps + 1, self._steps + 2  # lo fits
        while self._within(self.epsilon_after(hi)):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._within(self.epsilon_after(mid)):
                lo = mid
            else:
                hi = mid
        return lo - self._steps

    def step(self) -> None:
        """Record one more released round; raises ``RuntimeError`` past the budget."""
        if not self.can_release():
            raise RuntimeError(
                f"privacy budget exhausted: one more round would spend "
                f"epsilon={self.epsilon_after(self._steps + 1):.4f} > "
                f"budget {self.budget_epsilon} (delta={self.delta})"
            )
        self._steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "accountant": self.accountant,
            "steps": self._steps,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ThetaAccountant":
        return cls(
            noise_multiplier=float(state["noise_multiplier"]),
            delta=float(state["delta"]),
            budget_epsilon=float(state["budget_epsilon"]),
            accountant=str(state["accountant"]),
            steps=int(state["steps"]),
        )

    def __repr__(self) -> str:
        return (
            f"ThetaAccountant(z={self.noise_multiplier:.6g}, delta={self.delta:g}, "
            f"budget={self.budget_epsilon:g}, steps={self._steps}, "
            f"epsilon={self.epsilon:.4f}, accountant={self.accountant!r})"
        )


# ------------------------------------------------------------- statistics mechanism


def clipped_feature_sums(
    features: torch.Tensor, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Noise-free ``(sum phi, sum phi^2, n)`` of the rows clipped to L2 norm ``clip_norm``
    (float64).  Each row contributes at most ``C`` to the first and ``C^2`` to the second
    sum in L2 norm."""
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (n, d), got shape {tuple(features.shape)}")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    phi = features.detach().to(torch.float64)
    if not torch.isfinite(phi).all():
        raise ValueError("features contain non-finite values")
    norms = phi.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip_norm / norms.clamp_min(1e-300), max=1.0)
    phi = phi * scale
    return phi.sum(dim=0), (phi * phi).sum(dim=0), int(phi.shape[0])


def _count_weight(clip_norm: float, dim: int) -> float:
    c2 = clip_norm * clip_norm
    return math.sqrt(clip_norm * math.sqrt(c2 + c2 * c2) / math.sqrt(dim))


def statistics_sensitivity(clip_norm: float, dim: int, adjacency: str = "add-remove") -> float:
    """L2 sensitivity of the released vector of ``privatize_statistics``."""
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    c2 = clip_norm * clip_norm
    if adjacency == "replace-one":
        return math.sqrt(4.0 * c2 + 2.0 * c2 * c2)
    w = _count_weight(clip_norm, dim)
    return math.sqrt(c2 + c2 * c2 + w * w)


def privatize_statistics(
    features: torch.Tensor | Iterable[torch.Tensor],
    clip_norm: float,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
    *,
    adjacency: str = "add-remove",
    accountant: str = DEFAULT_ACCOUNTANT,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Release the feature mean and variance ONCE with sample-level (epsilon, delta)-DP.

    ``features`` (n, d), or an iterable of such batches (VGG features of a whole partition
    do not fit in memory at once) -> ``(mu, var, epsilon_spent)``; mu, var are float32 of
    shape (d,) on the features' device.  One Gaussian mechanism on ``[sum phi, sum phi^2, w n]``
    (count noised under add-remove adjacency; public under replace-one), calibrated
    with a one-step accountant to spend ``epsilon`` (``epsilon_spent`` is that
    accountant's value, within 1e-6 relative below the target).  Call it once per client:
    each call is a new release and its epsilons add up.  ``generator=None`` (what a client
    must use): fresh cryptographically seeded noise, as in ``privatize_theta``.
    """
    _check_eps_delta(epsilon, delta)
    _check_accountant(accountant)
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {adjacency!r}")
    s1, s2, n = None, None, 0
    for batch in [features] if isinstance(features, torch.Tensor) else features:
        b1, b2, k = clipped_feature_sums(batch, clip_norm)  # clipping is per sample: batching is exact
        s1, s2, n = (b1, b2, k) if s1 is None else (s1 + b1, s2 + b2, n + k)
    if n < 1:
        raise ValueError("features must contain at least one sample")
    d = int(s1.shape[0])
    z = noise_multiplier_for_budget(epsilon, delta, 1, accountant=accountant)
    spent = compute_epsilon(z, delta, 1, accountant)
    sigma = z * statistics_sensitivity(clip_norm, d, adjacency)

    if generator is None:
        generator = fresh_generator(s1.device)
    noise = torch.randn(2 * d + 1, generator=generator, dtype=torch.float64, device=generator.device)
    noise = noise.to(s1.device) * sigma
    s1n = s1 + noise[:d]
    s2n = s2 + noise[d : 2 * d]
    if adjacency == "add-remove":
        w = _count_weight(clip_norm, d)
        n_noisy = max(float(n) + float(noise[2 * d]) / w, 1.0)
    else:
        n_noisy = float(n)  # public; the last noise coordinate is unused
    mu = s1n / n_noisy
    var = torch.clamp(s2n / n_noisy - mu * mu, min=0.0)
    return mu.float(), var.float(), spent


# ------------------------------------------------------------------------- randomness


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 63 bits from ``secrets`` (the OS's CSPRNG).

    One per release: the seed is never stored, logged or derived from the run's seeds, so DP noise
    is independent across releases and unknown to the server.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


# -------------------------------------------------------------------- compatibility


def check_dp_compatible(dp: str, objective: str) -> None:
    """Raise ``ValueError`` for unknown modes/objectives and for combinations whose
    guarantee would not hold: ``dp="statistics"`` needs ``objective="feature-matching"``."""
    if dp not in DP_MODES:
        raise ValueError(f"dp must be one of {DP_MODES}, got {dp!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if dp == "statistics" and objective != "feature-matching":
        raise ValueError(
            f"dp='statistics' is incompatible with objective={objective!r}: the kernel "
            "MMD objective ('mmd') uses raw real data batches at every local step, so a "
            "one-off release of feature mean/variance cannot protect them. Use "
            "objective='feature-matching' with dp='statistics', or dp='theta' with 'mmd'."
        )
