"""MADA: Flower strategy that aggregates binary masks into new global scores.

Sampling, message construction and evaluation come from Flower's ``FedAvg``; what changes is
``aggregate_train``:

1. every reply is validated on its own: Flower errors, a missing or mistyped payload, a mask the
   codec rejects (truncated, wrong length, wrong layout, bad checksum, unknown version), non-finite
   metrics, a second reply from the same node. A bad reply is logged with its reason and dropped,
   never aggregated;
2. if fewer than ``min_train_nodes`` masks survive, the round is skipped: the global scores stay
   as they were (``None`` is returned and ``Strategy.start`` keeps the previous arrays);
3. otherwise the per-weight counts of ones are taken on the packed bits and
   ``prism_flwr.aggregation.aggregate`` turns them into ``s_{t+1}``
   (MADA: ``s_{t+1} = lambda logit(theta_agg) + (1 - lambda) s_t``, lambda = Hamming distance of
   global-mask samples; or the plain mean). The server's Bernoulli samples use
   ``default_rng([seed, round])``, so a round's result depends only on its inputs.

``round_offset`` lets a resumed run continue the global round numbering.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from prism_flwr.aggregation import aggregate, count_ones
from prism_flwr.codec import MaskFormatError, decode_mask
from prism_flwr.task import MASK_KEY, METRICS_KEY, SCORES_KEY


class MADA(FedAvg):
    """Mask-aware dynamic moving average over 1-bit client masks.

    Parameters
    ----------
    num_weights, layout : the model's masked-weight count and layout fingerprint (codec checks).
    method : ``"mada"`` or ``"mean"`` (PRISM without MADA).
    space : ``"score"`` (official code) or ``"probability"`` (the paper's figure).
    seed : run seed; the server's mask samples in round ``t`` use ``default_rng([seed, t])``.
    eval_every : federated evaluation only every k-th round.
    """

    def __init__(self, *, num_weights: int, layout: bytes, method: str = "mada", space: str = "score",
                 seed: int = 0, eval_every: int = 1, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_available_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_train_nodes, min_available_nodes=min_available_nodes,
                         arrayrecord_key=SCORES_KEY)
        self.num_weights = num_weights
        self.layout = layout
        self.method = method
        self.space = space
        self.seed = seed
        self.eval_every = eval_every
        self.round_offset = 0
        self.round_records: dict[int, dict] = {}  # global round -> what happened (for history.json)
        self._scores: np.ndarray | None = None
        self._asked = 0

    def summary(self) -> None:
        log(INFO, "\t├──> PRISM aggregation: %s (MADA space: %s), %d masked weights",
            self.method, self.space, self.num_weights)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._scores = arrays[SCORES_KEY].numpy()
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._asked = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if (server_round + self.round_offset) % self.eval_every:
            return []
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        rnd = server_round + self.round_offset
        if metrics is not None and rnd in self.round_records:
            self.round_records[rnd]["client_eval"] = dict(metrics)
        return metrics

    def _check_reply(self, msg: Message, accepted: list[int]) -> tuple[np.ndarray, MetricRecord, int]:
        """Decoded packed mask, metrics and wire size of one reply; raises on anything wrong."""
        node = msg.metadata.src_node_id
        if node in accepted:
            raise ValueError("duplicate reply from this node in the same round")
        try:
            arr = msg.content[MASK_KEY][MASK_KEY]
            metrics = msg.content[METRICS_KEY]
        except KeyError as err:
            raise ValueError(f"reply lacks record {err}") from None
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise ValueError(f"mask must be a flat uint8 array, got {arr.dtype} {arr.shape}")
        blob = arr.numpy().tobytes()
        packed = decode_mask(blob, self.num_weights, self.layout)
        for key, value in metrics.items():
            if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"metric {key!r} is not finite: {value!r}")
        if metrics.get("num-examples", 0) <= 0:
            raise ValueError("metric 'num-examples' missing or not positive")
        return packed, metrics, len(blob)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        ok, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        packed, metrics, sizes, nodes = [], [], [], []
        dropped = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        for msg in ok:
            try:
                p, mr, size = self._check_reply(msg, nodes)
            except (MaskFormatError, ValueError, TypeError) as err:
                dropped.append(f"node {msg.metadata.src_node_id}: {err}")
                log(WARNING, "round %d: dropped reply from node %d: %s", rnd, msg.metadata.src_node_id, err)
                continue
            nodes.append(msg.metadata.src_node_id)
            packed.append(p)
            metrics.append(mr)
            sizes.append(size)

        record = {"round": rnd, "clients": len(packed), "asked": self._asked, "dropped": dropped,
                  "uplink_bytes": int(sum(sizes)),
                  "uplink_bits_per_weight": 8 * float(np.mean(sizes)) / self.num_weights if sizes else None,
                  "downlink_bytes": int(self._asked * (4 * self.num_weights)),
                  "mada_lambda": None, "loss": None, "skipped": False}
        self.round_records[rnd] = record
        if len(packed) < self.min_train_nodes:
            record["skipped"] = True
            log(WARNING, "round %d skipped: %d valid masks, min-train-nodes is %d; global scores unchanged",
                rnd, len(packed), self.min_train_nodes)
            return None, None

        counts, k = count_ones(packed, self.num_weights)
        res = aggregate(self._scores, counts, k, method=self.method, space=self.space,
                        rng=np.random.default_rng([self.seed, rnd]))
        agg = self._weighted_metrics(metrics)
        record.update(agg)
        per_client = {"dp_epsilon": "dp_epsilon_per_client", "label_histogram": "label_histograms"}
        for key, name in per_client.items():  # kept per node, not averaged
            if all(key in m for m in metrics):
                record[name] = {str(n): m[key] for n, m in zip(nodes, metrics)}
        out = MetricRecord({**agg, "clients": len(packed), "uplink_bytes": record["uplink_bytes"],
                            "uplink_bits_per_weight": record["uplink_bits_per_weight"],
                            "downlink_bytes": record["downlink_bytes"]})
        if self.method == "mada":
            record["mada_lambda"] = res.mada_lambda
            out["mada_lambda"] = res.mada_lambda
        return ArrayRecord({SCORES_KEY: Array(res.scores)}), out

    @staticmethod
    def _weighted_metrics(metrics: list[MetricRecord]) -> dict[str, float]:
        """Average of every scalar client metric, weighted by num-examples (keys present in all replies)."""
        weights = np.array([m["num-examples"] for m in metrics], dtype=np.float64)
        keys = {k for k in set.intersection(*(set(m.keys()) for m in metrics)) - {"num-examples"}
                if not isinstance(metrics[0][k], list)}
        return {k: float(np.dot(weights, [m[k] for m in metrics]) / weights.sum()) for k in sorted(keys)}
