"""Hostile and broken inputs, by class, and what the code does with each.

Used two ways:

- ``tests/test_security.py`` draws from these classes with hypothesis and asserts that nothing
  crashes and nothing invalid is used;
- ``python -m tools.security_probe [--per-class 40]`` tries every class ``--per-class`` times and
  writes ``results/security/probe.{json,md}``: per class, inputs tried, handled (refused with a
  reason, nothing invalid used), crashed (an exception escaped) and silently accepted (an invalid
  input was used). The table in docs/security.md comes from it.

Every builder takes a ``numpy.random.Generator`` and returns the hostile input; outcomes are
judged by ``probe_*`` functions that return "handled", "crashed" or "accepted".
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from prism_flwr.federated.aggregation import aggregate, count_ones
from prism_flwr.federated.codec import FORMAT_VERSION, HEADER_BYTES, encode_mask
from prism_flwr.federated.records import MASK_KEY, METRICS_KEY, SCORES_KEY, WEIGHTS_KEY
from tests.support.messages import reply_message

REPO = Path(__file__).resolve().parents[1]

N = 53
LAYOUT = b"L" * 8
SCORES = np.linspace(-2, 2, N).astype(np.float32)
CLASSES_K = 10
SEED = 5


# ------------------------------------------------------------------------------------- replies
class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def set_task_identity() -> tuple:
    """Messages need the identity a running ServerApp has; give them one outside Flower."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return saved


def restore_task_identity(saved: tuple) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def message(
    node: int, content: RecordDict | None = None, error: str | None = None, kind: str = "train"
) -> Message:
    return reply_message(node, content, error=error, message_type=kind)


def valid_metrics(rng: np.random.Generator) -> dict:
    n = int(rng.integers(1, 5000))
    hist = rng.multinomial(n, np.full(CLASSES_K, 1 / CLASSES_K)).tolist()
    m = {
        "num-examples": n,
        "loss": float(rng.normal()),
        "theta_density": float(rng.random()),
        "theta_entropy_bits": float(rng.random()),
        "mask_density": float(rng.random()),
        "label_histogram": hist,
    }
    if rng.random() < 0.3:  # the DP shape: only the mask and the spend
        m = {"num-examples": 1, "dp_epsilon": float(rng.random() * 10)}
    return m


def random_mask(rng: np.random.Generator) -> np.ndarray:
    return rng.random(N) < rng.uniform(0.05, 0.95)


def mask_content(blob: bytes | np.ndarray, metrics: dict) -> RecordDict:
    arr = np.frombuffer(blob, np.uint8).copy() if isinstance(blob, bytes) else blob
    return RecordDict({MASK_KEY: ArrayRecord({MASK_KEY: Array(arr)}), METRICS_KEY: MetricRecord(metrics)})


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _recrc(blob: bytearray) -> bytes:
    """Recompute the codec's payload checksum so only the field under test is wrong."""
    struct.pack_into("<I", blob, HEADER_BYTES - 4, zlib.crc32(bytes(blob[HEADER_BYTES:])))
    return bytes(blob)


