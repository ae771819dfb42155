"""Keep torch's compiler stack (``torch._dynamo``, sympy: about 150 MiB) out of an eager process.

``torch.optim``'s ``Optimizer`` imports ``torch._dynamo`` the first time it is built and at
every ``step()``, only to call ``graph_break()`` and ``disable(fn)``, which do nothing outside
``torch.compile``. That import alone was half of a ClientApp's memory above torch + Flower
(``benchmarks/client_memory.py``: about 78 MiB anonymous + 75 MiB file-backed of a 290 MiB
train peak). ``defer_dynamo()`` puts a stand-in at ``torch._dynamo`` that answers those two
calls as eager torch does, and hands over to the real module (imported then) for anything
else, so ``torch.compile`` and every other use still get the real one. (What torch wrapped with
``disable`` before that stays a plain function under a later ``torch.compile``: a ClientApp
compiles nothing.)
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable

NAME = "torch._dynamo"


class _Deferred(types.ModuleType):
    """``torch._dynamo`` until something asks for more than these two; then the real module."""

    @staticmethod
    def graph_break(msg: str = "") -> None:
        """Outside ``torch.compile`` a graph break is nothing."""

    @staticmethod
    def disable(fn: Callable | None = None, recursive: bool = True, *, reason: str | None = None,
                wrapping: bool = True):  # fmt: skip
        """Outside ``torch.compile`` a function run with dynamo disabled is the function."""
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name: str):
        # __path__, which `import torch._dynamo.x` asks for first, hands over (x then comes from the
        # real package); other dunders do not: `inspect.getmodule` asks every module in sys.modules
        # for __file__, and handing over there imports the compiler stack midway through another
        # import (opacus -> torch.distributed registering its custom ops), which then fails
        if name.startswith("__") and name != "__path__":
            raise AttributeError(name)
        return getattr(_real(), name)


def _real() -> types.ModuleType:
    import torch

    if isinstance(sys.modules.get(NAME), _Deferred):
        del sys.modules[NAME]
        if isinstance(torch.__dict__.get("_dynamo"), _Deferred):
            del torch._dynamo
    return importlib.import_module(NAME)


def defer_dynamo() -> bool:
    """Install the stand-in unless ``torch._dynamo`` is imported already; True when installed."""
    import torch

    if NAME in sys.modules:
        return isinstance(sys.modules[NAME], _Deferred)
    stand_in = _Deferred(NAME, __doc__)
    sys.modules[NAME] = stand_in
    torch._dynamo = stand_in
    return True
