"""TCP transport for the trio runtime: authenticated, encrypted, framed connections.

The protocol core hands the driver sealed envelopes as bytes and wants bytes back, tagged
with who sent them. This module carries them: `Transport.send(principal, data)` queues a
frame for a peer and returns at once; frames from peers come out of `Transport.inbound` as
`(principal, bytes)`. The transport does not look inside frames: it only knows which
authenticated connection a frame arrived on. The core must still `open_envelope` every
frame: a replica can relay bytes signed by someone else, and a principal's own connection
is only as honest as the principal.

Framing: `runtime.framing` (u32 big-endian length + payload, at most MAX_FRAME_BYTES).

Handshake (version 2)
---------------------
A connection is authenticated both ways, and a session key pair agreed, before any data
frame is accepted. All three messages are frames of at most HANDSHAKE_MAX_FRAME_BYTES;
every integer is big-endian::

    principal = role (u8: 0 replica, 1 client) | id (u64)                      -- 9 bytes

    1. accepting side -> connecting side
       HELLO  = b"H" | version (u8, = 2) | server nonce (32 random bytes) | server principal
                | server ephemeral (32: an X25519 public key, fresh for this connection)
    2. connecting side -> accepting side
       AUTH   = b"A" | client principal | client nonce (32 random bytes)
                | client ephemeral (32: X25519, fresh) | signature (64)
                signature = sign(b"pbft/v2/handshake", transcript)
    3. accepting side -> connecting side
       ACCEPT = b"K" | signature (64)
                signature = sign(b"pbft/v2/handshake-accept", transcript)

    transcript = SHA-256(HELLO | AUTH without its signature)      -- both messages as sent
    shared     = X25519(own ephemeral secret, peer's ephemeral)    -- all zero: refused
    keys       = HKDF-SHA256(shared, salt none, info b"pbft/v2/session" | transcript, 64)
    client -> server key = keys[:32], server -> client key = keys[32:]

(`sign(domain, payload)` is `crypto.keys.SigningKey.sign`: Ed25519 over the domain-separated
signing input of crypto.signing.) The transcript covers the version byte, both nonces, both
ephemeral keys and both principals, so each signature binds its signer to this one
exchange with this one peer: a man in the middle who swaps an ephemeral key, the version
or a nonce breaks both signatures; naming the peer inside what is signed defeats the
identity-misbinding attack on signed Diffie-Hellman; and the two domains keep one side's
signature from being reflected as the other's. Fresh nonces and ephemerals on both sides
make a recorded handshake useless on any other connection (a replayed AUTH fails against
the new HELLO; replaying both halves gets no key: the ephemeral secrets are gone).
The connecting side checks that HELLO names the principal it meant to reach *before* it
signs anything (else a peer it dials could relay its AUTH to a third party); the
accepting side checks AUTH against the KeyRing (its own principal, an unknown principal,
a bad signature: refused); the connecting side checks ACCEPT against the key of the
principal it dialled.
A HELLO or an AUTH of another version (version 1: a 43-byte HELLO with version byte 1, a
106-byte AUTH) is refused as `version`, never served in the clear. The whole handshake
has one deadline (`handshake_timeout`), handshake frames have their own size limit, and
every message must be exactly the length above. A refused handshake just closes the
connection (no reason is sent back) and is counted in `handshakes_failed[reason]`.

Session
-------
After the handshake every frame, both ways, is sealed with ChaCha20-Poly1305 under the
key of its direction::

    frame      = length (u32: len(ciphertext)) | ciphertext
    ciphertext = ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated data = length)
    nonce      = 4 zero bytes | counter (u64)   -- 0 for a direction's first frame, +1 each

Each side keeps one counter per direction, so a nonce is never used twice under a key and
the receiver knows which nonce the next frame must have: a frame altered, injected,
reordered or replayed (from this connection or another: other keys) fails to open, and
so does the one after a frame dropped on the path. Such a frame is never delivered; it
closes the connection, counted in
`closes["session_auth_failed"]`. A counter never wraps: at 2**64 frames the connection is
closed (`session_exhausted`) and redialled, with new keys. The size limits below are
plaintext limits; a sealed frame is 16 bytes (the tag) longer, and the decoder's limit is
the plaintext limit plus 16 (at most 2**31 - 1, the most ChaCha20Poly1305 takes at
once). The ephemeral secrets are dropped once the keys are derived, so a key stolen later
does not open recorded traffic (forward secrecy).

Why this and not TLS or Noise: the principals are raw Ed25519 keys from the cluster file.
Python's `ssl` only authenticates through X.509 certificates, so TLS 1.3 would need a CA
(or self-signed certificates pinned by hand) per cluster, and it offers no way to bind an
application signature to the channel instead: no keying-material exporter (RFC 8446
7.5), and its one channel binding, tls-unique, is undefined for TLS 1.3. The Python Noise
libraries (noiseprotocol, dissononce) have had no release since 2020 and 2019. The
handshake above is signed ephemeral Diffie-Hellman as in ISO/IEC 9798-3: each side signs
both ephemerals, both nonces and the peer's identity (all in the transcript). Krawczyk's
SIGMA paper analyses this as the "ISO protocol"; SIGMA proper signs only the ephemerals
and MACs its own identity under a derived key instead. It is built from the primitives
`cryptography` already provides for our signatures: X25519, HKDF-SHA256,
ChaCha20-Poly1305.

Frames a connecting side pipelines right behind its AUTH are read only once AUTH has been
verified, under the data frame limit (the handshake limit applies to handshake frames only);
our own connecting side sends nothing before it has checked ACCEPT. After the handshake a
connection to or from a client carries frames of at most `client_max_frame_bytes` (64 KiB:
a client's messages and the replies to them are a few hundred bytes), one between replicas
`max_frame_bytes`.

Admission
---------
Anyone can open a TCP connection, so what an unauthenticated one may cost is bounded:

- Rate: at most `accept_rate_per_address` connections a second from one IP address (after
  a burst of `accept_burst_per_address`) are served; the rest are reset right after
  accept(), before any task, key or HELLO exists for them (`handshakes_failed
  ["accept_rate"]`). An address a replica is known at draws on a bucket of its own
  instead, `accept_rate_replica_address` (ten times larger by default): a replica
  redialling after a flood of strangers from elsewhere is not kept out, and whatever else
  runs on a replica's address, or a Byzantine replica making an address its own, is still
  limited. Correct clients connect once per session, far below it.
- Slots: at most `max_pending_handshakes` connections in their handshake at a time, and
  `max_pending_per_address` of them from one IP address, so one host cannot take them all.
  Beyond those, `reserved_handshakes` more slots in which only a replica of the key ring may
  finish (a client's AUTH there is refused before its signature is checked). When they are
  full too, a newcomer evicts a reserved connection that has not sent its AUTH yet (the
  oldest from the address holding most of them). A replica sends AUTH one round trip after
  HELLO, so strangers who connect and stay silent, at any rate, cannot keep it out; a
  connection that finds nothing to evict is closed at once (`too_many_pending`).
- Time: the whole handshake must be done within `handshake_timeout`.
- CPU: three public-key operations per handshake (measured on the 2-core development
  machine under load: X25519 key generation and exchange about 0.1 ms each, an Ed25519
  check about 0.2 ms). Every connection given a slot costs one key generation for its
  HELLO, bounded by the slots and the accept rate (per address, see Rate above). The
  Ed25519 check of an AUTH is done only for an AUTH of the exact length naming a principal
  of the key ring allowed in its slot, and at most `verify_rate_per_address` times a
  second per address and `verify_rate_total` times a second in all (token buckets; beyond
  them the handshake fails `rate_limited`). That shared budget is the strangers' to spend
  too, from as many addresses as they have, so an AUTH naming a replica from the address
  it is known at (the IP address we dial it at, or where it last authenticated from) draws
  on a bucket of that replica's own instead (`verify_rate_per_address`): a flood cannot
  keep a replica out, and costs at most that many more checks a second per replica of the
  ring. The X25519 exchange follows only a signature that verified, so it is bounded by
  the same buckets (at most one per `handshake_verifications`). After the handshake,
  opening a frame costs about 1 us plus 0.5 ms per MiB (ChaCha20-Poly1305), paid by the
  sender too.

Guarantees
----------
- `send` is a plain function: it never waits, whatever the peer does. Each peer has a
  FIFO bounded in frames (`peer_queue_size`) and in bytes (`peer_queue_bytes`, or
  `client_queue_bytes` for a client); when it is full the oldest queued frames (or the new
  one, `overflow="drop_newest"`) are dropped and counted as `drops["peer_queue_full"]`.
  Frames queue while a peer is unreachable and go out, in order, once it is connected.
- Per-peer state does not outlive a peer we do not dial (a client): once it has had no
  connection for `idle_peer_timeout`, its entry, queue and writer task are freed (queued
  frames are counted as `drops["peer_gone"]`). Peers we dial keep theirs.
- Frames queued for a peer while its writer was busy (every message of one core step, for
  a replica) go out sealed in one socket write, up to 64 KiB of them (`writes_out` counts
  the writes). Streams have TCP_NODELAY set (trio sets it on every TCP stream), so a small
  write leaves at once instead of waiting on Nagle's algorithm for the previous ACK.
- A frame is written at most once. A frame being written when its connection fails is
  lost (`drops["connection_lost"]`), never retried (no duplicates from the transport).
  A write that takes longer than `send_timeout` closes that connection.
- Frames from one connection are delivered in order. With two live connections to one
  peer (it dialled us and we dialled it), we send on the newest and read from both.
- Nothing a peer sends can crash the transport or touch another connection: garbage or
  oversized frames in the handshake fail it; an oversized length or a frame that does
  not open (see "Session") later closes the connection; a frame not completed within
  `frame_timeout` of its first byte closes the connection (slowloris); a handshake not
  done within `handshake_timeout` fails it.
  Unauthenticated connections are limited as described under "Admission", and a
  principal has at most one inbound connection (a new one replaces the old: this is also
  how a restarted peer gets back in).
- `connect_to` redials forever with exponential backoff and jitter, bounded by
  `backoff_max`; the backoff restarts after every successful handshake.
- Structured concurrency: every task runs in the nursery of `run()` (or of
  `async with transport:`); cancelling it closes every socket and listener and ends
  `inbound` (the owner's `async for` loop finishes).

Inbound scheduling and backpressure: `inbound` is a `runtime.inbound.InboundScheduler`,
one queue per principal, bounded in frames (`inbound_queue_size`) and in bytes
(`inbound_queue_bytes` for a replica, `client_inbound_bytes` for a client; one frame always
fits). The owner takes replicas' frames first, then clients' in deficit round robin, so one
peer's flood gets its share of the owner and no more. When a peer's queue is full, the
readers of its connections wait, so TCP pushes back on that peer alone (nothing is dropped
on input; counted as `inbound_backpressure`); a client's readers also wait beyond
`client_inbound_rate` frames a second. The per-frame deadline is measured from the
first byte read after the previous frame was delivered, so time spent waiting on our own
owner never counts against a peer.

Limits
------
The session hides what frames say and proves who sent them on this connection; it does
not hide their sizes and timing, and an attacker on the path can still cut a connection
(it is then redialled). Authentication here decides who is accounted for (and replaced,
and counted), not what a message proves: the core still checks every signature. Dead
peers that vanish without a FIN or RST are detected by TCP keepalive (enabled) or by a
write timing out.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import math
import random
import secrets
import socket
import struct
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Literal

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crypto.keys import KeyRing, Principal, SigningKey, check_principal
from runtime.buckets import TokenBuckets
from runtime.framing import (
    FRAME_HEADER_SIZE,
    MAX_FRAME_BYTES,
    FrameDecoder,
    FramingError,
    encode_frame,
    frame_header,
)
from runtime.inbound import InboundScheduler
from runtime.nurseries import raise_lone

__all__ = [
    "EPHEMERAL_SIZE",
    "HANDSHAKE_ACCEPT_DOMAIN",
    "HANDSHAKE_DOMAIN",
    "HANDSHAKE_MAX_FRAME_BYTES",
    "HANDSHAKE_VERSION",
    "NONCE_SIZE",
    "SESSION_TAG_SIZE",
    "SessionCipher",
    "SessionError",
    "SessionReader",
    "Transport",
    "TransportConfig",
    "TransportStatistics",
    "backoff_delay",
    "decode_principal",
    "encode_principal",
    "ephemeral_key",
    "session_keys",
    "transcript_hash",
]

logger = logging.getLogger(__name__)

HANDSHAKE_VERSION: Final = 2
HANDSHAKE_DOMAIN: Final = b"pbft/v2/handshake"
HANDSHAKE_ACCEPT_DOMAIN: Final = b"pbft/v2/handshake-accept"
SESSION_KEY_INFO: Final = b"pbft/v2/session"
HANDSHAKE_MAX_FRAME_BYTES: Final = 1024
NONCE_SIZE: Final = 32
EPHEMERAL_SIZE: Final = 32  # an X25519 public key
SIGNATURE_SIZE: Final = 64
SESSION_TAG_SIZE: Final = 16  # Poly1305
_COUNTER_LIMIT: Final = 2**64  # a direction's frames; its nonce counter never reaches it
_AEAD_MAX_BYTES: Final = 2**31 - 1  # the most `cryptography`'s ChaCha20Poly1305 takes at once

_PRINCIPAL: Final = struct.Struct(">BQ")
PRINCIPAL_SIZE: Final = _PRINCIPAL.size  # 9
_ROLE_CODES: Final = {"replica": 0, "client": 1}
_ROLES_BY_CODE: Final = {code: role for role, code in _ROLE_CODES.items()}

_HELLO: Final = b"H"
_AUTH: Final = b"A"
_ACCEPT: Final = b"K"
_HELLO_SIZE: Final = 2 + NONCE_SIZE + PRINCIPAL_SIZE + EPHEMERAL_SIZE  # 75
_AUTH_SIZE: Final = 1 + PRINCIPAL_SIZE + NONCE_SIZE + EPHEMERAL_SIZE + SIGNATURE_SIZE  # 138
_ACCEPT_SIZE: Final = 1 + SIGNATURE_SIZE  # 65
_V1_AUTH_SIZE: Final = 1 + PRINCIPAL_SIZE + NONCE_SIZE + SIGNATURE_SIZE  # 106

_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
# accept() errors: out of descriptors or memory (wait and retry), or a connection that went
# before it was accepted (skip it), as trio.serve_listeners and SocketListener treat them.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_IGNORED_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
_ACCEPT_RETRY_S: Final = 0.1

# Frames up to this size are written with one send_all (header and payload copied together);
# bigger ones as two writes, so a 16 MiB payload is never copied just to prepend 4 bytes.
_COALESCE_LIMIT: Final = 64 * 1024


# --- configuration and statistics -------------------------------------------------------------


@dataclass(frozen=True)
class TransportConfig:
    """Limits and timeouts (seconds). The defaults suit a LAN cluster; tests shorten them."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    # A client only ever sends REQUESTs and BALANCE_QUERYs (a few hundred bytes each). 64 KiB
    # leaves a hundredfold margin, is one receive chunk, and bounds what decoding one client
    # frame can cost (at most 64 Ki msgpack objects) and what a client connection buffers.
    client_max_frame_bytes: int = 64 * 1024
    handshake_max_frame_bytes: int = HANDSHAKE_MAX_FRAME_BYTES
    handshake_timeout: float = 3.0  # a whole handshake, every message sent and awaited
    frame_timeout: float = 10.0  # from a frame's first byte to its last
    send_timeout: float = 10.0  # one frame's write; longer closes the connection
    connect_timeout: float = 5.0  # TCP connect when dialling
    peer_queue_size: int = 256  # frames queued per peer
    peer_queue_bytes: int = 64 * 1024 * 1024  # payload bytes queued per replica peer
    client_queue_bytes: int = 1024 * 1024  # payload bytes queued per client peer
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    inbound_queue_size: int = 1024  # frames waiting for the owner, per peer
    inbound_queue_bytes: int = 64 * 1024 * 1024  # their payload bytes, per replica peer
    # ... per client peer: a correct client has at most client_pending_limit (128) requests
    # of a few hundred bytes outstanding. Bounds the memory of all clients' queues together
    # to this times the clients in the key ring.
    client_inbound_bytes: int = 256 * 1024
    # A client's frames are paced beyond this many a second (after a burst): a flood costs
    # a replica at most this much, correct clients send far less (runtime/inbound.py).
    client_inbound_rate: float = 400.0
    client_inbound_burst: int = 400
    max_pending_handshakes: int = 256  # unauthenticated inbound connections at a time
    max_pending_per_address: int = 8  # of those, from one IP address
    # Handshakes beyond both caps, open to replicas only: a flood of strangers cannot keep
    # a replica of the cluster out (see "Admission" in the module docstring).
    reserved_handshakes: int = 8
    # TCP connections accepted per second per address (after a burst), checked on accept
    # before anything else: beyond it a connection is reset without a task, a key or a
    # HELLO. An address a replica is known at has a larger bucket of its own (the next two).
    accept_rate_per_address: float = 20.0
    accept_burst_per_address: int = 40
    accept_rate_replica_address: float = 200.0
    accept_burst_replica_address: int = 400
    verify_rate_per_address: float = 20.0  # AUTH signatures checked per second per address
    verify_burst_per_address: int = 20
    verify_rate_total: float = 500.0  # ... and from all addresses together
    verify_burst_total: int = 200
    idle_peer_timeout: float = 5.0  # a peer we do not dial is forgotten this long after
    # its last connection closed (its queue, its writer task)
    backoff_initial: float = 0.1  # first redial delay
    backoff_max: float = 5.0  # no redial delay is longer
    backoff_jitter: float = 0.5  # a delay is drawn from [(1 - jitter) * d, d]
    receive_chunk_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "client_max_frame_bytes",
            "handshake_max_frame_bytes",
            "peer_queue_size",
            "peer_queue_bytes",
            "client_queue_bytes",
            "inbound_queue_size",
            "inbound_queue_bytes",
            "client_inbound_bytes",
            "client_inbound_burst",
            "max_pending_handshakes",
            "max_pending_per_address",
            "accept_burst_per_address",
            "accept_burst_replica_address",
            "verify_burst_per_address",
            "verify_burst_total",
            "receive_chunk_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        value = self.reserved_handshakes
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"reserved_handshakes must be an int >= 0, got {value!r}")
        if self.max_frame_bytes > _AEAD_MAX_BYTES - SESSION_TAG_SIZE:
            # ChaCha20Poly1305 raises OverflowError beyond it: a send would crash the writer
            # and a peer's frame the reader. (It also keeps the length within the u32.)
            raise ValueError(
                f"max_frame_bytes (plus the session tag) must be at most {_AEAD_MAX_BYTES}"
            )
        if self.handshake_max_frame_bytes < _AUTH_SIZE:
            raise ValueError(f"handshake_max_frame_bytes must be at least {_AUTH_SIZE}")
        for name, frame_limit in (
            ("peer_queue_bytes", self.max_frame_bytes),
            ("client_queue_bytes", min(self.client_max_frame_bytes, self.max_frame_bytes)),
            ("inbound_queue_bytes", self.max_frame_bytes),
            ("client_inbound_bytes", min(self.client_max_frame_bytes, self.max_frame_bytes)),
        ):
            if getattr(self, name) < frame_limit:
                raise ValueError(f"{name} must hold at least one frame ({frame_limit} bytes)")
        for name in (
            "handshake_timeout",
            "frame_timeout",
            "send_timeout",
            "connect_timeout",
            "accept_rate_per_address",
            "accept_rate_replica_address",
            "verify_rate_per_address",
            "verify_rate_total",
            "client_inbound_rate",
            "idle_peer_timeout",
            "backoff_initial",
            "backoff_max",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.backoff_initial > self.backoff_max:
            raise ValueError("backoff_initial must not exceed backoff_max")
        if not 0 <= self.backoff_jitter <= 1:
            raise ValueError(f"backoff_jitter must be in 0..1, got {self.backoff_jitter!r}")
        if self.overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow must be drop_oldest or drop_newest: {self.overflow!r}")

    def frame_limit(self, principal: Principal, peer: Principal) -> int:
        """The largest data frame (plaintext) between `principal` and `peer`: the small
        client limit when either is a client (requests one way, replies the other), else the
        large one. Sealed on the wire, a frame is SESSION_TAG_SIZE bytes longer."""
        if principal[0] == "client" or peer[0] == "client":
            return min(self.client_max_frame_bytes, self.max_frame_bytes)
        return self.max_frame_bytes

    def queue_bytes(self, principal: Principal) -> int:
        return self.client_queue_bytes if principal[0] == "client" else self.peer_queue_bytes


@dataclass(frozen=True)
class TransportStatistics:
    """A snapshot. Frames and bytes count data frames only (payload bytes, not headers)."""

    connections: int  # authenticated connections open now
    connected_peers: int  # principals with at least one of them
    connections_accepted: int  # TCP connections accepted, before any handshake
    connections_dialed: int  # TCP connections we opened (connect succeeded)
    dial_failures: int  # connect attempts that failed (refused, unreachable, timed out)
    handshakes_ok: int
    handshakes_failed: Mapping[str, int] = field(default_factory=dict)  # by reason
    closes: Mapping[str, int] = field(default_factory=dict)  # authenticated, by reason
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    writes_out: int = 0  # socket writes that carried them (frames of a step are coalesced)
    drops: Mapping[str, int] = field(default_factory=dict)  # outgoing frames lost, by reason
    queued: int = 0  # frames waiting in peer queues now
    queued_bytes: int = 0  # their payload bytes
    inbound_queued: int = 0  # frames waiting for the owner now
    inbound_bytes: int = 0  # their payload bytes
    # Times a reader stopped reading its connection because its peer's inbound queue was
    # full (TCP backpressure), by class of peer (replica, client).
    inbound_backpressure: Mapping[str, int] = field(default_factory=dict)
    peers: int = 0  # principals with transport state (queue, writer task) now
    pending_handshakes: int = 0  # inbound connections in their handshake now
    handshake_verifications: int = 0  # AUTH signatures checked (each costs an Ed25519 verify)
    tasks: int = 0  # tasks in the transport's nursery now


# --- wire helpers -----------------------------------------------------------------------------


def encode_principal(principal: Principal) -> bytes:
    role, identifier = check_principal(principal)
    if identifier > 2**64 - 1:
        raise ValueError(f"principal id {identifier} does not fit 64 bits")
    return _PRINCIPAL.pack(_ROLE_CODES[role], identifier)


def decode_principal(raw: bytes) -> Principal:
    """The principal in 9 wire bytes; ValueError for a wrong length or unknown role."""
    if len(raw) != PRINCIPAL_SIZE:
        raise ValueError(f"principal must be {PRINCIPAL_SIZE} bytes, got {len(raw)}")
    code, identifier = _PRINCIPAL.unpack(raw)
    role = _ROLES_BY_CODE.get(code)
    if role is None:
        raise ValueError(f"unknown role code {code}")
    return (role, identifier)


def backoff_delay(
    attempt: int, initial: float, maximum: float, jitter: float, rng: random.Random
) -> float:
    """Delay before redial number `attempt` (0-based): initial * 2**attempt, capped at
    `maximum`, minus up to `jitter` of itself at random (so peers restarted together do
    not redial in lockstep). Always within [(1 - jitter) * initial, maximum]."""
    ceiling = min(maximum, initial * 2.0 ** min(max(attempt, 0), 64))
    return ceiling * (1.0 - jitter * rng.random())


class _HandshakeFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- the session ------------------------------------------------------------------------------


def ephemeral_key(secret: bytes) -> tuple[X25519PrivateKey, bytes]:
    """An X25519 key from 32 random bytes (`secrets.token_bytes`), and its public bytes."""
    private = X25519PrivateKey.from_private_bytes(secret)
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def transcript_hash(hello: bytes, auth_unsigned: bytes) -> bytes:
    """What both handshake signatures cover and the session keys are bound to: SHA-256 of
    the HELLO and of the AUTH without its signature, as they went over the wire."""
    return hashlib.sha256(hello + auth_unsigned).digest()


def session_keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) from the X25519 shared secret."""
    keys = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=None, info=SESSION_KEY_INFO + transcript
    ).derive(shared)
    return keys[:32], keys[32:]


class SessionError(FramingError):
    """A sealed frame that does not open (`session_auth_failed`), or a direction out of
    nonces (`session_exhausted`). A FramingError: the connection is lost for good, and the
    reader closes it and counts the reason like any broken framing."""

    def __init__(self, reason: str, length: int) -> None:
        Exception.__init__(self, f"{reason}: sealed frame of {length} bytes")
        self.reason = reason
        self.length = length
        self.maximum = 0


class SessionCipher:
    """One direction of a session: ChaCha20-Poly1305 under its key, nonces from a counter.

    The counter is the number of frames sealed (or opened) so far; both ends of the
    direction keep it in step, so each frame has exactly one nonce that opens it. It never
    wraps: at `_COUNTER_LIMIT` the cipher refuses (`session_exhausted`).
    """

    __slots__ = ("_aead", "counter")

    def __init__(self, key: bytes, counter: int = 0) -> None:
        if len(key) != 32:
            raise ValueError("a session key is 32 bytes")
        if not 0 <= counter <= _COUNTER_LIMIT:
            raise ValueError(f"counter must be in 0..2**64, got {counter}")
        self._aead = ChaCha20Poly1305(key)
        self.counter = counter

    def _next_nonce(self, length: int) -> bytes:
        if self.counter >= _COUNTER_LIMIT:
            raise SessionError("session_exhausted", length)
        nonce = b"\x00\x00\x00\x00" + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def seal(self, payload: bytes) -> tuple[bytes, bytes]:
        """(header, ciphertext) of the frame carrying `payload`; the header is the
        associated data. Uses up a nonce even if the frame is then never written."""
        header = frame_header(len(payload) + SESSION_TAG_SIZE)
        return header, self._aead.encrypt(self._next_nonce(len(payload)), payload, header)

    def seal_frame(self, payload: bytes) -> bytes:
        header, ciphertext = self.seal(payload)
        return header + ciphertext

    def open(self, ciphertext: bytes) -> bytes:
        """The payload of the next sealed frame (its bytes after the length), or
        SessionError: whatever fails, the nonce is spent and the connection must close."""
        nonce = self._next_nonce(len(ciphertext))
        if len(ciphertext) < SESSION_TAG_SIZE:
            raise SessionError("session_auth_failed", len(ciphertext))
        try:
            return self._aead.decrypt(nonce, ciphertext, frame_header(len(ciphertext)))
        except InvalidTag:
            raise SessionError("session_auth_failed", len(ciphertext)) from None


class SessionReader:
    """A FrameDecoder whose frames are opened as they come out: `next_frame` returns
    plaintext, or raises SessionError (a FramingError) for a frame that does not open.
    The decoder's limit is the plaintext limit plus the tag."""

    __slots__ = ("_cipher", "_decoder", "_failed")

    def __init__(self, decoder: FrameDecoder, cipher: SessionCipher, max_plaintext: int) -> None:
        decoder.max_frame_bytes = max_plaintext + SESSION_TAG_SIZE
        self._decoder = decoder
        self._cipher = cipher
        self._failed: SessionError | None = None

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    @property
    def max_frame_bytes(self) -> int:
        return self._decoder.max_frame_bytes - SESSION_TAG_SIZE

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.append(data)

    def next_frame(self) -> bytes | None:
        if self._failed is not None:
            raise self._failed
        frame = self._decoder.next_frame()
        if frame is None:
            return None
        try:
            return self._cipher.open(frame)
        except SessionError as error:
            self._failed = error
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self.append(data)
        return list(iter(self.next_frame, None))


