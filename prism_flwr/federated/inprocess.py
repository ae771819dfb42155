"""PRISM in one process: the Flower apps' client round and server aggregation, without Flower.

Each round every client runs ``client_round.client_round`` (what ``@app.train`` runs), its upload
goes through the real codec (``encode`` in the client round, ``decode_mask`` here, as the MADA
strategy does), and the server takes the strategy's own step (``server_step.py``: counting,
robust when asked, the run's rule and the downlink's settling; what ``MADA.combine`` calls). Only
the transport, Flower's sampling of nodes and the reply checks are missing, so an in-process run
of a config gives the same rounds as ``flwr run`` of that config with every client taking part
(``tests/test_inprocess.py`` checks one point against ``flwr run``). With
``secure-aggregation = "secagg+"`` the masks go through the whole SecAgg+ protocol
(``secure_sum.secure_counts``) and only the counts reach the rule, as in the ServerApp. Clients
train one after another on one device, which is what the aggregation study and the GPU benchmark
use: no run pays Flower's start-up.

PRISM only (``method = "prism"``); the dense baseline runs through Flower.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.evaluation.evaluator import Evaluator, save_grid
from prism_flwr.federated.aggregation import AggregateResult, Aggregator
from prism_flwr.federated.broadcast import Downlink
from prism_flwr.federated.client_round import client_round, model_with, new_record
from prism_flwr.federated.codec import decode_mask, mask_model
from prism_flwr.federated.methods import PRISM, method_for
from prism_flwr.federated.secure_sum import secure_counts
from prism_flwr.federated.server_step import mask_counts, robust_settings, server_step
from prism_flwr.model.build import generator_spec, pick_device
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores, layout_fingerprint
from prism_flwr.privacy import insecure_test_secret
from prism_flwr.privacy.modes import privacy_for
from prism_flwr.secagg.crypto import packed_size
from prism_flwr.threads import configure_threads


def run(
    cfg: RunConfig,
    num_clients: int,
    *,
    evaluator: Evaluator | None = None,
    on_record: Callable[[dict], None] | None = None,
    deadline: float | None = None,
    samples_dir: Path | None = None,
    insecure_test_mask_seed: int | None = None,
    ledger_dir: Path | None = None,
) -> list[dict]:
    """Train ``cfg.num_server_rounds`` rounds of ``num_clients`` clients; returns the history.

    Records follow ``history.json``'s names (``round, clients, uplink_bytes,
    uplink_bits_per_weight, mada_lambda, lambda_no_change, theta_change_sq, loss, eval``) plus
    timings (``client_seconds``, ``server_seconds``, ``round_seconds``). ``evaluator`` scores the
    global model at round 0, every ``eval-every`` rounds and at the last round. ``deadline``
    (``time.time()`` value): stop after the round that passes it (``stopped_early`` in the last
    record). ``samples_dir``: a grid of 64 evaluation samples per evaluated round
    (``round-XXXX.png``, as the ServerApp writes). Each client's mask secret is fresh from the OS
    unless ``insecure_test_mask_seed`` is given (predictable masks, to compare with a ``flwr run``
    whose nodes have ``PRISM_INSECURE_TEST_MASK_SEED`` set to the same value). Under DP every
    release goes through a node ledger as in the ClientApp, in ``ledger_dir`` (default: a temporary
    folder for this run), with the run's budget as the node's.
    """
    with tempfile.TemporaryDirectory(prefix="prism-ledger-") as tmp:
        return _run(cfg, num_clients, evaluator, on_record, deadline, samples_dir, insecure_test_mask_seed,
                    Path(ledger_dir or tmp))  # fmt: skip


def _run(cfg, num_clients, evaluator, on_record, deadline, samples_dir, insecure_test_mask_seed, ledger_dir):
    if method_for(cfg) is not PRISM:
        raise ValueError(
            "the in-process runner trains PRISM (method = 'prism'); the dense baseline runs through Flower"
        )
    device = pick_device(cfg.device)
    configure_threads(fallback=1)  # as a ClientApp in a 1-CPU Ray actor: the same rounds as flwr run
    template = ResnetGenerator(generator_spec(cfg))
    layout = layout_fingerprint(template)
    downlink = PRISM.downlink(cfg)
    scores = downlink.settle(get_scores(template).numpy())  # the ServerApp's initial state
    aggregator = Aggregator(cfg.aggregation, cfg.mada_space)
    clients = [client_data(cfg, pid, num_clients, device) for pid in range(num_clients)]
    test_seed = insecure_test_mask_seed
    mask_secrets = [
        None if test_seed is None else insecure_test_secret(test_seed, pid) for pid in range(num_clients)
    ]
    states = [new_record(cfg, secret) for secret in mask_secrets]
    privacy, run_tag = privacy_for(cfg), secrets.token_hex(4)

    def evaluate(rnd: int, record: dict) -> None:
        if evaluator is not None and (rnd % cfg.eval_every == 0 or rnd == cfg.num_server_rounds):
            record["eval"], fake = evaluator.evaluate(
                model_with(cfg, PRISM, scores, device), PRISM.eval_mask_mode
            )
            if samples_dir is not None:
                save_grid(fake[:64], Path(samples_dir) / f"round-{rnd:04d}.png")

    def ledger(rnd: int, data: torch.Tensor):  # a client's ledger session, as the ClientApp opens it
        return privacy.session(ledger_dir, cfg.dp_epsilon, cfg.dp_delta, run_tag, rnd, data)

    history = [{"round": 0, "clients": 0, "uplink_bytes": 0}]
    evaluate(0, history[0])
    for rnd in range(1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        agg, states, record = one_round(
            cfg, clients, states, scores, aggregator, downlink, layout, rnd, ledger
        )
        aggregator.commit(agg)  # every round here applies
        scores = agg.scores
        t1 = time.perf_counter()
        record["round_seconds"] = t1 - t0
        evaluate(rnd, record)
        history.append(record)
        if on_record is not None:
            on_record(record)
        if deadline is not None and time.time() > deadline and rnd < cfg.num_server_rounds:
            record["stopped_early"] = True
            break
    if device.type == "cuda":
        history[-1]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return history


def one_round(
    cfg: RunConfig,
    clients: list[tuple[torch.Tensor, list[int]]],
    records: list,
    scores: np.ndarray,
    aggregator: Aggregator,
    downlink: Downlink,
    layout: str,
    rnd: int,
    ledger: Callable[[int, torch.Tensor], object] | None = None,
) -> tuple[AggregateResult, list, dict]:
    """Round ``rnd`` of every client from the global ``scores``: (the server step's result, the
    clients' new records, the round's ``history.json`` record without evaluation).

    ``clients``: each client's (data, label histogram) as ``client_data`` returns them; ``records``:
    their ``ClientRecord``s (not changed: the new ones are returned); ``ledger(rnd, data)``: the
    node ledger session of a client's release (None when nothing is released). The caller commits
    the result to ``aggregator`` once the round applies.
    """
    t0 = time.perf_counter()
    n, secure = len(scores), cfg.secure_aggregation != "off"
    packed, losses, sizes, records = [], [], [], list(records)
    coding = mask_model(scores)  # what MADA.configure_train derives from the scores it sends
    sent = downlink.encode(scores)
    received = downlink.decode(sent, n)
    for pid, (data, hist) in enumerate(clients):
        res = client_round(
            cfg,
            PRISM,
            received,
            data,
            hist,
            records[pid],
            partition_id=pid,
            server_round=rnd,
            ledger=None if ledger is None else ledger(rnd, data),
        )
        records[pid] = res.record
        if secure:  # the 0/1 mask the client drew, masked as is (the ClientApp's step)
            packed.append(res.mask)
        else:
            packed.append(decode_mask(res.payload.tobytes(), n, layout, coding, grouped=True))
        losses.append(res.metrics.get("loss", float("nan")))
        sizes.append(res.payload.nbytes)
    t1 = time.perf_counter()
    if secure:  # the same protocol as the ServerApp's, all parties here: only counts come out
        summed = secure_counts(dict(enumerate(packed)))
        sizes = [packed_size(n, len(clients).bit_length())] * len(clients)  # b = ceil(log2(K + 1))
        counts, k = summed.counts, len(summed.contributors)
    else:
        counts, k, _ = mask_counts(packed, n, coding, robust_settings(cfg))
    agg = server_step(aggregator, scores, counts, k, downlink, cfg.seed, rnd)
    record = {
        "round": rnd,
        "clients": len(clients),
        "uplink_bytes": int(sum(sizes)),
        "downlink_bytes": int(len(clients) * sent.nbytes),
        "uplink_bits_per_weight": 8 * float(np.mean(sizes)) / n,
        "mada_lambda": None if np.isnan(agg.mada_lambda) else agg.mada_lambda,
        **agg.diagnostics,
        "loss": float(np.mean(losses)),
        "client_seconds": t1 - t0,
        "server_seconds": time.perf_counter() - t1,
    }
    return agg, records, record
