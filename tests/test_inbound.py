"""The inbound scheduler (runtime/inbound.py) without sockets: fairness among clients,
replicas first (but clients never shut out), bounds in frames and bytes, backpressure on
one peer only, and what closing does."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from runtime.inbound import InboundScheduler

R0, R1, R2 = ("replica", 0), ("replica", 1), ("replica", 2)
ATTACKER, HONEST, THIRD = ("client", 1), ("client", 0), ("client", 2)
CLIENT_LIMIT = 64 * 1024


def scheduler(
    *,
    max_frames: int = 10_000,
    replica_bytes: int = 64 * 1024 * 1024,
    client_bytes: int = 64 * 1024 * 1024,
    replica_burst: int = 32,
    client_rate: float = 1e9,  # no pacing but where a test is about it
) -> InboundScheduler:
    return InboundScheduler(
        max_frames=max_frames,
        replica_bytes=replica_bytes,
        client_bytes=client_bytes,
        replica_burst=replica_burst,
        client_rate=client_rate,
    )


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(10):
            await main()

    trio.run(bounded)


async def fill(inbound: InboundScheduler, principal: tuple[str, int], frames: list[bytes]) -> None:
    for frame in frames:
        await inbound.put(principal, frame)


def drain(inbound: InboundScheduler) -> list[tuple[tuple[str, int], bytes]]:
    taken = []
    while True:
        try:
            taken.append(inbound.receive_nowait())
        except trio.WouldBlock:
            return taken


def test_a_flooding_client_does_not_delay_another_clients_frame_by_more_than_its_turn() -> None:
    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, ATTACKER, [b"a%d" % i for i in range(5000)])
        await inbound.put(HONEST, b"pay")
        order = [principal for principal, _ in drain(inbound)]
        # Queued behind 5,000 frames of the attacker, served in its first turn: at most the
        # attacker's one frame of the current turn goes first.
        assert order.index(HONEST) <= 1
        assert order.count(ATTACKER) == 5000

    run(main)


def test_backlogged_clients_share_in_turns_counted_in_frames_and_bytes() -> None:
    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, ATTACKER, [b"x" * 100] * 3000)
        await fill(inbound, HONEST, [b"y" * 100] * 3000)
        await fill(inbound, THIRD, [b"z" * CLIENT_LIMIT] * 300)  # the largest frames
        taken = [inbound.receive_nowait() for _ in range(900)]
        first = Counter(principal for principal, _ in taken)
        # Equal small frames: equal shares, within one turn's frames.
        assert abs(first[ATTACKER] - first[HONEST]) <= 2
        # A frame of the client limit costs about twice a small one (fixed cost + bytes):
        # it gets frames, about half as many, never starved and never ahead.
        assert first[ATTACKER] / 2 - 3 <= first[THIRD] <= first[ATTACKER] / 2 + 3

    run(main)


def test_replica_frames_go_first_round_robin_among_replicas() -> None:
    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, ATTACKER, [b"a"] * 10)
        await fill(inbound, R1, [b"r1-%d" % i for i in range(3)])
        await fill(inbound, R2, [b"r2-%d" % i for i in range(3)])
        taken = drain(inbound)
        assert [principal for principal, _ in taken[:6]] == [R1, R2] * 3
        assert [frame for _, frame in taken[:6]] == [
            b"r1-0",
            b"r2-0",
            b"r1-1",
            b"r2-1",
            b"r1-2",
            b"r2-2",
        ]
        assert {principal for principal, _ in taken[6:]} == {ATTACKER}
        assert inbound.statistics().served == {"client": 10, "replica": 6}

    run(main)


def test_a_replica_arriving_later_still_goes_before_waiting_clients() -> None:
    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, ATTACKER, [b"a"] * 100)
        assert inbound.receive_nowait()[0] == ATTACKER
        await inbound.put(R0, b"vote")
        assert inbound.receive_nowait() == (R0, b"vote")

    run(main)


def test_a_flooding_replica_cannot_shut_clients_out() -> None:
    async def main() -> None:
        inbound = scheduler(replica_burst=8)
        await fill(inbound, R1, [b"r"] * 100)
        await fill(inbound, HONEST, [b"pay"] * 3)
        order = [principal for principal, _ in drain(inbound)]
        # One client frame after every 8 replica frames while clients wait.
        assert [i for i, p in enumerate(order) if p == HONEST] == [8, 17, 26]

    run(main)


def test_replicas_share_by_cost_so_big_frames_do_not_take_more_turns() -> None:
    async def main() -> None:
        inbound = scheduler()
        big = b"B" * (4 * 1024 * 1024)
        await fill(inbound, R1, [big] * 4)
        await fill(inbound, R2, [b"v" * 200] * 500)
        order = [principal for principal, _ in drain(inbound)]
        # Before R1's first 4 MiB frame goes, R2 has had its share of the same cost in
        # small votes (4 MiB + fixed cost / (200 B + fixed cost) is about 64 frames).
        assert 50 <= order.index(R1) <= 70
        assert order.count(R1) == 4

    run(main)


def test_a_full_queue_stops_its_reader_and_only_its_reader() -> None:
    async def main() -> None:
        inbound = scheduler(max_frames=4, client_bytes=CLIENT_LIMIT)
        put_done = trio.Event()

        async def attacker_reader() -> None:
            await fill(inbound, ATTACKER, [b"%d" % i for i in range(10)])
            put_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attacker_reader)
            await trio.testing.wait_all_tasks_blocked()
            assert inbound.queued(ATTACKER) == 4  # the bound in frames: the reader waits
            stats = inbound.statistics()
            assert stats.readers_blocked == 1 and stats.backpressure == {"client": 1}
            # Another peer's frames still go in at once.
            await inbound.put(HONEST, b"pay")
            assert inbound.queued(HONEST) == 1
            # Nothing is dropped: every frame comes out, in order, as room frees up.
            taken = []
            while len(taken) < 11:
                taken.append(await inbound.receive())
            await put_done.wait()
        assert [frame for principal, frame in taken if principal == ATTACKER] == [
            b"%d" % i for i in range(10)
        ]
        assert inbound.statistics().queued == 0

    run(main)


def test_the_byte_bound_and_one_frame_always_fits() -> None:
    async def main() -> None:
        inbound = scheduler(client_bytes=1000)
        await inbound.put(HONEST, b"a" * 5000)  # larger than the bound: fits an empty queue
        assert not inbound.has_room(HONEST, 1)
        inbound.receive_nowait()
        await fill(inbound, HONEST, [b"b" * 400] * 2)
        assert inbound.has_room(HONEST, 200) and not inbound.has_room(HONEST, 201)
        assert inbound.has_room(ATTACKER, 5000)  # per peer, not shared
        stats = inbound.statistics()
        assert (stats.queued, stats.queued_bytes, stats.peers_waiting) == (2, 800, 1)

    run(main)


def test_a_peer_with_nothing_queued_leaves_no_state() -> None:
    async def main() -> None:
        inbound = scheduler()
        for index in range(1000):
            await inbound.put(("client", index), b"x")
        assert inbound.statistics().peers_waiting == 1000
        drain(inbound)
        assert inbound.statistics().peers_waiting == 0
        assert inbound._queues == {}
        assert not inbound._rounds["client"].active

    run(main)


def test_an_idle_client_saves_up_no_turns() -> None:
    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, HONEST, [b"y" * 100])
        drain(inbound)
        await fill(inbound, ATTACKER, [b"x" * 100] * 100)
        await fill(inbound, HONEST, [b"y" * 100] * 100)
        order = [principal for principal, _ in [inbound.receive_nowait() for _ in range(20)]]
        assert abs(order.count(HONEST) - order.count(ATTACKER)) <= 2

    run(main)


def test_closing_fails_waiting_readers_and_ends_the_owner_after_the_queued_frames() -> None:
    async def main() -> None:
        inbound = scheduler(max_frames=1)
        await inbound.put(HONEST, b"one")
        failed: list[BaseException] = []

        async def blocked_reader() -> None:
            try:
                await inbound.put(HONEST, b"two")
            except trio.ClosedResourceError as error:
                failed.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_reader)
            await trio.testing.wait_all_tasks_blocked()
            inbound.close()
        assert len(failed) == 1
        assert [item async for item in inbound] == [(HONEST, b"one")]
        with pytest.raises(trio.EndOfChannel):
            await inbound.receive()
        with pytest.raises(trio.ClosedResourceError):
            await inbound.put(R0, b"late")

    run(main)


def test_the_owner_waits_for_a_frame_and_a_cancelled_wait_loses_nothing() -> None:
    async def main() -> None:
        inbound = scheduler()
        with trio.move_on_after(0.05) as scope:
            await inbound.receive()
        assert scope.cancelled_caught
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.sleep(0.01)
                await inbound.put(R0, b"late")

            nursery.start_soon(later)
            assert await inbound.receive() == (R0, b"late")

    run(main)


def test_a_clients_frames_are_paced_beyond_its_burst_and_a_replicas_are_not() -> None:
    async def main() -> None:
        inbound = InboundScheduler(
            max_frames=10_000,
            replica_bytes=2**26,
            client_bytes=2**26,
            client_rate=100.0,
            client_burst=10,
        )
        start = trio.current_time()
        await fill(inbound, R0, [b"v"] * 100)
        assert trio.current_time() == start
        await fill(inbound, ATTACKER, [b"r"] * 10)  # the burst: at once
        assert trio.current_time() == start
        await fill(inbound, ATTACKER, [b"r"] * 50)  # then about 100 a second
        assert 0.45 <= trio.current_time() - start <= 0.55
        assert inbound.statistics().paced == 50
        await fill(inbound, HONEST, [b"p"] * 10)  # another client's burst is its own
        assert trio.current_time() - start <= 0.55
        # A frame of 64 KiB costs about two small ones.
        now = trio.current_time()
        await fill(inbound, THIRD, [b"z" * CLIENT_LIMIT] * 25)
        assert 0.35 <= trio.current_time() - now <= 0.45
        assert inbound.statistics().queued == 100 + 60 + 10 + 25  # nothing dropped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_frames": 0},
        {"client_bytes": -1},
        {"replica_burst": 0},
        {"frame_cost": -1},
        {"client_rate": 0},
        {"client_rate": float("inf")},
        {"client_burst": 0},
        {"max_frames": True},
    ],
)
def test_bad_limits_are_refused(arguments: dict[str, int]) -> None:
    settings = {
        "max_frames": 1,
        "replica_bytes": 1,
        "client_bytes": 1,
        **arguments,
    }
    with pytest.raises(ValueError):
        InboundScheduler(**settings)  # type: ignore[arg-type]


def test_ticks_reach_the_core_on_time_however_many_frames_wait(tmp_path: Path) -> None:
    """The node's owner loop takes a due tick before the next frame: with the scheduler
    never empty and every event taking 1 ms to handle, a tick comes every tick_ms."""
    from pbft.events import Tick
    from runtime.node import ReplicaNode

    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, R1, [b"vote"] * 1000)  # a replica frame reaches the core as is
        await fill(inbound, R2, [b"vote"] * 1000)
        node = ReplicaNode(None, 0, tmp_path, tick_ms=5)  # type: ignore[arg-type]
        tick_times = []
        for _ in range(1000):
            event = await node._next_event(inbound)
            if isinstance(event, Tick):
                tick_times.append(trio.current_time())
            await trio.sleep(0.001)  # handling it
        gaps = [b - a for a, b in itertools.pairwise(tick_times)]
        assert len(tick_times) >= 1000 // 6
        assert max(gaps) <= 0.005 + 0.001 + 1e-9
        assert inbound.statistics().queued > 0  # frames waited all along

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_step_takes_every_ready_frame_up_to_its_limit_and_ends_at_a_due_tick(
    tmp_path: Path,
) -> None:
    """Group commit: the node hands the core every frame ready now in one step (their
    records then share one fsync), in the scheduler's order, at most MAX_EVENTS_PER_STEP,
    and a tick that falls due ends the step (ticks stay on time)."""
    from pbft.events import MessageReceived, Tick
    from runtime.node import MAX_EVENTS_PER_STEP, ReplicaNode

    async def main() -> None:
        inbound = scheduler()
        await fill(inbound, R1, [b"one"] * (MAX_EVENTS_PER_STEP + 10))
        await fill(inbound, R2, [b"two"] * 5)
        node = ReplicaNode(None, 0, tmp_path, tick_ms=5)  # type: ignore[arg-type]
        first = await node._next_events(inbound)  # the clock starts: no tick due yet
        assert len(first) == MAX_EVENTS_PER_STEP
        assert all(isinstance(event, MessageReceived) for event in first)
        assert {event.data for event in first[:10]} == {b"one", b"two"}  # round robin
        await trio.sleep(0.005)  # a tick falls due
        second = await node._next_events(inbound)
        (tick,) = second
        assert isinstance(tick, Tick) and tick.now_ms == 5
        assert tick.wall_ms is not None and tick.wall_ms > 0  # Unix time, for batch stamps
        third = await node._next_events(inbound)
        assert len(third) == MAX_EVENTS_PER_STEP + 15 - MAX_EVENTS_PER_STEP  # what is left
        assert inbound.statistics().queued == 0

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
