"""PRISM core: frozen random generators with learned stochastic binary masks.

Framework-free: nothing here imports Flower except ``deployment/``. Layers, bottom up:
``data``, ``model``, ``privacy``, ``storage``, ``federated``, ``evaluation``; ``config`` and
``cli`` on top. The Flower apps are ``client_app.py``, ``server_app.py`` and ``strategies/``.
"""

from prism_flwr import threads as _threads  # noqa: F401  (OpenMP's wait policy, before torch loads)
