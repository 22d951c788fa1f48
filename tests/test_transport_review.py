"""Adversarial review of the version-2 handshake (issue 8 point 9): the attacks tried.

Each test attacks two or three real Transports on 127.0.0.1 through hand-made peers or a
relaying man in the middle; the wire format comes from tests/wire_session.py.
"""

from __future__ import annotations

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from test_transport_session import Proxy
from transport_harness import (
    C0,
    HOST,
    KEYS,
    R0,
    R1,
    R2,
    closed_by_peer,
    make,
    run,
    wait_until,
)
from wire_session import (
    CLIENT_DOMAIN,
    SERVER_DOMAIN,
    Auth,
    Cipher,
    Hello,
    frame,
    keys,
    public_bytes,
    read_frame,
    read_hello,
    transcript,
    wire_principal,
)

from runtime.transport import TransportConfig

P = 2**255 - 19
# X25519 public keys of small order (and non-canonical encodings of them): every one gives
# an all-zero shared secret whatever our secret is (the list of Bernstein's Curve25519 page).
SMALL_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]


# --- reflection: the same principal at both ends ------------------------------------------------


def test_an_auth_naming_the_server_itself_is_refused_before_its_signature_is_checked() -> None:
    """A connection claiming to come from the listener's own principal (a relayed or stolen
    signature, or a second process running under the same identity) is never a peer: it
    would be registered as a connection to ourselves and its frames delivered as our own."""

    async def main() -> None:
        async with make(R0) as server:
            port = await server.listen(HOST, 0)
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                hello = await read_hello(stream)
                auth = Auth(hello, R0, KEYS[R0])  # even with the real key
                await stream.send_all(frame(auth.raw) + auth.sealer.seal(b"from myself"))
                assert await closed_by_peer(stream)
            await wait_until(lambda: server.statistics().handshakes_failed == {"self": 1})
            stats = server.statistics()
            assert stats.handshakes_ok == 0 and stats.connections == 0
            assert stats.handshake_verifications == 0
            assert not server.is_connected(R0)
            assert server.inbound.statistics().queued == 0

    run(main)


def test_a_dial_reflected_back_to_the_dialler_is_refused_before_it_signs() -> None:
    """A man in the middle turns a replica's dial to replica 1 back to the replica's own
    listener: the HELLO names the dialler itself, so nothing is signed or sent."""

    async def main() -> None:
        async with make(R0) as replica, trio.open_nursery() as nursery:
            own_port = await replica.listen(HOST, 0)
            relayed: list[bytes] = []

            async def reflector(dialler: trio.SocketStream) -> None:
                async with dialler:
                    back = await trio.open_tcp_stream(HOST, own_port)
                    async with back:
                        hello = await read_frame(back)
                        await dialler.send_all(frame(hello))
                        with trio.move_on_after(0.5):
                            while data := await dialler.receive_some(4096):
                                relayed.append(data)

            listeners = await nursery.start(trio.serve_tcp, reflector, 0)
            replica.connect_to(R1, HOST, listeners[0].socket.getsockname()[1])
            await wait_until(
                lambda: replica.statistics().handshakes_failed.get("wrong_peer", 0) >= 2
            )
            assert relayed == []  # no AUTH: nothing signed for a transcript naming itself
            assert replica.statistics().handshakes_ok == 0
            nursery.cancel_scope.cancel()

    run(main)


# --- identity misbinding (unknown key share) ----------------------------------------------------


