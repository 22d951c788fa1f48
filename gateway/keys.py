"""API keys: a Bearer token per merchant integration, each mapped to one cluster client.

A token is `gk_` + 32 random bytes in urlsafe base64, printed once when created; the
database keeps only its SHA-256 (a leaked database does not leak usable keys), the client
id, when it was created and when it was revoked. Every route receives the `Caller` its
token names.

The functions below take an open sqlite3 connection (gateway/store.py's `connect`): the
CLI (`pbft gateway-key`) calls them directly, the gateway through its store's worker.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass

TOKEN_PREFIX = "gk_"
TOKEN_BYTES = 32
# gk_ + 43 base64 characters; anything much longer is not a token (checked before hashing).
MAX_TOKEN_LENGTH = 128
MAX_CLIENT_ID = 2**32 - 1


class ApiKeyError(ValueError):
    """An API key operation that cannot be done (unknown key id, bad client id); the
    message says what in one line."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the cluster client the API key acts as, and the key's id."""

    client_id: int
    key_id: int


@dataclass(frozen=True)
class ApiKey:
    key_id: int
    client_id: int
    created_ms: int
    revoked_ms: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.key_id,
            "client": self.client_id,
            "created_ms": self.created_ms,
            "revoked": self.revoked_ms is not None,
            "revoked_ms": self.revoked_ms,
        }


def new_token() -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).decode(
        "ascii"
    ).rstrip("=")


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None if there is none or it
    is not a well-formed gateway token (never an exception: it is outside input)."""
    if authorization is None or len(authorization) > MAX_TOKEN_LENGTH + 16:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX):
        return None
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        return None
    return token


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def create_key(db: sqlite3.Connection, client_id: int) -> tuple[ApiKey, str]:
    """A new key for `client_id`: the stored record and the token (shown once)."""
    if type(client_id) is not int or not 0 <= client_id <= MAX_CLIENT_ID:
        raise ApiKeyError(f"client id must be an integer in 0..{MAX_CLIENT_ID}, got {client_id!r}")
    token = new_token()
    created = _now_ms()
    with db:
        cursor = db.execute(
            "INSERT INTO api_keys (token_sha256, client_id, created_ms) VALUES (?, ?, ?)",
            (token_hash(token), client_id, created),
        )
    key_id = cursor.lastrowid
    assert key_id is not None
    return ApiKey(key_id, client_id, created, None), token


def list_keys(db: sqlite3.Connection, client_id: int | None = None) -> list[ApiKey]:
    query = "SELECT id, client_id, created_ms, revoked_ms FROM api_keys"
    rows = (
        db.execute(query + " ORDER BY id")
        if client_id is None
        else db.execute(query + " WHERE client_id = ? ORDER BY id", (client_id,))
    )
    return [ApiKey(*row) for row in rows]


def revoke_key(db: sqlite3.Connection, key_id: int) -> ApiKey:
    """Revoke key `key_id` (revoking a revoked key keeps its first revocation time)."""
    with db:
        row = db.execute(
            "SELECT id, client_id, created_ms, revoked_ms FROM api_keys WHERE id = ?", (key_id,)
        ).fetchone()
        if row is None:
            raise ApiKeyError(f"no API key with id {key_id}")
        if row[3] is None:
            revoked = _now_ms()
            db.execute("UPDATE api_keys SET revoked_ms = ? WHERE id = ?", (revoked, key_id))
            row = (*row[:3], revoked)
    return ApiKey(*row)


def lookup_token(db: sqlite3.Connection, token: str) -> Caller | None:
    """The caller a live (not revoked) token names, None for any other token."""
    row = db.execute(
        "SELECT id, client_id FROM api_keys WHERE token_sha256 = ? AND revoked_ms IS NULL",
        (token_hash(token),),
    ).fetchone()
    return None if row is None else Caller(client_id=row[1], key_id=row[0])
