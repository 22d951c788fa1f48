"""Review finding G12: a gateway database belongs to one cluster. Its unanswered requests,
request ids and receipts mean nothing elsewhere: resumed on another cluster, they would
move money on a ledger that never received them. The database records its cluster (and
the clients it served) when first used; another cluster's gateway refuses it (the library:
StoreError; `pbft gateway`: one line, exit 2); a database written before the binding
adopts the cluster that opens it. No cluster runs: every refusal comes first."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cli.exits import EXIT_USAGE
from gateway.service import Gateway
from gateway.store import Database, GatewayStore, StoreError
from pbft.receipt import short_id
from runtime.cluster import Cluster, load_cluster, write_cluster
from runtime.ports import consecutive_free_ports


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    files = []
    for name in ("one", "two"):
        root = tmp_path_factory.mktemp(name)
        files.append(
            write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])
        )
    return files[0], files[1]


def test_a_database_is_bound_to_its_first_cluster(tmp_path: Path) -> None:
    db = Database(tmp_path / "g.db")
    try:
        assert db.bind_cluster("aaaa", [0]) is False  # new: nothing to adopt
        assert db.bind_cluster("aaaa", [1]) is False
        with pytest.raises(StoreError, match="belongs to cluster aaaa, not to this cluster bbbb"):
            db.bind_cluster("bbbb", [0])
        meta = dict(db.db.execute("SELECT key, value FROM meta").fetchall())
        assert meta == {"cluster_id": "aaaa", "clients": "0,1", "schema": "1"}
    finally:
        db.close()


def test_a_database_from_before_the_binding_adopts_its_cluster(tmp_path: Path) -> None:
    db = Database(tmp_path / "g.db")
    try:
        db.create_key(0)
        with db.db:
            db.db.execute("DROP TABLE meta")  # as written before meta existed
    finally:
        db.close()
    db = Database(tmp_path / "g.db")
    try:
        assert db.bind_cluster("aaaa", [0]) is True
        assert db.bind_cluster("aaaa", [0]) is False
        with pytest.raises(StoreError):
            db.bind_cluster("bbbb", [0])
    finally:
        db.close()


def test_a_gateway_refuses_another_clusters_database(
    clusters: tuple[Path, Path], tmp_path: Path
) -> None:
    one, two = (load_cluster(path) for path in clusters)

    async def open_with(cluster: Cluster) -> None:
        store = GatewayStore(tmp_path / "g.db")
        try:
            async with Gateway.open(cluster, (0,), store, timeout_s=1.0):
                pass
        finally:
            store.close()

    trio.run(open_with, one)
    with pytest.raises(StoreError) as refused:
        trio.run(open_with, two)
    assert short_id(one.cluster_id) in str(refused.value)
    assert short_id(two.cluster_id) in str(refused.value)


def test_pbft_gateway_refuses_another_clusters_db_in_one_line(
    clusters: tuple[Path, Path], tmp_path: Path
) -> None:
    one, two = clusters
    db = tmp_path / "g.db"
    database = Database(db)
    try:
        database.bind_cluster(short_id(load_cluster(one).cluster_id), [0])
        with database.db:  # an unanswered request the other cluster must never see
            database.db.execute("INSERT INTO request_ids (client_id, last) VALUES (0, 1)")
    finally:
        database.close()
    pbft = Path(sys.executable).parent / "pbft"
    done = subprocess.run(
        [
            str(pbft),
            "gateway",
            "--cluster",
            str(two),
            "--client",
            "0",
            "--db",
            str(db),
            "--listen",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    expected = (
        f"pbft: --db: {db} belongs to cluster {short_id(load_cluster(one).cluster_id)}, "
        f"not to this cluster {short_id(load_cluster(two).cluster_id)}"
    )
    assert lines[0] == expected
    with sqlite3.connect(db) as check:  # left as it was
        assert check.execute("SELECT last FROM request_ids").fetchall() == [(1,)]
