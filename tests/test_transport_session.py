"""Issue 8 point 9: every connection is a session (handshake version 2, sealed frames).

The session cipher alone, then two real Transports with a man in the middle: a TCP proxy
on 127.0.0.1 that sees every frame and may change, drop, replay or inject frames. The wire
format is written out independently in tests/wire_session.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from transport_harness import (
    C0,
    HOST,
    KEYS,
    R0,
    R1,
    make,
    nothing_more,
    receive,
    run,
    wait_until,
)
from wire_session import (
    Auth,
    Cipher,
    frame,
    keys,
    read_frame,
    read_hello,
    transcript,
    wire_principal,
)

from pbft.messages import Prepare, Request
from pbft.signed import seal
from runtime.framing import FrameDecoder, FramingError
from runtime.transport import (
    SessionCipher,
    SessionError,
    SessionReader,
    Transport,
    session_keys,
)

KEY_A, KEY_B = b"\x01" * 32, b"\x02" * 32


# --- the session cipher alone ------------------------------------------------------------------


def test_each_frame_takes_the_next_counter_as_its_nonce_and_covers_its_length() -> None:
    sealer = SessionCipher(KEY_A)
    frames = [sealer.seal_frame(b"payment %d" % index) for index in range(3)]
    assert sealer.counter == 3
    aead = ChaCha20Poly1305(KEY_A)
    for index, sealed in enumerate(frames):
        header, ciphertext = sealed[:4], sealed[4:]
        assert struct.unpack(">I", header)[0] == len(b"payment %d" % index) + 16
        nonce = bytes(4) + index.to_bytes(8, "big")  # 4 zero bytes | u64 counter
        assert aead.decrypt(nonce, ciphertext, header) == b"payment %d" % index
        with pytest.raises(InvalidTag):  # the length is associated data
            aead.decrypt(nonce, ciphertext, struct.pack(">I", len(ciphertext) + 1))
    # The same payload twice is two different ciphertexts (never one nonce twice).
    assert sealer.seal_frame(b"same") != sealer.seal_frame(b"same")
    # The independent implementation of the tests agrees, frame for frame.
    opener = Cipher(KEY_A)
    assert [opener.open(sealed[4:]) for sealed in frames] == [b"payment %d" % i for i in range(3)]


def test_frames_open_only_in_order_once_and_under_their_own_key() -> None:
    sealer = SessionCipher(KEY_A)
    first, second = sealer.seal_frame(b"one"), sealer.seal_frame(b"two")
    opener = SessionCipher(KEY_A)
    assert opener.open(first[4:]) == b"one"
    with pytest.raises(SessionError) as replayed:
        opener.open(first[4:])  # the receiver expects counter 1: a replay does not open
    assert replayed.value.reason == "session_auth_failed"
    skipped = SessionCipher(KEY_A)
    with pytest.raises(SessionError):
        skipped.open(second[4:])  # reordered (or the first dropped)
    with pytest.raises(SessionError):
        SessionCipher(KEY_B).open(first[4:])  # another key: another direction or session
    with pytest.raises(SessionError):
        SessionCipher(KEY_A).open(first[4:10])  # shorter than a tag


def test_the_two_directions_have_different_keys() -> None:
    shared = X25519PrivateKey.generate().exchange(X25519PrivateKey.generate().public_key())
    to_server, to_client = session_keys(shared, b"t" * 32)
    assert to_server != to_client and len(to_server) == len(to_client) == 32
    assert session_keys(shared, b"u" * 32)[0] != to_server  # bound to the transcript
    assert (to_server, to_client) == keys(shared, b"t" * 32)  # the documented derivation
    # A frame reflected back to its sender does not open there.
    reflected = SessionCipher(to_server).seal_frame(b"to the server")
    with pytest.raises(SessionError):
        SessionCipher(to_client).open(reflected[4:])


def test_a_counter_never_wraps() -> None:
    last = SessionCipher(KEY_A, counter=2**64 - 1)
    sealed = last.seal_frame(b"the last frame")
    assert SessionCipher(KEY_A, counter=2**64 - 1).open(sealed[4:]) == b"the last frame"
    with pytest.raises(SessionError) as exhausted:
        last.seal_frame(b"one too many")
    assert exhausted.value.reason == "session_exhausted"
    with pytest.raises(SessionError):
        SessionCipher(KEY_A, counter=2**64).open(sealed[4:])
    with pytest.raises(ValueError):
        SessionCipher(KEY_A, counter=2**64 + 1)


def test_the_reader_applies_the_plaintext_limit_plus_the_tag() -> None:
    sealer = SessionCipher(KEY_A)
    reader = SessionReader(FrameDecoder(1024), SessionCipher(KEY_A), max_plaintext=100)
    assert reader.max_frame_bytes == 100
    assert reader.feed(sealer.seal_frame(b"x" * 100)) == [b"x" * 100]  # 116 on the wire
    with pytest.raises(FramingError) as caught:
        reader.feed(struct.pack(">I", 117))
    assert caught.value.reason == "oversize_frame"
    # A frame that does not open leaves the reader failed for good.
    broken = SessionReader(FrameDecoder(), SessionCipher(KEY_A), 100)
    sealed = bytearray(SessionCipher(KEY_A).seal_frame(b"pay 5"))
    sealed[6] ^= 0x01
    with pytest.raises(SessionError):
        broken.feed(bytes(sealed))
    with pytest.raises(SessionError):
        broken.feed(b"")


# --- a man in the middle -----------------------------------------------------------------------

Tamper = Callable[[int, str, int, bytes], list[bytes]]


class Proxy:
    """Relays TCP connections to `target` frame by frame, recording everything.

    `tamper(connection, direction, index, frame)` returns what to forward instead of the
    frame (header included); direction "c2s" (dialler to listener) or "s2c"; `index`
    counts the frames of that direction on that connection, handshake frames included
    (c2s: AUTH is 0; s2c: HELLO 0, ACCEPT 1). `inject` writes bytes of its own.
    """

    def __init__(self, tamper: Tamper | None = None) -> None:
        self.tamper = tamper
        self.target = 0
        self.frames: dict[tuple[int, str], list[bytes]] = {}
        self.wire = bytearray()  # every byte that went through, both ways
        self.connections = 0
        self.port = 0
        self._sinks: dict[tuple[int, str], tuple[trio.SocketStream, trio.Lock]] = {}

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(trio.serve_tcp, self._serve, 0)
        self.port = listeners[0].socket.getsockname()[1]

    async def inject(self, number: int, direction: str, data: bytes) -> None:
        sink, lock = self._sinks[(number, direction)]
        async with lock:
            await sink.send_all(data)

    async def _serve(self, dialler: trio.SocketStream) -> None:
        number = self.connections
        self.connections += 1
        listener = await trio.open_tcp_stream(HOST, self.target)
        async with dialler, listener, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, dialler, listener, number, "c2s", nursery)
            nursery.start_soon(self._pump, listener, dialler, number, "s2c", nursery)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        number: int,
        direction: str,
        nursery: trio.Nursery,
    ) -> None:
        lock = trio.Lock()
        self._sinks[(number, direction)] = (sink, lock)
        seen = self.frames.setdefault((number, direction), [])
        buffer = b""
        try:
            while data := await source.receive_some(65536):
                buffer += data
                while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
                    size = 4 + struct.unpack(">I", buffer[:4])[0]
                    whole, buffer = buffer[:size], buffer[size:]
                    index = len(seen)
                    seen.append(whole)
                    out = [whole]
                    if self.tamper is not None:
                        out = self.tamper(number, direction, index, whole)
                    for piece in out:
                        self.wire += piece
                        async with lock:
                            await sink.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()  # one side gone: the relay ends, both sockets close


async def connected_through(
    proxy: Proxy, nursery: trio.Nursery, server: Transport, dialler: Transport
) -> None:
    proxy.target = await server.listen(HOST, 0)
    await proxy.start(nursery)
    dialler.connect_to(server.principal, HOST, proxy.port)
    await dialler.wait_connected(server.principal)
    await wait_until(lambda: server.is_connected(dialler.principal))


async def reconnected(server: Transport, client: Transport, handshakes: int) -> None:
    """After the server dropped the client's connection, the client redialled."""
    await wait_until(lambda: client.statistics().handshakes_ok == handshakes)
    await client.wait_connected(server.principal)
    await wait_until(lambda: server.is_connected(client.principal))


