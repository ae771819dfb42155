"""A server that breaks the SecAgg+ protocol, played through the ClientApp's own handlers.

``Attacker`` is a message driver: real Flower ``Message`` objects to ``LoopbackClient`` nodes
(``client_app.secagg_*`` on each node's ``Context`` and node config), so every check a node makes
is the one it makes in a run. Each attack is mounted twice: against nodes with the defence
(signing key + roster, floors), where the attacker must NOT recover the target's mask, and with
that defence removed, where the same driver recovers the mask exactly (so each test would fail if
its defence were gone). The server's honest view stays uniform: tests/test_secagg.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import client_app
from prism_flwr.config import RunConfig
from prism_flwr.federated.codec import decode_mask, unpack_mask
from prism_flwr.federated.methods import PRISM
from prism_flwr.federated.records import MASK_KEY
from prism_flwr.federated.secure_sum import secagg_parameters
from prism_flwr.model.build import generator_spec
from prism_flwr.model.generator import ResnetGenerator
from prism_flwr.model.masked import layout_fingerprint, num_masked
from prism_flwr.node_config import Refusal
from prism_flwr.secagg import client as secagg_client
from prism_flwr.secagg.client import share_ad, share_key
from prism_flwr.secagg.crypto import (
    KEY_BYTES,
    combine_secret,
    commitment,
    new_keypair,
    public_key_of,
    seal,
    unpack,
    unseal,
)
from prism_flwr.secagg.identity import write_federation
from prism_flwr.secagg.records import (
    ADVERTISE,
    CONFIRM,
    MASKED_KEY,
    SECAGG_KEY,
    SHARE,
    UNMASK,
    adverts_record,
    params_record,
    read_advert,
    read_confirmation,
    read_masked,
    read_package,
    read_unmask,
    request_record,
    shares_record,
    survivors_record,
)
from prism_flwr.secagg.round import (
    EncryptedShare,
    KeyAdvert,
    SurvivorSet,
    UnmaskRequest,
    advert_message,
    new_round,
    pair_mask,
    self_mask,
)
from tools.secagg_loopback import LoopbackClient, LoopbackGrid
from tools.security_probe import message

pytestmark = pytest.mark.usefixtures("task_identity")

LENGTH = 257
FLOORS = {"require-secure-aggregation": True, "min-secure-aggregation-clients": 3}
FAKE = 2**63 + 10**9  # ids of nodes that are not in the round (padding) or not in the federation


def _x(u: int) -> np.ndarray:
    return (np.random.default_rng(u % 2**32).random(LENGTH) < 0.5).astype(np.uint8)


@pytest.fixture(autouse=True)
def _no_env_node_config(monkeypatch):
    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)


def federation(tmp_path, count: int, signed: bool = True, floors: dict | None = None) -> dict:
    """``count`` nodes running the ClientApp's handlers; with ``signed`` each holds its signing
    key and the roster (as ``prism-flwr secagg-keys`` writes them), plus ``floors``."""
    keys = tmp_path / "keys"
    if signed and not keys.exists():
        write_federation(keys, count)
    nodes = {}
    for i in range(count):
        u = 2**63 + 7919 * (i + 1)
        config = {"partition-id": i, "num-partitions": count, **(floors or {})}
        if signed:
            config |= {
                "secagg-key": str(keys / "node-{partition-id}.key"),
                "secagg-roster": str(keys / "roster.json"),
            }
        nodes[u] = LoopbackClient(u, lambda msg, u=u: (_x(u), {"num-examples": 1}), config)
    return nodes


class Attacker:
    """The server, free to send any message; replies come back as records or error text."""

    def __init__(self, nodes: dict) -> None:
        self.grid = LoopbackGrid(nodes)
        self.errors: dict[str, dict[int, str]] = {}

    def send(self, kind: str, records: dict[int, dict]) -> dict[int, RecordDict]:
        messages = [
            Message(content=RecordDict(content), dst_node_id=u, message_type=kind)
            for u, content in records.items()
        ]
        out = {}
        for reply in self.grid.send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors.setdefault(kind, {})[node] = str(reply.error.reason)
            else:
                out[node] = reply.content
        return out

    def setup(self, params) -> tuple[dict, dict, dict]:
        """The honest first half of a round: adverts, packages and masked vectors by node."""
        ask = {u: {SECAGG_KEY: params_record(params)} for u in params.clients}
        adverts = {u: read_advert(c[SECAGG_KEY]) for u, c in self.send(ADVERTISE, ask).items()}
        forward = {u: [adverts[v] for v in params.graph[u] if v in adverts] for u in adverts}
        ask = {u: {SECAGG_KEY: adverts_record(params.round_id, forward[u])} for u in forward}
        packages = {u: read_package(c[SECAGG_KEY]) for u, c in self.send(SHARE, ask).items()}
        inbox = {u: [s for p in packages.values() for s in p.shares if s.receiver == u] for u in packages}
        masked = self.train(params, {u: shares for u, shares in inbox.items()})
        return adverts, packages, masked

    def train(self, params, inbox: dict) -> dict:
        replies = self.send("train", {u: {SECAGG_KEY: shares_record(s)} for u, s in inbox.items()})
        return {
            u: read_masked(c[SECAGG_KEY], c[MASKED_KEY][MASKED_KEY].numpy().tobytes())
            for u, c in replies.items()
        }

    def split_views(self, params, u: int, pad: bool) -> dict:
        """Attack (a): each helper w is shown its own survivor set, {u, w} and t - 2 more (ids not
        in the round when ``pad``, else the next real ids in turn); u itself is shown {u} and t - 1
        more. So u's neighbours give its seed shares, and every other node is "dropped" for at
        least t of its neighbours, which give its key shares. Runs the consistency round on
        whatever each node signs; returns the unmask replies."""
        t, others = params.threshold, [v for v in params.clients if v != u]
        views = {}
        for i, w in enumerate([u, *others]):
            size = t - (1 if w == u else 2)
            extra = (
                [FAKE + j for j in range(size)]
                if pad
                else [others[(i + j) % len(others)] for j in range(size)]
            )
            views[w] = tuple(sorted({u, w, *extra}))
        ask = {w: {SECAGG_KEY: survivors_record(SurvivorSet(params.round_id, s))} for w, s in views.items()}
        signed = {w: read_confirmation(c[SECAGG_KEY]) for w, c in self.send(CONFIRM, ask).items()}
        requests = {}
        for w, s in views.items():
            signatures = tuple(
                (c.signer, c.signature) for v, c in signed.items() if views[v] == s and c.signer
            )
            dropped = tuple(v for v in params.graph[w] if v not in s)
            requests[w] = {SECAGG_KEY: request_record(UnmaskRequest(params.round_id, s, dropped, signatures))}
        return {w: read_unmask(c[SECAGG_KEY]) for w, c in self.send(UNMASK, requests).items()}


def _secret(params, owner: int, shares: dict, valid) -> bytes | None:
    """``owner``'s secret from t of the shares its neighbours gave out, if they suffice."""
    if len(shares) < params.threshold:
        return None
    index = {v: i + 1 for i, v in enumerate(params.graph[owner])}
    secret = combine_secret({index[v]: shares[v] for v in sorted(shares)[: params.threshold]})
    return secret if valid(secret) else None


