"""runtime.framing and runtime.transport: frames, the handshake, and hostile peers.

Everything runs on 127.0.0.1 with OS-chosen ports and shortened timeouts. Hostile peers are
raw trio streams speaking the handshake as documented in runtime/transport.py, written out
independently of the module in tests/wire_session.py (so a change of the wire format breaks
these tests).
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from transport_harness import (
    C0,
    C1,
    FAST,
    HOST,
    KEYS,
    R0,
    R1,
    R2,
    RING,
    close_with_reset,
    closed_by_peer,
    make,
    open_raw,
    receive,
    run,
    wait_until,
)
from wire_session import (
    SERVER_DOMAIN,
    Auth,
    Hello,
    RawPeer,
    frame,
    make_hello,
    principal_of,
    read_frame,
    read_hello,
)

from crypto.keys import KeyRing, SigningKey
from runtime.framing import MAX_FRAME_BYTES, FrameDecoder, FramingError, encode_frame
from runtime.transport import Transport, TransportConfig, backoff_delay

# --- the documented wire format, written out independently (tests/wire_session.py) ----------


def auth_message(
    hello: Hello,
    claimed: tuple[str, int],
    key: SigningKey,
    client_nonce: bytes = b"\x07" * 32,
) -> bytes:
    return Auth(hello, claimed, key, client_nonce).raw


async def raw_connect(
    port: int, claimed: tuple[str, int], key: SigningKey | None = None
) -> trio.SocketStream:
    """A handshake done by hand, as `claimed`, signed with `key` (its own key by default).

    Returns the stream after sending AUTH; the caller reads ACCEPT or sees the close.
    """
    stream = await open_raw(port)
    hello = await read_hello(stream)
    await stream.send_all(frame(auth_message(hello, claimed, key or KEYS[claimed])))
    return stream


async def raw_authenticated(
    port: int, claimed: tuple[str, int], keys: dict[tuple[str, int], SigningKey] | None = None
) -> RawPeer:
    """A whole handshake done by hand; the peer then sends and reads sealed frames."""
    keys = keys or KEYS
    stream = await open_raw(port)
    hello = await read_hello(stream)
    auth = Auth(hello, claimed, keys[claimed], b"\x42" * 32)
    await stream.send_all(frame(auth.raw))
    accept = await read_frame(stream)
    assert len(accept) == 65 and accept[:1] == b"K"
    assert keys[principal_of(hello.server)].verify_key.verify(
        SERVER_DOMAIN, auth.transcript, accept[1:]
    )
    return RawPeer(stream, auth)


# --- framing ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
)
def test_frame_decoder_reassembles_frames_from_any_chunking(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(payload) for payload in payloads)
    assert stream == b"".join(frame(payload) for payload in payloads)  # the documented form
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    decoder = FrameDecoder(max_frame_bytes=300)
    received: list[bytes] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        received.extend(decoder.feed(stream[start:end]))
        # Nothing is returned before it is complete, nothing is held back once it is.
        complete = 0
        offset = 0
        for payload in payloads:
            offset += 4 + len(payload)
            if offset <= end:
                complete += 1
        assert len(received) == complete
    assert received == payloads
    assert decoder.buffered == 0


def test_frame_decoder_rejects_an_oversized_length_before_its_payload() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    assert decoder.feed(frame(b"x" * 100)) == [b"x" * 100]  # exactly the limit is fine
    assert decoder.feed(b"\x00\x00") == []  # half a length: nothing to judge yet
    with pytest.raises(FramingError) as caught:
        decoder.feed(b"\x00\x65")  # 101, and no payload byte sent
    assert caught.value.reason == "oversize_frame"
    assert (caught.value.length, caught.value.maximum) == (101, 100)
    assert decoder.failed
    with pytest.raises(FramingError):  # the framing is lost for good
        decoder.feed(frame(b"ok"))


def test_frame_decoder_default_limit_is_max_frame_bytes() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    assert FrameDecoder().feed(struct.pack(">I", MAX_FRAME_BYTES)) == []  # waits for payload
    with pytest.raises(ValueError):
        encode_frame(b"x" * 11, max_frame_bytes=10)


def test_frame_decoder_checks_each_frame_against_the_limit_in_force_when_parsed() -> None:
    # A handshake frame followed at once by a large data frame: the small handshake limit
    # applies to the first, the data limit to the second (it is not parsed early).
    decoder = FrameDecoder(max_frame_bytes=8)
    decoder.append(frame(b"hello") + frame(b"y" * 50))
    assert decoder.next_frame() == b"hello"
    decoder.max_frame_bytes = 1000
    assert decoder.next_frame() == b"y" * 50
    assert decoder.next_frame() is None


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=1.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_grows_and_stays_bounded(
    attempt: int, initial: float, jitter: float, seed: int
) -> None:
    maximum = 5.0
    delay = backoff_delay(attempt, initial, maximum, jitter, random.Random(seed))
    ceiling = min(maximum, initial * 2 ** min(attempt, 64))
    assert (1 - jitter) * ceiling - 1e-9 <= delay <= ceiling <= maximum


# --- two transports ---------------------------------------------------------------------------


def test_replica_and_client_authenticate_and_exchange_frames_both_ways() -> None:
    async def main() -> None:
        async with make(R0) as replica, make(C0) as client:
            port = await replica.listen(HOST, 0)
            assert port != 0
            client.connect_to(R0, HOST, port)
            await client.wait_connected(R0)
            assert client.send(R0, b"request")
            assert await receive(replica) == (C0, b"request")
            big = bytes(range(256)) * 256  # 64 KiB: the most a client connection carries
            assert replica.send(C0, b"")
            assert replica.send(C0, big)
            assert not replica.send(C0, big + b"x")  # refused before it is queued
            assert replica.send(C0, b"reply")
            assert await receive(client) == (R0, b"")
            assert await receive(client) == (R0, big)
            assert await receive(client) == (R0, b"reply")
            assert replica.statistics().drops == {"frame_too_large": 1}
            # The client side holds the same limit, both ways (it reads with it too).
            assert not client.send(R0, big + b"x")
            assert client.statistics().drops == {"frame_too_large": 1}
            for transport in (replica, client):
                stats = transport.statistics()
                assert stats.handshakes_ok == 1 and stats.handshakes_failed == {}
                assert stats.connections == 1 and stats.connected_peers == 1
            assert replica.statistics().frames_in == 1
            assert client.statistics().frames_in == 3
            assert client.statistics().bytes_in == len(big) + len(b"reply")
            assert replica.statistics().frames_out == 3
            assert replica.statistics().connections_accepted == 1
            assert client.statistics().connections_dialed == 1

    run(main)


def test_two_replicas_dialling_each_other_exchange_frames() -> None:
    async def main() -> None:
        async with make(R0) as a, make(R1) as b:
            port_a = await a.listen(HOST, 0)
            port_b = await b.listen(HOST, 0)
            a.connect_to(R1, HOST, port_b)
            b.connect_to(R0, HOST, port_a)
            await wait_until(lambda: a.statistics().connections == 2)
            await wait_until(lambda: b.statistics().connections == 2)
            for index in range(20):
                a.send(R1, b"a%d" % index)
                b.send(R0, b"b%d" % index)
            got_b = [await receive(b) for _ in range(20)]
            got_a = [await receive(a) for _ in range(20)]
            assert got_b == [(R0, b"a%d" % index) for index in range(20)]
            assert got_a == [(R1, b"b%d" % index) for index in range(20)]
            # Replicas keep the large frame limit (state transfer, NEW-VIEW).
            big = bytes(range(256)) * 4096  # 1 MiB: many reads, written without coalescing
            assert a.send(R1, big)
            assert await receive(b) == (R0, big)

    run(main)


# --- false identities ------------------------------------------------------------------------


def test_false_identities_are_refused_and_counted() -> None:
    async def main() -> None:
        async with make(R0) as replica:
            port = await replica.listen(HOST, 0)

            # Claims replica 1, signs with replica 2's key.
            stream = await raw_connect(port, R1, key=KEYS[R2])
            assert await closed_by_peer(stream)
            # A principal that is not in the key ring.
            stranger = SigningKey.derive(4, "client/99")
            stream = await raw_connect(port, ("client", 99), key=stranger)
            assert await closed_by_peer(stream)
            # A genuine AUTH recorded on one connection, replayed on another (new nonce).
            first = await open_raw(port)
            recorded = auth_message(await read_hello(first), C0, KEYS[C0])
            second = await open_raw(port)
            await read_hello(second)
            await second.send_all(frame(recorded))
            assert await closed_by_peer(second)
            await first.aclose()
            # A role code that does not exist.
            stream = await open_raw(port)
            await read_hello(stream)
            await stream.send_all(
                frame(b"A" + b"\x07" + bytes(8) + bytes(32) + bytes(32) + bytes(64))
            )
            assert await closed_by_peer(stream)

            await wait_until(lambda: sum(replica.statistics().handshakes_failed.values()) == 5)
            stats = replica.statistics()
            assert stats.handshakes_failed == {
                "bad_signature": 2,
                "eof": 1,  # `first`, closed without answering
                "malformed": 1,
                "unknown_principal": 1,
            }
            assert stats.handshakes_ok == 0 and stats.connections == 0
            assert replica.inbound.statistics().queued == 0

            # The control: the same hand-written handshake with the right key is accepted.
            genuine = await raw_authenticated(port, C0)
            await genuine.send(b"hello")
            assert await receive(replica) == (C0, b"hello")
            assert replica.statistics().handshakes_ok == 1
            # A frame pipelined right behind AUTH is read after AUTH checks out.
            eager = await open_raw(port)
            auth = Auth(await read_hello(eager), C1, KEYS[C1])
            early = b"e" * 5000  # above the handshake frame limit: data frames have their own
            await eager.send_all(frame(auth.raw) + auth.sealer.seal(early))
            assert await receive(replica) == (C1, early)
            assert replica.statistics().handshakes_ok == 2

    run(main)


def test_a_dialler_refuses_a_server_that_is_not_the_principal_it_dialled() -> None:
    async def main() -> None:
        async with make(R1) as impostor, make(C0) as client, trio.open_nursery() as nursery:
            port = await impostor.listen(HOST, 0)
            client.connect_to(R2, HOST, port)  # replica 1 answers: the HELLO names R1
            await wait_until(
                lambda: client.statistics().handshakes_failed.get("wrong_peer", 0) >= 2
            )
            assert impostor.statistics().handshakes_ok == 0  # we never signed anything for it

            # A server that names the right principal but cannot sign as it.
            listeners = await trio.open_tcp_listeners(0, host=HOST)
            fake_port = listeners[0].socket.getsockname()[1]

            async def fake_server(stream: trio.SocketStream) -> None:
                async with stream:
                    hello = make_hello(R0, X25519PrivateKey.generate())
                    await stream.send_all(frame(hello))
                    await read_frame(stream)
                    await stream.send_all(frame(b"K" + KEYS[R1].sign(b"pbft/v2/x", b"x")))
                    await closed_by_peer(stream)

            await nursery.start(trio.serve_listeners, fake_server, listeners)
            client.connect_to(R0, HOST, fake_port)
            await wait_until(
                lambda: client.statistics().handshakes_failed.get("bad_signature", 0) >= 1
            )
            assert not client.is_connected(R0)
            assert client.statistics().handshakes_ok == 0
            nursery.cancel_scope.cancel()

    run(main)


# --- hostile bytes ---------------------------------------------------------------------------


def test_garbage_and_oversized_frames_close_only_their_own_connection() -> None:
    async def main() -> None:
        async with make(R0) as replica, make(C0) as client:
            port = await replica.listen(HOST, 0)
            client.connect_to(R0, HOST, port)
            await client.wait_connected(R0)

            # Garbage instead of AUTH: its first 4 bytes read as a 4 GiB length.
            garbage = await open_raw(port)
            await read_hello(garbage)
            await garbage.send_all(b"\xff" * 64)
            assert await closed_by_peer(garbage)
            # Garbage that frames correctly but is no AUTH.
            junk = await open_raw(port)
            await read_hello(junk)
            await junk.send_all(frame(b"GET / HTTP/1.1\r\n\r\n"))
            assert await closed_by_peer(junk)
            # An authenticated peer that sends a frame, then an oversized length.
            peer = await raw_authenticated(port, C1)
            await peer.send(b"fine")
            assert await receive(replica) == (C1, b"fine")
            # (A replica's limit, sealed: 16 bytes of tag over the plaintext limit.)
            await peer.stream.send_all(struct.pack(">I", MAX_FRAME_BYTES + 16 + 1) + b"xyz")
            assert await closed_by_peer(peer.stream)

            # The client's connection never noticed.
            client.send(R0, b"still here")
            assert await receive(replica) == (C0, b"still here")
            replica.send(C0, b"and back")
            assert await receive(client) == (R0, b"and back")
            stats = replica.statistics()
            assert stats.handshakes_failed == {"malformed": 1, "oversize_frame": 1}
            assert stats.closes == {"oversize_frame": 1}
            assert stats.connections == 1 and replica.is_connected(C0)
            assert not replica.is_connected(C1)
            assert client.statistics().closes == {}

    run(main)


def test_a_stalled_frame_is_dropped_after_the_frame_deadline() -> None:
    config = TransportConfig(frame_timeout=0.3, handshake_timeout=0.3)

    async def main() -> None:
        async with make(R0, config) as replica:
            port = await replica.listen(HOST, 0)
            idle = await raw_authenticated(port, C0)  # idle between frames: allowed
            stalled = await raw_authenticated(port, C1)
            await stalled.stream.send_all(struct.pack(">I", 100) + b"x" * 10)
            started = trio.current_time()
            assert await closed_by_peer(stalled.stream)
            assert 0.25 <= trio.current_time() - started < 2.0
            # A trickle keeps bytes coming, but the frame is still not done in time.
            trickle = await raw_authenticated(port, ("client", 2))
            started = trio.current_time()
            await trickle.stream.send_all(struct.pack(">I", 100))
            with trio.move_on_after(2.0):
                try:
                    for _ in range(100):
                        await trio.sleep(0.05)
                        await trickle.stream.send_all(b"x")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            assert await closed_by_peer(trickle.stream)
            assert trio.current_time() - started < 1.5
            # A handshake that never starts is dropped too.
            silent = await open_raw(port)
            assert await closed_by_peer(silent)

            stats = replica.statistics()
            assert stats.closes == {"frame_timeout": 2}
            assert stats.handshakes_failed == {"timeout": 1}
            # The idle one outlived all those deadlines and still works.
            await idle.send(b"awake")
            assert await receive(replica) == (C0, b"awake")

    run(main)


def test_a_new_inbound_connection_of_a_principal_replaces_its_old_one() -> None:
    async def main() -> None:
        async with make(R0) as replica:
            port = await replica.listen(HOST, 0)
            old = await raw_authenticated(port, C1)
            new = await raw_authenticated(port, C1)
            assert await closed_by_peer(old.stream)
            await new.send(b"new")
            assert await receive(replica) == (C1, b"new")
            replica.send(C1, b"to the new one")
            assert await new.receive() == b"to the new one"
            assert replica.statistics().closes == {"replaced": 1}

    run(main)


def test_unauthenticated_connections_are_capped() -> None:
    config = TransportConfig(max_pending_handshakes=2, reserved_handshakes=0, handshake_timeout=2.0)

    async def main() -> None:
        async with make(R0, config) as replica:
            port = await replica.listen(HOST, 0)
            waiting = [await open_raw(port) for _ in range(2)]
            for stream in waiting:
                await read_hello(stream)
            extra = await open_raw(port)
            assert await closed_by_peer(extra, timeout=1.0)
            assert replica.statistics().handshakes_failed == {"too_many_pending": 1}
            for stream in waiting:
                await stream.aclose()
            genuine = await raw_authenticated(port, C0)  # slots free again
            await genuine.send(b"in")
            assert await receive(replica) == (C0, b"in")

    run(main)


# --- dead and slow peers, queues ---------------------------------------------------------------


def unused_port() -> int:
    """A port the OS just handed out and nobody listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def test_a_dead_peer_does_not_block_a_live_one_and_is_reached_once_it_appears() -> None:
    config = TransportConfig(
        peer_queue_size=8, backoff_initial=0.02, backoff_max=0.1, connect_timeout=1.0
    )

    async def main() -> None:
        dead_port = unused_port()
        async with make(C0, config) as client, make(R0) as live:
            live_port = await live.listen(HOST, 0)
            client.connect_to(R1, HOST, dead_port)  # nothing listens there yet
            client.connect_to(R0, HOST, live_port)
            await client.wait_connected(R0)
            for index in range(20):
                client.send(R1, b"dead %d" % index)
                if index % 4 == 0:
                    client.send(R0, b"live %d" % index)
            got = [await receive(live) for _ in range(5)]
            assert got == [(C0, b"live %d" % index) for index in range(0, 20, 4)]
            await wait_until(lambda: client.statistics().dial_failures >= 2)
            stats = client.statistics()
            assert stats.drops == {"peer_queue_full": 12}
            assert stats.queued == 8
            assert not client.is_connected(R1)

            async with make(R1) as late:
                assert await late.listen(HOST, dead_port) == dead_port
                got = [await receive(late) for _ in range(8)]
                assert got == [(C0, b"dead %d" % index) for index in range(12, 20)]
                assert client.is_connected(R1)
                assert client.statistics().queued == 0

    run(main)