def test_a_flipped_bit_closes_the_connection_and_the_frame_is_not_delivered() -> None:
    def flip(number: int, direction: str, index: int, whole: bytes) -> list[bytes]:
        if (number, direction, index) == (0, "c2s", 2):  # the second data frame
            changed = bytearray(whole)
            changed[7] ^= 0x10  # a ciphertext bit: the cipher alone would let it through
            return [bytes(changed)]
        return [whole]

    async def main() -> None:
        proxy = Proxy(flip)
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            await connected_through(proxy, nursery, server, client)
            client.send(R0, b"pay 5 to acct-00002")
            assert await receive(server) == (C0, b"pay 5 to acct-00002")
            client.send(R0, b"pay 7 to acct-00003")
            await wait_until(lambda: server.statistics().closes.get("session_auth_failed") == 1)
            # The client redials (through the proxy, untouched now) and goes on.
            await reconnected(server, client, 2)
            client.send(R0, b"pay 9 to acct-00004")
            assert await receive(server) == (C0, b"pay 9 to acct-00004")  # 7 never came
            assert server.statistics().frames_in == 2
            nursery.cancel_scope.cancel()

    run(main)


def test_a_replayed_frame_is_refused_and_a_reflected_one_too() -> None:
    def replay(number: int, direction: str, index: int, whole: bytes) -> list[bytes]:
        if (number, direction, index) == (0, "c2s", 2):
            return [whole, proxy.frames[(0, "c2s")][1]]  # then the first data frame again
        return [whole]

    proxy = Proxy(replay)

    async def main() -> None:
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            await connected_through(proxy, nursery, server, client)
            client.send(R0, b"pay 1")
            assert await receive(server) == (C0, b"pay 1")
            client.send(R0, b"pay 2")
            assert await receive(server) == (C0, b"pay 2")
            await wait_until(lambda: server.statistics().closes.get("session_auth_failed") == 1)
            assert await nothing_more(server)  # "pay 1" was not delivered twice

            # The client's own frame, sent back to it as if from the server.
            await reconnected(server, client, 2)
            client.send(R0, b"pay 3")
            assert await receive(server) == (C0, b"pay 3")
            await proxy.inject(1, "s2c", proxy.frames[(1, "c2s")][1])
            await wait_until(lambda: client.statistics().closes.get("session_auth_failed") == 1)
            assert await nothing_more(client)
            assert server.statistics().frames_in == 3
            nursery.cancel_scope.cancel()

    run(main)


