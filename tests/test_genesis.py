"""The cluster id (pbft.genesis): a hash of the genesis that changes with every part of it
and with nothing else, the same in the core, the runtime's cluster file and the simulator."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from crypto.keys import KeyRing, SigningKey
from pbft.codec import pack
from pbft.config import ClusterConfig
from pbft.genesis import CLUSTER_ID_BYTES, GenesisError, compute_cluster_id
from pbft.ledger import Account, GeneratedAccounts
from runtime.cluster import load_cluster, write_cluster

SEED = 5
CONFIG = ClusterConfig()
KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(7)]
ACCOUNTS = {"alice": Account(0, 1000), "bob": Account(1, 0)}


def _ring(count: int = 4, keys: list[SigningKey] = KEYS) -> KeyRing:
    return KeyRing({("replica", i): keys[i].verify_key for i in range(count)})


BASE = compute_cluster_id(CONFIG, _ring(), ACCOUNTS)


def test_the_id_is_32_bytes_and_deterministic() -> None:
    assert len(BASE) == CLUSTER_ID_BYTES
    assert compute_cluster_id(CONFIG, _ring(), dict(ACCOUNTS)) == BASE


def test_the_id_does_not_depend_on_account_order() -> None:
    reordered = dict(reversed(list(ACCOUNTS.items())))
    assert list(reordered) != list(ACCOUNTS)
    assert compute_cluster_id(CONFIG, _ring(), reordered) == BASE


@pytest.mark.parametrize(
    "change",
    [
        "replica key",
        "replica count",
        "balance",
        "owner",
        "extra account",
        "account name",
        "protocol parameter",
    ],
)
def test_every_part_of_the_genesis_changes_the_id(change: str) -> None:
    config, ring, accounts = CONFIG, _ring(), dict(ACCOUNTS)
    if change == "replica key":
        ring = _ring(keys=[SigningKey.derive(SEED + 1, "replica/0"), *KEYS[1:]])
    elif change == "replica count":
        config, ring = ClusterConfig(replica_count=7), _ring(7)
    elif change == "balance":
        accounts["bob"] = Account(1, 1)
    elif change == "owner":
        accounts["bob"] = Account(0, 0)
    elif change == "extra account":
        accounts["carol"] = Account(1, 0)
    elif change == "account name":
        accounts["bobby"] = accounts.pop("bob")
    elif change == "protocol parameter":
        config = dataclasses.replace(CONFIG, dedup_window=CONFIG.dedup_window + 1)
    assert compute_cluster_id(config, ring, accounts) != BASE


@pytest.mark.parametrize(
    "rule",
    [
        GeneratedAccounts(1000, 5, "acct-", [0, 1, 2]),
        GeneratedAccounts(17, 2**40, "ü", [2**33], min_width=3),
        GeneratedAccounts(70_000, 0, "", [1, 300]),
    ],
)
def test_a_generated_genesis_has_the_id_of_the_same_accounts_listed(
    rule: GeneratedAccounts,
) -> None:
    listed = compute_cluster_id(ClusterConfig(), _ring(), dict(rule))
    assert compute_cluster_id(ClusterConfig(), _ring(), rule) == listed
    assert compute_cluster_id(ClusterConfig(), _ring(), rule) == listed  # memoised rows


def test_client_keys_are_not_part_of_the_genesis() -> None:
    ring = _ring()
    ring.add(("client", 0), SigningKey.derive(SEED, "client/0").verify_key)
    assert compute_cluster_id(CONFIG, ring, ACCOUNTS) == BASE


def test_the_id_is_domain_separated() -> None:
    # Not the plain hash of any obvious encoding of the same data.
    keys = [KEYS[i].verify_key.public_bytes() for i in range(4)]
    plain = pack([4, 1, keys, [["alice", 0, 1000], ["bob", 1, 0]]])
    assert hashlib.sha256(plain).digest() != BASE


def test_a_key_ring_missing_a_replica_is_refused() -> None:
    with pytest.raises(GenesisError, match="no key for replica 3"):
        compute_cluster_id(CONFIG, _ring(3), ACCOUNTS)


def test_the_cluster_file_replicas_and_simulator_agree_on_the_id(tmp_path: Path) -> None:
    from pbft.replica import Replica

    path = write_cluster(tmp_path / "a", replicas=4, clients=1)
    cluster = load_cluster(path)
    replica = Replica(
        0,
        cluster.config,
        cluster.load_private_key("replica", 0),
        cluster.keyring(),
        cluster.accounts,
    )
    assert replica.cluster_id == cluster.cluster_id
    # Moving replicas to other hosts and ports is the same cluster.
    moved = tmp_path / "moved.toml"
    moved.write_text(
        path.read_text().replace("127.0.0.1", "10.0.0.9").replace("port = 70", "port = 80")
    )
    assert "10.0.0.9" in moved.read_text() and "port = 8000" in moved.read_text()
    assert load_cluster(moved).cluster_id == cluster.cluster_id
    # The same keys with another genesis balance is another cluster.
    richer = tmp_path / "richer.toml"
    richer.write_text(path.read_text().replace("balance = 100000", "balance = 100001", 1))
    assert load_cluster(richer).cluster_id != cluster.cluster_id


def test_the_simulator_computes_the_id_its_replicas_use() -> None:
    from sim.scenario import load_scenario
    from sim.simulator import Simulation

    root = Path(__file__).resolve().parent.parent
    simulation = Simulation(load_scenario(root / "scenarios" / "fault-free.toml"))
    replica = simulation.replicas[0].core
    assert replica is not None
    assert replica.cluster_id == simulation.cluster_id
    assert all(client.cluster_id == simulation.cluster_id for client in simulation.clients)
