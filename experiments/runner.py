"""Run the real Flower app (simulation engine) from a benchmark script and collect its outputs.

Every experiment goes through ``flwr run .`` exactly as a user would, so what is measured is
the app itself, not a re-implementation. Each run writes to its own ``output-dir``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def run_app(
    run_config: dict,
    out_dir: Path,
    nodes: int = 4,
    cpus_per_node: int = 1,
    gpus_per_node: float = 0.0,
    log: Path | None = None,
) -> dict:
    """``flwr run .`` with ``run_config``; returns {"history", "summary", "wall_seconds"}."""
    out_dir = Path(out_dir).resolve()  # the ServerApp runs in another working directory
    cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in {**run_config, "output-dir": str(out_dir)}.items())
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    federation = f"num-supernodes={nodes} client-resources-num-cpus={cpus_per_node}"
    if gpus_per_node:
        federation += f" client-resources-num-gpus={gpus_per_node:g}"
    cmd = ["flwr", "run", str(REPO), "--stream", "--run-config", cfg, "--federation-config", federation]
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log or os.devnull, "w") as sink:
        subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    wall = time.time() - t0
    summary_path = out_dir / "latest" / "summary.json"  # each run writes into its own folder
    if not summary_path.is_file():
        raise RuntimeError(
            f"run with {cfg!r} produced no summary (see {log}); `prism-flwr last-run` says why"
        )
    return {
        "history": json.loads((out_dir / "latest" / "history.json").read_text()),
        "summary": json.loads(summary_path.read_text()),
        "wall_seconds": wall,
    }
