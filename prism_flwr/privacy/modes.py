"""One object per ``dp`` mode: what a client releases, how it is accounted and what it reports.

``privacy_for(cfg)`` is chosen once per round; the client round, the ClientApp, the in-process runner
and the ServerApp ask it and never compare ``dp`` names themselves. Every release goes through the
node's ledger (``LedgerSession``): the ClientApp opens it under the node's state-dir, the in-process
runner under a folder of its own. docs/privacy.md says what each mode guarantees.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prism_flwr.privacy.accounting import noise_multiplier_for_budget
from prism_flwr.privacy.ledger import LedgerSession, PrivacyLedger, example_ids
from prism_flwr.privacy.randomness import fresh_generator
from prism_flwr.privacy.statistics import privatize_statistics, statistics_noise_multiplier
from prism_flwr.privacy.theta import privatize_theta

if TYPE_CHECKING:
    from prism_flwr.config import RunConfig

Upload = Callable[[Callable | None], tuple[Any, dict]]  # theta release (or None) -> (payload, extra metrics)
# Metrics a client may report under dp = "statistics" (training saw only the DP statistics).
STATISTICS_METRICS = ("loss", "theta_density", "theta_entropy_bits", "mask_density")


class PrivacyModeError(RuntimeError):
    """A client state kept under one privacy mode, asked to serve another: the text names both."""


class NoPrivacy:
    """``dp = "off"``: the round's mask and metrics leave as they are; nothing is accounted."""

    name, rank = "off", 0  # rank: node floors order the modes off < statistics < theta

    def __init__(self, cfg: RunConfig, vgg19_weights: str = "") -> None:
        self.cfg, self.vgg19_weights = cfg, vgg19_weights  # the node's weights file, if features = vgg19

    @property
    def spends(self) -> bool:
        return self.rank > 0

    def binding(self) -> str:
        """What a client state saved in this mode is bound to: another mode never reuses it."""
        return f"dp={self.name} objective={self.cfg.objective}"

    def multiplier(self) -> float | None:
        """The noise multiplier of this run's next release (None: no release)."""
        return None

    def session(
        self, state_dir: str | Path, budget: float, delta: float, run: str, rnd: int, data
    ) -> LedgerSession | None:
        """The node's ledger for this round's releases from ``data`` (None when nothing is released)."""
        if not self.spends:
            return None
        return LedgerSession(PrivacyLedger(state_dir, budget, delta), run, rnd, example_ids(data))

    def precheck(self, session: LedgerSession | None) -> None:
        """Refuse before any training when this round's release could not go."""

    def prepare(self, state, features, data, session: LedgerSession | None) -> None:
        """Before training: put what the objective may read of the data into ``state``."""

    def release(self, session: LedgerSession | None, upload: Upload) -> tuple[Any, dict]:
        return upload(None)

    def report(self, metrics: dict, n: int, hist: list[int], session: LedgerSession | None) -> dict:
        """The metrics the reply carries."""
        return {**metrics, "num-examples": n, "label_histogram": [int(c) for c in hist]}

    def evaluation_report(self, metrics: dict) -> dict:
        return metrics

    def fraction_evaluate(self, asked: float) -> float:
        """The share of nodes asked for their local evaluation metric."""
        return asked


class ThetaPrivacy(NoPrivacy):
    """``dp = "theta"`` (the paper's): each round's mask is sampled from noised theta; client-level DP
    composed over rounds; the reply carries the mask and the epsilon spent, nothing else."""

    name, rank = "theta", 2

    def multiplier(self) -> float:
        return _theta_multiplier(self.cfg.dp_epsilon, self.cfg.dp_delta, self.cfg.num_server_rounds)

    def precheck(self, session: LedgerSession) -> None:
        session.precheck(self.multiplier(), self.cfg.dp_epsilon)

    def release(self, session: LedgerSession, upload: Upload) -> tuple[Any, dict]:
        z, clip = self.multiplier(), self.cfg.dp_clip
        noise = fresh_generator()
        with session.theta_release(z, self.cfg.dp_epsilon):
            return upload(lambda thetas: privatize_theta(thetas, clip, z, generator=noise))

    def report(self, metrics, n, hist, session) -> dict:
        return {"num-examples": 1, "dp_epsilon": session.run_epsilon()}

    def evaluation_report(self, metrics: dict) -> dict:
        return {"num-examples": 1}

    def fraction_evaluate(self, asked: float) -> float:
        return 0.0  # a client's local evaluation would leak data outside the guarantee


class StatisticsPrivacy(ThetaPrivacy):
    """``dp = "statistics"``: the feature mean and variance released once with sample-level DP (from the
    node's ledger, never from a client state); every step, mask and round after is post-processing."""

    name, rank = "statistics", 1

    def multiplier(self) -> float:
        return statistics_noise_multiplier(self.cfg.dp_epsilon, self.cfg.dp_delta)

    def params(self) -> dict:
        """What decides a release: the same values reuse the one in the node's ledger."""
        dump = self.cfg.model_dump(by_alias=True)
        keys = ("features", "dp-feature-clip", "dp-epsilon", "dp-delta")
        return {**{k: dump[k] for k in keys}, "vgg19-weights": self.vgg19_weights}

    def precheck(self, session: LedgerSession) -> None:
        session.precheck(self.multiplier(), params=self.params())

    def prepare(self, state, features, data, session: LedgerSession) -> None:
        from prism_flwr.model.objectives import FeatureMatching

        def release() -> tuple[torch.Tensor, torch.Tensor, float]:
            with torch.no_grad():
                batches = (features(data[i : i + 256]) for i in range(0, len(data), 256))
                cfg = self.cfg
                return privatize_statistics(
                    batches,
                    cfg.dp_feature_clip,
                    cfg.dp_epsilon,
                    cfg.dp_delta,
                    generator=fresh_generator(data.device),
                )

        mu, var, _ = session.statistics(self.params(), self.multiplier(), release)
        kept = state.objective or FeatureMatching(mu, var).full_state()
        state.objective = {**kept, "mu_real": mu.clone(), "var_real": var.clone()}

    def release(self, session, upload):
        return upload(None)

    def report(self, metrics, n, hist, session) -> dict:
        kept = {k: metrics[k] for k in STATISTICS_METRICS if k in metrics}
        found = session.statistics(self.params(), self.multiplier(), _never)  # the release prepare used
        return {**kept, "num-examples": 1, "dp_epsilon": found[2]}


def _never():
    raise AssertionError("the statistics were released before training")


@lru_cache(maxsize=32)
def _theta_multiplier(epsilon: float, delta: float, rounds: int) -> float:
    """The noise multiplier that spends exactly the budget over ``rounds`` releases."""
    return noise_multiplier_for_budget(epsilon, delta, rounds)


MODES = {m.name: m for m in (NoPrivacy, ThetaPrivacy, StatisticsPrivacy)}
BY_RANK = tuple(sorted(MODES, key=lambda name: MODES[name].rank))  # weakest first


def privacy_for(cfg: RunConfig, vgg19_weights: str = "") -> NoPrivacy:
    """The run's privacy mode (``vgg19_weights``: the node's file, part of a statistics release's name)."""
    return MODES[cfg.dp](cfg, vgg19_weights)


def hides_errors(dp: object) -> bool:
    """Whether a failed round's reply must carry a fixed code, not text (any mode but off, or an unknown
    one): under DP an error message derived from the data would leak outside the guarantee."""
    return MODES.get(dp, ThetaPrivacy).rank > 0  # type: ignore[arg-type]
