"""PRISM ServerApp: run MADA rounds, evaluate, checkpoint, export the sparse model.

Every run writes into its own folder ``output-dir/<start time>-run<Flower run id>-<random>/``
(``output-dir/latest`` points at the newest once its first checkpoint is written), locked for the
run's lifetime so two runs never share files (``prism_flwr/storage/checkpoint.py``):
``checkpoint-<round>.ckpt`` (every round, atomic, pickle-free, the last 3 kept), ``history.json``
(one record per round), ``samples/round-XXXX.png`` (every evaluation), ``model.prism`` (final
sparse model), ``samples.png`` (final grid) and ``summary.json``. A run in which every round was
skipped exports nothing and fails with the last skip's reason. ``resume=true`` continues the
run folder ``resume-run`` (default: ``latest``) from its newest readable checkpoint, and refuses
one trained under a run config that differs in anything that changes the model or its privacy.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from prism_flwr.config import RunConfig
from prism_flwr.data.datasets import NUM_CLASSES
from prism_flwr.evaluation.evaluator import Evaluator, save_grid
from prism_flwr.evaluation.plots import plot_history
from prism_flwr.evaluation.summary import closing_summary
from prism_flwr.federated.export import dense_float32_bytes
from prism_flwr.federated.methods import Method, method_for
from prism_flwr.model.build import generator_spec, pick_device
from prism_flwr.model.generator import ResnetGenerator, generate
from prism_flwr.model.masked import get_flat, layout_fingerprint, num_masked, set_flat
from prism_flwr.privacy.modes import privacy_for
from prism_flwr.storage.checkpoint import (
    RunLock,
    check_resume_config,
    find_run_dir,
    load_checkpoint,
    new_run_dir,
    point_latest,
    save_checkpoint,
)
from prism_flwr.storage.files import write_text_atomic
from strategies.base import RecordingFedAvg
from strategies.dense import DenseFedAvg
from strategies.mada import MADA
from strategies.prompt_grid import PromptGrid
from strategies.secagg import SecAggMADA

app = ServerApp()
STRATEGY_CLASSES = (
    MADA,
    DenseFedAvg,
)  # each names the method it aggregates; SecAggMADA is MADA's secure twin
log = logging.getLogger("prism.server")
# Training-set sizes: no honest client reports more examples than its dataset has.
TRAIN_SIZE = {"mnist": 60_000, "fmnist": 60_000, "cifar10": 50_000, "celeba": 162_770}


def _fmt(record: dict) -> str:
    """One progress line per round."""
    parts = [f"[round {record['round']}] clients {record['clients']}/{record['asked']}"]
    if record["skipped"]:
        parts.append(f"SKIPPED ({record.get('skip_reason') or 'reason not recorded'})")
    else:
        parts.append(
            f"up {record['uplink_bytes'] / 1e3:.1f} kB ({record['uplink_bits_per_weight']:.5f} bit/w)"
        )
        parts.append(f"down {record['downlink_bytes'] / 1e6:.2f} MB")
        if record.get("mada_lambda") is not None:
            parts.append(f"lambda {record['mada_lambda']:.3f}")
        if record["loss"] is not None:
            parts.append(f"loss {record['loss']:.4g}")
    if record["dropped"]:
        parts.append(f"dropped {len(record['dropped'])}")
    parts += [f"{k} {v:.4g}" for k, v in record.get("eval", {}).items()]
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.parse(context.run_config)  # a bad key (or key combination) stops the run here
    out = cfg.resolved_output_dir()
    run_dir = find_run_dir(out, cfg.resume_run) if cfg.resume else new_run_dir(out, context.run_id)
    lock = RunLock(run_dir).acquire()  # released when the run ends, or by the kernel if it dies
    try:
        _run(grid, cfg, out, run_dir)
    finally:
        lock.release()


def _run(grid: Grid, cfg: RunConfig, out, run_dir) -> None:
    device = pick_device(cfg.device)
    spec = generator_spec(cfg)
    model = ResnetGenerator(spec)
    n, layout = num_masked(model), layout_fingerprint(model)

    method = method_for(cfg)
    downlink = method.downlink(cfg)
    key = method.down_key
    start_round, history, run_tag, aggregator_state = 0, [], secrets.token_hex(4), None
    # the global vector (scores, or weights for the baseline), as the state the server keeps
    vector = downlink.settle(get_flat(model, method.vector_attr).numpy())
    if cfg.resume:
        ckpt = load_checkpoint(run_dir)  # the newest readable one; falls back past a corrupt one
        check_resume_config(
            ckpt["run_config"],
            cfg.model_dump(by_alias=True),
            run_dir,
            defaults=RunConfig().model_dump(by_alias=True),
        )
        if ckpt["spec"] != spec.to_dict():
            raise ValueError(
                f"checkpoint in {run_dir} is for generator {ckpt['spec']}, this run builds {spec.to_dict()}"
            )
        if ckpt["scores"].numel() != n:
            raise ValueError(
                f"checkpoint in {run_dir} holds {ckpt['scores'].numel()} values, the model has {n}"
            )
        start_round, history, run_tag = ckpt["round"], ckpt["history"], ckpt["run_tag"]
        vector = ckpt["scores"].numpy()
        aggregator_state = ckpt.get("aggregator", {})
        point_latest(out, run_dir)
        log.warning("resuming %s at round %d of %d", run_dir, start_round, cfg.num_server_rounds)
    remaining = cfg.num_server_rounds - start_round
    print(
        f"PRISM: {cfg.dataset}, ngf {cfg.ngf} ({n:,} masked weights), {method.describe(cfg)}, "
        f"{remaining} rounds to go; outputs in {run_dir}",
        flush=True,
    )

    strategy = _strategy(cfg, method, n, layout, start_round, aggregator_state)
    evaluator = Evaluator(
        cfg.dataset,
        cfg.resolved_data_dir(),
        cfg.eval_samples,
        cfg.seed,
        device,
        cfg.download,
        inception_weights=cfg.inception_weights or None,
        feature_metrics=cfg.eval_feature_metrics,
    )

    def evaluate_and_record(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Called by Strategy.start at round 0 and after every round: eval, history, checkpoint."""
        rnd = local_round + start_round
        if local_round == 0 and start_round > 0:
            return None  # resumed: round start_round was evaluated and recorded before the crash
        s = arrays[key].numpy()  # the global state (float32)
        record = strategy.round_records.get(rnd) or strategy.empty_record(rnd)
        if rnd % cfg.eval_every == 0 or rnd == cfg.num_server_rounds:
            set_flat(model, torch.from_numpy(s), method.vector_attr)
            metrics, fake = evaluator.evaluate(model, method.eval_mask_mode)
            save_grid(fake[:64], run_dir / "samples" / f"round-{rnd:04d}.png")
            record["eval"] = metrics
        record["time"] = time.time()
        history.append(record)
        if rnd > 0:
            print(_fmt(record), flush=True)
        # Checkpoint first: whatever history.json shows is already safe to resume from.
        save_checkpoint(
            run_dir,
            {
                "round": rnd,
                "scores": s.copy(),
                "history": history,
                "run_tag": run_tag,
                "spec": spec.to_dict(),
                "run_config": cfg.model_dump(by_alias=True),
                "aggregator": strategy.state_dict(),
            },
        )
        write_text_atomic(run_dir / "history.json", json.dumps(history, indent=1))
        if local_round == 0 and not cfg.resume:
            point_latest(out, run_dir)  # only now: a run that failed before this leaves latest as it was
        if "eval" in record:
            plot_history(history, run_dir / "history.png")
        return MetricRecord(record["eval"]) if "eval" in record else None

    t0 = time.time()
    result = strategy.start(
        grid=PromptGrid(grid),
        initial_arrays=ArrayRecord({key: Array(vector)}),
        num_rounds=remaining,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"run-tag": run_tag}),
        evaluate_fn=evaluate_and_record,
    )
    check_learned(strategy.round_records)  # a run in which no round applied ends failed
    final = result.arrays[key].numpy() if key in result.arrays else vector
    _export(cfg, method, run_dir, model, final, history, time.time() - t0, evaluator.feature_info)


