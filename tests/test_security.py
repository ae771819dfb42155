"""Hostile and broken inputs: replies, state files, run folders, the privacy ledger.

The input classes live in ``security_probe.py`` (which also measures the table in docs/security.md);
here hypothesis mixes them and every outcome is asserted.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_flwr.config import RunConfig
from prism_flwr.federated.aggregation import AggregationError
from prism_flwr.federated.client_state import (
    ClientRecord,
    StateError,
    client_state_dir,
    read_latest_state_file,
    validate_run_tag,
    write_state_file,
)
from prism_flwr.model.training import ClientState
from prism_flwr.privacy.ledger import ExampleSet, LedgerError, LedgerSession, PrivacyLedger
from prism_flwr.storage.checkpoint import (
    CheckpointError,
    RunLock,
    RunLocked,
    check_resume_config,
    checkpoint_files,
    find_run_dir,
    load_checkpoint,
    new_run_dir,
    point_latest,
    save_checkpoint,
)
from tools import security_probe as sp

pytestmark = pytest.mark.usefixtures("task_identity")


# ------------------------------------------------------------------------------------ replies
KINDS = ["valid", *sp.REPLY_CLASSES]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(KINDS), min_size=1, max_size=8), st.integers(0, 2**32 - 1))
def test_no_reply_crashes_the_strategy_or_reaches_the_aggregate(kinds, seed):
    """Any mix of valid and hostile replies: aggregate_train returns, every hostile reply is dropped
    with a reason, and the new scores are exactly MADA's over the valid masks alone."""
    replies, valid, bad = sp.build_round(np.random.default_rng(seed), kinds)
    s = sp.make_mada(range(1, len(replies) + 1))
    assert sp.judge_round(s, replies, valid, bad) == "handled", s.round_records[1]["dropped"]
    assert all(reason.startswith("node ") and len(reason) < 650 for reason in s.round_records[1]["dropped"])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_any_exception_from_decode_only_drops_that_reply(seed):
    assert sp.probe_decode_raises(np.random.default_rng(seed)) == "handled"


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_hostile_evaluation_and_dense_replies(seed):
    rng = np.random.default_rng(seed)
    assert sp.probe_evaluate(rng) == "handled"
    assert sp.probe_dense(rng) == "handled"


def test_client_metrics_never_overwrite_record_fields():
    """The schema refuses unknown names; what is accepted is stored under client_metrics."""
    rng = np.random.default_rng(0)
    s = sp.make_mada([1, 2, 3])
    good = [sp._good(rng, n) for n in (1, 2)]
    evil = sp.message(
        3, sp.mask_content(sp._blob(rng), {"num-examples": 5, "clients": 1000.0, "skipped": 1.0})
    )
    s.aggregate_train(1, [m for m, _ in good] + [evil])
    rec = s.round_records[1]
    assert rec["clients"] == 2 and rec["skipped"] is False and "unknown metric 'clients'" in rec["dropped"][0]
    assert set(rec["client_metrics"]) <= set(sp.valid_metrics(rng)) | {"dp_epsilon", "loss"}


def test_a_failing_combine_skips_the_round_instead_of_ending_the_run():
    """Input-caused (AggregationError, a non-finite aggregate): skipped. Anything else is a bug
    and ends the run (tests/test_round_outcome.py)."""
    s = sp.make_mada([1, 2])
    s.combine = lambda *a: (_ for _ in ()).throw(AggregationError("boom"))
    rng = np.random.default_rng(1)
    arrays, metrics = s.aggregate_train(1, [sp._good(rng, 1)[0], sp._good(rng, 2)[0]])
    assert arrays is None and metrics is None
    rec = s.round_records[1]
    assert rec["skipped"] and "boom" in rec["aggregation_error"]
    s.combine = lambda rnd, p, w: (np.full(sp.N, np.nan, np.float32), {})
    assert s.aggregate_train(1, [sp._good(rng, 1)[0], sp._good(rng, 2)[0]]) == (None, None)
    s.combine = lambda *a: (_ for _ in ()).throw(FloatingPointError("boom"))
    with pytest.raises(FloatingPointError):
        s.aggregate_train(1, [sp._good(rng, 1)[0], sp._good(rng, 2)[0]])


