"""Clients that need not trust the server: secret mask randomness, the node's privacy ledger and
budget, the node's own config and privacy floor, and error replies under DP (docs/privacy.md)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

import client_app
from prism_flwr.config import RunConfig
from prism_flwr.federated.client_round import client_round, model_with, new_record
from prism_flwr.federated.codec import decode_mask, unpack_mask
from prism_flwr.federated.methods import PRISM
from prism_flwr.federated.seeds import derive_seed
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores, iter_thetas, layout_fingerprint, num_masked, sample_mask
from prism_flwr.node_config import NodeConfig, NodeConfigError
from prism_flwr.privacy import epsilon_of_releases, insecure_test_secret, noise_multiplier_for_budget
from prism_flwr.privacy.ledger import ExampleSet, LedgerError, LedgerSession, PrivacyLedger, example_ids
from prism_flwr.privacy.modes import privacy_for
from tools.security_probe import message

TINY = {"ngf": 4, "local-steps": 1, "batch-size": 8, "uplink-coding": "raw", "device": "cpu"}
DATA = ExampleSet.of(np.arange(100))  # one client's examples, by content hash


def _data(n: int = 16) -> tuple[torch.Tensor, list[int]]:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, [n] + [0] * 9


def _global(cfg: RunConfig) -> np.ndarray:
    return PRISM.downlink(cfg).settle(get_scores(ResnetGenerator(generator_spec(cfg))).numpy())


def _upload(cfg: RunConfig, record=None, pid: int = 0, rnd: int = 1) -> tuple[np.ndarray, list[torch.Tensor]]:
    """One client round; the uploaded mask as booleans and the theta it was sampled from."""
    data, hist = _data()
    vector = _global(cfg)
    res = client_round(
        cfg, PRISM, vector, data, hist, record or new_record(cfg), partition_id=pid, server_round=rnd
    )
    model = model_with(cfg, PRISM, vector, data.device)  # the cached network: still holds this round's theta
    thetas = [t.clone() for t in iter_thetas(model)]
    n = num_masked(model)
    bits = decode_mask(res.payload.tobytes(), n, layout_fingerprint(model))
    return unpack_mask(bits, n), thetas


# ------------------------------------------------------------------------------ secret masks
def test_server_cannot_predict_the_uploaded_mask_from_the_run_seed() -> None:
    """The server knows (seed, round, partition) and even the exact theta: sampling with the seed
    it can derive agrees with the upload only as two independent draws do, not 100 %."""
    cfg = RunConfig.parse({**TINY, "seed": 7})
    upload, thetas = _upload(cfg)
    server = sample_mask(None, thetas, torch.Generator().manual_seed(derive_seed(cfg.seed, 1, 0, 5))).numpy()
    theta = torch.cat([t.flatten() for t in thetas]).double().numpy()
    agree = float((server == upload).mean())
    independent = float((theta**2 + (1 - theta) ** 2).mean())
    spread = float(np.sqrt(independent * (1 - independent) / theta.size))
    assert independent < 0.9 and abs(agree - independent) < 6 * spread, (agree, independent)


def test_two_fresh_clients_upload_different_masks_and_a_test_secret_reproduces_one() -> None:
    cfg = RunConfig.parse(TINY)
    a, _ = _upload(cfg)
    b, _ = _upload(cfg)
    assert (a != b).mean() > 0.05
    secret = insecure_test_secret(3, 0)
    c, _ = _upload(cfg, new_record(cfg, secret))
    d, _ = _upload(cfg, new_record(cfg, secret))
    assert np.array_equal(c, d)


def test_secret_is_kept_in_the_client_state_and_never_in_the_reply() -> None:
    cfg = RunConfig.parse(TINY)
    record = new_record(cfg)
    data, hist = _data()
    res = client_round(cfg, PRISM, _global(cfg), data, hist, record, partition_id=0, server_round=1)
    assert res.record.secret == record.secret and record.secret.bit_length() > 32
    secret_bytes = record.secret.to_bytes(8, "little")
    assert secret_bytes not in res.payload.tobytes()
    assert all(isinstance(v, (int, float, list)) and v != record.secret for v in res.metrics.values())


# ------------------------------------------------------------------------------ node ledger
def _release(ledger: PrivacyLedger, run: str, rnd: int, z: float, hold: float = 0.0, data=DATA) -> bool:
    try:
        with LedgerSession(ledger, run, rnd, data).theta_release(z):
            time.sleep(hold)
        return True
    except LedgerError:
        return False


def test_runs_with_other_tags_seeds_or_rounds_cannot_spend_past_the_node_budget(tmp_path: Path) -> None:
    """Three runs (their own tags, run budgets 5, 5 and 9.8 over 3, 2 and 4 rounds): all their
    releases compose against the node's 9.8 and the third run is stopped part-way; the refusal says so."""
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    done = {}
    for run, eps, rounds in (("aaaa0001", 5.0, 3), ("bbbb0002", 5.0, 2), ("cccc0003", 9.8, 4)):
        z = noise_multiplier_for_budget(eps, 1e-5, rounds)
        done[run] = sum(_release(ledger, run, r, z) for r in range(1, rounds + 1))
    assert done["aaaa0001"] == 3 and done["bbbb0002"] == 2 and 0 < done["cccc0003"] < 4, done
    with ledger.locked() as led:
        assert 5.0 < led.spent(DATA) <= 9.8 * (1 + 1e-9)
        assert len(led.entries) == sum(done.values())
        with pytest.raises(LedgerError, match="node privacy budget.*dp-budget"):
            led.check("dddd0004", 1, noise_multiplier_for_budget(9.8, 1e-5, 4), DATA)
    # a fresh ledger object (a new process) sees the same spend: the file is the truth
    with PrivacyLedger(tmp_path, 9.8, 1e-5).locked() as again:
        assert again.spent(DATA) == pytest.approx(ledger.spent(DATA))


