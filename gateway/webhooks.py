"""Webhooks: merchants' endpoints, and the dispatcher that delivers every payment event to them.

The payment service (gateway/service.py) writes one row per decision into the `events` table
in the same transaction as the payment's update; this module never writes `events`. It owns
the webhook tables below and reads `events` by id after a cursor of its own, kept in SQLite:

- fan-out: for each new event, one `webhook_deliveries` row per endpoint of the event's
  client that existed when the event was written (an endpoint records the last event id at
  its creation), and the cursor moves, all in ONE transaction: every event is fanned out
  exactly once, also across restarts.
- delivery: a due row is claimed (state `sending`, attempts + 1, a lease) before the POST;
  2xx marks it `delivered`; anything else (another status, a redirect, a timeout, a refused
  connection) schedules the next attempt after an exponential backoff with jitter, until
  `max_attempts`, then `failed`. A process killed mid-POST leaves rows in `sending`: the next
  dispatcher puts them back to `pending` at start, so delivery is at least once (a receiver
  may see an event twice; it deduplicates by the event id, which the body and a header
  carry). Deliveries run concurrently (bounded overall and per endpoint); each POST has a
  hard deadline, so a receiver that hangs holds at most its endpoint's share of the slots,
  each for at most `timeout_s`, and never blocks the others. No order is
  promised between events (a retried event arrives after later ones).
- signature: `Pbft-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`,
  signed afresh at each attempt; `verify_signature` is the receiver's check.

One dispatcher per database: the `sending` rows it recovers at start are assumed to be left
by a dead process. SQLite is reached off the trio loop (trio.to_thread), one call at a time
on one connection, so a slow disk never stalls the HTTP server or the PaymentClients.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
import secrets
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import httpx
import trio

from gateway import metrics
from gateway.store import connect

SIGNATURE_HEADER = "Pbft-Signature"
EVENT_ID_HEADER = "Pbft-Event-Id"
ATTEMPT_HEADER = "Pbft-Delivery-Attempt"
USER_AGENT = "pbft-payments-webhooks/1"

EVENT_TYPES = (
    "payment.confirmed",
    "payment.rejected",
    "payment.held",
    "payment.captured",
    "payment.voided",
    "payment.expired",
    "payment.refunded",
)

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 500
MAX_ENDPOINTS_PER_CLIENT = 16
# Endpoints one client may create in 24 h, deleted ones included: bounds create/delete churn
# (each leaves an endpoint row and a replay record for their retention).
MAX_ENDPOINTS_CREATED_PER_DAY = 64
DAY_MS = 24 * 3600 * 1000
MAX_IDEMPOTENCY_KEY_CHARS = 255
MAX_LIST_LIMIT = 100
ERROR_TEXT_CHARS = 200  # what is kept of a failed attempt's reason (never receiver text)
PRUNE_INTERVAL_S = 3600.0

# Delivery states. `sending`: claimed by a dispatcher, POST under way.
PENDING, SENDING, DELIVERED, FAILED = "pending", "sending", "delivered", "failed"

# Delivery results, as counted by the metrics hook: one per attempt.
RESULT_DELIVERED = "delivered"  # 2xx
RESULT_RETRY = "retry"  # failed attempt, another one is scheduled
RESULT_FAILED = "failed"  # failed attempt, no more (max attempts, or the endpoint is gone)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id INTEGER NOT NULL,
    url TEXT NOT NULL,
    description TEXT NOT NULL,
    secret TEXT NOT NULL,
    after_event_id INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    deleted_ms INTEGER
);
CREATE INDEX IF NOT EXISTS webhook_endpoints_by_client ON webhook_endpoints (client_id);
CREATE INDEX IF NOT EXISTS webhook_endpoints_by_client_live
    ON webhook_endpoints (client_id, deleted_ms, created_ms);
-- On gwcore's events table (connect() made it): GET /v1/events walks one client's events
-- newest first with a LIMIT (optionally of one type), never the whole table; the retention
-- DELETE by created_ms walks the old rows only.
CREATE INDEX IF NOT EXISTS events_by_client ON events (client_id, id);
CREATE INDEX IF NOT EXISTS events_by_client_type ON events (client_id, type, id);
CREATE INDEX IF NOT EXISTS events_by_created ON events (created_ms);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id INTEGER NOT NULL,
    endpoint_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms INTEGER NOT NULL,
    last_attempt_ms INTEGER,
    last_status INTEGER,
    last_error TEXT,
    delivered_ms INTEGER,
    created_ms INTEGER NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_attempt_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_by_endpoint
    ON webhook_deliveries (endpoint_id, state);
-- claim_due walks this per endpoint, earliest due first, with a LIMIT.
CREATE INDEX IF NOT EXISTS webhook_deliveries_claim
    ON webhook_deliveries (endpoint_id, state, next_attempt_ms, id);
CREATE TABLE IF NOT EXISTS webhook_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_event_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_idempotency (
    client_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    response BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (client_id, key)
);
"""


class WebhookError(Exception):
    """A request about webhooks that cannot be done; `field` names the input at fault."""

    status = 400
    slug = "invalid-request"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidInput(WebhookError):
    status = 400
    slug = "invalid-webhook-input"


