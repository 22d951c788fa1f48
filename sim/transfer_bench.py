"""How long chunked state transfer of a large ledger takes, next to a baseline measured in
the same run: the one-message transfer it replaces (restore a whole snapshot, check its
digest), which only worked while the snapshot fitted one 16 MiB frame.

    python -m sim.transfer_bench [--accounts N] [--chunk-leaves L]

Two replica cores in this process, messages handed over directly (no network, no disk):
replica 1 holds a stable checkpoint of a ledger of N generated accounts, replica 3 starts
from genesis and is sent one FETCH answer, then asks for the rest chunk by chunk. Prints
the server's one-off preparation, the transfer, and the baseline; the peak memory of the
process (both replicas). Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from crypto.keys import KeyRing, SigningKey
from pbft.config import ClusterConfig
from pbft.context import StableCheckpoint
from pbft.events import MessageReceived, Send, Tick
from pbft.genesis import ACCOUNT_PREFIX
from pbft.ledger import GeneratedAccounts, Ledger, Payment
from pbft.messages import Checkpoint, Fetch, StateRequest
from pbft.replica import Replica
from pbft.signed import peek, seal

SEED = 7
CHAIN_HASH = b"\x02" * 32
SEQ = 16


def _replicas(
    config: ClusterConfig, accounts: GeneratedAccounts
) -> tuple[list[SigningKey], Replica, Replica]:
    keys = [SigningKey.derive(SEED, f"replica/{i}") for i in range(config.replica_count)]
    ring = KeyRing()
    for i, key in enumerate(keys):
        ring.add(("replica", i), key.verify_key)
    for client in accounts.owners:
        ring.add(("client", client), SigningKey.derive(SEED, f"client/{client}").verify_key)
    server = Replica(1, config, keys[1], ring, accounts)
    lagging = Replica(3, config, keys[3], ring, accounts)
    return keys, server, lagging


def run(account_count: int, chunk_leaves: int) -> None:
    config = ClusterConfig(checkpoint_interval=SEQ, state_chunk_leaves=chunk_leaves)
    accounts = GeneratedAccounts(account_count, 1000, ACCOUNT_PREFIX, [0, 1])
    started = time.perf_counter()
    keys, server, lagging = _replicas(config, accounts)
    built = time.perf_counter() - started
    print(f"two replicas with {account_count:,} genesis accounts: {built:.1f} s")

    # The checkpoint's state: genesis after one payment (so it is not the lagging one's).
    ledger = server.ledger
    ledger.execute(Payment(0, 1, accounts.name(0), accounts.name(1), 5), b"\x01" * 32, SEQ)
    digest = ledger.digest()
    snapshot = ledger.snapshot()
    proof = tuple(seal(Checkpoint(SEQ, i, CHAIN_HASH, digest), keys[i]) for i in (0, 1, 2))
    server.ordering.last_executed = SEQ
    server.ordering.chain_hash = CHAIN_HASH
    server.checkpoints.stable = StableCheckpoint(SEQ, CHAIN_HASH, digest, snapshot, proof)
    for replica in (server, lagging):
        replica.handle(Tick(1000))
    print(f"snapshot {len(snapshot) / 2**20:.1f} MiB, {ledger.leaf_count():,} leaves")

    # Baseline: what the one-message transfer cost the receiver (had it fitted a frame).
    started = time.perf_counter()
    restored = Ledger.restore(snapshot)
    if restored.digest() != digest:
        raise SystemExit("baseline: restored snapshot has another digest")
    baseline = time.perf_counter() - started
    del restored

    # The replicas' clock: real time, plus the time spent waiting for the byte budget
    # (skipped over rather than slept through).
    clock_start = time.perf_counter()
    waited_ms = 0

    def now_ms() -> int:
        return 1000 + int((time.perf_counter() - clock_start) * 1000) + waited_ms

    def to_lagging(raws: list[bytes]) -> list[bytes]:
        out = []
        lagging.handle(Tick(now_ms()))
        for raw in raws:
            for action in lagging.handle(MessageReceived(raw)):
                if isinstance(action, Send) and isinstance(peek(action.data)[1], StateRequest):
                    out.append(action.data)
        return out

    def to_server(raws: list[bytes]) -> list[bytes]:
        nonlocal waited_ms
        for _ in range(1000):
            server.handle(Tick(now_ms()))
            out = []
            for raw in raws:
                for action in server.handle(MessageReceived(raw)):
                    if isinstance(action, Send) and action.to == ("replica", 3):
                        out.append(action.data)
            if out or not raws:
                return out
            waited_ms += 50  # refused: the budget refills meanwhile
        return []

    started = time.perf_counter()
    chunks = to_server([seal(Fetch(3, 1, 0, 0), keys[3])])
    prepared = time.perf_counter() - started
    count = 0
    sent = 0
    while chunks:
        count += len(chunks)
        sent += sum(map(len, chunks))
        chunks = to_server(to_lagging(chunks))
    transfer = time.perf_counter() - started
    if lagging.ledger.digest() != digest or lagging.stable.seq != SEQ:
        print("transfer did not complete", file=sys.stderr)
        raise SystemExit(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"chunked transfer: {transfer:.1f} s for {count} chunks, {sent / 2**20:.1f} MiB sent "
        f"(of it {prepared:.1f} s the server's one-off preparation and first chunk); "
        f"plus {waited_ms / 1000:.1f} s waiting for the byte budget "
        f"({config.catch_up_bytes_per_second / 2**20:.0f} MiB/s)"
    )
    print(f"baseline, one-message transfer (restore + digest of the snapshot): {baseline:.1f} s")
    print(f"peak RSS of this process (both replicas): {peak:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.transfer_bench")
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--chunk-leaves", type=int, default=16384)
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.accounts <= 10_000_000:
        print("transfer_bench: --accounts must be in 1..10000000", file=sys.stderr)
        return 2
    leaves = arguments.chunk_leaves
    if not 1 <= leaves <= 65536 or leaves & (leaves - 1):
        print("transfer_bench: --chunk-leaves must be a power of two in 1..65536", file=sys.stderr)
        return 2
    run(arguments.accounts, arguments.chunk_leaves)
    return 0


if __name__ == "__main__":
    sys.exit(main())
