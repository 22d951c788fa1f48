"""Replicas write the trace events `pbft explain` reads (runtime/trace_log.py): bounded by
size with rotation, and a real cluster's logs tell a payment's story like a simulator
trace does."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from pbft.client import Decided
from runtime.client import PaymentClient
from runtime.cluster import load_cluster, write_cluster
from runtime.node import ReplicaNode
from runtime.ports import free_ports
from runtime.trace_log import TraceLog
from sim.explain import explain_payment, explain_replica


def test_the_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    trace = TraceLog(tmp_path / "trace-0.jsonl", "r0", max_bytes=4096, keep=2)
    for index in range(500):
        trace.write("execute", f"{index}", {"seq": index})
    trace.close()
    files = trace.files()
    assert [path.name for path in files] == ["trace-0.jsonl.2", "trace-0.jsonl.1", "trace-0.jsonl"]
    assert trace.rotations > 2
    assert all(path.stat().st_size <= 4096 for path in files)
    seqs = [json.loads(line)["seq"] for path in files for line in path.read_text().splitlines()]
    # The newest events, in order, with nothing missing between the oldest kept and the last.
    assert seqs == list(range(seqs[0], 500)) and seqs[0] > 0
    # The files read as one trace, oldest first.
    story = explain_replica([str(path) for path in files], 0)
    assert story["executed_batches"] == len(seqs) and story["last_executed"] == 499


def test_a_real_cluster_writes_what_explain_reads(tmp_path: Path) -> None:
    base = min(free_ports(1)[0], 60000)
    cluster = load_cluster(write_cluster(tmp_path, replicas=4, clients=1, base_port=base))
    decided: list[Decided] = []
    logs = [open(tmp_path / f"replica-{index}.log", "w") for index in range(4)]

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            for index in range(4):
                node = ReplicaNode(cluster, index, tmp_path / f"data-{index}", log=logs[index])
                await nursery.start(node.run)
            with trio.fail_after(30):
                async with PaymentClient(cluster, 0, timeout_s=20) as client:
                    await client.wait_connected(count=4)
                    for amount in (5, 7):
                        decided.append(await client.pay("acct-00000", "acct-00001", amount))
                # Every replica executes it (a receipt needs only f + 1 of them).
                while not all(
                    '"execute"' in (tmp_path / f"data-{index}" / f"trace-{index}.jsonl").read_text()
                    for index in range(4)
                ):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario)
    finally:
        for log in logs:
            log.close()
    paths = [str(tmp_path / f"data-{index}" / f"trace-{index}.jsonl") for index in range(4)]
    last = decided[-1]
    story = explain_payment(paths, f"{last.client_id}:{last.request_id}")
    assert story["outcome"] == last.outcome == "confirmed"
    assert story["batches"] and story["batches"][0]["primary"] == "r0"
    assert story["replicas"]["r0"]["executed"]["outcome"] == "confirmed"
    for replica in story["replicas"].values():
        if "committed" in replica:
            assert len(replica["committed"]["signers"]) >= 3
    assert explain_replica(paths, 1)["executed_batches"] >= 2
