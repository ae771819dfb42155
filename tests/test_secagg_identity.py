"""The nodes' long-term identities: key files and roster (``prism-flwr secagg-keys``), their
node-config keys, and what a signature binds."""

from __future__ import annotations

import json
import stat
from dataclasses import replace

import pytest
from flwr.app import Context, RecordDict

import client_app
from prism_flwr.cli import main
from prism_flwr.node_config import NodeConfig, NodeConfigError, Refusal
from prism_flwr.secagg import SecAggError, Trust, advertise_keys, new_round, share_keys
from prism_flwr.secagg.identity import Identity, load_identity, read_roster, write_federation


def test_secagg_keys_writes_private_keys_and_a_roster_and_never_overwrites(tmp_path, capsys) -> None:
    assert main(["secagg-keys", "--nodes", "3", "--out", str(tmp_path)]) == 0
    keys = sorted(tmp_path.glob("node-*.key"))
    assert len(keys) == 3 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    roster = read_roster(tmp_path / "roster.json")
    assert {load_identity(k, tmp_path / "roster.json").public for k in keys} == roster
    assert "node-{partition-id}.key" in capsys.readouterr().out
    assert main(["secagg-keys", "--nodes", "3", "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,why",
    [
        ("not json", "roster"),
        (json.dumps({"format": "other", "members": {}}), "not a prism-secagg-roster/1"),
        (json.dumps({"format": "prism-secagg-roster/1", "members": {"a": "00" * 31}}), "32-byte"),
        (
            json.dumps({"format": "prism-secagg-roster/1", "members": {"a": "11" * 32, "b": "11" * 32}}),
            "unique",
        ),
    ],
)
def test_a_bad_roster_is_refused(tmp_path, text: str, why: str) -> None:
    (tmp_path / "roster.json").write_text(text)
    with pytest.raises(SecAggError, match=why):
        read_roster(tmp_path / "roster.json")


def test_a_key_outside_its_roster_is_refused(tmp_path) -> None:
    write_federation(tmp_path / "a", 1)
    write_federation(tmp_path / "b", 1)
    with pytest.raises(SecAggError, match="own public key is not in its roster"):
        load_identity(tmp_path / "a" / "node-0.key", tmp_path / "b" / "roster.json")


def test_node_config_keys(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)
    base = {"partition-id": 2, "num-partitions": 3}
    with pytest.raises(NodeConfigError, match="secagg-key and secagg-roster go together"):
        NodeConfig.parse({**base, "secagg-key": "k"})
    node = NodeConfig.parse(
        {**base, "secagg-key": "/k/node-{partition-id}.key", "secagg-roster": "/k/r.json"}
    )
    assert [str(p) for p in node.secagg_files()] == ["/k/node-2.key", "/k/r.json"]
    with pytest.raises(NodeConfigError, match="min-secure-aggregation-clients"):
        NodeConfig.parse({**base, "min-secure-aggregation-clients": -1})
    assert NodeConfig.parse(base).secagg_refusal("off") is None
    assert "require-secure-aggregation" in NodeConfig.parse(
        {**base, "require-secure-aggregation": True}
    ).secagg_refusal("off")


def test_a_node_with_a_broken_key_file_refuses_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PRISM_NODE_CONFIG", raising=False)
    write_federation(tmp_path, 2)
    (tmp_path / "node-1.key").write_text("garbage")
    config = {
        "partition-id": 1,
        "num-partitions": 2,
        "secagg-key": str(tmp_path / "node-{partition-id}.key"),
        "secagg-roster": str(tmp_path / "roster.json"),
    }
    context = Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})
    with pytest.raises(Refusal) as err:
        client_app.node_trust(context)
    assert "signing key" in str(err.value) and "\n" not in str(err.value)


def test_a_signature_holds_only_for_the_round_it_was_made_in(tmp_path) -> None:
    """Adverts are signed over every round parameter: the same keys under the same round id but
    another client list or threshold (what a server would give two groups) do not verify."""
    _, roster = write_federation(tmp_path, 3)
    trusts = [Trust(load_identity(tmp_path / f"node-{i}.key", roster)) for i in range(3)]
    params = new_round([1, 2, 3], 2, 2, 8, round_id=bytes(16))
    states, adverts = zip(*(advertise_keys(params, u, trusts[u - 1]) for u in (1, 2, 3)))
    share_keys(states[0], adverts[1:], trusts[0])  # the round as given: accepted
    other = new_round([1, 2, 3], 2, 2, 9, round_id=bytes(16))  # same id, another vector length
    moved = [replace(a, round_id=other.round_id) for a in adverts[1:]]
    with pytest.raises(SecAggError, match="signature does not verify"):
        share_keys(replace(states[0], params=other), moved, trusts[0])
    assert isinstance(trusts[0].identity, Identity)