def test_a_validly_signed_message_injected_as_a_raw_frame_is_refused() -> None:
    async def main() -> None:
        proxy = Proxy()
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            await connected_through(proxy, nursery, server, client)
            client.send(R0, b"pay 1")
            assert await receive(server) == (C0, b"pay 1")
            # A real client's signed payment (the key is the client's own): before sessions
            # the replica would have taken it as the client's next frame.
            signed = seal(
                Request(0, 99, "transfer", "acct-00000", "acct-00001", 1_000_000), KEYS[C0]
            )
            await proxy.inject(0, "c2s", frame(signed))
            await wait_until(lambda: server.statistics().closes.get("session_auth_failed") == 1)
            assert await nothing_more(server)
            # A replica's signed message injected towards a client is refused there too.
            await reconnected(server, client, 2)
            vote = seal(Prepare(0, 1, 0, b"\x01" * 32), KEYS[R0])
            await proxy.inject(1, "s2c", frame(vote))
            await wait_until(lambda: client.statistics().closes.get("session_auth_failed") == 1)
            assert await nothing_more(client)
            assert server.statistics().frames_in == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_payloads_do_not_appear_in_plaintext_on_the_wire() -> None:
    async def main() -> None:
        proxy = Proxy()
        async with make(R0) as server, make(R1) as peer, trio.open_nursery() as nursery:
            await connected_through(proxy, nursery, server, peer)
            request = b"PAY acct-00001 -> acct-00002 amount 123456789 " * 4
            reply = b"BALANCE acct-00001 is 987654321 " * 4
            big = request * 2000  # many TCP segments
            peer.send(R0, request)
            peer.send(R0, big)
            assert await receive(server) == (R1, request)
            assert await receive(server) == (R1, big)
            server.send(R1, reply)
            assert await receive(peer) == (R0, reply)
            wire = bytes(proxy.wire)
            assert len(wire) > len(request) + len(big) + len(reply)  # it all went through
            # Seven bytes or more: a shorter string turns up in 800 KB of ciphertext by chance
            # (b"PAY" about one run in twenty).
            for secret in (b"acct-00001", b"123456789", b"987654321", b"PAY acct", b"BALANCE"):
                assert secret not in wire
            nursery.cancel_scope.cancel()

    run(main)


