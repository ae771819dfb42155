"""Test-only ClientApp for the failure drills: the production app behind a fault-injecting mod.

``PRISM_FAULT_INJECTION="raise=1 corrupt=2"`` makes partition 1 raise in every training round and
partition 2 upload its reply with the last byte of the payload flipped; ``secagg-share=1`` (likewise
``secagg-advertise``, ``secagg-masked``, ``secagg-unmask``) makes partition 1 fail that step of
secure aggregation. Only this app reads the
variable; ``fault_app_dir`` builds an app directory whose pyproject loads it instead of
``client_app:app``, which is what the drills hand to ``flwr run``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

import client_app as production
from prism_flwr.federated.records import METRICS_KEY

FAULT_ENV = "PRISM_FAULT_INJECTION"
REPO = Path(__file__).resolve().parents[2]
COMPONENT = "tests.support.fault_client_app:app"
# message type -> secure-aggregation step (the masked vector leaves with the training reply)
SECAGG_STEPS = {
    "query.secagg_advertise": "advertise",
    "query.secagg_share": "share",
    "train": "masked",
    "query.secagg_unmask": "unmask",
}


def injected_fault(pid: int) -> str | None:
    faults = dict(item.split("=") for item in os.environ.get(FAULT_ENV, "").split())
    return next((kind for kind, target in faults.items() if int(target) == pid), None)


def fault_mod(msg: Message, context: Context, call_next) -> Message:
    """Raise, or corrupt the upload of, the partitions named in ``PRISM_FAULT_INJECTION`` (training only)."""
    pid = int(context.node_config["partition-id"])
    kind = msg.metadata.message_type
    fault = injected_fault(pid)
    step = SECAGG_STEPS.get(kind)
    if fault is not None and fault == f"secagg-{step}":
        raise RuntimeError(f"{FAULT_ENV}: partition {pid} fails on purpose in the secagg {step} step")
    if kind != "train":
        return call_next(msg, context)
    if fault == "raise":
        raise RuntimeError(f"{FAULT_ENV}: partition {pid} fails on purpose")
    reply = call_next(msg, context)
    if fault == "corrupt":
        key = next(k for k in reply.content if k != METRICS_KEY)
        payload = reply.content[key][key].numpy().copy()
        payload[-1] ^= 0xFF
        reply.content[key] = ArrayRecord({key: Array(payload)})
    return reply


app = ClientApp(mods=[fault_mod])
app.train()(production.train)
app.evaluate()(production.evaluate)
for _step in ("advertise", "share", "unmask"):
    app.query(f"secagg_{_step}")(getattr(production, f"secagg_{_step}"))


def fault_app_dir(dest: Path) -> Path:
    """A copy of this app (what Flower packs of it) whose pyproject loads the fault-injecting app."""
    skip = shutil.ignore_patterns(
        ".git",
        ".venv",
        "__pycache__",
        "outputs",
        "data",
        "results",
        "docs",
        "*.png",
        ".pytest_cache",
        ".hypothesis",
        "*.egg-info",
    )
    shutil.copytree(REPO, dest, ignore=skip)
    pyproject = dest / "pyproject.toml"
    text, n = re.subn(
        r'(?m)^clientapp = "client_app:app"$', f'clientapp = "{COMPONENT}"', pyproject.read_text()
    )
    if n != 1:
        raise RuntimeError('pyproject.toml: no `clientapp = "client_app:app"` line to replace')
    pyproject.write_text(text)
    return dest
