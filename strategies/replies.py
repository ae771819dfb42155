"""Reply checks, each reply in isolation, and the one loop that drops the bad ones.

``screen`` runs over a round's replies (training or evaluation alike): an error reply, a second
reply from one node, a reply from a node not asked, or ANY exception raised by the per-kind
``check`` drops that reply with the reason; it never ends the ServerApp. The checks below know
nothing of a strategy's state: the metric schema (``TRAIN_METRICS``, ``EVALUATE_METRICS``: only
known keys, each a finite scalar within its bounds, or for ``label_histogram`` a list of
``num_classes`` non-negative integers summing to ``num-examples``; ``num-examples`` an integer in
``[1, max_examples]``), the records a reply holds, and an upload ``Array`` whose bytes must match
its declared dtype and shape within a size bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode

from prism_flwr.federated.records import METRICS_KEY

MAX_EXAMPLES = 2**31 - 1  # num-examples bound when the strategy is not told the dataset's size
MAX_CLASSES = 1000  # label_histogram length bound when the strategy is not told num_classes
NPY_HEADER_SLACK = 4096  # bytes of .npy header an Array may carry on top of its raw data


class ReplyRejected(ValueError):
    """One reply breaks the protocol; the message says how."""


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


def node_of(msg: object) -> object:
    try:
        return msg.metadata.src_node_id  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a reply without metadata is still only one bad reply
        return "?"


def clip(text: str, limit: int = 600) -> str:
    """A client cannot flood the history with its error text; the end (where a traceback names
    the exception) is kept."""
    return text if len(text) <= limit else f"{text[:150]} [...] {text[-(limit - 157) :]}"


def reason(err: BaseException) -> str:
    return clip(str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}")


@dataclass
class Screened:
    """A round's replies after ``screen``: what each valid one's ``check`` returned, by node."""

    accepted: list[tuple[int, Message, object]] = field(default_factory=list)  # (node, reply, result)
    dropped: list[str] = field(default_factory=list)  # "node N: reason"
    dropped_nodes: list[object] = field(default_factory=list)


# Flower's error codes (flwr.common.constant.ErrorCode) by number, for the log and history.json.
_ERROR_NAMES = {
    code: name for name, code in vars(ErrorCode).items() if name.isupper() and isinstance(code, int)
}


def error_text(msg: Message) -> str:
    """An error reply as text: Flower's code name and the reason. CLIENT_APP_CRASHED is what a
    node sends when its ClientApp process ended without replying (killed, e.g. out of memory)."""
    try:
        code = int(msg.error.code)
        return f"{_ERROR_NAMES.get(code, 'error')} ({code}): {clip(str(msg.error.reason))}"
    except Exception:  # noqa: BLE001 - a malformed error is still only one dropped reply
        return "error reply (unreadable)"


def screen(
    replies: Iterable[Message], check: Callable[[Message], object], asked: set[int] | None, what: str
) -> Screened:
    """Drop every reply that is an error, a duplicate, unasked (``asked=None``: any node may
    reply) or that ``check`` raises on; ``what`` names the round in the log."""
    out = Screened()
    seen: set[int] = set()
    for msg in list(replies):
        try:
            if msg.has_error():
                out.dropped.append(f"node {node_of(msg)}: {error_text(msg)}")
                out.dropped_nodes.append(node_of(msg))
                log(WARNING, "%s: node %s replied with an error: %s", what, node_of(msg), error_text(msg))
                continue
            node = msg.metadata.src_node_id
            if node in seen:
                raise ReplyRejected("duplicate reply from this node in the same round")
            if asked is not None and node not in asked:
                raise ReplyRejected("reply from a node this round did not ask")
            result = check(msg)
        except Exception as err:  # noqa: BLE001 - whatever one reply does, it only drops that reply
            out.dropped.append(f"node {node_of(msg)}: {reason(err)}")
            out.dropped_nodes.append(node_of(msg))
            log(WARNING, "%s: dropped reply from node %s: %s", what, node_of(msg), reason(err))
            continue
        seen.add(node)
        out.accepted.append((node, msg, result))
    return out


def check_records(content: RecordDict, required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """The reply holds every ``required`` record and nothing beyond ``optional``."""
    required = list(required)
    extra = sorted(set(content.keys()) - set(required) - set(optional))
    if extra:
        raise ReplyRejected(f"unexpected records {[str(k)[:40] for k in extra[:5]]}")
    for key in required:
        if key not in content:
            raise ReplyRejected(f"reply lacks record '{key}'")


def upload_array(content: RecordDict, key: str) -> object:
    """The single array ``key`` of the ArrayRecord ``key``."""
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ReplyRejected(f"record {key!r} is a {type(record).__name__}, expected ArrayRecord")
    if list(record.keys()) != [key]:
        raise ReplyRejected(
            f"record {key!r} must hold exactly one array {key!r}, "
            f"holds {[str(k)[:40] for k in list(record.keys())[:5]]}"
        )
    return record[key]


def check_metrics(
    mr: object, schema: dict[str, Metric], max_examples: int, num_classes: int | None
) -> dict[str, float | int | list]:
    """The reply's metrics as plain Python values; raises ``ReplyRejected`` outside ``schema``."""
    if not isinstance(mr, MetricRecord):
        raise ReplyRejected(f"record {METRICS_KEY!r} is a {type(mr).__name__}, expected MetricRecord")
    out: dict[str, float | int | list] = {}
    for key, value in mr.items():
        spec = schema.get(key)
        if spec is None:
            raise ReplyRejected(f"unknown metric {str(key)[:40]!r}")
        hi = max_examples if spec.hi is None else spec.hi
        if spec.per_class:
            if not isinstance(value, list):
                raise ReplyRejected(f"metric {key!r} must be a list, got {type(value).__name__}")
            if (num_classes is not None and len(value) != num_classes) or not 1 <= len(value) <= MAX_CLASSES:
                raise ReplyRejected(
                    f"metric {key!r} has {len(value)} entries, expected "
                    f"{num_classes or '1..1000'} (one per class)"
                )
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
        if spec.per_class:
            out[key] = [int(v) for v in values]
        else:
            out[key] = int(value) if spec.integer else float(value)
    if "num-examples" not in out:
        raise ReplyRejected("metric 'num-examples' missing or not positive")
    hist = out.get("label_histogram")
    if hist is not None and sum(hist) != out["num-examples"]:
        raise ReplyRejected(f"label_histogram sums to {sum(hist)}, num-examples is {out['num-examples']}")
    return out


def check_array(array: object, max_bytes: int) -> tuple[Array, int]:
    """The upload ``Array`` and its raw bytes, once its data are a .npy of the declared dtype and
    shape, within ``max_bytes``."""
    if not isinstance(array, Array):
        raise ReplyRejected(f"upload is a {type(array).__name__}, expected Array")
    if array.stype != "numpy.ndarray":
        raise ReplyRejected(f"upload serialisation {str(array.stype)[:40]!r} is not numpy.ndarray")
    if len(array.data) > max_bytes + NPY_HEADER_SLACK:
        raise ReplyRejected(f"upload is {len(array.data)} bytes, at most {max_bytes} expected")
    values = array.numpy()  # allow_pickle=False in Flower: no object arrays
    if str(values.dtype) != array.dtype or tuple(values.shape) != tuple(array.shape):
        raise ReplyRejected(
            f"upload declares {array.dtype} {tuple(array.shape)} but holds {values.dtype} {values.shape}"
        )
    return array, int(values.nbytes)