def test_version_1_is_refused_both_ways() -> None:
    async def main() -> None:
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            # A version-1 listener: its HELLO has no ephemeral key and version byte 1.
            v1_hello = b"H\x01" + bytes(32) + wire_principal(R1)
            answers: list[bytes] = []

            async def v1_server(stream: trio.SocketStream) -> None:
                async with stream:
                    await stream.send_all(frame(v1_hello))
                    with trio.move_on_after(2.0):
                        while data := await stream.receive_some(4096):
                            answers.append(data)

            listeners = await nursery.start(trio.serve_tcp, v1_server, 0)
            client.connect_to(R1, HOST, listeners[0].socket.getsockname()[1])
            await wait_until(lambda: client.statistics().handshakes_failed.get("version", 0) >= 2)
            assert answers == []  # refused before the client said (or signed) anything
            assert client.statistics().handshakes_ok == 0

            # A version-1 dialler: a 106-byte AUTH (no ephemeral key) to a version-2 HELLO.
            port = await server.listen(HOST, 0)
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                hello = await read_hello(stream)
                signature = KEYS[C0].sign(b"pbft/v1/handshake", hello.nonce + hello.server)
                v1_auth = b"A" + wire_principal(C0) + b"\x05" * 32 + signature
                await stream.send_all(frame(v1_auth))
                with trio.fail_after(2.0):
                    assert await stream.receive_some(4096) == b""  # closed, nothing said
            await wait_until(lambda: server.statistics().handshakes_failed == {"version": 1})
            assert server.statistics().handshake_verifications == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_a_recorded_handshake_replayed_on_a_new_connection_fails() -> None:
    async def main() -> None:
        proxy = Proxy()
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            await connected_through(proxy, nursery, server, client)
            client.send(R0, b"pay 1")
            assert await receive(server) == (C0, b"pay 1")
            client.send(R0, b"pay 2")
            assert await receive(server) == (C0, b"pay 2")
            recorded_c2s = proxy.frames[(0, "c2s")]  # AUTH, then two sealed frames
            recorded_s2c = proxy.frames[(0, "s2c")]  # HELLO, ACCEPT
            assert len(recorded_c2s) == 3 and len(recorded_s2c) == 2

            # The dialler's side replayed to the server on a new connection.
            stream = await trio.open_tcp_stream(HOST, proxy.target)
            async with stream:
                await read_hello(stream)
                await stream.send_all(b"".join(recorded_c2s))
                with trio.fail_after(2.0):
                    assert await stream.receive_some(4096) == b""
            await wait_until(lambda: server.statistics().handshakes_failed == {"bad_signature": 1})
            assert await nothing_more(server)

            # The server's side replayed to a dialler: its AUTH (fresh nonce and ephemeral)
            # makes another transcript, so the recorded ACCEPT does not verify.
            async def replayer(stream: trio.SocketStream) -> None:
                async with stream:
                    await stream.send_all(recorded_s2c[0])
                    await read_frame(stream)
                    await stream.send_all(recorded_s2c[1])
                    with trio.move_on_after(2.0):
                        while await stream.receive_some(4096):
                            pass

            listeners = await nursery.start(trio.serve_tcp, replayer, 0)
            async with make(R1) as other:
                other.connect_to(R0, HOST, listeners[0].socket.getsockname()[1])
                await wait_until(
                    lambda: other.statistics().handshakes_failed.get("bad_signature", 0) >= 1
                )
                assert not other.is_connected(R0)
            nursery.cancel_scope.cancel()

    run(main)