def test_one_ledger_per_node_whatever_the_run_seed_or_partition(tmp_path: Path) -> None:
    paths = set()
    for tag, seed, rounds in (("aaaa0001", 1, 3), ("bbbb0002", 2, 50)):
        cfg = RunConfig.parse({"dp": "theta", "seed": seed, "num-server-rounds": rounds})
        paths.add(privacy_for(cfg).session(tmp_path, 9.8, 1e-5, tag, 1, _data()[0]).ledger.path)
    assert paths == {tmp_path / "privacy" / "ledger.jsonl"}


def test_overlapping_partitions_compose_per_example_and_stop_at_the_budget(tmp_path: Path) -> None:
    """Two runs whose partitions (other seeds, other partitioning) share 500 of 1,000 examples: the
    shared ones carry both releases, and the second release is refused once it would take them past
    the node's budget; a release from examples nobody touched still goes."""
    ledger, z = PrivacyLedger(tmp_path, 9.8, 1e-5), noise_multiplier_for_budget(7.5, 1e-5, 1)
    first, second, fresh = (ExampleSet.of(np.arange(a, a + 1000)) for a in (0, 500, 5000))
    assert epsilon_of_releases([z, z], 1e-5) > 9.8  # the attack would spend past the budget
    assert _release(ledger, "aaaa0001", 1, z, data=first)
    assert not _release(ledger, "bbbb0002", 1, z, data=second)
    assert _release(ledger, "cccc0003", 1, z, data=fresh)
    with ledger.locked() as led:
        assert led.spent(second) == pytest.approx(led.spent(first))  # the shared half carries run 1
        assert led.spent(ExampleSet.of(np.arange(1000, 1500))) == 0.0


def test_example_ids_name_images_by_content() -> None:
    images, _ = _data(8)
    again = images.flip(0)  # the same images in another order, as another partitioning hands them
    assert example_ids(images).digest == example_ids(again).digest
    assert len(example_ids(images).ids) == 8
    assert example_ids(images[:4]).digest != example_ids(images).digest


def _worker(args) -> bool:
    folder, run, rnd, z = args
    return _release(PrivacyLedger(folder, 9.8, 1e-5), run, rnd, z, hold=0.3)


def test_concurrent_processes_for_one_partition_are_safe(tmp_path: Path) -> None:
    """Four processes release round 1 of one run at once: exactly one goes, the ledger stays valid;
    then four runs race for a budget that fits fewer releases: exactly as many as fit go."""
    z = noise_multiplier_for_budget(5.0, 1e-5, 1)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        same_round = pool.map(_worker, [(tmp_path / "a", "aaaa0001", 1, z)] * 4)
        runs = pool.map(_worker, [(tmp_path / "b", f"{i:08x}", 1, z) for i in range(4)])
    assert sum(same_round) == 1
    fit = max(k for k in range(5) if epsilon_of_releases([z] * k, 1e-5) <= 9.8)
    assert 0 < fit < 4 and sum(runs) == fit
    for folder, count in (("a", 1), ("b", fit)):
        with PrivacyLedger(tmp_path / folder, 9.8, 1e-5).locked() as led:
            assert len(led.entries) == count


