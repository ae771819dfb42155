"""MADA strategy: valid masks aggregate exactly; every bad reply is dropped, never averaged in."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_flwr.federated.aggregation import aggregate, count_ones
from prism_flwr.federated.broadcast import DOWNLINK_KEY, DOWNLINKS, digest, receive
from prism_flwr.federated.codec import encode_mask
from prism_flwr.federated.records import MASK_KEY, METRICS_KEY, SCORES_KEY, WEIGHTS_KEY
from strategies.dense import DenseFedAvg
from strategies.mada import MADA
from tests.support.messages import reply_message

pytestmark = pytest.mark.usefixtures("task_identity")


N = 53
LAYOUT = b"L" * 8
SCORES = np.linspace(-2, 2, N).astype(np.float32)


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def make_strategy(nodes=(1, 2, 3, 4), rule="mada", min_train_nodes=2):
    s = MADA(
        num_weights=N,
        layout=LAYOUT,
        rule=rule,
        seed=5,
        min_train_nodes=min_train_nodes,
        min_available_nodes=len(nodes),
    )
    s.configure_train(1, ArrayRecord({SCORES_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid(list(nodes)))
    return s


def reply(node, blob=None, metrics=None, error=None, code=1):
    if error:
        return reply_message(node, error=error, code=code)
    content = RecordDict()
    if blob is not None:
        content[MASK_KEY] = ArrayRecord({MASK_KEY: Array(np.frombuffer(blob, np.uint8).copy())})
    content[METRICS_KEY] = MetricRecord(metrics if metrics is not None else {"num-examples": 10, "loss": 0.5})
    return reply_message(node, content)


def mask(seed):
    return np.random.default_rng(seed).random(N) < 0.4


def expected_scores(masks, rnd=1):
    counts, k = count_ones((np.packbits(m, bitorder="little") for m in masks), N)
    return aggregate(SCORES, counts, k, method="mada", rng=np.random.default_rng([5, rnd])).scores


def test_valid_replies_are_aggregated_exactly():
    s = make_strategy()
    masks = [mask(i) for i in range(4)]
    arrays, metrics = s.aggregate_train(
        1, [reply(i + 1, encode_mask(m, LAYOUT)) for i, m in enumerate(masks)]
    )
    np.testing.assert_array_equal(arrays[SCORES_KEY].numpy(), expected_scores(masks))
    assert metrics["clients"] == 4 and 0 <= metrics["mada_lambda"] <= 1
    rec = s.round_records[1]
    assert rec["uplink_bytes"] == 4 * len(encode_mask(masks[0], LAYOUT)) and rec["dropped"] == []
    # counted as Flower serialises the messages: the payload plus the envelope, records and .npy headers
    assert (
        rec["uplink_wire_bytes"] > rec["uplink_bytes"] and rec["downlink_wire_bytes"] > rec["downlink_bytes"]
    )
    assert rec["wire_bits_per_weight_up"] > rec["uplink_bits_per_weight"] > 0
    assert rec["downlink_bits_per_weight"] == 32.0  # float32 scores in this test


def test_bad_replies_are_dropped_with_a_reason():
    s = make_strategy(nodes=(1, 2, 3, 4, 5, 6, 7, 8))
    good = [mask(1), mask(2)]
    blob = encode_mask(good[0], LAYOUT)
    replies = [
        reply(1, blob),
        reply(2, encode_mask(good[1], LAYOUT)),
        reply(3, blob[:-3]),  # truncated
        reply(4, encode_mask(mask(4), b"X" * 8)),  # other model
        reply(5, encode_mask(mask(5), LAYOUT), {"num-examples": 10, "loss": float("nan")}),
        reply(6, error="ClientApp raised ValueError"),
        reply(7, None),  # no mask record
        reply(1, encode_mask(mask(9), LAYOUT)),  # duplicate from node 1
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays[SCORES_KEY].numpy(), expected_scores(good))
    reasons = "\n".join(s.round_records[1]["dropped"])
    for node, why in [
        (3, "payload is"),
        (4, "layout"),
        (5, "is not finite"),
        (6, "ClientApp raised"),
        (7, "lacks record"),
        (1, "duplicate"),
    ]:
        assert f"node {node}: " in reasons and why in reasons, reasons
    assert len(s.round_records[1]["dropped"]) == 6


def test_wrong_dtype_is_dropped():
    s = make_strategy()
    m = reply(1, encode_mask(mask(0), LAYOUT))
    m.content[MASK_KEY] = ArrayRecord({MASK_KEY: Array(np.zeros(40, np.float32))})
    arrays, metrics = s.aggregate_train(1, [m, reply(2, encode_mask(mask(1), LAYOUT))])
    assert arrays is None and metrics is None  # one valid mask < min_train_nodes
    assert "flat uint8" in s.round_records[1]["dropped"][0]


def test_round_is_skipped_below_min_train_nodes():
    s = make_strategy(min_train_nodes=3)
    arrays, metrics = s.aggregate_train(
        1, [reply(1, encode_mask(mask(0), LAYOUT)), reply(2, error="timeout")]
    )
    assert arrays is None and metrics is None
    assert s.round_records[1]["skipped"] and s.round_records[1]["clients"] == 1


def test_error_reply_of_a_crashed_clientapp_is_logged_and_the_round_goes_on():
    """A node whose ClientApp process died (e.g. killed out of memory) answers with Flower's
    CLIENT_APP_CRASHED error: the server logs it by name for that node, and the others aggregate."""
    s = make_strategy(nodes=(1, 2, 3), min_train_nodes=2)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        replies = [
            reply(1, encode_mask(mask(0), LAYOUT)),
            reply(2, encode_mask(mask(1), LAYOUT)),
            reply(3, error="ClientApp stopped responding.", code=8),
        ]
        arrays, _ = s.aggregate_train(1, replies)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert arrays is not None and s.round_records[1]["clients"] == 2
    assert s.round_records[1]["dropped"] == ["node 3: CLIENT_APP_CRASHED (8): ClientApp stopped responding."]
    logged = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("node 3" in m and "CLIENT_APP_CRASHED (8)" in m for m in logged), logged


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=6)
)
def test_fuzzed_replies_never_leak_into_the_aggregate(corruptions):
    """Random byte corruptions: no exception escapes and only intact masks are aggregated."""
    s = make_strategy(nodes=tuple(range(1, len(corruptions) + 1)), min_train_nodes=1)
    replies, intact = [], []
    for node, (corrupt, pos, flip) in enumerate(corruptions, start=1):
        m = mask(node)
        blob = bytearray(encode_mask(m, LAYOUT))
        if corrupt:
            blob[pos % len(blob)] ^= flip
        else:
            intact.append(m)
        replies.append(reply(node, bytes(blob)))
    arrays, _ = s.aggregate_train(1, replies)
    if intact:
        np.testing.assert_array_equal(arrays[SCORES_KEY].numpy(), expected_scores(intact))
    else:
        assert arrays is None  # the global state is unchanged by a round whose replies are all bad
    assert len(s.round_records[1]["dropped"]) == len(corruptions) - len(intact)


def test_round_offset_continues_the_numbering():
    s = make_strategy()
    s.round_offset = 7
    msgs = list(
        s.configure_train(1, ArrayRecord({SCORES_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    )
    assert msgs[0].content["config"]["server-round"] == 8
    masks = [mask(0), mask(1)]
    arrays, _ = s.aggregate_train(
        1, [reply(1, encode_mask(masks[0], LAYOUT)), reply(2, encode_mask(masks[1], LAYOUT))]
    )
    np.testing.assert_array_equal(arrays[SCORES_KEY].numpy(), expected_scores(masks, rnd=8))
    assert 8 in s.round_records


def _dense(nodes=(1, 2, 3)):
    s = DenseFedAvg(
        num_weights=N, seed=5, min_train_nodes=2, min_available_nodes=len(nodes), max_examples=60_000
    )
    s.configure_train(1, ArrayRecord({WEIGHTS_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid(list(nodes)))
    return s


def dense_reply(node, w, n):
    m = reply(node, None, {"num-examples": n, "loss": 0.1})
    m.content[WEIGHTS_KEY] = ArrayRecord({WEIGHTS_KEY: Array(np.asarray(w, dtype=np.float32))})
    return m


def test_dense_fedavg_counts_clients_equally_and_drops_bad_weights():
    """num-examples is the client's claim: the baseline averages clients equally."""
    s = _dense()
    a, b = np.full(N, 1.0), np.full(N, 4.0)
    arrays, metrics = s.aggregate_train(
        1, [dense_reply(1, a, 10), dense_reply(2, b, 30), dense_reply(3, np.full(N, np.nan), 10)]
    )
    np.testing.assert_allclose(arrays[WEIGHTS_KEY].numpy(), np.full(N, 2.5), rtol=1e-6)
    rec = s.round_records[1]
    assert rec["clients"] == 2 and "NaN" in rec["dropped"][0]
    assert rec["uplink_bits_per_weight"] == 32.0 and "mada_lambda" not in rec  # PRISM's record field


