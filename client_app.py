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
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prism_flwr.federated.client_round import (client_evaluate, client_round, ledger_params, new_record, received_vector,
                                     theta_noise_multiplier)
from prism_flwr.storage.client_state import (ClientRecord, PrivacyLedger, client_state_dir, read_latest_state_file,
                                     write_state_file)
from prism_flwr.config import RunConfig
from prism_flwr.federated.methods import method_for
from prism_flwr.federated.records import METRICS_KEY
from prism_flwr.data.client_cache import client_data
from prism_flwr.model.build import pick_device

app = ClientApp()
log = logging.getLogger("prism.client")
STATE_KEY = "prism-client"


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
    vector = received_vector(cfg, method, msg.content[method.down_key][method.down_key].numpy(), device)
    data, hist = client_data(cfg, pid, num, device)
    return cfg, method, pid, vector, data, hist


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
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Pixel MMD^2 between samples of the global model and this node's images."""
    cfg, method, pid, vector, data, _ = _unpack(msg, context)
    metrics = client_evaluate(cfg, method, vector, data, partition_id=pid,
                              server_round=int(msg.content["config"]["server-round"]))
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
