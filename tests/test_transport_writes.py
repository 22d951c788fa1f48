"""runtime.transport's writer: frames queued together leave in one write, streams carry
TCP_NODELAY, and what a peer that stops reading costs stays bounded (issue 10)."""

from __future__ import annotations

import socket

import trio
from transport_harness import (
    C0,
    FAST,
    HOST,
    R0,
    R1,
    connected,
    make,
    open_raw,
    receive,
    run,
    wait_until,
)

from runtime.transport import TransportConfig


def test_frames_queued_in_one_step_leave_in_one_write_in_order() -> None:
    async def main() -> None:
        async with make(R0) as replica, make(C0) as client:
            await connected(replica, R0, client)
            before = replica.statistics()
            # No checkpoint between the sends: the writer finds all 50 queued when it runs.
            for index in range(50):
                assert replica.send(C0, b"reply %d" % index)
            for index in range(50):
                assert await receive(client) == (R0, b"reply %d" % index)
            after = replica.statistics()
            assert after.frames_out - before.frames_out == 50
            assert after.writes_out - before.writes_out == 1
            # One at a time, each send waits for the previous delivery: a write each.
            for index in range(3):
                replica.send(C0, b"alone %d" % index)
                assert await receive(client) == (R0, b"alone %d" % index)
            assert replica.statistics().writes_out - after.writes_out == 3

    run(main)


def test_a_write_holds_at_most_64_kib_of_small_frames_and_large_ones_alone() -> None:
    async def main() -> None:
        async with make(R0) as replica, make(R1) as peer:
            await connected(replica, R0, peer)
            before = replica.statistics().writes_out
            small = [bytes([index]) * 20_000 for index in range(7)]  # 140 KB: three writes
            large = b"L" * 200_000  # over the coalescing limit: a write of its own
            for payload in small[:4]:
                replica.send(R1, payload)
            replica.send(R1, large)
            for payload in small[4:]:
                replica.send(R1, payload)
            for payload in [*small[:4], large, *small[4:]]:
                assert await receive(peer) == (R0, payload)
            # 3 small (60 KB) | 1 small | the large one | 3 small
            assert replica.statistics().writes_out - before == 4

    run(main)


def test_every_connection_has_tcp_nodelay_both_ways() -> None:
    async def main() -> None:
        async with make(R0) as replica, make(C0) as client:
            await connected(replica, R0, client)
            for transport, peer in ((replica, C0), (client, R0)):
                connection = transport._peers[peer].active
                assert connection is not None
                value = connection.stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert value != 0

    run(main)


def test_a_dead_peer_costs_a_bounded_queue_and_every_dropped_frame_is_counted() -> None:
    # A replica peer that authenticates, then never reads: what the replica holds for it is
    # bounded by the queue (frames and bytes) plus the socket buffers, and every frame it
    # does not deliver is counted with its reason.
    config = TransportConfig(
        handshake_timeout=FAST.handshake_timeout,
        connect_timeout=FAST.connect_timeout,
        backoff_initial=FAST.backoff_initial,
        backoff_max=FAST.backoff_max,
        peer_queue_size=64,
        max_frame_bytes=256 * 1024,
        peer_queue_bytes=1024 * 1024,
        send_timeout=30.0,  # the writer stays blocked: the queue must bound it alone
    )

    small_inbound = TransportConfig(
        handshake_timeout=FAST.handshake_timeout,
        max_frame_bytes=256 * 1024,
        inbound_queue_size=4,
        inbound_queue_bytes=256 * 1024,
    )

    async def main() -> None:
        async with make(R0, config) as replica, make(R1, small_inbound) as sleeper:
            await connected(replica, R0, sleeper)
            # The sleeper's owner never takes a frame: its reader stops once its inbound
            # queue is full, then TCP fills up and the replica's writer blocks.
            chunk = b"z" * 60_000
            sent = 2000  # 120 MB offered
            for _ in range(sent):
                replica.send(R1, chunk)
                await trio.lowlevel.checkpoint()
            await wait_until(lambda: replica.statistics().drops.get("peer_queue_full", 0) > 0)
            stats = replica.statistics()
            assert stats.queued <= 64 and stats.queued_bytes <= 1024 * 1024
            in_flight = sent - stats.frames_out - stats.queued - sum(stats.drops.values())
            assert 0 <= in_flight <= 1  # at most one write in progress
            assert stats.drops["peer_queue_full"] >= sent - 64 - 1 - stats.frames_out

    run(main)