def test_a_damaged_ledger_refuses_and_is_never_rewritten(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    assert _release(ledger, "aaaa0001", 1, 10.0)
    ledger.path.write_bytes(ledger.path.read_bytes()[:-4])
    damaged = ledger.path.read_bytes()
    assert not _release(ledger, "aaaa0001", 2, 10.0)
    with pytest.raises(LedgerError, match="damaged"):
        LedgerSession(ledger, "aaaa0001", 2, DATA).precheck(10.0)
    assert ledger.path.read_bytes() == damaged


def test_statistics_are_kept_in_the_ledger_and_reused_after_a_lost_state(tmp_path: Path) -> None:
    cfg = RunConfig.parse({**TINY, "dp": "statistics", "objective": "feature-matching", "dp-epsilon": 6.0})
    ledger = PrivacyLedger(tmp_path, 9.8, 1e-5)
    data, hist = _data()
    first = client_round(
        cfg,
        PRISM,
        _global(cfg),
        data,
        hist,
        new_record(cfg),
        partition_id=0,
        server_round=1,
        ledger=LedgerSession(ledger, "aaaa0001", 1, example_ids(data)),
    )
    # state lost (new record), and a new run: the same statistics come back, nothing is spent again
    again = client_round(
        cfg,
        PRISM,
        _global(cfg),
        data,
        hist,
        new_record(cfg),
        partition_id=0,
        server_round=1,
        ledger=LedgerSession(ledger, "bbbb0002", 1, example_ids(data)),
    )
    for k in ("mu_real", "var_real"):
        assert torch.equal(first.record.train.objective[k], again.record.train.objective[k])
    with ledger.locked() as led:
        assert [e["kind"] for e in led.entries] == ["statistics"]
        assert led.spent(example_ids(data)) == pytest.approx(6.0, rel=1e-4)
    assert again.metrics["dp_epsilon"] == pytest.approx(6.0, rel=1e-4)
    # other parameters are a new release, refused once it would pass the node's budget
    cfg9 = RunConfig.parse({**TINY, "dp": "statistics", "objective": "feature-matching", "dp-epsilon": 9.0})
    with pytest.raises(LedgerError, match="node privacy budget"):
        client_round(
            cfg9,
            PRISM,
            _global(cfg9),
            data,
            hist,
            new_record(cfg9),
            partition_id=0,
            server_round=1,
            ledger=LedgerSession(ledger, "cccc0003", 1, example_ids(data)),
        )


# ------------------------------------------------------------------------------ node config
def test_node_config_parses_environment_defaults_and_one_line_per_bad_key() -> None:
    env = {"PRISM_NODE_CONFIG": "data-dir='/d x' min-dp='theta' dp-budget=3"}
    node = NodeConfig.parse({"partition-id": 1, "num-partitions": 2, "dp-budget": 4.0}, environ=env)
    assert (node.data_dir, node.min_dp, node.dp_budget, node.run_epsilon_cap) == ("/d x", "theta", 4.0, 4.0)
    with pytest.raises(NodeConfigError) as err:
        NodeConfig.parse(
            {"partition-id": 0, "num-partitions": 2, "min-dp": "max", "output-dir": "/x"}, environ={}
        )
    lines = str(err.value).split("; ")
    assert len(lines) == 2 and "'min-dp' = 'max'" in lines[0] and "'output-dir' is unknown" in lines[1]
    with pytest.raises(NodeConfigError, match="partition-id 2 must be below num-partitions 2"):
        NodeConfig.parse({"partition-id": 2, "num-partitions": 2}, environ={})
    with pytest.raises(NodeConfigError, match="not key=value"):
        NodeConfig.parse({"partition-id": 0, "num-partitions": 1}, environ={"PRISM_NODE_CONFIG": "nonsense"})


@pytest.mark.parametrize(
    "floor,run,refused",
    [
        ({"min-dp": "theta"}, {"dp": "off"}, "weaker than this node's floor min-dp='theta'"),
        ({"min-dp": "theta"}, {"dp": "statistics", "objective": "feature-matching"}, "weaker"),
        ({"min-dp": "statistics"}, {"dp": "theta"}, None),
        ({"max-dp-epsilon": 2.0}, {"dp": "theta", "dp-epsilon": 3.0}, "max-dp-epsilon=2"),
        ({"dp-budget": 1.0}, {"dp": "theta"}, "max-dp-epsilon=1"),  # the budget caps a run by default
        ({}, {"dp": "theta", "dp-delta": 1e-3}, "max-dp-delta"),
        ({}, {"dp": "theta"}, None),
    ],
)
def test_privacy_floor(floor: dict, run: dict, refused: str | None) -> None:
    node = NodeConfig.parse({"partition-id": 0, "num-partitions": 1, **floor}, environ={})
    cfg = RunConfig.parse(run)
    why = node.refusal(privacy_for(cfg), cfg.dp_epsilon, cfg.dp_delta)
    assert why is None if refused is None else refused in why


# ------------------------------------------------------------------------------ the ClientApp
@pytest.fixture
def call_train(task_identity, monkeypatch, tmp_path):
    """``client_app.train`` on a real Message, with this node's data replaced by 16 random images."""
    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)

    def call(run: dict, node: dict, n_images: int = 16, tag: str = "aaaa0001", rnd: int = 1, images=None):
        data = _data(n_images) if images is None else (images, [len(images)] + [0] * 9)
        monkeypatch.setattr(client_app, "client_data", lambda cfg, pid, num, device: data)
        cfg = RunConfig.parse({**TINY, **run})
        sent = Array(PRISM.downlink(cfg).encode(_global(cfg)))
        content = RecordDict(
            {
                "config": ConfigRecord({"server-round": rnd, "run-tag": tag}),
                PRISM.down_key: ArrayRecord({PRISM.down_key: sent}),
            }
        )
        node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"), **node}
        context = Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={**TINY, **run}
        )
        return client_app.train(message(0, content), context)

    return call


