"""Secure aggregation of binary masks: exact counts under dropouts, clean skips, refused inputs,
and what the server sees of one client's vector (uniform, independent of the vector)."""

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from prism_flwr.secagg import (
    RoundSkipped,
    SecAggError,
    Trust,
    advertise_keys,
    collect_adverts,
    collect_confirmations,
    collect_masked,
    confirm,
    finish,
    mask_input,
    neighbour_graph,
    new_round,
    pack,
    route_shares,
    run_protocol,
    share_keys,
    skip_confirmation,
    start_round,
    unmask,
    unpack,
)
from prism_flwr.secagg import client as secagg_client
from prism_flwr.secagg.crypto import combine_secret
from prism_flwr.secagg.round import pair_mask, self_mask

ALPHA = 1e-6  # a genuine uniform view fails a test with this probability


def make_inputs(count: int, length: int, seed: int = 0) -> dict:
    """Random 0/1 vectors keyed by large node ids (Flower's are unsigned 64-bit)."""
    rng = np.random.default_rng(seed)
    return {2**63 + 7919 * i: rng.integers(0, 2, length, dtype=np.uint8) for i in range(count)}


def assert_exact(result, inputs, contributors):
    """The aggregate is the plain count of ones over exactly `contributors`."""
    assert result.contributors == tuple(sorted(contributors))
    plain = sum(inputs[u].astype(np.int64) for u in contributors)
    np.testing.assert_array_equal(result.counts, plain)


class Round:
    """One round driven stage by stage, so a test can tamper with the messages in between."""

    STAGES = ("advertise", "forward", "share", "route", "mask", "collect", "confirm", "unmask")

    def __init__(self, inputs, threshold, degree, round_id=None, trusts=None):
        self.inputs = inputs
        length = len(next(iter(inputs.values())))
        self.params = new_round(inputs, threshold, degree, length, round_id=round_id)
        self.server, self.states, self.client_refused, self.done = start_round(self.params), {}, {}, 0
        self.trust = {u: (trusts or {}).get(u, Trust()) for u in self.params.clients}

    def _clients(self, nodes, step):
        replies = []
        for u in nodes:
            try:
                self.states[u], reply = step(u)
            except SecAggError as error:
                self.client_refused[u] = error
                continue
            replies.append(reply)
        return replies

    def advertise(self):
        self.adverts = self._clients(
            self.params.clients, lambda u: advertise_keys(self.params, u, self.trust[u])
        )

    def forward(self):
        self.server, self.forwarded = collect_adverts(self.server, self.adverts)

    def share(self):
        self.packages = self._clients(
            self.forwarded, lambda u: share_keys(self.states[u], self.forwarded[u], self.trust[u])
        )

    def route(self):
        self.server, self.inbox = route_shares(self.server, self.packages)

    def mask(self):
        self.masked = self._clients(
            self.inbox, lambda u: mask_input(self.states[u], self.inbox[u], self.inputs[u])
        )

    def collect(self):
        self.server, self.survivor_set = collect_masked(self.server, self.masked)
        if not self.server.signed:
            self.server, self.requests = skip_confirmation(self.server)

    def confirm(self):
        if self.server.signed:
            self.confirmations = self._clients(
                self.survivor_set.survivors,
                lambda u: confirm(self.states[u], self.survivor_set, self.trust[u]),
            )
            self.server, self.requests = collect_confirmations(self.server, self.confirmations)

    @property
    def request(self):
        """The unmask request of the first helper (all alike on a complete graph)."""
        return self.requests[min(self.requests)]

    def unmask(self):
        self.replies = self._clients(
            self.requests, lambda u: unmask(self.states[u], self.requests[u], self.trust[u])
        )

    def through(self, stage):
        """Run the stages not run yet, up to and including `stage`."""
        stop = self.STAGES.index(stage) + 1
        for name in self.STAGES[self.done : stop]:
            getattr(self, name)()
        self.done = max(self.done, stop)
        return self

    def result(self):
        self.through("unmask")
        return finish(self.server, self.replies)


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("length", [1, 7, 1001])
def test_pack_round_trip(bits, length):
    rng = np.random.default_rng(bits * length)
    values = rng.integers(0, 1 << bits, length).astype(np.uint16)
    values[0] = (1 << bits) - 1
    data = pack(values, bits)
    assert len(data) == (length * bits + 7) // 8
    np.testing.assert_array_equal(unpack(data, length, bits), values)