@pytest.mark.parametrize("overflow", ["drop_oldest", "drop_newest"])
def test_a_full_peer_queue_drops_and_counts(overflow: str) -> None:
    config = TransportConfig(peer_queue_size=4, overflow=overflow)  # type: ignore[arg-type]

    async def main() -> None:
        async with make(R0, config) as replica:
            accepted = [replica.send(C1, b"%d" % index) for index in range(10)]
            stats = replica.statistics()
            assert stats.drops == {"peer_queue_full": 6}
            assert stats.queued == 4
            kept = list(range(6, 10)) if overflow == "drop_oldest" else list(range(4))
            if overflow == "drop_newest":
                assert accepted == [True] * 4 + [False] * 6
            else:
                assert all(accepted)
            # Other principals are unaffected, and strangers are refused outright.
            assert replica.send(C0, b"other")
            assert not replica.send(("client", 99), b"who?")
            assert replica.statistics().drops == {"peer_queue_full": 6, "unknown_peer": 1}

            port = await replica.listen(HOST, 0)
            peer = await raw_authenticated(port, C1)
            got = [await peer.receive() for _ in range(4)]
            assert got == [b"%d" % index for index in kept]

    run(main)


def test_a_peer_that_stops_reading_never_blocks_send_and_is_cut_off() -> None:
    config = TransportConfig(peer_queue_size=4, send_timeout=0.5)

    async def main() -> None:
        async with make(R0, config) as replica, make(C0) as client:
            port = await replica.listen(HOST, 0)
            client.connect_to(R0, HOST, port)
            await client.wait_connected(R0)
            await replica.wait_connected(C0)
            sleeper = await raw_authenticated(port, R1)  # never reads again
            chunk = b"z" * (1024 * 1024)  # a replica's frames may be this large, a client's not
            for index in range(40):
                # 40 MiB for R1: far more than the socket buffers hold. send returns at once
                # (it is not even a coroutine), and C0 keeps being served meanwhile.
                replica.send(R1, chunk)
                replica.send(C0, b"tick %d" % index)
                assert await receive(client) == (R0, b"tick %d" % index)
            await wait_until(lambda: replica.statistics().closes.get("send_timeout") == 1)
            stats = replica.statistics()
            assert stats.drops["peer_queue_full"] >= 20
            assert stats.drops["connection_lost"] == 1
            assert not replica.is_connected(R1) and replica.is_connected(C0)
            await sleeper.stream.aclose()

    run(main)