def test_a_man_in_the_middle_with_its_own_key_cannot_misbind_identities() -> None:
    """Replica 2 (a Byzantine principal of the ring, so it holds a real key) sits between
    client 0 and replica 0. It re-signs the client's AUTH under its own name (keeping the
    client's ephemeral key and nonce), hoping replica 0 takes the client's session as its
    own while the client believes it reached replica 0. The ACCEPT replica 0 signs names
    replica 2, so the client refuses it; replica 0's session has keys replica 2 cannot
    derive, so nothing the client sends is ever credited to replica 2."""

    async def main() -> None:
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            server_port = await server.listen(HOST, 0)

            async def misbinder(dialler: trio.SocketStream) -> None:
                async with dialler:
                    upstream = await trio.open_tcp_stream(HOST, server_port)
                    async with upstream:
                        hello = await read_frame(upstream)
                        await dialler.send_all(frame(hello))
                        auth = await read_frame(dialler)
                        # Same nonce and ephemeral, our principal, our signature.
                        unsigned = b"A" + wire_principal(R2) + auth[10:42] + auth[42:74]
                        digest = transcript(hello, unsigned)
                        signed = unsigned + KEYS[R2].sign(CLIENT_DOMAIN, digest)
                        await upstream.send_all(frame(signed))
                        accept = await read_frame(upstream)
                        await dialler.send_all(frame(accept))
                        with trio.move_on_after(0.5):  # relay whatever the client sends
                            while data := await dialler.receive_some(4096):
                                await upstream.send_all(data)

            listeners = await nursery.start(trio.serve_tcp, misbinder, 0)
            client.connect_to(R0, HOST, listeners[0].socket.getsockname()[1])
            client.send(R0, b"pay 5 to acct-00002")
            await wait_until(
                lambda: client.statistics().handshakes_failed.get("bad_signature", 0) >= 2
            )
            assert client.statistics().handshakes_ok == 0
            assert not client.is_connected(R0)
            # Replica 0 did accept replica 2's AUTH (its signature is genuine) but never got
            # a frame on that session: the client sent nothing, and could not have sealed
            # anything under keys bound to a transcript naming replica 2.
            assert server.statistics().handshakes_ok >= 1
            assert server.statistics().frames_in == 0
            nursery.cancel_scope.cancel()

    run(main)


# --- small-order ephemeral keys -----------------------------------------------------------------


@pytest.mark.parametrize("point", SMALL_ORDER, ids=lambda u: f"u={u:#x}"[:16])
def test_a_dialler_refuses_a_small_order_ephemeral_from_a_correctly_signing_server(
    point: int,
) -> None:
    """The server side is tested in test_transport_session (the zero point). Here the
    listener is genuine (it signs a correct ACCEPT) but its ephemeral key has small order:
    the dialler counts `bad_key`, derives no key and sends nothing more."""

    async def main() -> None:
        async with make(C0) as client, trio.open_nursery() as nursery:
            after_accept: list[bytes] = []

            async def server(stream: trio.SocketStream) -> None:
                async with stream:
                    hello = Hello(
                        b"H\x02" + b"\x09" * 32 + wire_principal(R0) + point.to_bytes(32, "little")
                    )
                    await stream.send_all(frame(hello.raw))
                    auth = await read_frame(stream)
                    digest = transcript(hello.raw, auth[:-64])
                    await stream.send_all(frame(b"K" + KEYS[R0].sign(SERVER_DOMAIN, digest)))
                    with trio.move_on_after(0.5):
                        while data := await stream.receive_some(4096):
                            after_accept.append(data)

            listeners = await nursery.start(trio.serve_tcp, server, 0)
            client.connect_to(R0, HOST, listeners[0].socket.getsockname()[1])
            client.send(R0, b"pay 5")
            await wait_until(lambda: client.statistics().handshakes_failed.get("bad_key", 0) >= 1)
            stats = client.statistics()
            assert stats.handshakes_ok == 0 and stats.frames_out == 0
            assert set(stats.handshakes_failed) == {"bad_key"}
            assert after_accept == []
            nursery.cancel_scope.cancel()

    run(main)


def test_a_genuine_server_ephemeral_is_not_refused_by_the_same_hand_made_server() -> None:
    """The control for the test above: the same listener with a proper ephemeral key."""

    async def main() -> None:
        async with make(C0) as client, trio.open_nursery() as nursery:

            async def server(stream: trio.SocketStream) -> None:
                async with stream:
                    ephemeral = X25519PrivateKey.generate()
                    raw = b"H\x02" + b"\x09" * 32 + wire_principal(R0) + public_bytes(ephemeral)
                    await stream.send_all(frame(raw))
                    auth = await read_frame(stream)
                    digest = transcript(raw, auth[:-64])
                    await stream.send_all(frame(b"K" + KEYS[R0].sign(SERVER_DOMAIN, digest)))
                    await trio.sleep(1.0)

            listeners = await nursery.start(trio.serve_tcp, server, 0)
            client.connect_to(R0, HOST, listeners[0].socket.getsockname()[1])
            await wait_until(lambda: client.statistics().handshakes_ok == 1)
            assert client.statistics().handshakes_failed == {}
            nursery.cancel_scope.cancel()

    run(main)


# --- limits ------------------------------------------------------------------------------------


