"""Differential privacy for PRISM clients: the theta and statistics mechanisms, one RDP accountant,
the node's per-example ledger, one object per ``dp`` mode and the client's secret randomness
(docs/privacy.md)."""

from __future__ import annotations

from prism_flwr.privacy.accounting import compute_epsilon, epsilon_of_releases, noise_multiplier_for_budget
from prism_flwr.privacy.modes import MODES, privacy_for
from prism_flwr.privacy.randomness import fresh_generator, insecure_test_secret, new_secret
from prism_flwr.privacy.statistics import (
    clipped_feature_sums,
    privatize_statistics,
    statistics_noise_multiplier,
    statistics_sensitivity,
)
from prism_flwr.privacy.theta import privatize_theta, theta_sensitivity

DP_MODES = tuple(MODES)
OBJECTIVES = ("feature-matching", "mmd")

__all__ = [
    "DP_MODES",
    "MODES",
    "OBJECTIVES",
    "check_dp_compatible",
    "clipped_feature_sums",
    "compute_epsilon",
    "epsilon_of_releases",
    "fresh_generator",
    "insecure_test_secret",
    "new_secret",
    "noise_multiplier_for_budget",
    "privacy_for",
    "privatize_statistics",
    "privatize_theta",
    "statistics_noise_multiplier",
    "statistics_sensitivity",
    "theta_sensitivity",
]


def check_dp_compatible(dp: str, objective: str) -> None:
    """``ValueError`` for unknown names and for ``dp="statistics"`` without the feature-matching
    objective (the kernel MMD reads raw batches at every step: a one-off release cannot cover it)."""
    if dp not in DP_MODES:
        raise ValueError(f"dp must be one of {DP_MODES}, got {dp!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if dp == "statistics" and objective != "feature-matching":
        raise ValueError(
            f"dp='statistics' is incompatible with objective={objective!r}: the kernel MMD "
            "objective uses raw data batches at every local step, so a one-off release of the "
            "feature mean and variance cannot protect them. Use objective='feature-matching' "
            "with dp='statistics', or dp='theta' with 'mmd'."
        )
