"""The broadcast of the global state: one ``Downlink`` per run, chosen by ``run-config.downlink``.

A downlink says which state the server keeps (``settle``), how that state travels to one node
(``encode``) and how the node gets it back (``decode``):

- ``float32``: the vector as it is (the dense baseline always uses this one);
- ``grid8``: the scores on the 8-bit grid, entropy-coded (``downlink.pack_scores``); the server's
  state *is* the grid, so server and nodes hold the same float32 numbers;
- ``delta``: ``grid8``, but a node that holds a recent global gets only the coded change from it
  (``downlink.pack_update``: the delta, or the full state when that is smaller).

A state is named by ``digest`` (sha256 of its float32 bytes). Under ``delta`` every message
carries the digest of the state it encodes and of the base it was built on; the node checks its
base and what it rebuilt, and its reply names the state it now holds. ``NodeCopies`` is the
server's side: what each node holds (as its last valid reply confirmed), the few recent states
a delta may be built on, and the full state for any node it cannot vouch for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from prism_flwr.federated.downlink import DELTA as DELTA_KIND
from prism_flwr.federated.downlink import (
    HEADER_BYTES,
    DownlinkFormatError,
    dequantise,
    pack_scores,
    pack_update,
    quantise,
    snap_to_grid,
    unpack_scores,
)

DOWNLINK_KEY = "downlink"  # record: server -> node {"digest", "base"}; node -> server {"held"}
DIGEST_CHARS = 64  # sha256, hex
KIND_OFFSET = 5  # downlink header: magic (4 bytes), version, then the method byte


class DownlinkRefused(ValueError):
    """A node cannot rebuild the global from this message; the server must send the full state."""


def digest(state: np.ndarray) -> str:
    """The name of one global state: sha256 of its float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(state, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Downlink:
    """``float32``: the global vector on the wire as the server keeps it."""

    name: str = "float32"
    uses_base: bool = False  # encode/decode take the state the node holds

    def settle(self, vector: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The state the server keeps after an aggregation (here: as computed, float32)."""
        return np.asarray(vector, dtype=np.float32)

    def encode(self, state: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
        """``state`` as it goes to a node holding ``base`` (None: nothing usable)."""
        return np.asarray(state, dtype=np.float32)

    def decode(self, array: np.ndarray, count: int, base: np.ndarray | None = None) -> np.ndarray:
        """The wire array back to the float32 state; ``ValueError`` when it is not what ``encode``
        makes for ``count`` entries."""
        if array.dtype != np.float32 or array.shape != (count,):
            raise ValueError(
                f"global vector must be float32 of shape ({count},), got {array.dtype} {array.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError("global vector holds NaN or inf")
        return array

    def is_delta(self, array: np.ndarray) -> bool:
        """Whether ``array`` (from ``encode``) needs the receiver's copy to decode."""
        return False


@dataclass(frozen=True)
class Grid8(Downlink):
    """The 8-bit grid of ``downlink.py``: the state is snapped to it, the codes entropy-coded."""

    name: str = "grid8"

    def settle(self, vector, rng=None):
        return snap_to_grid(np.asarray(vector, dtype=np.float32), rng)

    def encode(self, state, base=None):
        return np.frombuffer(pack_scores(quantise(np.asarray(state, dtype=np.float32))), np.uint8).copy()

    def decode(self, array, count, base=None):
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(
                f"global scores must arrive as uint8 downlink bytes, got {array.dtype} {array.shape}"
            )
        try:
            return dequantise(unpack_scores(array.tobytes(), count, None if base is None else quantise(base)))
        except DownlinkFormatError as err:
            raise ValueError(str(err)) from None


@dataclass(frozen=True)
class Delta(Grid8):
    """``grid8`` sent as the change from the state the node holds, when it holds one."""

    name: str = "delta"
    uses_base: bool = True

    def encode(self, state, base=None):
        codes = quantise(np.asarray(state, dtype=np.float32))
        return np.frombuffer(pack_update(codes, None if base is None else quantise(base)), np.uint8).copy()

    def is_delta(self, array):
        return array.size > HEADER_BYTES and int(array[KIND_OFFSET]) == DELTA_KIND


DOWNLINKS = {d.name: d for d in (Downlink(), Grid8(), Delta())}


def receive(
    downlink: Downlink,
    array: np.ndarray,
    count: int,
    info: Mapping[str, object] | None,
    held: np.ndarray | None,
) -> np.ndarray:
    """What a node rebuilds from one message: ``info`` is the message's downlink record
    (``digest`` of the state sent, ``base`` it was built on, "" for the full state), ``held`` the
    state the node keeps. Raises ``DownlinkRefused`` unless the result is exactly the sender's."""
    if not downlink.uses_base:
        return downlink.decode(array, count)
    if info is None or not isinstance(info.get("digest"), str) or not isinstance(info.get("base"), str):
        raise DownlinkRefused(f"message lacks the '{DOWNLINK_KEY}' record with 'digest' and 'base'")
    base = str(info["base"])
    if base and (held is None or digest(held) != base):
        raise DownlinkRefused(
            f"delta built on global {base[:12]}, this node holds "
            f"{'none' if held is None else digest(held)[:12]}: needs the full state"
        )
    try:
        state = downlink.decode(array, count, held if base else None)
    except ValueError as err:
        raise DownlinkRefused(f"global does not decode ({err}): needs the full state") from None
    if digest(state) != info["digest"]:
        raise DownlinkRefused(
            f"rebuilt global {digest(state)[:12]} is not the one sent "
            f"({str(info['digest'])[:12]}): needs the full state"
        )
    return state


class NodeCopies:
    """Server side of ``delta``: which global each node holds and the states a delta may start from.

    A node's copy counts only once its valid reply names the digest the server sent it
    (``holds``); a node whose reply is missing, an error or dropped is forgotten (``forget``) and
    sent the full state next. The server keeps the
    last ``keep`` distinct states it sent: a node that missed a round holds an older one and gets
    the full state.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._states: dict[str, np.ndarray] = {}  # digest -> state, oldest first
        self._sent: dict[int, str] = {}  # node -> digest of the last state sent to it
        self._held: dict[int, str] = {}  # node -> digest it confirmed holding

    def base_for(self, node: int) -> tuple[str, np.ndarray | None]:
        """(digest, state) of the copy ``node`` holds, or ("", None) when the full state must go."""
        held = self._held.get(node, "")
        return (held, self._states[held]) if held in self._states else ("", None)

    def sending(self, node: int, state: np.ndarray, name: str | None = None) -> str:
        """Note that ``state`` goes to ``node``; returns its digest."""
        name = name or digest(state)
        if name not in self._states:
            self._states[name] = np.array(state, dtype=np.float32)
            while len(self._states) > self.keep:
                self._states.pop(next(iter(self._states)))
        self._sent[node] = name
        return name

    def sent_to(self, node: int) -> str | None:
        """Digest of the last state sent to ``node``."""
        return self._sent.get(node)

    def holds(self, node: int, name: str) -> None:
        """``node``'s valid reply says it holds ``name`` (checked against ``sent_to`` by the caller)."""
        self._held[node] = name

    def forget(self, node: int) -> None:
        self._held.pop(node, None)
