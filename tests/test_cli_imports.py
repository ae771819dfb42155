"""``prism-flwr supernode`` runs beside a node's ClientApps on small devices: the command line and the
SuperNode wrapper import no torch (about 180 MiB), and the command's dataset names are the data
package's."""

import subprocess
import sys

from tools.flowerkit import REPO


def test_the_supernode_command_imports_no_torch():
    code = (
        "import sys; import prism_flwr.cli; import prism_flwr.deployment.supernode; "
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch" not in out.stdout.strip().splitlines()[-1], out.stdout


def test_dataset_names_are_the_data_packages():
    from prism_flwr import cli
    from prism_flwr.data.datasets import DATASETS

    assert tuple(cli.DATASETS) == DATASETS
