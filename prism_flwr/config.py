"""The run configuration: every key of ``[tool.flwr.app.config]``, validated in one place.

Flower hands the ServerApp and every ClientApp the same flat ``run_config`` dict (pyproject
defaults plus ``--run-config`` overrides). ``RunConfig.parse`` checks it and raises
``ConfigError`` whose message is one line per bad key, naming the key, the value given and what is
allowed, so a typo stops the run before any training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from prism_flwr.privacy import check_dp_compatible


class ConfigError(ValueError):
    """Invalid run configuration."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _download(value: Any) -> bool | str:
    """true / false / "auto" (booleans also as strings), else one clear message."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("auto", "true", "false")):
        return value if isinstance(value, bool) else {"true": True, "false": False}.get(value.strip().lower(), "auto")
    raise ValueError('Input should be true, false or "auto"')


class RunConfig(BaseModel):
    model_config = ConfigDict(alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True)

    # data (data-dir and download: the server's own evaluation data; a client uses its node config's)
    dataset: Literal["mnist", "fmnist", "cifar10", "celeba"] = "fmnist"
    data_dir: str = "~/.cache/prism-flwr/data"
    download: Annotated[Literal["auto"] | bool, BeforeValidator(_download)] = "auto"  # auto/true: fetch once
    partitioning: Literal["iid", "shards", "dirichlet", "attribute"] = "shards"
    dirichlet_alpha: float = Field(0.1, gt=0)
    shards_per_partition: int = Field(4, ge=1)
    # federation
    num_server_rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0)
    # model
    ngf: int = Field(16, ge=1, le=512)
    nz: int = Field(128, ge=1)
    seed: int = Field(30, ge=0)
    # local training
    local_steps: int = Field(100, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.2, gt=0)
    objective: Literal["feature-matching", "mmd"] = "mmd"
    features: Literal["pixels", "random-conv", "vgg19"] = "pixels"
    vgg19_weights: str = ""
    estimator: Literal["scaled", "identity"] = "scaled"
    # what is learned: PRISM's masks, or the dense FedAvg baseline (same generator, trained weights)
    method: Literal["prism", "dense"] = "prism"
    dense_lr: float = Field(1e-3, gt=0)
    # aggregation
    aggregation: Literal["mada", "mean", "mada-change", "adam", "beta"] = "mean"
    uplink_coding: Literal["coded", "raw"] = "coded"
    downlink: Literal["grid8", "float32"] = "grid8"
    mada_space: Literal["score", "probability"] = "score"
    # evaluation and outputs
    eval_every: int = Field(1, ge=1)
    eval_samples: int = Field(1000, ge=7)  # precision/recall need more than k + 1 = 6 samples
    eval_feature_metrics: bool = True
    inception_weights: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "~/prism-flwr/outputs"  # the server's outputs; clients write under their state-dir
    resume: bool = False
    # privacy
    dp: Literal["off", "theta", "statistics"] = "off"
    dp_epsilon: float = Field(9.8, gt=0)
    dp_delta: float = Field(1e-5, gt=0, lt=1)
    dp_clip: float = Field(0.1, gt=0, lt=0.5)
    dp_feature_clip: float = Field(32.0, gt=0)
    # security and reliability (issue 16)
    resume_run: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")  # run folder to resume; "" = latest
    robust_aggregation: Literal["off", "on"] = "off"  # PRISM: duplicates, Hamming outliers, trimmed counts
    robust_trim: int = Field(1, ge=0)                 # votes trimmed at each end, per weight
    robust_outlier_mads: float = Field(3.0, ge=0)     # Hamming-distance outlier threshold; 0 = no filter

    @model_validator(mode="after")
    def _compatible(self) -> "RunConfig":
        check_dp_compatible(self.dp, self.objective)
        if self.method == "dense" and self.dp != "off":
            raise ValueError("method='dense' is the non-private baseline: use dp='off'")
        if self.partitioning == "attribute" and self.dataset != "celeba":
            raise ValueError("partitioning='attribute' splits CelebA by its Male attribute: use dataset='celeba'")
        return self

    @classmethod
    def parse(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise ConfigError("; ".join(_describe(e) for e in err.errors())) from None

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(f.alias or n for n, f in RunConfig.model_fields.items()))
        return f"run-config key '{key}' is unknown; known keys: {allowed}"
    if not key:  # a cross-key check
        return f"invalid run config: {error['msg'].removeprefix('Value error, ')}"
    return f"run-config key '{key}' = {error['input']!r}: {error['msg'].removeprefix('Value error, ')}"
