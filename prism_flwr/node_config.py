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
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from prism_flwr.deployment.pinning import KEYS_KEY, PIN_KEY, parse_pins
from prism_flwr.privacy.modes import BY_RANK, MODES, NoPrivacy
from prism_flwr.settings import describe, download_value, kebab

ENV = "PRISM_NODE_CONFIG"
# Privacy floors from weakest to strongest: client-level DP (theta) implies sample-level (statistics).
DP_ORDER = BY_RANK
_PAIR = re.compile(r"""([A-Za-z0-9_-]+)=('[^']*'|"[^"]*"|[^\s'"]+)""")


class NodeConfigError(ValueError):
    """Invalid node configuration."""


class Refusal(RuntimeError):
    """This node will not take part in a run: the text is about configuration, never about data."""


def _trusted_apps(value: str | None) -> str | None:
    if value is not None:
        parse_pins(value)  # ValueError naming the first entry that is not a SHA-256
    return value


def _trusted_app_keys(value: str | None) -> str | None:
    if value is not None:
        parse_pins(value, KEYS_KEY)  # ValueError naming the first entry that is not a public key
    return value


class NodeConfig(BaseModel):
    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True)

    partition_id: int = Field(ge=0)
    num_partitions: int = Field(ge=1)
    data_dir: str = "~/.cache/prism-flwr/data"
    state_dir: str = "~/.local/state/prism-flwr"  # client state and the privacy ledger
    download: Annotated[Literal["auto"] | bool, BeforeValidator(download_value)] = "auto"
    min_dp: Literal["off", "statistics", "theta"] = "off"
    dp_budget: float = Field(9.8, gt=0)  # epsilon over all runs on this data
    max_dp_epsilon: float | None = Field(None, gt=0)  # per run; None: dp-budget
    max_dp_delta: float = Field(1e-5, gt=0, lt=1)  # largest delta accepted; the ledger's delta
    vgg19_weights: str = ""  # torchvision's vgg19-dcbb9e9d.pth on this node; empty: the torch hub cache
    # the app bundles this node runs (SHA-256s, publishers' Ed25519 keys), checked by its ClientApp
    # process before the bundle is installed (deployment/pinning.py)
    trusted_apps: Annotated[str | None, AfterValidator(_trusted_apps)] = None
    trusted_app_keys: Annotated[str | None, AfterValidator(_trusted_app_keys)] = None
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
            from_env = parse_pairs(environ.get(ENV, ""))
            if pinned := sorted({PIN_KEY, KEYS_KEY} & set(from_env)):  # the ClientApp process reads them
                raise NodeConfigError(f"{ENV}: {', '.join(pinned)} only as the SuperNode's --node-config")
            return cls.model_validate({**from_env, **dict(node_config)})
        except NodeConfigError:
            raise
        except ValidationError as err:
            raise NodeConfigError("; ".join(describe(e, "node-config", cls) for e in err.errors())) from None

    @property
    def run_epsilon_cap(self) -> float:
        return self.dp_budget if self.max_dp_epsilon is None else self.max_dp_epsilon

    def resolved(self, key: Literal["data_dir", "state_dir"]) -> Path:
        return Path(getattr(self, key)).expanduser().resolve()

    def refusal(self, privacy: NoPrivacy, epsilon: float, delta: float) -> str | None:
        """Why this node refuses a run asking for the privacy mode ``privacy`` at (``epsilon``,
        ``delta``); None if it takes part."""
        if privacy.rank < MODES[self.min_dp].rank:
            return (
                f"node refuses the run: dp={privacy.name!r} is weaker than this node's floor "
                f"min-dp={self.min_dp!r} (order: {' < '.join(DP_ORDER)})"
            )
        if privacy.spends and epsilon > self.run_epsilon_cap:
            return (
                f"node refuses the run: dp-epsilon={epsilon:g} is above this node's max-dp-epsilon="
                f"{self.run_epsilon_cap:g}"
            )
        if privacy.spends and delta > self.max_dp_delta:
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
