"""The node's own configuration: what the machine that holds the data decides, not the server.

``flower-supernode --node-config "partition-id=0 num-partitions=2 data-dir='/data' ..."``; keys the
node config lacks come from the environment variable ``PRISM_NODE_CONFIG`` (same syntax; how a
simulation gives its nodes settings), then from the defaults below. ``NodeConfig.parse`` raises
``NodeConfigError``, one line per bad key. ``refusal`` says why this node will not take part in a
run that asks for less privacy than its floor. Which key comes from whom and why: docs/privacy.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

ENV = "PRISM_NODE_CONFIG"
# Privacy floors from weakest to strongest: client-level DP (theta) implies sample-level (statistics).
DP_ORDER = ("off", "statistics", "theta")
_PAIR = re.compile(r"""([A-Za-z0-9_-]+)=('[^']*'|"[^"]*"|[^\s'"]+)""")


class NodeConfigError(ValueError):
    """Invalid node configuration."""


class Refusal(RuntimeError):
    """This node will not take part in a run: the text is about configuration, never about data."""


def _download(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"true": True, "false": False}.get(value.strip().lower(), "auto")
    raise ValueError('Input should be true, false or "auto"')


class NodeConfig(BaseModel):
    model_config = ConfigDict(
        alias_generator=lambda n: n.replace("_", "-"), populate_by_name=True, extra="forbid", frozen=True
    )

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(ge=1)
    data_dir: str = "~/.cache/prism-flwr/data"
    state_dir: str = "~/.local/state/prism-flwr"  # client state and the privacy ledger
    download: Annotated[Literal["auto"] | bool, BeforeValidator(_download)] = "auto"
    min_dp: Literal["off", "statistics", "theta"] = "off"
    dp_budget: float = Field(9.8, gt=0)  # epsilon over all runs on this data
    max_dp_epsilon: float | None = Field(None, gt=0)  # per run; None: dp-budget
    max_dp_delta: float = Field(1e-5, gt=0, lt=1)  # largest delta accepted; the ledger's delta
    # secure aggregation (docs/secure-aggregation.md); "{partition-id}" in a path is this node's id
    secagg_key: str = ""  # this node's Ed25519 signing key (PEM); with secagg-roster: signed rounds
    secagg_roster: str = ""  # the federation's public keys (JSON), distributed out of band
    require_secure_aggregation: bool = False  # refuse a run with secure-aggregation = "off"
    min_secure_aggregation_clients: int = Field(0, ge=0)  # refuse a round of fewer clients or a lower t

    @model_validator(mode="after")
    def _partition_in_range(self) -> NodeConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id {self.partition_id} must be below num-partitions {self.num_partitions}"
            )
        return self

    @model_validator(mode="after")
    def _key_with_roster(self) -> NodeConfig:
        if bool(self.secagg_key) != bool(self.secagg_roster):
            raise ValueError(
                "secagg-key and secagg-roster go together (a signing key is checked against a roster)"
            )
        return self

    def secagg_files(self) -> tuple[Path, Path] | None:
        """(signing key, roster) with this node's partition id filled in; None: unauthenticated."""
        if not self.secagg_key:
            return None
        return tuple(
            Path(p.replace("{partition-id}", str(self.partition_id))).expanduser()
            for p in (self.secagg_key, self.secagg_roster)
        )

    def secagg_refusal(self, secure_aggregation: str) -> str | None:
        """Why this node refuses a run with this ``secure-aggregation`` mode; None if it takes part."""
        if self.require_secure_aggregation and secure_aggregation == "off":
            return (
                "node refuses the run: secure-aggregation='off', "
                "this node has require-secure-aggregation=true"
            )
        return None

    @classmethod
    def parse(cls, node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> NodeConfig:
        environ = os.environ if environ is None else environ
        try:
            merged = {**parse_pairs(environ.get(ENV, "")), **dict(node_config)}
            return cls.model_validate(merged)
        except NodeConfigError:
            raise
        except ValidationError as err:
            raise NodeConfigError("; ".join(_describe(e) for e in err.errors())) from None

    @property
    def run_epsilon_cap(self) -> float:
        return self.dp_budget if self.max_dp_epsilon is None else self.max_dp_epsilon

    def resolved(self, key: Literal["data_dir", "state_dir"]) -> Path:
        return Path(getattr(self, key)).expanduser().resolve()

    def refusal(self, dp: str, epsilon: float, delta: float) -> str | None:
        """Why this node refuses a run asking for ``dp`` at (``epsilon``, ``delta``); None if it
        takes part."""
        if DP_ORDER.index(dp) < DP_ORDER.index(self.min_dp):
            return (
                f"node refuses the run: dp={dp!r} is weaker than this node's floor "
                f"min-dp={self.min_dp!r} (order: {' < '.join(DP_ORDER)})"
            )
        if dp != "off" and epsilon > self.run_epsilon_cap:
            return (
                f"node refuses the run: dp-epsilon={epsilon:g} is above this node's max-dp-epsilon="
                f"{self.run_epsilon_cap:g}"
            )
        if dp != "off" and delta > self.max_dp_delta:
            return (
                f"node refuses the run: dp-delta={delta:g} is above this node's "
                f"max-dp-delta={self.max_dp_delta:g}"
            )
        return None


def parse_pairs(text: str) -> dict[str, Any]:
    """``"a=1 b='x y'"`` -> ``{"a": 1, "b": "x y"}`` (values in TOML, as Flower's --node-config)."""
    out: dict[str, Any] = {}
    rest = _PAIR.sub("", text).strip()
    if rest:
        raise NodeConfigError(f"{ENV}: {rest[:80]!r} is not key=value")
    for key, value in _PAIR.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise NodeConfigError(
                f"{ENV}: value of {key!r} is not TOML (quote strings: {key}='...')"
            ) from None
    return out


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted(f.alias or n for n, f in NodeConfig.model_fields.items()))
        return f"node-config key '{key}' is unknown (known keys: {known})"
    if not key:
        return f"invalid node config: {error['msg'].removeprefix('Value error, ')}"
    return f"node-config key '{key}' = {error['input']!r}: {error['msg'].removeprefix('Value error, ')}"
