"""What keeping history costs a replica per executed batch: `python -m runtime.history_bench`.

Records batches of `--batch` transfers into the SQLite store (runtime/history_store.py,
in a temporary directory, WAL, no fsync per batch) and the in-memory one (pbft/history.py,
the simulator's), and, as the baseline measured in the same run, the one Ed25519
signature a replica makes per executed batch anyway (over its replies' Merkle root).
The node records through a thread of its own (ThreadedHistoryStore): what its step loop
pays per batch is the queueing, shown next to the time until everything is written.
That thread shares the machine's cores (and the GIL, for its Python part) with the
replica, so what history costs a replica is CPU time (the process's, every thread): shown
for one transaction a batch (what the thread did under a steady load before it grouped
batches) and for the node's grouping now (a transaction per checkpoint interval, that one
synced: its wall time includes the fsyncs), from the same batches in the same run.
Also one status lookup and one page of account history read back from SQLite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from crypto.keys import SigningKey
from pbft.events import Executed, ExecutedRequest
from pbft.history import MemoryHistoryStore
from pbft.operations import Posting
from runtime.history_store import SqliteHistoryStore, ThreadedHistoryStore


def batch(seq: int, size: int, accounts: int) -> Executed:
    requests = []
    for index in range(size):
        number = seq * size + index
        payer = f"acct-{number % accounts:05d}"
        payee = f"acct-{(number + 1) % accounts:05d}"
        requests.append(
            ExecutedRequest(
                number % 100,
                number,
                number.to_bytes(32, "big"),
                payer,
                payee,
                7,
                "confirmed",
                "",
                True,
                "transfer",
                0,
                0,
                0,
                (Posting(payer, -7, 0), Posting(payee, 7, 0)),
            )
        )
    return Executed(0, seq, seq.to_bytes(32, "big"), tuple(requests), seq, 0, bytes(32), ())


def cpu_and_wall_us(calls: int, run: Callable[[], object]) -> tuple[float, float]:
    """CPU (this process, every thread) and wall time of `run`, per call, in us."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return (
        (time.process_time() - cpu) / calls * 1e6,
        (time.perf_counter() - wall) / calls * 1e6,
    )


def per_call_us(calls: int, run: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for call in range(calls):
        run(call)
    return (time.perf_counter() - started) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--retention", type=int, default=1000)
    parser.add_argument(
        "--checkpoint-interval", type=int, default=16, help="the cluster's (default 16)"
    )
    args = parser.parse_args(argv)
    batches = [batch(seq, args.batch, args.accounts) for seq in range(1, args.batches + 1)]
    key = SigningKey.derive(1, "bench")
    root = bytes(32)
    signature_us = per_call_us(args.batches, lambda _: key.sign(b"pbft/v1/reply-root", root))
    memory = MemoryHistoryStore(args.retention)
    memory_us = per_call_us(args.batches, lambda i: memory.record(batches[i]))
    with tempfile.TemporaryDirectory() as directory:
        sqlite = SqliteHistoryStore(Path(directory) / "history.sqlite", args.retention)
        # One transaction a batch: what the history thread did under a steady load before
        # it grouped batches (woken per step, it found one batch queued).
        single_cpu, single_wall = cpu_and_wall_us(
            args.batches, lambda: [sqlite.record(executed) for executed in batches]
        )
        last = args.batches * args.batch - 1
        status_us = per_call_us(1000, lambda i: sqlite.request(last % 100, last - i % 50))
        page_us = per_call_us(
            1000, lambda i: sqlite.account(f"acct-{i % args.accounts:05d}", (0, 0), 2**62, 256)
        )
        sqlite.close()
        # The node's: its step loop only queues; the thread writes (runtime/node.py).
        threaded = ThreadedHistoryStore(
            SqliteHistoryStore(Path(directory) / "threaded.sqlite", args.retention)
        )
        started = time.perf_counter()
        queue_us = per_call_us(args.batches, lambda i: threaded.record_all((batches[i],)))
        threaded.flush()
        threaded_us = (time.perf_counter() - started) / args.batches * 1e6
        transactions = threaded.transactions
        threaded.close()
        # The node's now: grouped by the thread, one durable write per checkpoint interval.
        grouped = ThreadedHistoryStore(
            SqliteHistoryStore(Path(directory) / "grouped.sqlite", args.retention),
            checkpoint_interval=args.checkpoint_interval,
        )

        def feed() -> None:
            for executed in batches:
                grouped.record(executed)
                if executed.seq % args.checkpoint_interval == 0:
                    # As the node's writer before each stable checkpoint (the thread has
                    # begun that group's write already: a checkpoint's batch ends one).
                    grouped.sync_through(executed.seq)
            grouped.flush()

        grouped_cpu, grouped_wall = cpu_and_wall_us(args.batches, feed)
        group_size = grouped.batches_written / max(grouped.transactions, 1)
        syncs = grouped.syncs
        grouped.close()
    print(f"{args.batches} batches of {args.batch} transfers, retention {args.retention} seqs")
    print(f"baseline: one Ed25519 signature (one per batch already): {signature_us:8.1f} us")
    print(f"history, in memory (simulator):                          {memory_us:8.1f} us/batch")
    print(f"history, SQLite in its thread: the step loop's share     {queue_us:8.1f} us/batch")
    print(
        f"history, SQLite in its thread: until all written          {threaded_us:8.1f} us/batch"
        f" ({args.batches / max(transactions, 1):.1f} batches a transaction)"
    )
    print(
        f"history, SQLite, one transaction a batch:  CPU {single_cpu:8.1f} us/batch,"
        f" wall {single_wall:8.1f}"
    )
    print(
        f"history, SQLite, the node's groups:        CPU {grouped_cpu:8.1f} us/batch,"
        f" wall {grouped_wall:8.1f} ({group_size:.1f} batches a transaction, {syncs} synced)"
    )
    print(f"SQLite read: one status                                  {status_us:8.1f} us")
    print(f"SQLite read: one page of up to 256 account entries       {page_us:8.1f} us")


if __name__ == "__main__":
    main()
