"""What one signature per batch of replies saves, with its baseline measured in the same run.

    python -m sim.reply_bench [--repeat R] [--payments N]

1. Reply production at one replica for a batch of B results: the baseline signs every
   reply on its own (as replicas did before issue 10); `sign_replies` signs the batch's
   Merkle root once and gives each reply its inclusion proof. Also the client's side: B
   replies of one replica's batch checked one signature each (baseline) or as proof plus
   one cached root signature (`check_reply`).
2. The simulator under load (n = 4, many clients), at batch_size 1 and 64: reply
   signatures per payment over all replicas (before: one per replica per payment, n) and
   the wall time of the run.
Figures only (medians of R); nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import statistics
import sys
import time
from collections.abc import Callable

import pbft.ordering
from crypto.keys import SigningKey
from crypto.signing import VerificationCache
from pbft.messages import MessageType, Reply
from pbft.replies import ReplyResult, check_reply, reply_leaf, sign_replies
from pbft.signed import PROTOCOL_VERSION, Envelope, domain_of, peek
from sim.scenario import load_scenario
from sim.simulator import Simulation

CLUSTER_ID = bytes(range(32))
KEY = SigningKey.derive(0, "replica/0")
BATCH_SIZES = (1, 8, 32, 64)


def _results(count: int) -> list[ReplyResult]:
    return [
        ReplyResult(i, i, hashlib.sha256(i.to_bytes(4, "big")).digest(), 7, "confirmed", "")
        for i in range(count)
    ]


def sign_each(results: list[ReplyResult]) -> list[bytes]:
    """The baseline: one Ed25519 signature per reply over its own result."""
    domain = domain_of(MessageType.REPLY)
    frames = []
    for result in results:
        body = reply_leaf(CLUSTER_ID, result)
        signature = KEY.sign(domain, body)
        frames.append(
            Envelope(PROTOCOL_VERSION, int(MessageType.REPLY), 0, body, signature).encode()
        )
    return frames


def _median_us(action: Callable[[], object], repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e6


def production(repeat: int) -> None:
    print(f"1. one replica's replies for a batch of B results (us per reply, median of {repeat})")
    print("   B   sign each   one root   ratio  |  client: verify each   proof + root   ratio")
    for size in BATCH_SIZES:
        _production_row(size, repeat)


def _production_row(size: int, repeat: int) -> None:
    ring = {("replica", 0): KEY.verify_key}
    domain = domain_of(MessageType.REPLY)
    results = _results(size)
    each_us = _median_us(lambda: sign_each(results), repeat) / size
    root_us = _median_us(lambda: sign_replies(KEY, 0, 0, 7, CLUSTER_ID, results), repeat) / size
    singles = [Envelope.decode(raw) for raw in sign_each(results)]
    batched = [peek(raw, Reply) for raw in sign_replies(KEY, 0, 0, 7, CLUSTER_ID, results)]

    def verify_each() -> None:
        for envelope in singles:
            KEY.verify_key.verify(domain, envelope.body, envelope.signature)

    def verify_batch() -> None:
        cache = VerificationCache(max_entries=64)  # fresh: the root is verified once
        for envelope, reply in batched:
            check_reply(envelope, reply, ring, cache)  # type: ignore[arg-type]

    check_each_us = _median_us(verify_each, repeat) / size
    check_batch_us = _median_us(verify_batch, repeat) / size
    print(
        f"  {size:>3}  {each_us:>9.1f}  {root_us:>9.1f}  {each_us / root_us:>5.1f}x |"
        f"  {check_each_us:>19.1f}  {check_batch_us:>13.1f}  "
        f"{check_each_us / check_batch_us:>5.1f}x"
    )


def simulated(payments: int, repeat: int) -> dict[int, float]:
    """Reply signatures per payment (over all replicas) by batch_size; also printed."""
    scenario = load_scenario("scenarios/fault-free.toml")
    workload = dataclasses.replace(
        scenario.workload, clients=64, accounts=128, payments=payments, rate_per_s=2000
    )
    print(
        f"2. the simulator, fault-free, n = 4, 64 clients offering 2000/s, {payments} payments "
        f"(median of {repeat})"
    )
    print("   batch_size   reply signatures per payment (before: 4)   mean batch   wall s")
    original = pbft.ordering.sign_replies
    per_payment: dict[int, float] = {}
    for batch_size in (1, 64):
        cluster = dataclasses.replace(scenario.cluster, batch_size=batch_size)
        run = dataclasses.replace(scenario, workload=workload, cluster=cluster)
        walls, roots, replies = [], 0, 0
        for _ in range(repeat):
            counted = {"roots": 0, "replies": 0}

            def counting(*args: object, counted: dict[str, int] = counted) -> list[bytes]:
                frames = original(*args)  # type: ignore[arg-type]
                counted["roots"] += 1
                counted["replies"] += len(frames)
                return frames

            pbft.ordering.sign_replies = counting  # type: ignore[assignment]
            try:
                simulation = Simulation(run)
                started = time.perf_counter()
                result = simulation.run()
                walls.append(time.perf_counter() - started)
            finally:
                pbft.ordering.sign_replies = original
            roots, replies = counted["roots"], counted["replies"]
            if result.verdict != "ok":
                print(f"   the run did not meet its expectations: {result.expectation_failures}")
        decided = result.submitted - result.undecided
        per_payment[batch_size] = roots / decided
        print(
            f"   {batch_size:>10}   {roots / decided:>41.2f}   {replies / roots:>10.1f}"
            f"   {statistics.median(walls):>6.2f}"
        )
    return per_payment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.reply_bench")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--payments", type=int, default=2000)
    arguments = parser.parse_args(argv)
    if arguments.repeat < 1 or arguments.payments < 1:
        print("reply_bench: --repeat and --payments must be at least 1", file=sys.stderr)
        return 2
    production(max(arguments.repeat, 5) * 10)
    simulated(arguments.payments, arguments.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
