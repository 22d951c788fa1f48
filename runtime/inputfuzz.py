"""Bad-input fuzz benchmark: one replica, its frame decoder and its handshake, fed hostile input.

    python -m runtime.inputfuzz --inputs 1000000 [--seed S]

In process, no sockets. First a small in-memory cluster of four real `Replica` cores and
a `ClientCore` runs a short history (payments, a crashed primary and a view change, a
backup cut off past its window that catches up by state transfer) and every frame they
send becomes the seed corpus. Then every input is one of:

- `random_bytes`      noise, mostly short, now and then up to 64 KiB
- `mutated_frame`     a corpus frame with bit flips, byte changes, insertions, deletions,
                      truncation, splices with another frame
- `replayed_frame`    a corpus frame as it was sent (valid: it moves the replica on)
- `signed_malformed`  a body of the wrong shape (wrong types, missing or extra fields,
                      non-canonical msgpack, wrong type code), signed with the Byzantine
                      replica's real key in the right domain
- `signed_hostile`    a well-formed message with hostile field values (extreme views and
                      sequence numbers, unknown replica ids, garbage or misplaced nested
                      envelopes, known and unknown digests), signed by the Byzantine
                      replica or a client: it passes the signature check and reaches the
                      protocol handlers
- `resigned_frame`    a corpus message with some fields made hostile, claimed by and
                      re-signed with the Byzantine replica's key
- `frame_stream`      bytes for `runtime.framing.FrameDecoder`, chunked at random
- `handshake_server`  an AUTH (valid, mutated or noise) answering a real HELLO
- `handshake_client`  a HELLO and then an ACCEPT (valid, mutated or noise)

The first six go to `Replica.handle(MessageReceived(...))` of replica 1 (a backup), with
clock ticks in between. The Byzantine replica is replica 3 alone: f = 1, so the target must
never halt. A crash is any exception out of `handle`, any exception from the decoder other
than `FramingError`, any from a handshake other than its refusal, a decoder that returns
other frames than were framed, or a halt of the target replica. After a crash the target
is rebuilt and the run goes on. Exit status 1 if there was any crash.

Deterministic given the seed (also the handshake nonces: they come from the seeded random
generator here), so `--seed S --inputs N` reproduces input N - 1. The outcome digest
printed at the end changes if any input's outcome changes.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

import runtime.transport as transport_module
from crypto.keys import KeyRing, SigningKey
from pbft.client import ClientCore
from pbft.codec import (
    MAX_FRAME_BYTES,
    Bytes,
    ListOf,
    Nested,
    SignedInt,
    Spec,
    Struct,
    Text,
    UInt,
    pack,
)
from pbft.config import ClusterConfig
from pbft.context import EVIDENCE_LIMIT
from pbft.events import Broadcast, MessageReceived, Send, Tick
from pbft.genesis import compute_cluster_id
from pbft.ledger import Account
from pbft.messages import MESSAGE_CLASSES, Message, MessageType
from pbft.replica import Replica
from pbft.signed import PROTOCOL_VERSION, Envelope, domain_of, peek, seal
from runtime.framing import FrameDecoder, FramingError, encode_frame
from runtime.transport import (
    EPHEMERAL_SIZE,
    HANDSHAKE_ACCEPT_DOMAIN,
    HANDSHAKE_DOMAIN,
    SIGNATURE_SIZE,
    Transport,
    _Pending,
    decode_principal,
    encode_principal,
    ephemeral_key,
    transcript_hash,
)

REPLICAS = 4
CLIENTS = 2
TARGET = 1
BYZANTINE = 3
CRASHES_KEPT = 10

CATEGORIES: dict[str, int] = {  # relative weights
    "random_bytes": 14,
    "mutated_frame": 24,
    "replayed_frame": 6,
    "signed_malformed": 12,
    "signed_hostile": 22,
    "resigned_frame": 12,
    "frame_stream": 6,
    "handshake_server": 2,
    "handshake_client": 2,
}
REPLICA_CATEGORIES = (
    "random_bytes",
    "mutated_frame",
    "replayed_frame",
    "signed_malformed",
    "signed_hostile",
    "resigned_frame",
)

CONFIG = ClusterConfig(
    replica_count=REPLICAS,
    batch_size=2,
    batch_timeout_ms=0,
    checkpoint_interval=4,
    watermark_window=8,
    view_change_timeout_ms=300,
    heartbeat_interval_ms=50,
    retransmit_interval_ms=60,
    client_timeout_ms=400,
    pending_request_limit=1024,
)


@dataclass
class Crash:
    index: int
    category: str
    error: str
    data: bytes


@dataclass
class FuzzReport:
    seed: int
    inputs: int
    tried: Counter[str] = field(default_factory=Counter)
    crashes: list[Crash] = field(default_factory=list)
    crash_count: int = 0
    drops: Counter[str] = field(default_factory=Counter)  # replica drop reasons
    accepted: Counter[str] = field(default_factory=Counter)  # by category: no drop counted
    decoder: Counter[str] = field(default_factory=Counter)
    handshakes: Counter[str] = field(default_factory=Counter)
    ticks: int = 0
    corpus: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    rss_start: int = 0
    rss_warm: int = 0  # after the first tenth of the inputs
    # (inputs done, RSS, entries in the target's signature cache)
    rss_samples: list[tuple[int, int, int]] = field(default_factory=list)
    rss_end: int = 0
    rss_peak: int = 0
    replica_state: dict[str, int] = field(default_factory=dict)
    replica_limits: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    outcome_digest: str = ""


# --- keys, cluster and corpus -------------------------------------------------------------------


class Keys:
    def __init__(self, seed: int) -> None:
        self.replicas = [SigningKey.derive(seed, f"replica/{i}") for i in range(REPLICAS)]
        self.clients = [SigningKey.derive(seed, f"client/{j}") for j in range(CLIENTS)]
        self.keyring = KeyRing()
        for i, key in enumerate(self.replicas):
            self.keyring.add(("replica", i), key.verify_key)
        for j, key in enumerate(self.clients):
            self.keyring.add(("client", j), key.verify_key)
        self.accounts = {
            f"acct-{i}": Account(owner=i % CLIENTS, balance=1_000) for i in range(2 * CLIENTS)
        }

    def replica(self, replica_id: int) -> Replica:
        return Replica(replica_id, CONFIG, self.replicas[replica_id], self.keyring, self.accounts)


def build_corpus(keys: Keys) -> list[bytes]:
    """Every distinct frame a short, eventful history of a 4-replica cluster sends."""
    replicas = [keys.replica(i) for i in range(REPLICAS)]
    cluster_id = compute_cluster_id(CONFIG, keys.keyring, keys.accounts)
    clients = [
        ClientCore(j, CONFIG, keys.clients[j], keys.keyring, cluster_id=cluster_id)
        for j in range(CLIENTS)
    ]
    queue: list[tuple[tuple[str, int], bytes]] = []
    seen: dict[bytes, None] = {}
    down: list[int] = []
    now = 0

    def carry(source: int | None, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                seen.setdefault(action.data)
                queue.append((action.to, action.data))
            elif isinstance(action, Broadcast) and source is not None:
                seen.setdefault(action.data)
                for peer in range(REPLICAS):
                    if peer != source:
                        queue.append((("replica", peer), action.data))

    def run(milliseconds: int) -> None:
        nonlocal now
        end = now + milliseconds
        while now < end:
            for _ in range(10_000):  # bounded: deliver what is queued, a few rounds deep
                if not queue:
                    break
                (role, number), data = queue.pop(0)
                if role == "client":
                    clients[number].handle(MessageReceived(data))
                elif number not in down:
                    carry(number, replicas[number].handle(MessageReceived(data)))
            now += 5
            for number, replica in enumerate(replicas):
                if number not in down:
                    carry(number, replica.handle(Tick(now)))
            for client in clients:
                carry(None, client.handle(Tick(now)))

    def pay(count: int, first_id: int) -> None:
        for index in range(count):
            client = index % CLIENTS
            amount = 10 + index if index % 5 else 10**6  # some overdraw: rejected with a reason
            payer = f"acct-{client}"
            carry(None, clients[client].submit(first_id + index, payer, "acct-3", amount))

    pay(12, 1)
    run(400)
    carry(None, clients[0].query_balance(1, "acct-0"))
    down.append(0)  # the primary of view 0 crashes: a view change follows
    pay(6, 100)
    run(3_000)
    down.remove(0)
    down.append(2)  # a backup is cut off while the others run past its window
    pay(40, 200)
    run(3_000)
    down.remove(2)
    run(2_000)
    return list(seen)


# --- value generators ---------------------------------------------------------------------------


class Generator:
    """Hostile inputs, drawn from one seeded random generator."""

    def __init__(self, rng: random.Random, keys: Keys, corpus: list[bytes]) -> None:
        self.rng = rng
        self.keys = keys
        self.corpus = corpus
        self.opened: list[tuple[Envelope, Message]] = [peek(raw) for raw in corpus]
        hashes: dict[bytes, None] = {}
        for _, message in self.opened:
            for name, spec in message.SCHEMA.items():
                value = getattr(message, name)
                if isinstance(spec, Bytes) and spec.maximum_length == 32 and len(value) == 32:
                    hashes.setdefault(value)
        self.hashes = list(hashes)
        self.target: Replica | None = None

    # integers, bytes, text --------------------------------------------------------------

    def integer(self, maximum: int) -> int:
        rng = self.rng
        target = self.target
        near = [0, 1, 2, 3]
        if target is not None:
            near += [target.view, target.last_executed, target.stable.seq, target.next_seq]
        pick = rng.random()
        if pick < 0.5:
            value = rng.choice(near) + rng.randrange(-2, 12)
        elif pick < 0.75:
            value = rng.choice(
                [REPLICAS - 1, REPLICAS, 255, 256, 2**31, 2**32 - 1, 2**62 - 1, 2**62, 2**64 - 1]
            )
        else:
            value = rng.randrange(maximum + 1)
        return min(max(value, 0), maximum)

    def noise(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def digest(self) -> bytes:
        if self.hashes and self.rng.random() < 0.6:
            return self.rng.choice(self.hashes)
        return self.rng.randbytes(32)

    def envelope_field(self, depth: int) -> bytes:
        pick = self.rng.random()
        if pick < 0.45:
            return self.rng.choice(self.corpus)
        if pick < 0.6:
            return self.mutate(self.rng.choice(self.corpus)) or b"\x00"
        if pick < 0.8 and depth < 2:
            return self.signed_hostile(depth + 1)
        return self.noise(1, 96)

    def value(self, spec: Spec, depth: int) -> Any:
        rng = self.rng
        if isinstance(spec, UInt):
            return self.integer(spec.maximum)
        if isinstance(spec, SignedInt):
            return self.integer(spec.bound) * rng.choice((1, -1))
        if isinstance(spec, Bytes):
            if spec.minimum_length == spec.maximum_length == 32:
                return self.digest()
            if spec.maximum_length >= MAX_FRAME_BYTES:
                return self.envelope_field(depth)
            return rng.randbytes(rng.randint(spec.minimum_length, spec.maximum_length))
        if isinstance(spec, Text):
            if spec.choices is not None:
                return rng.choice(spec.choices)
            if rng.random() < 0.5:
                return rng.choice([*self.keys.accounts, "", "acct-999"])
            alphabet = "acct-0123456789\u00e9\u2603\x00"
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, spec.maximum_length)))
        if isinstance(spec, ListOf):
            limit = min(spec.maximum_items, 12 if depth == 0 else 4)
            count = rng.randint(0, limit)
            return tuple(self.value(spec.item, depth + 1) for _ in range(count))
        if isinstance(spec, Nested):
            return self.struct(spec.cls, depth + 1)
        raise TypeError(f"no generator for {spec!r}")

    def struct(self, cls: type[Struct], depth: int) -> Any:
        return cls(**{name: self.value(spec, depth) for name, spec in cls.SCHEMA.items()})

    # the input kinds ------------------------------------------------------------------------

    def random_bytes(self) -> bytes:
        if self.rng.random() < 0.01:
            return self.rng.randbytes(64 * 1024)
        return self.noise(0, 200)

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind = rng.randrange(7)
            position = rng.randrange(len(out) + 1)
            if kind == 0 and out:  # flip a bit
                index = min(position, len(out) - 1)
                out[index] ^= 1 << rng.randrange(8)
            elif kind == 1 and out:  # an interesting byte
                index = min(position, len(out) - 1)
                out[index] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCC, 0xDC, 0xFF])
            elif kind == 2:  # insert
                out[position:position] = self.noise(1, 8)
            elif kind == 3:  # delete
                del out[position : position + rng.randint(1, 16)]
            elif kind == 4:  # truncate
                del out[position:]
            elif kind == 5:  # splice with another frame
                other = rng.choice(self.corpus)
                out[position:] = other[rng.randrange(len(other) + 1) :]
            else:  # duplicate a chunk
                chunk = out[position : position + rng.randint(1, 32)]
                out[position:position] = chunk
        return bytes(out)

    def mutated_frame(self) -> bytes:
        return self.mutate(self.rng.choice(self.corpus))

    def replayed_frame(self) -> bytes:
        return self.rng.choice(self.corpus)

    def _signer(self, cls: type[Message]) -> tuple[int, SigningKey]:
        if cls.SIGNER == "client":
            client = self.rng.randrange(CLIENTS)
            return client, self.keys.clients[client]
        return BYZANTINE, self.keys.replicas[BYZANTINE]

    def _wrap(self, message_type: MessageType, sender: int, body: bytes, key: SigningKey) -> bytes:
        rng = self.rng
        signature = key.sign(domain_of(message_type), body)
        version = PROTOCOL_VERSION
        type_code = int(message_type)
        pick = rng.random()
        if pick < 0.05:
            version = rng.choice([0, 2, 255])
        elif pick < 0.1:
            type_code = rng.choice([0, 16, 255, *(int(t) for t in MessageType)])
        elif pick < 0.15:
            sender = rng.choice([0, 1, 2, 3, 4, 2**32 - 1])  # claims someone else
        return Envelope(version, type_code, sender, body, signature).encode()

    def signed_malformed(self) -> bytes:
        """A body of the wrong shape, signed in the right domain by a real key."""
        rng = self.rng
        cls = rng.choice(list(MESSAGE_CLASSES.values()))
        sender, key = self._signer(cls)
        wire = self.struct(cls, 1).to_wire()
        wire[list(cls.SCHEMA).index(cls.SENDER_FIELD)] = sender
        kind = rng.randrange(6)
        index = rng.randrange(len(wire))
        if kind == 0:  # a field of the wrong type
            wire[index] = rng.choice(
                [None, True, 1.5, -1, "x", b"\x00", [], [1, 2], 2**64 - 1, "", [[]]]
            )
        elif kind == 1:  # a field missing
            del wire[index]
        elif kind == 2:  # an extra field
            wire.append(rng.choice([0, b"", "extra", []]))
        elif kind == 3:  # a uint beyond its range
            wire[index] = rng.choice([2**62 + 1, 2**63, 2**64 - 1, 256, 2**32])
        elif kind == 4:  # nested too deep
            wire[index] = [[[[[[[[[[0]]]]]]]]]]
        if kind == 5:  # the same fields, non-canonically encoded (array16 header)
            body = b"\xdc" + len(wire).to_bytes(2, "big") + b"".join(pack(item) for item in wire)
        else:
            body = msgpack.packb(wire, use_bin_type=rng.random() < 0.9)
        if not body:
            body = b"\x90"
        return self._wrap(cls.TYPE, sender, body, key)

    def signed_hostile(self, depth: int = 0) -> bytes:
        """A well-formed message with hostile values: it passes the signature check."""
        cls = self.rng.choice(list(MESSAGE_CLASSES.values()))
        sender, key = self._signer(cls)
        fields = {name: self.value(spec, depth + 1) for name, spec in cls.SCHEMA.items()}
        fields[cls.SENDER_FIELD] = sender
        message = cls(**fields)
        if depth > 0:
            return seal(message, key)
        return self._wrap(cls.TYPE, sender, message.encode(), key)

    def resigned_frame(self) -> bytes:
        """A real message, claimed by the Byzantine replica, some fields made hostile."""
        rng = self.rng
        replica_messages = [m for _, m in self.opened if m.SIGNER == "replica"]
        message = rng.choice(replica_messages)
        fields = {name: getattr(message, name) for name in message.SCHEMA}
        for name in rng.sample(list(message.SCHEMA), rng.randint(0, 2)):
            fields[name] = self.value(message.SCHEMA[name], 1)
        fields[message.SENDER_FIELD] = BYZANTINE
        return seal(type(message)(**fields), self.keys.replicas[BYZANTINE])

    def frame_stream(self) -> tuple[bytes, list[bytes], int]:
        """Bytes of some frames (maybe corrupted), the frames, the decoder's limit."""
        rng = self.rng
        limit = rng.choice([0, 1, 16, 1024, 64 * 1024, MAX_FRAME_BYTES])
        payloads = [
            rng.choice(self.corpus)[: limit or None] if rng.random() < 0.5 else self.noise(0, 64)
            for _ in range(rng.randint(0, 6))
        ]
        payloads = [p for p in payloads if len(p) <= limit]
        stream = b"".join(encode_frame(p, limit) for p in payloads)
        if rng.random() < 0.5:
            stream = self.mutate(stream) if stream else self.noise(0, 16)
            return stream, [], limit  # corrupted: no promise on which frames come out
        return stream, payloads, limit

    def chunks(self, data: bytes) -> list[bytes]:
        out = []
        position = 0
        while position < len(data):
            size = self.rng.choice([1, 2, 3, 5, 17, 256, 65536])
            out.append(data[position : position + size])
            position += size
        return out