def test_pack_refuses_bad_sizes_and_values():
    data = pack(np.array([1, 2, 3], np.uint16), 3)  # 9 bits: 2 bytes, 7 padding bits
    with pytest.raises(SecAggError, match="bytes"):
        unpack(data[:-1], 3, 3)
    with pytest.raises(SecAggError, match="bytes"):
        unpack(data + b"\0", 3, 3)
    with pytest.raises(SecAggError, match="padding"):
        unpack(data[:-1] + bytes([data[-1] | 0x80]), 3, 3)
    with pytest.raises(SecAggError, match="outside"):
        pack(np.array([8], np.uint16), 3)


@pytest.mark.parametrize("count,degree", [(2, 1), (5, 2), (5, 4), (6, 3), (10, 4), (10, 9), (12, 5)])
def test_graph_is_k_regular_and_shared(count, degree):
    clients = tuple(range(100, 100 + count))
    graph = neighbour_graph(b"r" * 16, clients, degree)
    assert sorted(graph) == list(clients)
    for u, neighbours in graph.items():
        assert len(set(neighbours)) == degree and u not in neighbours
        assert all(u in graph[v] for v in neighbours)  # undirected
    assert graph == neighbour_graph(b"r" * 16, clients, degree)  # every party gets the same


def test_graph_depends_on_round_id():
    clients = tuple(range(20))
    graphs = {tuple(sorted(neighbour_graph(bytes([i]) * 16, clients, 4).items())) for i in range(5)}
    assert len(graphs) > 1


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(threshold=2), "threshold"),  # t <= k/2 would let a server learn both shares
        (dict(threshold=5), "threshold"),
        (dict(degree=3), "regular"),  # 5 clients * degree 3 is odd
        (dict(bits=2), "bits"),  # 2 bits cannot count to 5
        (dict(round_id=b"short"), "round id"),
        (dict(length=0), "length"),
    ],
)
def test_params_refused(change, match):
    args = dict(clients=range(5), threshold=3, degree=4, length=10) | change
    with pytest.raises(SecAggError, match=match):
        new_round(**args)


def test_default_bits_hold_the_count():
    assert new_round(range(10), 5, 9, 10).bits == 4
    assert new_round(range(4), 2, 3, 10).bits == 3


# ---------------------------------------------------------------- exact counts and dropouts

K, T, DEGREE, N = 10, 5, 9, 2000


@pytest.mark.parametrize("phase", ["start", "advertise", "share", "masked"])
@pytest.mark.parametrize("drops", [0, 1, T - 1])
def test_exact_counts_with_dropouts(phase, drops):
    inputs = make_inputs(K, N, seed=drops)
    dropped = sorted(inputs)[:drops]
    result = run_protocol(inputs, T, DEGREE, dropouts={phase: dropped})
    # a client that sent its masked vector counts even if it then goes silent
    contributors = inputs if phase == "masked" else [u for u in inputs if u not in dropped]
    assert_exact(result, inputs, contributors)
    assert result.refused == ()


def test_exact_counts_on_a_sparse_graph_with_dropouts():
    # degree 4, t = 3: two dropouts with no neighbour in common leave every secret 3 holders
    inputs, round_id = make_inputs(12, N, seed=3), b"sparse graph rnd"
    graph = neighbour_graph(round_id, tuple(sorted(inputs)), 4)
    a = min(graph)
    b = next(v for v in graph if v != a and v not in graph[a] and not set(graph[a]) & set(graph[v]))
    result = run_protocol(inputs, 3, 4, dropouts={"share": [a], "masked": [b]}, round_id=round_id)
    assert_exact(result, inputs, [u for u in inputs if u != a])


@pytest.mark.parametrize("phase", ["start", "advertise", "share", "masked"])
def test_too_many_dropouts_skip_the_round(phase):
    inputs = make_inputs(K, N)
    with pytest.raises(RoundSkipped, match="round skipped"):
        run_protocol(inputs, T, DEGREE, dropouts={phase: sorted(inputs)[: K - T + 1]})