def test_a_frame_limit_the_aead_cannot_seal_is_refused_by_the_config() -> None:
    """`cryptography`'s ChaCha20Poly1305 raises OverflowError (not InvalidTag) for data over
    2**31 - 1 bytes, so a larger limit would let a send crash the writer task and a peer's
    frame crash the reader: the limit plus the tag must stay below it."""
    big = 2**31
    room = {"peer_queue_bytes": big, "inbound_queue_bytes": big}
    TransportConfig(max_frame_bytes=2**31 - 1 - 16, **room)  # the largest that fits
    with pytest.raises(ValueError, match="max_frame_bytes"):
        TransportConfig(max_frame_bytes=2**31 - 16, **room)
    with pytest.raises(ValueError, match="max_frame_bytes"):
        TransportConfig(
            max_frame_bytes=2**32 - 1 - 16, peer_queue_bytes=2**32, inbound_queue_bytes=2**32
        )


# --- what the signatures cover -----------------------------------------------------------------

# (message, offset in it, the side that notices, its reason). HELLO = H | version | nonce
# (2..33) | server (34..42) | ephemeral (43..74); AUTH = A | client (1..9) | nonce (10..41) |
# ephemeral (42..73) | signature; ACCEPT = K | signature.
FIELDS = [
    ("hello", 1, "dialler", "version"),
    ("hello", 10, "listener", "bad_signature"),  # server nonce: the AUTH signs another
    ("hello", 42, "dialler", "wrong_peer"),  # server id: replica 0 -> 1
    ("hello", 50, "listener", "bad_signature"),  # server ephemeral
    ("auth", 9, "listener", "bad_signature"),  # client id: client 0 -> 1, in the ring too
    ("auth", 20, "listener", "bad_signature"),  # client nonce
    ("auth", 50, "listener", "bad_signature"),  # client ephemeral
    ("auth", 100, "listener", "bad_signature"),  # the signature itself
    ("accept", 10, "dialler", "bad_signature"),
]


@pytest.mark.parametrize(("message", "offset", "side", "reason"), FIELDS)
def test_a_man_in_the_middle_changing_any_handshake_field_gets_no_session(
    message: str, offset: int, side: str, reason: str
) -> None:
    where = {"hello": ("s2c", 0), "auth": ("c2s", 0), "accept": ("s2c", 1)}[message]

    def flip(number: int, direction: str, index: int, whole: bytes) -> list[bytes]:
        if (direction, index) == where:
            changed = bytearray(whole)
            changed[4 + offset] ^= 0x01
            return [bytes(changed)]
        return [whole]

    async def main() -> None:
        proxy = Proxy(flip)
        async with make(R0) as server, make(C0) as client, trio.open_nursery() as nursery:
            proxy.target = await server.listen(HOST, 0)
            await proxy.start(nursery)
            client.connect_to(R0, HOST, proxy.port)
            client.send(R0, b"pay 5")
            noticer = client if side == "dialler" else server
            await wait_until(lambda: noticer.statistics().handshakes_failed.get(reason, 0) >= 2)
            assert client.statistics().handshakes_ok == 0
            assert not client.is_connected(R0)
            if message != "accept":  # a changed ACCEPT is only noticed by the dialler
                assert server.statistics().handshakes_ok == 0
            assert server.statistics().frames_in == 0
            nursery.cancel_scope.cancel()

    run(main)


# --- fresh keys on every connection -------------------------------------------------------------


def test_a_dialler_reusing_its_nonce_and_ephemeral_still_gets_new_keys() -> None:
    """The listener's fresh nonce and ephemeral alone make every session's keys new: a
    (lazy or hostile) dialler that repeats its own half cannot make frame 0 of one
    connection open as frame 0 of the next (same counter, so the same nonce)."""

    async def main() -> None:
        async with make(R0) as server:
            port = await server.listen(HOST, 0)
            ephemeral = X25519PrivateKey.generate()
            sealed: list[bytes] = []
            for _ in range(2):
                stream = await trio.open_tcp_stream(HOST, port)
                async with stream:
                    hello = await read_hello(stream)
                    unsigned = b"A" + wire_principal(C0) + b"\x07" * 32 + public_bytes(ephemeral)
                    digest = transcript(hello.raw, unsigned)
                    await stream.send_all(frame(unsigned + KEYS[C0].sign(CLIENT_DOMAIN, digest)))
                    await read_frame(stream)  # ACCEPT
                    if not sealed:
                        peer = X25519PublicKey.from_public_bytes(hello.ephemeral)
                        outbound, _ = keys(ephemeral.exchange(peer), digest)
                        sealed.append(Cipher(outbound).seal(b"pay 1"))
                        await stream.send_all(sealed[0])
                        with trio.fail_after(3.0):
                            assert await server.inbound.receive() == (C0, b"pay 1")
                    else:
                        await stream.send_all(sealed[0])  # frame 0 of the first session
                        assert await closed_by_peer(stream)
            await wait_until(lambda: server.statistics().closes.get("session_auth_failed", 0) == 1)
            assert server.statistics().frames_in == 1

    run(main)


