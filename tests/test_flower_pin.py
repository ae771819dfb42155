"""The Flower version pin: code that imports Flower internals refuses any Flower but 1.42.x, with
one clear line, before it imports them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prism_flwr.deployment.flower_pin import UnsupportedFlowerVersion, require_flower
from tools.flowerkit import REPO


def test_the_pin_accepts_1_42_and_refuses_the_rest() -> None:
    for version in ("1.42.0", "1.42.7"):
        assert require_flower("x", version=version) == version
    for version in ("1.43.0", "1.41.2", "2.0.0", "1.4.2"):
        with pytest.raises(UnsupportedFlowerVersion, match=f"the installed Flower is {version}. Install"):
            require_flower("the thing", version=version)


FAKE_1_43 = (
    "import prism_flwr.deployment.flower_pin as pin; pin.installed_flower_version = lambda: '1.43.0'; "
)


@pytest.mark.parametrize("module", ["strategies.wire", "prism_flwr.deployment.executor"])
def test_modules_using_flower_internals_refuse_another_flower_before_importing_them(module: str) -> None:
    """Under a Flower that says 1.43.0 the import fails with the pin's line, and none of the
    internals (``flwr.supercore``, ``flwr.common.serde``, ``flwr.supernode``) was imported."""
    probe = (
        FAKE_1_43
        + f"""
try:
    import {module}
except pin.UnsupportedFlowerVersion as err:
    print(err)
import sys
print(sorted(m for m in sys.modules if m.split('.')[:2] in (['flwr', 'supercore'], ['flwr', 'supernode'])
             or m == 'flwr.common.serde'))
"""
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    refusal, imported = out.stdout.strip().splitlines()[-2:]
    assert "relies on Flower internals and was tested with Flower 1.42.x only" in refusal, out.stdout
    assert "the installed Flower is 1.43.0" in refusal
    assert imported == "[]", imported
