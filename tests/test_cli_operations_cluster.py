"""Holds, captures, voids, refunds and opened accounts through a real cluster, as a user runs
them: `pbft authorize | capture | void | refund | open-account` (and `pay`, `balance`,
`verify-receipt`) against four replica processes on 127.0.0.1. Each refusal reaches the
command with its reason and exit 1; every receipt verifies offline, and one whose op was
altered does not.

The replicas are started by this module and stopped by it (bounded waits throughout). The
tests share one cluster, so each works on balance differences, not absolute balances.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.exits import EXIT_NO, EXIT_OK
from cli.main import main
from pbft.messages import Request
from pbft.receipt import Receipt, verify_receipt
from pbft.signed import Envelope, peek, seal
from runtime.client import PaymentClient
from runtime.localcluster import LocalCluster

# Replica processes start slowly on a loaded 2-core machine: generous, and only an upper bound.
STARTUP_S = 60.0
TIMEOUT = "30"
# client 0 owns acct-00000 and acct-00001, client 1 acct-00002 and acct-00003 (write_cluster).
PAYER, PAYEE = "acct-00000", "acct-00002"
HOUR_MS = "3600000"
# The highest seq any request of this module was decided at (balances are read as of it).
_LAST_SEQ = [0]


def _decided(seq: int) -> None:
    _LAST_SEQ[0] = max(_LAST_SEQ[0], seq)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.create(tmp_path_factory.mktemp("ops"), replicas=4, clients=2)
    cluster.start_all()
    try:

        async def connected() -> None:
            async with PaymentClient(cluster.cluster, 0) as client:
                await client.wait_connected(timeout_s=STARTUP_S)

        trio.run(connected)
        yield cluster
    finally:
        for replica, code in sorted(cluster.exited().items()):
            print(cluster.exit_report(replica, code), file=sys.stderr)
        cluster.stop_all()


@dataclass
class Ran:
    code: int
    stdout: str
    err: str

    @property
    def out(self) -> dict[str, Any] | None:
        """The JSON line on stdout, if any (a command's stdout is that line or nothing)."""
        lines = self.stdout.splitlines()
        assert len(lines) <= 1, self.stdout
        return json.loads(lines[0]) if lines else None


class Cli:
    def __init__(self, local: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
        self.path = str(local.path)
        self.capsys = capsys

    def __call__(self, command: str, client: int | None, *options: str) -> Ran:
        argv = [command, "--cluster", self.path]
        if client is not None:
            argv += ["--client", str(client)]
        if command != "verify-receipt":
            argv += ["--timeout", TIMEOUT]
        code = main([*argv, *options])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err and "internal error" not in err, err
        ran = Ran(code, out, err)
        if command != "verify-receipt" and out.startswith("{"):
            _decided(ran.out.get("seq", 0) if ran.out else 0)
        return ran

    def ok(self, command: str, client: int, *options: str) -> dict[str, Any]:
        ran = self(command, client, *options)
        assert ran.code == EXIT_OK, ran.err
        assert ran.out is not None and ran.out["outcome"] == "confirmed"
        return ran.out

    def refused(self, reason: str, noun: str, command: str, client: int, *options: str) -> None:
        """Rejected with `reason`: exit 1, the JSON line says so, and stderr's last line."""
        ran = self(command, client, *options)
        assert ran.code == EXIT_NO, ran.err
        assert ran.out is not None
        assert (ran.out["outcome"], ran.out["reason"]) == ("rejected", reason)
        assert ran.err.strip().splitlines()[-1] == f"pbft: {noun} rejected: {reason}"

    def ok_lookup(self, command: str, client: int, *options: str) -> dict[str, Any]:
        ran = self(command, client, *options)
        assert ran.code == EXIT_OK, ran.err
        assert ran.out is not None
        return ran.out

    def read(self, account: str) -> dict[str, Any]:
        """`pbft balance` once f + 1 agreeing replicas have executed every request decided
        so far: two replicas a step behind the two that decided could agree on an older one."""
        for _ in range(100):
            ran = self("balance", 0, "--account", account)
            assert ran.code == EXIT_OK, ran.err
            assert ran.out is not None
            if ran.out["as_of_seq"] >= _LAST_SEQ[0]:
                return ran.out
            time.sleep(0.05)
        raise AssertionError(f"no balance of {account} as of seq {_LAST_SEQ[0]}: {ran.out}")

    def balance(self, account: str) -> int:
        """The available balance (what a hold keeps is apart, in "held")."""
        return int(self.read(account)["balance"])

    def verified(self, receipt: Path) -> dict[str, Any]:
        ran = self("verify-receipt", None, str(receipt))
        assert ran.code == EXIT_OK, ran.err
        assert ran.out is not None and ran.out["valid"] is True
        return ran.out


@pytest.fixture
def cli(local: LocalCluster, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(local, capsys)


def test_a_hold_captured_with_a_remainder_then_refunded_in_parts(cli: Cli, tmp_path: Path) -> None:
    payer, payee = cli.balance(PAYER), cli.balance(PAYEE)
    held = cli.ok(
        "authorize", 0, "--from", PAYER, "--to", PAYEE, "--amount", "300",
        "--expires-in-ms", HOUR_MS, "--receipt", str(tmp_path / "authorize.bin"),
    )  # fmt: skip
    hold = held["hold"]
    assert hold == f"0:{held['request_id']}" and held["op"] == "authorize"
    assert (cli.balance(PAYER), cli.balance(PAYEE)) == (payer - 300, payee)  # available
    held_before = cli.read(PAYER)["held"]
    assert held_before >= 300

    # Only the payee's owner captures, at most what is held.
    cli.refused("unauthorized", "capture", "capture", 0, "--hold", hold, "--amount", "10")
    cli.refused("exceeds_hold", "capture", "capture", 1, "--hold", hold, "--amount", "301")
    captured = cli.ok(
        "capture", 1, "--hold", hold, "--amount", "200",
        "--receipt", str(tmp_path / "capture.bin"),
    )  # fmt: skip
    assert (captured["hold"], captured["payment"]) == (hold, hold)
    # The payee got 200; the remainder, 100, went back to the payer.
    assert (cli.balance(PAYER), cli.balance(PAYEE)) == (payer - 200, payee + 200)
    assert cli.read(PAYER)["held"] == held_before - 300
    cli.refused("hold_already_captured", "capture", "capture", 1, "--hold", hold, "--amount", "1")
    cli.refused("hold_already_captured", "void", "void", 0, "--hold", hold)

    # The captured payment is named by the hold's id; refunds never exceed it.
    cli.refused("unauthorized", "refund", "refund", 0, "--payment", hold, "--amount", "1")
    cli.ok("refund", 1, "--payment", hold, "--amount", "150")
    cli.refused("exceeds_refundable", "refund", "refund", 1, "--payment", hold, "--amount", "51")
    refunded = cli.ok(
        "refund", 1, "--payment", hold, "--amount", "50",
        "--receipt", str(tmp_path / "refund.bin"),
    )  # fmt: skip
    assert refunded["payment"] == hold
    assert (cli.balance(PAYER), cli.balance(PAYEE)) == (payer, payee)

    shown = cli.verified(tmp_path / "authorize.bin")
    assert (shown["op"], shown["hold"], shown["amount"]) == ("authorize", hold, 300)
    assert shown["expires_in_ms"] == int(HOUR_MS) and shown["outcome"] == "confirmed"
    shown = cli.verified(tmp_path / "capture.bin")
    assert (shown["op"], shown["hold"], shown["amount"], shown["client_id"]) == (
        "capture", hold, 200, 1
    )  # fmt: skip
    shown = cli.verified(tmp_path / "refund.bin")
    assert (shown["op"], shown["payment"], shown["amount"]) == ("refund", hold, 50)


def test_a_void_by_either_side_releases_the_hold_once(cli: Cli, tmp_path: Path) -> None:
    payer = cli.balance(PAYER)
    authorize = ["--from", PAYER, "--to", PAYEE, "--amount", "70", "--expires-in-ms", HOUR_MS]
    hold = cli.ok("authorize", 0, *authorize)["hold"]
    assert cli.balance(PAYER) == payer - 70
    # The payee's owner lets it go (say the stock is missing).
    voided = cli.ok("void", 1, "--hold", hold, "--receipt", str(tmp_path / "void.bin"))
    assert voided["hold"] == hold
    assert cli.balance(PAYER) == payer
    cli.refused("hold_already_voided", "void", "void", 1, "--hold", hold)
    cli.refused("hold_already_voided", "capture", "capture", 1, "--hold", hold, "--amount", "70")
    shown = cli.verified(tmp_path / "void.bin")
    assert (shown["op"], shown["hold"], shown["amount"]) == ("void", hold, 0)

    # The payer's owner cancels before capture.
    hold = cli.ok("authorize", 0, *authorize)["hold"]
    cli.ok("void", 0, "--hold", hold)
    assert cli.balance(PAYER) == payer


def test_each_refusal_reaches_the_command_with_its_reason(cli: Cli) -> None:
    authorize = ["--from", PAYER, "--to", PAYEE, "--expires-in-ms", HOUR_MS]
    cli.refused(
        "insufficient_funds", "authorization", "authorize", 0, *authorize,
        "--amount", str(10**12),
    )  # fmt: skip
    cli.refused(
        "invalid_expiry", "authorization", "authorize", 0, *authorize, "--amount", "1",
        "--expires-in-ms", "0",
    )  # fmt: skip
    cli.refused("unauthorized", "authorization", "authorize", 1, *authorize, "--amount", "1")
    cli.refused(
        "same_account", "authorization", "authorize", 0,
        "--from", PAYER, "--to", PAYER, "--amount", "1", "--expires-in-ms", HOUR_MS,
    )  # fmt: skip
    cli.refused("invalid_amount", "authorization", "authorize", 0, *authorize, "--amount", "0")
    cli.refused("hold_not_found", "capture", "capture", 1, "--hold", "0:1", "--amount", "1")
    cli.refused("hold_not_found", "void", "void", 0, "--hold", "1:1")
    cli.refused("payment_not_found", "refund", "refund", 1, "--payment", "0:1", "--amount", "1")

    # A plain payment is refundable by its own id, the "payment" `pbft pay` prints.
    paid = cli.ok("pay", 0, "--from", PAYER, "--to", PAYEE, "--amount", "40")
    assert paid["payment"] == f"0:{paid['request_id']}" and paid["op"] == "transfer"
    cli.refused(
        "exceeds_refundable", "refund", "refund", 1, "--payment", paid["payment"],
        "--amount", "41",
    )  # fmt: skip
    cli.ok("refund", 1, "--payment", paid["payment"], "--amount", "40")


def test_open_account_then_pay_into_it(cli: Cli, tmp_path: Path) -> None:
    opened = cli.ok(
        "open-account", 0, "--account", "shop-0", "--receipt", str(tmp_path / "open.bin")
    )
    assert opened["account"] == "shop-0" and opened["op"] == "open_account"
    assert cli.balance("shop-0") == 0
    cli.refused("account_exists", "account opening", "open-account", 1, "--account", "shop-0")
    cli.refused("account_exists", "account opening", "open-account", 0, "--account", PAYER)
    cli.ok("pay", 0, "--from", PAYER, "--to", "shop-0", "--amount", "25")
    assert cli.balance("shop-0") == 25
    # Its owner, client 0, may spend from it; client 1 may not.
    cli.refused(
        "unauthorized", "payment", "pay", 1, "--from", "shop-0", "--to", PAYEE, "--amount", "5"
    )
    cli.ok("pay", 0, "--from", "shop-0", "--to", PAYER, "--amount", "25")
    shown = cli.verified(tmp_path / "open.bin")
    assert (shown["op"], shown["account"], shown["payer"]) == ("open_account", "shop-0", "shop-0")


def test_the_library_calls_and_an_altered_op_fails_offline(local: LocalCluster, cli: Cli) -> None:
    """PaymentClient's methods give receipts that verify offline; a receipt whose op fields
    were altered does not, whether the client's signature is kept or the client re-signs."""

    async def scenario() -> list[Any]:
        async with PaymentClient(local.cluster, 0, timeout_s=30) as shop_client:
            async with PaymentClient(local.cluster, 1, timeout_s=30) as payee_client:
                authorized = await shop_client.authorize(PAYER, PAYEE, 90, 3_600_000)
                hold = (authorized.client_id, authorized.request_id)
                captured = await payee_client.capture(hold, 90)
                refunded = await payee_client.refund(hold, 10)
                other = await shop_client.authorize(PAYER, PAYEE, 5, 3_600_000)
                voided = await shop_client.void((other.client_id, other.request_id))
                opened = await shop_client.open_account("shop-lib")
                return [authorized, captured, refunded, voided, opened]

    decided = trio.run(scenario)
    assert [d.outcome for d in decided] == ["confirmed"] * 5, decided
    _decided(max(d.seq for d in decided))
    keyring, cluster_id = local.cluster.keyring(), local.cluster.cluster_id
    ops = [verify_receipt(d.receipt, keyring, cluster_id).op for d in decided]
    assert ops == ["authorize", "capture", "refund", "void", "open_account"]

    receipt = decided[1].receipt  # the capture of 90
    assert isinstance(receipt, Receipt)
    envelope, request = peek(receipt.request, Request)
    assert isinstance(request, Request) and request.op == "capture"
    bigger = Request(
        request.client_id, request.request_id, "capture", "", "", 9000,
        request.ref_client, request.ref_request, 0,
    )  # fmt: skip
    as_refund = Request(
        request.client_id, request.request_id, "refund", "", "", request.amount,
        request.ref_client, request.ref_request, 0,
    )  # fmt: skip
    for altered in (bigger, as_refund):
        # The client's signature kept: it does not cover the altered op.
        kept = Envelope(
            envelope.version, envelope.type_code, envelope.sender, altered.encode(),
            envelope.signature,
        ).encode()  # fmt: skip
        assert _offline(cli, receipt, kept).startswith(
            "invalid receipt: request: signed by unknown keys"
        )
        # The client re-signs: the replies' request digest no longer matches.
        resigned = seal(altered, local.cluster.load_private_key("client", 1))
        assert "answers another request" in _offline(cli, receipt, resigned)


def _offline(cli: Cli, receipt: Receipt, request: bytes) -> str:
    """verify-receipt's one line for `receipt` with its request replaced (it must exit 1)."""
    altered = Receipt(receipt.version, receipt.cluster_id, request, receipt.replies)
    path = Path(cli.path).parent / "altered.bin"
    path.write_bytes(altered.encode())
    ran = cli("verify-receipt", None, str(path))
    assert ran.code == EXIT_NO, ran.stdout
    assert ran.stdout.count("\n") == 1, ran.stdout
    return ran.stdout.strip()


def test_a_hold_past_its_expiry_is_released_and_cannot_be_taken(cli: Cli) -> None:
    """Expiry is decided against the batches' agreed time: a hold of 1 ms is past it by the
    next batch, which releases it to the payer before executing anything."""
    payer = cli.balance(PAYER)
    authorize = ["--from", PAYER, "--to", PAYEE, "--amount", "60", "--expires-in-ms", "1"]
    hold = cli.ok("authorize", 0, *authorize)["hold"]
    cli.refused("hold_expired", "capture", "capture", 1, "--hold", hold, "--amount", "60")
    cli.refused("hold_expired", "void", "void", 0, "--hold", hold)
    assert cli.balance(PAYER) == payer


def test_status_history_and_hold_lookups(cli: Cli, tmp_path: Path) -> None:
    """A hold's fate, a request's status (with a receipt for the asker's own request) and an
    account's history a page at a time, each as f + 1 replicas agree."""
    authorize = ["--from", PAYER, "--to", PAYEE, "--amount", "120", "--expires-in-ms", HOUR_MS]
    held = cli.ok("authorize", 0, *authorize)
    hold = held["hold"]
    shown = cli.ok_lookup("hold", 1, hold)
    assert (shown["hold"], shown["fate"], shown["amount"]) == (hold, "open", 120)
    assert (shown["payer"], shown["payee"]) == (PAYER, PAYEE)
    captured = cli.ok("capture", 1, "--hold", hold, "--amount", "90")
    shown = cli.ok_lookup("hold", 0, hold)
    assert (shown["fate"], shown["captured"], shown["closed_seq"]) == (
        "captured", 90, captured["seq"]
    )  # fmt: skip
    assert shown["as_of_seq"] >= captured["seq"]

    # The asker's own request: its record and a receipt that verifies offline.
    receipt = tmp_path / "status.bin"
    status = cli.ok_lookup(
        "status", 0, "--request-id", str(held["request_id"]), "--receipt", str(receipt)
    )
    assert (status["op"], status["outcome"], status["seq"], status["hold"]) == (
        "authorize", "confirmed", held["seq"], hold
    )  # fmt: skip
    assert {"account": PAYER, "available_delta": -120, "held_delta": 120} in status["postings"]
    verified = cli.verified(receipt)
    assert (verified["op"], verified["hold"], verified["seq"]) == ("authorize", hold, held["seq"])
    # Another client's request: the record, no receipt.
    status = cli.ok_lookup(
        "status", 0, "--client-id", "1", "--request-id", str(captured["request_id"])
    )
    assert (status["op"], status["client_id"], status["amount"]) == ("capture", 1, 90)

    # The payer's history: the authorize's posting, then the capture's (the remainder back),
    # one entry a page, each page going on from the "next" of the one before.
    entries: list[dict[str, Any]] = []
    after = "0:0"
    for _ in range(1000):
        page = cli.ok_lookup("history", 0, "--account", PAYER, "--after", after, "--limit", "1")
        entries += page["entries"]
        if page["next"] is None:
            break
        after = page["next"]
    mine = [(e["kind"], e["available_delta"], e["held_delta"]) for e in entries[-2:]]
    assert mine == [("authorize", -120, 120), ("capture", 30, -120)]

    for command, options, says in (
        ("status", ["--request-id", "1"], "pbft: no request 0:1 (as of seq "),
        ("hold", ["0:1"], "pbft: no hold 0:1 (as of seq "),
    ):
        ran = cli(command, 0, *options)
        assert ran.code == EXIT_NO and ran.stdout == "", ran.err
        assert ran.err.strip().startswith(says), ran.err