class _Session:
    """What a handshake produces: the reader of inbound frames, the sealer of outbound."""

    __slots__ = ("reader", "sealer")

    def __init__(self, reader: SessionReader, sealer: SessionCipher) -> None:
        self.reader = reader
        self.sealer = sealer


# --- connections and peers --------------------------------------------------------------------


class _Connection:
    """One authenticated connection. The reader task owns it; `kill` asks it to close."""

    __slots__ = (
        "cancel_scope",
        "close_reason",
        "decoder",
        "direction",
        "principal",
        "sealer",
        "stream",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        principal: Principal,
        direction: Literal["in", "out"],
        session: _Session,
    ) -> None:
        self.stream = stream
        self.principal = principal
        self.direction = direction
        # Opens inbound frames; carries any bytes that arrived right behind the handshake.
        self.decoder = session.reader
        self.sealer = session.sealer
        self.cancel_scope = trio.CancelScope()
        self.close_reason: str | None = None

    @property
    def closing(self) -> bool:
        return self.close_reason is not None

    def kill(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.cancel_scope.cancel()

    async def send_frame(self, payload: bytes) -> None:
        try:
            header, ciphertext = self.sealer.seal(payload)
        except SessionError as error:  # out of nonces: this connection goes, a new one comes
            self.kill(error.reason)
            raise trio.ClosedResourceError(error.reason) from None
        if len(ciphertext) <= _COALESCE_LIMIT:
            await self.stream.send_all(header + ciphertext)
        else:
            await self.stream.send_all(header)
            await self.stream.send_all(ciphertext)

    def seal_batch(self, payloads: list[bytes]) -> tuple[bytes, int]:
        """The sealed frames of `payloads` joined for one write, and how many were sealed:
        fewer than given only if the session ran out of nonces (the connection is then
        killed; the frame that found no nonce is lost with it)."""
        sealed: list[bytes] = []
        for payload in payloads:
            try:
                header, ciphertext = self.sealer.seal(payload)
            except SessionError as error:
                self.kill(error.reason)
                break
            sealed.append(header)
            sealed.append(ciphertext)
        return b"".join(sealed), len(sealed) // 2


class _Peer:
    """A principal we may send to: its queue, its live connections, its writer task."""

    __slots__ = (
        "changed",
        "connections",
        "idle_since",
        "max_bytes",
        "max_frames",
        "principal",
        "queue",
        "queued_bytes",
    )

    def __init__(self, principal: Principal, max_frames: int, max_bytes: int, now: float) -> None:
        self.principal = principal
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.connections: list[_Connection] = []  # oldest first
        self.changed = trio.Event()
        self.idle_since: float | None = now  # when it last had no connection at all

    @property
    def active(self) -> _Connection | None:
        """The newest connection not being closed: the one we send on."""
        for connection in reversed(self.connections):
            if not connection.closing:
                return connection
        return None

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def pop(self) -> bytes:
        frame = self.queue.popleft()
        self.queued_bytes -= len(frame)
        return frame


class _Pending:
    """An inbound connection in its handshake: which pool it holds a slot in."""

    __slots__ = ("address", "cancel_scope", "evicted", "heard", "reserved")

    def __init__(self, address: str, reserved: bool) -> None:
        self.address = address
        self.reserved = reserved
        self.heard = False  # its AUTH has arrived: it is no longer evicted for a newcomer
        self.evicted = False
        self.cancel_scope = trio.CancelScope()


# --- the transport ----------------------------------------------------------------------------


class Transport:
    """Authenticated, framed TCP links between this principal and its peers.

    Use::

        async with Transport(("replica", 0), key, keyring, config) as transport:
            port = await transport.listen("127.0.0.1", 0)
            transport.connect_to(("replica", 1), "127.0.0.1", 9001)
            transport.send(("replica", 1), envelope_bytes)
            async for principal, data in transport.inbound:
                ...

    or `await nursery.start(transport.run)` and cancel that nursery to stop. A Transport
    runs once. `listen`, `connect_to`, `send` and `wait_connected` need it running.
    """

    def __init__(
        self,
        principal: Principal,
        signing_key: SigningKey,
        keyring: KeyRing,
        config: TransportConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.principal = check_principal(principal)
        if not isinstance(signing_key, SigningKey):
            raise TypeError("signing_key must be a SigningKey")
        if not isinstance(keyring, KeyRing):
            raise TypeError("keyring must be a KeyRing")
        if keyring.get(self.principal) != signing_key.verify_key:
            raise ValueError(f"the key ring does not hold this signing key for {self.principal}")
        self.config = config if config is not None else TransportConfig()
        self._key = signing_key
        self._keyring = keyring
        self._principal_bytes = encode_principal(self.principal)
        self._rng = rng if rng is not None else random.Random(secrets.randbits(64))
        self.inbound = InboundScheduler(
            max_frames=self.config.inbound_queue_size,
            replica_bytes=self.config.inbound_queue_bytes,
            client_bytes=self.config.client_inbound_bytes,
            client_rate=self.config.client_inbound_rate,
            client_burst=self.config.client_inbound_burst,
        )
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._peers: dict[Principal, _Peer] = {}
        self._dialers: dict[Principal, trio.CancelScope] = {}
        self._pending_general = 0  # slots held in the general pool
        self._pending_by_address: Counter[str] = Counter()  # general pool, by address
        self._reserved: list[_Pending] = []  # the replicas' pool, oldest first
        self._accept_by_address = TokenBuckets[str](
            self.config.accept_rate_per_address, self.config.accept_burst_per_address
        )
        self._accept_by_replica_address = TokenBuckets[str](
            self.config.accept_rate_replica_address, self.config.accept_burst_replica_address
        )
        self._verify_by_address = TokenBuckets[str](
            self.config.verify_rate_per_address, self.config.verify_burst_per_address
        )
        self._verify_total = TokenBuckets[str](
            self.config.verify_rate_total, self.config.verify_burst_total
        )
        self._verifications = 0
        # Where each replica last authenticated from (or the address we dial it at), and a
        # budget per replica for AUTHs naming it from exactly there: strangers spending the
        # shared budget cannot keep a replica out that comes back from its own address.
        self._replica_addresses: dict[Principal, str] = {}
        self._verify_known = TokenBuckets[str](
            self.config.verify_rate_per_address, self.config.verify_burst_per_address
        )
        self._context: AbstractAsyncContextManager[Transport] | None = None
        self.listen_ports: list[int] = []
        # counters
        self._accepted = 0
        self._dialed = 0
        self._dial_failures = 0
        self._handshakes_ok = 0
        self._handshakes_failed: Counter[str] = Counter()
        self._closes: Counter[str] = Counter()
        self._drops: Counter[str] = Counter()
        self._frames_in = self._frames_out = self._bytes_in = self._bytes_out = 0
        self._writes_out = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; every listener, dialer, reader and writer is a child of this."""
        if self._started:
            raise RuntimeError("a Transport runs only once")
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.inbound.close()  # the owner's `async for` over inbound ends

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Transport]:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps whatever ends it (the owner's own exception, usually):
            # handed back unwrapped, as if there were no nursery.
            raise_lone(group)

    async def __aenter__(self) -> Transport:
        if self._context is not None:
            raise RuntimeError("a Transport runs only once")
        self._context = self._running()
        return await self._context.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        if self._context is None:
            raise RuntimeError("__aexit__ without __aenter__")
        return await self._context.__aexit__(exc_type, exc, traceback)

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the Transport is not running (use `async with` or run())")
        return self._nursery

    # --- public API ------------------------------------------------------------------------------

    async def listen(self, host: str, port: int) -> int:
        """Accept connections on host:port (port 0: the OS picks); returns the bound port."""
        nursery = self._require_running()
        listeners = await trio.open_tcp_listeners(port, host=host)
        ports = [listener.socket.getsockname()[1] for listener in listeners]
        try:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
        except BaseException:  # the transport stopped meanwhile: no loop will close them
            for listener in listeners:
                listener.socket.close()
            raise
        self.listen_ports.extend(ports)
        return ports[0]

    def connect_to(self, principal: Principal, host: str, port: int) -> None:
        """Keep a connection to `principal` at host:port, redialling whenever it drops.

        Calling it again for the same principal replaces the address (the old dialer and its
        connection are closed). The peer must prove it is `principal` in the handshake.
        """
        nursery = self._require_running()
        principal = check_principal(principal)
        if principal == self.principal:
            raise ValueError("a transport does not connect to itself")
        if principal not in self._keyring:
            raise ValueError(f"{principal} is not in the key ring")
        if principal[0] == "replica":
            try:  # a replica normally dials us from the address we dial it at
                self._replica_addresses[principal] = str(ipaddress.ip_address(host))
            except ValueError:  # a host name: learnt from its first handshake instead
                pass
        old = self._dialers.pop(principal, None)
        if old is not None:
            old.cancel()
        scope = trio.CancelScope()
        self._dialers[principal] = scope
        self._peer(principal)
        nursery.start_soon(self._dial_loop, principal, host, port, scope)

    def send(self, principal: Principal, data: bytes) -> bool:
        """Queue `data` as one frame for `principal`; never waits. False if it was dropped."""
        self._require_running()
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        if principal not in self._keyring or principal == self.principal:
            self._drops["unknown_peer"] += 1
            return False
        if len(data) > self.config.frame_limit(self.principal, principal):
            self._drops["frame_too_large"] += 1
            return False
        peer = self._peer(principal)
        size = len(data)
        while len(peer.queue) >= peer.max_frames or peer.queued_bytes + size > peer.max_bytes:
            self._drops["peer_queue_full"] += 1
            if self.config.overflow == "drop_newest":
                return False
            peer.pop()
        peer.queue.append(data)
        peer.queued_bytes += size
        peer.notify()
        return True

    def is_connected(self, principal: Principal) -> bool:
        peer = self._peers.get(principal) if principal in self._keyring else None
        return peer is not None and peer.active is not None

    async def wait_connected(self, principal: Principal) -> None:
        """Return once an authenticated connection to `principal` is open."""
        self._require_running()
        if principal not in self._keyring:
            raise ValueError(f"{principal} is not in the key ring")
        # Looked up afresh after every change: an idle peer's entry may be forgotten.
        while (peer := self._peer(principal)).active is None:
            await peer.changed.wait()

    def statistics(self) -> TransportStatistics:
        live = [c for peer in self._peers.values() for c in peer.connections if not c.closing]
        nursery = self._nursery
        inbound = self.inbound.statistics()
        return TransportStatistics(
            connections=len(live),
            connected_peers=sum(1 for peer in self._peers.values() if peer.active is not None),
            connections_accepted=self._accepted,
            connections_dialed=self._dialed,
            dial_failures=self._dial_failures,
            handshakes_ok=self._handshakes_ok,
            handshakes_failed=dict(sorted(self._handshakes_failed.items())),
            closes=dict(sorted(self._closes.items())),
            frames_in=self._frames_in,
            frames_out=self._frames_out,
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            writes_out=self._writes_out,
            drops=dict(sorted(self._drops.items())),
            queued=sum(len(peer.queue) for peer in self._peers.values()),
            queued_bytes=sum(peer.queued_bytes for peer in self._peers.values()),
            inbound_queued=inbound.queued,
            inbound_bytes=inbound.queued_bytes,
            inbound_backpressure=inbound.backpressure,
            peers=len(self._peers),
            pending_handshakes=self._pending_general + len(self._reserved),
            handshake_verifications=self._verifications,
            tasks=len(nursery.child_tasks) if nursery is not None else 0,
        )

    # --- peers and the writer -----------------------------------------------------------------

    def _peer(self, principal: Principal) -> _Peer:
        peer = self._peers.get(principal)
        if peer is None:
            peer = _Peer(
                principal,
                self.config.peer_queue_size,
                self.config.queue_bytes(principal),
                trio.current_time(),
            )
            self._peers[principal] = peer
            self._require_running().start_soon(self._write_loop, peer)
        return peer

    async def _write_loop(self, peer: _Peer) -> None:
        """Send the peer's queued frames, in order, on its newest live connection.

        A peer we do not dial (a client, usually) is forgotten once it has had no connection
        for `idle_peer_timeout`: its entry, queue and this task go, so clients that come and
        go leave nothing behind. It comes back the next time it connects or is sent to.
        """
        while True:
            connection = peer.active
            if connection is None or not peer.queue:
                if connection is None and peer.idle_since is not None:
                    if peer.principal not in self._dialers:
                        deadline = peer.idle_since + self.config.idle_peer_timeout
                        with trio.move_on_at(deadline):
                            await peer.changed.wait()
                            continue
                        if not peer.connections and peer.principal not in self._dialers:
                            self._forget(peer)
                            return
                        continue
                await peer.changed.wait()
                continue
            # Coalesce: the small frames queued now go out sealed in one write (one
            # syscall, fewer segments) rather than a write each; a large frame goes alone.
            frames = [peer.pop()]
            size = len(frames[0])
            if size <= _COALESCE_LIMIT:
                while peer.queue and size + len(peer.queue[0]) <= _COALESCE_LIMIT:
                    frames.append(peer.pop())
                    size += len(frames[-1])
            sent = 0
            try:
                with trio.fail_after(self.config.send_timeout):
                    if size > _COALESCE_LIMIT:
                        await connection.send_frame(frames[0])
                        written = 1
                    else:
                        data, written = connection.seal_batch(frames)
                        if data:
                            await connection.stream.send_all(data)
                    sent = written  # fewer than frames: out of nonces, the rest is lost
            except trio.TooSlowError:
                logger.debug("%s: write to %s timed out", self.principal, peer.principal)
                connection.kill("send_timeout")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                connection.kill("broken")
            if len(frames) > sent:
                self._drops["connection_lost"] += len(frames) - sent
            if sent:
                self._writes_out += 1
            self._frames_out += sent
            self._bytes_out += sum(len(frame) for frame in frames[:sent])

    def _forget(self, peer: _Peer) -> None:
        if self._peers.get(peer.principal) is peer:
            del self._peers[peer.principal]
        if peer.queue:
            self._drops["peer_gone"] += len(peer.queue)
            peer.queue.clear()
            peer.queued_bytes = 0
        peer.notify()  # a `wait_connected` on it looks the principal up again

    def _register(self, connection: _Connection) -> None:
        peer = self._peer(connection.principal)
        if connection.direction == "in":
            for old in peer.connections:
                if old.direction == "in":
                    old.kill("replaced")
        peer.connections.append(connection)
        peer.idle_since = None
        peer.notify()

    def _unregister(self, connection: _Connection) -> None:
        peer = self._peers[connection.principal]
        peer.connections.remove(connection)
        if not peer.connections:
            peer.idle_since = trio.current_time()
        peer.notify()

    # --- connections --------------------------------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections; each one within its address's accept rate gets a task.

        The rate is checked on the raw socket, with the address accept() returned: a flood
        of connects beyond it costs the replica an accept and a close each (a reset, so no
        TIME_WAIT is left behind), no task, no key generation, no HELLO.
        """
        async with listener:
            raw = listener.socket
            while True:
                try:
                    sock, peer_address = await raw.accept()
                except OSError as error:
                    if error.errno in _ACCEPT_CAPACITY_ERRNOS:
                        logger.error("%s: accept failed: %s", self.principal, error)
                        await trio.sleep(_ACCEPT_RETRY_S)  # out of descriptors: not a payment
                        continue
                    if error.errno in _ACCEPT_IGNORED_ERRNOS:
                        continue
                    raise
                self._accepted += 1
                address = str(peer_address[0]) if peer_address else "?"
                # An address a replica is known at has a bucket of its own: strangers
                # elsewhere cannot spend it, and it is bounded too (review finding F4).
                buckets = (
                    self._accept_by_replica_address
                    if address in self._replica_addresses.values()
                    else self._accept_by_address
                )
                if not buckets.take(address, trio.current_time()):
                    self._handshakes_failed["accept_rate"] += 1
                    _reset(sock)
                    continue
                try:
                    stream = trio.SocketStream(sock)
                except OSError:  # pragma: no cover - gone already: nothing to serve
                    sock.close()
                    continue
                nursery.start_soon(self._serve_inbound, stream, address)

    async def _serve_inbound(self, stream: trio.SocketStream, address: str) -> None:
        try:
            slot = self._admit(address)
            if slot is None:
                self._handshakes_failed["too_many_pending"] += 1
                return
            _keepalive(stream)
            result: tuple[Principal, _Session] | None = None
            try:
                with slot.cancel_scope:
                    result = await self._handshake_as_server(stream, slot)
            except _HandshakeFailed as failure:
                self._handshakes_failed[failure.reason] += 1
                logger.debug("%s: inbound handshake failed: %s", self.principal, failure.reason)
                return
            finally:
                self._release(slot)
            if result is None:  # evicted for a newcomer (only ever in the reserved pool)
                self._handshakes_failed["evicted"] += 1
                return
            principal, session = result
            self._handshakes_ok += 1
            if principal[0] == "replica":
                self._replica_addresses[principal] = slot.address
            await self._run_connection(_Connection(stream, principal, "in", session))
        finally:
            await trio.aclose_forcefully(stream)

    def _admit(self, address: str) -> _Pending | None:
        """A handshake slot for a new inbound connection from `address`, or None (refused).

        The general pool is capped in total and per address. Beyond it, the reserved pool
        takes anyone but lets only replicas finish (checked on AUTH, before any signature);
        when it is full too, a newcomer evicts a connection that has not sent its AUTH yet,
        the oldest of the address holding most reserved slots. A replica needs one round
        trip from HELLO to AUTH, so strangers who open connections and say nothing cannot
        hold a slot against it.
        """
        config = self.config
        if (
            self._pending_general < config.max_pending_handshakes
            and self._pending_by_address[address] < config.max_pending_per_address
        ):
            self._pending_general += 1
            self._pending_by_address[address] += 1
            return _Pending(address, reserved=False)
        if config.reserved_handshakes == 0:
            return None
        if len(self._reserved) >= config.reserved_handshakes:
            silent = [slot for slot in self._reserved if not slot.heard]
            if not silent:
                return None
            per_address = Counter(slot.address for slot in silent)
            busiest = max(per_address.values())
            victim = next(slot for slot in silent if per_address[slot.address] == busiest)
            victim.evicted = True
            victim.cancel_scope.cancel()
            self._reserved.remove(victim)
        slot = _Pending(address, reserved=True)
        self._reserved.append(slot)
        return slot

    def _release(self, slot: _Pending) -> None:
        if slot.reserved:
            if not slot.evicted:
                self._reserved.remove(slot)
            return
        self._pending_general -= 1
        self._pending_by_address[slot.address] -= 1
        if self._pending_by_address[slot.address] <= 0:
            del self._pending_by_address[slot.address]  # no entry per address ever seen

    def _may_verify(self, address: str, claimed: Principal) -> bool:
        """Rate limits on AUTH signature checks: a flood of well-formed AUTH frames costs at
        most `verify_rate_total` Ed25519 verifications a second, and one address at most
        `verify_rate_per_address` of them. An AUTH naming a replica, from the address that
        replica is known at, has a bucket of its own (`verify_rate_per_address` per replica:
        bounded by the key ring's replicas), so a flood cannot lock a replica out."""
        now = trio.current_time()
        if self._replica_addresses.get(claimed) == address:
            return self._verify_known.take(f"{claimed[0]}/{claimed[1]}", now)
        if not self._verify_by_address.take(address, now):
            return False
        return self._verify_total.take("", now)

    async def _dial_loop(
        self, principal: Principal, host: str, port: int, scope: trio.CancelScope
    ) -> None:
        config = self.config
        with scope:
            attempt = 0
            while True:
                stream: trio.SocketStream | None = None
                try:
                    with trio.move_on_after(config.connect_timeout):
                        stream = await trio.open_tcp_stream(host, port)
                except OSError as error:
                    logger.debug("%s: dial %s failed: %s", self.principal, principal, error)
                if stream is None:
                    self._dial_failures += 1
                else:
                    self._dialed += 1
                    try:
                        _keepalive(stream)
                        try:
                            session = await self._handshake_as_client(stream, principal)
                        except _HandshakeFailed as failure:
                            self._handshakes_failed[failure.reason] += 1
                            logger.debug(
                                "%s: handshake with %s failed: %s",
                                self.principal,
                                principal,
                                failure.reason,
                            )
                        else:
                            self._handshakes_ok += 1
                            attempt = 0
                            await self._run_connection(
                                _Connection(stream, principal, "out", session)
                            )
                    finally:
                        await trio.aclose_forcefully(stream)
                await trio.sleep(
                    backoff_delay(
                        attempt,
                        config.backoff_initial,
                        config.backoff_max,
                        config.backoff_jitter,
                        self._rng,
                    )
                )
                attempt += 1

    async def _run_connection(self, connection: _Connection) -> None:
        """Register an authenticated connection, read it until it closes, unregister it."""
        self._register(connection)
        logger.debug(
            "%s: connected to %s (%s)", self.principal, connection.principal, connection.direction
        )
        try:
            with connection.cancel_scope:
                reason = await self._read_frames(connection)
                connection.kill(reason)
        finally:
            if connection.close_reason is None:  # cancelled from outside: shutdown, redial
                connection.close_reason = "cancelled"
            self._closes[connection.close_reason] += 1
            self._unregister(connection)
            logger.debug(
                "%s: connection to %s closed: %s",
                self.principal,
                connection.principal,
                connection.close_reason,
            )

    async def _read_frames(self, connection: _Connection) -> str:
        """Deliver frames until the connection ends; return why it ended."""
        decoder = connection.decoder
        stream = connection.stream
        frame_started: float | None = None
        while True:
            while True:
                try:
                    frame = decoder.next_frame()
                except FramingError as error:
                    return error.reason
                if frame is None:
                    break
                self._frames_in += 1
                self._bytes_in += len(frame)
                try:
                    await self.inbound.put(connection.principal, frame)
                except trio.ClosedResourceError:
                    self._drops["inbound_closed"] += 1
                frame_started = None
            if decoder.buffered == 0:
                deadline = math.inf
            else:
                if frame_started is None:
                    frame_started = trio.current_time()
                deadline = frame_started + self.config.frame_timeout
            with trio.move_on_at(deadline):
                try:
                    data = await stream.receive_some(self.config.receive_chunk_bytes)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return "broken"
                if not data:
                    return "eof_mid_frame" if decoder.buffered else "eof"
                if frame_started is None:
                    frame_started = trio.current_time()
                decoder.append(data)
                continue
            return "frame_timeout"

    # --- handshake ----------------------------------------------------------------------------

    async def _handshake_as_server(
        self, stream: trio.SocketStream, slot: _Pending
    ) -> tuple[Principal, _Session]:
        with trio.move_on_after(self.config.handshake_timeout):
            return await self._server_steps(stream, slot)
        raise _HandshakeFailed("timeout")

    async def _server_steps(
        self, stream: trio.SocketStream, slot: _Pending
    ) -> tuple[Principal, _Session]:
        decoder = FrameDecoder(self.config.handshake_max_frame_bytes)
        server_nonce = secrets.token_bytes(NONCE_SIZE)
        ephemeral, ephemeral_public = ephemeral_key(secrets.token_bytes(32))
        hello = (
            _HELLO
            + bytes((HANDSHAKE_VERSION,))
            + server_nonce
            + self._principal_bytes
            + ephemeral_public
        )
        await self._send_handshake(stream, hello)
        auth = await self._receive_handshake(stream, decoder)
        slot.heard = True
        # Cheap checks first: a signature is verified (and then the key exchange done) only
        # for a well-formed AUTH naming a principal of the key ring that may use this slot,
        # and within the rate limits.
        if len(auth) == _V1_AUTH_SIZE and auth[:1] == _AUTH:
            raise _HandshakeFailed("version")
        if len(auth) != _AUTH_SIZE or auth[:1] != _AUTH:
            raise _HandshakeFailed("malformed")
        client_bytes = auth[1 : 1 + PRINCIPAL_SIZE]
        offset = 1 + PRINCIPAL_SIZE + NONCE_SIZE
        client_ephemeral = auth[offset : offset + EPHEMERAL_SIZE]
        signature = auth[offset + EPHEMERAL_SIZE :]
        try:
            client = decode_principal(client_bytes)
        except ValueError:
            raise _HandshakeFailed("malformed") from None
        if client == self.principal:
            # Never a peer: we never sign a transcript whose HELLO names ourselves, so this
            # is a stolen key or a second process under our identity. Accepted, it would
            # be a connection to ourselves whose frames are delivered as our own.
            raise _HandshakeFailed("self")
        key = self._keyring.get(client)
        if key is None:
            raise _HandshakeFailed("unknown_principal")
        if slot.reserved and client[0] != "replica":
            raise _HandshakeFailed("reserved_for_replicas")
        if not self._may_verify(slot.address, client):
            raise _HandshakeFailed("rate_limited")
        self._verifications += 1
        transcript = transcript_hash(hello, auth[:-SIGNATURE_SIZE])
        if not key.verify(HANDSHAKE_DOMAIN, transcript, signature):
            raise _HandshakeFailed("bad_signature")
        inbound_key, outbound_key = self._agree(ephemeral, client_ephemeral, transcript)
        await self._send_handshake(
            stream, _ACCEPT + self._key.sign(HANDSHAKE_ACCEPT_DOMAIN, transcript)
        )
        limit = self.config.frame_limit(self.principal, client)
        reader = SessionReader(decoder, SessionCipher(inbound_key), limit)
        return client, _Session(reader, SessionCipher(outbound_key))

    async def _handshake_as_client(
        self, stream: trio.SocketStream, expected: Principal
    ) -> _Session:
        with trio.move_on_after(self.config.handshake_timeout):
            return await self._client_steps(stream, expected)
        raise _HandshakeFailed("timeout")

    async def _client_steps(self, stream: trio.SocketStream, expected: Principal) -> _Session:
        decoder = FrameDecoder(self.config.handshake_max_frame_bytes)
        hello = await self._receive_handshake(stream, decoder)
        if hello[:1] == _HELLO and len(hello) >= 2 and hello[1] != HANDSHAKE_VERSION:
            raise _HandshakeFailed("version")  # checked first: an older HELLO is shorter
        if len(hello) != _HELLO_SIZE or hello[:1] != _HELLO:
            raise _HandshakeFailed("malformed")
        server_bytes = hello[2 + NONCE_SIZE : 2 + NONCE_SIZE + PRINCIPAL_SIZE]
        server_ephemeral = hello[2 + NONCE_SIZE + PRINCIPAL_SIZE :]
        try:
            server = decode_principal(server_bytes)
        except ValueError:
            raise _HandshakeFailed("malformed") from None
        if server != expected:
            # Checked before we sign: our AUTH names the server, but only the one we meant.
            raise _HandshakeFailed("wrong_peer")
        ephemeral, ephemeral_public = ephemeral_key(secrets.token_bytes(32))
        auth_unsigned = (
            _AUTH + self._principal_bytes + secrets.token_bytes(NONCE_SIZE) + ephemeral_public
        )
        transcript = transcript_hash(hello, auth_unsigned)
        signature = self._key.sign(HANDSHAKE_DOMAIN, transcript)
        await self._send_handshake(stream, auth_unsigned + signature)
        accept = await self._receive_handshake(stream, decoder)
        if len(accept) != _ACCEPT_SIZE or accept[:1] != _ACCEPT:
            raise _HandshakeFailed("malformed")
        key = self._keyring.get(expected)
        if key is None or not key.verify(HANDSHAKE_ACCEPT_DOMAIN, transcript, accept[1:]):
            raise _HandshakeFailed("bad_signature")
        outbound_key, inbound_key = self._agree(ephemeral, server_ephemeral, transcript)
        limit = self.config.frame_limit(self.principal, expected)
        reader = SessionReader(decoder, SessionCipher(inbound_key), limit)
        return _Session(reader, SessionCipher(outbound_key))

    @staticmethod
    def _agree(
        ephemeral: X25519PrivateKey, peer_public: bytes, transcript: bytes
    ) -> tuple[bytes, bytes]:
        """(client -> server, server -> client) keys; `bad_key` for a peer ephemeral that
        gives no shared secret (a small-order point: all zero output)."""
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError:
            raise _HandshakeFailed("bad_key") from None
        return session_keys(shared, transcript)

    async def _send_handshake(self, stream: trio.SocketStream, message: bytes) -> None:
        try:
            await stream.send_all(encode_frame(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _HandshakeFailed("broken") from None

    async def _receive_handshake(self, stream: trio.SocketStream, decoder: FrameDecoder) -> bytes:
        while True:
            try:
                frame = decoder.next_frame()
            except FramingError:
                raise _HandshakeFailed("oversize_frame") from None
            if frame is not None:
                return frame
            try:
                # Never more than a handshake frame can need: bytes from a peer that is
                # not yet authenticated are not buffered beyond that.
                data = await stream.receive_some(
                    self.config.handshake_max_frame_bytes + FRAME_HEADER_SIZE
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _HandshakeFailed("broken") from None
            if not data:
                raise _HandshakeFailed("eof")
            decoder.append(data)


def _reset(sock: trio.socket.SocketType) -> None:
    """Close a just-accepted socket with a reset (SO_LINGER 0): no FIN handshake, and no
    TIME_WAIT entry kept on our side for each connection of a flood."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:  # pragma: no cover - already gone
        pass
    sock.close()


def _keepalive(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:  # pragma: no cover - the socket died already; reading will tell
        pass
