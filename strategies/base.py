"""What both strategies of this app share, on top of Flower's ``FedAvg``.

- global round numbers across resumes (``round_offset``) and evaluation every k-th round;
- per-reply validation: Flower errors, missing records, a payload the subclass's ``decode``
  rejects, non-finite metrics, a second reply from the same node. A bad reply is logged with its
  reason and dropped, never aggregated;
- a round with fewer than ``min_train_nodes`` valid replies is skipped (``None`` keeps the global
  arrays as they were);
- one record per round for ``history.json`` (``round_records``): clients, drops, wire bytes,
  client metrics averaged by ``num-examples``, per-client values kept per node.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from prism_flwr.task import METRICS_KEY

PER_CLIENT = {"dp_epsilon": "dp_epsilon_per_client", "label_histogram": "label_histograms"}


def empty_record(rnd: int, asked: int = 0, downlink_bytes: int = 0) -> dict:
    """One ``history.json`` record before any reply is counted (round 0 stays like this)."""
    return {"round": rnd, "clients": 0, "asked": asked, "dropped": [], "uplink_bytes": 0,
            "uplink_bits_per_weight": None, "downlink_bytes": downlink_bytes, "mada_lambda": None,
            "loss": None, "skipped": False}


class RecordingFedAvg(FedAvg):
    """FedAvg with validated replies, skipped rounds and a history record per round.

    Subclasses set ``payload_key`` (the global vector sent down) and ``upload_key`` (what clients
    send back), implement ``decode(array)`` (upload -> what ``combine`` needs; raise ``ValueError``
    when bad) and ``combine``.
    """

    payload_key: str
    upload_key: str

    def __init__(self, *, num_weights: int, seed: int = 0, eval_every: int = 1, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, arrayrecord_key=self.payload_key)
        self.num_weights = num_weights
        self.seed = seed
        self.eval_every = eval_every
        self.round_offset = 0
        self.round_records: dict[int, dict] = {}  # global round -> what happened
        self._global: np.ndarray | None = None    # the arrays sent this round
        self._asked = 0

    def decode(self, array: Array) -> np.ndarray:
        raise NotImplementedError

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        """New global vector and extra record fields from the valid payloads of round ``rnd``."""
        raise NotImplementedError

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays[self.payload_key].numpy()
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
        """Decoded payload, metrics and payload bytes of one reply; raises on anything wrong."""
        if msg.metadata.src_node_id in accepted:
            raise ValueError("duplicate reply from this node in the same round")
        try:
            array = msg.content[self.upload_key][self.upload_key]
            metrics = msg.content[METRICS_KEY]
        except KeyError as err:
            raise ValueError(f"reply lacks record {err}") from None
        payload = self.decode(array)
        for key, value in metrics.items():
            if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"metric {key!r} is not finite: {value!r}")
        if metrics.get("num-examples", 0) <= 0:
            raise ValueError("metric 'num-examples' missing or not positive")
        return payload, metrics, array.numpy().nbytes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        ok, errors = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        payloads, metrics, sizes, nodes = [], [], [], []
        dropped = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in errors]
        for msg in ok:
            try:
                payload, mr, size = self._check_reply(msg, nodes)
            except (ValueError, TypeError) as err:
                dropped.append(f"node {msg.metadata.src_node_id}: {err}")
                log(WARNING, "round %d: dropped reply from node %d: %s", rnd, msg.metadata.src_node_id, err)
                continue
            nodes.append(msg.metadata.src_node_id)
            payloads.append(payload)
            metrics.append(mr)
            sizes.append(size)

        record = {**empty_record(rnd, self._asked, int(self._asked * self._global.nbytes)),
                  "clients": len(payloads), "dropped": dropped, "uplink_bytes": int(sum(sizes)),
                  "uplink_bits_per_weight": 8 * float(np.mean(sizes)) / self.num_weights if sizes else None}
        self.round_records[rnd] = record
        if len(payloads) < self.min_train_nodes:
            record["skipped"] = True
            log(WARNING, "round %d skipped: %d valid replies, min-train-nodes is %d; global state unchanged",
                rnd, len(payloads), self.min_train_nodes)
            return None, None

        weights = np.array([m["num-examples"] for m in metrics], dtype=np.float64)
        new, extra = self.combine(rnd, payloads, weights)
        agg = _weighted_metrics(metrics, weights)
        record.update(agg)
        record.update(extra)
        for key, name in PER_CLIENT.items():  # kept per node, not averaged
            if all(key in m for m in metrics):
                record[name] = {str(n): m[key] for n, m in zip(nodes, metrics)}
        out = {**agg, **{k: v for k, v in extra.items() if v is not None}, "clients": len(payloads),
               **{k: record[k] for k in ("uplink_bytes", "uplink_bits_per_weight", "downlink_bytes")}}
        return ArrayRecord({self.payload_key: Array(new)}), MetricRecord(out)


def _weighted_metrics(metrics: list[MetricRecord], weights: np.ndarray) -> dict[str, float]:
    """Average of every scalar client metric, weighted by num-examples (keys present in all replies)."""
    keys = {k for k in set.intersection(*(set(m.keys()) for m in metrics)) - {"num-examples"}
            if not isinstance(metrics[0][k], list)}
    return {k: float(np.dot(weights, [m[k] for m in metrics]) / weights.sum()) for k in sorted(keys)}
