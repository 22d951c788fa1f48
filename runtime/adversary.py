"""The attacks of `python -m runtime.attack`, each run by its own attacker process.

    python -m runtime.adversary NAME --cluster FILE --seconds N --client ID --replica ID

The attacker prepares what it needs (signed messages, the bombs), prints `ready` and
waits for one line on stdin; then it attacks every replica (but `--replica`, whose key it
holds as a Byzantine replica, in catchup_amplification) for `--seconds` and prints one
JSON object of counters.
It runs as its own process, below normal priority, so that on a shared machine it is
its work on the replicas that is measured, not its competition with the honest client
for a core (a real attacker brings its own CPU).

Every attack goes through real TCP sockets to the replicas' listening ports; the ones
that need an authenticated connection complete the transport's handshake with a key
from the cluster directory (a client key of its own, or the replica key it holds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from crypto.keys import Principal, SigningKey
from pbft.messages import Fetch, MessageType, Prepare, Request, StateRequest
from pbft.signed import Rejected, peek, seal
from runtime.cluster import Cluster, load_cluster
from runtime.framing import FRAME_HEADER_SIZE, MAX_FRAME_BYTES, FrameDecoder, encode_frame
from runtime.transport import (
    EPHEMERAL_SIZE,
    HANDSHAKE_DOMAIN,
    HANDSHAKE_MAX_FRAME_BYTES,
    HANDSHAKE_VERSION,
    NONCE_SIZE,
    SESSION_TAG_SIZE,
    SessionCipher,
    SessionError,
    SessionReader,
    decode_principal,
    encode_principal,
    ephemeral_key,
    session_keys,
    transcript_hash,
)

ATTACKER_NICE = 10
HANDSHAKE_CONNECTS_PER_S = 100  # silent connects per replica per second
HANDSHAKE_HOLD_S = 6.0  # a silent connection is kept at most this long (past the timeout)
MAX_SILENT_PER_REPLICA = 600  # open silent sockets per replica (file descriptors)
BAD_AUTH_WORKERS = 8  # concurrent bad-AUTH loops per replica
BOMB_BYTES = 16 * 1024 * 1024 - 64  # just under the frame limit (envelope overhead aside)
SMALL_BOMB_BYTES = 64 * 1024 - 64
CLIENT_FLOOD_REQUESTS = 20_000  # distinct signed requests prepared in advance
IO_TIMEOUT_S = 5.0


@dataclass
class Counters:
    """What the attacker did; bytes are frames (sealed, with headers) as put on TCP."""

    sent: Counter[str] = field(default_factory=Counter)
    bytes_out: int = 0  # attacker -> replicas
    bytes_in: int = 0  # replicas -> attacker (on its authenticated connections)
    received: Counter[str] = field(default_factory=Counter)  # bytes_in by message type
    errors: Counter[str] = field(default_factory=Counter)
    extra: dict[str, object] = field(default_factory=dict)

    def as_json(self, seconds: float) -> dict[str, object]:
        return {
            "seconds": round(seconds, 3),
            "sent": dict(self.sent),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "received": dict(self.received),
            "errors": dict(self.errors),
            **self.extra,
        }


class Context:
    """The cluster, the keys the attacker holds, and its counters."""

    def __init__(
        self, cluster: Cluster, client_id: int, replica_id: int, *, spare_own_replica: bool
    ) -> None:
        self.cluster = cluster
        self.client_id = client_id
        self.client_key = cluster.load_private_key("client", client_id)
        self.replica_id = replica_id
        self.replica_key = cluster.load_private_key("replica", replica_id)
        self.counters = Counters()
        # The replicas attacked: all, or all but the one whose key the attacker holds.
        self.targets = [
            r for r in cluster.replicas if not (spare_own_replica and r.replica_id == replica_id)
        ]


# --- raw connections --------------------------------------------------------------------------


class HandshakeRefused(Exception):
    pass


SOURCE_ADDRESS: str | None = None  # the attacker's own address (--source), None: any


async def _connect(host: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port, local_address=SOURCE_ADDRESS)


async def _read_frame(
    stream: trio.SocketStream,
    decoder: FrameDecoder | SessionReader,
    counters: Counters | None = None,
) -> bytes:
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        data = await stream.receive_some(65536)
        if not data:
            raise HandshakeRefused("eof")
        if counters is not None:
            counters.bytes_in += len(data)
        decoder.append(data)


class Link:
    """An authenticated connection to a replica: the stream and its session (every frame
    after the handshake is sealed, see runtime/transport.py)."""

    def __init__(
        self, stream: trio.SocketStream, sealer: SessionCipher, reader: SessionReader
    ) -> None:
        self.stream = stream
        self.sealer = sealer
        self.reader = reader

    def seal(self, payload: bytes) -> bytes:
        """The frame carrying `payload` on this connection (each uses up a nonce)."""
        return self.sealer.seal_frame(payload)


async def authenticate(
    host: str, port: int, me: Principal, key: SigningKey, server: Principal
) -> Link:
    """The connecting side of the transport's handshake (runtime/transport.py), by hand."""
    stream = await _connect(host, port)
    try:
        with trio.fail_after(IO_TIMEOUT_S):
            decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
            hello = await _read_frame(stream, decoder)
            if hello[:1] != b"H" or len(hello) < 2 or hello[1] != HANDSHAKE_VERSION:
                raise HandshakeRefused("bad hello")
            server_bytes = hello[2 + NONCE_SIZE : -EPHEMERAL_SIZE]
            if decode_principal(server_bytes) != server:
                raise HandshakeRefused("wrong server")
            ephemeral, ephemeral_public = ephemeral_key(secrets.token_bytes(32))
            unsigned = (
                b"A" + encode_principal(me) + secrets.token_bytes(NONCE_SIZE) + ephemeral_public
            )
            transcript = transcript_hash(hello, unsigned)
            await stream.send_all(encode_frame(unsigned + key.sign(HANDSHAKE_DOMAIN, transcript)))
            accept = await _read_frame(stream, decoder)
            if accept[:1] != b"K":  # (its signature is the replica's business to get right)
                raise HandshakeRefused("no accept")
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(hello[-EPHEMERAL_SIZE:]))
            outbound, inbound = session_keys(shared, transcript)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    # Replies from a replica are read with a replica's limit (a client's is smaller).
    reader = SessionReader(decoder, SessionCipher(inbound), MAX_FRAME_BYTES)
    return Link(stream, SessionCipher(outbound), reader)


