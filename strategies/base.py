"""What both strategies of this app share, on top of Flower's ``FedAvg``.

- global round numbers across resumes (``round_offset``) and evaluation every k-th round;
- per-reply validation, each reply in isolation: ANY exception raised while one reply is looked at
  (Flower errors, missing or mistyped records, extra records or arrays, an array whose bytes do not
  match its declared dtype and shape or exceed the size bound, anything the subclass's ``decode``
  raises, metrics outside the schema, a second reply from one node, a reply from a node not asked)
  drops that reply with the reason in the round record and the log; it never ends the ServerApp;
- the metric schema (``TRAIN_METRICS``, ``EVALUATE_METRICS``): only known keys, each a finite
  scalar within its bounds, or for ``label_histogram`` a list of ``num_classes`` non-negative
  integers that sums to ``num-examples``; ``num-examples`` is an integer in
  ``[1, max_examples]`` (the server passes the dataset's training-set size: no client holds more);
- a round with fewer than ``min_train_nodes`` valid replies is skipped (``None`` keeps the global
  arrays as they were); so is a round whose aggregation raises or gives a non-finite vector;
- one record per round for ``history.json`` (``round_records``): clients, drops, wire bytes; client
  metrics averaged by (bounded) ``num-examples`` under ``client_metrics`` (and ``loss``), per-client
  values kept per node, so no client-chosen name can overwrite a field of the record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from prism_flwr.task import METRICS_KEY

from .wire import message_wire_bytes

PER_CLIENT = {"dp_epsilon": "dp_epsilon_per_client", "label_histogram": "label_histograms"}
MAX_EXAMPLES = 2**31 - 1      # num-examples bound when the strategy is not told the dataset's size
MAX_CLASSES = 1000            # label_histogram length bound when the strategy is not told num_classes
NPY_HEADER_SLACK = 4096       # bytes of .npy header an Array may carry on top of its raw data


@dataclass(frozen=True)
class Metric:
    """One allowed client metric: a finite number in ``[lo, hi]`` (``hi=None``: the strategy's
    ``max_examples``), an integer if ``integer``, or a per-class list of counts if ``per_class``."""

    lo: float = -math.inf
    hi: float | None = math.inf
    integer: bool = False
    per_class: bool = False


TRAIN_METRICS = {
    "num-examples": Metric(1, None, integer=True),
    "loss": Metric(),
    "theta_density": Metric(0.0, 1.0),
    "theta_entropy_bits": Metric(0.0, 1.0),
    "mask_density": Metric(0.0, 1.0),
    "dp_epsilon": Metric(0.0, 1e6),
    "label_histogram": Metric(0, None, integer=True, per_class=True),
}
EVALUATE_METRICS = {
    "num-examples": Metric(1, None, integer=True),
    "local_mmd_pixels": Metric(),
}


class ReplyRejected(ValueError):
    """One reply breaks the protocol; the message says how."""


def _wire_bytes(messages: list[Message]) -> int | None:
    """Serialised bytes of ``messages`` as Flower sends them; None (and a log line) if a message
    cannot be counted: a byte count never ends a round."""
    try:
        return sum(message_wire_bytes(m) for m in messages)
    except Exception as err:  # noqa: BLE001
        log(WARNING, "wire bytes not counted: %s", _reason(err))
        return None


def empty_record(rnd: int, asked: int = 0, downlink_bytes: int = 0) -> dict:
    """One ``history.json`` record before any reply is counted (round 0 stays like this)."""
    return {"round": rnd, "clients": 0, "asked": asked, "dropped": [], "uplink_bytes": 0,
            "uplink_bits_per_weight": None, "downlink_bytes": downlink_bytes, "mada_lambda": None,
            "loss": None, "skipped": False}


def _node(msg: object) -> object:
    try:
        return msg.metadata.src_node_id  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a reply without metadata is still only one bad reply
        return "?"


def _clip(text: str, limit: int = 600) -> str:
    """A client cannot flood the history with its error text; the end (where a traceback names
    the exception) is kept."""
    return text if len(text) <= limit else f"{text[:150]} [...] {text[-(limit - 157):]}"


# Flower's error codes (flwr.common.constant.ErrorCode) by number, for the log and history.json.
_ERROR_NAMES = {code: name for name, code in vars(ErrorCode).items()
                if name.isupper() and isinstance(code, int)}


def _error_text(msg: Message) -> str:
    """An error reply as text: Flower's code name and the reason. CLIENT_APP_CRASHED is what a
    node sends when its ClientApp process ended without replying (killed, e.g. out of memory)."""
    try:
        code = int(msg.error.code)
        return f"{_ERROR_NAMES.get(code, 'error')} ({code}): {_clip(str(msg.error.reason))}"
    except Exception:  # noqa: BLE001 - a malformed error is still only one dropped reply
        return "error reply (unreadable)"


def _reason(err: BaseException) -> str:
    return _clip(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


class RecordingFedAvg(FedAvg):
    """FedAvg with validated replies, skipped rounds and a history record per round.

    Subclasses set ``payload_key`` (the global vector sent down) and ``upload_key`` (what clients
    send back), implement ``decode(array)`` (upload -> what ``combine`` needs; raise when bad) and
    ``combine``. ``max_upload_bytes`` bounds one upload's raw bytes (default: a float32 vector).
    """

    payload_key: str
    upload_key: str
    train_metrics = TRAIN_METRICS
    evaluate_metrics = EVALUATE_METRICS

    def __init__(self, *, num_weights: int, seed: int = 0, eval_every: int = 1, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 num_classes: int | None = None, max_examples: int | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, arrayrecord_key=self.payload_key)
        self.num_weights = num_weights
        self.seed = seed
        self.eval_every = eval_every
        self.num_classes = num_classes
        self.max_examples = max_examples or MAX_EXAMPLES
        self.round_offset = 0
        self.round_records: dict[int, dict] = {}  # global round -> what happened
        self._global: np.ndarray | None = None    # the arrays sent this round
        self._sent_bytes, self._down_wire = 0, None  # their bytes per client; all messages as serialised
        self._asked = 0
        self._asked_nodes: set[int] | None = None  # None: accept any node (tests without configure_*)
        # robust-aggregation: keyword arguments for prism_flwr.robust.robust_counts, None when off
        self.robust: dict | None = None

    @property
    def max_upload_bytes(self) -> int:
        return 4 * self.num_weights

    def decode(self, array: Array) -> np.ndarray:
        raise NotImplementedError

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        """New global vector and extra record fields from the valid payloads of round ``rnd``.

        ``weights`` are the clients' claimed ``num-examples``: bounded by ``max_examples`` but chosen
        by the client, so a strategy that must resist lying clients does not weight by them.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------ configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays[self.payload_key].numpy()
        self._sent_bytes = int(self._global.nbytes)  # per client: the global vector as it goes on the wire
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._asked = len(messages)
        self._asked_nodes = {m.metadata.dst_node_id for m in messages}
        self._down_wire = _wire_bytes(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if (server_round + self.round_offset) % self.eval_every:
            return []
        messages = list(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self._asked_nodes = {m.metadata.dst_node_id for m in messages}
        return messages

    # ------------------------------------------------------------------------------ validation
    def check_metrics(self, mr: object, schema: dict[str, Metric]) -> dict[str, float | int | list]:
        """The reply's metrics as plain Python values; raises ``ReplyRejected`` outside ``schema``."""
        if not isinstance(mr, MetricRecord):
            raise ReplyRejected(f"record {METRICS_KEY!r} is a {type(mr).__name__}, expected MetricRecord")
        out: dict[str, float | int | list] = {}
        for key, value in mr.items():
            spec = schema.get(key)
            if spec is None:
                raise ReplyRejected(f"unknown metric {str(key)[:40]!r}")
            hi = self.max_examples if spec.hi is None else spec.hi
            if spec.per_class:
                if not isinstance(value, list):
                    raise ReplyRejected(f"metric {key!r} must be a list, got {type(value).__name__}")
                classes = self.num_classes
                if (classes is not None and len(value) != classes) or not 1 <= len(value) <= MAX_CLASSES:
                    raise ReplyRejected(f"metric {key!r} has {len(value)} entries, expected {classes or '1..1000'} "
                                        "(one per class)")
                values = value
            elif isinstance(value, list):
                raise ReplyRejected(f"metric {key!r} must be a scalar, got a list")
            else:
                values = [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ReplyRejected(f"metric {key!r} holds a {type(v).__name__}")
                if not math.isfinite(v):
                    raise ReplyRejected(f"metric {key!r} is not finite: {value!r}"[:200])
                if spec.integer and not float(v).is_integer():
                    raise ReplyRejected(f"metric {key!r} must be an integer, got {v!r}")
                if not spec.lo <= v <= hi:
                    raise ReplyRejected(f"metric {key!r} = {v!r} outside [{spec.lo}, {hi}]")
            out[key] = [int(v) for v in values] if spec.per_class else (int(value) if spec.integer else float(value))
        if "num-examples" not in out:
            raise ReplyRejected("metric 'num-examples' missing or not positive")
        hist = out.get("label_histogram")
        if hist is not None and sum(hist) != out["num-examples"]:
            raise ReplyRejected(f"label_histogram sums to {sum(hist)}, num-examples is {out['num-examples']}")
        return out

    def check_array(self, array: object) -> tuple[Array, int]:
        """The upload ``Array`` and its raw bytes, once its data are a .npy of the declared dtype and
        shape, within ``max_upload_bytes``."""
        if not isinstance(array, Array):
            raise ReplyRejected(f"upload is a {type(array).__name__}, expected Array")
        if array.stype != "numpy.ndarray":
            raise ReplyRejected(f"upload serialisation {str(array.stype)[:40]!r} is not numpy.ndarray")
        if len(array.data) > self.max_upload_bytes + NPY_HEADER_SLACK:
            raise ReplyRejected(f"upload is {len(array.data)} bytes, at most {self.max_upload_bytes} expected")
        values = array.numpy()  # allow_pickle=False in Flower: no object arrays
        if str(values.dtype) != array.dtype or tuple(values.shape) != tuple(array.shape):
            raise ReplyRejected(f"upload declares {array.dtype} {tuple(array.shape)} but holds "
                                f"{values.dtype} {values.shape}")
        return array, int(values.nbytes)

    def _check_node(self, msg: Message, accepted: list) -> object:
        node = msg.metadata.src_node_id
        if node in accepted:
            raise ReplyRejected("duplicate reply from this node in the same round")
        if self._asked_nodes is not None and node not in self._asked_nodes:
            raise ReplyRejected("reply from a node this round did not ask")
        return node

    def _check_reply(self, msg: Message, accepted: list) -> tuple[np.ndarray, dict, int]:
        """Decoded payload, metrics and payload bytes of one training reply; raises on anything wrong."""
        self._check_node(msg, accepted)
        content = msg.content
        extra = sorted(set(content.keys()) - {self.upload_key, METRICS_KEY})
        if extra:
            raise ReplyRejected(f"unexpected records {[str(k)[:40] for k in extra[:5]]}")
        for key in (self.upload_key, METRICS_KEY):
            if key not in content:
                raise ReplyRejected(f"reply lacks record '{key}'")
        record = content[self.upload_key]
        if not isinstance(record, ArrayRecord):
            raise ReplyRejected(f"record {self.upload_key!r} is a {type(record).__name__}, expected ArrayRecord")
        if list(record.keys()) != [self.upload_key]:
            raise ReplyRejected(f"record {self.upload_key!r} must hold exactly one array {self.upload_key!r}, "
                                f"holds {[str(k)[:40] for k in list(record.keys())[:5]]}")
        metrics = self.check_metrics(content[METRICS_KEY], self.train_metrics)
        array, nbytes = self.check_array(record[self.upload_key])
        return self.decode(array), metrics, nbytes

    # ------------------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        payloads, metrics, sizes, nodes, dropped, accepted = [], [], [], [], [], []
        for msg in list(replies):
            try:
                if msg.has_error():
                    dropped.append(f"node {_node(msg)}: {_error_text(msg)}")
                    log(WARNING, "round %d: node %s replied with an error: %s", rnd, _node(msg),
                        _error_text(msg))
                    continue
                payload, mr, size = self._check_reply(msg, nodes)
            except Exception as err:  # noqa: BLE001 - whatever one reply does, it only drops that reply
                dropped.append(f"node {_node(msg)}: {_reason(err)}")
                log(WARNING, "round %d: dropped reply from node %s: %s", rnd, _node(msg), _reason(err))
                continue
            nodes.append(msg.metadata.src_node_id)
            accepted.append(msg)
            payloads.append(payload)
            metrics.append(mr)
            sizes.append(size)

        record = {**empty_record(rnd, self._asked, int(self._asked * self._sent_bytes)),
                  "clients": len(payloads), "dropped": dropped, "uplink_bytes": int(sum(sizes)),
                  "uplink_bits_per_weight": 8 * float(np.mean(sizes)) / self.num_weights if sizes else None,
                  "downlink_bits_per_weight": 8 * self._sent_bytes / self.num_weights}
        # The same, counted as Flower serialises the messages (strategies/wire.py): per client and round.
        up_wire = _wire_bytes(accepted) if accepted else None
        if up_wire is not None:
            record["uplink_wire_bytes"] = up_wire
            record["wire_bits_per_weight_up"] = 8 * up_wire / len(accepted) / self.num_weights
        if self._down_wire is not None and self._asked:
            record["downlink_wire_bytes"] = self._down_wire
            record["wire_bits_per_weight_down"] = 8 * self._down_wire / self._asked / self.num_weights
        self.round_records[rnd] = record
        if len(payloads) < self.min_train_nodes:
            return self._skip(record, f"{len(payloads)} valid replies, min-train-nodes is {self.min_train_nodes}")

        weights = np.array([m["num-examples"] for m in metrics], dtype=np.float64)
        try:
            new, extra = self.combine(rnd, payloads, weights)
            new = self.check_aggregate(np.asarray(new))
        except Exception as err:  # noqa: BLE001 - keep the global state rather than end the run
            log(ERROR, "round %d: aggregation failed: %s", rnd, _reason(err))
            record["aggregation_error"] = _reason(err)
            return self._skip(record, "aggregation failed")
        agg = _weighted_metrics(metrics, weights)
        record["client_metrics"] = agg
        record["loss"] = agg.get("loss")
        record.update(extra)
        for key, name in PER_CLIENT.items():  # kept per node, not averaged
            if all(key in m for m in metrics):
                record[name] = {str(n): m[key] for n, m in zip(nodes, metrics)}
        out = {**agg, **{k: v for k, v in extra.items() if v is not None}, "clients": len(payloads),
               **{k: record[k] for k in ("uplink_bytes", "uplink_bits_per_weight", "downlink_bytes")}}
        return ArrayRecord({self.payload_key: Array(new)}), MetricRecord(out)

    def check_aggregate(self, new: np.ndarray) -> np.ndarray:
        """The new global vector as it will be sent; raises when it is not a finite vector like
        this round's (a subclass whose wire format differs from its working vector overrides)."""
        if new.shape != self._global.shape or new.dtype != self._global.dtype or not np.isfinite(new).all():
            raise ValueError(f"aggregate is {new.dtype} {new.shape} and must be finite "
                             f"{self._global.dtype} {self._global.shape}")
        return new

    def _skip(self, record: dict, why: str) -> tuple[None, None]:
        record["skipped"] = True
        log(WARNING, "round %d skipped: %s; global state unchanged", record["round"], why)
        return None, None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Clients' local evaluation: each reply validated alone like a training reply, then the
        mean of every metric weighted by (bounded) ``num-examples``."""
        rnd = server_round + self.round_offset
        metrics, nodes, dropped = [], [], []
        for msg in list(replies):
            try:
                if msg.has_error():
                    dropped.append(f"node {_node(msg)}: {_error_text(msg)}")
                    log(WARNING, "round %d evaluation: node %s replied with an error: %s", rnd, _node(msg),
                        _error_text(msg))
                    continue
                self._check_node(msg, nodes)
                extra = sorted(set(msg.content.keys()) - {METRICS_KEY})
                if extra:
                    raise ReplyRejected(f"unexpected records {[str(k)[:40] for k in extra[:5]]}")
                if METRICS_KEY not in msg.content:
                    raise ReplyRejected(f"reply lacks record '{METRICS_KEY}'")
                metrics.append(self.check_metrics(msg.content[METRICS_KEY], self.evaluate_metrics))
                nodes.append(msg.metadata.src_node_id)
            except Exception as err:  # noqa: BLE001
                dropped.append(f"node {_node(msg)}: {_reason(err)}")
                log(WARNING, "round %d evaluation: dropped reply from node %s: %s", rnd, _node(msg), _reason(err))
        record = self.round_records.get(rnd)
        if record is not None and dropped:
            record["client_eval_dropped"] = dropped
        if not metrics:
            return None
        agg = _weighted_metrics(metrics, np.array([m["num-examples"] for m in metrics], dtype=np.float64))
        if record is not None:
            record["client_eval"] = agg
        return MetricRecord(agg)


def _weighted_metrics(metrics: list[dict], weights: np.ndarray) -> dict[str, float]:
    """Average of every scalar client metric, weighted by num-examples (keys present in all replies)."""
    keys = {k for k in set.intersection(*(set(m.keys()) for m in metrics)) - {"num-examples"}
            if not isinstance(metrics[0][k], list)}
    return {k: float(np.dot(weights, [m[k] for m in metrics]) / weights.sum()) for k in sorted(keys)}
