"""Wire bytes: the count equals what Flower's own push machinery serialises for a message."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, push_objects

from strategies.wire import bits_per_weight, content_bytes, envelope_bytes, message_wire_bytes, object_bytes
from tests.support.messages import reply_message

pytestmark = pytest.mark.usefixtures("task_identity")


def _message(payload: np.ndarray) -> Message:
    content = RecordDict(
        {
            "mask": ArrayRecord({"mask": Array(payload)}),
            "metrics": MetricRecord({"num-examples": 10, "loss": 0.5}),
            "config": ConfigRecord({"round": 3}),
        }
    )
    return reply_message(7, content, message_id="")


def _push(msg: Message) -> dict[str, bytes]:
    """What Flower's push_objects hands to the transport for ``msg``: object id -> content."""
    sent = {}
    push_objects(get_all_nested_objects(msg), sent.__setitem__, keep_objects=True)
    return sent


def _pushed(msg: Message) -> int:
    return sum(map(len, _push(msg).values()))


def test_counts_what_flower_pushes_and_that_is_enough_to_rebuild_the_message():
    msg = _message(np.arange(1000, dtype=np.uint8))
    sent = _push(msg)
    assert object_bytes(msg) == sum(map(len, sent.values()))
    assert message_wire_bytes(msg) == envelope_bytes(msg) + object_bytes(msg)
    rebuilt = inflate_object_from_contents(msg.object_id, dict(sent))  # what the receiver does
    np.testing.assert_array_equal(rebuilt.content["mask"]["mask"].numpy(), np.arange(1000, dtype=np.uint8))
    assert rebuilt.content["metrics"]["loss"] == 0.5


def test_a_uint8_array_costs_its_npy_bytes_plus_a_fixed_overhead():
    small, big = _message(np.zeros(1000, np.uint8)), _message(np.ones(3000, np.uint8))
    npy = io.BytesIO()
    np.save(npy, np.ones(3000, np.uint8), allow_pickle=False)
    overhead = message_wire_bytes(big) - len(npy.getvalue())
    assert 0 < overhead < 2000  # heads, ids, metadata, other records
    assert message_wire_bytes(big) - message_wire_bytes(small) == 2000  # payload grows byte for byte
    assert content_bytes(big) - content_bytes(small) == 2000


def test_arrays_over_5_mib_travel_in_chunks_all_counted():
    n = 6 * 1024 * 1024
    msg = _message(np.full(n, 3, np.uint8))
    arr = msg.content["mask"]["mask"]
    assert len(arr.children) == 2  # two ArrayChunks
    assert n < message_wire_bytes(msg) < n + 4000
    assert object_bytes(msg) == _pushed(msg)


def test_bits_per_weight():
    assert bits_per_weight(1000, 8000) == 1.0
    with pytest.raises(ValueError):
        bits_per_weight(10, 0)
