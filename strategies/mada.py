"""MADA: Flower strategy that aggregates 1-bit client masks into new global scores.

Sampling, message construction, reply validation and the round record come from
``RecordingFedAvg`` (strategies/base.py); this class adds the mask-specific parts:

- ``decode``: the codec checks every mask (truncated, wrong length, wrong layout, bad checksum,
  unknown version, coded against another model -> dropped). Coded masks are decoded against the
  coding model of the scores sent this round (``codec.mask_model``, set in ``configure_train``),
  into its grouped layout, where they are counted;
- ``combine``: per-weight counts of ones on the packed bits, then the run's
  ``prism_flwr.federated.aggregation.Aggregator`` rule: MADA ``s_{t+1} = lambda logit(theta_agg) + (1 - lambda) s_t``
  with lambda the Hamming distance of global-mask samples, the plain mean, or a rule beyond the
  paper (``mada-change``, ``adam``, ``beta``); lambda's no-change expectation and the change
  term go into the round's record. The server's
  Bernoulli samples use ``default_rng([seed, round])``, so a round's result depends only on its
  inputs (what makes a resumed run bit-identical).
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array
from flwr.common import log

from prism_flwr.federated.aggregation import AggregationError, Aggregator, combine_masks
from prism_flwr.federated.codec import MaskFormatError, decode_mask, mask_model
from prism_flwr.config import RunConfig
from prism_flwr.federated.methods import PRISM
from prism_flwr.federated.robust import robust_counts
from prism_flwr.federated.records import MASK_KEY, SCORES_KEY

from .base import RecordingFedAvg


class MADA(RecordingFedAvg):
    """Mask-aware dynamic moving average over 1-bit client masks.

    Parameters
    ----------
    num_weights, layout : the model's masked-weight count and layout fingerprint (codec checks).
    method : an aggregation rule of ``prism_flwr.federated.aggregation.AGGREGATIONS`` (``"mada"``: the
        paper's; ``"mean"``: PRISM without MADA).
    space : ``"score"`` (official code) or ``"probability"`` (the paper's figure).
    Other keywords: see ``RecordingFedAvg``.
    """

    payload_key = SCORES_KEY  # the global scores down (8-bit grid or float32, see ``run_config.downlink``)
    upload_key = MASK_KEY     # codec bytes up

    def __init__(self, *, num_weights: int, layout: bytes, method: str = "mada", space: str = "score",
                 run_config: RunConfig | None = None, **kwargs) -> None:
        super().__init__(num_weights=num_weights, **kwargs)
        self.layout = layout
        self.method = method
        self.space = space
        self.aggregator = Aggregator(method, space)
        # the wire format of the scores (methods.PRISM with this run's downlink); float32 by default
        self.run_config = run_config or RunConfig(downlink="float32")
        self._coding = None  # codec.MaskModel of the scores sent this round
        self._proposed = None  # this round's AggregateResult, its rule state kept once the round applies

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        self._global = PRISM.unpack_global(self._global, self.num_weights, self.run_config)  # the working scores
        self._coding = mask_model(self._global)
        return messages

    def check_aggregate(self, new: np.ndarray) -> np.ndarray:
        try:
            PRISM.unpack_global(new, self.num_weights, self.run_config)  # decodes, or raises
        except ValueError as err:
            raise AggregationError(f"aggregate does not decode: {err}") from None
        return new

    def round_applied(self) -> None:
        self.aggregator.commit(self._proposed)

    def summary(self) -> None:
        log(INFO, "\t├──> PRISM aggregation: %s (MADA space: %s), %d masked weights",
            self.method, self.space, self.num_weights)
        super().summary()

    def decode(self, array: Array) -> np.ndarray:
        if array.dtype != "uint8" or len(array.shape) != 1:
            raise ValueError(f"mask must be a flat uint8 array, got {array.dtype} {array.shape}")
        try:
            return decode_mask(array.numpy().tobytes(), self.num_weights, self.layout, self._coding, grouped=True)
        except MaskFormatError as err:
            raise ValueError(str(err)) from None

    def combine(self, rnd: int, payloads: list[np.ndarray], weights: np.ndarray) -> tuple[np.ndarray, dict]:
        extra = {}
        if self.robust is not None:  # duplicates and Hamming outliers dropped, votes trimmed per weight
            counts, k, info = robust_counts(payloads, self._coding.grouped_bits, **self.robust)
            res = self.aggregator.propose(self._global, self._coding.ungroup_counts(counts), k,
                                          rng=np.random.default_rng([self.seed, rnd]))
            extra = {"robust_dropped_duplicates": len(info.duplicates), "robust_dropped_outliers": len(info.outliers),
                     "robust_trim": info.trim}
            # which masks, by sender and reason (a list: kept out of the MetricRecord)
            self.round_records[rnd]["robust_dropped"] = info.dropped(self.round_nodes)
        else:
            res = combine_masks(self.aggregator, self._global, payloads, self.num_weights, self.seed, rnd,
                                self._coding, commit=False)
        self._proposed = res
        lam = None if np.isnan(res.mada_lambda) else res.mada_lambda
        scores = PRISM.settle(res.scores, self.run_config, np.random.default_rng([self.seed, rnd, 8]))
        return PRISM.pack_global(scores, self.run_config), {"mada_lambda": lam, **res.diagnostics, **extra}
