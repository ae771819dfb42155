"""Server-side aggregation of binary masks: counts of ones, smoothed mean, MADA and the other rules.

The clients' masks are counted on packed bits, one client at a time (memory: one integer count per
weight, never a clients x weights matrix); the counts give the smoothed mean
``theta_agg = eps + (1 - 2 eps) c / K``, and the run's rule (``mean``, ``mada``, ``mada-change``,
``adam``, ``beta``) turns it into the next global scores. The rules, their formulas and why MADA's
lambda is mostly sampling noise: docs/aggregation.md.
A rule with state (``adam``, ``beta``) computes a round's new state without keeping it
(``Aggregator.propose``); the caller keeps it (``Aggregator.commit``) once the round is applied.
Input-caused failures raise ``AggregationError`` (the round is skipped); anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

AGGREGATIONS = ("mada", "mean", "mada-change", "adam", "beta")
MADA_SPACES = ("score", "probability")
EPS = 0.01


class AggregationError(ValueError):
    """A round cannot be aggregated because of what it received (no masks, a non-finite or
    undecodable aggregate): the round is skipped. Any other exception is a bug and ends the run."""


def count_ones(packed_masks: Iterable[np.ndarray], count: int) -> tuple[np.ndarray, int]:
    """Per-weight number of ones over packed masks; returns ``(counts, number_of_masks)``."""
    # Adding uint8 into uint8 is ~4x faster than widening each client to uint32, so count in a
    # uint8 block and flush it into the uint32 total before it can overflow (every 255 masks).
    counts = np.zeros(count, dtype=np.uint32)
    block = np.zeros(count, dtype=np.uint8)
    k = 0
    for packed in packed_masks:
        np.add(block, np.unpackbits(packed, count=count, bitorder="little"), out=block)
        k += 1
        if k % 255 == 0:
            counts += block
            block[:] = 0
    counts += block
    return counts, k


def smoothed_mean(counts: np.ndarray, k: int, eps: float = EPS) -> np.ndarray:
    """``theta_agg = eps + (1 - 2 eps) counts / k`` (float32)."""
    if k < 1:
        raise AggregationError("cannot aggregate zero masks")
    return (eps + (1.0 - 2.0 * eps) * (counts.astype(np.float32) / np.float32(k))).astype(np.float32)


def logit(p: np.ndarray) -> np.ndarray:
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def sigmoid(s: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * s))).astype(np.float32)  # tanh form: no overflow warnings


def hamming_lambda(theta_old: np.ndarray, theta_new: np.ndarray, rng: np.random.Generator) -> float:
    """Fraction of positions where ``Bernoulli(theta_old)`` and ``Bernoulli(theta_new)`` samples differ."""
    m_old = rng.random(theta_old.shape, dtype=np.float32) < theta_old
    m_new = rng.random(theta_new.shape, dtype=np.float32) < theta_new
    return float(np.count_nonzero(m_old != m_new)) / theta_old.size


def lambda_diagnostics(theta_old: np.ndarray, theta_agg: np.ndarray) -> dict[str, float]:
    """What MADA's lambda is made of: its no-change expectation ``mean 2 theta_o (1 - theta_o)``
    and the deterministic change term ``mean (theta_o - theta_agg)^2``."""
    t = theta_old.astype(np.float64)
    return {
        "lambda_no_change": float(np.mean(2.0 * t * (1.0 - t))),
        "theta_change_sq": float(np.mean((t - theta_agg.astype(np.float64)) ** 2)),
    }


def vote_noise(theta_agg: np.ndarray, k: int, eps: float = EPS) -> float:
    """``(1 - 2 eps)^2 mean p (1 - p) / (k - 1)``: the variance of ``theta_agg`` if its ``k`` votes
    were independent draws with one probability per weight (too large when clients differ: see
    the module docstring); ``nan`` for ``k < 2``."""
    if k < 2:
        return float("nan")
    p = (theta_agg.astype(np.float64) - eps) / (1.0 - 2.0 * eps)
    return (1.0 - 2.0 * eps) ** 2 * float(np.mean(p * (1.0 - p))) / (k - 1)


def change_lambda(theta_old: np.ndarray, theta_agg: np.ndarray, k: int, eps: float = EPS) -> float:
    """``clip(1 - sigma^2 / D, 0, 1)``: the share of the observed change that is not vote noise."""
    if k < 2:
        return 1.0
    sigma2 = vote_noise(theta_agg, k, eps)
    d = float(np.mean((theta_old.astype(np.float64) - theta_agg.astype(np.float64)) ** 2))
    return 1.0 if d <= 0.0 else float(np.clip(1.0 - sigma2 / d, 0.0, 1.0))


@dataclass(frozen=True)
class AggregateResult:
    scores: np.ndarray  # s_{t+1}, float32
    mada_lambda: float  # the blend step (MADA's Hamming distance, or mada-change's gain); nan otherwise
    diagnostics: dict = field(default_factory=dict)  # lambda_diagnostics of the round
    state: dict | None = None  # the rule's state after this round (adam, beta), kept by Aggregator.commit


def aggregate(
    scores: np.ndarray,
    counts: np.ndarray,
    k: int,
    *,
    method: str = "mada",
    space: str = "score",
    rng: np.random.Generator,
    eps: float = EPS,
) -> AggregateResult:
    """New global scores from the current ones and the per-weight mask counts of ``k`` clients
    (the stateless rules: ``mada``, ``mean``, ``mada-change``; see ``Aggregator`` for all)."""
    if method not in ("mada", "mean", "mada-change"):
        raise ValueError(
            f"aggregation must be one of mada, mean, mada-change here (all rules: Aggregator), got {method!r}"
        )
    if space not in MADA_SPACES:
        raise ValueError(f"mada space must be one of {MADA_SPACES}, got {space!r}")
    theta_agg = smoothed_mean(counts, k, eps)
    theta_old = sigmoid(scores)
    diag = lambda_diagnostics(theta_old, theta_agg)
    if method == "mean":
        return AggregateResult(logit(theta_agg), float("nan"), diag)
    if method == "mada":
        lam = hamming_lambda(theta_old, theta_agg, rng)
    else:
        lam = change_lambda(theta_old, theta_agg, k, eps)
    return AggregateResult(mada_blend(scores, theta_agg, lam, space), lam, diag)


class Aggregator:
    """One aggregation rule with the state it keeps across rounds (``adam``: moments; ``beta``:
    decayed vote counts). ``state_dict`` / ``load_state_dict`` let a checkpoint carry it."""

    ADAM = {"eta": 1.0, "b1": 0.9, "b2": 0.99, "tau": 1e-3}
    BETA_RHO = 0.5

    def __init__(self, rule: str = "mada", space: str = "score", eps: float = EPS) -> None:
        if rule not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {rule!r}")
        if space not in MADA_SPACES:
            raise ValueError(f"mada space must be one of {MADA_SPACES}, got {space!r}")
        self.rule, self.space, self.eps = rule, space, eps
        self.state: dict[str, np.ndarray] = {}

    def propose(
        self, scores: np.ndarray, counts: np.ndarray, k: int, rng: np.random.Generator
    ) -> AggregateResult:
        """The round's result and the rule's state after it, without keeping that state."""
        if self.rule in ("mada", "mean", "mada-change"):
            return aggregate(scores, counts, k, method=self.rule, space=self.space, rng=rng, eps=self.eps)
        theta_agg = smoothed_mean(counts, k, self.eps)
        diag = lambda_diagnostics(sigmoid(scores), theta_agg)
        if self.rule == "adam":
            new, state = self._adam(scores, logit(theta_agg))
        else:
            new, state = self._beta(counts, k)
        return AggregateResult(new, float("nan"), diag, state)

    def commit(self, result: AggregateResult) -> None:
        """Keep the state of a proposed round: call it once the round is applied."""
        if result.state is not None:
            self.state = result.state

    def step(
        self, scores: np.ndarray, counts: np.ndarray, k: int, rng: np.random.Generator
    ) -> AggregateResult:
        """``propose`` and ``commit``: for callers that apply every round they aggregate."""
        result = self.propose(scores, counts, k, rng)
        self.commit(result)
        return result

    def _adam(self, scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, dict]:
        h = self.ADAM
        d = (target - scores).astype(np.float32)
        m = self.state.get("m", np.zeros_like(d))
        v = self.state.get("v", np.zeros_like(d))
        m = (h["b1"] * m + (1 - h["b1"]) * d).astype(np.float32)
        v = (h["b2"] * v + (1 - h["b2"]) * d * d).astype(np.float32)
        return (scores + h["eta"] * m / (np.sqrt(v) + h["tau"])).astype(np.float32), {"m": m, "v": v}

    def _beta(self, counts: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
        ones = counts.astype(np.float32)
        a = self.BETA_RHO * self.state.get("a", np.ones_like(ones)) + ones
        b = self.BETA_RHO * self.state.get("b", np.ones_like(ones)) + (k - ones)
        theta = logit(np.clip(a / (a + b), self.eps, 1 - self.eps).astype(np.float32))
        return theta, {"a": a.astype(np.float32), "b": b.astype(np.float32)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.state = {k: np.asarray(v, dtype=np.float32).copy() for k, v in state.items()}


def mada_blend(scores: np.ndarray, theta_agg: np.ndarray, lam: float, space: str = "score") -> np.ndarray:
    """Move the global scores toward the aggregate by ``lam`` (score space or probability space)."""
    if space == "score":
        return (lam * logit(theta_agg) + (1.0 - lam) * scores).astype(np.float32)
    # theta_{t+1} = lambda' theta_t + (1 - lambda') theta_agg with lambda' = 1 - lam. Clip so the
    # logit stays finite where theta_t had saturated in float32.
    theta = np.clip((1.0 - lam) * sigmoid(scores) + lam * theta_agg, 1e-7, 1 - 1e-7)
    return logit(theta)