# --- lifecycle -------------------------------------------------------------------------------


def test_leaving_the_transport_closes_every_socket_and_ends_inbound() -> None:
    async def main() -> None:
        replica = make(R0)
        async with replica:
            port = await replica.listen(HOST, 0)
            peer = await raw_authenticated(port, C0)
            await peer.send(b"one")
            await wait_until(lambda: replica.statistics().frames_in == 1)
        assert await closed_by_peer(peer.stream, timeout=1.0)
        with pytest.raises(OSError):
            await trio.open_tcp_stream(HOST, port)
        assert [item async for item in replica.inbound] == [(C0, b"one")]
        assert replica.statistics().closes == {"cancelled": 1}
        with pytest.raises(RuntimeError):
            replica.send(C0, b"too late")
        with pytest.raises(RuntimeError):
            async with replica:
                pass

    run(main)


def test_an_exception_in_the_owner_comes_out_unwrapped() -> None:
    async def main() -> None:
        cause = ValueError("why")
        with pytest.raises(KeyError) as caught:
            async with make(R0) as replica:
                await replica.listen(HOST, 0)
                raise KeyError("the owner's own bug") from cause
        assert caught.value.__cause__ is cause

    run(main)


def test_construction_checks_the_key_against_the_ring() -> None:
    with pytest.raises(ValueError):
        Transport(R0, KEYS[R1], RING)
    with pytest.raises(ValueError):
        TransportConfig(peer_queue_size=0)
    with pytest.raises(ValueError):
        TransportConfig(backoff_initial=10.0, backoff_max=1.0)


