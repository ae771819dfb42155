"""PRISM ClientApp: unpack Flower records, run one client round, pack the reply.

All the work is framework-free (``prism_flwr/federated/client_round.py``, the same code the in-process
runner and the benchmarks call); this file only moves records:

- ``@app.train``: the global vector (PRISM's float32 scores, or the dense baseline's weights) in;
  ``client_round`` trains locally and builds the upload (PRISM: one mask at 1 bit per weight,
  after the DP mechanism when ``dp = "theta"``; dense: float32 weights); the reply carries it
  and the metrics. The client's state (Adam moments, objective state, privacy accountant, mask
  secret) is kept in ``context.state`` and in a per-round file under the node's ``state-dir`` so a
  resumed server run finds it again.
- The node decides its machine (``NodeConfig``: data-dir, state-dir, download, privacy floor and
  budget); a run asking for less privacy than the node's floor is refused with one clear error.
  Under DP every release goes through the node's ledger, and an error reply carries a fixed code,
  not text derived from the data (details stay in the node's log).
- ``@app.evaluate``: ``client_evaluate`` (pixel MMD^2 of global samples vs this node's images;
  nothing derived from data under DP).
- the global arrives as the run's downlink encodes it (``prism_flwr/federated/broadcast.py``);
  under ``downlink = "delta"`` this node keeps the last global in ``context.state``, rebuilds the
  new one from it and checks its digest, refuses the message (an error reply: the server sends
  the full state next) when it cannot, and names the global it now holds in its reply.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.federated.broadcast import DOWNLINK_KEY, digest, receive
from prism_flwr.federated.client_round import (
    client_evaluate,
    client_round,
    masked_count,
    model_with,
    new_record,
    received_vector,
    release_multiplier,
    statistics_params,
    theta_noise_multiplier,
)
from prism_flwr.federated.client_state import (
    ClientRecord,
    client_state_dir,
    read_latest_state_file,
    write_state_file,
)
from prism_flwr.federated.methods import method_for
from prism_flwr.federated.records import METRICS_KEY
from prism_flwr.federated.secure_sum import own_mask
from prism_flwr.model.build import pick_device
from prism_flwr.model.masked import layout_fingerprint
from prism_flwr.node_config import NodeConfig, NodeConfigError, Refusal
from prism_flwr.privacy import insecure_test_secret
from prism_flwr.privacy.ledger import LedgerError, LedgerSession, PrivacyLedger
from prism_flwr.threads import configure_threads
from strategies.secagg import STATE_KEY as SECAGG_STATE_KEY
from strategies.secagg import client_advertise, client_mask, client_share, client_unmask

app = ClientApp()
log = logging.getLogger("prism.client")
STATE_KEY = "prism-client"
HELD_KEY = "prism-downlink"  # context.state: the last global this node rebuilt (downlink = "delta")
# Testing hook, INSECURE: PRISM_INSECURE_TEST_MASK_SEED=N derives every client's mask secret from N
# (privacy.insecure_test_secret) so a run can be compared bit for bit with the in-process runner.
TEST_SECRET_ENV = "PRISM_INSECURE_TEST_MASK_SEED"
# What the server sees when a client fails under DP: no text derived from the data.
DP_FAILURE = "PRISM-DP-CLIENT-FAILED: the client could not train this round (details in the node's log)"


def _state_dir(node: NodeConfig, msg: Message) -> Path:
    """``<state-dir>/runs/<run-tag>``: the node's folder; the run tag must be hex (no path tricks)."""
    return client_state_dir(node.resolved("state_dir"), msg.content["config"]["run-tag"])


def _fresh_record(cfg: RunConfig, pid: int) -> ClientRecord:
    test_seed = os.environ.get(TEST_SECRET_ENV)
    if test_seed is None:
        return new_record(cfg)
    log.warning("%s is set: client %d's masks are predictable (tests only)", TEST_SECRET_ENV, pid)
    return new_record(cfg, insecure_test_secret(int(test_seed), pid))


