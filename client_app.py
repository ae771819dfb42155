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
from prism_flwr.eager_torch import defer_dynamo
from prism_flwr.federated.broadcast import DOWNLINK_KEY, digest, receive
from prism_flwr.federated.client_round import (
    client_evaluate,
    client_round,
    masked_count,
    new_record,
    received_vector,
)
from prism_flwr.federated.client_state import (
    ClientRecord,
    answered_rounds,
    client_state_dir,
    read_latest_state_file,
    write_state_file,
)
from prism_flwr.federated.methods import method_for
from prism_flwr.federated.records import METRICS_KEY
from prism_flwr.model.build import pick_device
from prism_flwr.node_config import NodeConfig, NodeConfigError, Refusal
from prism_flwr.privacy import insecure_test_secret
from prism_flwr.privacy.ledger import LedgerError
from prism_flwr.privacy.modes import PrivacyModeError, hides_errors, privacy_for
from prism_flwr.secagg import SecAggError, Trust
from prism_flwr.secagg import node as secagg_node
from prism_flwr.secagg.crypto import FloorRefusal
from prism_flwr.secagg.identity import load_identity
from prism_flwr.secagg.records import STATE_KEY as SECAGG_STATE_KEY
from prism_flwr.threads import configure_threads

defer_dynamo()  # torch.optim's steps import torch's compiler stack (~150 MiB) only to do nothing

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
    why = node.refusal(privacy_for(cfg), cfg.dp_epsilon, cfg.dp_delta) or node.secagg_refusal(
        cfg.secure_aggregation
    )
    if why is not None:
        raise Refusal(why)
    return node


def load_client_state(msg: Message, context: Context, cfg: RunConfig, node: NodeConfig, server_round: int):
    """(the newest state this client saved before ``server_round``, the state it saved AT that round
    or None): memory first, then disk. ``Refusal`` when it has answered a later round of this run."""
    folder = _state_dir(node, msg)
    rec = context.state.config_records.get(STATE_KEY)
    answered = answered_rounds(folder, node.partition_id)  # round -> its state file, listed once
    newest = max([*answered, rec["round"] if rec is not None else 0])
    if newest > server_round:
        raise Refusal(
            f"node refuses round {server_round}: it has answered round {newest} of this run "
            "(rounds only go forward)"
        )
    if newest == server_round:  # asked again: the answer it gave, never a second draw
        blob = rec["blob"] if rec is not None and rec["round"] == server_round else None
        blob = blob or answered[server_round].read_bytes()
        return None, ClientRecord.from_bytes(blob)
    if rec is not None and rec["round"] < server_round:
        return ClientRecord.from_bytes(rec["blob"]), None
    if (saved := read_latest_state_file(folder, node.partition_id, server_round)) is not None:
        return ClientRecord.from_bytes(saved[1]), None
    return _fresh_record(cfg, node.partition_id), None


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
    except (Refusal, LedgerError, PrivacyModeError):  # about configuration and budget, not the data
        raise
    except Exception:
        if not hides_errors(context.run_config.get("dp", "off")):
            raise
        log.exception("client round failed under DP; the server is told only %r", DP_FAILURE)
        raise RuntimeError(DP_FAILURE) from None


def _train(msg: Message, context: Context) -> Message:
    cfg, node, method, vector, data, hist = _unpack(msg, context)
    pid = node.partition_id
    server_round = int(msg.content["config"]["server-round"])
    record, answered = load_client_state(msg, context, cfg, node, server_round)
    secure = cfg.secure_aggregation != "off"
    if answered is not None:
        if secure or not answered.answer.size:  # a masked sum asked twice would give the mask away
            raise Refusal(f"node refuses round {server_round}: it has answered it already in this run")
        log.warning("client %d round %d asked again: the same answer is sent", pid, server_round)
        payload, metrics = answered.answer, answered.answer_metrics
    else:
        ledger = privacy_for(cfg).session(
            node.resolved("state_dir"), node.dp_budget, node.max_dp_delta, msg.content["config"]["run-tag"],
            server_round, data,
        )  # fmt: skip
        result = client_round(
            cfg,
            method,
            vector,
            data,
            hist,
            record,
            partition_id=pid,
            server_round=server_round,
            ledger=ledger,
            vgg19_weights=node.vgg19_weights,
        )
        payload, metrics = result.payload, result.metrics
        if not secure:
            result.record.answer, result.record.answer_metrics = payload, metrics
        save_client_state(msg, context, node, server_round, result.record)
    log.info("client %d round %d: %d bytes up", pid, server_round, payload.nbytes)
    content = RecordDict(
        {
            method.up_key: ArrayRecord({method.up_key: Array(payload)}),
            METRICS_KEY: MetricRecord(metrics),
            **_held_record(cfg, method, vector),
        }
    )
    if secure:  # the mask itself never leaves: its masked sum does
        content = secagg_train_reply(msg, context, result.mask, metrics, _held_record(cfg, method, vector))
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
# The protocol's steps (prism_flwr/secagg/node.py): keys, shares, the masked vector (end of
# train), the consistency round, unmasking, under the node's Trust (its signing key and roster,
# its floor). The secrets between steps stay in context.state; a step that cannot go on raises,
# which makes this node a dropout of the round for the server.
def node_trust(context: Context) -> Trust:
    """What this node requires of a round, from its own config (``Refusal`` if that is broken)."""
    try:
        node = NodeConfig.parse(context.node_config)
        files = node.secagg_files()
        identity = None if files is None else load_identity(*files)
    except (NodeConfigError, SecAggError) as err:
        raise Refusal(str(err)) from None
    return Trust(identity, node.min_secure_aggregation_clients)


def _kept(context: Context) -> ConfigRecord:
    kept = context.state.config_records.get(SECAGG_STATE_KEY)
    if kept is None:
        raise ValueError("no secure-aggregation state for this round on this node")
    return kept


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    try:
        kept, reply = secagg_node.advertise(msg.content, msg.metadata.dst_node_id, node_trust(context))
    except FloorRefusal as err:  # below the node's floor: said as is, like a privacy floor
        raise Refusal(str(err)) from None
    context.state[SECAGG_STATE_KEY] = kept
    return Message(content=reply, reply_to=msg)


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    kept, reply = secagg_node.share(msg.content, _kept(context), node_trust(context))
    context.state[SECAGG_STATE_KEY] = kept
    return Message(content=reply, reply_to=msg)


def secagg_train_reply(
    msg: Message, context: Context, mask: np.ndarray, metrics: dict, held: dict
) -> RecordDict:
    """The train reply under secure aggregation: the mask this client drew, masked, at b bits per
    weight (``held``: the downlink record a delta broadcast needs)."""
    kept, records = secagg_node.mask(msg.content, _kept(context), mask)
    context.state[SECAGG_STATE_KEY] = kept
    return RecordDict({**records, METRICS_KEY: MetricRecord(metrics), **held})


@app.query("secagg_confirm")
def secagg_confirm(msg: Message, context: Context) -> Message:
    kept, reply = secagg_node.confirm(msg.content, _kept(context), node_trust(context))
    context.state[SECAGG_STATE_KEY] = kept
    return Message(content=reply, reply_to=msg)


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    kept = _kept(context)
    del context.state[SECAGG_STATE_KEY]  # spent, whatever the answer: a second request finds nothing
    return Message(content=secagg_node.unmask(msg.content, kept, node_trust(context)), reply_to=msg)
