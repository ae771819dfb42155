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

__all__ = [
    "MODES",
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