def recover(params, u: int, adverts: dict, packages: dict, masked: dict, replies: dict) -> np.ndarray | None:
    """u's input from its masked vector, its self-mask seed and every masking partner's key."""
    if u not in masked:
        return None
    seeds = {w: r.seed_shares[u] for w, r in replies.items() if u in r.seed_shares}
    seed = _secret(
        params, u, seeds, lambda s: commitment(params.round_id, u, s) == packages[u].seed_commitment
    )
    if seed is None:
        return None
    y = unpack(masked[u].packed, params.length, params.bits) - self_mask(seed, params, u)
    for v in masked[u].masked_with:
        keys = {w: r.key_shares[v] for w, r in replies.items() if v in r.key_shares}
        key = _secret(params, v, keys, lambda s, v=v: public_key_of(s) == adverts[v].mask_key)
        if key is None:
            return None
        mask = pair_mask(key, adverts[u].mask_key, params, v, u)
        y = y - mask if u < v else y + mask
    return (y & np.uint16((1 << params.bits) - 1)).astype(np.uint8)


def split_view_attack(nodes: dict, pad: bool, threshold=None, degree=None):
    """Attack (a) on the first node; (what the attacker recovered of its mask, the attacker)."""
    clients = sorted(nodes)
    t, k = secagg_parameters(len(clients)) if threshold is None else (threshold, degree)
    params = new_round(clients, t, k, LENGTH)
    attacker = Attacker(nodes)
    adverts, packages, masked = attacker.setup(params)
    replies = attacker.split_views(params, clients[0], pad) if masked else {}
    return recover(params, clients[0], adverts, packages, masked, replies), attacker


def _without_padding_check(monkeypatch) -> None:
    """The defence against padded survivor sets removed: any set naming the node is accepted."""
    monkeypatch.setattr(secagg_client, "_survivor_set", lambda state, survivors, trust: tuple(survivors))