def node_for_run(context: Context, cfg: RunConfig) -> NodeConfig:
    """This node's config, checked against the run's privacy request (``Refusal`` below the floor)."""
    try:
        node = NodeConfig.parse(context.node_config)
    except NodeConfigError as err:
        raise Refusal(str(err)) from None
    if (why := node.refusal(cfg.dp, cfg.dp_epsilon, cfg.dp_delta)) is not None:
        raise Refusal(why)
    return node


def open_ledger(node: NodeConfig, cfg: RunConfig, msg: Message, server_round: int) -> LedgerSession:
    """The node's ledger for this data (never keyed by what the server sends), checked for one more
    release."""
    key = {
        "dataset": cfg.dataset,
        "data-dir": str(node.resolved("data_dir")),
        "partition-id": node.partition_id,
        "num-partitions": node.num_partitions,
    }
    ledger = PrivacyLedger(node.resolved("state_dir"), key, node.dp_budget, node.max_dp_delta)
    session = LedgerSession(ledger, str(msg.content["config"]["run-tag"]), server_round)
    session.precheck(cfg.dp, release_multiplier(cfg), statistics_params(cfg))
    return session


def load_client_state(
    msg: Message,
    context: Context,
    cfg: RunConfig,
    node: NodeConfig,
    server_round: int,
    ledger: LedgerSession | None,
) -> ClientRecord:
    """The newest state this client saved before ``server_round`` (memory first, then disk).

    Under DP the run's accountant is always rebuilt from the node's append-only ledger, whatever a
    state file says: losing or rolling back state never hands out a fresh budget."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is not None and rec["round"] < server_round:
        record = ClientRecord.from_bytes(rec["blob"])
    elif (
        saved := read_latest_state_file(_state_dir(node, msg), node.partition_id, server_round)
    ) is not None:
        record = ClientRecord.from_bytes(saved[1])
    else:
        record = _fresh_record(cfg, node.partition_id)
    if ledger is not None and cfg.dp == "theta":
        with ledger.ledger.locked() as led:
            record.accountant = led.accountant(
                ledger.run, theta_noise_multiplier(cfg), cfg.dp_delta, cfg.dp_epsilon
            )
    return record


def save_client_state(
    msg: Message, context: Context, node: NodeConfig, server_round: int, record: ClientRecord
) -> None:
    blob = record.to_bytes()
    context.state[STATE_KEY] = ConfigRecord({"round": server_round, "blob": blob})
    write_state_file(_state_dir(node, msg), node.partition_id, server_round, blob)


def _unpack(msg: Message, context: Context):
    """Run config (data-dir and download replaced by the node's), node config, method, global
    vector and this node's data."""
    cfg = RunConfig.parse(context.run_config)
    node = node_for_run(context, cfg)
    cfg = cfg.model_copy(update={"data_dir": str(node.resolved("data_dir")), "download": node.download})
    method = method_for(cfg)
    device = pick_device(cfg.device)
    configure_threads()  # the CPUs this process was given: 1 in a Ray actor with num-cpus = 1
    vector = _received_global(msg, context, cfg, method, device)
    data, hist = client_data(cfg, node.partition_id, node.num_partitions, device)
    return cfg, node, method, vector, data, hist


def _received_global(msg: Message, context: Context, cfg: RunConfig, method, device) -> np.ndarray:
    """The global state from the message; under a delta downlink rebuilt from the copy kept in
    ``context.state`` (dropped, and the message refused, when the result is not the sender's)."""
    downlink = method.downlink(cfg)
    array = msg.content[method.down_key][method.down_key].numpy()
    if not downlink.uses_base:
        return received_vector(cfg, method, array, device)
    kept = context.state.array_records.get(HELD_KEY)
    held = None if kept is None else kept["global"].numpy()
    try:
        state = receive(
            downlink,
            array,
            masked_count(cfg, method, device),
            msg.content.config_records.get(DOWNLINK_KEY),
            held,
        )
    except ValueError:
        if kept is not None:
            del context.state[HELD_KEY]
        raise
    context.state[HELD_KEY] = ArrayRecord({"global": Array(state)})
    return state


def _held_record(cfg: RunConfig, method, vector: np.ndarray) -> dict:
    """Under a delta downlink, the reply's record naming the global this node now holds."""
    return {DOWNLINK_KEY: ConfigRecord({"held": digest(vector)})} if method.downlink(cfg).uses_base else {}


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except (Refusal, LedgerError):  # about configuration and budget, not the data: said as is
        raise
    except Exception:
        if context.run_config.get("dp", "off") == "off":
            raise
        log.exception("client round failed under DP; the server is told only %r", DP_FAILURE)
        raise RuntimeError(DP_FAILURE) from None


def _train(msg: Message, context: Context) -> Message:
    cfg, node, method, vector, data, hist = _unpack(msg, context)
    pid = node.partition_id
    server_round = int(msg.content["config"]["server-round"])
    # Under DP: refuses a repeated round or a spent budget before any training.
    ledger = open_ledger(node, cfg, msg, server_round) if cfg.dp != "off" else None
    record = load_client_state(msg, context, cfg, node, server_round, ledger)
    result = client_round(
        cfg, method, vector, data, hist, record, partition_id=pid, server_round=server_round, ledger=ledger
    )
    payload = result.payload
    save_client_state(msg, context, node, server_round, result.record)
    log.info("client %d round %d: %d bytes up", pid, server_round, payload.nbytes)
    content = RecordDict(
        {
            method.up_key: ArrayRecord({method.up_key: Array(payload)}),
            METRICS_KEY: MetricRecord(result.metrics),
            **_held_record(cfg, method, vector),
        }
    )
    if cfg.secure_aggregation != "off":  # the mask itself never leaves: its masked sum does
        content = secagg_train_reply(msg, context, cfg, vector, payload, result.metrics)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Pixel MMD^2 between samples of the global model and this node's images."""
    cfg, node, method, vector, data, _ = _unpack(msg, context)
    metrics = client_evaluate(
        cfg,
        method,
        vector,
        data,
        partition_id=node.partition_id,
        server_round=int(msg.content["config"]["server-round"]),
    )
    content = RecordDict({METRICS_KEY: MetricRecord(metrics), **_held_record(cfg, method, vector)})
    return Message(content=content, reply_to=msg)


# ------------------------------------------------------------------ secure aggregation (secagg+)
# The protocol's steps (strategies/secagg.py): keys, shares, the masked vector (end of train),
# unmasking. The secrets between steps stay in context.state; a step that cannot go on raises,
# which makes this node a dropout of the round for the server.
def _kept(context: Context) -> ConfigRecord:
    kept = context.state.config_records.get(SECAGG_STATE_KEY)
    if kept is None:
        raise ValueError("no secure-aggregation state for this round on this node")
    return kept


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    kept, reply = client_advertise(msg.content, msg.metadata.dst_node_id)
    context.state[SECAGG_STATE_KEY] = kept
    return Message(content=reply, reply_to=msg)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    kept, reply = client_share(msg.content, _kept(context))
    context.state[SECAGG_STATE_KEY] = kept
    return Message(content=reply, reply_to=msg)


def secagg_train_reply(
    msg: Message, context: Context, cfg: RunConfig, vector, payload, metrics
) -> RecordDict:
    """The train reply under secure aggregation: this client's mask, masked, at b bits per weight."""
    model = model_with(cfg, method_for(cfg), vector, pick_device(cfg.device))
    x = own_mask(payload, vector, layout_fingerprint(model))
    kept, records = client_mask(msg.content, _kept(context), x)
    context.state[SECAGG_STATE_KEY] = kept
    return RecordDict({**records, METRICS_KEY: MetricRecord(metrics)})


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    reply = client_unmask(msg.content, _kept(context))
    del context.state[SECAGG_STATE_KEY]  # spent: a second request finds nothing
    return Message(content=reply, reply_to=msg)
