"""One training round with and without secure aggregation: time and bytes on the wire per client.

    python -m benchmarks.secagg_round [--case NGF:K ...] [--local-steps S] [--data-dir DIR]

For each case (generator width, K clients) every client trains once (``client_round``, real
Fashion-MNIST, ``--local-steps`` steps: the protocol's cost does not depend on them), then the
same uploads go through two rounds of the apps' strategies over Flower ``Message`` objects
(``tools.secagg_loopback``: the ClientApp's handlers, every node in this process, no Ray): MADA
with coded masks in the clear, ``SecAggMADA`` (SecAgg+, masked vectors at b = ceil(log2(K + 1))
bits per weight) with unauthenticated nodes, and the same with every node holding a signing key
and the roster (signed adverts, consistency round: the malicious-server variant).
Bytes are the strategies' wire counter (strategies/wire.py: every message as Flower serialises
it, both ways, all phases) divided by K. Flower's own SecAgg+ is given by its size alone
(about 8 bytes per element up, ``secaggplus_mod``): it cannot carry a packed mask. Round time =
the clients' training (sequential, summed) + everything after it. Prints a table and one JSON
line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from benchmarks.secagg_bench import git_commit
from prism_flwr.config import RunConfig
from prism_flwr.data.client_cache import client_data
from prism_flwr.federated.client_round import client_round, new_record
from prism_flwr.federated.codec import encode_mask, mask_model
from prism_flwr.federated.methods import PRISM
from prism_flwr.federated.records import MASK_KEY, METRICS_KEY, SCORES_KEY
from prism_flwr.model.build import generator_spec, pick_device
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import get_scores, layout_fingerprint, num_masked, sample_mask, set_flat
from prism_flwr.secagg.identity import write_federation
from strategies.mada import MADA
from strategies.secagg import SecAggMADA
from tools.secagg_loopback import LoopbackClient, LoopbackGrid, reply_to
from tools.security_probe import set_task_identity

FLOWER_SECAGG_BYTES_PER_ELEMENT = 8  # int64 per quantised value in Flower's secaggplus_mod


def _train(cfg: RunConfig, count: int, train: bool = True):
    """Every client's round-1 mask from the initial scores, drawn once and sent either coded in
    the clear (as the ClientApp without secure aggregation) or masked; (scores, uploads, seconds).
    ``train=False``: each mask drawn from the received scores without local training."""
    device = pick_device(cfg.device)
    model = ResnetGenerator(generator_spec(cfg))
    downlink = PRISM.downlink(cfg)
    scores = downlink.settle(get_scores(model).numpy())
    received = downlink.decode(downlink.encode(scores), num_masked(model))
    uploads, seconds, layout = {}, 0.0, layout_fingerprint(model)
    cfg = cfg.model_copy(update={"secure_aggregation": "secagg+"})
    for pid in range(count):
        t0 = time.perf_counter()
        if train:
            data, hist = client_data(cfg, pid, count, device)
            res = client_round(
                cfg, PRISM, received, data, hist, new_record(cfg), partition_id=pid, server_round=1
            )
            mask, metrics = res.mask, res.metrics
        else:
            set_flat(model, torch.from_numpy(received), PRISM.vector_attr)
            drawn = sample_mask(model, generator=torch.Generator().manual_seed(pid))
            mask, metrics = drawn.numpy().astype(np.uint8), {"num-examples": 1}
        seconds += time.perf_counter() - t0
        coded = np.frombuffer(encode_mask(mask, layout, mask_model(received)), np.uint8).copy()
        uploads[pid + 1] = (coded, mask, metrics)
    return scores, received, layout, uploads, seconds


def _round(strategy, grid, scores: np.ndarray, cfg: RunConfig) -> tuple[dict, float]:
    arrays = ArrayRecord({SCORES_KEY: Array(scores)})
    t0 = time.perf_counter()
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    out, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    if out is None:
        raise SystemExit(f"round skipped: {strategy.round_records[1]}")
    return strategy.round_records[1], time.perf_counter() - t0


def run_case(ngf: int, count: int, cfg: RunConfig, train: bool = True, repeats: int = 1) -> dict:
    """One case: every mode's fastest of ``repeats`` rounds on the same masks."""
    cfg = cfg.model_copy(update={"ngf": ngf})
    scores, received, layout, uploads, train_s = _train(cfg, count, train)
    n = len(scores)
    common = dict(
        layout=layout,
        state=None,
        num_weights=n,
        seed=cfg.seed,
        min_train_nodes=2,
        min_available_nodes=count,
        downlink=PRISM.downlink(cfg),
    )

    class ClearGrid(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:  # each node's coded mask, as the ClientApp replies without secagg
                payload, _, metrics = uploads[m.metadata.dst_node_id]
                replies.append(
                    reply_to(
                        m,
                        RecordDict(
                            {
                                MASK_KEY: ArrayRecord({MASK_KEY: Array(payload)}),
                                METRICS_KEY: MetricRecord(metrics),
                            }
                        ),
                    )
                )
            return replies

    rows, by_message = {}, {}
    with tempfile.TemporaryDirectory() as keys:
        _, roster = write_federation(keys, count)
        configs = {
            "secagg": lambda u: {},
            "signed": lambda u: {"secagg-key": f"{keys}/node-{u - 1}.key", "secagg-roster": str(roster)},
        }
        for _ in range(repeats):  # the modes interleaved, so a change of load hits them alike
            runs = {"clear": (MADA.from_config(cfg, **common), ClearGrid({u: None for u in uploads}))}
            for name, config in configs.items():
                clients = {u: LoopbackClient(u, lambda msg, u=u: uploads[u][1:], config(u)) for u in uploads}
                runs[name] = (SecAggMADA.from_config(cfg, **common), LoopbackGrid(clients))
            for name, (strategy, grid) in runs.items():
                rec, seconds = _round(strategy, grid, scores, cfg)
                if name not in rows or seconds < rows[name][1]:
                    rows[name] = (rec, seconds)
                    by_message[name] = {k: v / count for k, v in grid.seconds.items()}
    secure = rows["secagg"][0]
    assert rows["signed"][0]["secagg"]["signed"] and not secure["secagg"]["signed"]
    row = {
        "ngf": ngf,
        "n": n,
        "clients": count,
        "bits": secure["secagg"]["bits"],
        "local_steps": cfg.local_steps,
        "train_s": train_s,
    }
    for name, (rec, seconds) in rows.items():
        row[name] = {
            "after_train_s": seconds,
            "round_s": train_s + seconds,
            "up_bytes_per_client": rec["uplink_wire_bytes"] / count,
            "down_bytes_per_client": rec["downlink_wire_bytes"] / count,
            "upload_bits_per_weight": rec["uplink_bits_per_weight"],
        }
    for name, seconds in by_message.items():
        row[name]["client_s_by_message"] = seconds
    row["flower_secaggplus_up_bytes_per_client"] = FLOWER_SECAGG_BYTES_PER_ELEMENT * n
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", default=None, help="NGF:K (default: 16:4 and 64:10)")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--data-dir", default=RunConfig().data_dir)
    parser.add_argument("--repeats", type=int, default=1, help="rounds per mode; the fastest is kept")
    parser.add_argument(
        "--no-training",
        action="store_true",
        help="masks drawn from the initial scores (the protocol's cost is the same)",
    )
    args = parser.parse_args(argv)
    set_task_identity()  # Flower messages outside a running ServerApp
    cfg = RunConfig(local_steps=args.local_steps, data_dir=args.data_dir, device="cpu", download=False)
    cases = [tuple(map(int, c.split(":"))) for c in args.case or ["16:4", "64:10"]]
    rows = [run_case(ngf, k, cfg, not args.no_training, args.repeats) for ngf, k in cases]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = os.getloadavg()[0]
    print(
        f"# secagg_round at {git_commit()} on {machine} (1-min load {load:.2f}), "
        f"{'no training' if args.no_training else f'local-steps {args.local_steps}'}"
    )
    print(
        "| ngf | n | K | b | mode | round s (train + rest) | up kB / client | down kB / client | up bit/w |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['ngf']} | {r['n']:,} | {r['clients']} | {r['bits']} |"
        modes = (("clear", "coded mask, clear"), ("secagg", "secagg+"), ("signed", "secagg+ signed"))
        for name, label in modes:
            m = r[name]
            print(
                f"{head} {label} | {m['round_s']:.2f} ({r['train_s']:.2f} + {m['after_train_s']:.2f}) | "
                f"{m['up_bytes_per_client'] / 1e3:,.1f} | {m['down_bytes_per_client'] / 1e3:,.1f} | "
                f"{8 * m['up_bytes_per_client'] / r['n']:.3f} |"
            )
        flower = r["flower_secaggplus_up_bytes_per_client"]
        print(
            f"{head} Flower SecAgg+ (size only) | - | {flower / 1e3:,.1f} | - | {8 * flower / r['n']:.0f} |"
        )
    date = datetime.now(UTC).isoformat(timespec="seconds")
    out = {
        "bench": "secagg_round",
        "date": date,
        "commit": git_commit(),
        "machine": machine,
        "load_1min": load,
        "local_steps": 0 if args.no_training else args.local_steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