# --- issue 8: strangers, floods and churn -------------------------------------------------------

STRANGER = "127.0.0.2"  # also loopback on Linux: a second address for per-address limits


async def open_raw_from(port: int, local_address: str) -> trio.SocketStream:
    return await open_raw(port, local_address)


def test_silent_strangers_cannot_keep_a_replica_out() -> None:
    # 127.0.0.1 is every address here, so the per-address cap does not help: the general pool
    # fills up, and only the reserved pool (and its eviction of silent connections) lets the
    # replica in while the flood goes on.
    config = TransportConfig(
        max_pending_handshakes=8,
        max_pending_per_address=8,
        reserved_handshakes=4,
        handshake_timeout=5.0,
        backoff_initial=0.02,
        backoff_max=0.1,
    )

    async def main() -> None:
        async with make(R0, config) as replica, trio.open_nursery() as nursery:
            port = await replica.listen(HOST, 0)
            flooded = trio.Event()

            async def flood() -> None:
                for index in range(400):  # ~100 connects a second, each held silently
                    try:
                        await open_raw(port)
                    except OSError:
                        pass
                    if index == 20:
                        flooded.set()
                    await trio.sleep(0.01)

            nursery.start_soon(flood)
            await flooded.wait()
            await wait_until(lambda: replica.statistics().pending_handshakes == 12)  # all taken

            async with make(R1, FAST) as peer:
                peer.connect_to(R0, HOST, port)
                with trio.fail_after(5.0):
                    await peer.wait_connected(R0)
                peer.send(R0, b"in despite the flood")
                assert await receive(replica) == (R1, b"in despite the flood")
                # A client cannot use the replicas' slots: refused before any signature check.
                verified = replica.statistics().handshake_verifications
                for _ in range(5):  # (a try can be evicted by the flood before its AUTH)
                    stream = await raw_connect(port, C0)
                    assert await closed_by_peer(stream)
                    if replica.statistics().handshakes_failed.get("reserved_for_replicas"):
                        break
                stats = replica.statistics()
                assert stats.handshakes_failed["reserved_for_replicas"] >= 1
                assert stats.handshake_verifications == verified
                assert stats.pending_handshakes <= 12
                assert stats.handshakes_failed.get("evicted", 0) >= 1
            nursery.cancel_scope.cancel()

    run(main)


