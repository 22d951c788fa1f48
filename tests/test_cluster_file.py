"""Cluster files: keygen writes what load reads; every malformed field is named."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cli.main import main
from pbft.ledger import Account, Ledger
from runtime.cluster import ClusterFileError, load_cluster, write_cluster


def test_keygen_writes_a_cluster_that_loads_with_private_keys_mode_0600(tmp_path: Path) -> None:
    assert main(["keygen", "--replicas", "4", "--clients", "2", "--out", str(tmp_path)]) == 0
    cluster = load_cluster(tmp_path / "cluster.toml")
    assert cluster.config.replica_count == 4 and cluster.config.fault_tolerance == 1
    assert [replica.port for replica in cluster.replicas] == [7000, 7001, 7002, 7003]
    assert sorted(cluster.client_keys) == [0, 1]
    assert {account.owner for account in cluster.accounts.values()} == {0, 1}
    for role, count in (("replica", 4), ("client", 2)):
        for principal in range(count):
            path = cluster.private_key_path(role, principal)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            key = cluster.load_private_key(role, principal)
            assert cluster.keyring().get((role, principal)) == key.verify_key


def test_keygen_never_overwrites_an_existing_cluster(tmp_path: Path) -> None:
    write_cluster(tmp_path, replicas=4, clients=1)
    before = (tmp_path / "cluster.toml").read_text()
    assert main(["keygen", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "cluster.toml").read_text() == before


def test_a_private_key_of_another_principal_is_refused(tmp_path: Path) -> None:
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=1))
    os.replace(tmp_path / "replica-2.key", tmp_path / "replica-1.key")
    with pytest.raises(ClusterFileError, match="does not match replica 1"):
        cluster.load_private_key("replica", 1)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda text: text.replace("f = 1", "f = 2"), "f"),
        (lambda text: text.replace("port = 7001", "port = 70001"), "replicas[1].port"),
        (lambda text: text.replace("id = 2\n", "id = 3\n", 1), "replicas[2].id"),
        (lambda text: text.replace('host = "127.0.0.1"', "hots = 1", 1), "replicas[0].hots"),
        (lambda text: text.replace("owner = 0", "owner = 9", 1), "accounts[0].owner"),
        (lambda text: text.replace("balance = 100000", "balance = -1", 1), "accounts[0].balance"),
        (lambda text: text + "\n[protocol]\nbatch_size = 0\n", "protocol"),
        (lambda text: text + "\n[protocol]\nbatch_sise = 4\n", "protocol.batch_sise"),
        (
            lambda text: text + "\n[transport]\nclient_frames_per_s = 0\n",
            "transport.client_frames_per_s",
        ),
        (
            lambda text: text + "\n[transport]\nclient_frame_burst = 1.5\n",
            "transport.client_frame_burst",
        ),
        (lambda text: text + "\n[transport]\npace = 4\n", "transport.pace"),
        (
            lambda text: text + "\n[history]\nretention_seqs = 0\n",
            "history.retention_seqs",
        ),
        (
            lambda text: text + '\n[history]\nretention_seqs = "1d"\n',
            "history.retention_seqs",
        ),
        (lambda text: text + "\n[history]\nretention = 5\n", "history.retention"),
        (lambda text: "history = 5\n" + text, "history"),
        (
            lambda text: text.replace('public_key = "', 'public_key = "zz', 1),
            "replicas[0].public_key",
        ),
        (lambda text: text + "\n[[", "file"),
    ],
)
def test_a_malformed_cluster_file_names_the_field(tmp_path: Path, edit, field: str) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=1)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert caught.value.field == field
    assert str(path) in str(caught.value)


def test_a_clients_pace_comes_from_the_cluster_file(tmp_path: Path) -> None:
    """[transport] sets how many frames a second one client may send each replica (a busy
    gateway needs more than the default); without it, the transport's default holds."""
    from runtime.node import ReplicaNode
    from runtime.transport import TransportConfig

    path = write_cluster(tmp_path, replicas=4, clients=1)
    default = load_cluster(path)
    assert default.transport_config().client_inbound_rate == TransportConfig.client_inbound_rate
    path.write_text(
        path.read_text() + "\n[transport]\nclient_frames_per_s = 5000\nclient_frame_burst = 64\n"
    )
    cluster = load_cluster(path)
    node = ReplicaNode(cluster, 0, tmp_path / "data")
    assert node.transport_config.client_inbound_rate == 5000
    assert node.transport_config.client_inbound_burst == 64
    assert cluster.cluster_id == default.cluster_id  # a local policy, not the cluster's identity