def test_a_run_below_the_floor_is_refused_with_one_clear_error(call_train) -> None:
    with pytest.raises(client_app.Refusal, match="^node refuses the run: dp='off' is weaker"):
        call_train({}, {"min-dp": "theta"})
    with pytest.raises(client_app.Refusal, match="node-config key 'colour' is unknown"):
        call_train({}, {"colour": "red"})


def test_client_state_goes_under_the_nodes_state_dir(call_train, tmp_path: Path) -> None:
    reply = call_train({"output-dir": str(tmp_path / "server-chosen")}, {})
    assert reply.content is not None and not (tmp_path / "server-chosen").exists()
    assert list((tmp_path / "node" / "runs" / "aaaa0001" / "partition-0").glob("round-1.state"))


def test_under_dp_an_error_reply_carries_a_fixed_code_not_data(call_train, caplog) -> None:
    with pytest.raises(ValueError, match="fewer than 2 images"):
        call_train({}, {}, n_images=1)  # without DP the operator gets the reason
    with pytest.raises(RuntimeError) as err:
        call_train({"dp": "theta"}, {}, n_images=1)
    assert str(err.value) == client_app.DP_FAILURE and "image" not in str(err.value)
    assert any("fewer than 2 images" in (r.exc_text or "") for r in caplog.records)  # kept in the node's log


def _payload(reply) -> bytes:
    return reply.content[PRISM.up_key][PRISM.up_key].numpy().tobytes()


def test_the_clientapp_refuses_a_release_past_the_node_budget(call_train, tmp_path: Path) -> None:
    run = {"dp": "theta", "dp-epsilon": 5.0, "num-server-rounds": 1}
    first = call_train(run, {}, tag="aaaa0001")
    with pytest.raises(LedgerError, match="node privacy budget spent.*state-dir"):
        call_train(run, {"dp-budget": 6.0}, tag="bbbb0002")  # a new run tag opens no fresh budget
    again = call_train(run, {}, tag="aaaa0001")  # the same round of the same run: the same answer
    assert _payload(again) == _payload(first)
    lines = (tmp_path / "node" / "privacy" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["run"] == "aaaa0001"  # head line + one release


def test_the_clientapp_charges_every_example_a_release_touched(call_train) -> None:
    """Two runs whose partitions share half their images (the server chose other seeds and another
    partition id for this node's data): the second release would take the shared images past the
    node's budget and is refused."""
    images = _data(24)[0]
    run = {"dp": "theta", "dp-epsilon": 7.5, "num-server-rounds": 1}
    call_train(run, {}, tag="aaaa0001", images=images[:16])
    with pytest.raises(LedgerError, match="node privacy budget spent"):
        call_train(run, {"partition-id": 1}, tag="bbbb0002", images=images[8:])
    call_train(run, {}, tag="cccc0003", images=_data(40)[0][24:])  # images no release touched


def test_a_round_is_answered_once(call_train) -> None:
    """The same round again gets the answer already given (never a second draw); an earlier round is
    refused; under secure aggregation a repeat is refused (two masked sums would give a mask away)."""
    first = call_train({}, {}, rnd=2)
    assert _payload(call_train({}, {}, rnd=2)) == _payload(first)
    with pytest.raises(client_app.Refusal, match="answered round 2 of this run"):
        call_train({}, {}, rnd=1)
    try:  # the first secure round may fail later for want of protocol state; its answer is kept
        call_train({"secure-aggregation": "secagg+"}, {}, tag="bbbb0002")
    except Exception:  # noqa: BLE001
        pass
    with pytest.raises(client_app.Refusal, match="answered it already"):
        call_train({"secure-aggregation": "secagg+"}, {}, tag="bbbb0002")


def test_a_state_kept_under_one_privacy_mode_is_never_used_under_another(call_train) -> None:
    fm = {"objective": "feature-matching", "num-server-rounds": 2}
    call_train({**fm, "dp": "theta"}, {}, rnd=1)  # its state holds the raw feature moments
    with pytest.raises(client_app.PrivacyModeError, match="dp=theta .* now asks for dp=statistics"):
        call_train({**fm, "dp": "statistics"}, {}, rnd=2)