def test_strangers_from_one_address_cannot_lock_out_another() -> None:
    config = TransportConfig(max_pending_per_address=4, reserved_handshakes=0)

    async def main() -> None:
        async with make(R0, config) as replica, make(C0, FAST) as client:
            port = await replica.listen(HOST, 0)
            for _ in range(30):  # far more than one address may hold
                await open_raw_from(port, STRANGER)
            await wait_until(lambda: replica.statistics().connections_accepted == 30)
            stats = replica.statistics()
            assert stats.pending_handshakes == 4
            assert stats.handshakes_failed == {"too_many_pending": 26}
            client.connect_to(R0, HOST, port)
            with trio.fail_after(3.0):
                await client.wait_connected(R0)
            client.send(R0, b"pay")
            assert await receive(replica) == (C0, b"pay")

    run(main)


def test_a_flood_of_auth_frames_costs_a_bounded_number_of_signature_checks() -> None:
    rate, burst = 20.0, 10
    config = TransportConfig(
        verify_rate_per_address=rate,
        verify_burst_per_address=burst,
        accept_burst_per_address=1000,  # connects are not what this test limits
    )

    async def main() -> None:
        async with make(R0, config) as replica, make(C1, FAST) as client:
            port = await replica.listen(HOST, 0)
            started = trio.current_time()
            # AUTHs that fail the cheap checks never reach a signature check at all.
            for claimed, key in ((("client", 99), SigningKey.derive(4, "client/99")),):
                stream = await open_raw_from(port, STRANGER)
                hello = await read_hello(stream)
                await stream.send_all(frame(auth_message(hello, claimed, key)))
                assert await closed_by_peer(stream)
            assert replica.statistics().handshake_verifications == 0
            # Well-formed AUTHs for a real principal with a wrong signature, as fast as the
            # stranger can: only the token bucket's worth is checked.
            for _ in range(100):
                stream = await open_raw_from(port, STRANGER)
                hello = await read_hello(stream)
                await stream.send_all(frame(auth_message(hello, C0, KEYS[C1])))
                assert await closed_by_peer(stream)
                await stream.aclose()
            elapsed = trio.current_time() - started
            stats = replica.statistics()
            checked = stats.handshake_verifications
            assert checked <= burst + rate * elapsed + 1
            assert stats.handshakes_failed["bad_signature"] == checked
            assert stats.handshakes_failed["rate_limited"] == 100 - checked
            # Another address is not affected.
            client.connect_to(R0, HOST, port)
            with trio.fail_after(3.0):
                await client.wait_connected(R0)

    run(main)