def test_history_retention_comes_from_the_cluster_file(tmp_path: Path) -> None:
    """[history] retention_seqs sets how many seqs each replica keeps for lookups; without
    it, pbft/history.py's default. Each replica's own policy: not the cluster's identity."""
    from pbft.history import DEFAULT_RETENTION_SEQS
    from runtime.node import ReplicaNode

    path = write_cluster(tmp_path, replicas=4, clients=1)
    default = load_cluster(path)
    assert ReplicaNode(default, 0, tmp_path / "data").history_retention == DEFAULT_RETENTION_SEQS
    path.write_text(path.read_text() + "\n[history]\nretention_seqs = 500\n")
    cluster = load_cluster(path)
    assert ReplicaNode(cluster, 0, tmp_path / "data").history_retention == 500
    assert (
        ReplicaNode(cluster, 0, tmp_path / "data", history_retention_seqs=7).history_retention == 7
    )
    assert cluster.cluster_id == default.cluster_id


def test_a_missing_cluster_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(tmp_path / "nope.toml")
    assert caught.value.field == "file"


def test_a_generated_genesis_loads_as_a_rule_with_the_same_ledger_every_time(
    tmp_path: Path,
) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=3, generated_accounts=1000)
    assert "[[accounts]]" not in path.read_text()
    cluster = load_cluster(path)
    assert len(cluster.accounts) == 1000
    assert cluster.accounts["acct-000"] == Account(owner=0, balance=100_000)
    assert cluster.accounts["acct-998"] == Account(owner=2, balance=100_000)
    assert "acct-1000" not in cluster.accounts
    listed = dict(cluster.accounts)
    assert Ledger(cluster.accounts).accounts() == Ledger(listed).accounts()
    assert Ledger(load_cluster(path).accounts).digest() == Ledger(cluster.accounts).digest()


@pytest.mark.parametrize(
    ("genesis", "field"),
    [
        ("generated_accounts = 0\nbalance = 1", "genesis.generated_accounts"),
        ("generated_accounts = 10\nbalance = -5", "genesis.balance"),
        ("balance = 5", "genesis.generated_accounts"),
        ("generated_accounts = 10", "genesis.balance"),
        ('generated_accounts = 10\nbalance = 1\nprefix = "' + "p" * 64 + '"', "genesis.prefix"),
        ("generated_accounts = 10\nbalance = 1\ncount = 4", "genesis.count"),
        ("generated_accounts = 10\nbalance = 2305843009213693952", "genesis"),
    ],
)
def test_a_malformed_genesis_names_the_field(tmp_path: Path, genesis: str, field: str) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=1, generated_accounts=10)
    text = path.read_text()
    # [genesis] is the last table write_cluster writes.
    path.write_text(text[: text.index("[genesis]")] + "[genesis]\n" + genesis + "\n")
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert caught.value.field == field


def test_accounts_and_a_generated_genesis_together_are_refused(tmp_path: Path) -> None:
    path = write_cluster(tmp_path, replicas=4, clients=1)
    path.write_text(path.read_text() + "\n[genesis]\ngenerated_accounts = 5\nbalance = 1\n")
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert caught.value.field == "genesis"


def test_keygen_writes_a_generated_genesis_and_refuses_a_bad_count(tmp_path: Path) -> None:
    out = tmp_path / "a"
    assert main(["keygen", "--out", str(out), "--generated-accounts", "5000"]) == 0
    assert len(load_cluster(out / "cluster.toml").accounts) == 5000
    bad = tmp_path / "b"
    assert main(["keygen", "--out", str(bad), "--generated-accounts", "0"]) == 2
    assert not (bad / "cluster.toml").exists()
