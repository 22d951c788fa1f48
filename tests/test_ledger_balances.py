"""Balances are `available` and `held` (issue 11): the digest's proof of one account covers
both, and `pbft balance` prints both as the f + 1 matching replicas reported them."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest

from cli.main import main
from crypto.merkle import verify_inclusion
from pbft.client import BalanceRead
from pbft.ledger import Account, Ledger, Payment
from pbft.operations import Operation
from runtime.client import PaymentClient
from runtime.cluster import write_cluster
from runtime.ports import consecutive_free_ports


def _held_ledger() -> Ledger:
    ledger = Ledger({"alice": Account(1, 100), "shop": Account(2, 0)}, dedup_window=8)
    ledger.begin_batch(1, 1_000)
    hold = Operation.authorize("alice", "shop", 30, 60_000)
    payment = Payment(1, 1, hold.payer, hold.payee, hold.amount, hold.op, 0, 0, 60_000)
    assert ledger.execute(payment, bytes(32), 1).decision.reason.value == ""
    return ledger


def test_the_account_proof_proves_the_available_and_the_held_balance() -> None:
    ledger = _held_ledger()
    digest = ledger.digest()
    proven = ledger.account_proof("alice")
    assert proven is not None
    leaf, proof = proven
    assert verify_inclusion(digest, leaf, proof)
    assert msgpack.unpackb(leaf) == ["account", "alice", 1, 70, 30]
    # The same available balance with another held one is not proven by it.
    for forged in (["account", "alice", 1, 70, 0], ["account", "alice", 1, 100, 30]):
        assert not verify_inclusion(digest, msgpack.packb(forged), proof)


def test_pbft_balance_prints_the_available_and_the_held_balance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = write_cluster(tmp_path, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])

    async def read(self: PaymentClient, account: str) -> BalanceRead:
        return BalanceRead(1, account, True, 70, (0, 2), 9, held=30)

    monkeypatch.setattr(PaymentClient, "balance", read)
    argv = ["balance", "--cluster", str(cluster), "--account", "acct-00000", "--timeout", "5"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["balance"], printed["held"]) == (70, 30)
    assert printed["as_of_seq"] == 9
