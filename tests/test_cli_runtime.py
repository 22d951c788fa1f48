"""The runtime commands' answers to user mistakes (one line, the documented exit code, never
a traceback), PaymentTimeout as itself, the supervisor's restart policy and the replica log's
summing of repeated lines. No replica runs here: a cluster file whose ports nobody serves
makes every payment that is actually sent time out, so a fast exit 2 shows that a mistake
was caught before anything was sent."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
import trio

from cli.exits import EXIT_NO_DECISION
from cli.main import EXIT_USAGE, main
from pbft.events import Note
from runtime.client import PaymentClient, PaymentTimeout
from runtime.cluster import ClusterFileError, load_cluster, write_cluster
from runtime.node import LogSummarizer, ReplicaNode
from runtime.ports import consecutive_free_ports
from runtime.supervisor import Supervisor, describe_exit


@pytest.fixture(scope="module")
def cluster_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cluster")
    return write_cluster(root, replicas=4, clients=2, base_port=consecutive_free_ports(4)[0])


def _pay(cluster_file: Path, *extra: str) -> list[str]:
    return [
        "pay",
        "--cluster",
        str(cluster_file),
        "--client",
        "0",
        "--from",
        "acct-00000",
        "--to",
        "acct-00002",
        "--amount",
        "5",
        *extra,
    ]


def _one_clean_line(error: str) -> str:
    assert "Traceback" not in error and "internal error" not in error, error
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--request-id", "-1"], "--request-id: -1 is not in 0..2**64-1"),
        (["--request-id", str(2**64)], "--request-id: 18446744073709551616 is not in"),
        (["--timeout", "0"], "--timeout: 0 is not in (0, 86400] seconds"),
        (["--timeout", "-1"], "--timeout: -1 is not in"),
        (["--timeout", "nan"], "--timeout: nan is not in"),
        (["--amount", "-3"], "--amount: -3 is not in"),
        (["--from", "x" * 5000], "--from: an account name has 1..64 characters, this one 5000"),
        (["--to", ""], "--to: an account name has 1..64 characters, this one 0"),
        (["--client", "99"], "--client: client 99 is unknown to the cluster"),
        (["--receipt", "/nonexistent-dir/receipt.bin"], "the directory /nonexistent-dir does"),
        (["--receipt", "/"], "is a directory, not a file"),
        (["--receipt", ""], "an empty file name"),
    ],
)
def test_pay_mistakes_exit_2_before_anything_is_sent(
    cluster_file: Path, extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A later option overrides an earlier one, so each case replaces one good value.
    started = time.monotonic()
    assert main(_pay(cluster_file, "--timeout", "30", *extra)) == EXIT_USAGE
    captured = capsys.readouterr()
    assert says in _one_clean_line(captured.err)
    assert "request id" not in captured.err  # printed just before sending: nothing was
    assert captured.out == ""
    assert time.monotonic() - started < 10  # no 30 s wait for replicas that are not there


def test_balance_mistakes_exit_2(cluster_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["balance", "--cluster", str(cluster_file), "--account", "acct-00000"]
    for extra, says in (
        (["--account", "z" * 65], "--account: an account name has 1..64 characters"),
        (["--timeout", "-1"], "--timeout"),
        (["--client", "7"], "client 7 is unknown"),
    ):
        assert main(base + extra) == EXIT_USAGE
        assert says in _one_clean_line(capsys.readouterr().err)


def test_pay_without_a_decision_exits_4_naming_the_request_id_to_retry(
    cluster_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_pay(cluster_file, "--timeout", "0.3")) == EXIT_NO_DECISION
    error = capsys.readouterr().err
    assert "Traceback" not in error
    sent = re.search(r"request id (\d+)", error)
    retry = re.search(r"retry with --request-id (\d+)", error)
    assert sent and retry and sent.group(1) == retry.group(1)
    assert main(_pay(cluster_file, "--timeout", "0.3", "--request-id", "12345")) == 4
    assert "--request-id 12345" in capsys.readouterr().err


def test_balance_without_an_answer_exits_4(
    cluster_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["balance", "--cluster", str(cluster_file), "--account", "a", "--timeout", "0.3"]
    assert main(argv) == EXIT_NO_DECISION
    assert "no f + 1 matching balances" in _one_clean_line(capsys.readouterr().err)


def test_cluster_up_refuses_3_replicas_and_a_size_that_is_not_the_clusters(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cluster", "up", "--replicas", "3", "--dir", str(tmp_path / "new")]) == 2
    assert "--replicas: 3 is not in 4..256" in _one_clean_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
    directory = str(cluster_file.parent)
    assert main(["cluster", "up", "--replicas", "7", "--dir", directory]) == EXIT_USAGE
    line = _one_clean_line(capsys.readouterr().err)
    assert "holds a cluster of 4 replicas and 2 clients, not --replicas 7" in line
    assert main(["cluster", "up", "--clients", "3", "--dir", directory]) == EXIT_USAGE
    assert "not --clients 3" in _one_clean_line(capsys.readouterr().err)
    assert main(["cluster", "up", "--generated-accounts", "5", "--dir", directory]) == 2
    assert "not --generated-accounts 5" in _one_clean_line(capsys.readouterr().err)
    new = str(tmp_path / "new")
    assert main(["cluster", "up", "--generated-accounts", "0", "--dir", new]) == EXIT_USAGE
    line = _one_clean_line(capsys.readouterr().err)
    assert "--generated-accounts: 0 is not in 1..10,000,000" in line
    assert not (tmp_path / "new").exists()
    assert not list(cluster_file.parent.glob("replica-*.log"))  # nothing was started


def test_replica_mistakes_exit_2(
    cluster_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    for extra, says in (
        (["--id", "99"], "no replica with id 99"),
        (["--id", "-1"], "no replica with id -1"),
        (["--id", "0", "--data", str(tmp_path / "a-file")], "is not a directory"),
    ):
        assert main(["replica", "--cluster", str(cluster_file), *extra]) == EXIT_USAGE
        assert says in _one_clean_line(capsys.readouterr().err)


# --- the library: PaymentTimeout as itself -----------------------------------------------


def test_payment_timeout_reaches_the_caller_unwrapped(cluster_file: Path) -> None:
    cluster = load_cluster(cluster_file)

    async def pay() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.2) as client:
            await client.pay("acct-00000", "acct-00002", 5, request_id=77)

    with pytest.raises(PaymentTimeout) as raised:
        trio.run(pay)
    assert type(raised.value) is PaymentTimeout
    assert raised.value.request_id == 77

    async def fail_in_body() -> None:
        async with PaymentClient(cluster, 0, timeout_s=0.2):
            raise KeyError("the caller's own")

    with pytest.raises(KeyError):
        trio.run(fail_in_body)


def test_payment_client_refuses_an_unknown_client_and_a_bad_timeout(cluster_file: Path) -> None:
    cluster = load_cluster(cluster_file)
    with pytest.raises(ClusterFileError, match="no client 99 in this cluster"):
        PaymentClient(cluster, 99)
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            PaymentClient(cluster, 0, timeout_s=timeout)


# --- the supervisor's policy, with stand-in processes ------------------------------------


def test_a_replica_that_keeps_dying_is_restarted_with_growing_backoff_then_given_up(
    tmp_path: Path,
) -> None:
    dying = [sys.executable, "-c", "import sys; print('cannot start: no disk'); sys.exit(3)"]
    living = [sys.executable, "-c", "import time; time.sleep(60)"]
    report = io.StringIO()
    supervisor = Supervisor(
        {0: living, 1: dying},
        tmp_path,
        restart=True,
        max_restarts=3,
        backoff_s=0.05,
        report=report,
    )
    supervisor.start_all()
    try:
        deadline = time.monotonic() + 30
        while not supervisor.children[1].given_up and time.monotonic() < deadline:
            supervisor.poll()
            time.sleep(0.01)
        assert supervisor.children[1].given_up
        assert supervisor.children[1].restarts == 3
        assert supervisor.poll()  # replica 0 still runs
        assert supervisor.running() == 1
    finally:
        supervisor.stop_all()
    lines = report.getvalue().splitlines()
    deaths = [line for line in lines if "replica 1 (pid" in line]
    assert len(deaths) == 4
    assert all("exited with status 3" in line for line in deaths)
    assert all("its last log line: cannot start: no disk" in line for line in deaths)
    delays = [
        float(match) for line in deaths for match in re.findall(r"from its log in ([\d.]+) s", line)
    ]
    assert delays == [0.05, 0.1, 0.2]
    assert "not restarted again" in deaths[-1]
    assert sum("replica 1 restarted" in line for line in lines) == 3
    assert not any("replica 0" in line for line in lines)


def test_without_restart_a_death_is_reported_and_the_supervisor_ends_when_none_run(
    tmp_path: Path,
) -> None:
    report = io.StringIO()
    supervisor = Supervisor(
        {0: [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]},
        tmp_path,
        restart=False,
        report=report,
    )
    supervisor.start_all()
    deadline = time.monotonic() + 30
    while supervisor.poll() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not supervisor.poll()
    assert "replica 0 (pid" in report.getvalue()
    assert "killed by SIGKILL; the others keep running" in report.getvalue()


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"


# --- replica logs: repeated lines are summed -----------------------------------------------


def test_identical_notes_are_logged_once_then_summed_per_interval() -> None:
    summary = LogSummarizer(interval_s=1.0)
    logged = summary.note(Note("drop", "wrong_view view 0, ours 1", "wrong_view"), now=100.0)
    assert logged == [{"event": "drop", "detail": "wrong_view view 0, ours 1"}]
    for step in range(500):
        note = Note("drop", f"wrong_view view {step}, ours 1", "wrong_view")
        assert summary.note(note, now=100.0 + step / 1000) == []
    other = summary.note(Note("drop", "bad_signature from 3", "bad_signature"), now=100.5)
    assert [record["detail"] for record in other] == ["bad_signature from 3"]
    assert summary.flush(now=100.9) == []  # the interval has not ended
    records = summary.flush(now=101.0)
    assert records == [
        {
            "event": "drop",
            "detail": "wrong_view view 499, ours 1",
            "repeated": 500,
            "over_s": 1.0,
            "reason": "wrong_view",
        }
    ]
    # bad_signature came once: nothing to sum; a new interval logs the first one again.
    assert summary.flush(now=200.0) == []
    assert summary.note(Note("drop", "wrong_view again", "wrong_view"), now=200.0) == [
        {"event": "drop", "detail": "wrong_view again"}
    ]
    # Other kinds are summed only when their whole detail repeats.
    assert summary.note(Note("suspect", "view 1: request timeout"), now=200.0)
    assert summary.note(Note("suspect", "view 1: request timeout"), now=200.1) == []
    assert summary.note(Note("suspect", "view 2: request timeout"), now=200.2)


def test_a_replica_node_writes_one_line_for_a_storm_of_identical_drops(
    cluster_file: Path, tmp_path: Path
) -> None:
    stream = io.StringIO()
    node = ReplicaNode(load_cluster(cluster_file), 1, tmp_path, log=stream)
    for view in range(1000):
        node._note(Note("drop", f"wrong_view view {view}, ours 1001", "wrong_view"))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1 and lines[0]["event"] == "drop"
    node._log_records(node.log_summary.flush(time.monotonic() + 2))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    assert (lines[1]["reason"], lines[1]["repeated"]) == ("wrong_view", 999)


def test_ctrl_c_during_a_payment_exits_130_with_the_request_id_to_retry(
    cluster_file: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess

    error_path = tmp_path / "pay.err"
    with open(error_path, "wb") as error_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", *_pay(cluster_file, "--timeout", "60")],
            stdout=subprocess.DEVNULL,
            stderr=error_file,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 60
        while "request id" not in error_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    error = error_path.read_text()
    assert "Traceback" not in error
    sent = re.search(r"request id (\d+)", error)
    assert sent is not None
    assert (
        f"interrupted; the payment may still go through: retry with --request-id {sent.group(1)}"
        in error
    )


def test_a_replica_that_ran_long_enough_earns_its_backoff_back(tmp_path: Path) -> None:
    """Deaths far apart (each after `stable_s` of running) restart at the first backoff and
    never exhaust the bound; only deaths in a row within `stable_s` of starting count."""
    now = [0.0]
    report = io.StringIO()
    supervisor = Supervisor(
        {0: [sys.executable, "-c", "import sys; sys.exit(1)"]},
        tmp_path,
        restart=True,
        max_restarts=2,
        backoff_s=0.5,
        stable_s=30.0,
        report=report,
        clock=lambda: now[0],
    )
    supervisor.start_all()
    try:
        for _ in range(5):
            process = supervisor.children[0].process
            assert process is not None
            process.wait(timeout=30)
            now[0] += 31.0  # it "ran" 31 s before dying
            supervisor.poll()  # reports the death, schedules the restart 0.5 s on
            now[0] += 0.5
            supervisor.poll()  # restarts it
        assert not supervisor.children[0].given_up
        assert supervisor.children[0].restarts == 5
    finally:
        supervisor.stop_all()
    assert report.getvalue().count("restarting it from its log in 0.5 s (attempt 1 of 2)") == 5


def test_a_replica_whose_port_is_taken_says_so_in_one_line_and_exits_2(
    cluster_file: Path,
) -> None:
    import socket
    import subprocess

    address = load_cluster(cluster_file).replica(1)
    with socket.socket() as taken:
        taken.bind((address.host, address.port))
        taken.listen()
        completed = subprocess.run(
            [sys.executable, "-m", "cli", "replica", "--cluster", str(cluster_file)]
            + ["--id", "1", "--data", str(cluster_file.parent / "data-port-test")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert completed.returncode == EXIT_USAGE
    lines = [line for line in completed.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        f"pbft: replica 1: Address already in use ({address.host}:{address.port}: "
        "another process listens there)"
    ]