def test_skip_when_a_survivors_self_mask_cannot_be_rebuilt():
    # 5 of 10 answer the unmask request: enough replies, but each of them holds shares from only
    # 4 other answering neighbours, fewer than t = 5: skip, never a count with a mask left in
    inputs = make_inputs(K, N)
    with pytest.raises(RoundSkipped, match="self-mask seed"):
        run_protocol(inputs, T, DEGREE, dropouts={"masked": sorted(inputs)[: K - T]})


def test_client_refusing_its_input_drops_out_cleanly():
    inputs = make_inputs(6, 500)
    bad = sorted(inputs)[2]
    inputs[bad] = np.full(500, 2, np.uint8)  # not a 0/1 mask
    result = run_protocol(inputs, 3, 4)
    assert_exact(result, inputs, [u for u in inputs if u != bad])
    assert [(who, node) for who, node, _ in result.refused] == [("client", bad)]


# ---------------------------------------------------------------- refused messages

SMALL_N = 601  # 601 values at 3 bits: 226 bytes, the last 5 bits padding


def small_round():
    return Round(make_inputs(6, SMALL_N, seed=1), threshold=3, degree=5)


def other_round():
    """A complete round with its own round id whose messages are replayed into another."""
    return small_round().through("unmask")


def test_replayed_advert_is_refused():
    old, r = other_round(), small_round().through("advertise")
    victim = r.adverts[0].node
    r.adverts[0] = next(a for a in old.adverts if a.node == victim)
    result = r.result()
    assert_exact(result, r.inputs, [u for u in r.inputs if u != victim])
    assert result.refused[0][:2] == ("advertise", victim) and "another round" in result.refused[0][2]


def test_client_refuses_a_forwarded_advert_of_another_round():
    old, r = other_round(), small_round().through("forward")
    u = r.params.clients[0]
    stale = next(a for a in old.adverts if a.node == r.forwarded[u][0].node)
    with pytest.raises(SecAggError, match="another round"):
        share_keys(r.states[u], (stale,) + r.forwarded[u][1:])


@pytest.mark.parametrize("tamper", ["truncated", "replayed", "missing share", "duplicated"])
def test_bad_share_package_is_refused(tamper):
    r = small_round().through("share")
    victim = r.packages[1].node
    package = r.packages[1]
    if tamper == "truncated":
        first = package.shares[0]
        shares = (replace(first, blob=first.blob[:-1]),) + package.shares[1:]
        r.packages[1] = replace(package, shares=shares)
    elif tamper == "replayed":
        r.packages[1] = replace(package, round_id=other_round().params.round_id)
    elif tamper == "missing share":
        r.packages[1] = replace(package, shares=package.shares[1:])
    else:  # a second package from the same node: the first counts, the copy is refused
        r.packages.append(replace(package, shares=package.shares[::-1]))
    result = r.result()
    contributors = list(r.inputs) if tamper == "duplicated" else [u for u in r.inputs if u != victim]
    assert_exact(result, r.inputs, contributors)
    assert [(phase, node) for phase, node, _ in result.refused] == [("share", victim)]


@pytest.mark.parametrize(
    "tamper", ["flipped bit", "other receiver", "other sender", "replayed", "duplicated"]
)
def test_client_refuses_a_forged_share(tamper):
    r = small_round().through("route")
    u = r.params.clients[0]
    inbox = list(r.inbox[u])
    first = inbox[0]
    if tamper == "flipped bit":
        inbox[0] = replace(first, blob=first.blob[:20] + bytes([first.blob[20] ^ 1]) + first.blob[21:])
    elif tamper == "other receiver":  # the sender's share for w, readdressed to u
        w = next(w for w in r.params.clients if w not in (u, first.sender))
        inbox[0] = replace(next(s for s in r.inbox[w] if s.sender == first.sender), receiver=u)
    elif tamper == "other sender":
        inbox[0], inbox[1] = replace(inbox[0], sender=inbox[1].sender), replace(inbox[1], sender=first.sender)
    elif tamper == "replayed":  # u's share from the same sender, sealed in another round
        old = other_round()
        old_share = next(s for s in old.inbox[u] if s.sender == first.sender)
        inbox[0] = old_share
    else:
        inbox.append(first)
    r.inbox[u] = tuple(inbox)
    with pytest.raises(SecAggError):
        mask_input(r.states[u], r.inbox[u], r.inputs[u])
    result = r.result()  # u leaves the round; the others' count stays exact
    assert u in r.client_refused
    assert_exact(result, r.inputs, [v for v in r.inputs if v != u])