# --- the verification budget -------------------------------------------------------------------

STRANGER = "127.0.0.2"  # also loopback on Linux
# A small total budget, and a per-address one so large that one stranger address stands
# for the many addresses a real flood would come from.
FLOODED = TransportConfig(
    handshake_timeout=1.0,
    verify_rate_total=1.0,
    verify_burst_total=1,
    verify_rate_per_address=1000.0,
    verify_burst_per_address=1000,
)


async def forge_auths(port: int, until: float, sent: list[int]) -> None:
    """Well-formed AUTHs naming replica 1 with a wrong signature, from the stranger's
    address, as fast as one connection at a time allows: each takes a token of the total
    verification budget when it can."""
    while trio.current_time() < until:
        try:
            stream = await trio.open_tcp_stream(HOST, port, local_address=STRANGER)
        except OSError:
            continue
        async with stream:
            try:
                hello = await read_hello(stream)
                await stream.send_all(frame(Auth(hello, R1, KEYS[C0]).raw))
                await closed_by_peer(stream)
            except (EOFError, trio.BrokenResourceError):
                pass
        sent[0] += 1


def test_forged_auths_from_strangers_do_not_lock_a_known_replica_out() -> None:
    """The total verification budget (`verify_rate_total`) is shared by everyone: strangers
    at enough addresses (here one address with a generous per-address budget stands for
    many) spend every token on AUTHs naming a replica with a wrong signature, and the real
    replica, redialling after its connection dropped, found the budget empty every time
    (`rate_limited`) for as long as the flood lasted. A replica that has authenticated from
    an address before now has a budget of its own for AUTHs from that address; forged
    AUTHs naming it from anywhere else still share the total."""
    config = FLOODED

    async def main() -> None:
        async with make(R0, config) as server, trio.open_nursery() as nursery:
            port = await server.listen(HOST, 0)
            started = trio.current_time()
            async with make(R1) as first_life:  # replica 1 connects once, then restarts
                first_life.connect_to(R0, HOST, port)
                await first_life.wait_connected(R0)
            sent = [0]
            until = trio.current_time() + 4.0
            for _ in range(4):
                nursery.start_soon(forge_auths, port, until, sent)
            await trio.sleep(0.3)  # the budget is spent
            async with make(R1) as second_life:
                second_life.connect_to(R0, HOST, port)
                with trio.fail_after(2.5):
                    await second_life.wait_connected(R0)
            stats = server.statistics()
            assert sent[0] > 20  # the flood was on all along
            assert stats.handshakes_failed.get("rate_limited", 0) > 0
            # The strangers got the total budget's worth of checks, no more; replica 1 one
            # check for each of its two lives.
            budget = 1 + 1.0 * (trio.current_time() - started)
            assert stats.handshake_verifications <= budget + 2
            nursery.cancel_scope.cancel()

    run(main)


def test_a_replica_we_dial_by_address_is_not_locked_out_even_the_first_time() -> None:
    """A listener that has never seen replica 1 but dials it at 127.0.0.1 (as every replica
    dials every other) already knows the address its AUTHs come from."""
    config = FLOODED

    async def main() -> None:
        async with make(R0, config) as server, trio.open_nursery() as nursery:
            port = await server.listen(HOST, 0)
            dead = trio.socket.socket()
            await dead.bind((HOST, 0))  # bound, never listening: our dials fail
            server.connect_to(R1, HOST, dead.getsockname()[1])
            sent = [0]
            until = trio.current_time() + 4.0
            for _ in range(4):
                nursery.start_soon(forge_auths, port, until, sent)
            await trio.sleep(0.3)
            async with make(R1) as replica:
                replica.connect_to(R0, HOST, port)
                with trio.fail_after(2.5):
                    await replica.wait_connected(R0)
            assert server.statistics().handshakes_failed.get("rate_limited", 0) > 0
            dead.close()
            nursery.cancel_scope.cancel()

    run(main)