def test_a_client_connection_refuses_frames_over_the_client_limit() -> None:
    async def main() -> None:
        async with make(R0) as replica:
            port = await replica.listen(HOST, 0)
            assert replica.config.client_max_frame_bytes == 64 * 1024
            client = await raw_authenticated(port, C0)
            await client.send(b"c" * (64 * 1024))  # exactly the limit (sealed: 16 bytes more)
            assert await receive(replica) == (C0, b"c" * (64 * 1024))
            # A 16 MiB decode bomb is refused on its 4 length bytes, never buffered.
            await client.stream.send_all(struct.pack(">I", 16 * 1024 * 1024) + b"\x90" * 1000)
            assert await closed_by_peer(client.stream)
            assert replica.statistics().closes == {"oversize_frame": 1}
            # A replica's connection keeps the large limit.
            peer = await raw_authenticated(port, R1)
            await peer.send(b"r" * (1024 * 1024))
            assert await receive(replica) == (R1, b"r" * (1024 * 1024))

    run(main)


def test_peer_queues_are_bounded_in_bytes() -> None:
    config = TransportConfig(
        max_frame_bytes=4096,
        client_max_frame_bytes=1000,
        peer_queue_size=100,
        peer_queue_bytes=5000,
        client_queue_bytes=2500,
    )

    async def main() -> None:
        async with make(R0, config) as replica:
            for index in range(10):
                replica.send(C1, bytes([index]) * 1000)
                replica.send(R1, bytes([index]) * 4000)
            stats = replica.statistics()
            assert stats.queued == 2 + 1 and stats.queued_bytes == 2000 + 4000
            assert stats.drops == {"peer_queue_full": 8 + 9}
            port = await replica.listen(HOST, 0)
            peer = await raw_authenticated(port, C1)
            assert [await peer.receive() for _ in range(2)] == [b"\x08" * 1000, b"\x09" * 1000]

    run(main)


