"""Issue 8, point 7: a checkpoint larger than a store record no longer stops every replica.

The store writes large values in chunks (tests/test_storage.py has the format and the crash
cuts); here a replica checkpoints a ledger whose snapshot spans many chunks and restarts
from the store, and a configuration whose largest checkpoint could not be stored or
restored is refused at start with one clear line and exit 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgpack
import pytest
from replica_harness import Chain, Cluster, persists

from cli.main import EXIT_USAGE, main
from pbft.checkpoint_size import (
    checkpoint_record_bound,
    checkpoint_size,
    checkpoint_size_problem,
    snapshot_size_bound,
)
from pbft.codec import MAX_LOCAL_RECORD_BYTES, unpack
from pbft.config import ClusterConfig
from pbft.holds import LedgerLimits
from pbft.ledger import (
    MAX_AMOUNT,
    MAX_ID,
    MAX_SNAPSHOT_SIZE_BYTES,
    Account,
    GeneratedAccounts,
    Ledger,
    Payment,
    Reason,
)
from pbft.replica import Replica
from runtime.cluster import ClusterFileError, load_cluster, write_cluster
from runtime.ports import consecutive_free_ports
from runtime.storage import CHUNK_BYTES, MAX_VALUE_BYTES, DurableStore
from sim.scenario import ScenarioError, parse_scenario
from sim.workload import genesis_accounts

# --- the bound ----------------------------------------------------------------------------------


def _brim_full_ledger(dedup_window: int, clients: int) -> tuple[Mapping[str, Account], Ledger]:
    """Names of every length class, the widest owners and balances, and every client's window
    full of the longest decisions (rejections for insufficient funds) at the largest ids."""
    accounts = {
        "a": Account(owner=0, balance=MAX_AMOUNT // 2),
        "b" * 31: Account(owner=1, balance=MAX_AMOUNT // 2 + 1),
        "d" * 64: Account(owner=1, balance=0),
        "é" * 64: Account(owner=2**32 - 1, balance=0),  # 128 UTF-8 bytes
        "\U0001f600" * 64: Account(owner=2**32 - 1, balance=0),  # 256 bytes: a str16 header
    }
    for client in range(clients):
        accounts["c" * 32 + str(client)] = Account(owner=MAX_ID - client, balance=0)
    ledger = Ledger(accounts, dedup_window)
    for client in range(clients):
        for index in range(dedup_window + 3):  # past the window: the oldest are evicted
            payment = Payment(
                MAX_ID - client, MAX_ID - 1000 + index, "c" * 32 + str(client), "d" * 64, 1
            )
            result = ledger.execute(payment, bytes(32), MAX_ID - index)
            assert result.decision.reason is Reason.INSUFFICIENT_FUNDS
    return accounts, ledger


@pytest.mark.parametrize(("dedup_window", "clients"), [(1, 1), (4, 3), (40, 20)])
def test_the_snapshot_bound_holds_for_a_brim_full_ledger_and_is_tight(
    dedup_window: int, clients: int
) -> None:
    accounts, ledger = _brim_full_ledger(dedup_window, clients)
    actual = len(ledger.snapshot())
    bound = snapshot_size_bound(accounts, clients, dedup_window)
    assert actual <= bound
    # Slack: nothing is held here (8 bytes an account), no records (the fixed part), and
    # no decision carries the longest reason.
    assert bound - actual <= 100 + 20 * len(accounts) + 8 * clients * dedup_window


def test_the_bound_for_generated_accounts_is_the_bound_for_the_same_accounts_listed() -> None:
    generated = GeneratedAccounts(1200, 7, "acct-", [0, 300, 2**32 - 1])
    listed = {name: generated[name] for name in generated}
    # ... and the rule: at worst every generated account's balance changed.
    rule = len(msgpack.packb(generated.rule())) + 3 * 8  # its ints may grow to 9 bytes
    extra = snapshot_size_bound(generated, 2, 16) - snapshot_size_bound(listed, 2, 16)
    assert len(msgpack.packb(generated.rule())) <= extra <= rule
    assert len(Ledger(generated, 16).snapshot()) <= snapshot_size_bound(generated, 0, 16)
    # Refundable payments are records, which the bound leaves out (pbft/checkpoint_size.py).
    everything_changed = Ledger(generated, 16, LedgerLimits(refund_window_ms=0))
    for index in range(0, 1200, 2):  # each pair trades 7 for 8 and 6
        payment = Payment(
            generated.owner(index), index, generated.name(index), generated.name(index + 1), 1
        )
        assert everything_changed.execute(payment, bytes(32), 1).decision.reason is Reason.NONE
    assert everything_changed.recount_total() == 1200 * 7
    size = len(everything_changed.snapshot())
    assert size <= snapshot_size_bound(generated, 3, 16)


def test_the_problem_names_the_limit_the_numbers_and_the_remedy() -> None:
    config = ClusterConfig()
    assert checkpoint_size_problem(config, {}, 2) is None
    # 800 clients with full default windows: about 269 MB of decisions.
    problem = checkpoint_size_problem(config, {}, 800)
    assert problem is not None
    assert "800 clients x dedup_window 4,096" in problem
    assert f"more than the {MAX_SNAPSHOT_SIZE_BYTES:,} bytes a replica restores" in problem
    assert "smaller protocol.dedup_window" in problem
    # The store's own limit is checked when the driver names a smaller one.
    size = checkpoint_size(config, {}, 100)
    problem = checkpoint_size_problem(config, {}, 100, store_limit=size.record_bytes - 1)
    assert problem is not None and "the store holds" in problem
    assert checkpoint_size_problem(config, {}, 100, store_limit=size.record_bytes) is None


def test_whatever_a_replica_can_restore_the_store_can_hold() -> None:
    config = ClusterConfig(replica_count=256)
    assert checkpoint_record_bound(config, MAX_SNAPSHOT_SIZE_BYTES) <= MAX_LOCAL_RECORD_BYTES
    assert MAX_LOCAL_RECORD_BYTES <= MAX_VALUE_BYTES


# --- a replica checkpoints a large ledger and restarts from its store -----------------------------


def _long_named_accounts(count: int) -> dict[str, Account]:
    # 64-character names: 71 bytes an account in the snapshot. Listed, not a rule: a
    # generated genesis snapshots only the accounts payments changed.
    prefix = "x" * (64 - len(str(count - 1)))
    return dict(GeneratedAccounts(count, 1000, prefix, [0, 1, 2]))


def _checkpoint_and_restart(
    log: Path, accounts: Mapping[str, Account], chunk_bytes: int
) -> tuple[Replica, bytes, Replica]:
    """Replica 1 executes 4 entries, gets 2f matching CHECKPOINTs and persists the stable
    checkpoint; every handle()'s Persists go to the store as one batch, as the driver does.
    Then a new replica is built from the reopened store. (The first replica, the record and
    the restarted replica.)"""
    cluster = Cluster(accounts=accounts)
    replica = cluster.replica(1)
    chain: Chain = cluster.chain()
    for seq in range(1, 5):
        chain.append([cluster.request(seq, seq)])
    with DurableStore.open(log, chunk_bytes=chunk_bytes) as store:
        for seq in range(1, 5):
            actions = cluster.drive_commit(replica, chain[seq])
            store.apply([(p.key, p.value) for p in persists(actions)])
        assert replica.last_executed == 4
        digest = replica.ledger.digest()
        for other in (0, 2):
            actions = cluster.deliver(
                replica, cluster.checkpoint(4, other, chain[4].digest, digest)
            )
            store.apply([(p.key, p.value) for p in persists(actions)])
        assert replica.stable.seq == 4
        record = store.get(("checkpoint",))
        assert record is not None
    with DurableStore.open(log, chunk_bytes=chunk_bytes) as store:
        assert store.recovery_report.clean
        restarted = cluster.replica(1, records=store.records())
    return replica, record, restarted


def test_a_replica_restarts_from_a_checkpoint_of_many_chunks(tmp_path: Path) -> None:
    accounts = _long_named_accounts(20_000)  # a 1.4 MB snapshot in chunks of 64 KiB
    replica, record, restarted = _checkpoint_and_restart(tmp_path / "r.log", accounts, 65536)
    assert len(record) > 20 * 65536
    assert restarted.stable.seq == restarted.last_executed == 4
    assert restarted.ledger.digest() == replica.ledger.digest()
    assert restarted.stable.snapshot == replica.stable.snapshot
    bound = checkpoint_size(replica.config, accounts, 3)
    assert len(replica.stable.snapshot) <= bound.snapshot_bytes
    assert len(record) <= bound.record_bytes


@pytest.mark.slow
def test_a_replica_restarts_from_a_checkpoint_above_the_old_64_mib_record_limit(
    tmp_path: Path,
) -> None:
    """Real size, default chunks: a million accounts with 64-character names, the snapshot
    that made every replica's apply() raise before (slow: building, digesting and restoring
    the ledger take most of the time, the store little; see runtime/bench_checkpoint.py)."""
    replica, record, restarted = _checkpoint_and_restart(
        tmp_path / "r.log", _long_named_accounts(1_000_000), CHUNK_BYTES
    )
    seq, _, _, snapshot, _ = unpack(record, MAX_LOCAL_RECORD_BYTES)
    assert seq == 4 and len(snapshot) > 64 * 1024 * 1024
    assert restarted.stable.seq == 4
    assert restarted.ledger.digest() == replica.ledger.digest()


# --- refused at start -----------------------------------------------------------------------------


def _one_clean_line(error: str) -> str:
    assert "Traceback" not in error and "internal error" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    return lines[0]


def _unstorable_cluster(root: Path) -> Path:
    """A valid cluster, then its protocol table edited to a window no store can hold."""
    # 4 clients x 1,000,000 decisions of 82 bytes: 328 MB, above the 256 MiB snapshot limit.
    path = write_cluster(root, replicas=4, clients=4, base_port=consecutive_free_ports(4)[0])
    text = path.read_text()
    assert text.startswith("f = 1\n")
    path.write_text(text.replace("f = 1\n", "f = 1\n[protocol]\ndedup_window = 1000000\n", 1))
    return path


def test_loading_a_cluster_whose_checkpoint_cannot_be_stored_is_refused(tmp_path: Path) -> None:
    path = _unstorable_cluster(tmp_path)
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert caught.value.field == "checkpoint size"
    assert "4 clients x dedup_window 1,000,000" in caught.value.problem


def test_pbft_replica_refuses_to_start_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _unstorable_cluster(tmp_path)
    assert main(["replica", "--cluster", str(path), "--id", "0"]) == EXIT_USAGE
    line = _one_clean_line(capsys.readouterr().err)
    assert line.startswith(f"pbft: {path}: checkpoint size: the ledger snapshot can reach")
    assert "use fewer accounts or clients, or a smaller protocol.dedup_window" in line
    assert not (tmp_path / "data-0").exists()  # refused before anything was created


def test_pbft_cluster_up_refuses_an_existing_unstorable_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _unstorable_cluster(tmp_path)
    with pytest.raises(ClusterFileError):  # or the command below would start a cluster
        load_cluster(path)
    assert main(["cluster", "up", "--dir", str(tmp_path)]) == EXIT_USAGE
    assert f"{path}: checkpoint size:" in _one_clean_line(capsys.readouterr().err)


def test_pbft_cluster_up_writes_no_cluster_it_would_have_to_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "many"
    assert main(["cluster", "up", "--dir", str(root), "--clients", "1000"]) == EXIT_USAGE
    line = _one_clean_line(capsys.readouterr().err)
    assert "1,000 clients x dedup_window 4,096" in line
    assert not root.exists()  # refused before a key was made


def test_the_simulator_refuses_the_same_clients_a_cluster_file_would() -> None:
    accounts = genesis_accounts(8, 1000, 100)
    expected = checkpoint_size_problem(
        ClusterConfig(), accounts, 1000, remedy="use fewer clients or accounts"
    )
    assert expected is not None
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(
            'name = "many"\n[workload]\nclients = 1000\naccounts = 8\ninitial_balance = 100\n'
        )
    assert str(caught.value).endswith(f"workload.clients: {expected}")
    # 400 clients: 139 MB of full dedup windows and 120 MB of records at the default caps.
    parse_scenario('name = "some"\n[workload]\nclients = 400\n')
