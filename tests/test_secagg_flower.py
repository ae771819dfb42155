"""Secure aggregation wired into the apps: run config, the SecAgg+ strategy on Flower messages,
the in-process runner, and `flwr run`.

The strategy tests drive ``SecAggMADA`` through ``tools.secagg_loopback`` (real Flower messages,
the ClientApp's secagg steps in this process): the new scores must equal MADA's on the same
masks sent in the clear, whoever drops out, and a forged or replayed masked reply is refused
without ending the round. The Flower tests run the real apps at tiny size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from prism_flwr.config import ConfigError, RunConfig
from prism_flwr.federated.aggregation import aggregate, count_ones
from prism_flwr.federated.broadcast import DOWNLINK_KEY, DOWNLINKS, digest
from prism_flwr.federated.records import SCORES_KEY
from prism_flwr.federated.secure_sum import secagg_parameters
from prism_flwr.secagg.records import MASKED_KEY, SECAGG_KEY, SHARE, UNMASK
from prism_flwr.secagg.round import check_params, new_round
from strategies.secagg import SecAggMADA
from tools import procs
from tools.secagg_loopback import LoopbackClient, LoopbackGrid, forged

N = 61
LAYOUT = b"L" * 8
SCORES = np.linspace(-2, 2, N).astype(np.float32)
SEED = 5


# ------------------------------------------------------------------------------ run config
def test_secure_aggregation_is_off_by_default_and_refused_with_robust_or_dense() -> None:
    assert RunConfig().secure_aggregation == "off"
    assert RunConfig.parse({"secure-aggregation": "secagg+"}).secure_aggregation == "secagg+"
    for other, value in (("robust-aggregation", "on"), ("method", "dense")):
        with pytest.raises(ConfigError) as err:
            RunConfig.parse({"secure-aggregation": "secagg+", other: value})
        assert "secure-aggregation" in str(err.value) and other in str(err.value)
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig.parse({"secure-aggregation": "secagg"})


@pytest.mark.parametrize("clients", [2, 3, 4, 7, 10, 11, 16, 33, 100])
def test_default_parameters_are_valid_and_complete_up_to_ten(clients: int) -> None:
    threshold, degree = secagg_parameters(clients)
    check_params(new_round(range(1, clients + 1), threshold, degree, 8))  # raises if unsafe or impossible
    assert threshold == degree // 2 + 1
    assert (degree == clients - 1) == (clients <= 10)


# ------------------------------------------------------------------------------ strategy
def _mask(node: int, rnd: int) -> np.ndarray:
    return (np.random.default_rng([node, rnd]).random(N) < 0.4).astype(np.uint8)


def _expected(nodes, rnd: int) -> np.ndarray:
    counts, k = count_ones((np.packbits(_mask(u, rnd), bitorder="little") for u in nodes), N)
    return aggregate(SCORES, counts, k, method="mada", rng=np.random.default_rng([SEED, rnd])).scores


def _round(nodes=(11, 12, 13, 14), rnd=1, tamper=None, min_train_nodes=2, strategy=None, configs=None):
    clients = {
        u: LoopbackClient(
            u, lambda msg, u=u: (_mask(u, rnd), {"num-examples": 10, "loss": 0.5}), (configs or {}).get(u)
        )
        for u in nodes
    }
    grid = LoopbackGrid(clients, tamper)
    s = strategy or SecAggMADA(
        num_weights=N,
        layout=LAYOUT,
        rule="mada",
        seed=SEED,
        phase_timeout=60.0,
        min_train_nodes=min_train_nodes,
        min_available_nodes=len(nodes),
    )
    arrays = ArrayRecord({SCORES_KEY: Array(SCORES)})
    messages = list(s.configure_train(rnd, arrays, ConfigRecord(), grid))
    out, _ = s.aggregate_train(rnd, grid.send_and_receive(messages))
    return s, out, s.round_records[rnd], messages


@pytest.mark.usefixtures("task_identity")
def test_counts_through_flower_messages_equal_the_clear_masks() -> None:
    s, out, rec, messages = _round()
    np.testing.assert_array_equal(out[SCORES_KEY].numpy(), _expected([11, 12, 13, 14], 1))
    assert rec["clients"] == 4 and not rec["skipped"] and rec["secagg"]["dropped"] == []
    assert rec["secagg"]["bits"] == 3
    assert rec["uplink_bits_per_weight"] == pytest.approx(8 * ((3 * N + 7) // 8) / N)  # b bits per weight
    assert all(MASKED_KEY not in m.content and SECAGG_KEY in m.content for m in messages)
    # the setup and unmask messages are in the wire counts, both ways, per client
    sec = rec["secagg"]
    assert sec["uplink_wire_bytes"] > 4 * (64 + 3 * 92) and sec["downlink_wire_bytes"] > 4 * 3 * (64 + 92)
    assert rec["wire_bytes_per_client"]["up"] == pytest.approx(rec["uplink_wire_bytes"] / 4)
    assert rec["uplink_wire_bytes"] > sec["uplink_wire_bytes"] + rec["uplink_bytes"]


@pytest.mark.usefixtures("task_identity")
def test_a_signed_round_with_floors_gives_the_same_counts(tmp_path: Path, monkeypatch) -> None:
    """Nodes with signing keys, the roster and floors: signed adverts, a consistency round
    (``query.secagg_confirm``) before unmasking, and the scores of the masks in the clear."""
    from prism_flwr.secagg.identity import write_federation

    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)
    nodes = (11, 12, 13, 14, 15)
    _, roster = write_federation(tmp_path, len(nodes))
    configs = {
        u: {
            "partition-id": i,
            "num-partitions": len(nodes),
            "secagg-key": str(tmp_path / "node-{partition-id}.key"),
            "secagg-roster": str(roster),
            "require-secure-aggregation": True,
            "min-secure-aggregation-clients": 3,
        }
        for i, u in enumerate(nodes)
    }
    _, out, rec, _ = _round(nodes, tamper=_fail("query.secagg_confirm", 13), configs=configs)
    np.testing.assert_array_equal(out[SCORES_KEY].numpy(), _expected(nodes, 1))  # 13 masked, then went silent
    assert rec["secagg"]["signed"] and rec["secagg_contributors"] == 5, rec
    assert rec["secagg"]["dropped"] == ["confirm: node 13: no reply"], rec


@pytest.mark.usefixtures("task_identity")
def test_secagg_with_a_delta_downlink_applies_every_round() -> None:
    """``downlink = "delta"``: the masked reply names the global its node rebuilt, so every
    round applies (it used to skip: the reply lacked the record) and each node holds the global."""
    delta = DOWNLINKS["delta"]
    nodes = (11, 12, 13, 14)
    clients = {
        u: LoopbackClient(u, lambda msg, u=u: (_mask(u, 1), {"num-examples": 10, "loss": 0.5})) for u in nodes
    }
    grid = LoopbackGrid(clients)
    s = SecAggMADA(num_weights=N, layout=LAYOUT, rule="mada", seed=SEED, phase_timeout=60.0, downlink=delta)
    scores = delta.settle(SCORES)
    for rnd in (1, 2):
        messages = list(
            s.configure_train(rnd, ArrayRecord({SCORES_KEY: Array(scores)}), ConfigRecord(), grid)
        )
        sent = {m.content[DOWNLINK_KEY]["digest"] for m in messages}
        out, _ = s.aggregate_train(rnd, grid.send_and_receive(messages))
        rec = s.round_records[rnd]
        assert out is not None and not rec["skipped"] and rec["secagg_contributors"] == 4, rec
        assert rec["dropped"] == [] and {digest(c.held) for c in clients.values()} == sent
        if rnd == 1:
            counts, k = count_ones((np.packbits(_mask(u, 1), bitorder="little") for u in nodes), N)
            clear = aggregate(scores, counts, k, method="mada", rng=np.random.default_rng([SEED, 1]))
            expected = delta.settle(clear.scores, np.random.default_rng([SEED, 1, 8]))
            np.testing.assert_array_equal(out[SCORES_KEY].numpy(), expected)
        scores = out[SCORES_KEY].numpy()


def _fail(kind: str, node: int):
    def tamper(msg: Message, reply: Message):
        if msg.metadata.message_type == kind and msg.metadata.dst_node_id == node:
            return []  # silent
        return reply

    return tamper


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["query.secagg_advertise", SHARE, "train", UNMASK])
def test_a_dropout_at_any_phase_still_gives_exact_counts(kind: str) -> None:
    s, out, rec, _ = _round(nodes=(11, 12, 13, 14, 15), tamper=_fail(kind, 13))
    contributors = [11, 12, 14, 15] if kind != UNMASK else [11, 12, 13, 14, 15]
    np.testing.assert_array_equal(out[SCORES_KEY].numpy(), _expected(contributors, 1))
    assert any("node 13: no reply" in d for d in rec["secagg"]["dropped"]) or kind == "train"
    assert rec["secagg_contributors"] == len(contributors)


@pytest.mark.usefixtures("task_identity")
def test_an_error_in_the_share_step_is_a_dropout() -> None:
    def tamper(msg, reply):
        if msg.metadata.message_type == SHARE and msg.metadata.dst_node_id == 12:
            from tools.secagg_loopback import reply_to

            return reply_to(msg, error="RuntimeError: fails on purpose")
        return reply

    _, out, rec, _ = _round(tamper=tamper)
    np.testing.assert_array_equal(out[SCORES_KEY].numpy(), _expected([11, 13, 14], 1))
    assert any("share: node 12" in d and "fails on purpose" in d for d in rec["secagg"]["dropped"])


@pytest.mark.usefixtures("task_identity")
def test_too_many_dropouts_skip_the_round_cleanly() -> None:
    def tamper(msg, reply):
        return [] if msg.metadata.message_type == SHARE and msg.metadata.dst_node_id != 11 else reply

    s, out, rec, messages = _round(tamper=tamper)
    assert out is None and rec["skipped"] and "round skipped" in rec["skip_reason"] and messages == []

    # unmask phase: only one survivor helps, the threshold is 2
    def silent_unmask(msg, reply):
        return [] if msg.metadata.message_type == UNMASK and msg.metadata.dst_node_id != 11 else reply

    s, out, rec, _ = _round(tamper=silent_unmask)
    assert out is None and rec["skipped"] and "round skipped" in rec["skip_reason"]


@pytest.mark.usefixtures("task_identity")
def test_forged_and_replayed_masked_replies_are_refused_not_fatal() -> None:
    kept = {}

    def keep(msg, reply):
        if msg.metadata.message_type == "train" and not reply.has_error():
            kept[msg.metadata.dst_node_id] = reply
        return reply

    nodes = (11, 12, 13, 14, 15, 16)  # t = 3: four survivors hold 3 shares of each other's seeds
    s, _, _, _ = _round(nodes, tamper=keep)

    def attack(msg, reply):
        if msg.metadata.message_type != "train":
            return reply
        node = msg.metadata.dst_node_id
        if node == 12:  # replays its masked reply of round 1
            return kept[12]
        if node == 13:  # claims to be node 14 in its node field
            return forged(reply, node=(14).to_bytes(8, "big"))
        return reply

    s, out, rec, _ = _round(nodes, rnd=2, tamper=attack, strategy=s)
    reasons = " ".join(rec["dropped"])
    assert "another round" in reasons and "is not the sender" in reasons, rec["dropped"]
    assert rec["secagg_contributors"] == 4 and not rec["skipped"]
    np.testing.assert_array_equal(out[SCORES_KEY].numpy(), _expected([11, 14, 15, 16], 2))


# ------------------------------------------------------------------------------ flwr run
def _flower_config(out: Path, data_dir: Path, **extra) -> tuple[dict, str]:
    from tests.support.simulation import TINY

    keys = dict(item.split("=") for item in TINY.split())
    keys.update(
        {
            "num-server-rounds": "2",
            "eval-every": "2",
            "fraction-evaluate": "0.0",
            "aggregation": "'mada-change'",
            "secure-aggregation": "'secagg+'",
            **extra,
        }
    )
    return keys, " ".join(f"{k}={v}" for k, v in keys.items()) + f" output-dir='{out}' data-dir='{data_dir}'"


def _signed_nodes(tmp_path: Path, count: int) -> str:
    """Node config for ``count`` nodes: signing keys and roster (``prism-flwr secagg-keys``), one
    key file per partition through the template, and the floors."""
    from prism_flwr.cli import main

    assert main(["secagg-keys", "--nodes", str(count), "--out", str(tmp_path / "keys")]) == 0
    return (
        f"secagg-key='{tmp_path / 'keys' / 'node-{partition-id}.key'}' "
        f"secagg-roster='{tmp_path / 'keys' / 'roster.json'}' "
        "require-secure-aggregation=true min-secure-aggregation-clients=2"
    )


def _inprocess_rounds(keys: dict, data_dir: Path, tmp_path: Path, nodes: int) -> list[dict]:
    """The in-process runner's rounds for the run config ``keys`` on ``nodes`` nodes (test seed 5)."""
    from prism_flwr.federated import inprocess

    parsed = {k: json.loads(v.replace("'", '"')) for k, v in keys.items()}
    cfg = RunConfig.parse({**parsed, "data-dir": str(data_dir), "output-dir": str(tmp_path / "unused")})
    rounds = inprocess.run(cfg, nodes, insecure_test_mask_seed=5)[1:]
    assert len(rounds) == cfg.num_server_rounds
    return rounds