def test_dense_fedavg_clips_an_oversized_update():
    """One client sending global + 1000 x an honest update moves the model at most 2 x the median norm."""
    s = _dense(nodes=(1, 2, 3, 4))
    rng = np.random.default_rng(0)
    honest = [SCORES + 0.01 * rng.standard_normal(N) for _ in range(3)]
    attack = SCORES + 1000.0 * (honest[0] - SCORES)
    arrays, _ = s.aggregate_train(1, [dense_reply(i + 1, w, 100) for i, w in enumerate([*honest, attack])])
    new = arrays[WEIGHTS_KEY].numpy()
    norms = sorted(np.linalg.norm(w - SCORES) for w in honest)
    bound = s.round_records[1]["update_norm_bound"]
    assert bound <= 2 * norms[-1] + 1e-6  # the median of 4 norms lies between two honest ones
    assert np.linalg.norm(new - SCORES) <= (sum(norms) + bound) / 4 + 1e-5


# ---------------------------------------------------------------- downlink = "delta"
DN = 20_000  # large enough for a delta to beat the full state (its histograms cost a few hundred bytes)


def _delta_strategy(nodes):
    return MADA(
        num_weights=DN,
        layout=LAYOUT,
        rule="mada",
        seed=5,
        min_train_nodes=1,
        eval_every=100,
        min_available_nodes=len(nodes),
        downlink=DOWNLINKS["delta"],
    )


