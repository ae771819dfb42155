"""PRISM core: frozen random generators with learned stochastic binary masks.

Framework-free: nothing here imports Flower. The Flower glue lives in ``client_app.py``,
``server_app.py`` and ``strategies/``.
"""
