"""Fault injection lives in the tests only: the production apps never read its variable, and the
test-only ClientApp's mod raises or corrupts exactly the partitions it is told to."""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from prism_flwr.federated.records import MASK_KEY, METRICS_KEY
from tests.support.fault_client_app import FAULT_ENV, fault_app_dir, fault_mod
from tests.support.messages import reply_message

pytestmark = pytest.mark.usefixtures("task_identity")
REPO = Path(__file__).resolve().parents[1]


def test_production_code_does_not_read_the_fault_variable():
    production = [
        REPO / "client_app.py",
        REPO / "server_app.py",
        *(REPO / "strategies").glob("*.py"),
        *(REPO / "prism_flwr").rglob("*.py"),
    ]
    assert len(production) > 10
    readers = [p.relative_to(REPO).as_posix() for p in production if FAULT_ENV in p.read_text()]
    assert readers == []


def _message(message_type="train"):
    return reply_message(0, dst=3, message_id="m", reply_to="", message_type=message_type)


def _context(pid):
    return Context(run_id=1, node_id=3, node_config={"partition-id": pid}, state=RecordDict(), run_config={})


def _honest(msg, context):
    content = RecordDict(
        {
            MASK_KEY: ArrayRecord({MASK_KEY: Array(np.arange(6, dtype=np.uint8))}),
            METRICS_KEY: MetricRecord({"num-examples": 1}),
        }
    )
    return Message(content=content, reply_to=msg)


def test_fault_mod_raises_and_corrupts_the_named_partitions(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "raise=1 corrupt=2")
    with pytest.raises(RuntimeError, match="fails on purpose"):
        fault_mod(_message(), _context(1), _honest)
    bad = fault_mod(_message(), _context(2), _honest).content[MASK_KEY][MASK_KEY].numpy()
    assert bad.tolist() == [0, 1, 2, 3, 4, 5 ^ 0xFF]
    good = fault_mod(_message(), _context(0), _honest).content[MASK_KEY][MASK_KEY].numpy()
    assert good.tolist() == list(range(6))
    evaluated = fault_mod(_message("evaluate"), _context(1), _honest)  # training only
    assert evaluated.content[MASK_KEY][MASK_KEY].numpy().tolist() == list(range(6))


def test_fault_app_dir_loads_the_test_app(tmp_path):
    app = fault_app_dir(tmp_path / "app")
    text = (app / "pyproject.toml").read_text()
    assert (
        'clientapp = "tests.support.fault_client_app:app"' in text and 'serverapp = "server_app:app"' in text
    )
    assert (app / "tests" / "support" / "fault_client_app.py").is_file() and (app / "client_app.py").is_file()