# --- handshakes ---------------------------------------------------------------------------------


class ScriptedStream:
    """Enough of a trio stream for the handshake: scripted answers to what it sends."""

    def __init__(self, rng: random.Random, respond: Callable[[bytes], bytes | None]) -> None:
        self.rng = rng
        self.respond = respond
        self.inbox = bytearray()

    async def send_all(self, data: bytes) -> None:
        answer = self.respond(bytes(data))
        if answer is not None:
            self.inbox += answer

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self.inbox:
            return b""  # end of stream
        size = min(max_bytes or len(self.inbox), self.rng.choice([1, 7, 64, 4096]))
        chunk = bytes(self.inbox[:size])
        del self.inbox[:size]
        return chunk


class SeededSecrets:
    """Stands in for `secrets` inside runtime.transport, so nonces follow the seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def token_bytes(self, count: int) -> bytes:
        return self.rng.randbytes(count)

    def randbits(self, bits: int) -> int:
        return self.rng.getrandbits(bits)


def _framed_or_raw(generator: Generator, message: bytes) -> bytes:
    """A handshake message the way a peer might send it: framed, mutated, or noise."""
    rng = generator.rng
    pick = rng.random()
    if pick < 0.3:
        return encode_frame(message)
    if pick < 0.6:
        return encode_frame(generator.mutate(message))
    if pick < 0.75:
        return generator.mutate(encode_frame(message))
    if pick < 0.85:
        return encode_frame(message) + encode_frame(generator.noise(0, 64))  # pipelined
    if pick < 0.9:
        return (2**32 - 1).to_bytes(4, "big") + message
    return generator.noise(0, 128)


async def handshake_as_server(generator: Generator, server: Transport) -> str:
    rng = generator.rng
    keys = generator.keys
    client_role, client_id = rng.choice([("client", 0), ("client", 1), ("replica", 0)])
    key = keys.clients[client_id] if client_role == "client" else keys.replicas[client_id]
    client_bytes = encode_principal((client_role, client_id))
    sent: list[bytes] = []

    def respond(data: bytes) -> bytes | None:
        sent.append(data)
        if len(sent) != 1:
            return None
        hello = data[4:]
        _, ephemeral_public = ephemeral_key(rng.randbytes(EPHEMERAL_SIZE))
        unsigned = b"A" + client_bytes + rng.randbytes(32) + ephemeral_public
        signature = key.sign(HANDSHAKE_DOMAIN, transcript_hash(hello, unsigned))
        return _framed_or_raw(generator, unsigned + signature)

    # A slot of the stranger pool, from an address of its own (so the per-address
    # signature rate limit does not throttle the run).
    slot = _Pending(f"fuzz-{rng.getrandbits(32)}", reserved=False)
    principal, _session = await server._handshake_as_server(ScriptedStream(rng, respond), slot)  # type: ignore[arg-type]
    if principal != (client_role, client_id):
        raise AssertionError(f"handshake accepted {principal}, the AUTH named another")
    return "ok"


async def handshake_as_client(generator: Generator, client: Transport) -> str:
    rng = generator.rng
    keys = generator.keys
    server_id = rng.randrange(REPLICAS)
    server_bytes = encode_principal(("replica", server_id))
    server_nonce = rng.randbytes(32)
    _, ephemeral_public = ephemeral_key(rng.randbytes(EPHEMERAL_SIZE))
    version = rng.choice([2, 2, 2, 0, 1, 3])
    hello = b"H" + bytes([version]) + server_nonce + server_bytes + ephemeral_public

    def respond(data: bytes) -> bytes | None:
        auth = data[4:]
        decode_principal(auth[1:10])
        transcript = transcript_hash(hello, auth[:-SIGNATURE_SIZE])
        signature = keys.replicas[server_id].sign(HANDSHAKE_ACCEPT_DOMAIN, transcript)
        return _framed_or_raw(generator, b"K" + signature)

    stream = ScriptedStream(rng, respond)
    stream.inbox += _framed_or_raw(generator, hello)
    await client._handshake_as_client(stream, ("replica", server_id))  # type: ignore[arg-type]
    return "ok"


# --- the run --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_fuzz(
    inputs: int, seed: int, progress: Callable[[int, int], None] | None = None
) -> FuzzReport:
    return trio.run(_run_fuzz, inputs, seed, progress)


async def _run_fuzz(
    inputs: int, seed: int, progress: Callable[[int, int], None] | None
) -> FuzzReport:
    report = FuzzReport(seed=seed, inputs=inputs)
    report.rss_start = rss_bytes()
    rng = random.Random(seed)
    keys = Keys(seed)
    corpus = build_corpus(keys)
    for raw in corpus:
        report.corpus[MessageType(peek(raw)[0].type_code).name] += 1
    generator = Generator(rng, keys, corpus)
    target = keys.replica(TARGET)
    generator.target = target
    server = Transport(("replica", TARGET), keys.replicas[TARGET], keys.keyring)
    client = Transport(("client", 0), keys.clients[0], keys.keyring)
    names = list(CATEGORIES)
    weights = list(CATEGORIES.values())
    outcomes = hashlib.sha256()
    now_ms = 0
    samples_at = {inputs * tenth // 10 for tenth in range(1, 10)}
    saved_secrets = transport_module.secrets
    transport_module.secrets = SeededSecrets(rng)  # type: ignore[assignment]
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        for index in range(inputs):
            if index in samples_at:
                cached = target.verifier.cache.statistics().entries
                report.rss_samples.append((index, rss_bytes(), cached))
            if progress is not None and index % 10_000 == 0:
                progress(index, inputs)
            category = rng.choices(names, weights)[0]
            report.tried[category] += 1
            data = b""
            if category in REPLICA_CATEGORIES:
                # Outside the try: a failure to build an input is a bug here, not a finding.
                data = getattr(generator, category)()
            try:
                if category in REPLICA_CATEGORIES:
                    if rng.random() < 0.02:
                        now_ms += rng.randint(1, 400)
                        report.ticks += 1
                        target.handle(Tick(now_ms))
                    before = dict(target.drops)
                    target.handle(MessageReceived(data))
                    outcome = _replica_outcome(before, target.drops)
                    if outcome:
                        report.drops[outcome] += 1
                    else:
                        report.accepted[category] += 1
                    if target.halted is not None:
                        raise AssertionError(f"the target halted: {target.halted}")
                elif category == "frame_stream":
                    data, payloads, limit = generator.frame_stream()
                    outcome = _decode_stream(generator, data, payloads, limit)
                    report.decoder[outcome] += 1
                elif category == "handshake_server":
                    outcome = await _handshake(handshake_as_server(generator, server))
                    report.handshakes[f"server {outcome}"] += 1
                else:
                    outcome = await _handshake(handshake_as_client(generator, client))
                    report.handshakes[f"client {outcome}"] += 1
                if category.startswith("handshake"):
                    # The scripted streams never block, so without this trio would never
                    # get to prune the handshakes' expired deadlines, and they pile up.
                    await trio.lowlevel.checkpoint()
            except Exception as error:  # every escape is the finding we count
                outcome = "CRASH"
                report.crash_count += 1
                if len(report.crashes) < CRASHES_KEPT:
                    report.crashes.append(Crash(index, category, repr(error), data))
                target = keys.replica(TARGET)  # its state may be broken: start afresh
                generator.target = target
            outcomes.update(f"{category}:{outcome};".encode())
    finally:
        transport_module.secrets = saved_secrets
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = time.process_time() - cpu_started
    report.rss_end = rss_bytes()
    report.rss_samples.append((inputs, report.rss_end, target.verifier.cache.statistics().entries))
    report.rss_warm = report.rss_samples[0][1]
    report.rss_peak = max(peak_rss_bytes(), report.rss_end)
    report.outcome_digest = outcomes.hexdigest()[:16]
    report.replica_state = {
        "view": target.view,
        "last_executed": target.last_executed,
        "pending_requests": len(target.requests.pending),
        "slots": len(target.ordering.slots),
        "view_change_views": len(target.viewchanges.view_changes),
        "view_claims": len(target.viewchanges.latest_view_claims),
        "checkpoint_vote_seqs": len(target.checkpoints.checkpoint_votes),
        "evidence": len(target.evidence),
        "signature_cache": target.verifier.cache.statistics().entries,
    }
    report.replica_limits = {
        "pending_requests": CONFIG.pending_request_limit,
        "evidence": EVIDENCE_LIMIT,
        "signature_cache": target.verifier.cache.statistics().max_entries,
    }
    return report


def _replica_outcome(before: dict[str, int], after: Counter[str]) -> str:
    for reason, count in after.items():
        if count != before.get(reason, 0):
            return reason
    return ""


def _decode_stream(generator: Generator, data: bytes, payloads: list[bytes], limit: int) -> str:
    decoder = FrameDecoder(limit)
    frames: list[bytes] = []
    try:
        for chunk in generator.chunks(data):
            frames.extend(decoder.feed(chunk))
    except FramingError as error:
        return error.reason
    if payloads and frames != payloads:
        raise AssertionError(f"decoded {len(frames)} frames, {len(payloads)} were framed")
    return "partial" if decoder.buffered else "frames"


async def _handshake(attempt: Any) -> str:
    try:
        return await attempt
    except transport_module._HandshakeFailed as failure:  # the refusal path
        return failure.reason


# --- command line ---------------------------------------------------------------------------------


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def print_report(report: FuzzReport) -> None:
    total = sum(report.tried.values())
    print(
        f"inputs       {total} (seed {report.seed}) in {report.seconds:.1f} s "
        f"({report.cpu_seconds:.1f} s CPU): {total / max(report.seconds, 1e-9):,.0f} inputs/s"
    )
    corpus = ", ".join(f"{name} {count}" for name, count in sorted(report.corpus.items()))
    print(f"corpus       {sum(report.corpus.values())} frames: {corpus}")
    print("by category  tried / reached a handler undropped")
    for name in CATEGORIES:
        accepted = f"  {report.accepted[name]:>9}" if name in REPLICA_CATEGORIES else ""
        print(f"  {name:<18} {report.tried[name]:>9}{accepted}")
    print(f"clock ticks  {report.ticks}")
    print(f"crashes      {report.crash_count}")
    for crash in report.crashes:
        print(f"  input {crash.index} ({crash.category}): {crash.error}")
        print(f"    data {crash.data[:64].hex()}{'...' if len(crash.data) > 64 else ''}")
        print(
            f"    reproduce: python -m runtime.inputfuzz --seed {report.seed} "
            f"--inputs {crash.index + 1}"
        )
    print("replica drops by reason")
    for reason, count in report.drops.most_common():
        print(f"  {reason:<34} {count:>9}")
    print("frame decoder  " + ", ".join(f"{k} {v}" for k, v in sorted(report.decoder.items())))
    print("handshakes     " + ", ".join(f"{k} {v}" for k, v in sorted(report.handshakes.items())))
    state = ", ".join(
        f"{k} {v}" + (f" (limit {report.replica_limits[k]})" if k in report.replica_limits else "")
        for k, v in report.replica_state.items()
    )
    print(f"replica at end  {state}")
    print(
        f"memory (RSS)  start {_mib(report.rss_start)}, end {_mib(report.rss_end)}, peak "
        f"{_mib(report.rss_peak)}; by inputs done:"
    )
    for done, rss, cached in report.rss_samples:
        print(f"  {done:>9} inputs  {_mib(rss):>10}  signature cache {cached} entries")
    print(f"outcome digest {report.outcome_digest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.inputfuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    if arguments.inputs < 1:
        parser.error("--inputs must be at least 1")
    if not 0 <= arguments.seed < 2**64:
        parser.error("--seed must be in 0..2**64-1")

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    report = run_fuzz(arguments.inputs, arguments.seed, progress if sys.stderr.isatty() else None)
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    print_report(report)
    return 1 if report.crash_count else 0


if __name__ == "__main__":
    sys.exit(main())
