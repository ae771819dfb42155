"""prism_flwr.eager_torch: an optimizer step leaves torch's compiler stack unimported, with the same
numbers, and everything else still reaches the real ``torch._dynamo`` (one module, never two)."""

from __future__ import annotations

import json
import subprocess
import sys

from tools.flowerkit import REPO

SCRIPT = r"""
import json, sys, torch
defer = sys.argv[1] == "1"
if defer:
    from prism_flwr.eager_torch import defer_dynamo
    assert defer_dynamo() and defer_dynamo()  # a second call finds the stand-in in place
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
opt = torch.optim.Adam(net.parameters(), lr=0.1)
for _ in range(3):
    opt.zero_grad()
    net(torch.randn(4, 1, 8, 8)).square().sum().backward()
    opt.step()
out = {"weights": [p.detach().flatten().tolist() for p in net.parameters()],
       "sympy_after_steps": "sympy" in sys.modules}
out["sympy_after_opacus"] = None
if defer:  # opacus (the DP modes' accountant) imports torch.distributed, whose custom ops walk sys.modules
    from opacus.accountants import RDPAccountant  # noqa: F401
    out["sympy_after_opacus"] = "sympy" in sys.modules
import torch._dynamo.utils as utils  # a submodule: hands over to the real package
out["one_module"] = utils is sys.modules["torch._dynamo.utils"] is torch._dynamo.utils
out["real"] = type(sys.modules["torch._dynamo"]).__name__ == "module" and hasattr(torch._dynamo, "optimize")
f = torch.compile(lambda x: x.sin() + 1, backend="eager")
out["compiled"] = bool(torch.allclose(f(torch.ones(3)), torch.ones(3).sin() + 1))
opt.step()
print(json.dumps(out))
"""


def _run(defer: bool) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if defer else "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_steps_without_the_compiler_stack_then_the_real_one() -> None:
    deferred, plain = _run(True), _run(False)
    assert deferred["weights"] == plain["weights"]  # the same steps, bit for bit
    assert not deferred["sympy_after_steps"] and plain["sympy_after_steps"]
    assert deferred["sympy_after_opacus"] is not None  # opacus imported beside the stand-in
    assert deferred["one_module"] and deferred["real"] and deferred["compiled"]