def _codec_damage(rng: np.random.Generator, blob: bytes) -> bytes:
    b = bytearray(blob)
    how = rng.integers(0, 9)
    if how == 0:  # one flipped bit anywhere
        i = int(rng.integers(0, len(b) * 8))
        b[i // 8] ^= 1 << (i % 8)
        return bytes(b)
    if how == 1:
        return bytes(b[: int(rng.integers(0, len(b)))])  # truncated
    if how == 2:
        return bytes(b) + rng.bytes(int(rng.integers(1, 20)))  # extended
    if how == 3:
        b[16:24] = rng.bytes(8)  # other model's layout
        return bytes(b)
    if how == 4:
        struct.pack_into("<Q", b, 8, N + int(rng.integers(1, 100)))  # other weight count
        return bytes(b)
    if how == 5:
        b[-1] |= 0x80  # padding bits set (53 = 6*8 + 5)
        return _recrc(b)
    if how == 6:
        b[0:4] = rng.bytes(4)  # magic
        return bytes(b)
    if how == 7:
        b[4] = int(rng.integers(FORMAT_VERSION + 1, 256))  # a version this build does not read
        return bytes(b)
    return rng.bytes(len(b))  # noise of the right length


def _bad_metrics(rng: np.random.Generator) -> dict:
    m = valid_metrics(rng)
    if "label_histogram" not in m:
        m = {"num-examples": 10, "loss": 0.1, "label_histogram": [1] * 10}
    how = rng.integers(0, 12)
    if how == 0:
        m[str(rng.choice(["clients", "round", "skipped", "dropped", "eval", "x" * 300, "uplink_bytes"]))] = (
            1.0
        )
    elif how == 1:
        m[str(rng.choice(["loss", "theta_density", "num-examples"]))] = float(
            rng.choice([np.nan, np.inf, -np.inf])
        )
    elif how == 2:
        m["loss"] = [0.1, 0.2]
    elif how == 3:
        m["label_histogram"] = 7
    elif how == 4:
        m["num-examples"] = int(rng.choice([0, -5, 10**12]))
    elif how == 5:
        m["num-examples"] = 2.5
    elif how == 6:
        del m["num-examples"]
    elif how == 7:
        m["label_histogram"] = m["label_histogram"] + [0]  # one class too many
    elif how == 8:
        h = list(m["label_histogram"])
        h[0] = -h[0] - 1
        m["label_histogram"] = h
    elif how == 9:
        h = list(m["label_histogram"])
        h[int(rng.integers(0, CLASSES_K))] += int(rng.integers(1, 10))
        m["label_histogram"] = h  # sum no longer num-examples
    elif how == 10:
        m[str(rng.choice(["theta_density", "mask_density", "theta_entropy_bits"]))] = float(
            rng.choice([1.5, -0.1])
        )
    else:
        m["dp_epsilon"] = -1.0
    return m


def _good(rng, node):
    mask = random_mask(rng)
    return message(node, mask_content(encode_mask(mask, LAYOUT), valid_metrics(rng))), mask


def _with(rng, node, **change):
    """A valid reply with one record or array replaced."""
    msg, _ = _good(rng, node)
    for key, value in change.items():
        if value is None:
            del msg.content[key]
        else:
            msg.content[key] = value
    return msg


def _blob(rng):
    return encode_mask(random_mask(rng), LAYOUT)


def _upload(rng, node, *arrays: tuple[str, Array]) -> Message:
    """A valid reply whose mask record holds these (name, Array) pairs instead."""
    return _with(rng, node, **{MASK_KEY: ArrayRecord(dict(arrays))})


def _packed(rng) -> np.ndarray:
    return np.frombuffer(_blob(rng), np.uint8).copy()


def _extra_or_misnamed(rng, node):
    if rng.random() < 0.5:
        return _upload(rng, node, (MASK_KEY, Array(_packed(rng))), ("x", Array(np.zeros(3, np.uint8))))
    return _upload(rng, node, ("other", Array(_packed(rng))))


def _wrong_dtype(rng, node):
    dtype = str(rng.choice(["float32", "int64", "int8", "bool", "uint16"]))
    return _upload(rng, node, (MASK_KEY, Array(_packed(rng).astype(dtype))))


def _wrong_shape(rng, node):
    arr = _packed(rng).reshape(1, -1) if rng.random() < 0.5 else np.array(7, np.uint8)
    return _upload(rng, node, (MASK_KEY, Array(arr)))


def _lying_metadata(rng, node):
    packed = _packed(rng)
    actual = packed.astype(np.float32) if rng.random() < 0.5 else packed[:-3].copy()
    return _upload(
        rng,
        node,
        (MASK_KEY, Array(dtype="uint8", shape=(len(packed),), stype="numpy.ndarray", data=_npy(actual))),
    )


def _not_npy(rng, node):
    stype = str(rng.choice(["numpy.ndarray", "torch.Tensor"]))
    return _upload(rng, node, (MASK_KEY, Array(dtype="uint8", shape=(40,), stype=stype, data=rng.bytes(40))))


def _wrong_record_type(rng, node):
    if rng.random() < 0.5:
        return _with(rng, node, **{MASK_KEY: MetricRecord({"a": 1.0})})
    return _with(rng, node, **{METRICS_KEY: ConfigRecord({"num-examples": 10})})


# Each builder: (rng, node) -> Message that must be dropped.
REPLY_CLASSES: dict[str, Callable[[np.random.Generator, int], Message]] = {
    "Flower error reply": lambda rng, node: message(
        node, error="ClientApp raised " + "x" * int(rng.integers(0, 2000))
    ),
    "record missing (mask or metrics)": lambda rng, node: _with(
        rng, node, **{str(rng.choice([MASK_KEY, METRICS_KEY])): None}
    ),
    "extra record": lambda rng, node: _with(rng, node, extra=ConfigRecord({"a": 1})),
    "record of the wrong type": _wrong_record_type,
    "extra or misnamed array": _extra_or_misnamed,
    "wrong dtype": _wrong_dtype,
    "wrong shape": _wrong_shape,
    "declared dtype/shape differ from data": _lying_metadata,
    "array bytes not .npy / foreign stype": _not_npy,
    "oversized upload": lambda rng, node: _upload(
        rng, node, (MASK_KEY, Array(np.zeros(4 * N + 5000, np.uint8)))
    ),
    "corrupt codec bytes": lambda rng, node: message(
        node, mask_content(_codec_damage(rng, _blob(rng)), valid_metrics(rng))
    ),
    "metrics outside the schema": lambda rng, node: message(
        node, mask_content(_blob(rng), _bad_metrics(rng))
    ),
    "second reply from a node": lambda rng, node: _good(rng, 1)[0],
    "reply from a node not asked": lambda rng, node: _good(rng, 10_000 + node)[0],
}


def _build(cls, **kwargs):
    """``cls(**kwargs)``; without the schema's keywords for strategies from before they existed
    (``--strategies-from``)."""
    try:
        return cls(**kwargs, num_classes=CLASSES_K, max_examples=60_000)
    except TypeError:
        return cls(**kwargs)


def make_mada(nodes, min_train_nodes: int = 1):
    from strategies.mada import MADA

    s = _build(
        MADA,
        num_weights=N,
        layout=LAYOUT,
        rule="mada",
        seed=SEED,
        min_train_nodes=min_train_nodes,
        min_available_nodes=len(nodes),
    )
    s.configure_train(1, ArrayRecord({SCORES_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid(nodes))
    return s


def expected_scores(masks: list[np.ndarray], rnd: int = 1) -> np.ndarray:
    counts, k = count_ones((np.packbits(m, bitorder="little") for m in masks), N)
    return aggregate(SCORES, counts, k, method="mada", rng=np.random.default_rng([SEED, rnd])).scores


def build_round(rng: np.random.Generator, kinds: list[str]) -> tuple[list[Message], list[np.ndarray], int]:
    """Node 1 valid, then one reply per kind ("valid" or a class of REPLY_CLASSES): (replies,
    the valid masks in order, number of replies that must be dropped)."""
    replies, valid = [], []
    msg, mask = _good(rng, 1)
    replies.append(msg)
    valid.append(mask)
    bad = 0
    for node, kind in enumerate(kinds, start=2):
        if kind == "valid":
            msg, mask = _good(rng, node)
            valid.append(mask)
        else:
            msg = REPLY_CLASSES[kind](rng, node)
            bad += 1
        replies.append(msg)
    return replies, valid, bad


def judge_round(strategy, replies, valid, bad) -> str:
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    except Exception:  # noqa: BLE001 - what the probe measures
        return "crashed"
    rec = strategy.round_records[1]
    if rec["clients"] != len(valid) or len(rec["dropped"]) != bad or arrays is None:
        return "accepted"
    if not np.array_equal(arrays[SCORES_KEY].numpy(), expected_scores(valid)):
        return "accepted"
    return "handled"


def probe_reply(rng: np.random.Generator, kind: str) -> str:
    replies, valid, bad = build_round(rng, ["valid", kind])
    return judge_round(make_mada(range(1, len(replies) + 1)), replies, valid, bad)


class HostileDecode:
    """Exceptions a buggy or hostile ``decode`` may raise, beyond ValueError."""

    ERRORS = (
        RuntimeError,
        ZeroDivisionError,
        KeyError,
        IndexError,
        TypeError,
        AssertionError,
        MemoryError,
        RecursionError,
        OverflowError,
        struct.error,
        UnicodeDecodeError,
        NotImplementedError,
        AttributeError,
    )

    @staticmethod
    def error(rng: np.random.Generator) -> Exception:
        cls = HostileDecode.ERRORS[int(rng.integers(0, len(HostileDecode.ERRORS)))]
        if cls is UnicodeDecodeError:
            return UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")
        return cls("decode failed")


def probe_decode_raises(rng: np.random.Generator) -> str:
    s = make_mada(range(1, 4))
    err = HostileDecode.error(rng)
    original = s.decode

    def decode(array):
        if array.numpy()[0] == 0xFF:  # the marked reply
            raise err
        return original(array)

    s.decode = decode
    replies, valid, _ = build_round(rng, ["valid"])
    blob = bytearray(encode_mask(random_mask(rng), LAYOUT))
    blob[0] = 0xFF
    replies.append(message(3, mask_content(bytes(blob), valid_metrics(rng))))
    return judge_round(s, replies, valid, 1)


def probe_evaluate(rng: np.random.Generator) -> str:
    """One hostile evaluation reply among two valid ones."""
    from strategies.mada import MADA

    s = _build(MADA, num_weights=N, layout=LAYOUT, seed=SEED, min_train_nodes=1, min_available_nodes=3)
    good = [
        message(
            n,
            RecordDict({METRICS_KEY: MetricRecord({"num-examples": 100, "local_mmd_pixels": 0.1 * n})}),
            kind="evaluate",
        )
        for n in (1, 2)
    ]
    how = int(rng.integers(0, 6))
    if how == 0:
        bad = message(3, error="boom", kind="evaluate")
    elif how == 1:
        bad = message(
            3,
            RecordDict({METRICS_KEY: MetricRecord({"num-examples": 100, "local_mmd_pixels": float("nan")})}),
            kind="evaluate",
        )
    elif how == 2:
        bad = message(3, RecordDict({METRICS_KEY: MetricRecord({"num-examples": 100})}), kind="evaluate")
        bad.content["x"] = ArrayRecord({"x": Array(np.zeros(3))})
    elif how == 3:
        bad = message(
            3,
            RecordDict({METRICS_KEY: MetricRecord({"num-examples": 10**12, "local_mmd_pixels": 0.0})}),
            kind="evaluate",
        )
    elif how == 4:
        bad = message(3, RecordDict({METRICS_KEY: ConfigRecord({"num-examples": 5})}), kind="evaluate")
    else:
        bad = message(
            3, RecordDict({METRICS_KEY: MetricRecord({"num-examples": 5, "unknown": 1.0})}), kind="evaluate"
        )
    try:
        out = s.aggregate_evaluate(1, [*good, bad])
    except Exception:  # noqa: BLE001
        return "crashed"
    return "handled" if out is not None and abs(out["local_mmd_pixels"] - 0.15) < 1e-9 else "accepted"


def probe_dense(rng: np.random.Generator) -> str:
    """Dense baseline: one hostile weights upload among two honest ones."""
    from strategies.dense import DenseFedAvg

    s = _build(DenseFedAvg, num_weights=N, seed=SEED, min_train_nodes=1, min_available_nodes=3)
    s.configure_train(1, ArrayRecord({WEIGHTS_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid([1, 2, 3]))

    def reply(node, w):
        return message(
            node,
            RecordDict(
                {
                    WEIGHTS_KEY: ArrayRecord({WEIGHTS_KEY: Array(w)}),
                    METRICS_KEY: MetricRecord({"num-examples": 100, "loss": 0.1}),
                }
            ),
        )

    honest = [SCORES + np.float32(0.01) * rng.standard_normal(N).astype(np.float32) for _ in range(2)]
    how = int(rng.integers(0, 5))
    if how == 0:
        bad = np.full(N, np.nan, np.float32)
    elif how == 1:
        bad = np.full(N, np.inf, np.float32)
    elif how == 2:
        bad = np.zeros(N + 1, np.float32)
    elif how == 3:
        bad = SCORES.astype(np.float64)
    else:
        bad = SCORES.astype(np.float16)
    try:
        arrays, _ = s.aggregate_train(1, [reply(1, honest[0]), reply(2, honest[1]), reply(3, bad)])
    except Exception:  # noqa: BLE001
        return "crashed"
    if arrays is None or s.round_records[1]["clients"] != 2:
        return "accepted"
    new = arrays[WEIGHTS_KEY].numpy()
    return "handled" if np.allclose(new, (honest[0] + honest[1]) / 2, atol=1e-6) else "accepted"


# --------------------------------------------------------------------------------------- files
def _flip(rng, blob: bytes) -> bytes:
    b = bytearray(blob)
    i = int(rng.integers(0, len(b) * 8))
    b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def _damage(rng, blob: bytes) -> bytes:
    how = int(rng.integers(0, 5))
    if how == 0:
        return _flip(rng, blob)
    if how == 1:
        return blob[: int(rng.integers(0, len(blob)))]
    if how == 2:
        return blob + rng.bytes(int(rng.integers(1, 64)))
    if how == 3:
        return rng.bytes(int(rng.integers(0, len(blob) + 1)))
    return _pickle_payload()


def _pickle_payload() -> bytes:
    """A torch.save pickle (the old formats): must be refused without unpickling."""
    import torch

    buf = io.BytesIO()
    torch.save({"round": 1, "scores": torch.zeros(3)}, buf)
    return buf.getvalue()


def _spec():
    from prism_flwr.model.generator import GeneratorSpec

    return GeneratorSpec(ngf=2, nz=8, nc=1, seed=3)


_MODEL_CACHE: dict = {}


def model_file_bytes() -> bytes:
    if "blob" not in _MODEL_CACHE:
        from prism_flwr.federated.export import expected_weight_count, save_sparse_model

        with tempfile.TemporaryDirectory() as tmp:
            mask = np.random.default_rng(0).random(expected_weight_count(_spec())) < 0.5
            save_sparse_model(Path(tmp) / "m.prism", _spec(), mask, {"dataset": "fmnist", "mask": "sample"})
            _MODEL_CACHE["blob"] = (Path(tmp) / "m.prism").read_bytes()
    return _MODEL_CACHE["blob"]


def model_with_header(header: bytes | dict, mask: bytes | None = None, hlen: int | None = None) -> bytes:
    """A model file with this header and a VALID checksum: only the schema can refuse it."""
    from prism_flwr.federated.export import EXPORT_FORMAT, MAGIC

    blob = model_file_bytes()
    old_hlen = struct.unpack_from("<I", blob, 12)[0]
    wire = blob[16 + old_hlen : -4] if mask is None else mask
    head = json.dumps(header).encode() if isinstance(header, dict) else header
    body = struct.pack("<8sII", MAGIC, EXPORT_FORMAT, len(head) if hlen is None else hlen) + head + wire
    return body + struct.pack("<I", zlib.crc32(body))


def crafted_model(rng: np.random.Generator) -> bytes:
    good = {
        "format": 2,
        "generator": {"nz": 8, "ngf": 2, "nc": 1, "seed": 3},
        "dataset": "fmnist",
        "mask": "sample",
    }
    how = int(rng.integers(0, 14))
    h = json.loads(json.dumps(good))
    if how == 0:
        h["generator"]["ngf"] = int(rng.choice([0, -1, 513, 10**9]))
    elif how == 1:
        h["generator"]["nz"] = int(rng.choice([0, 5000, 2**40]))
    elif how == 2:
        h["generator"]["nc"] = int(rng.choice([0, 2, 4]))
    elif how == 3:
        h["generator"]["seed"] = int(rng.choice([-1, 2**64]))
    elif how == 4:
        h["generator"]["ngf"] = str(rng.choice(["2", "2.0"])) if rng.random() < 0.5 else True
    elif how == 5:
        h["generator"]["extra"] = 1
    elif how == 6:
        h["evil"] = "x"
    elif how == 7:
        h["format"] = int(rng.choice([1, 3, 0]))
    elif how == 8:
        h["dataset"] = "../../etc/passwd"
    elif how == 9:
        h["generator"]["ngf"] = 512  # a huge network: the short mask must be refused before allocation
    elif how == 10:
        return model_with_header(
            b'{"format": 2, "format": 2, "generator": {"nz": 8, "ngf": 2, "nc": 1, "seed": 3}}'
        )
    elif how == 11:
        return model_with_header(rng.bytes(int(rng.integers(1, 60))))
    elif how == 12:
        return model_with_header(good, hlen=int(rng.choice([2**32 - 1, 10**6, 5000])))
    else:
        h["generator"] = [8, 2, 1, 3]
    return model_with_header(h)


def refused(call, refusal: type[Exception] | tuple[type[Exception], ...]) -> str:
    """The verdict on an input that must be refused: "handled" if ``call()`` raises ``refusal``,
    "crashed" on any other exception, "accepted" if it goes through."""
    try:
        call()
    except refusal:
        return "handled"
    except Exception:  # noqa: BLE001 - what the probe measures
        return "crashed"
    return "accepted"


def probe_model(rng: np.random.Generator, crafted: bool) -> str:
    from prism_flwr.federated.export import ModelFileError, load_sparse_model

    blob = crafted_model(rng) if crafted else _damage(rng, model_file_bytes())
    if rng.random() < 0.05 and not crafted:
        blob = struct.pack("<I", 20) + b'{"format": 1, "x":1}' + b"\0" * 40  # a format-1 file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.prism"
        path.write_bytes(blob)
        verdict = refused(lambda: load_sparse_model(path), ModelFileError)
    if verdict == "accepted" and blob == model_file_bytes():  # the damage left the file intact
        return "handled"
    return verdict


def probe_checkpoint(rng: np.random.Generator) -> str:
    """Newest of three checkpoints damaged: the load must fall back to the one before."""
    from prism_flwr.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        for rnd in (1, 2, 3):
            save_checkpoint(
                run,
                {
                    "round": rnd,
                    "scores": np.full(5, rnd, np.float32),
                    "history": [{"round": rnd}],
                    "run_tag": "ab" * 4,
                    "spec": {},
                    "run_config": {},
                },
            )
        newest = run / "checkpoint-000003.ckpt"
        newest.write_bytes(_damage(rng, newest.read_bytes()))
        try:
            state = load_checkpoint(run)
        except CheckpointError:
            return "accepted"  # a usable older checkpoint existed: refusing all is a failure too
        except Exception:  # noqa: BLE001
            return "crashed"
        return "handled" if state["round"] == 2 and float(state["scores"][0]) == 2.0 else "accepted"


def probe_client_state(rng: np.random.Generator) -> str:
    import torch

    from prism_flwr.federated.client_state import ClientRecord, StateError
    from prism_flwr.model.training import ClientState

    rec = ClientRecord(ClientState({"0.exp_avg": torch.ones(4), "0.step": torch.tensor(3.0)}, {}))
    blob = _damage(rng, rec.to_bytes())
    return refused(lambda: ClientRecord.from_bytes(blob), StateError)


def probe_ledger(rng: np.random.Generator) -> str:
    from prism_flwr.privacy.ledger import ExampleSet, LedgerError, LedgerSession, PrivacyLedger

    run, data = "0123abcd", ExampleSet.of(np.arange(20))
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger(tmp, 9.8, 1e-5)
        for r in (1, 2, 3):
            with LedgerSession(ledger, run, r, data).theta_release(20.0):
                pass
        how = int(rng.integers(0, 6))

        def attack() -> None:
            if how == 0:  # a round already released, or an earlier one
                with ledger.locked() as led:
                    led.record(run, int(rng.integers(-2, 4)), "theta", 20.0, data)
            elif how == 1:  # the example set a release names, replaced by a smaller one
                np.save(ledger.folder / "examples" / f"{data.digest}.npy", np.arange(5, dtype=np.uint64))
                with ledger.locked() as led:
                    led.spent(data)
            elif how == 2:  # a release past the node's budget
                with ledger.locked() as led:
                    led.record(run, 4, "theta", 0.05, data)
            else:  # damaged file: truncated mid-line, garbage, rounds out of order
                path = ledger.path
                lines = path.read_bytes().split(b"\n")
                if how == 3:
                    path.write_bytes(path.read_bytes()[: -int(rng.integers(2, 20))])
                elif how == 4:
                    path.write_bytes(path.read_bytes() + rng.bytes(int(rng.integers(1, 30))) + b"\n")
                else:
                    lines[1], lines[3] = lines[3], lines[1]
                    path.write_bytes(b"\n".join(lines))
                with ledger.locked():
                    pass

        return refused(attack, LedgerError)


def probe_run_tag(rng: np.random.Generator) -> str:
    from prism_flwr.federated.client_state import client_state_dir

    tag = rng.choice(
        [
            "../../etc",
            "/abs/path",
            "ABCDEF12",
            "abc",
            "a" * 65,
            "",
            "12345678/..",
            "1234567g",
            "..",
            "deadbeef\n",
            "ab\0cdef01",
        ]
    )
    if rng.random() < 0.2:
        tag = [int(rng.integers(0, 10))][0]
    return refused(lambda: client_state_dir("/tmp/state", tag), ValueError)


def probe_resume(rng: np.random.Generator) -> str:
    """A changed model/privacy key on resume must be refused, naming the key."""
    from prism_flwr.config import RunConfig
    from prism_flwr.storage.checkpoint import CheckpointError, check_resume_config

    saved = RunConfig().model_dump(by_alias=True)
    changes = {
        "dataset": "mnist",
        "ngf": 8,
        "nz": 64,
        "seed": 1,
        "method": "dense",
        "aggregation": "mada",
        "objective": "feature-matching",
        "dp-epsilon": 1.0,
        "dp-delta": 1e-6,
        "dp-clip": 0.2,
        "mada-space": "probability",
        "estimator": "identity",
        "lr": 0.5,
        "local-steps": 3,
        "partitioning": "iid",
        "robust-aggregation": "on",
        "batch-size": 32,
    }
    key = str(rng.choice(sorted(changes)))
    now = {**saved, key: changes[key]}
    if key == "objective":
        saved = {**saved, "dp": "off"}
    try:
        check_resume_config(saved, now)
    except CheckpointError as err:
        return "handled" if f"'{key}'" in str(err) else "accepted"
    except Exception:  # noqa: BLE001
        return "crashed"
    return "accepted"


def probe_dp_rounds_change(rng: np.random.Generator) -> str:
    from prism_flwr.config import RunConfig
    from prism_flwr.storage.checkpoint import CheckpointError, check_resume_config

    saved = {**RunConfig().model_dump(by_alias=True), "dp": "theta"}
    return refused(
        lambda: check_resume_config(saved, {**saved, "num-server-rounds": int(rng.integers(16, 500))}),
        CheckpointError,
    )


def probe_lock(rng: np.random.Generator) -> str:
    from prism_flwr.storage.checkpoint import RunLock, RunLocked

    with tempfile.TemporaryDirectory() as tmp, RunLock(tmp):
        return refused(lambda: RunLock(tmp).acquire(), RunLocked)


PROBES: dict[str, tuple[str, Callable[[np.random.Generator], str]]] = {
    **{
        f"reply: {name}": ("train reply (MADA)", (lambda n: lambda rng: probe_reply(rng, n))(name))
        for name in REPLY_CLASSES
    },
    "reply: decode raises any exception": ("train reply (MADA)", probe_decode_raises),
    "reply: hostile evaluation reply": ("evaluate reply", probe_evaluate),
    "reply: bad dense weights (NaN, inf, shape, dtype)": ("train reply (dense)", probe_dense),
    "model.prism: damaged bytes (flip, cut, append, noise, pickle)": (
        "file",
        lambda rng: probe_model(rng, False),
    ),
    "model.prism: crafted header, valid checksum": ("file", lambda rng: probe_model(rng, True)),
    "checkpoint: newest damaged (falls back)": ("file", probe_checkpoint),
    "client state: damaged or pickled blob": ("file", probe_client_state),
    "privacy ledger: replay, other partition, over budget, damage": ("file", probe_ledger),
    "run-tag from the server: not hex": ("path", probe_run_tag),
    "resume with a model/privacy key changed": ("resume", probe_resume),
    "resume under DP with num-server-rounds changed": ("resume", probe_dp_rounds_change),
    "second run on a locked run folder": ("resume", probe_lock),
}


def run(per_class: int, seed: int = 0, only: str = "") -> list[dict]:
    import logging

    saved = set_task_identity()
    loggers = [logging.getLogger(name) for name in ("flwr", "prism.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)  # thousands of expected "dropped reply" warnings
    rows = []
    try:
        for i, (name, (area, probe)) in enumerate(PROBES.items()):
            if not name.startswith(only):
                continue
            rng = np.random.default_rng([seed, i])
            counts = {"handled": 0, "crashed": 0, "accepted": 0}
            for _ in range(per_class):
                try:
                    counts[probe(rng)] += 1
                except Exception:  # noqa: BLE001 - a probe's own set-up failing counts as a crash
                    counts["crashed"] += 1
            rows.append({"class": name, "area": area, "tried": per_class, **counts})
    finally:
        restore_task_identity(saved)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "security")
    ap.add_argument(
        "--strategies-from",
        type=Path,
        default=None,
        help="probe the replies against the strategies/ package in this folder instead "
        "(e.g. an older commit's: git archive COMMIT strategies | tar -x -C DIR)",
    )
    ap.add_argument("--name", default="probe", help="output file stem")
    args = ap.parse_args(argv)
    only = ""
    if args.strategies_from is not None:
        sys.path.insert(0, str(args.strategies_from.resolve()))
        only = "reply:"
    t0 = time.time()
    rows = run(args.per_class, only=only)
    args.out.mkdir(parents=True, exist_ok=True)
    import strategies

    (args.out / f"{args.name}.json").write_text(
        json.dumps(
            {
                "per_class": args.per_class,
                "seconds": time.time() - t0,
                "strategies": str(Path(strategies.__file__).parent),
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    lines = ["| input class | tried | handled | crashed | silently accepted |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['class']} | {r['tried']} | {r['handled']} | {r['crashed']} | {r['accepted']} |" for r in rows
    ]
    total = {k: sum(r[k] for r in rows) for k in ("tried", "handled", "crashed", "accepted")}
    lines.append(
        f"| **all** | {total['tried']} | {total['handled']} | {total['crashed']} | {total['accepted']} |"
    )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if total["crashed"] == 0 and total["accepted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
