"""`pbft authorize | capture | void | refund | open-account`: every user mistake is one line
naming what is wrong and exit 2, before anything is sent; no decision is exit 4 naming the
request id to retry. No replica runs here: the cluster file's ports are served by nobody, so a
command that did send anything would time out instead (and print its request id first)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from cli.exits import EXIT_NO_DECISION, EXIT_USAGE
from cli.ids import format_id, named_ids, parse_id
from cli.main import main
from runtime.cluster import write_cluster
from runtime.ports import consecutive_free_ports


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    return write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])


# One good command line of each; each mistake below replaces one value (a later option wins).
GOOD = {
    "authorize": [
        "--from", "acct-00000", "--to", "acct-00002", "--amount", "5", "--expires-in-ms", "60000"
    ],
    "capture": ["--hold", "0:17", "--amount", "5"],
    "void": ["--hold", "0:17"],
    "refund": ["--payment", "0:17", "--amount", "5"],
    "open-account": ["--account", "shop"],
}  # fmt: skip


def _argv(cluster_file: Path, command: str, *extra: str) -> list[str]:
    return [command, "--cluster", str(cluster_file), "--client", "0", *GOOD[command], *extra]


def _one_clean_line(error: str) -> str:
    assert "Traceback" not in error and "internal error" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    return lines[0]


MISTAKES = [
    ("authorize", ["--amount", "-1"], "--amount: -1 is not in 0..2**64-1"),
    ("authorize", ["--expires-in-ms", "-5"], "--expires-in-ms: -5 is not in 0..2**64-1"),
    ("authorize", ["--from", "x" * 65], "--from: an account name has 1..64 characters"),
    ("authorize", ["--to", ""], "--to: an account name has 1..64 characters, this one 0"),
    ("capture", ["--hold", "17"], "--hold: '17' is not CLIENT:REQUEST"),
    ("capture", ["--hold", "0x1:2"], "--hold: '0x1:2' is not CLIENT:REQUEST"),
    ("capture", ["--hold=-1:2"], "--hold: '-1:2' is not CLIENT:REQUEST"),
    ("capture", ["--hold", "0:1:2"], "--hold: '0:1:2' is not CLIENT:REQUEST"),
    ("capture", ["--hold", " 0:1"], "--hold: ' 0:1' is not CLIENT:REQUEST"),
    ("capture", ["--hold", f"{2**32}:1"], "--hold: client id 4294967296 is not in 0..4294967295"),
    ("capture", ["--hold", f"0:{2**64}"], "--hold: request id 18446744073709551616 is not in"),
    ("capture", ["--amount", "-3"], "--amount: -3 is not in 0..2**64-1"),
    ("void", ["--hold", ""], "--hold: '' is not CLIENT:REQUEST"),
    ("void", ["--hold", "9" * 500], "is not CLIENT:REQUEST"),
    ("refund", ["--payment", "a:b"], "--payment: 'a:b' is not CLIENT:REQUEST"),
    ("refund", ["--amount", str(2**64)], "--amount: 18446744073709551616 is not in"),
    ("open-account", ["--account", ""], "--account: an account name has 1..64 characters"),
    ("open-account", ["--account", "n" * 65], "--account: an account name has 1..64 characters"),
    # The options every one of them shares with `pbft pay`.
    ("void", ["--client", "5"], "--client: client 5 is unknown to the cluster"),
    ("refund", ["--request-id", "-1"], "--request-id: -1 is not in 0..2**64-1"),
    ("capture", ["--timeout", "0"], "--timeout: 0 is not in (0, 86400] seconds"),
    ("open-account", ["--receipt", "/nonexistent-dir/r.bin"], "the directory /nonexistent-dir"),
    ("authorize", ["--receipt", "/"], "--receipt: / is a directory, not a file"),
]


@pytest.mark.parametrize(("command", "extra", "says"), MISTAKES)
def test_mistakes_exit_2_in_one_line_before_anything_is_sent(
    cluster_file: Path,
    command: str,
    extra: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    assert main(_argv(cluster_file, command, "--timeout", "30", *extra)) == EXIT_USAGE
    captured = capsys.readouterr()
    line = _one_clean_line(captured.err)
    assert line.startswith("pbft: ") and says in line, line
    # "pbft: request id N" is printed just before sending: nothing was sent.
    assert not re.search(r"^pbft: request id \d+$", captured.err, re.M)
    assert captured.out == ""
    assert time.monotonic() - started < 10  # no 30 s wait for replicas that are not there


@pytest.mark.parametrize("command", sorted(GOOD))
def test_no_decision_exits_4_naming_the_request_id_to_retry(
    cluster_file: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(cluster_file, command, "--timeout", "0.2", "--request-id", "4242")) == (
        EXIT_NO_DECISION
    )
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert re.search(r"^pbft: request id 4242$", captured.err, re.M)
    assert "may still go through: retry with --request-id 4242" in captured.err


@pytest.mark.parametrize("command", sorted(GOOD))
def test_help_names_the_id_format_and_the_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "4  no decision within --timeout" in text
    if command in ("capture", "void", "refund"):
        assert "CLIENT:REQUEST" in text


def test_ids_round_trip_and_name_what_each_op_makes_or_refers_to() -> None:
    assert parse_id("--hold", format_id(7, 2**64 - 1)) == (7, 2**64 - 1)
    assert parse_id("--hold", "007:0") == (7, 0)
    assert named_ids("transfer", 1, 2, "a", 0, 0) == {"payment": "1:2"}
    assert named_ids("authorize", 1, 2, "a", 0, 0) == {"hold": "1:2"}
    # A capture's payment, the one a refund names, is its hold's id.
    assert named_ids("capture", 1, 9, "", 3, 4) == {"hold": "3:4", "payment": "3:4"}
    assert named_ids("void", 1, 9, "", 3, 4) == {"hold": "3:4"}
    assert named_ids("refund", 1, 9, "", 3, 4) == {"payment": "3:4"}
    assert named_ids("open_account", 1, 9, "shop", 0, 0) == {"account": "shop"}