class TooManyEndpoints(WebhookError):
    status = 409
    slug = "too-many-webhook-endpoints"


class EndpointNotFound(WebhookError):
    status = 404
    slug = "webhook-endpoint-not-found"


class IdempotencyMismatch(WebhookError):
    status = 422
    slug = "idempotency-key-reused"


@dataclass(frozen=True)
class WebhookConfig:
    timeout_s: float = 10.0  # hard deadline of one POST, connect to last byte read
    # 1 s, 2 s, 4 s, ... 2048 s, then hourly: 16 attempts over about four hours, so a
    # receiver down for a deploy or an afternoon misses nothing; then `failed` (still listed
    # by GET /v1/events).
    max_attempts: int = 16
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 3600.0
    jitter: float = 0.2  # each delay is stretched by a random factor in [1, 1 + jitter)
    max_concurrency: int = 16
    # In flight to one endpoint at most: a receiver that hangs holds this many slots (each
    # for timeout_s at most), never all of them.
    max_per_endpoint: int = 4
    # In flight for one client at most (all its endpoints): one client's backlog or tarpits
    # leave the rest of the pool to the others, who are served in turn.
    max_per_client: int = 8
    poll_interval_s: float = 0.25  # how often `events` is read for new rows
    batch: int = 100  # events fanned out / deliveries claimed per round
    retention_ms: int = 7 * 24 * 3600 * 1000  # finished deliveries and replay records kept
    idempotency_retention_ms: int = 24 * 3600 * 1000
    seed: int | None = None  # jitter from random.Random(seed) if set, else from the OS
    # The operator's opt-in (`pbft gateway --webhook-allow-private`): endpoints on loopback
    # and private addresses, for tests and local setups. Off: refused at registration and
    # at delivery (after resolution).
    allow_private: bool = False

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.poll_interval_s > 0:
            raise ValueError("webhook timeout and poll interval must be positive")
        if (
            min(
                self.max_attempts,
                self.max_concurrency,
                self.max_per_endpoint,
                self.max_per_client,
                self.batch,
            )
            < 1
        ):
            raise ValueError(
                "webhook max_attempts, max_concurrency, max_per_endpoint, max_per_client and"
                " batch must be >= 1"
            )
        if not 0 < self.backoff_base_s <= self.backoff_cap_s or self.jitter < 0:
            raise ValueError("webhook backoff needs 0 < base <= cap and jitter >= 0")


def backoff_s(attempts: int, config: WebhookConfig, rng: random.Random) -> float:
    """The delay before the next attempt after `attempts` failed ones: base * 2**(n-1), capped,
    then stretched by jitter so that many deliveries failing together do not retry together."""
    exponent = min(max(attempts - 1, 0), 62)
    delay = min(config.backoff_cap_s, config.backoff_base_s * 2.0**exponent)
    return delay * (1.0 + config.jitter * rng.random())


# --- signatures ------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Pbft-Signature header's value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    header: str,
    body: bytes | str,
    tolerance_s: int = 300,
    now: float | None = None,
) -> bool:
    """A receiver's check of a webhook: True only if `header` (the Pbft-Signature value) holds
    a v1 HMAC-SHA256 of "<t>.<body>" under `secret`, and t is within `tolerance_s` of now
    (so a captured request cannot be replayed later). `body` must be the raw bytes received,
    before any JSON parsing. Needs only the standard library: copy it as it is."""
    if len(header) > 4096:
        return False
    raw = body.encode() if isinstance(body, str) else body
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                return False
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + raw, hashlib.sha256)
    expected = mac.hexdigest()
    # compare_digest against every v1 (several appear while a secret is being rotated).
    return any(hmac.compare_digest(expected, c) for c in candidates if c.isascii())


# --- input checks ----------------------------------------------------------------------------