def _same_as_inprocess(flower: list[dict], local: list[dict], nodes: int) -> None:
    """Every round of a Flower run is applied, signed, and equals the in-process runner's."""
    assert len(flower) == len(local)
    for f, loc in zip(flower, local):
        assert f["secagg_contributors"] == nodes and not f["skipped"] and f["secagg"]["signed"], f
        for key in ("loss", "mada_lambda", "lambda_no_change", "theta_change_sq", "uplink_bytes"):
            assert f[key] == pytest.approx(loc[key], rel=1e-6, abs=1e-9), (key, f, loc)
        assert f["wire_bytes_per_client"]["up"] > f["uplink_bytes"] / nodes


@pytest.fixture(scope="module")
def secagg_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The two simulation runs below, started together by the first test that reads one, each on a
    SuperLink of its own; each test waits for its own: name -> (Simulation, its `flwr run` process,
    output folder, run config). "signed": 3 signed nodes with floors (one PRISM_NODE_CONFIG, the key
    file per partition), delta downlink; "dropout": 4 clients (t = 2), one raising in the share step."""
    from tests.support.fault_client_app import fault_app_dir
    from tests.support.simulation import Simulation

    root = tmp_path_factory.mktemp("secagg-sim")
    one_round = {"num-server-rounds": "1", "eval-every": "1"}
    keys = {
        "signed": _flower_config(root / "signed" / "out", data_dir, downlink="'delta'"),
        "dropout": _flower_config(root / "dropout" / "out", data_dir, **one_round),
    }
    with procs.Processes() as ps:
        signed = dict(test_mask_seed=5, node_config=_signed_nodes(root / "signed", 3))
        dropout = dict(extra_env={"PRISM_FAULT_INJECTION": "secagg-share=1"}, app=fault_app_dir(root / "app"))
        sims = {"signed": (signed, 3), "dropout": (dropout, 4)}
        runs = {}
        for name, (options, nodes) in sims.items():
            sim = Simulation(root / name, ps, data_dir=data_dir, **options)
            runs[name] = (sim, sim.start_run(keys[name][1], nodes), root / name / "out", keys[name][0])
        yield runs
    procs.assert_gone(ps.pids)


def test_flwr_run_with_secagg_matches_the_inprocess_runner(
    secagg_runs: dict, data_dir: Path, tmp_path: Path
) -> None:
    """Simulation, 3 signed nodes with floors (one PRISM_NODE_CONFIG, the key file per partition),
    delta downlink: both rounds apply and equal the in-process runner's."""
    from tests.test_inprocess import _history

    sim, run, out, keys = secagg_runs["signed"]
    local = _inprocess_rounds(keys, data_dir, tmp_path, 3)  # while Flower runs
    assert sim.wait(run)["status"] == "finished:completed", sim.logs_tail()
    flower = [r for r in _history(out) if r["round"] >= 1]
    assert all(f["secagg"]["bits"] == 2 for f in flower), flower
    _same_as_inprocess(flower, local, 3)