def test_num_examples_and_histogram_bounds():
    s = sp.make_mada([1])
    ok = {"num-examples": 60_000, "label_histogram": [6_000] * 10}
    assert s.check_metrics(sp.MetricRecord(ok), s.train_metrics)["num-examples"] == 60_000
    for bad, why in [
        ({"num-examples": 60_001}, "outside"),
        ({"num-examples": 10, "label_histogram": [1] * 9}, "entries"),
        ({"num-examples": 10, "label_histogram": [2] * 10}, "sums to"),
    ]:
        with pytest.raises(ValueError, match=why):
            s.check_metrics(sp.MetricRecord(bad), s.train_metrics)


# ------------------------------------------------------------------------------ run folders
def _state(rnd, cfg=None):
    return {
        "round": rnd,
        "scores": np.full(4, rnd, np.float32),
        "history": [{"round": r} for r in range(rnd + 1)],
        "run_tag": "0123abcd",
        "spec": {"nz": 8},
        "run_config": cfg or {},
    }


def test_checkpoints_keep_three_and_fall_back_past_a_corrupt_newest(tmp_path, caplog):
    for rnd in range(1, 6):
        save_checkpoint(tmp_path, _state(rnd))
    assert [r for r, _ in checkpoint_files(tmp_path)] == [3, 4, 5]
    newest = tmp_path / "checkpoint-000005.ckpt"
    newest.write_bytes(newest.read_bytes()[:-10])  # a crash mid-write that escaped the rename
    state = load_checkpoint(tmp_path)
    assert state["round"] == 4 and torch.equal(state["scores"], torch.full((4,), 4.0))
    assert "falling back" in caplog.text
    for _, path in checkpoint_files(tmp_path):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_is_not_a_pickle(tmp_path):
    """The old torch.save format (a pickle) is refused without being unpickled."""
    path = tmp_path / "checkpoint-000001.ckpt"
    torch.save({"round": 1}, path)
    with pytest.raises(CheckpointError, match="not a PRISMCKP file"):
        load_checkpoint(path)


def test_run_folders_latest_and_lock(tmp_path):
    a = new_run_dir(tmp_path, 7)
    b = new_run_dir(tmp_path, 8)
    assert a != b and a.parent == tmp_path and "run7" in a.name
    assert not (tmp_path / "latest").exists()  # a run points latest at its folder once it has a checkpoint
    point_latest(tmp_path, b)
    assert os.readlink(tmp_path / "latest") == b.name and find_run_dir(tmp_path) == b
    assert find_run_dir(tmp_path, a.name) == a
    for bad in ("../x", "a/b", "..", "x\n"):
        with pytest.raises(CheckpointError):
            find_run_dir(tmp_path, bad)
    with pytest.raises(CheckpointError, match="no run folder"):
        find_run_dir(tmp_path, "missing")
    os.symlink(str(tmp_path.parent), tmp_path / "escape")
    with pytest.raises(CheckpointError, match="outside"):
        find_run_dir(tmp_path, "escape")
    with RunLock(b), pytest.raises(RunLocked, match="in use by another run"):
        RunLock(b).acquire()
    RunLock(b).acquire().release()  # free again once the holder let go


def test_resume_refuses_model_and_privacy_changes_and_names_the_key():
    cfg = RunConfig().model_dump(by_alias=True)
    check_resume_config(cfg, {**cfg, "eval-every": 1, "num-server-rounds": 30, "output-dir": "/x"})
    for key, value in [
        ("ngf", 8),
        ("seed", 1),
        ("dp-epsilon", 1.0),
        ("aggregation", "mada"),
        ("dataset", "mnist"),
    ]:
        with pytest.raises(CheckpointError, match=f"'{key}'"):
            check_resume_config(cfg, {**cfg, key: value})
    dp = {**cfg, "dp": "theta"}
    with pytest.raises(CheckpointError, match="'num-server-rounds'"):  # the noise is calibrated to it
        check_resume_config(dp, {**dp, "num-server-rounds": 30})
    old = {k: v for k, v in cfg.items() if k != "robust-aggregation"}  # a checkpoint older than the key
    defaults = RunConfig().model_dump(by_alias=True)
    check_resume_config(old, cfg, defaults=defaults)
    with pytest.raises(CheckpointError, match="'robust-aggregation'"):
        check_resume_config(old, {**cfg, "robust-aggregation": "on"}, defaults=defaults)


# ------------------------------------------------------------------------------ client state
def test_run_tag_is_hex_only(tmp_path):
    assert client_state_dir(tmp_path, "0123abcd") == tmp_path / "runs" / "0123abcd"
    for bad in ("../../etc", "0123ABCD", "0123abc", "a" * 65, "deadbeef\n", "/0123abcd", 12345678, None):
        with pytest.raises(ValueError, match="run-tag"):
            validate_run_tag(bad)