def check_url(url: str, allow_private: bool = False) -> str:
    """The endpoint URL as given, if it is an absolute http(s) URL with a host; InvalidInput
    naming `url` otherwise. Unless `allow_private` (the operator's opt-in, for tests and
    local setups), a host that is a non-public IP address or `localhost` is refused: an API
    key must not make the gateway POST to services that trust its host (SSRF). Names are
    checked again after resolution, at every delivery."""
    if not isinstance(url, str) or not url:
        raise InvalidInput("url is required", "url")
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"url is longer than {MAX_URL_CHARS} characters", "url")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise InvalidInput("url must be ASCII without spaces or control characters", "url")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises on a port that is not a number in range
        parsed = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as error:
        raise InvalidInput(f"url is not a valid URL: {error}", "url") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("url must start with http:// or https://", "url")
    if not parts.hostname or not parsed.host:
        raise InvalidInput("url has no host", "url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("url must not carry a user name or password", "url")
    if parts.fragment:
        raise InvalidInput("url must not have a #fragment", "url")
    _check_host_encodable(parts.hostname)
    if not allow_private:
        host = parts.hostname.rstrip(".").lower()
        if host == "localhost" or host.endswith(".localhost"):
            raise InvalidInput("url must not point at localhost", "url")
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None and not is_public_address(literal):
            raise InvalidInput(
                "url must not point at a loopback, private, link-local, multicast or"
                " reserved address",
                "url",
            )
    del port
    return url


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for every address a webhook must not reach by default."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return False
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def _check_host_encodable(host: str) -> None:
    """Refuses a host name the connect path cannot encode (trio's getaddrinfo uses the idna
    codec, which raises UnicodeError on an empty or 64+-character label): checked here so such
    a URL is never stored, and a delivery never meets it."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        raise InvalidInput("url host is not a valid host name", "url") from None
    labels = encoded.rstrip(b".").split(b".")
    if len(encoded) > 253 or any(not 1 <= len(label) <= 63 for label in labels):
        raise InvalidInput("url host is not a valid host name", "url")


def check_description(description: str | None) -> str:
    if description is None:
        return ""
    if not isinstance(description, str):
        raise InvalidInput("description must be a string", "description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidInput(
            f"description is longer than {MAX_DESCRIPTION_CHARS} characters", "description"
        )
    return description


def parse_prefixed_id(value: str, prefix: str, field: str) -> int:
    """`evt_12` -> 12 (for prefix "evt_"); InvalidInput naming `field` for anything else."""
    digits = value[len(prefix) :] if value.startswith(prefix) else ""
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise InvalidInput(f"{field} must look like {prefix}<number>", field)
    return int(digits)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _clip(text: str) -> str:
    printable = "".join(c if c.isprintable() else "?" for c in text)
    return printable[:ERROR_TEXT_CHARS]


# --- the store (blocking; called off the trio loop) -------------------------------------------


@dataclass(frozen=True)
class Due:
    """A claimed delivery: everything the POST needs."""

    delivery_id: int
    event_id: int
    endpoint_id: int
    url: str
    secret: str
    attempt: int  # 1 for the first
    body: bytes


@dataclass(frozen=True)
class Attempt:
    """One POST's result, to be recorded."""

    due: Due
    ok: bool  # a 2xx answer
    status: int | None  # the HTTP status, None if there was no answer
    error: str  # why it failed ("" if ok)
    at_ms: int
    retry_after_ms: int  # the backoff before the next attempt, if one follows


def _endpoint_json(row: sqlite3.Row | tuple[Any, ...], secret: str | None = None) -> dict:
    endpoint_id, url, description, created_ms = row[0], row[1], row[2], row[3]
    out: dict[str, Any] = {
        "object": "webhook_endpoint",
        "id": f"we_{endpoint_id}",
        "url": url,
        "description": description,
        "created_ms": created_ms,
    }
    if secret is not None:
        out["secret"] = secret
    return out


class WebhookStore:
    """The webhook tables on one sqlite3 connection. Blocking: the async side (Webhooks)
    calls it one method at a time from a worker thread. Every method that writes is one
    transaction (BEGIN IMMEDIATE, so a read-then-write cannot interleave with the service)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        idempotency_retention_ms: int = WebhookConfig.idempotency_retention_ms,
        allow_private: bool = False,
    ) -> None:
        self.conn = conn
        self.idempotency_retention_ms = idempotency_retention_ms
        self.allow_private = allow_private
        conn.executescript(_SCHEMA)
        conn.execute("INSERT OR IGNORE INTO webhook_cursor (id, last_event_id) VALUES (1, 0)")
        conn.commit()

    def _write(self) -> _Transaction:
        return _Transaction(self.conn)

    # endpoints

    def create_endpoint(
        self,
        client_id: int,
        url: str,
        description: str | None,
        idempotency_key: str | None = None,
        now_ms: int | None = None,
    ) -> tuple[int, bytes]:
        """A new endpoint of `client_id`; (HTTP status, response bytes). The response is the
        only place its secret is shown. With an idempotency key, a repeat of the same request
        replays the first response exactly (secret included); another body is 422."""
        url = check_url(url, self.allow_private)
        description = check_description(description)
        if (
            idempotency_key is not None
            and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise InvalidInput(
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                "Idempotency-Key",
            )
        now = _now_ms() if now_ms is None else now_ms
        body_hash = hashlib.sha256(
            _json_bytes({"url": url, "description": description})
        ).hexdigest()
        with self._write() as conn:
            if idempotency_key is not None:
                conn.execute(
                    "DELETE FROM webhook_idempotency WHERE created_ms < ?",
                    (now - self.idempotency_retention_ms,),
                )
                found = conn.execute(
                    "SELECT body_sha256, status_code, response FROM webhook_idempotency"
                    " WHERE client_id = ? AND key = ?",
                    (client_id, idempotency_key),
                ).fetchone()
                if found is not None:
                    if found[0] != body_hash:
                        raise IdempotencyMismatch(
                            "this Idempotency-Key was used with a different body",
                            "Idempotency-Key",
                        )
                    return int(found[1]), bytes(found[2])
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM webhook_endpoints WHERE client_id = ? AND deleted_ms IS NULL",
                (client_id,),
            ).fetchone()
            if count >= MAX_ENDPOINTS_PER_CLIENT:
                raise TooManyEndpoints(
                    f"client {client_id} already has {MAX_ENDPOINTS_PER_CLIENT} webhook"
                    " endpoints; delete one first"
                )
            (recent,) = conn.execute(
                "SELECT COUNT(*) FROM webhook_endpoints WHERE client_id = ? AND created_ms > ?",
                (client_id, now - DAY_MS),
            ).fetchone()
            if recent >= MAX_ENDPOINTS_CREATED_PER_DAY:
                raise TooManyEndpoints(
                    f"client {client_id} created {MAX_ENDPOINTS_CREATED_PER_DAY} webhook"
                    " endpoints in the last 24 hours; try again later"
                )
            (last_event,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
            secret = "whsec_" + secrets.token_urlsafe(32)
            cursor = conn.execute(
                "INSERT INTO webhook_endpoints (client_id, url, description, secret,"
                " after_event_id, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (client_id, url, description, secret, last_event, now),
            )
            endpoint_id = cursor.lastrowid
            response = _json_bytes(
                _endpoint_json((endpoint_id, url, description, now), secret=secret)
            )
            if idempotency_key is not None:
                conn.execute(
                    "INSERT INTO webhook_idempotency (client_id, key, body_sha256, status_code,"
                    " response, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (client_id, idempotency_key, body_hash, 200, response, now),
                )
            return 200, response

    def list_endpoints(self, client_id: int) -> dict:
        rows = self.conn.execute(
            "SELECT id, url, description, created_ms FROM webhook_endpoints"
            " WHERE client_id = ? AND deleted_ms IS NULL ORDER BY id",
            (client_id,),
        ).fetchall()
        self.conn.commit()
        return {"object": "list", "data": [_endpoint_json(r) for r in rows], "has_more": False}

    def delete_endpoint(self, client_id: int, endpoint: str, now_ms: int | None = None) -> dict:
        """Deletes one of `client_id`'s endpoints (another client's is not found: no leak of
        which ids exist). Its deliveries not made yet fail now (one being sent finishes its
        try, and records its result)."""
        endpoint_id = parse_prefixed_id(endpoint, "we_", "id")
        now = _now_ms() if now_ms is None else now_ms
        with self._write() as conn:
            found = conn.execute(
                "SELECT id FROM webhook_endpoints WHERE id = ? AND client_id = ?"
                " AND deleted_ms IS NULL",
                (endpoint_id, client_id),
            ).fetchone()
            if found is None:
                raise EndpointNotFound(f"no webhook endpoint {endpoint}", "id")
            conn.execute(
                # The secret is no longer needed (nothing more is signed with it): forgotten.
                "UPDATE webhook_endpoints SET deleted_ms = ?, secret = '' WHERE id = ?",
                (now, endpoint_id),
            )
            # The replay record of its creation holds the secret too: forgotten with it (a
            # retry of that Idempotency-Key then makes a new endpoint, never the dead one).
            conn.execute(
                "DELETE FROM webhook_idempotency WHERE client_id = ?"
                " AND json_extract(CAST(response AS TEXT), '$.id') = ?",
                (client_id, f"we_{endpoint_id}"),
            )
            conn.execute(
                "UPDATE webhook_deliveries SET state = ?, last_error = ?"
                " WHERE endpoint_id = ? AND state IN (?, ?)",
                (FAILED, "endpoint deleted", endpoint_id, PENDING, SENDING),
            )
        return {"object": "webhook_endpoint", "id": f"we_{endpoint_id}", "deleted": True}

    # the dispatcher's side

    def recover(self, now_ms: int) -> int:
        """Puts deliveries a dead dispatcher left in `sending` back to due now; their count."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE webhook_deliveries SET state = ?, next_attempt_ms = ? WHERE state = ?",
                (PENDING, now_ms, SENDING),
            )
            return cursor.rowcount

    def fan_out(self, now_ms: int, batch: int) -> int:
        """Reads up to `batch` events after the cursor, makes their delivery rows, and moves
        the cursor past them, in one transaction. Returns how many events it read."""
        # A read first: an idle gateway never takes the write lock (fetchall: a statement
        # left unfinished would pin an old snapshot).
        [(cursor,)] = self.conn.execute(
            "SELECT last_event_id FROM webhook_cursor WHERE id = 1"
        ).fetchall()
        if not self.conn.execute("SELECT 1 FROM events WHERE id > ? LIMIT 1", (cursor,)).fetchall():
            return 0
        with self._write() as conn:
            (cursor,) = conn.execute(
                "SELECT last_event_id FROM webhook_cursor WHERE id = 1"
            ).fetchone()
            events = conn.execute(
                "SELECT id, client_id FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (cursor, batch),
            ).fetchall()
            if not events:
                return 0
            for event_id, client_id in events:
                conn.execute(
                    "INSERT OR IGNORE INTO webhook_deliveries (event_id, endpoint_id, state,"
                    " attempts, next_attempt_ms, created_ms)"
                    " SELECT ?, id, ?, 0, ?, ? FROM webhook_endpoints"
                    " WHERE client_id = ? AND deleted_ms IS NULL AND after_event_id < ?",
                    (event_id, PENDING, now_ms, now_ms, client_id, event_id),
                )
            conn.execute(
                "UPDATE webhook_cursor SET last_event_id = ? WHERE id = 1", (events[-1][0],)
            )
            return len(events)

    def claim_due(
        self,
        now_ms: int,
        limit: int,
        lease_ms: int,
        per_endpoint: int,
        sending: Mapping[int, int] | None = None,
        max_attempts: int = WebhookConfig.max_attempts,
        per_client: int = WebhookConfig.max_per_client,
    ) -> list[Due]:
        """Up to `limit` due deliveries, at most `per_endpoint` in flight per endpoint and
        `per_client` per client (so neither a receiver that hangs nor one client's backlog
        can take every slot), clients taken in turn, each one's earliest first; marked
        `sending` with one more attempt counted and a lease of `lease_ms`: a crash from here
        on leaves them for recover() at the next start, and one whose result could not be
        recorded (the database failed) is due again when its lease ends. `sending`: delivery
        id -> endpoint id of what this dispatcher is sending now (never claimed twice).
        A row whose attempts are used up (a delivery that crashed the process each time)
        or whose event is gone (pruned) is marked failed instead of claimed.

        Cost: candidates are read outside the write transaction, per live endpoint, by a
        walk of the (endpoint_id, state, next_attempt_ms) index with a LIMIT, so a backlog
        of any size costs about `limit` rows; the write lock is held only to claim those."""
        sending = sending or {}
        if limit <= 0:
            return []
        endpoints = self.conn.execute(
            "SELECT id, client_id FROM webhook_endpoints WHERE deleted_ms IS NULL"
        ).fetchall()
        client_of = dict(endpoints)
        by_endpoint = Counter(sending.values())
        by_client = Counter(client_of.get(e, -1) for e in sending.values())
        candidates: dict[int, list[tuple[int, int, int, int]]] = {}
        for endpoint_id, client_id in endpoints:
            room = min(
                per_endpoint - by_endpoint[endpoint_id], per_client - by_client[client_id]
            )
            if room <= 0:
                continue
            rows: list[tuple[int, int, int, int]] = []
            # One index walk per state: each in next_attempt_ms order, so LIMIT stops early.
            for state in (PENDING, SENDING):
                rows += self.conn.execute(
                    "SELECT next_attempt_ms, id, endpoint_id, attempts FROM webhook_deliveries"
                    " WHERE endpoint_id = ? AND state = ? AND next_attempt_ms <= ?"
                    " ORDER BY next_attempt_ms, id LIMIT ?",
                    (endpoint_id, state, now_ms, room + len(sending)),
                ).fetchall()
            rows = sorted(r for r in rows if r[1] not in sending)[:room]
            if rows:
                candidates.setdefault(client_id, []).extend(rows)
        if not candidates:
            return []  # nothing due: no write lock taken
        # Clients in turn (the one with the earliest due row first), each its earliest first.
        queues = sorted(sorted(rows) for rows in candidates.values())
        order: list[tuple[int, int, int, int]] = []
        while queues:
            order += [queue.pop(0) for queue in queues]
            queues = [queue for queue in queues if queue]
        claimed: list[Due] = []
        with self._write() as conn:
            for _, delivery_id, endpoint_id, attempts in order:
                if len(claimed) == limit:
                    break
                client_id = client_of[endpoint_id]
                if by_endpoint[endpoint_id] >= per_endpoint or by_client[client_id] >= per_client:
                    continue
                found = conn.execute(
                    "SELECT d.event_id, e.url, e.secret, ev.body, d.attempts"
                    " FROM webhook_deliveries d"
                    " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
                    " LEFT JOIN events ev ON ev.id = d.event_id"
                    " WHERE d.id = ? AND d.state IN (?, ?) AND d.next_attempt_ms <= ?"
                    " AND e.deleted_ms IS NULL",
                    (delivery_id, PENDING, SENDING, now_ms),
                ).fetchall()
                if not found:
                    continue  # changed since the read (deleted endpoint, recorded result)
                event_id, url, secret, body, attempts = found[0]
                reason = (
                    "event pruned"
                    if body is None
                    else "attempts used up"
                    if attempts >= max_attempts
                    else None
                )
                if reason is not None:
                    conn.execute(
                        "UPDATE webhook_deliveries SET state = ?, last_error = ? WHERE id = ?",
                        (FAILED, reason, delivery_id),
                    )
                    continue
                by_endpoint[endpoint_id] += 1
                by_client[client_id] += 1
                conn.execute(
                    "UPDATE webhook_deliveries SET state = ?, attempts = ?, last_attempt_ms = ?,"
                    " next_attempt_ms = ? WHERE id = ?",
                    (SENDING, attempts + 1, now_ms, now_ms + lease_ms, delivery_id),
                )
                raw = body.encode() if isinstance(body, str) else bytes(body)
                claimed.append(
                    Due(delivery_id, event_id, endpoint_id, url, secret, attempts + 1, raw)
                )
        return claimed

    def finish(self, attempts: Sequence[Attempt], max_attempts: int) -> list[str]:
        """Records attempts' results, all in one transaction (one fsync for a round of
        deliveries, not one each): delivered, pending again (after its backoff) or failed
        (attempts used up, or the endpoint was deleted meanwhile). Returns the results."""
        results: list[str] = []
        with self._write() as conn:
            for attempt in attempts:
                due = attempt.due
                if attempt.ok:
                    conn.execute(
                        "UPDATE webhook_deliveries SET state = ?, last_status = ?,"
                        " last_error = NULL, delivered_ms = ? WHERE id = ?",
                        (DELIVERED, attempt.status, attempt.at_ms, due.delivery_id),
                    )
                    results.append(RESULT_DELIVERED)
                    continue
                [(deleted,)] = conn.execute(
                    "SELECT deleted_ms IS NOT NULL FROM webhook_endpoints WHERE id = ?",
                    (due.endpoint_id,),
                ).fetchall()
                give_up = bool(deleted) or due.attempt >= max_attempts
                conn.execute(
                    "UPDATE webhook_deliveries SET state = ?, last_status = ?, last_error = ?,"
                    " next_attempt_ms = ? WHERE id = ?",
                    (
                        FAILED if give_up else PENDING,
                        attempt.status,
                        _clip(attempt.error),
                        attempt.at_ms + attempt.retry_after_ms,
                        due.delivery_id,
                    ),
                )
                results.append(RESULT_FAILED if give_up else RESULT_RETRY)
        return results

    def expire(self, now_ms: int, retention_ms: int) -> int:
        """Marks deliveries still pending after the retention (a gateway down longer than
        that) failed with `expired`, never deleting them silently; their count. They stay
        listed, as failed, for another retention period."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE webhook_deliveries SET state = ?, last_error = ?, next_attempt_ms = ?"
                " WHERE state = ? AND created_ms < ?",
                (FAILED, "expired", now_ms, PENDING, now_ms - retention_ms),
            )
            return cursor.rowcount

    def prune(self, now_ms: int, retention_ms: int) -> int:
        """Drops finished (delivered or failed) deliveries whose last activity is older than
        the retention (their events may be gone too), replay records older than theirs, and
        deleted endpoints without deliveries, so the tables stay bounded. Undelivered rows
        are never dropped: expire() marks old ones failed first."""
        self.expire(now_ms, retention_ms)
        cutoff = now_ms - retention_ms
        with self._write() as conn:
            cursor = conn.execute(
                "DELETE FROM webhook_deliveries WHERE state IN (?, ?) AND created_ms < ?"
                " AND next_attempt_ms < ?",
                (DELIVERED, FAILED, cutoff, cutoff),
            )
            conn.execute(
                "DELETE FROM webhook_idempotency WHERE created_ms < ?",
                (now_ms - self.idempotency_retention_ms,),
            )
            # Deleted endpoints go once their last delivery has: creating and deleting
            # endpoints in a loop cannot grow the table without bound.
            conn.execute(
                "DELETE FROM webhook_endpoints WHERE deleted_ms < ? AND NOT EXISTS"
                " (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = webhook_endpoints.id)",
                (now_ms - retention_ms,),
            )
            return cursor.rowcount

    # events, as the API lists them

    def list_events(
        self,
        client_id: int,
        event_type: str | None,
        limit: int,
        starting_after: str | None,
    ) -> dict:
        """`client_id`'s events, newest first, each with its delivery state per endpoint.
        `starting_after` is the last event id of the previous page: the page after it holds
        older events."""
        if event_type is not None and event_type not in EVENT_TYPES:
            raise InvalidInput(f"type must be one of {', '.join(EVENT_TYPES)}", "type")
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidInput(f"limit must be 1 to {MAX_LIST_LIMIT}", "limit")
        before = (
            None
            if starting_after is None
            else parse_prefixed_id(starting_after, "evt_", "starting_after")
        )
        query = "SELECT id, body FROM events WHERE client_id = ?"
        args: list[Any] = [client_id]
        if event_type is not None:
            query += " AND type = ?"
            args.append(event_type)
        if before is not None:
            query += " AND id < ?"
            args.append(before)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit + 1)
        rows = self.conn.execute(query, args).fetchall()
        has_more = len(rows) > limit
        rows = rows[:limit]
        deliveries: dict[int, list[dict]] = {}
        if rows:
            ids = [r[0] for r in rows]
            marks = ",".join("?" * len(ids))
            for row in self.conn.execute(
                "SELECT event_id, endpoint_id, state, attempts, next_attempt_ms,"
                " last_attempt_ms, last_status, last_error, delivered_ms"
                f" FROM webhook_deliveries WHERE event_id IN ({marks}) ORDER BY endpoint_id",
                ids,
            ):
                deliveries.setdefault(row[0], []).append(
                    {
                        "endpoint": f"we_{row[1]}",
                        "state": row[2],
                        "attempts": row[3],
                        "next_attempt_ms": row[4] if row[2] == PENDING else None,
                        "last_attempt_ms": row[5],
                        "last_status": row[6],
                        "last_error": row[7],
                        "delivered_ms": row[8],
                    }
                )
        self.conn.commit()
        data = []
        for event_id, body in rows:
            event = json.loads(body)
            event["deliveries"] = deliveries.get(event_id, [])
            data.append(event)
        return {"object": "list", "data": data, "has_more": has_more}


class _Transaction:
    """`with` block = one BEGIN IMMEDIATE transaction: commit on success, roll back on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        if self.conn.in_transaction:
            self.conn.commit()
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self.conn.commit()
        else:
            self.conn.rollback()