async def _drain(link: Link, counters: Counters) -> None:
    """Read (and count) whatever the replica sends back, so it is never blocked on us.
    Frames are told apart by type: catch-up answers (a CHECKPOINT-STATE or COMMIT-
    CERTIFICATE) are what an amplification attack asks for; the rest (heartbeats, votes
    for the replica whose key we hold) would go to that replica anyway. Counted as they
    went over the wire (sealed)."""
    try:
        while True:
            data = await link.stream.receive_some(1 << 20)
            if not data:
                return
            counters.bytes_in += len(data)
            link.reader.append(data)
            while (frame := link.reader.next_frame()) is not None:
                wire_size = FRAME_HEADER_SIZE + len(frame) + SESSION_TAG_SIZE
                counters.received[_frame_type(frame)] += wire_size
    except (trio.BrokenResourceError, trio.ClosedResourceError, SessionError):
        return


def _frame_type(frame: bytes) -> str:
    try:
        envelope, _ = peek(frame)
        return MessageType(envelope.type_code).name.lower()
    except (Rejected, ValueError):
        return "unreadable"


async def _flood_connection(
    ctx: Context,
    host: str,
    port: int,
    me: Principal,
    key: SigningKey,
    server: Principal,
    frames: Callable[[], bytes],
    label: str,
    deadline: float,
    pause_s: float = 0.0,
) -> None:
    """Keep one authenticated connection and write `frames()` (payloads, sealed here) as
    fast as it takes them, reconnecting whenever the replica closes it, until the deadline."""
    counters = ctx.counters
    while trio.current_time() < deadline:
        try:
            link = await authenticate(host, port, me, key, server)
        except (OSError, HandshakeRefused, trio.TooSlowError, trio.BrokenResourceError):
            counters.errors[f"{label}_handshake_failed"] += 1
            await trio.sleep(0.05)
            continue
        counters.sent["handshakes_ok"] += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, link, counters)
                with trio.move_on_at(deadline):
                    while True:
                        frame = link.seal(frames())
                        await link.stream.send_all(frame)
                        counters.sent[label] += 1
                        counters.bytes_out += len(frame)
                        if pause_s:
                            await trio.sleep(pause_s)
                        else:
                            await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            counters.errors[f"{label}_connection_closed"] += 1
        finally:
            await trio.aclose_forcefully(link.stream)