def _start_state():
    return DOWNLINKS["delta"].settle(np.random.default_rng(0).normal(0, 1.5, DN).astype(np.float32))


def _node_side(messages, kept):
    """What each node rebuilds from its message (``kept``: node -> the global it holds, updated)."""
    for m in messages:
        node = m.metadata.dst_node_id
        wire = m.content[SCORES_KEY][SCORES_KEY].numpy()
        kept[node] = receive(DOWNLINKS["delta"], wire, DN, m.content[DOWNLINK_KEY], kept.get(node))
    return {m.metadata.dst_node_id: m.content[DOWNLINK_KEY]["base"] for m in messages}


def _delta_reply(node, rnd, held):
    bits = np.random.default_rng(10 * rnd + node).random(DN) < 0.4
    msg = reply(node, encode_mask(bits, LAYOUT))
    msg.content[DOWNLINK_KEY] = ConfigRecord({"held": held})
    return msg


def _delta_round(s, rnd, state, nodes, kept, answer):
    """One training round: configure, decode on the nodes, replies from ``answer`` (node -> held
    digest to claim, "own" for the true one, None for no reply); returns (new state, base per node)."""
    arrays = ArrayRecord({SCORES_KEY: Array(state)})
    messages = s.configure_train(rnd, arrays, ConfigRecord(), FakeGrid(list(nodes)))
    bases = _node_side(messages, kept)
    for node in nodes:
        assert kept[node].tobytes() == state.tobytes()  # bit for bit the server's state
    replies = [
        reply(n, error="global does not decode: needs the full state")
        if held == "error"
        else _delta_reply(n, rnd, held if held != "own" else digest(kept[n]))
        for n, held in answer.items()
        if held is not None
    ]
    arrays, _ = s.aggregate_train(rnd, replies)
    # as Flower's Strategy.start: an evaluation step every round, here without evaluation
    assert list(s.configure_evaluate(rnd, arrays, ConfigRecord(), FakeGrid(list(nodes)))) == []
    assert s.aggregate_evaluate(rnd, []) is None
    return arrays[SCORES_KEY].numpy(), bases


def test_delta_goes_only_to_nodes_that_confirmed_the_previous_global():
    nodes = (1, 2, 3, 4)
    s, kept = _delta_strategy(nodes), {}
    state = _start_state()
    state2, bases = _delta_round(s, 1, state, nodes, kept, {1: "own", 2: "own", 3: "own", 4: "own"})
    assert set(bases.values()) == {""}  # fresh nodes: the full state
    full = s.round_records[1]["downlink_bytes"] / len(nodes)
    state3, bases = _delta_round(s, 2, state2, nodes, kept, {1: "own", 2: "own", 3: None, 4: "own"})
    assert bases == {n: digest(state) for n in nodes}
    assert s.round_records[2]["downlink_bytes"] / len(nodes) < 0.8 * full
    _, bases = _delta_round(s, 3, state3, nodes, kept, {n: "own" for n in nodes})
    assert bases[3] == "" and {bases[n] for n in (1, 2, 4)} == {digest(state2)}  # node 3 missed round 2
    assert s.round_records[3]["dropped"] == []