def test_flwr_run_with_secagg_survives_a_dropout_in_the_share_step(secagg_runs: dict) -> None:
    """Four clients (t = 2), one raising in the share step: the round sums the other three (the
    strategy tests above check the sum is exact) and the run completes."""
    sim, run, out, _ = secagg_runs["dropout"]
    assert sim.wait(run)["status"] == "finished:completed", sim.logs_tail()
    (rec,) = [r for r in json.loads((out / "latest" / "history.json").read_text()) if r["round"] >= 1]
    assert not rec["skipped"] and rec["secagg_contributors"] == 3 and rec["clients"] == 3, rec
    assert rec["asked"] == 4 and rec["dropped"] == [], rec
    assert any(d.startswith("share: node") and "fails on purpose" in d for d in rec["secagg"]["dropped"]), rec


def test_deployment_with_signed_secagg_matches_the_inprocess_runner(data_dir: Path, tmp_path: Path) -> None:
    """The deployment engine on loopback: a SuperLink and 3 SuperNodes, each with its own key
    file, the roster and the floors in ``--node-config``; one round equals the in-process runner's."""
    from tests.test_inprocess import _history
    from tools import flowerkit as fk

    home, out, logs = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    # one torch thread per node, as the in-process runner trains: the bf16 and NHWC kernels sum in
    # another order with another thread count
    env = {**fk.flower_env(home), "PRISM_INSECURE_TEST_MASK_SEED": "5", "OMP_NUM_THREADS": "1"}
    env.pop("PRISM_NODE_CONFIG", None)
    link_port, node_ports = procs.free_port(), procs.free_ports(3)
    fk.write_connection(home, "loopback", f"127.0.0.1:{link_port}", insecure=True)
    keys, config = _flower_config(out, data_dir, **{"num-server-rounds": "1", "eval-every": "1"})
    signed = _signed_nodes(tmp_path, 3)
    with procs.Processes() as ps:
        link = fk.start_superlink(ps, link_port, env, logs / "superlink.log")
        # `prism-flwr supernode`: Flower's, one ClientApp process per message (the secrets cross
        # processes in context.state), its 3 s idle wait capped (a round has five message phases)
        nodes = [
            fk.start_supernode(
                ps,
                f"127.0.0.1:{link_port}",
                port,
                env,
                logs / f"supernode-{i}.log",
                node_config=f"partition-id={i} num-partitions=3 data-dir='{data_dir}' "
                f"state-dir='{tmp_path / 'state'}' " + signed.replace("{partition-id}", str(i)),
                idle_poll=0.2,
            )
            for i, port in enumerate(node_ports)
        ]
        procs.wait_for(
            lambda: len(fk.online_nodes(env, "loopback")) == 3,
            timeout=90,
            desc="3 SuperNodes",
            procs=[link, *nodes],
        )
        run = ps.start(
            [fk.exe("flwr"), "run", str(fk.REPO)] + ["loopback", "--stream", "--run-config", config],
            env=env,
            log_path=logs / "flwr-run.log",
            cwd=home,
        )
        local = _inprocess_rounds(keys, data_dir, tmp_path, 3)  # while the deployment runs
        run.wait(timeout=400)
        status = fk.newest_run(env, "loopback")["status"]
        tails = "\n".join(procs.tail(p, 20) for p in sorted(logs.iterdir()))
        assert status == "finished:completed", f"{status}\n{tails}"
    procs.assert_gone(ps.pids)
    _same_as_inprocess([r for r in _history(out) if r["round"] >= 1], local, 3)