@pytest.mark.parametrize(
    "tamper", ["truncated", "one byte more", "replayed", "padding", "wrong neighbours", "not a sharer"]
)
def test_bad_masked_vector_is_refused_and_counts_stay_exact(tamper):
    r = small_round().through("mask")
    victim = r.masked[2].node
    m = r.masked[2]
    if tamper == "truncated":
        r.masked[2] = replace(m, packed=m.packed[:-1])
    elif tamper == "one byte more":
        r.masked[2] = replace(m, packed=m.packed + b"\0")
    elif tamper == "replayed":
        r.masked[2] = replace(m, round_id=other_round().params.round_id)
    elif tamper == "padding":
        r.masked[2] = replace(m, packed=m.packed[:-1] + bytes([m.packed[-1] | 0x80]))
    elif tamper == "wrong neighbours":
        r.masked[2] = replace(m, masked_with=m.masked_with[1:])
    else:
        r.masked[2] = replace(m, node=12345)
    result = r.result()
    assert_exact(result, r.inputs, [u for u in r.inputs if u != victim])
    assert result.refused[0][0] == "masked"


def test_duplicated_masked_vector_counts_once():
    r = small_round().through("mask")
    r.masked.append(r.masked[0])
    result = r.result()
    assert_exact(result, r.inputs, r.inputs)
    assert [(phase, node) for phase, node, _ in result.refused] == [("masked", r.masked[0].node)]


def test_malformed_fields_are_refused_on_both_sides():
    r = small_round().through("mask")
    victim = r.masked[0].node
    r.masked[0] = replace(r.masked[0], masked_with=None)
    r.through("collect")
    assert r.server.refused[0][:2] == ("masked", victim) and "TypeError" in r.server.refused[0][2]
    u = r.request.survivors[0]
    with pytest.raises(SecAggError, match="malformed"):
        unmask(r.states[u], replace(r.request, survivors=None))
    assert_exact(r.result(), r.inputs, [v for v in r.inputs if v != victim])


def test_client_refuses_an_unmask_request_for_both_shares():
    r = small_round().through("collect")
    u, v = r.request.survivors[:2]
    both = replace(r.request, dropped=r.request.dropped + (v,))
    with pytest.raises(SecAggError, match="both"):
        unmask(r.states[u], both)


def test_client_answers_one_unmask_request_only():
    r = small_round().through("unmask")
    u = r.request.survivors[0]
    assert r.states[u].phase == "done" and r.states[u].held == {}
    with pytest.raises(SecAggError, match="out of order"):
        unmask(
            r.states[u],
            replace(
                r.request,
                survivors=r.request.survivors[1:],
                dropped=r.request.dropped + (r.request.survivors[0],),
            ),
        )


def test_client_refuses_an_unmask_request_of_another_round():
    old, r = other_round(), small_round().through("collect")
    u = r.request.survivors[0]
    with pytest.raises(SecAggError, match="another round"):
        unmask(r.states[u], replace(r.request, round_id=old.params.round_id))


@pytest.mark.parametrize("tamper", ["truncated share", "replayed", "extra share", "duplicated"])
def test_bad_unmask_reply_is_refused(tamper):
    r = small_round().through("unmask")
    reply = r.replies[0]
    owner = next(iter(reply.seed_shares))
    if tamper == "truncated share":
        shares = dict(reply.seed_shares) | {owner: reply.seed_shares[owner][:-1]}
        r.replies[0] = replace(reply, seed_shares=shares)
    elif tamper == "replayed":
        r.replies[0] = replace(reply, round_id=other_round().params.round_id)
    elif tamper == "extra share":  # a key share of a survivor: never both for one node
        r.replies[0] = replace(reply, key_shares={owner: reply.seed_shares[owner]})
    else:
        r.replies.append(reply)
    result = finish(r.server, r.replies)
    assert_exact(result, r.inputs, r.inputs)  # the other 5 replies suffice (t = 3)
    assert [(phase, node) for phase, node, _ in result.refused] == [("unmask", reply.node)]