def test_forged_held_digest_or_refusal_drops_the_reply_and_the_node_gets_the_full_state():
    nodes = (1, 2, 3, 4)
    s, kept = _delta_strategy(nodes), {}
    state = _start_state()
    state2, _ = _delta_round(s, 1, state, nodes, kept, {1: "own", 2: "0" * 64, 3: "own", 4: "error"})
    rec = s.round_records[1]
    assert rec["clients"] == 2 and len(rec["dropped"]) == 2
    assert "node 2: reply says its node holds" in rec["dropped"][0]
    assert "needs the full state" in rec["dropped"][1]
    _, bases = _delta_round(s, 2, state2, nodes, kept, {n: "own" for n in nodes})
    assert bases == {1: digest(state), 2: "", 3: digest(state), 4: ""}


def test_delta_reply_without_its_downlink_record_is_dropped():
    s, kept = _delta_strategy((1, 2)), {}
    state = _start_state()
    messages = s.configure_train(1, ArrayRecord({SCORES_KEY: Array(state)}), ConfigRecord(), FakeGrid([1, 2]))
    _node_side(messages, kept)
    bare = _delta_reply(2, 1, digest(state))
    del bare.content[DOWNLINK_KEY]
    s.aggregate_train(1, [_delta_reply(1, 1, digest(state)), bare])
    assert s.round_records[1]["dropped"] == ["node 2: reply lacks record 'downlink'"]


def test_client_app_keeps_its_copy_and_refuses_a_delta_it_cannot_rebuild():
    """The ClientApp's downlink part against the strategy: full state, then a delta rebuilt from
    the copy in ``context.state``; a node that lost its copy refuses and gets the full state."""
    from flwr.app import Context

    import client_app
    from prism_flwr.config import RunConfig
    from prism_flwr.federated.broadcast import DownlinkRefused
    from prism_flwr.federated.client_round import masked_count
    from prism_flwr.federated.methods import PRISM

    run_config = {"ngf": 2, "downlink": "delta", "device": "cpu"}
    cfg = RunConfig.parse(run_config)
    n = masked_count(cfg, PRISM, torch.device("cpu"))
    s = MADA(
        num_weights=n,
        layout=LAYOUT,
        seed=5,
        min_train_nodes=1,
        min_available_nodes=2,
        downlink=DOWNLINKS["delta"],
    )
    contexts = {node: Context(1, node, {}, RecordDict(), run_config) for node in (1, 2)}
    rng = np.random.default_rng(3)
    state = DOWNLINKS["delta"].settle(rng.normal(0, 1.5, n).astype(np.float32))
    for rnd in (1, 2, 3):
        arrays = ArrayRecord({SCORES_KEY: Array(state)})
        messages = s.configure_train(rnd, arrays, ConfigRecord(), FakeGrid([1, 2]))
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if rnd == 2 and node == 2:
                del contexts[node].state[client_app.HELD_KEY]  # e.g. a restarted node
                with pytest.raises(DownlinkRefused, match="needs the full state"):
                    client_app._received_global(m, contexts[node], cfg, PRISM, torch.device("cpu"))
                replies.append(reply(node, error="needs the full state"))
                continue
            got = client_app._received_global(m, contexts[node], cfg, PRISM, torch.device("cpu"))
            assert got.tobytes() == state.tobytes()
            assert contexts[node].state[client_app.HELD_KEY]["global"].numpy().tobytes() == state.tobytes()
            assert (m.content[DOWNLINK_KEY]["base"] == "") == (rnd == 1 or (rnd == 3 and node == 2))
            msg = reply(node, encode_mask(rng.random(n) < 0.3, LAYOUT))
            msg.content[DOWNLINK_KEY] = client_app._held_record(cfg, PRISM, got)[DOWNLINK_KEY]
            replies.append(msg)
        arrays, _ = s.aggregate_train(rnd, replies)
        state = arrays[SCORES_KEY].numpy()
