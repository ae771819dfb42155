"""Seeds derived from integers, identical on every machine."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, partition, ...), stable across machines."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def server_rng(seed: int, rnd: int) -> np.random.Generator:
    """The server's randomness in aggregation round ``rnd`` (MADA's Bernoulli samples):
    ``default_rng([seed, rnd])``, a function of the round alone, so a resumed run is bit-identical."""
    return np.random.default_rng([seed, rnd])


def settle_rng(seed: int, rnd: int) -> np.random.Generator:
    """The randomness that settles round ``rnd``'s new global state on the downlink's grid:
    ``default_rng([seed, rnd, 8])``, apart from the aggregation's own stream."""
    return np.random.default_rng([seed, rnd, 8])
