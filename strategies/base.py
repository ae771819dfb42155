"""What both strategies of this app share, on top of Flower's ``FedAvg``.

- global round numbers across resumes (``round_offset``) and evaluation every k-th round;
- the broadcast: the strategy's arrays are the global *state* (float32), and each message
  carries it as the run's ``Downlink`` encodes it (``prism_flwr/federated/broadcast.py``); under
  ``delta`` per node, from the copy that node last confirmed holding (``NodeCopies``);
- per-reply validation (``strategies/replies.py``), each reply in isolation: ANY exception raised
  while one reply is looked at (Flower errors, missing or mistyped records, extra records or
  arrays, an array whose bytes do not match its declared dtype and shape or exceed the size bound,
  anything the subclass's ``decode`` raises, metrics outside the schema, a second reply from one
  node, a reply from a node not asked) drops that reply with the reason in the round record and
  the log; it never ends the ServerApp;
- a round with fewer than ``min_train_nodes`` valid replies is skipped (``None`` keeps the global
  arrays as they were); so is a round whose aggregation raises ``AggregationError`` (caused by its
  input, e.g. a non-finite aggregate); the reason goes into the record (``skip_reason``). Any
  other exception in aggregation is a bug and ends the run;
- one record per round for ``history.json`` (``round_records``): clients, drops, wire bytes; client
  metrics averaged by (bounded) ``num-examples`` under ``client_metrics`` (and ``loss``), per-client
  values kept per node, so no client-chosen name can overwrite a field of the record;
- the hooks of a round wrapped in exchanges of its own, e.g. a secure sum (``phases.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import ERROR, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from prism_flwr.config import RunConfig
from prism_flwr.federated.aggregation import AggregationError
from prism_flwr.federated.broadcast import DIGEST_CHARS, DOWNLINK_KEY, DOWNLINKS, Downlink, NodeCopies, digest
from prism_flwr.federated.methods import Method
from prism_flwr.federated.records import METRICS_KEY

from .phases import PhasedRound, with_records
from .phases import wire_bytes as _wire_bytes
from .replies import (
    EVALUATE_METRICS,
    MAX_EXAMPLES,
    TRAIN_METRICS,
    Metric,
    ReplyRejected,
    Screened,
    check_array,
    check_metrics,
    check_records,
    reason,
    screen,
    upload_array,
)

PER_CLIENT = {"dp_epsilon": "dp_epsilon_per_client", "label_histogram": "label_histograms"}


def held_digest(content: RecordDict) -> str:
    """The digest a ``delta`` reply says its node now holds."""
    record = content[DOWNLINK_KEY]
    if not isinstance(record, ConfigRecord) or list(record.keys()) != ["held"]:
        raise ReplyRejected(f"record {DOWNLINK_KEY!r} must be a ConfigRecord holding only 'held'")
    held = record["held"]
    if not isinstance(held, str) or len(held) != DIGEST_CHARS:
        raise ReplyRejected(f"record {DOWNLINK_KEY!r}: 'held' is not a digest")
    return held


class RecordingFedAvg(PhasedRound, FedAvg):
    """FedAvg with validated replies, skipped rounds and a history record per round.

    Subclasses set ``payload_key`` (the global vector sent down) and ``upload_key`` (what clients
    send back), implement ``decode(array)`` (upload -> what ``combine`` needs; raise when bad) and
    ``combine``. ``max_upload_bytes`` bounds one upload's raw bytes (default: a float32 vector).
    ``downlink`` encodes the broadcast (default float32); ``robust`` holds the keyword arguments
    of ``prism_flwr.federated.robust.robust_counts`` (None: off); ``round_offset`` is the global
    round a resumed run starts after.
    """

    method: Method  # what it aggregates (prism_flwr.federated.methods)
    payload_key: str
    upload_key: str
    extra_records: tuple[str, ...] = ()  # records a training reply may carry besides the upload and metrics
    train_metrics = TRAIN_METRICS
    evaluate_metrics = EVALUATE_METRICS

    def __init__(
        self,
        *,
        num_weights: int,
        seed: int = 0,
        eval_every: int = 1,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        num_classes: int | None = None,
        max_examples: int | None = None,
        downlink: Downlink | None = None,
        robust: dict | None = None,
        round_offset: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_train_nodes,
            min_available_nodes=min_available_nodes,
            arrayrecord_key=self.payload_key,
        )
        self.num_weights = num_weights
        self.seed = seed
        self.eval_every = eval_every
        self.num_classes = num_classes
        self.max_examples = max_examples or MAX_EXAMPLES
        self.downlink = downlink or DOWNLINKS["float32"]
        self.robust = robust
        self.round_offset = round_offset
        self.round_records: dict[int, dict] = {}  # global round -> what happened
        self._global: np.ndarray | None = None  # the global state (float32) sent this round
        self._sent: list[int] = []  # payload bytes of each training message this round
        self._down_wire = None  # all training messages as serialised
        self._asked_nodes: set[int] | None = None  # None: accept any node (tests without configure_*)
        self._copies = NodeCopies() if self.downlink.uses_base else None  # what each node holds (delta)
        self.round_nodes: list = []  # senders of the payloads handed to ``combine``, in order

    @classmethod
    def from_config(cls, cfg: RunConfig, *, layout: bytes, state: dict | None, **kwargs) -> RecordingFedAvg:
        """The strategy for run config ``cfg``: ``kwargs`` (the shared keywords) plus whatever of
        ``cfg``, the model ``layout`` and the checkpointed ``state`` this class needs."""
        return cls(**kwargs)

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

    def empty_record(self, rnd: int, asked: int = 0, downlink_bytes: int = 0) -> dict:
        """One ``history.json`` record before any reply is counted (round 0 stays like this)."""
        return {
            "round": rnd,
            "clients": 0,
            "asked": asked,
            "dropped": [],
            "uplink_bytes": 0,
            "uplink_bits_per_weight": None,
            "downlink_bytes": downlink_bytes,
            "loss": None,
            "skipped": False,
        }

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the strategy beyond the global state (here: nothing)."""
        return {}

    # ------------------------------------------------------------------------------ configure
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays[self.payload_key].numpy()
        rnd = server_round + self.round_offset
        sampled = list(super().configure_train(rnd, arrays, config, grid))
        extras = self.start_phases(rnd, grid, [m.metadata.dst_node_id for m in sampled])
        messages = self._broadcast([m for m in sampled if m.metadata.dst_node_id in extras])
        messages = with_records(messages, extras)
        self._sent = [int(m.content[self.payload_key][self.payload_key].numpy().nbytes) for m in messages]
        self._asked_nodes = {m.metadata.dst_node_id for m in messages}
        self._down_wire = _wire_bytes(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if (server_round + self.round_offset) % self.eval_every:
            self._asked_nodes = set()  # no evaluation this round: no reply is expected
            return []
        rnd = server_round + self.round_offset
        messages = self._broadcast(super().configure_evaluate(rnd, arrays, config, grid))
        self._asked_nodes = {m.metadata.dst_node_id for m in messages}
        return messages

    def _broadcast(self, messages: Iterable[Message]) -> list[Message]:
        """FedAvg's messages (the float32 state for every node) with the state as ``downlink``
        encodes it: one payload for all, or under ``delta`` one per base a node holds."""
        messages = list(messages)
        if not messages:
            return messages
        state = messages[0].content[self.payload_key][self.payload_key].numpy()
        config = messages[0].content[self.configrecord_key]
        contents: dict[str, RecordDict] = {}  # base digest -> content
        name = digest(state) if self._copies is not None else ""
        bases = {
            m.metadata.dst_node_id: self._copies.base_for(m.metadata.dst_node_id)
            if self._copies is not None
            else ("", None)
            for m in messages
        }  # all looked up before any state is added
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            base_name, base = bases[node]
            if base_name not in contents:
                wire = self.downlink.encode(state, base)
                content = RecordDict(
                    {
                        self.payload_key: ArrayRecord({self.payload_key: Array(wire)}),
                        self.configrecord_key: config,
                    }
                )
                if self._copies is not None:
                    content[DOWNLINK_KEY] = ConfigRecord(
                        {"digest": name, "base": base_name if self.downlink.is_delta(wire) else ""}
                    )
                contents[base_name] = content
            if self._copies is not None:
                self._copies.sending(node, state, name)
            out.append(
                Message(content=contents[base_name], dst_node_id=node, message_type=msg.metadata.message_type)
            )
        return out

    def _settle_copies(self, screened: Screened) -> None:
        """Under ``delta``: a node holds the state it was sent once its valid reply says so; any
        other node asked this round gets the full state next."""
        if self._copies is None:
            return
        held = {}
        for node, msg, _ in screened.accepted:
            held[node] = held_digest(msg.content)
        for node in self._asked_nodes or set(held):
            if node in held:
                self._copies.holds(node, held[node])
            else:
                self._copies.forget(node)

    # ------------------------------------------------------------------------------ validation
    def check_metrics(self, mr: object, schema: dict[str, Metric]) -> dict[str, float | int | list]:
        """The reply's metrics as plain Python values; raises ``ReplyRejected`` outside ``schema``."""
        return check_metrics(mr, schema, self.max_examples, self.num_classes)

    def check_array(self, array: object) -> tuple[Array, int]:
        return check_array(array, self.max_upload_bytes)

    def _check_downlink(self, msg: Message) -> list[str]:
        """Under ``delta`` a reply names the state its node holds: the one it was sent."""
        if self._copies is None:
            return []
        if DOWNLINK_KEY in msg.content:
            held, sent = held_digest(msg.content), self._copies.sent_to(msg.metadata.src_node_id)
            if held != sent:
                raise ReplyRejected(
                    f"reply says its node holds global {held[:12]}, it was sent {str(sent)[:12]}"
                )
        return [DOWNLINK_KEY]

    def _check_train(self, msg: Message) -> tuple[np.ndarray, dict, int]:
        """Decoded payload, metrics and payload bytes of one training reply; raises on anything wrong."""
        content = msg.content
        check_records(content, [self.upload_key, METRICS_KEY, *self._check_downlink(msg)], self.extra_records)
        array = upload_array(content, self.upload_key)
        metrics = self.check_metrics(content[METRICS_KEY], self.train_metrics)
        array, nbytes = self.check_array(array)
        return self.read_reply(msg, array), metrics, nbytes

    def _check_evaluate(self, msg: Message) -> dict:
        check_records(msg.content, [METRICS_KEY, *self._check_downlink(msg)])
        return self.check_metrics(msg.content[METRICS_KEY], self.evaluate_metrics)

    # ------------------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        try:
            return self._aggregate_train(rnd, list(replies))
        finally:
            if (record := self.round_records.get(rnd)) is not None:
                self.close_record(record)
            self._grid, self._sampled = None, 0  # nothing of this round's transport is kept

    def _aggregate_train(
        self, rnd: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:  # every reply crossed the wire, the dropped ones too
        screened = screen(replies, self._check_train, self._asked_nodes, f"round {rnd}")
        self._settle_copies(screened)
        nodes = [node for node, _, _ in screened.accepted]
        payloads, metrics, sizes = (
            (list(x) for x in zip(*(r for _, _, r in screened.accepted)))
            if screened.accepted
            else ([], [], [])
        )
        asked = len(self._sent)
        record = {
            **self.empty_record(rnd, max(self._sampled, asked), int(sum(self._sent))),
            "clients": len(payloads),
            "dropped": screened.dropped,
            "uplink_bytes": int(sum(sizes)),
            "uplink_bits_per_weight": 8 * float(np.mean(sizes)) / self.num_weights if sizes else None,
            "downlink_bits_per_weight": 8 * float(np.mean(self._sent)) / self.num_weights if asked else None,
        }
        # The same, counted as Flower serialises the messages (strategies/wire.py): per client and round.
        # Every reply crossed the wire, the dropped ones too.
        up_wire = _wire_bytes(replies) if replies else None
        if up_wire is not None:
            record["uplink_wire_bytes"] = up_wire
            record["wire_bits_per_weight_up"] = 8 * up_wire / len(replies) / self.num_weights
        if self._down_wire is not None and asked:
            record["downlink_wire_bytes"] = self._down_wire
            record["wire_bits_per_weight_down"] = 8 * self._down_wire / asked / self.num_weights
        self.round_records[rnd] = record
        if self._setup_skip is not None:
            return self._skip(record, self._setup_skip)
        if len(payloads) < self.min_train_nodes:
            said = " | ".join(dict.fromkeys(d.split(": ", 1)[-1] for d in screened.dropped))  # once each
            why = f"{len(payloads)} valid replies, min-train-nodes is {self.min_train_nodes}"
            return self._skip(record, f"{why}; nodes said: {said}" if said else why)

        weights = np.array([m["num-examples"] for m in metrics], dtype=np.float64)
        self.round_nodes = nodes  # the senders of ``payloads``, in order
        try:
            new, extra = self.combine(rnd, self.finish_train(rnd, payloads), weights)
            new = self.check_aggregate(np.asarray(new))
        except AggregationError as err:  # caused by this round's input: keep the global state
            log(ERROR, "round %d: aggregation failed: %s", rnd, reason(err))
            record["aggregation_error"] = reason(err)
            return self._skip(record, f"aggregation failed: {reason(err)}")
        self.round_applied()
        agg = _weighted_metrics(metrics, weights)
        record["client_metrics"] = agg
        record["loss"] = agg.get("loss")
        record.update(extra)
        for key, name in PER_CLIENT.items():  # kept per node, not averaged
            if all(key in m for m in metrics):
                record[name] = {str(n): m[key] for n, m in zip(nodes, metrics)}
        out = {
            **agg,
            **{k: v for k, v in extra.items() if v is not None},
            "clients": len(payloads),
            **{k: record[k] for k in ("uplink_bytes", "uplink_bits_per_weight", "downlink_bytes")},
        }
        return ArrayRecord({self.payload_key: Array(new)}), MetricRecord(out)

    def check_aggregate(self, new: np.ndarray) -> np.ndarray:
        """The new global state; raises when it is not a finite vector like this round's."""
        if new.shape != self._global.shape or new.dtype != self._global.dtype:
            raise AggregationError(
                f"aggregate is {new.dtype} {new.shape}, expected {self._global.dtype} {self._global.shape}"
            )
        if not np.isfinite(new).all():
            raise AggregationError(f"aggregate holds {int((~np.isfinite(new)).sum())} non-finite values")
        return new

    def round_applied(self) -> None:
        """Called once this round's aggregate is accepted (a subclass keeps state it proposed)."""

    def _skip(self, record: dict, why: str) -> tuple[None, None]:
        record["skipped"] = True
        record["skip_reason"] = why
        log(WARNING, "round %d skipped: %s; global state unchanged", record["round"], why)
        return None, None

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Clients' local evaluation: each reply validated alone like a training reply, then the
        mean of every metric weighted by (bounded) ``num-examples``."""
        rnd = server_round + self.round_offset
        screened = screen(replies, self._check_evaluate, self._asked_nodes, f"round {rnd} evaluation")
        self._settle_copies(screened)
        metrics = [m for _, _, m in screened.accepted]
        record = self.round_records.get(rnd)
        if record is not None and screened.dropped:
            record["client_eval_dropped"] = screened.dropped
        if not metrics:
            return None
        agg = _weighted_metrics(metrics, np.array([m["num-examples"] for m in metrics], dtype=np.float64))
        if record is not None:
            record["client_eval"] = agg
        return MetricRecord(agg)


def _weighted_metrics(metrics: list[dict], weights: np.ndarray) -> dict[str, float]:
    """Average of every scalar client metric, weighted by num-examples (keys present in all replies)."""
    keys = {
        k
        for k in set.intersection(*(set(m.keys()) for m in metrics)) - {"num-examples"}
        if not isinstance(metrics[0][k], list)
    }
    return {k: float(np.dot(weights, [m[k] for m in metrics]) / weights.sum()) for k in sorted(keys)}