def test_keys_of_a_hand_made_session_match_the_transport() -> None:
    async def main() -> None:
        async with make(R0) as server:
            port = await server.listen(HOST, 0)
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                hello = await read_hello(stream)
                auth = Auth(hello, C0, KEYS[C0])
                await stream.send_all(frame(auth.raw))
                accept = await read_frame(stream)
                assert KEYS[R0].verify_key.verify(
                    b"pbft/v2/handshake-accept", auth.transcript, accept[1:]
                )
                await stream.send_all(auth.sealer.seal(b"hand made"))
                assert await receive(server) == (C0, b"hand made")
                server.send(C0, b"and back")
                assert auth.opener.open(await read_frame(stream)) == b"and back"
            # An ephemeral key that gives no shared secret (a small-order point) is refused
            # after the signature, before any key is derived.
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                hello = await read_hello(stream)
                unsigned = b"A" + wire_principal(C0) + bytes(32) + bytes(32)  # the zero point
                digest = transcript(hello.raw, unsigned)
                signed = unsigned + KEYS[C0].sign(b"pbft/v2/handshake", digest)
                await stream.send_all(frame(signed))
                with trio.fail_after(2.0):
                    assert await stream.receive_some(4096) == b""
            await wait_until(lambda: server.statistics().handshakes_failed == {"bad_key": 1})

    run(main)


def test_a_connection_out_of_nonces_is_closed_and_redialled_never_wrapped() -> None:
    async def main() -> None:
        async with make(R0) as server, make(C0) as client:
            port = await server.listen(HOST, 0)
            client.connect_to(R0, HOST, port)
            await client.wait_connected(R0)
            await wait_until(lambda: server.is_connected(C0))
            # Both ends of the client -> server direction, one frame before the limit
            # (reached through the internals: 2**64 frames cannot be sent in a test).
            outbound = client._peers[R0].active
            inbound = server._peers[C0].active
            assert outbound is not None and inbound is not None
            outbound.sealer.counter = 2**64 - 1
            inbound.decoder._cipher.counter = 2**64 - 1
            client.send(R0, b"the last nonce")
            assert await receive(server) == (C0, b"the last nonce")
            client.send(R0, b"one too many")  # lost with its connection, never sealed
            await wait_until(lambda: client.statistics().closes.get("session_exhausted") == 1)
            assert client.statistics().drops == {"connection_lost": 1}
            await wait_until(lambda: client.statistics().handshakes_ok == 2)
            await client.wait_connected(R0)
            await wait_until(lambda: server.statistics().handshakes_ok == 2)
            client.send(R0, b"new keys, counter 0")
            assert await receive(server) == (C0, b"new keys, counter 0")
            assert server.statistics().closes.get("session_auth_failed") is None

    run(main)
