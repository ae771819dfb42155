"""PRISM's server step, framework-free: the round's masks (or their secure sum) to the new global.

``mask_counts`` counts the valid masks' ones per weight (robustly when the run asks for it);
``server_step`` applies the run's rule to the counts with the server's stream
``seeds.server_rng(seed, round)`` and settles the result with the run's downlink on
``seeds.settle_rng(seed, round)``. A round's result thus depends only on its inputs (a resumed
run is bit-identical). The MADA strategy and the in-process runner both call these two
functions, so ``flwr run`` and the runner step the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from prism_flwr.config import RunConfig
from prism_flwr.federated.aggregation import AggregateResult, Aggregator, count_ones
from prism_flwr.federated.broadcast import Downlink
from prism_flwr.federated.robust import RobustInfo, robust_counts
from prism_flwr.federated.seeds import server_rng, settle_rng


def robust_settings(cfg: RunConfig) -> dict | None:
    """``robust_counts``' keywords under ``robust-aggregation = "on"``; None when off."""
    if cfg.robust_aggregation != "on":
        return None
    return {"trim": cfg.robust_trim, "outlier_mads": cfg.robust_outlier_mads}


def mask_counts(
    packed_masks: Sequence[np.ndarray], count: int, coding=None, robust: dict | None = None
) -> tuple[np.ndarray, int, RobustInfo | None]:
    """(per-weight counts of ones in weight order, masks counted, what robust counting dropped).

    ``coding``: the round's ``codec.MaskModel`` when the masks were decoded into its grouped
    layout (counted there, moved back to weight order once); ``robust``: ``robust_settings``."""
    bits = count if coding is None else coding.grouped_bits
    if robust is not None:
        counts, k, info = robust_counts(list(packed_masks), bits, **robust)
    else:
        (counts, k), info = count_ones(packed_masks, bits), None
    return (counts if coding is None else coding.ungroup_counts(counts)), k, info


def server_step(
    aggregator: Aggregator,
    scores: np.ndarray,
    counts: np.ndarray,
    k: int,
    downlink: Downlink,
    seed: int,
    rnd: int,
) -> AggregateResult:
    """The new global state from the per-weight ``counts`` of ones over ``k`` masks: the rule's
    proposal, settled by ``downlink``. The rule's new state rides in the result; the caller keeps
    it (``aggregator.commit``) once the round applies."""
    res = aggregator.propose(scores, counts, k, rng=server_rng(seed, rnd))
    return replace(res, scores=downlink.settle(res.scores, settle_rng(seed, rnd)))
