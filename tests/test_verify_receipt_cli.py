"""`pbft verify-receipt PATH --cluster FILE`: exit 0 and the receipt's content for a valid
receipt; exit 1 and one line saying what is wrong for an invalid one; exit 2 and one line
for input that is not a receipt at all. The receipts come from real replica and client
cores of a cluster written by `write_cluster`, run in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from replica_harness import Network

from cli.main import EXIT_OK, EXIT_USAGE, EXIT_VIOLATED, main
from pbft.client import ClientCore, Decided
from pbft.codec import pack
from pbft.history import HistoryReader
from pbft.messages import Reply
from pbft.receipt import RECEIPT_VERSION, Receipt
from pbft.replica import Replica
from pbft.replies import result_of, sign_replies
from pbft.signed import Envelope, peek
from runtime.cluster import Cluster, load_cluster, write_cluster


@dataclass
class _InMemory:
    """What replica_harness.Network needs, built from a runtime cluster file."""

    cluster: Cluster

    @property
    def n(self) -> int:
        return self.cluster.config.replica_count

    def replica(self, replica_id: int, history: HistoryReader | None = None) -> Replica:
        return Replica(
            replica_id,
            self.cluster.config,
            self.cluster.load_private_key("replica", replica_id),
            self.cluster.keyring(),
            self.cluster.accounts,
            history=history,
        )

    def client(self, client_id: int) -> ClientCore:
        return ClientCore(
            client_id,
            self.cluster.config,
            self.cluster.load_private_key("client", client_id),
            self.cluster.keyring(),
            cluster_id=self.cluster.cluster_id,
        )


@dataclass(frozen=True)
class Setup:
    root: Path
    cluster_file: Path
    cluster: Cluster
    confirmed: Receipt
    rejected: Receipt


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("verify")
    path = write_cluster(root / "a", replicas=4, clients=1, protocol={"batch_timeout_ms": 0})
    cluster = load_cluster(path)
    network = Network(_InMemory(cluster), client_ids=(0,))  # type: ignore[arg-type]
    network.submit(0, 1, "acct-00000", "acct-00001", 500)
    network.submit(0, 2, "acct-00000", "acct-00001", 10**9)  # more than it holds
    network.run()
    network.advance(200)
    decided = {d.request_id: d for d in network.decided}
    assert isinstance(decided.get(2), Decided)
    assert (decided[1].outcome, decided[2].reason) == ("confirmed", "insufficient_funds")
    confirmed, rejected = decided[1].receipt, decided[2].receipt
    assert confirmed is not None and rejected is not None
    return Setup(root, path, cluster, confirmed, rejected)


def _verify(
    setup: Setup,
    data: bytes | None,
    capsys: pytest.CaptureFixture[str],
    cluster: Path | None = None,
) -> tuple[int, str, str]:
    path = setup.root / "receipt.bin"
    if data is not None:
        path.write_bytes(data)
    code = main(["verify-receipt", str(path), "--cluster", str(cluster or setup.cluster_file)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text.rstrip("\n")


def _reply_of(raw: bytes) -> Reply:
    reply = peek(raw, Reply)[1]
    assert isinstance(reply, Reply)
    return reply


def test_a_valid_receipt_verifies_offline(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    for receipt, outcome in ((setup.confirmed, "confirmed"), (setup.rejected, "rejected")):
        code, out, err = _verify(setup, receipt.encode(), capsys)
        assert (code, err) == (EXIT_OK, "")
        fields = json.loads(_one_line(out))
        assert fields["valid"] is True
        assert fields["outcome"] == outcome
        assert fields["cluster_id"] == setup.cluster.cluster_id.hex()
        assert len(fields["replicas"]) == 2


def test_a_receipt_from_another_cluster_with_the_same_keys(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    # Same keys, one genesis balance changed: another cluster.
    other = setup.root / "a" / "other.toml"
    text = setup.cluster_file.read_text()
    other.write_text(text.replace("balance = 100000", "balance = 100001", 1))
    code, out, err = _verify(setup, setup.confirmed.encode(), capsys, other)
    assert (code, err) == (EXIT_VIOLATED, "")
    line = _one_line(out)
    assert line.startswith("invalid receipt: from another cluster: the receipt names cluster ")
    assert setup.cluster.cluster_id.hex()[:16] in line


def test_a_receipt_from_a_cluster_with_other_keys(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = write_cluster(setup.root / "stranger", replicas=4, clients=1)
    code, out, _ = _verify(setup, setup.confirmed.encode(), capsys, stranger)
    assert code == EXIT_VIOLATED
    assert _one_line(out).startswith("invalid receipt: from another cluster")


def test_a_receipt_signed_by_unknown_keys(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    # Replies naming this cluster, signed by the replica keys of a stranger cluster.
    stranger = load_cluster(write_cluster(setup.root / "forger", replicas=4, clients=1))
    forged = []
    for raw in setup.confirmed.replies:
        reply = _reply_of(raw)
        key = stranger.load_private_key("replica", reply.replica)
        forged += sign_replies(
            key, reply.replica, reply.view, reply.batch_seq, reply.cluster_id, [result_of(reply)]
        )
    receipt = Receipt(
        RECEIPT_VERSION, setup.cluster.cluster_id, setup.confirmed.request, tuple(forged)
    )
    code, out, _ = _verify(setup, receipt.encode(), capsys)
    assert code == EXIT_VIOLATED
    first = _reply_of(forged[0]).replica
    assert _one_line(out) == (
        f"invalid receipt: reply 0: the batch root's signature is not replica {first}'s in "
        "this cluster (other keys, or an altered root, view, seq or batch size)"
    )


def test_signed_replies_with_different_outcomes(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    # A genuine reply, and a lie genuinely signed by another replica of this cluster.
    genuine = _reply_of(setup.confirmed.replies[0])
    liar = next(i for i in range(4) if i != genuine.replica)
    lie = replace(result_of(genuine), outcome="rejected", reason="insufficient_funds")
    key = setup.cluster.load_private_key("replica", liar)
    (raw_lie,) = sign_replies(key, liar, genuine.view, genuine.batch_seq, genuine.cluster_id, [lie])
    receipt = Receipt(
        RECEIPT_VERSION,
        setup.cluster.cluster_id,
        setup.confirmed.request,
        (setup.confirmed.replies[0], raw_lie),
    )
    code, out, _ = _verify(setup, receipt.encode(), capsys)
    assert code == EXIT_VIOLATED
    assert _one_line(out) == (
        f"invalid receipt: the signed replies disagree: replica {genuine.replica} says "
        f"confirmed at seq {genuine.seq}, replica {liar} says rejected (insufficient_funds) "
        f"at seq {genuine.seq}"
    )


def test_too_few_signatures(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    short = Receipt(
        RECEIPT_VERSION,
        setup.cluster.cluster_id,
        setup.confirmed.request,
        setup.confirmed.replies[:1],
    )
    code, out, _ = _verify(setup, short.encode(), capsys)
    assert code == EXIT_VIOLATED
    assert _one_line(out) == (
        "invalid receipt: too few signatures: 1 replica(s) sign this outcome, need f + 1 = 2"
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not a receipt: the data is empty"),
        (b"\xc1\x00garbage", "not a receipt: malformed"),
        (pack(["a", "receipt?"]), "not a receipt: "),
        (pack([1, b"request", [b"reply"]]), "unknown receipt version 1"),
        # Version 2: one signature per reply, before one signature per batch.
        (
            pack([2, bytes(32), b"request", [b"reply"]]),
            "unknown receipt version 2 (this verifier reads version 3)",
        ),
        (pack([4, bytes(32), b"request", [b"reply"]]), "unknown receipt version 4"),
    ],
    ids=["empty", "garbage", "wrong_shape", "old_version", "version_2", "future_version"],
)
def test_input_that_is_not_a_receipt(
    setup: Setup, capsys: pytest.CaptureFixture[str], data: bytes, expected: str
) -> None:
    code, out, err = _verify(setup, data, capsys)
    assert (code, out) == (EXIT_USAGE, "")
    line = _one_line(err)
    assert line.startswith(f"pbft: {setup.root / 'receipt.bin'}: {expected}"), line


def test_a_directory_or_a_missing_file_is_not_a_receipt(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    for path, problem in (
        (setup.root, "not a regular file"),
        (setup.root / "nope", "no such file"),
    ):
        code = main(["verify-receipt", str(path), "--cluster", str(setup.cluster_file)])
        out, err = capsys.readouterr()
        assert (code, out) == (EXIT_USAGE, "")
        assert _one_line(err) == f"pbft: {path}: {problem}"


def test_an_unusable_cluster_file_is_a_usage_error(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _verify(setup, setup.confirmed.encode(), capsys, setup.root / "missing.toml")
    assert (code, out) == (EXIT_USAGE, "")
    assert "cannot read" in _one_line(err)


def test_a_reply_whose_outcome_was_changed_fails_its_inclusion_proof(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    # The rejected payment's first reply, its outcome rewritten under the same signature.
    raw = setup.rejected.replies[0]
    envelope = Envelope.decode(raw)
    reply = _reply_of(raw)
    lie = replace(reply, outcome="confirmed", reason="")
    tampered = Envelope(
        envelope.version, envelope.type_code, envelope.sender, lie.encode(), envelope.signature
    ).encode()
    receipt = Receipt(
        RECEIPT_VERSION,
        setup.cluster.cluster_id,
        setup.rejected.request,
        (tampered, *setup.rejected.replies[1:]),
    )
    code, out, _ = _verify(setup, receipt.encode(), capsys)
    assert code == EXIT_VIOLATED
    assert _one_line(out) == (
        f"invalid receipt: reply 0 (replica {reply.replica}): its result is not under the "
        "batch root it carries (inclusion proof fails: result not under its root)"
    )
