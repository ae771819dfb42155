"""The run configuration: every key of ``[tool.flwr.app.config]``, validated in one place.

Flower hands the ServerApp and every ClientApp the same flat ``run_config`` dict (pyproject
defaults plus ``--run-config`` overrides). ``RunConfig.parse`` checks it and raises
``ConfigError`` whose message is one line per bad key, naming the key, the value given and what is
allowed, so a typo stops the run before any training.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from prism_flwr import options
from prism_flwr.settings import describe, download_value, kebab


class ConfigError(ValueError):
    """Invalid run configuration."""


class RunConfig(BaseModel):
    """Every run-config key, its default and allowed values; each ``description`` is its documentation.

    ``tools/gen_config_docs.py`` renders these fields into ``docs/configuration.md``.
    """

    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True)

    # data
    dataset: Literal["mnist", "fmnist", "cifar10", "celeba"] = Field(
        "fmnist", description="the dataset, 32x32 (files and downloads: docs/data.md)"
    )
    data_dir: str = Field(
        "~/.cache/prism-flwr/data",
        description="where the server's evaluation data live (docs/data.md); each client uses its node "
        "config's `data-dir` (docs/privacy.md)",
    )
    download: Annotated[Literal["auto"] | bool, BeforeValidator(download_value)] = Field(
        "auto",
        description="for the server's data (a client: node-config `download`); `auto`: fetch a missing "
        "dataset once (torchvision's download, with progress) when the internet is there; `true`: the "
        "same, and a failed fetch is an error; `false`: never fetch (one error says where to put the files)",
    )
    partitioning: Literal["iid", "shards", "dirichlet", "attribute"] = Field(
        "shards",
        description="how the training set is split: label shards, Dirichlet, or CelebA's Male attribute",
    )
    dirichlet_alpha: float = Field(0.1, gt=0, description="Dirichlet concentration over labels")
    shards_per_partition: int = Field(4, ge=1, description="label shards per client (paper: 4)")
    # federation
    num_server_rounds: int = Field(12, ge=1, description="federated rounds")
    fraction_train: float = Field(1.0, gt=0, le=1, description="fraction of connected nodes asked each round")
    fraction_evaluate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fraction of nodes asked, at evaluation rounds, for their local metric (MMD of samples "
        "to their own images); `0` skips it (forced to `0` under DP)",
    )
    min_train_nodes: int = Field(
        2, ge=1, description="fewer valid masks than this: the round is skipped, global state unchanged"
    )
    round_timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies")
    # model
    ngf: int = Field(16, ge=1, le=512, description="generator width (paper: 64)")
    nz: int = Field(128, ge=1, description="latent size")
    seed: int = Field(
        30,
        ge=0,
        description="frozen weights, initial scores, partitions, server RNG and clients' training RNG (not "
        "the uploaded masks nor DP noise: each client draws those from its own secret, docs/privacy.md)",
    )
    # local training
    local_steps: int = Field(100, ge=1, description="local Adam steps on the scores per round (paper: 100)")
    batch_size: int = Field(64, ge=2, description="local batch size (paper: 64)")
    lr: float = Field(0.2, gt=0, description="Adam learning rate on the scores (paper: 0.1)")
    objective: Literal["feature-matching", "mmd"] = Field(
        "mmd", description="`mmd` (unbiased Gaussian-kernel MMD^2) or `feature-matching` (the paper's code)"
    )
    features: Literal["pixels", "random-conv", "vgg19"] = Field(
        "pixels",
        description="`pixels`, `random-conv` (a fixed, seeded random conv net: no pretrained weights) or "
        "`vgg19` (ImageNet weights from the node's disk: node-config `vgg19-weights`)",
    )
    estimator: Literal["scaled", "identity"] = Field(
        "scaled", description="Bernoulli gradient: `scaled` (dL/dtheta = theta dL/dm, official) or `identity`"
    )
    # method: PRISM's masks, or the dense FedAvg baseline (same generator, trained weights)
    method: Literal["prism", "dense"] = Field(
        "prism",
        description="`prism`, or `dense`: the baseline, the same generator with trained weights and FedAvg "
        "(float32 uplink)",
    )
    dense_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the dense baseline's weights")
    # aggregation
    aggregation: Literal["mada", "mean", "mada-change", "adam", "beta"] = Field(
        "mean",
        description="`mean` (PRISM without MADA), `mada` (the paper's rule), or beyond the paper "
        "`mada-change`, `adam`, `beta` (see docs/aggregation.md)",
    )
    uplink_coding: Literal["coded", "raw"] = Field(
        "coded",
        description="`coded`: each mask entropy-coded against the round's global scores (never above raw); "
        "`raw`: 1 bit per weight, less CPU (see docs/wire-format.md)",
    )
    downlink: Literal["grid8", "delta", "float32"] = Field(
        "grid8",
        description="global scores sent as the 8-bit grid's codes, entropy-coded (`grid8`); `delta`: the "
        "change from the global the node holds (full state for a node without it; docs/downlink-delta.md); "
        "or float32",
    )
    mada_space: Literal["score", "probability"] = Field(
        "score",
        description="MADA blends in `score` space (official code) or `probability` space (paper figure)",
    )
    # evaluation and outputs
    eval_every: int = Field(1, ge=1, description="server evaluation period in rounds (paper: 10)")
    eval_samples: int = Field(  # precision/recall need more than k + 1 = 6 samples
        1000, ge=7, description="samples per server evaluation (paper: 10000)"
    )
    eval_feature_metrics: bool = Field(
        True, description="Fréchet distance and precision/recall/density/coverage (else pixel MMD only)"
    )
    inception_weights: str = Field(
        "", description="torchvision Inception-V3 weights file: the quality metric becomes FID"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when visible")
    precision: Literal["auto", "float32", "bf16"] = Field(
        "auto",
        description="the generator's compute precision; `auto`: bf16 autocast on a CPU with AVX512-BF16 or "
        "AMX, else float32 (masks, scores, optimiser state and loss stay float32; docs/benchmarks.md)",
    )
    output_dir: str = Field(
        "~/prism-flwr/outputs",
        description="the server's run folders (one per run, `latest` points at the newest that has written "
        "a checkpoint); clients keep their state under their node config's `state-dir`",
    )
    resume: bool = Field(
        False, description="continue the run folder `resume-run` from its newest readable checkpoint"
    )
    # privacy
    dp: Literal["off", "theta", "statistics"] = Field(
        "off",
        description="`theta` (the paper's mechanism) or `statistics` (sample-level DP on data statistics); "
        "see docs/privacy.md",
    )
    dp_epsilon: float = Field(9.8, gt=0, description="total privacy budget per client: epsilon")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="total privacy budget per client: delta")
    dp_clip: float = Field(0.1, gt=0, lt=0.5, description="theta clipped to `[c, 1-c]` (`dp = theta`)")
    dp_feature_clip: float = Field(
        32.0,
        gt=0,
        description="per-sample feature norm bound (`dp = statistics`); 32 = sqrt(1024) never clips "
        "1-channel pixels; VGG features need a value chosen for them",
    )
    # security and reliability
    resume_run: str = Field(
        "",
        pattern=r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})?$",
        description="the run folder to resume; empty: `latest`",
    )
    robust_aggregation: Literal["off", "on"] = Field(
        "off",
        description="hostile-client defence for PRISM's masks: duplicates count once, Hamming outliers "
        "dropped, counts trimmed (see docs/security.md)",
    )
    robust_trim: int = Field(1, ge=0, description="votes trimmed at each end of every weight's count")
    robust_outlier_mads: float = Field(
        3.0, ge=0, description="Hamming-distance outlier threshold in MADs; `0`: no filter"
    )
    secure_aggregation: Literal["off", "secagg+"] = Field(
        "off",
        description="`secagg+`: the masks are summed by secure aggregation, the server learns only the "
        "per-weight counts of ones (docs/secure-aggregation.md); not with robust-aggregation or method dense",
    )

    @model_validator(mode="after")
    def _compatible(self) -> RunConfig:
        """Refuses a combination of keys that ``prism_flwr/options.py``'s table does not support."""
        if (why := options.refusal(self.model_dump(by_alias=True))) is not None:
            raise ValueError(why)
        return self

    @classmethod
    def parse(cls, run_config: Mapping[str, Any]) -> RunConfig:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise ConfigError("; ".join(describe(e, "run-config", cls) for e in err.errors())) from None

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()
