"""PRISM ClientApp: train local scores, upload one sampled mask at 1 bit per weight.

Per round (``@app.train``): load the global scores, train them on this node's partition for
``local-steps`` steps, sample ``m ~ Bernoulli(theta)`` (after the DP mechanism when
``dp = "theta"``) and reply with the codec bytes of ``m``. The Adam moments and the objective's
state (data statistics, moving averages) persist across rounds in ``context.state`` and in a
per-round file under ``<output-dir>/client-state/`` so a resumed server run finds them again.
``@app.evaluate`` scores the global model against this node's data (pixel MMD^2).
With ``method = "dense"`` (the baseline) the same network's weights are trained instead and
uploaded as float32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from prism_flwr.client_state import ClientRecord, read_latest_state_file, write_state_file
from prism_flwr.codec import encode_mask
from prism_flwr.config import RunConfig
from prism_flwr.features import build_features
from prism_flwr.generator import ResnetGenerator, generate
from prism_flwr.masked import get_flat, iter_thetas, layout_fingerprint, sample_mask, set_flat, set_mask_mode
from prism_flwr.objectives import FeatureMatching, mmd2_unbiased
from prism_flwr.privacy import ThetaAccountant, noise_multiplier_for_budget, privatize_statistics, privatize_theta
from prism_flwr.task import (MASK_KEY, METRICS_KEY, WEIGHTS_KEY, client_data, derive_seed, generator_spec, global_vector,
                             pick_device)
from prism_flwr.training import TrainSettings, train_local

app = ClientApp()
log = logging.getLogger("prism.client")
STATE_KEY = "prism-client"
# Testing hook for failure drills: PRISM_FAULT_INJECTION="raise=1 corrupt=2" makes partition 1
# raise in every training round and partition 2 upload a mask with a flipped payload byte.
FAULT_ENV = "PRISM_FAULT_INJECTION"


def _injected_fault(pid: int) -> str | None:
    faults = dict(item.split("=") for item in os.environ.get(FAULT_ENV, "").split())
    return next((kind for kind, target in faults.items() if int(target) == pid), None)


def _state_dir(cfg: RunConfig, msg: Message) -> Path:
    return cfg.resolved_output_dir() / "client-state" / str(msg.content["config"]["run-tag"])


def load_client_state(msg: Message, context: Context, cfg: RunConfig, pid: int, server_round: int) -> ClientRecord:
    """The newest state this client saved before ``server_round`` (memory first, then disk)."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is not None and rec["round"] < server_round:
        return ClientRecord.from_bytes(rec["blob"])
    saved = read_latest_state_file(_state_dir(cfg, msg), pid, server_round)
    if saved is not None:
        return ClientRecord.from_bytes(saved[1])
    record = ClientRecord()
    if cfg.dp == "theta":
        z = noise_multiplier_for_budget(cfg.dp_epsilon, cfg.dp_delta, cfg.num_server_rounds)
        record.accountant = ThetaAccountant(z, cfg.dp_delta, cfg.dp_epsilon)
    return record


def save_client_state(msg: Message, context: Context, cfg: RunConfig, pid: int, server_round: int,
                      record: ClientRecord) -> None:
    blob = record.to_bytes()
    context.state[STATE_KEY] = ConfigRecord({"round": server_round, "blob": blob})
    write_state_file(_state_dir(cfg, msg), pid, server_round, blob)


