"""Shared fixtures: one prepared copy of the real Fashion-MNIST per test session."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

FMNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")

# torch's OpenMP threads spin while they wait for work (libgomp's default policy). On a machine other
# jobs share, they burn the cores the others need: started side by side on a busy 2-core machine,
# test_evaluation.py passed in 5.6 min on 39 CPU-seconds with sleeping threads and in 28.5 min on 192
# with spinning ones. Set before torch is imported (libgomp reads it once); the Flower processes the
# tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory holding real Fashion-MNIST (prepared from Debian's package on first use).

    ``PRISM_TEST_DATA_DIR`` points the tests at an existing data directory instead (e.g. on a
    machine without the Debian package but with the torchvision layout).
    """
    if os.environ.get("PRISM_TEST_DATA_DIR"):
        return Path(os.environ["PRISM_TEST_DATA_DIR"])
    if not FMNIST_DEBIAN.is_dir():
        pytest.skip(
            "real Fashion-MNIST needs `apt-get install dataset-fashion-mnist` (the README's test command does it)"
        )
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def loopback_certs(tmp_path_factory) -> Path:
    """docker/certs/generate.sh's private CA and server certificate (127.0.0.1, localhost), made
    once per session: two RSA-4096 keys. Tests only read the folder."""
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    certs = tmp_path_factory.mktemp("certs")
    script = Path(__file__).resolve().parents[1] / "docker" / "certs" / "generate.sh"
    subprocess.run(["bash", str(script), "-o", str(certs)], check=True, capture_output=True, timeout=120)
    return certs


@pytest.fixture
def task_identity():
    """Flower messages need the identity a running ServerApp has; give them one outside Flower
    (``pytestmark = pytest.mark.usefixtures("task_identity")`` in a test module)."""
    from tools import security_probe

    saved = security_probe.set_task_identity()
    yield
    security_probe.restore_task_identity(saved)


@pytest.fixture(scope="session")
def seeded_simulation(data_dir: Path, tmp_path_factory):
    """One simulation SuperLink for this test run's runs compared with the in-process runner: the
    nodes' masks from test seed 5 (``inprocess.run(..., insecure_test_mask_seed=5)`` draws the same),
    their state in one session folder. Every process it started is gone after the session."""
    from tests.support.simulation import Simulation
    from tools import procs

    with procs.Processes() as ps:
        yield Simulation(tmp_path_factory.mktemp("seeded-sim"), ps, data_dir=data_dir, test_mask_seed=5)
    procs.assert_gone(ps.pids)
