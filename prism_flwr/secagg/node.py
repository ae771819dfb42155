"""The client's protocol steps on Flower records: one call per ClientApp handler.

Each step reads the server's record, runs the pure step of `client.py` under the node's
`Trust`, and returns the state to keep in the node's ``context.state`` (never sent) and the
reply's records. A message the node cannot trust raises `SecAggError`; the handler lets it
propagate, so the node is a dropout of the round for the server.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from prism_flwr.secagg import client
from prism_flwr.secagg.client import Trust
from prism_flwr.secagg.crypto import SecAggError
from prism_flwr.secagg.records import (
    SECAGG_KEY,
    advert_record,
    confirmation_record,
    masked_records,
    package_record,
    read_adverts,
    read_params,
    read_request,
    read_shares,
    read_state,
    read_survivors,
    state_record,
    unmask_record,
)


def _content(content, key: str = SECAGG_KEY):
    if not isinstance(content, RecordDict) or key not in content:
        raise SecAggError(f"message lacks the {key!r} record")
    return content[key]


def _reply(record: ConfigRecord) -> RecordDict:
    return RecordDict({SECAGG_KEY: record})


def advertise(content: RecordDict, node: int, trust: Trust) -> tuple[ConfigRecord, RecordDict]:
    """``query.secagg_advertise``: the round's parameters in, fresh (signed) public keys out."""
    state, advert = client.advertise_keys(read_params(_content(content)), node, trust)
    return state_record(state), _reply(advert_record(advert))


def share(content: RecordDict, kept, trust: Trust) -> tuple[ConfigRecord, RecordDict]:
    """``query.secagg_share``: the neighbours' (signed) keys in, sealed shares out."""
    state, package = client.share_keys(read_state(kept), read_adverts(_content(content)), trust)
    return state_record(state), _reply(package_record(package))


def mask(content: RecordDict, kept, x: np.ndarray) -> tuple[ConfigRecord, dict]:
    """The train step's end: the shares routed to this node in (record ``secagg`` of the train
    message), the records of the masked vector out (sent in place of the mask)."""
    state, masked = client.mask_input(read_state(kept), read_shares(_content(content)), x)
    return state_record(state), masked_records(masked)


def confirm(content: RecordDict, kept, trust: Trust) -> tuple[ConfigRecord, RecordDict]:
    """``query.secagg_confirm``: the survivor set in, this node's signature over it out."""
    state, confirmation = client.confirm(read_state(kept), read_survivors(_content(content)), trust)
    return state_record(state), _reply(confirmation_record(confirmation))


def unmask(content: RecordDict, kept, trust: Trust) -> RecordDict:
    """``query.secagg_unmask``: one kind of share per neighbour; the state is spent afterwards."""
    _, reply = client.unmask(read_state(kept), read_request(_content(content)), trust)
    return _reply(unmask_record(reply))