# ---------------------------------------------------------------- (a) different stories to different nodes
CASES = [(4, False), (6, False), (10, False), (5, True), (10, True), (16, True)]  # 16: the sparse graph


@pytest.mark.parametrize("count,pad", CASES)
def test_split_survivor_views_do_not_reveal_a_mask(tmp_path, count: int, pad: bool) -> None:
    got, attacker = split_view_attack(federation(tmp_path, count), pad)
    assert got is None
    refused = " ".join(attacker.errors.get(UNMASK, {}).values()) + " ".join(
        attacker.errors.get(CONFIRM, {}).values()
    )
    assert ("outside this round" if pad else "signed by 1 members") in refused, attacker.errors


@pytest.mark.parametrize("count,pad", CASES)
def test_split_survivor_views_reveal_the_mask_without_the_defence(tmp_path, monkeypatch, count, pad) -> None:
    """The same driver against nodes without a roster (no consistency round) and, for padded
    sets, without the check on ids outside the round: the target's mask, exactly."""
    if pad:
        _without_padding_check(monkeypatch)
    nodes = federation(tmp_path, count, signed=False)
    got, _ = split_view_attack(nodes, pad)
    np.testing.assert_array_equal(got, _x(min(nodes)))


def test_an_honest_signed_round_still_unmasks(tmp_path) -> None:
    """The defences refuse the attacks, not the protocol: one survivor set for all, signed by all."""
    nodes = federation(tmp_path, 5, floors=FLOORS)
    params = new_round(sorted(nodes), *secagg_parameters(5), LENGTH)
    attacker = Attacker(nodes)
    adverts, packages, masked = attacker.setup(params)
    survivors = SurvivorSet(params.round_id, tuple(sorted(masked)))
    signed = attacker.send(CONFIRM, {u: {SECAGG_KEY: survivors_record(survivors)} for u in masked})
    signatures = tuple(
        (c.signer, c.signature) for c in (read_confirmation(r[SECAGG_KEY]) for r in signed.values())
    )
    request = UnmaskRequest(params.round_id, survivors.survivors, (), signatures)
    replies = attacker.send(UNMASK, {u: {SECAGG_KEY: request_record(request)} for u in masked})
    assert len(replies) == 5 and attacker.errors == {}
    replies = {w: read_unmask(r[SECAGG_KEY]) for w, r in replies.items()}
    assert all(not r.key_shares for r in replies.values())  # seed shares only: the sum, no single mask
    assert all(recover(params, u, adverts, packages, masked, replies) is None for u in nodes)


# ---------------------------------------------------------------- (b) forged neighbour adverts
def forged_adverts_attack(nodes: dict, sign_with: bytes | None):
    """Attack (b): the target is alone with three nodes the server invents (their keys are the
    server's), so it seals all its shares to the server; the server opens them, plays the
    neighbours' shares back and unmasks the target's vector alone."""
    u = min(nodes)
    params = new_round([u, FAKE + 1, FAKE + 2, FAKE + 3], 2, 3, LENGTH)
    attacker = Attacker({u: nodes[u]})
    (advert,) = attacker.send(ADVERTISE, {u: {SECAGG_KEY: params_record(params)}}).values()
    target = read_advert(advert[SECAGG_KEY])
    fakes = {}
    for f in params.clients[1:]:
        (enc_secret, enc_public), (mask_secret, mask_public) = new_keypair(), new_keypair()
        forged = KeyAdvert(params.round_id, f, enc_public, mask_public)
        if sign_with is not None:  # a key the server made: not in the node's roster
            key = Ed25519PrivateKey.from_private_bytes(sign_with)
            signature = key.sign(advert_message(params, f, enc_public, mask_public))
            forged = KeyAdvert(
                params.round_id, f, enc_public, mask_public, key.public_key().public_bytes_raw(), signature
            )
        fakes[f] = (enc_secret, mask_secret, forged)
    forward = {SECAGG_KEY: adverts_record(params.round_id, [fakes[f][2] for f in sorted(fakes)])}
    package = attacker.send(SHARE, {u: forward}).get(u)
    if package is None:
        return None, attacker
    package = read_package(package[SECAGG_KEY])
    opened = {
        s.receiver: unseal(
            share_key(fakes[s.receiver][0], target.enc_key, params, u, s.receiver),
            s.blob,
            share_ad(params, u, s.receiver),
        )
        for s in package.shares
    }
    inbox = [
        EncryptedShare(
            f,
            u,
            seal(
                share_key(fakes[f][0], target.enc_key, params, f, u),
                bytes(2 * KEY_BYTES),
                share_ad(params, f, u),
            ),
        )
        for f in sorted(fakes)
    ]
    masked = attacker.train(params, {u: inbox})[u]
    index = {v: i + 1 for i, v in enumerate(params.graph[u])}
    chosen = sorted(opened)[: params.threshold]
    mask_secret = combine_secret({index[f]: opened[f][:KEY_BYTES] for f in chosen})
    seed = combine_secret({index[f]: opened[f][KEY_BYTES:] for f in chosen})
    y = unpack(masked.packed, params.length, params.bits) - self_mask(seed, params, u)
    for f in masked.masked_with:
        mask = pair_mask(mask_secret, fakes[f][2].mask_key, params, u, f)
        y = y - mask if u < f else y + mask
    return (y & np.uint16((1 << params.bits) - 1)).astype(np.uint8), attacker


