"""MADA: Flower strategy that aggregates 1-bit client masks into new global scores.

Sampling, message construction, reply validation and the round record come from
``RecordingFedAvg`` (strategies/base.py); this class adds the mask-specific parts:

- ``decode``: the codec checks every mask (truncated, wrong length, wrong layout, bad checksum,
  unknown version, coded against another model -> dropped). Coded masks are decoded against the
  coding model of the scores sent this round (``codec.mask_model``, set in ``configure_train``),
  into its grouped layout, where they are counted;
- ``combine``: per-weight counts of ones on the packed bits (robust counting when asked), then
  PRISM's server step (``prism_flwr/federated/server_step.py``, shared with the in-process
  runner): the aggregation rule (``rule``, a ``prism_flwr.federated.aggregation.Aggregator``),
  MADA ``s_{t+1} = lambda logit(theta_agg) + (1 - lambda) s_t`` with lambda the Hamming distance
  of global-mask samples, the plain mean, or a rule beyond the paper (``mada-change``, ``adam``,
  ``beta``), on the server's seeded stream, then settled by the run's downlink (snapped to the
  8-bit grid under ``grid8``/``delta``); lambda's no-change expectation and the change term go
  into the round's record;
- the round record's ``mada_lambda`` (None when the rule has no blend step).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array
from flwr.common import log

from prism_flwr.federated.aggregation import Aggregator
from prism_flwr.federated.codec import MaskFormatError, decode_mask, mask_model
from prism_flwr.federated.methods import PRISM
from prism_flwr.federated.records import MASK_KEY, SCORES_KEY
from prism_flwr.federated.server_step import mask_counts, robust_settings, server_step

from .base import RecordingFedAvg


class MADA(RecordingFedAvg):
    """Mask-aware dynamic moving average over 1-bit client masks.

    Parameters
    ----------
    num_weights, layout : the model's masked-weight count and layout fingerprint (codec checks).
    rule : an aggregation rule of ``prism_flwr.federated.aggregation.AGGREGATIONS`` (``"mada"``: the
        paper's; ``"mean"``: PRISM without MADA).
    space : ``"score"`` (official code) or ``"probability"`` (the paper's figure).
    aggregator_state : the rule's state from a checkpoint (server Adam's moments, Beta counts).
    Other keywords (``downlink``, ``robust``, ...): see ``RecordingFedAvg``.
    """

    method = PRISM
    payload_key = SCORES_KEY  # the global scores down (as the run's ``downlink`` encodes them)
    upload_key = MASK_KEY  # codec bytes up

    def __init__(
        self,
        *,
        num_weights: int,
        layout: bytes,
        rule: str = "mada",
        space: str = "score",
        aggregator_state: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_weights=num_weights, **kwargs)
        self.layout = layout
        self.rule = rule
        self.space = space
        self.aggregator = Aggregator(rule, space)
        if aggregator_state is not None:
            self.aggregator.load_state_dict(aggregator_state)
        self._coding = None  # codec.MaskModel of the scores sent this round
        self._proposed = None  # this round's AggregateResult, its rule state kept once the round applies

    @classmethod
    def from_config(cls, cfg, *, layout, state, **kwargs):
        return cls(
            layout=layout,
            rule=cfg.aggregation,
            space=cfg.mada_space,
            robust=robust_settings(cfg),
            aggregator_state=state,
            **kwargs,
        )

    def empty_record(self, rnd: int, asked: int = 0, downlink_bytes: int = 0) -> dict:
        return {**super().empty_record(rnd, asked, downlink_bytes), "mada_lambda": None}

    def state_dict(self) -> dict:
        return self.aggregator.state_dict()

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        self._coding = mask_model(self._global)
        return messages

    def round_applied(self) -> None:
        self.aggregator.commit(self._proposed)

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> PRISM aggregation: %s (MADA space: %s), %d masked weights, downlink %s",
            self.rule,
            self.space,
            self.num_weights,
            self.downlink.name,
        )
        super().summary()

    def decode(self, array: Array) -> np.ndarray:
        if array.dtype != "uint8" or len(array.shape) != 1:
            raise ValueError(f"mask must be a flat uint8 array, got {array.dtype} {array.shape}")
        try:
            return decode_mask(
                array.numpy().tobytes(), self.num_weights, self.layout, self._coding, grouped=True
            )
        except MaskFormatError as err:
            raise ValueError(str(err)) from None

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        counts, k, info = mask_counts(payloads, self.num_weights, self._coding, self.robust)
        extra = {}
        if info is not None:  # duplicates and Hamming outliers dropped, votes trimmed per weight
            extra = {
                "robust_dropped_duplicates": len(info.duplicates),
                "robust_dropped_outliers": len(info.outliers),
                "robust_trim": info.trim,
            }
            # which masks, by sender and reason (a list: kept out of the MetricRecord)
            self.round_records[rnd]["robust_dropped"] = info.dropped(self.round_nodes)
        return self.step_counts(rnd, counts, k, extra)

    def step_counts(self, rnd: int, counts: np.ndarray, k: int, extra: dict | None = None):
        """The round's server step on per-weight counts of ones over ``k`` masks (``combine``'s, or
        secure aggregation's result): (new global state, record fields)."""
        res = server_step(self.aggregator, self._global, counts, k, self.downlink, self.seed, rnd)
        self._proposed = res  # its rule state is kept once the round applies (round_applied)
        lam = None if np.isnan(res.mada_lambda) else res.mada_lambda
        return res.scores, {"mada_lambda": lam, **res.diagnostics, **(extra or {})}