# --- the async side ----------------------------------------------------------------------------

T = TypeVar("T")


class Webhooks:
    """The webhook store reached from trio (one call at a time, each in a worker thread), the
    config, and the metrics hook. One per gateway process; `dispatch()` is its dispatcher."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: WebhookConfig | None = None,
        on_result: Callable[[str], None] | None = None,
        read_conn: sqlite3.Connection | None = None,
    ) -> None:
        self.config = config or WebhookConfig()
        self.store = WebhookStore(
            conn, self.config.idempotency_retention_ms, self.config.allow_private
        )
        self.on_result = on_result
        self._limiter = trio.CapacityLimiter(1)
        # The API's reads (GET /v1/events, endpoint lists) on a connection and limiter of
        # their own, if given: a reader never makes the dispatcher wait (WAL: no lock).
        self._reader = (
            self.store
            if read_conn is None
            else WebhookStore(read_conn, self.config.idempotency_retention_ms)
        )
        self._read_limiter = self._limiter if read_conn is None else trio.CapacityLimiter(1)
        self._rng: random.Random = (
            random.SystemRandom() if self.config.seed is None else random.Random(self.config.seed)
        )
        self._wakeup = trio.Event()
        # What this dispatcher is sending now: delivery id -> endpoint id.
        self._sending: dict[int, int] = {}
        self.counts: Counter[str] = Counter()

    def statistics(self) -> dict[str, int]:
        """Attempts by result since this process started, and store errors."""
        return dict(self.counts)

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        """Runs a WebhookStore method off the trio loop; never two at once (one connection)."""
        return await trio.to_thread.run_sync(lambda: method(*args), limiter=self._limiter)

    # the API's side

    async def create_endpoint(
        self, client_id: int, url: str, description: str | None, idempotency_key: str | None
    ) -> tuple[int, bytes]:
        return await self.call(
            self.store.create_endpoint, client_id, url, description, idempotency_key
        )

    async def _read(self, method: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(lambda: method(*args), limiter=self._read_limiter)

    async def list_endpoints(self, client_id: int) -> dict:
        return await self._read(self._reader.list_endpoints, client_id)

    async def delete_endpoint(self, client_id: int, endpoint: str) -> dict:
        return await self.call(self.store.delete_endpoint, client_id, endpoint)

    async def list_events(
        self, client_id: int, event_type: str | None, limit: int, starting_after: str | None
    ) -> dict:
        return await self._read(
            self._reader.list_events, client_id, event_type, limit, starting_after
        )

    # the dispatcher

    async def dispatch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Runs until cancelled: fans new events out, sends what is due, at most
        `max_concurrency` POSTs at a time. Reports started once the store is recovered."""
        config = self.config
        await self.call(self.store.recover, _now_ms())
        slots = trio.Semaphore(config.max_concurrency)
        # The lease outlasts an attempt's hard deadline: only a result that could not be
        # recorded lets it run out.
        lease_ms = int(config.timeout_s * 1000) + 5000
        async with (
            httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(config.timeout_s),
                limits=httpx.Limits(
                    max_connections=config.max_concurrency,
                    max_keepalive_connections=config.max_concurrency,
                ),
                headers={"User-Agent": USER_AGENT},
            ) as http,
            trio.open_nursery() as nursery,
        ):
            # Each delivery in flight sends one result: room for all of them.
            results_in, results_out = trio.open_memory_channel[Attempt](config.max_concurrency)
            nursery.start_soon(self._record, results_out, slots)
            task_status.started()
            last_prune = float("-inf")
            while True:
                self._wakeup = trio.Event()
                try:
                    now = _now_ms()
                    while await self.call(self.store.fan_out, now, config.batch) == config.batch:
                        await trio.sleep(0)  # a backlog: keep reading, but let others run
                    limit = min(slots.value, config.batch)
                    claimed = await self.call(
                        self.store.claim_due,
                        now,
                        limit,
                        lease_ms,
                        config.max_per_endpoint,
                        dict(self._sending),
                        config.max_attempts,
                        config.max_per_client,
                    )
                    for due in claimed:
                        await slots.acquire()
                        self._sending[due.delivery_id] = due.endpoint_id
                        nursery.start_soon(self._deliver, http, due, results_in)
                    if trio.current_time() - last_prune > PRUNE_INTERVAL_S:
                        last_prune = trio.current_time()
                        expired = await self.call(self.store.expire, now, config.retention_ms)
                        self.counts["expired"] += expired
                        await self.call(self.store.prune, now, config.retention_ms)
                except sqlite3.Error:
                    # The database busy past its timeout, or the disk full: try again at
                    # the next round; what is not recorded is not lost (the cursor and the
                    # rows did not move).
                    self.counts["store_error"] += 1
                except Exception:  # the dispatcher must outlive any one round
                    # A bug or a row this code did not foresee: never let it stop the
                    # gateway (and again at every restart); counted, retried next round.
                    self.counts["internal_error"] += 1
                with trio.move_on_after(config.poll_interval_s):
                    await self._wakeup.wait()

    async def _deliver(
        self, http: httpx.AsyncClient, due: Due, results: trio.MemorySendChannel[Attempt]
    ) -> None:
        try:
            ok, status, error = await self._post(http, due)
        except Exception as exc:  # one delivery must never kill the dispatcher
            ok, status, error = False, None, f"internal: {type(exc).__name__}"
            self.counts["internal_error"] += 1
        retry_after_ms = int(backoff_s(due.attempt, self.config, self._rng) * 1000)
        await results.send(Attempt(due, ok, status, error, _now_ms(), retry_after_ms))

    async def _record(
        self, results: trio.MemoryReceiveChannel[Attempt], slots: trio.Semaphore
    ) -> None:
        """Writes results as they come, all those waiting in one transaction; a slot is
        free again once its result is recorded (or could not be)."""
        async for first in results:
            batch = [first]
            while True:
                try:
                    batch.append(results.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                recorded = await self.call(self.store.finish, batch, self.config.max_attempts)
            except sqlite3.Error:
                # Not recorded: the rows stay `sending` and are sent again when their
                # leases end (at least once).
                self.counts["store_error"] += 1
                recorded = []
            except Exception:  # as above: the rows' leases end
                self.counts["internal_error"] += 1
                recorded = []
            for result in recorded:
                self.counts[result] += 1
                if self.on_result is not None:
                    self.on_result(result)
            for attempt in batch:
                self._sending.pop(attempt.due.delivery_id, None)
                slots.release()
            self._wakeup.set()  # slots are free: claim more without waiting for the poll

    async def _post(self, http: httpx.AsyncClient, due: Due) -> tuple[bool, int | None, str]:
        """One attempt: (2xx?, HTTP status or None, why it failed). Never raises for what the
        receiver does: a hard deadline bounds it, and the answer's body is never read."""
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(due.secret, timestamp, due.body),
            EVENT_ID_HEADER: f"evt_{due.event_id}",
            ATTEMPT_HEADER: str(due.attempt),
        }
        status: int | None = None
        with trio.move_on_after(self.config.timeout_s) as scope:
            try:
                target, extensions = await self._pin(due.url, headers)
                if target is None:
                    return False, None, "target address not allowed"
                async with http.stream(
                    "POST", target, content=due.body, headers=headers, extensions=extensions
                ) as r:
                    status = r.status_code
                    if 200 <= status < 300:
                        return True, status, ""
                    # The answer is not read, let alone kept: GET /v1/events shows it to the
                    # merchant, and a receiver's text must never leak through the gateway.
                    return False, status, f"HTTP {status}"
            # What a receiver can make go wrong: refused, reset, garbled HTTP, TLS, a URL
            # that no longer resolves. Counted as a failed attempt, never raised; only the
            # error's class is kept. ValueError: UnicodeError from the idna codec on a host
            # name stored before check_url refused such names.
            except (
                httpx.HTTPError,
                httpx.InvalidURL,
                httpx.StreamError,
                OSError,
                ValueError,
            ) as error:
                return False, status, type(error).__name__
        assert scope.cancelled_caught
        return False, status, f"no answer within {self.config.timeout_s:g} s"


    async def _pin(
        self, url: str, headers: dict[str, str]
    ) -> tuple[httpx.URL | None, dict[str, Any]]:
        """Resolves `url`'s host once, checks every address (unless allow_private), and
        returns the URL with the host replaced by the first address, so that the connection
        goes where the check looked (DNS rebinding); the Host header and TLS SNI keep the name.
        (None, {}) when an address is not allowed."""
        parsed = httpx.URL(url)
        host = parsed.host
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = (
                ipaddress.ip_address(host)
            )
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise OSError(f"{host} did not resolve")
        if not self.config.allow_private and not all(map(is_public_address, addresses)):
            return None, {}
        if literal is not None:
            return parsed, {}
        headers["Host"] = parsed.netloc.decode("ascii")
        extensions: dict[str, Any] = {}
        if parsed.scheme == "https":
            extensions["sni_hostname"] = host
        return parsed.copy_with(host=str(addresses[0])), extensions


# --- the gateway's webhooks --------------------------------------------------------------------

# One Webhooks per Gateway object (the routes and the dispatcher share it), made on first use.
_of_gateway: WeakKeyDictionary[Any, Webhooks] = WeakKeyDictionary()
_making = trio.Lock()


async def webhooks_of(gateway: Any, config: WebhookConfig | None = None) -> Webhooks:
    """The Webhooks of `gateway` (gateway/service.py's Gateway), on a connection of its own
    to the gateway's database; `config` applies only to the first call."""
    async with _making:
        hooks = _of_gateway.get(gateway)
        if hooks is None:
            path = gateway.store.path
            conn = await trio.to_thread.run_sync(connect, path)
            reader = await trio.to_thread.run_sync(connect, path)
            hooks = await trio.to_thread.run_sync(Webhooks, conn, config, _count, reader)
            _of_gateway[gateway] = hooks
        return hooks


def _count(result: str) -> None:
    metrics.webhook_deliveries.labels(result=result).inc()


async def run(
    gateway: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The dispatcher of `gateway`'s webhooks, until cancelled (gateway/server.py starts it
    beside the HTTP server)."""
    hooks = await webhooks_of(gateway)
    await hooks.dispatch(task_status=task_status)
