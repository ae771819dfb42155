"""What a round's record says when it is skipped, what it counts on the wire, what robust
counting dropped, and that a rule's state (server Adam, Beta counts) moves only on applied rounds."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from prism_flwr.federated.codec import encode_mask
from prism_flwr.federated.records import SCORES_KEY
from prism_flwr.federated.robust import robust_counts
from strategies.wire import message_wire_bytes
from tests.test_strategy import LAYOUT, SCORES, FakeGrid, N, make_strategy, mask, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def replies(nodes=(1, 2, 3, 4)):
    return [reply(n, encode_mask(mask(n), LAYOUT)) for n in nodes]


def non_finite_settle(monkeypatch, strategy):
    """The aggregate comes out non-finite: the round is refused by the aggregate check."""
    monkeypatch.setattr(
        type(strategy.downlink), "settle", lambda self, vector, rng=None: np.full_like(vector, np.nan)
    )


@pytest.mark.parametrize("rule", ["adam", "beta"])
def test_rule_state_does_not_move_on_a_skipped_round(rule, monkeypatch):
    s = make_strategy(rule=rule)
    arrays, _ = s.aggregate_train(1, replies())
    assert arrays is not None
    state = s.aggregator.state_dict()
    assert state  # the applied round moved it
    s.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    non_finite_settle(monkeypatch, s)
    arrays2, _ = s.aggregate_train(2, replies())
    assert arrays2 is None and s.round_records[2]["skipped"]
    after = s.aggregator.state_dict()
    assert after.keys() == state.keys()
    for key in state:
        np.testing.assert_array_equal(after[key], state[key])


def test_skip_reasons_are_the_real_ones(monkeypatch):
    from server_app import _fmt

    few = make_strategy(min_train_nodes=3)
    few.aggregate_train(1, replies((1, 2)))
    rec = few.round_records[1]
    assert rec["skipped"] and "2 valid replies, min-train-nodes is 3" in rec["skip_reason"]
    assert "min-train-nodes" in _fmt(rec)

    bad = make_strategy()
    non_finite_settle(monkeypatch, bad)
    assert bad.aggregate_train(1, replies()) == (None, None)
    rec = bad.round_records[1]
    assert (
        rec["skipped"]
        and "non-finite" in rec["aggregation_error"]
        and "aggregation failed" in rec["skip_reason"]
    )
    line = _fmt(rec)
    assert "aggregation failed" in line and "too few valid masks" not in line


@pytest.mark.parametrize(
    "bug",
    [
        TypeError("unsupported operand"),
        IndexError("list index out of range"),
        KeyError("scores"),
        AttributeError("no attribute 'grouped_bits'"),
    ],
)
def test_a_programming_error_in_aggregation_ends_the_run(bug):
    s = make_strategy()

    def broken(*args, **kwargs):
        raise bug

    s.combine = broken
    with pytest.raises(type(bug)):
        s.aggregate_train(1, replies())


def test_uplink_wire_bytes_count_every_reply():
    s = make_strategy(nodes=(1, 2, 3, 4))
    good = replies((1, 2))
    corrupt = reply(3, encode_mask(mask(3), LAYOUT)[:-3])
    failed = reply(4, error="ClientApp raised ValueError")
    all_replies = [*good, corrupt, failed]
    expected = sum(message_wire_bytes(m) for m in all_replies)
    arrays, _ = s.aggregate_train(1, all_replies)
    rec = s.round_records[1]
    assert arrays is not None and rec["clients"] == 2 and len(rec["dropped"]) == 2
    assert rec["uplink_wire_bytes"] == expected
    assert rec["wire_bits_per_weight_up"] == pytest.approx(8 * expected / 4 / N)


def test_robust_record_names_the_dropped_masks():
    s = make_strategy(nodes=(11, 12, 13, 14, 15, 16, 17))
    s.robust = {"trim": 1, "outlier_mads": 3.0}
    theta = 1 / (1 + np.exp(-SCORES))
    honest = [np.random.default_rng(i).random(N) < theta for i in range(5)]
    attack = theta < 0.5
    masks = [*honest, attack, attack]  # nodes 16 and 17 send the same anti-target mask
    nodes = [11, 12, 13, 14, 15, 16, 17]
    packed = [np.packbits(m, bitorder="little") for m in masks]
    _, _, info = robust_counts(packed, N, trim=1, outlier_mads=3.0)
    assert info.duplicates == [6] and info.outliers == [5]  # the case this test is about

    arrays, metrics = s.aggregate_train(1, [reply(n, encode_mask(m, LAYOUT)) for n, m in zip(nodes, masks)])
    rec = s.round_records[1]
    assert arrays is not None
    dropped = {d["node"]: d["reason"] for d in rec["robust_dropped"]}
    assert set(dropped) == {16, 17}
    assert "same mask as node 16" in dropped[17] and "Hamming distance" in dropped[16]
    assert metrics["robust_dropped_duplicates"] == 1 and metrics["robust_dropped_outliers"] == 1


def test_a_run_whose_every_round_skips_fails_with_the_last_reason():
    from server_app import NothingLearned, check_learned

    s = make_strategy(min_train_nodes=3)
    s.aggregate_train(1, replies((1, 2)))
    s.configure_train(2, ArrayRecord({SCORES_KEY: Array(SCORES)}), ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    s.aggregate_train(2, [reply(1, error="ClientApp raised LedgerError")])
    with pytest.raises(NothingLearned) as err:
        check_learned(s.round_records)
    assert str(err.value) == (
        "no round applied: all 2 rounds were skipped; the last (round 2): "
        "0 valid replies, min-train-nodes is 3; nodes said: "
        "LOAD_CLIENT_APP_EXCEPTION (1): ClientApp raised LedgerError"
    )
    check_learned({})  # no round ran (a resumed run that had finished): nothing to judge

    one = make_strategy()
    arrays, _ = one.aggregate_train(1, replies())
    one.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2, 3, 4]))
    assert one.aggregate_train(2, []) == (None, None)
    check_learned(one.round_records)  # one applied round is a run that learned