def test_client_state_files_are_private_atomic_and_pickle_free(tmp_path):
    rec = ClientRecord(
        ClientState(
            {"0.exp_avg": torch.arange(4.0), "0.step": torch.tensor(3.0)},
            {"mu_real": torch.ones(2, dtype=torch.float64)},
        )
    )
    for rnd in range(1, 7):
        write_state_file(tmp_path, 2, rnd, rec.to_bytes())
    folder = tmp_path / "partition-2"
    assert sorted(p.name for p in folder.iterdir()) == [f"round-{r}.state" for r in (3, 4, 5, 6)]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.iterdir())
    rnd, blob = read_latest_state_file(tmp_path, 2, 6)
    back = ClientRecord.from_bytes(blob)
    assert (
        rnd == 5
        and back.secret == rec.secret
        and torch.equal(back.train.score_opt["0.exp_avg"], torch.arange(4.0))
    )
    assert back.train.objective["mu_real"].dtype == torch.float64
    with pytest.raises(StateError):
        ClientRecord.from_bytes(sp._pickle_payload())
    with pytest.raises(ValueError, match="partition"):
        write_state_file(tmp_path, "../x", 1, blob)


# ---------------------------------------------------------------------------- privacy ledger
RUN = "0123abcd"
DATA = ExampleSet.of(np.arange(50))


def test_ledger_is_append_only_and_refuses_replays(tmp_path):
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    for rnd in (1, 2, 5):
        with LedgerSession(ledger, RUN, rnd, DATA).theta_release(2.5):
            pass
    for rnd in (5, 4, 1, 0):
        with pytest.raises(LedgerError, match="already released"), ledger.locked() as led:
            led.record(RUN, rnd, "theta", 2.5, DATA)
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {"ledger": 3}
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    # The state file is gone (rolled back, deleted): the ledger still knows the spend.
    with PrivacyLedger(tmp_path, 9.8, 1e-5).locked() as again:
        assert again.run_multipliers(RUN, DATA) == [2.5] * 3
        assert again.spent(DATA) == pytest.approx(ledger.spent(DATA))


def test_ledger_refuses_damage_and_a_swapped_example_set(tmp_path):
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    with LedgerSession(ledger, RUN, 1, DATA).theta_release(2.5):
        pass
    saved = ledger.folder / "examples" / f"{DATA.digest}.npy"
    original = saved.read_bytes()
    np.save(saved, np.arange(10, dtype=np.uint64))  # fewer examples under the old name: a smaller spend
    with pytest.raises(LedgerError, match="does not match its name"), ledger.locked() as led:
        led.spent(DATA)
    saved.write_bytes(original)
    ledger.path.write_bytes(ledger.path.read_bytes()[:-5])
    with pytest.raises(LedgerError, match="damaged"), ledger.locked():
        pass


def test_an_older_per_partition_ledger_counts_against_every_example(tmp_path):
    old = tmp_path / "privacy" / "0123456789abcdef01234567"
    old.mkdir(parents=True)
    (old / "ledger.jsonl").write_text(
        '{"ledger":2,"key":{}}\n{"run":"aaaa0001","round":1,"kind":"theta","z":2.5}\n'
    )
    with PrivacyLedger(tmp_path, 9.8, 1e-5).locked() as led:
        assert led.spent(ExampleSet.of([7])) == pytest.approx(led.spent(DATA))
        assert led.spent(DATA) > 0


def test_released_statistics_are_released_once_and_then_reused(tmp_path):
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    calls = []

    def release():
        calls.append(1)
        return torch.arange(3.0), torch.ones(3), 5.0

    for rnd, run in ((1, RUN), (2, RUN), (1, "4567cdef")):
        mu, var, eps = LedgerSession(ledger, run, rnd, DATA).statistics({"features": "pixels"}, 1.0, release)
        assert torch.equal(mu, torch.arange(3.0)) and torch.equal(var, torch.ones(3)) and eps == 5.0
    assert len(calls) == 1


def test_security_probe_finds_nothing(tmp_path):
    """The table of docs/security.md, at a small size: no class crashes or is silently accepted."""
    rows = sp.run(per_class=3, seed=1)
    assert {r["class"] for r in rows if r["crashed"] or r["accepted"]} == set()
