"""PRISM ClientApp: unpack Flower records, run one client round, pack the reply.

All the work is framework-free (``prism_flwr/federated/client_round.py``, the same code the in-process
runner and the benchmarks call); this file only moves records:

- ``@app.train``: the global vector (PRISM's float32 scores, or the dense baseline's weights) in;
  ``client_round`` trains locally and builds the upload (PRISM: one mask at 1 bit per weight,
  after the DP mechanism when ``dp = "theta"``; dense: float32 weights); the reply carries it
  and the metrics. The client's state (Adam moments, objective state, privacy accountant) is kept
  in ``context.state`` and in a per-round file under ``<output-dir>/client-state/`` so a resumed
  server run finds it again.
- ``@app.evaluate``: ``client_evaluate`` (pixel MMD^2 of global samples vs this node's images;
  nothing derived from data under DP).
- the global arrives as the run's downlink encodes it (``prism_flwr/federated/broadcast.py``);
  under ``downlink = "delta"`` this node keeps the last global in ``context.state``, rebuilds the
  new one from it and checks its digest, refuses the message (an error reply: the server sends
  the full state next) when it cannot, and names the global it now holds in its reply.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prism_flwr.federated.broadcast import DOWNLINK_KEY, digest, receive
from prism_flwr.federated.client_round import (client_evaluate, client_round, ledger_params, masked_count,
                                               new_record, received_vector, theta_noise_multiplier)
from prism_flwr.storage.client_state import (ClientRecord, PrivacyLedger, client_state_dir, read_latest_state_file,
                                     write_state_file)
from prism_flwr.config import RunConfig
from prism_flwr.federated.methods import method_for
from prism_flwr.federated.records import METRICS_KEY
from prism_flwr.data.client_cache import client_data
from prism_flwr.model.build import pick_device
from prism_flwr.federated.client_round import model_with
from prism_flwr.federated.secure_sum import own_mask
from prism_flwr.model.masked import layout_fingerprint
from strategies.secagg import STATE_KEY as SECAGG_STATE_KEY
from strategies.secagg import client_advertise, client_mask, client_share, client_unmask

app = ClientApp()
log = logging.getLogger("prism.client")
STATE_KEY = "prism-client"
HELD_KEY = "prism-downlink"  # context.state: the last global this node rebuilt (downlink = "delta")


def _state_dir(cfg: RunConfig, msg: Message) -> Path:
    """``<output-dir>/client-state/<run-tag>``; the server's run tag must be hex (no path tricks)."""
    return client_state_dir(cfg.resolved_output_dir(), msg.content["config"]["run-tag"])


def load_client_state(msg: Message, context: Context, cfg: RunConfig, pid: int, server_round: int,
                      ledger: PrivacyLedger | None) -> ClientRecord:
    """The newest state this client saved before ``server_round`` (memory first, then disk).

    Under DP the privacy accountant is always rebuilt from the append-only ledger, whatever a
    state file says: losing or rolling back state never hands out a fresh budget."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is not None and rec["round"] < server_round:
        record = ClientRecord.from_bytes(rec["blob"])
    elif (saved := read_latest_state_file(_state_dir(cfg, msg), pid, server_round)) is not None:
        record = ClientRecord.from_bytes(saved[1])
    else:
        record = new_record(cfg)
    if ledger is not None and cfg.dp == "theta":
        record.accountant = ledger.accountant(theta_noise_multiplier(cfg), cfg.dp_delta, cfg.dp_epsilon)
    return record


def save_client_state(msg: Message, context: Context, cfg: RunConfig, pid: int, server_round: int,
                      record: ClientRecord) -> None:
    blob = record.to_bytes()
    context.state[STATE_KEY] = ConfigRecord({"round": server_round, "blob": blob})
    write_state_file(_state_dir(cfg, msg), pid, server_round, blob)


def _unpack(msg: Message, context: Context):
    """Run config, method, partition, device, global vector and this node's data."""
    cfg = RunConfig.parse(context.run_config)
    method = method_for(cfg)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    device = pick_device(cfg.device)
    vector = _received_global(msg, context, cfg, method, device)
    data, hist = client_data(cfg, pid, num, device)
    return cfg, method, pid, vector, data, hist


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
        state = receive(downlink, array, masked_count(cfg, method, device),
                        msg.content.config_records.get(DOWNLINK_KEY), held)
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
    cfg, method, pid, vector, data, hist = _unpack(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    ledger = None
    if cfg.dp != "off":  # refuses a round at or below one already released, before any training
        ledger = PrivacyLedger(_state_dir(cfg, msg), pid, ledger_params(cfg))
        ledger.check_round(server_round)
    record = load_client_state(msg, context, cfg, pid, server_round, ledger)
    had_statistics = bool(record.train.objective)
    result = client_round(cfg, method, vector, data, hist, record, partition_id=pid, server_round=server_round)
    if ledger is not None:  # fsynced before the reply leaves
        if cfg.dp == "theta":
            ledger.record(server_round, "theta", result.record.epsilon_spent)
        elif cfg.dp == "statistics" and not had_statistics:
            ledger.record(server_round, "statistics", result.record.epsilon_spent)
    payload = result.payload
    save_client_state(msg, context, cfg, pid, server_round, result.record)
    log.info("client %d round %d: %d bytes up", pid, server_round, payload.nbytes)
    content = RecordDict({
        method.up_key: ArrayRecord({method.up_key: Array(payload)}),
        METRICS_KEY: MetricRecord(result.metrics),
        **_held_record(cfg, method, vector),
    })
    if cfg.secure_aggregation != "off":  # the mask itself never leaves: its masked sum does
        content = secagg_train_reply(msg, context, cfg, vector, payload, result.metrics)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Pixel MMD^2 between samples of the global model and this node's images."""
    cfg, method, pid, vector, data, _ = _unpack(msg, context)
    metrics = client_evaluate(cfg, method, vector, data, partition_id=pid,
                              server_round=int(msg.content["config"]["server-round"]))
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


def secagg_train_reply(msg: Message, context: Context, cfg: RunConfig, vector, payload,
                       metrics) -> RecordDict:
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
