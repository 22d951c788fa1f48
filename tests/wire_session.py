"""The transport's wire format (handshake version 2 and sealed frames), written out for tests.

Independent of runtime/transport.py: built from the module docstring and `cryptography`'s
primitives, so a change of the wire format breaks the tests that use it.
"""

from __future__ import annotations

import hashlib
import os
import struct

import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crypto.keys import SigningKey

ROLE_CODES = {"replica": 0, "client": 1}
CLIENT_DOMAIN = b"pbft/v2/handshake"
SERVER_DOMAIN = b"pbft/v2/handshake-accept"
TAG = 16


def wire_principal(principal: tuple[str, int]) -> bytes:
    return struct.pack(">BQ", ROLE_CODES[principal[0]], principal[1])


def principal_of(raw: bytes) -> tuple[str, int]:
    return ("replica" if raw[0] == 0 else "client", struct.unpack(">Q", raw[1:])[0])


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


async def read_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


async def read_frame(stream: trio.SocketStream) -> bytes:
    (length,) = struct.unpack(">I", await read_exactly(stream, 4))
    return await read_exactly(stream, length)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Hello:
    """The accepting side's HELLO, taken apart."""

    def __init__(self, raw: bytes) -> None:
        assert len(raw) == 75 and raw[:2] == b"H\x02", raw
        self.raw = raw
        self.nonce = raw[2:34]
        self.server = raw[34:43]
        self.ephemeral = raw[43:75]


async def read_hello(stream: trio.SocketStream) -> Hello:
    return Hello(await read_frame(stream))


def make_hello(server: tuple[str, int], ephemeral: X25519PrivateKey, version: int = 2) -> bytes:
    return (
        b"H" + bytes([version]) + os.urandom(32) + wire_principal(server) + public_bytes(ephemeral)
    )


def transcript(hello: bytes, auth_unsigned: bytes) -> bytes:
    return hashlib.sha256(hello + auth_unsigned).digest()


def keys(shared: bytes, digest: bytes) -> tuple[bytes, bytes]:
    """(client -> server, server -> client)."""
    okm = HKDF(hashes.SHA256(), 64, None, b"pbft/v2/session" + digest).derive(shared)
    return okm[:32], okm[32:]


class Cipher:
    """One direction: ChaCha20-Poly1305, nonce = 4 zero bytes | u64 counter, AD = length."""

    def __init__(self, key: bytes) -> None:
        self.aead = ChaCha20Poly1305(key)
        self.counter = 0

    def _nonce(self) -> bytes:
        nonce = bytes(4) + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def seal(self, payload: bytes) -> bytes:
        header = struct.pack(">I", len(payload) + TAG)
        return header + self.aead.encrypt(self._nonce(), payload, header)

    def open(self, ciphertext: bytes) -> bytes:
        return self.aead.decrypt(self._nonce(), ciphertext, struct.pack(">I", len(ciphertext)))


class Auth:
    """An AUTH answering `hello` as `claimed`, signed with `key`, and the session it makes."""

    def __init__(
        self,
        hello: Hello,
        claimed: tuple[str, int],
        key: SigningKey,
        client_nonce: bytes = b"\x07" * 32,
    ) -> None:
        self.ephemeral = X25519PrivateKey.generate()
        unsigned = b"A" + wire_principal(claimed) + client_nonce + public_bytes(self.ephemeral)
        self.transcript = transcript(hello.raw, unsigned)
        self.raw = unsigned + key.sign(CLIENT_DOMAIN, self.transcript)
        shared = self.ephemeral.exchange(X25519PublicKey.from_public_bytes(hello.ephemeral))
        outbound, inbound = keys(shared, self.transcript)
        self.sealer = Cipher(outbound)
        self.opener = Cipher(inbound)


class RawPeer:
    """A connection whose handshake a test did by hand: sealed frames both ways."""

    def __init__(self, stream: trio.SocketStream, auth: Auth) -> None:
        self.stream = stream
        self.sealer = auth.sealer
        self.opener = auth.opener

    async def send(self, payload: bytes) -> None:
        await self.stream.send_all(self.sealer.seal(payload))

    async def receive(self) -> bytes:
        return self.opener.open(await read_frame(self.stream))