# --- 1. handshake_flood -----------------------------------------------------------------------


async def handshake_flood(ctx: Context, seconds: float) -> None:
    """Per replica: HANDSHAKE_CONNECTS_PER_S plain TCP connects a second that never say a
    word, plus BAD_AUTH_WORKERS loops that read HELLO and answer with a well-formed AUTH
    naming a real client but carrying a random ephemeral key and signature."""
    deadline = trio.current_time() + seconds
    counters = ctx.counters

    async def silent(host: str, port: int) -> None:
        open_now = 0

        async def hold() -> None:
            nonlocal open_now
            try:
                stream = await _connect(host, port)
            except OSError:
                counters.errors["connect_failed"] += 1
                return
            counters.sent["silent_connects"] += 1
            open_now += 1
            try:
                with trio.move_on_after(HANDSHAKE_HOLD_S):
                    while await stream.receive_some(4096):  # HELLO, then the replica's EOF
                        pass
                    counters.sent["silent_closed_by_replica"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                counters.sent["silent_closed_by_replica"] += 1
            finally:
                open_now -= 1
                await trio.aclose_forcefully(stream)

        async with trio.open_nursery() as nursery:
            interval = 1.0 / HANDSHAKE_CONNECTS_PER_S
            next_at = trio.current_time()
            while next_at < deadline:
                if open_now < MAX_SILENT_PER_REPLICA:
                    nursery.start_soon(hold)
                else:
                    counters.errors["silent_fd_cap"] += 1
                next_at += interval
                await trio.sleep_until(next_at)
            nursery.cancel_scope.cancel()

    async def bad_auth(host: str, port: int, server: Principal) -> None:
        forged_principal = encode_principal(("client", ctx.client_id))
        while trio.current_time() < deadline:
            try:
                stream = await _connect(host, port)
            except OSError:
                counters.errors["connect_failed"] += 1
                await trio.sleep(0.01)
                continue
            try:
                with trio.fail_after(IO_TIMEOUT_S):
                    decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
                    await _read_frame(stream, decoder)
                    auth = (
                        b"A"
                        + forged_principal
                        + secrets.token_bytes(NONCE_SIZE)
                        + secrets.token_bytes(EPHEMERAL_SIZE)
                        + secrets.token_bytes(64)
                    )
                    frame = encode_frame(auth)
                    await stream.send_all(frame)
                    counters.sent["bad_auth"] += 1
                    counters.bytes_out += len(frame)
                    await stream.receive_some(4096)  # the replica closes (no reason given)
            except (HandshakeRefused, trio.TooSlowError, trio.BrokenResourceError, OSError):
                counters.errors["bad_auth_io"] += 1
            finally:
                await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for replica in ctx.targets:
            nursery.start_soon(silent, replica.host, replica.port)
            for _ in range(BAD_AUTH_WORKERS):
                nursery.start_soon(
                    bad_auth, replica.host, replica.port, ("replica", replica.replica_id)
                )


# --- 2. decode_bomb ---------------------------------------------------------------------------


def decode_bombs() -> list[tuple[str, bytes]]:
    """Frames a client connection may carry, each at most the frame limit, that are valid
    msgpack but cost the parser as much as possible before any check can refuse them.
    Each comes at two sizes: the transport's frame limit (16 MiB) and 64 KiB (the limit a
    replica may set for client connections), so the attack fits either."""
    bombs = []
    for suffix, size in (("", BOMB_BYTES), ("_64k", SMALL_BOMB_BYTES)):
        # Deeply nested empty arrays: [[[[...]]]].
        bombs.append((f"nested_arrays{suffix}", b"\x91" * (size - 1) + b"\x90"))
        # Wide and nested: an array of arrays of 15 empty arrays (16 Mi Python lists at
        # 16 MiB).
        wide = b"\x9f" + b"\x90" * 15
        count = min((size - 5) // len(wide), 1 << 20)
        bombs.append((f"wide_arrays{suffix}", b"\xdd" + count.to_bytes(4, "big") + wide * count))
        # A huge map up to the size: small int keys, nil values.
        entries = (size - 5) // 2
        bombs.append(
            (f"huge_map{suffix}", b"\xdf" + entries.to_bytes(4, "big") + b"\x01\xc0" * entries)
        )
    # A map announcing 2**32 - 1 entries, and an array of 2**20 nils.
    bombs.append(("announced_map", b"\xdf\xff\xff\xff\xff" + b"\x00" * 1024))
    bombs.append(("nil_array", b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\xc0" * (1 << 20)))
    return bombs  # payloads: sealed per connection


async def decode_bomb(ctx: Context, seconds: float) -> None:
    """From a real client connection to every replica, send the bombs round robin. A
    replica that closes the connection on a bomb over 64 KiB (a client frame limit) gets
    only the 64 KiB ones from then on, so the attack keeps the connection busy either way."""
    deadline = trio.current_time() + seconds
    bombs = decode_bombs()
    small = [(name, payload) for name, payload in bombs if len(payload) <= SMALL_BOMB_BYTES]
    me: Principal = ("client", ctx.client_id)
    counters = ctx.counters

    async def bomb(host: str, port: int, server: Principal) -> None:
        index = 0
        big_refused = False
        while trio.current_time() < deadline:
            try:
                link = await authenticate(host, port, me, ctx.client_key, server)
            except (OSError, HandshakeRefused, trio.TooSlowError, trio.BrokenResourceError):
                counters.errors["bombs_handshake_failed"] += 1
                await trio.sleep(0.05)
                continue
            counters.sent["handshakes_ok"] += 1
            name, payload = "", b""
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, link, counters)
                    with trio.move_on_at(deadline):
                        while True:
                            choices = small if big_refused else bombs
                            name, payload = choices[index % len(choices)]
                            index += 1
                            frame = link.seal(payload)
                            await link.stream.send_all(frame)
                            counters.sent[f"bomb_{name}"] += 1
                            counters.bytes_out += len(frame)
                    nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                counters.errors[f"closed_on_{name}"] += 1
                if len(payload) > SMALL_BOMB_BYTES:
                    big_refused = True
            finally:
                await trio.aclose_forcefully(link.stream)

    async with trio.open_nursery() as nursery:
        for replica in ctx.targets:
            nursery.start_soon(bomb, replica.host, replica.port, ("replica", replica.replica_id))


# --- 3. client_flood --------------------------------------------------------------------------


def _own_accounts(ctx: Context) -> tuple[str, str]:
    owned = sorted(n for n, a in ctx.cluster.accounts.items() if a.owner == ctx.client_id)
    other = sorted(n for n, a in ctx.cluster.accounts.items() if a.owner != ctx.client_id)
    return owned[0], other[0]


def signed_requests(ctx: Context, count: int, first_id: int) -> list[bytes]:
    payer, payee = _own_accounts(ctx)
    return [
        seal(Request(ctx.client_id, first_id + i, "transfer", payer, payee, 1), ctx.client_key)
        for i in range(count)
    ]


async def _flood_every_replica(
    ctx: Context,
    me: Principal,
    frames_for_one: Callable[[], Callable[[], bytes]],
    label: str,
    deadline: float,
    pause_s: float = 0.0,
) -> None:
    """One connection as `me` (with its key: the client's or the replica's) per target
    replica, each writing `frames_for_one()`'s frames, `pause_s` apart."""
    key = ctx.client_key if me[0] == "client" else ctx.replica_key
    async with trio.open_nursery() as nursery:
        for replica in ctx.targets:
            nursery.start_soon(
                _flood_connection,
                ctx,
                replica.host,
                replica.port,
                me,
                key,
                ("replica", replica.replica_id),
                frames_for_one(),
                label,
                deadline,
                pause_s,
            )


async def client_flood(ctx: Context, seconds: float, requests: list[bytes]) -> None:
    """One client key, distinct signed payments (new request ids), as fast as the sockets
    take them, to every replica (the same request to each, like a client that gave up on
    the primary)."""
    deadline = trio.current_time() + seconds
    me: Principal = ("client", ctx.client_id)

    def cycling() -> Callable[[], bytes]:
        index = 0

        def next_request() -> bytes:
            nonlocal index
            frame = requests[index % len(requests)]
            index += 1
            return frame

        return next_request

    await _flood_every_replica(ctx, me, cycling, "requests", deadline)


# --- 4. replay --------------------------------------------------------------------------------


async def _decide_once(ctx: Context, payload: bytes) -> None:
    """Send one request to every replica and wait until f + 1 replies came back."""
    async with trio.open_nursery() as nursery:
        replies = 0
        done = trio.Event()

        async def one(replica_id: int, host: str, port: int) -> None:
            nonlocal replies
            link = await authenticate(
                host, port, ("client", ctx.client_id), ctx.client_key, ("replica", replica_id)
            )
            try:
                await link.stream.send_all(link.seal(payload))
                await _read_frame(link.stream, link.reader)
                replies += 1
                if replies >= ctx.cluster.config.weak_quorum:
                    done.set()
            finally:
                await trio.aclose_forcefully(link.stream)

        for replica in ctx.targets:
            nursery.start_soon(one, replica.replica_id, replica.host, replica.port)
        with trio.fail_after(30):
            await done.wait()
        nursery.cancel_scope.cancel()


async def replay(ctx: Context, seconds: float, decided: bytes) -> None:
    """One decided request, replayed as fast as the sockets take it, to every replica."""
    deadline = trio.current_time() + seconds
    me: Principal = ("client", ctx.client_id)
    await _flood_every_replica(ctx, me, lambda: lambda: decided, "replays", deadline)


# --- 5. catchup_amplification -----------------------------------------------------------------


async def catchup_amplification(ctx: Context, seconds: float) -> None:
    """Holding replica `ctx.replica_id`'s key, a third of the time each, to every other
    replica: replay one old signed PREPARE (seq 1, long executed: the replica takes the
    sender for a laggard and sends it catch-up), one FETCH(from_seq=1, stable_seq=0), and
    one STATE_REQUEST(seq=0, start=0) (the first chunk of the current checkpoint). Bytes are
    counted per third: the amplification is the catch-up answers the replicas sent back
    (CHECKPOINT, CHECKPOINT-STATE, STATE-CHUNK, COMMIT-CERTIFICATE, NEW-VIEW frames) per byte
    the attacker sent."""
    me: Principal = ("replica", ctx.replica_id)
    prepare = seal(Prepare(0, 1, ctx.replica_id, b"\x01" * 32), ctx.replica_key)
    fetch = seal(Fetch(ctx.replica_id, 1, 0, 0), ctx.replica_key)
    # Chunked state transfer: the first chunk of whatever checkpoint the replica holds.
    state_request = seal(StateRequest(ctx.replica_id, 0, 0), ctx.replica_key)
    counters = ctx.counters
    # CHECKPOINT too: unsolicited help below a stable checkpoint is one (the replicas'
    # ordinary checkpoint broadcasts to this replica are then counted as well: an upper bound).
    catch_up = ("checkpoint", "checkpoint_state", "commit_certificate", "state_chunk", "new_view")
    # Paced at the replicas' per-requester limits (a faster attacker only gets more of its
    # frames dropped, which lowers its ratio): unsolicited help once per retransmit
    # interval, a FETCH answered once per half interval.
    interval_s = ctx.cluster.config.retransmit_interval_ms / 1000
    for label, frame, pause_s in (
        ("old_prepare", prepare, interval_s),
        ("fetch_stable_0", fetch, interval_s / 2),
        ("state_request_0", state_request, interval_s / 2),
    ):
        before_out = counters.bytes_out
        before_in = sum(counters.received[kind] for kind in catch_up)
        deadline = trio.current_time() + seconds / 3
        await _flood_every_replica(
            ctx, me, lambda frame=frame: lambda: frame, label, deadline, pause_s
        )
        sent = counters.bytes_out - before_out
        received = sum(counters.received[kind] for kind in catch_up) - before_in
        counters.extra[f"{label}_bytes_out"] = sent
        counters.extra[f"{label}_bytes_in"] = received
        counters.extra[f"{label}_amplification"] = round(received / sent, 1) if sent else None


# --- the attacker process ---------------------------------------------------------------------

ATTACKS = (
    "handshake_flood",
    "decode_bomb",
    "client_flood",
    "replay",
    "catchup_amplification",
)


async def _prepare(name: str, ctx: Context, seconds: float) -> Callable[[float], Awaitable[None]]:
    """Everything done before the attack window (signing, building bombs)."""
    if name == "handshake_flood":
        return lambda seconds: handshake_flood(ctx, seconds)
    if name == "decode_bomb":
        return lambda seconds: decode_bomb(ctx, seconds)
    if name == "client_flood":
        # Distinct ids for the whole attack at the rate a socket takes them (then it cycles).
        count = int(min(CLIENT_FLOOD_REQUESTS, max(1000, 2000 * seconds)))
        requests = signed_requests(ctx, count, time.time_ns() // 1000)
        return lambda seconds: client_flood(ctx, seconds, requests)
    if name == "replay":
        (decided,) = signed_requests(ctx, 1, time.time_ns() // 1000)
        await _decide_once(ctx, decided)
        return lambda seconds: replay(ctx, seconds, decided)
    if name == "catchup_amplification":
        return lambda seconds: catchup_amplification(ctx, seconds)
    raise ValueError(f"unknown attack {name!r}")


async def _main(name: str, ctx: Context, seconds: float) -> dict[str, object]:
    attack = await _prepare(name, ctx, seconds)
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    started = time.monotonic()
    await attack(seconds)
    return ctx.counters.as_json(time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.adversary")
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--client", type=int, required=True, help="the attacker's client key")
    parser.add_argument("--replica", type=int, required=True, help="the replica key it holds")
    parser.add_argument("--source", help="connect from this local address (e.g. 127.0.0.2)")
    arguments = parser.parse_args(argv)
    global SOURCE_ADDRESS
    SOURCE_ADDRESS = arguments.source
    os.nice(ATTACKER_NICE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = Context(
        load_cluster(arguments.cluster),
        arguments.client,
        arguments.replica,
        spare_own_replica=arguments.attack == "catchup_amplification",
    )
    result = trio.run(_main, arguments.attack, ctx, arguments.seconds)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
