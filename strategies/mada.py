"""MADA: Flower strategy that aggregates 1-bit client masks into new global scores.

Sampling, message construction, reply validation and the round record come from
``RecordingFedAvg`` (strategies/base.py); this class adds the mask-specific parts:

- ``decode``: the codec checks every mask (truncated, wrong length, wrong layout, bad checksum,
  unknown version, coded against another model -> dropped). Coded masks are decoded against the
  coding model of the scores sent this round (``codec.mask_model``, set in ``configure_train``),
  into its grouped layout, where they are counted;
- ``combine``: per-weight counts of ones on the packed bits, then the run's
  ``prism_flwr.aggregation.Aggregator`` rule: MADA ``s_{t+1} = lambda logit(theta_agg) + (1 - lambda) s_t``
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

from prism_flwr.aggregation import Aggregator, combine_masks
from prism_flwr.codec import MaskFormatError, decode_mask, mask_model
from prism_flwr.task import MASK_KEY, SCORES_KEY

from .base import RecordingFedAvg


class MADA(RecordingFedAvg):
    """Mask-aware dynamic moving average over 1-bit client masks.

    Parameters
    ----------
    num_weights, layout : the model's masked-weight count and layout fingerprint (codec checks).
    method : an aggregation rule of ``prism_flwr.aggregation.AGGREGATIONS`` (``"mada"``: the
        paper's; ``"mean"``: PRISM without MADA).
    space : ``"score"`` (official code) or ``"probability"`` (the paper's figure).
    Other keywords: see ``RecordingFedAvg``.
    """

    payload_key = SCORES_KEY  # float32 scores down
    upload_key = MASK_KEY     # codec bytes up

    def __init__(self, *, num_weights: int, layout: bytes, method: str = "mada", space: str = "score", **kwargs) -> None:
        super().__init__(num_weights=num_weights, **kwargs)
        self.layout = layout
        self.method = method
        self.space = space
        self.aggregator = Aggregator(method, space)
        self._coding = None  # codec.MaskModel of the scores sent this round

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        self._coding = mask_model(self._global)
        return messages

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
        res = combine_masks(self.aggregator, self._global, payloads, self.num_weights, self.seed, rnd, self._coding)
        lam = None if np.isnan(res.mada_lambda) else res.mada_lambda
        return res.scores, {"mada_lambda": lam, **res.diagnostics}