@pytest.mark.parametrize("sign_with", [None, bytes(range(32))], ids=["unsigned", "signed-outside-roster"])
def test_forged_neighbour_adverts_are_refused(tmp_path, sign_with) -> None:
    got, attacker = forged_adverts_attack(federation(tmp_path, 4), sign_with)
    assert got is None
    reason = " ".join(attacker.errors[SHARE].values())
    assert ("not in this node's roster" if sign_with else "is not signed") in reason, reason


def test_forged_neighbour_adverts_reveal_the_mask_without_a_roster(tmp_path) -> None:
    nodes = federation(tmp_path, 4, signed=False)
    got, _ = forged_adverts_attack(nodes, None)
    np.testing.assert_array_equal(got, _x(min(nodes)))


# ---------------------------------------------------------------- (c) a round too small to hide anything
SMALL = [(2, 1, 1), (4, 1, 1)]  # (K, t, k): two clients, or a threshold of one


@pytest.mark.parametrize("count,threshold,degree", SMALL)
def test_a_node_with_floors_refuses_small_groups_and_thresholds(tmp_path, count, threshold, degree) -> None:
    got, attacker = split_view_attack(federation(tmp_path, count, floors=FLOORS), False, threshold, degree)
    assert got is None
    reasons = list(attacker.errors[ADVERTISE].values())
    assert len(reasons) == count and all(r.startswith("Refusal: node refuses the round") for r in reasons), (
        reasons
    )
    assert all("min-secure-aggregation-clients=3" in r for r in reasons)
    assert all(r.count("\n") == 0 for r in reasons)  # one line each


@pytest.mark.parametrize("count,threshold,degree", SMALL)
def test_small_groups_reveal_the_mask_without_the_floor(tmp_path, count, threshold, degree) -> None:
    """Signed nodes without the floor: at t = 1 the consistency round cannot help (one signature,
    the node's own, is enough), and the attacker gets the target's mask."""
    nodes = federation(tmp_path, count)
    got, _ = split_view_attack(nodes, False, threshold, degree)
    np.testing.assert_array_equal(got, _x(min(nodes)))


TINY = {"ngf": 4, "local-steps": 1, "batch-size": 8, "uplink-coding": "raw", "device": "cpu"}


def _train_in_the_clear(monkeypatch, tmp_path, floors: dict):
    """``client_app.train`` asked by a run with secure aggregation off (data: 16 random images);
    the reply and the run's network."""
    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(client_app, "client_data", lambda cfg, pid, num, device: (images, [16] + [0] * 9))
    cfg = RunConfig.parse(TINY)
    model = ResnetGenerator(generator_spec(cfg))
    sent = PRISM.downlink(cfg).encode(PRISM.downlink(cfg).settle(np.zeros(num_masked(model), np.float32)))
    content = RecordDict(
        {
            "config": ConfigRecord({"server-round": 1, "run-tag": "aaaa0001"}),
            PRISM.down_key: ArrayRecord({PRISM.down_key: Array(sent)}),
        }
    )
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"), **floors}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=dict(TINY))
    return client_app.train(message(0, content), context), model


def test_a_node_that_requires_secure_aggregation_refuses_a_run_without_it(monkeypatch, tmp_path) -> None:
    with pytest.raises(Refusal, match="^node refuses the run: secure-aggregation='off'"):
        _train_in_the_clear(monkeypatch, tmp_path, FLOORS)


def test_without_the_floor_the_mask_goes_out_in_the_clear(monkeypatch, tmp_path) -> None:
    reply, model = _train_in_the_clear(monkeypatch, tmp_path, {})
    n, payload = num_masked(model), reply.content[MASK_KEY][MASK_KEY].numpy().tobytes()
    assert unpack_mask(decode_mask(payload, n, layout_fingerprint(model)), n).shape == (n,)  # in the clear
