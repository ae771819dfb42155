"""Randomness a client keeps from the server: DP noise and the seed of its uploaded masks.

DP noise: a fresh generator per release, seeded from the OS's CSPRNG (``secrets``), never stored.
Masks: drawn from a per-client secret created the same way on first use and kept node-side
(``ClientRecord.secret``), so knowing the run's seed, the round and the partition predicts
nothing (docs/privacy.md, "Secret randomness").
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with 63 bits from the OS's CSPRNG (one per release)."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def new_secret() -> int:
    """A client's mask secret: 63 bits from the OS's CSPRNG."""
    return secrets.randbits(63)


def insecure_test_secret(test_seed: int, partition_id: int) -> int:
    """A predictable per-client secret from a test seed, so two runners can be compared.

    INSECURE by construction (anyone knowing ``test_seed`` predicts every mask): only for tests
    and studies that must reproduce a run bit for bit.
    """
    state = np.random.SeedSequence([int(test_seed), int(partition_id), 0x5EC2E7]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))