class NothingLearned(RuntimeError):
    """Every round of the run was skipped: the global state is the one it started from."""


def check_learned(round_records: dict[int, dict]) -> None:
    """``NothingLearned`` when rounds ran and every one was skipped, naming the last skip's reason
    in one line (Flower then marks the run ``finished:failed``; ``prism-flwr last-run`` shows it)."""
    if round_records and all(r["skipped"] for r in round_records.values()):
        last = round_records[max(round_records)]
        why = " ".join(str(last.get("skip_reason") or "reason not recorded").split())
        raise NothingLearned(
            f"no round applied: all {len(round_records)} rounds were skipped; "
            f"the last (round {last['round']}): {why}"
        )


def _strategy(
    cfg: RunConfig, method: Method, n: int, layout: bytes, start_round: int, aggregator_state: dict | None
) -> RecordingFedAvg:
    """The strategy that aggregates ``method`` (MADA over PRISM's masks, FedAvg of the dense
    baseline's weights), given everything it needs; the class reads its own keys of ``cfg``."""
    cls = next(c for c in STRATEGY_CLASSES if c.method is method)
    if cfg.secure_aggregation != "off":  # RunConfig allows it with PRISM only
        cls = SecAggMADA
    return cls.from_config(
        cfg,
        layout=layout,
        state=aggregator_state,
        num_weights=n,
        seed=cfg.seed,
        eval_every=cfg.eval_every,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=privacy_for(cfg).fraction_evaluate(cfg.fraction_evaluate),
        min_train_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
        num_classes=NUM_CLASSES[cfg.dataset],
        max_examples=TRAIN_SIZE[cfg.dataset],
        downlink=method.downlink(cfg),
        round_offset=start_round,
    )


def _export(
    cfg: RunConfig,
    method: Method,
    out,
    model: ResnetGenerator,
    final: np.ndarray,
    history: list,
    seconds: float,
    feature_info: dict | None,
) -> None:
    """Final model (the method's: PRISM a sparse file with a mask sampled from theta, as the paper
    evaluates; the dense baseline its float32 weights), sample grid, summary and closing lines."""
    path, density, exported = method.export(model, final, cfg, out)
    size = path.stat().st_size
    save_grid(generate(exported, 64, cfg.seed), out / "samples.png")
    summary = {
        "method": cfg.method,
        "rounds": cfg.num_server_rounds,
        "wall_seconds": seconds,
        "model_bytes": size,
        "dense_float32_bytes": dense_float32_bytes(model.spec),
        "density": density,
        "masked_weights": num_masked(model),
        "uplink_bytes_total": int(sum(r["uplink_bytes"] for r in history)),
        "downlink_bytes_total": int(sum(r.get("downlink_bytes") or 0 for r in history)),
        "final_eval": next((r["eval"] for r in reversed(history) if "eval" in r), None),
        "eval_features": feature_info,  # metric name, network, weights path, classifier test accuracy
        "dp": cfg.dp,
        # privacy spent by each client by the end (from its last reply), under DP
        "dp_epsilon_per_client": next(
            (r["dp_epsilon_per_client"] for r in reversed(history) if "dp_epsilon_per_client" in r), None
        ),
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    print(closing_summary(history, out, summary), flush=True)