def test_the_inbound_queue_is_bounded_in_bytes() -> None:
    config = TransportConfig(
        max_frame_bytes=1000,
        client_max_frame_bytes=1000,
        inbound_queue_bytes=1000,
        client_inbound_bytes=1000,
    )

    async def main() -> None:
        async with make(R0, config) as replica:
            port = await replica.listen(HOST, 0)
            peer = await raw_authenticated(port, C0)
            frames = [bytes([index]) * 400 for index in range(10)]
            await peer.stream.send_all(b"".join(peer.sealer.seal(payload) for payload in frames))
            await wait_until(lambda: replica.statistics().inbound_queued == 2)
            await trio.sleep(0.1)  # the owner does not read: nothing more gets in
            stats = replica.statistics()
            assert (stats.inbound_queued, stats.inbound_bytes) == (2, 800)
            assert stats.inbound_backpressure == {"client": 1}  # its reader stopped
            assert [await receive(replica) for _ in range(10)] == [(C0, p) for p in frames]
            assert replica.statistics().inbound_bytes == 0

    run(main)


def test_clients_that_come_and_go_leave_no_transport_state_behind() -> None:
    count = 1000
    client_keys = {("client", j): SigningKey.derive(4, f"churn/{j}") for j in range(count)}
    ring = KeyRing(
        {
            R0: KEYS[R0].verify_key,
            **{principal: key.verify_key for principal, key in client_keys.items()},
        }
    )
    config = TransportConfig(
        idle_peer_timeout=0.05,
        accept_rate_per_address=1e6,
        accept_burst_per_address=10_000,
        verify_rate_per_address=1e6,
        verify_burst_per_address=10_000,
        verify_rate_total=1e6,
        verify_burst_total=10_000,
    )

    async def handshake(port: int, principal: tuple[str, int]) -> RawPeer:
        stream = await trio.open_tcp_stream(HOST, port)
        auth = Auth(await read_hello(stream), principal, client_keys[principal])
        await stream.send_all(frame(auth.raw))
        accept = await read_frame(stream)
        assert accept[:1] == b"K"
        return RawPeer(stream, auth)

    async def main() -> None:
        replica = Transport(R0, KEYS[R0], ring, config)
        async with replica:
            port = await replica.listen(HOST, 0)
            baseline = replica.statistics()
            for j in range(count):
                principal = ("client", j)
                peer = await handshake(port, principal)
                try:
                    await peer.send(b"request %d" % j)
                    assert await receive(replica) == (principal, b"request %d" % j)
                    replica.send(principal, b"reply %d" % j)
                    assert await peer.receive() == b"reply %d" % j
                finally:
                    await close_with_reset(peer.stream)
                if j == 99:
                    await wait_until(lambda: replica.statistics().peers == 0)
                    after_100 = replica.statistics()
            # The last ones may still be in their grace period: wait it out.
            await wait_until(lambda: replica.statistics().peers == 0)
            await wait_until(lambda: replica.statistics().tasks == baseline.tasks)
            stats = replica.statistics()
            assert stats.handshakes_ok == count and stats.frames_in == count
            assert stats.frames_out == count
            # Closed with a reset: read as an EOF or a broken connection, by timing.
            assert sum(stats.closes.values()) == count
            assert set(stats.closes) <= {"eof", "broken"}
            assert (stats.connections, stats.queued, stats.queued_bytes) == (0, 0, 0)
            assert (stats.inbound_queued, stats.inbound_bytes, stats.pending_handshakes) == (
                0,
                0,
                0,
            )
            assert stats.tasks == baseline.tasks == after_100.tasks
            assert stats.drops == {}

    async def bounded() -> None:
        with trio.fail_after(120):
            await main()

    trio.run(bounded)