# --- the accept rate (issue 8's handshake_flood) ------------------------------------------------

STRANGER = "127.0.0.2"  # also loopback on Linux: another source address


def test_connects_beyond_the_accept_rate_are_reset_before_any_handshake_work() -> None:
    config = TransportConfig(accept_rate_per_address=1.0, accept_burst_per_address=5)

    async def main() -> None:
        async with make(R0, config) as replica, make(C0, FAST) as client:
            port = await replica.listen(HOST, 0)
            streams: list[trio.SocketStream] = []
            reset_on_connect = 0  # the reset can come before connect() has returned
            for _ in range(40):
                try:
                    streams.append(await open_raw(port, STRANGER))
                except OSError:
                    reset_on_connect += 1
            await wait_until(lambda: replica.statistics().connections_accepted == 40)
            stats = replica.statistics()
            refused = stats.handshakes_failed.get("accept_rate", 0)
            assert 40 - 5 - 2 <= refused <= 40 - 5  # the burst, and a token a second
            # Those it served got a HELLO; the refused ones got a reset and not one byte.
            hellos, resets = 0, reset_on_connect
            for stream in streams:
                try:
                    with trio.fail_after(2.0):
                        data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    resets += 1
                else:
                    hellos += bool(data)
            assert (hellos, resets) == (40 - refused, refused)
            assert stats.pending_handshakes == 40 - refused
            # Another address is not limited by the stranger's rate.
            client.connect_to(R0, HOST, port)
            with trio.fail_after(3.0):
                await client.wait_connected(R0)

    run(main)


async def _connect_raw(port: int, address: str, count: int) -> None:
    """`count` raw TCP connects from `address` (a reset can come before connect() returns)."""
    for _ in range(count):
        try:
            await open_raw(port, address)
        except OSError:
            pass


def test_a_replica_address_has_a_larger_accept_bucket_of_its_own() -> None:
    """Review finding F4: an address a replica is known at is not exempt from the accept
    rate (anything else on that host, or a Byzantine replica making an address its own,
    would connect without limit) but has a bucket of its own: strangers elsewhere spending
    theirs do not keep the replica out, and the replica's address is limited too."""
    config = TransportConfig(
        accept_rate_per_address=0.01,
        accept_burst_per_address=1,
        accept_rate_replica_address=0.01,
        accept_burst_replica_address=5,
        backoff_max=0.2,
    )

    async def main() -> None:
        async with make(R0, config) as replica, make(R1, FAST) as peer:
            port = await replica.listen(HOST, 0)
            peer_port = await peer.listen(HOST, 0)
            replica.connect_to(R1, HOST, peer_port)  # R1 is known at 127.0.0.1
            await _connect_raw(port, STRANGER, 5)  # the stranger's one token, and more
            await wait_until(lambda: replica.statistics().connections_accepted == 5)
            assert replica.statistics().handshakes_failed == {"accept_rate": 4}
            peer.connect_to(R0, HOST, port)  # from the replica's address: its own bucket
            with trio.fail_after(3.0):
                await peer.wait_connected(R0)
            await wait_until(lambda: len(replica._peers[R1].connections) == 2)  # both ways
            accepted = replica.statistics().connections_accepted
            # The replica's address took one of its five; ten more connects from it: four
            # are served, six refused (not exempt).
            await _connect_raw(port, HOST, 10)
            await wait_until(lambda: replica.statistics().connections_accepted == accepted + 10)
            assert replica.statistics().handshakes_failed.get("accept_rate") == 4 + 6

    run(main)
