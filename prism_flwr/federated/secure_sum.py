"""Secure aggregation as the apps use it: protocol parameters from the number of clients, and
one in-process round that gives the counts (each client masks the 0/1 mask it drew,
``ClientRoundResult.mask``).

The ClientApp, the SecAgg+ strategy and the in-process runner all go through these functions,
so ``flwr run`` and the in-process runner sum the same vectors with the same parameters.
Protocol and parameter rules: docs/secure-aggregation.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from prism_flwr.secagg import Aggregate, run_protocol

COMPLETE_GRAPH_UP_TO = 10  # clients; above, a sparse graph of about 2 log2(K) neighbours


def secagg_parameters(clients: int) -> tuple[int, int]:
    """(threshold t, degree k) for a round of ``clients`` sampled clients: the complete graph for
    up to ten clients, else k about 2 log2(K) (k*K even); t = floor(k/2) + 1, the fewest shares
    that still keep a deviating server from both secrets of a client."""
    if clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients in a round, got {clients}")
    if clients <= COMPLETE_GRAPH_UP_TO:
        degree = clients - 1
    else:
        degree = min(clients - 1, 2 * math.ceil(math.log2(clients)))
        degree += (degree * clients) % 2  # a k-regular graph on K nodes needs k*K even
    return degree // 2 + 1, degree


def secure_counts(inputs: Mapping[int, np.ndarray], dropouts=None, trusts=None) -> Aggregate:
    """One whole protocol round in this process with the apps' parameters: the per-weight counts
    of ones over the contributing clients (``RoundSkipped`` when too few remain); ``trusts``: each
    node's ``Trust`` (a signed round with a consistency round when they hold identities)."""
    threshold, degree = secagg_parameters(len(inputs))
    return run_protocol(inputs, threshold, degree, dropouts=dropouts, trusts=trusts)