def test_an_inconsistent_share_cannot_corrupt_the_count():
    r = small_round().through("unmask")
    reply = r.replies[0]
    shares = {u: bytes(32) for u in reply.seed_shares}  # right size, wrong values
    r.replies[0] = replace(reply, seed_shares=shares)
    assert_exact(finish(r.server, r.replies), r.inputs, r.inputs)


# ---------------------------------------------------------------- what the server sees

VIEW_LENGTH = 8000  # 3 bits for 6 clients: 8 bins of ~1000 values


def late_drop_view(x):
    """Client u's masked vector, which arrives only after the server has declared u dropped and
    rebuilt its masking key: the server removes every pairwise mask, only PRG(b_u) remains."""
    inputs = make_inputs(6, VIEW_LENGTH, seed=5)
    u = sorted(inputs)[0]
    inputs[u] = x
    r = Round(inputs, threshold=3, degree=5).through("mask")
    late = next(m for m in r.masked if m.node == u)
    r.masked = [m for m in r.masked if m.node != u]
    r.through("unmask")
    p = r.params
    index = {v: i + 1 for i, v in enumerate(p.graph[u])}
    shares = {index[rep.node]: rep.key_shares[u] for rep in r.replies[: p.threshold]}
    secret = combine_secret(shares)
    view = unpack(late.packed, p.length, p.bits)
    for v in late.masked_with:
        mask = pair_mask(secret, r.server.adverts[v].mask_key, p, u, v)
        view = view - mask if u < v else view + mask
    return view & np.uint16((1 << p.bits) - 1), p.bits


def survivor_view(x):
    """Client u's masked vector after the server removed u's self mask (rebuilt from the seed
    shares it asks for): only the pairwise masks with other survivors remain."""
    inputs = make_inputs(6, VIEW_LENGTH, seed=6)
    u = sorted(inputs)[0]
    inputs[u] = x
    r = Round(inputs, threshold=3, degree=5).through("unmask")
    p = r.params
    index = {v: i + 1 for i, v in enumerate(p.graph[u])}
    holders = [rep for rep in r.replies if rep.node != u][: p.threshold]
    seed = combine_secret({index[rep.node]: rep.seed_shares[u] for rep in holders})
    masked = next(m for m in r.masked if m.node == u)
    view = unpack(masked.packed, p.length, p.bits) - self_mask(seed, p, u)
    return view & np.uint16((1 << p.bits) - 1), p.bits


def uniform_p(view, bits):
    return stats.chisquare(np.bincount(view, minlength=1 << bits)).pvalue


def same_distribution_p(view_a, view_b, bits):
    table = np.stack([np.bincount(v, minlength=1 << bits) for v in (view_a, view_b)])
    table = table[:, table.sum(axis=0) > 0]  # values neither view takes carry no evidence
    return stats.chi2_contingency(table).pvalue if table.shape[1] > 1 else 1.0


@pytest.mark.parametrize("view", [late_drop_view, survivor_view])
def test_server_view_is_uniform_and_independent_of_the_input(view):
    zeros, ones = np.zeros(VIEW_LENGTH, np.uint8), np.ones(VIEW_LENGTH, np.uint8)
    (view_0, bits), (view_1, _) = view(zeros), view(ones)
    assert uniform_p(view_0, bits) > ALPHA and uniform_p(view_1, bits) > ALPHA
    assert same_distribution_p(view_0, view_1, bits) > ALPHA


@pytest.mark.parametrize("view,omitted", [(late_drop_view, "self_mask"), (survivor_view, "pair_mask")])
def test_view_test_catches_a_missing_mask(monkeypatch, view, omitted):
    """The two checks above fail when the client leaves out one of its masks."""
    monkeypatch.setattr(secagg_client, omitted, lambda *a: np.zeros(VIEW_LENGTH, np.uint16))
    zeros, ones = np.zeros(VIEW_LENGTH, np.uint8), np.ones(VIEW_LENGTH, np.uint8)
    (view_0, bits), (view_1, _) = view(zeros), view(ones)
    assert uniform_p(view_0, bits) < ALPHA
    assert same_distribution_p(view_0, view_1, bits) < ALPHA
