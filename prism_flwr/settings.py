"""What the run config and the node config parse alike: kebab-case keys, the download switch, and
one line per bad key (``RunConfig`` in ``config.py``, ``NodeConfig`` in ``node_config.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def kebab(name: str) -> str:
    return name.replace("_", "-")


def download_value(value: Any) -> bool | str:
    """true / false / "auto" (booleans also as strings), else one clear message."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(value.strip().lower(), "auto")
    raise ValueError('Input should be true, false or "auto"')


def describe(error: dict, what: str, model: type[BaseModel]) -> str:
    """One line for one pydantic error of ``model``, the ``what`` config (``run-config``, ``node-config``)."""
    key = ".".join(str(p) for p in error["loc"])
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(f.alias or n for n, f in model.model_fields.items()))
        return f"{what} key '{key}' is unknown (known keys: {known})"
    if not key:  # a cross-key check
        return f"invalid {what.replace('-', ' ')}: {msg}"
    return f"{what} key '{key}' = {error['input']!r}: {msg}"