def _setup(msg: Message, context: Context):
    cfg = RunConfig.parse(context.run_config)
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    device = pick_device(cfg.device)
    model = ResnetGenerator(generator_spec(cfg)).to(device)
    key, attr = global_vector(cfg)
    set_flat(model, torch.from_numpy(msg.content[key][key].numpy()).to(device), attr)
    data, hist = client_data(cfg, pid, num, device)
    if len(data) < 2:  # e.g. Dirichlet with a tiny alpha can leave a client (almost) empty
        raise ValueError(f"partition {pid} of {num} holds {len(data)} images: nothing to train or evaluate on")
    return cfg, pid, device, model, data, hist


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, pid, device, model, data, hist = _setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    fault = _injected_fault(pid)
    if fault == "raise":
        raise RuntimeError(f"{FAULT_ENV}: partition {pid} fails on purpose")
    state = load_client_state(msg, context, cfg, pid, server_round)
    if state.accountant is not None and not state.accountant.can_release():
        raise RuntimeError(f"client {pid}: privacy budget epsilon={cfg.dp_epsilon} spent; not training")
    # Independent streams for the Bernoulli masks (global RNG) and for latents/batches, both
    # reproducible per (seed, round, client); what must stay hidden from the server (DP noise and
    # the mask sampled from noisy theta) is seeded from the client's own secret instead.
    torch.manual_seed(derive_seed(cfg.seed, server_round, pid, 0))
    gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, server_round, pid, 1))
    hidden = cfg.seed if cfg.dp == "off" else state.secret

    features = build_features(cfg.features, cfg.vgg19_weights or None).to(device)
    if cfg.dp == "statistics" and not state.train.objective:
        # Released once with sample-level DP; every later step and round is post-processing.
        with torch.no_grad():
            batches = (features(data[i:i + 256]) for i in range(0, len(data), 256))
            mu, var, eps = privatize_statistics(batches, cfg.dp_feature_clip, cfg.dp_epsilon, cfg.dp_delta,
                                                generator=torch.Generator(device=device).manual_seed(
                                                    derive_seed(hidden, server_round, pid, 3)))
        state.train.objective = FeatureMatching(mu, var).full_state()
        state.statistics_epsilon = eps
    dense = cfg.method == "dense"
    settings = TrainSettings(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.dense_lr if dense else cfg.lr,
                             objective=cfg.objective, estimator=cfg.estimator,
                             trainable="weights" if dense else "scores")
    metrics = train_local(model, features, data, settings, state.train, generator=gen)
    metrics.update({"num-examples": len(data), "label_histogram": [int(c) for c in hist]})
    if dense:  # the baseline uploads its float32 weights: 32 bits per weight
        save_client_state(msg, context, cfg, pid, server_round, state)
        weights = ArrayRecord({WEIGHTS_KEY: Array(get_flat(model, "weight").numpy())})
        return Message(content=RecordDict({WEIGHTS_KEY: weights, METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)

    thetas = [t.cpu() for t in iter_thetas(model)]
    if cfg.dp == "theta":
        thetas = privatize_theta(thetas, cfg.dp_clip, state.accountant.noise_multiplier,
                                 generator=torch.Generator().manual_seed(derive_seed(hidden, server_round, pid, 4)))
        state.accountant.step()
    mask = sample_mask(model, thetas, generator=torch.Generator().manual_seed(derive_seed(hidden, server_round, pid, 5)))
    blob = encode_mask(mask.numpy(), layout_fingerprint(model))
    if fault == "corrupt":
        blob = blob[:-1] + bytes([blob[-1] ^ 0xFF])
    save_client_state(msg, context, cfg, pid, server_round, state)

    metrics["mask_density"] = float(mask.float().mean())
    if cfg.dp == "theta":  # client-level DP covers the mask only: nothing else computed from the data
        metrics = {"num-examples": 1, "dp_epsilon": state.epsilon_spent}
    elif cfg.dp == "statistics":  # training saw only the DP statistics; n and labels are raw data
        metrics = {k: metrics[k] for k in ("loss", "theta_density", "theta_entropy_bits", "mask_density")}
        metrics.update({"num-examples": 1, "dp_epsilon": state.epsilon_spent})
    log.info("client %d round %d: %d bytes up", pid, server_round, len(blob))
    content = RecordDict({
        MASK_KEY: ArrayRecord({MASK_KEY: Array(np.frombuffer(blob, dtype=np.uint8).copy())}),
        METRICS_KEY: MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Pixel MMD^2 between samples of the global model and this node's images."""
    cfg, pid, device, model, data, _ = _setup(msg, context)
    set_mask_mode(model, "dense" if cfg.method == "dense" else "sample")
    seed = derive_seed(cfg.seed, int(msg.content["config"]["server-round"]), pid, 2)
    n = min(256, len(data))
    fake = generate(model, n, seed, device)
    real = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].to(device)].cpu()
    mmd = mmd2_unbiased(fake, real).item()
    content = RecordDict({METRICS_KEY: MetricRecord({"num-examples": len(data), "local_mmd_pixels": mmd})})
    return Message(content=content, reply_to=msg)
