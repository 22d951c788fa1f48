"""Problems: the gateway's errors, rendered by the HTTP layer as RFC 9457 problem details.

A `Problem` carries everything its `application/problem+json` body says; `body()` is that
body as a dict and `to_bytes()` the exact bytes (stored for idempotent replay, so a replay
after a restart sends the same bytes). The service raises Problem for what it refuses
before anything is recorded (401, 403, 404, 409 in flight, 422 key reuse); a refusal the
cluster decided is recorded and replayed like a success (see gateway/service.py).
"""

from __future__ import annotations

import json
from typing import Any

PROBLEM_BASE = "https://pbft-payments.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


def dumps(body: object) -> bytes:
    """The one JSON encoding of every body the gateway stores or sends (compact, ordered as
    built), so stored bytes and freshly built bytes never differ in form."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Problem(Exception):
    """One HTTP error as RFC 9457 describes it. `type_slug` names the problem type under
    PROBLEM_BASE; `field` names the input at fault (a body field, a header, a path
    parameter) when there is one; `extra` adds members (for example "payment_id" on a
    cluster timeout, "reason" and "operation" on a rejected operation)."""

    def __init__(
        self,
        status: int,
        type_slug: str,
        title: str,
        detail: str,
        field: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {type_slug}: {detail}")
        self.status = status
        self.type_slug = type_slug
        self.title = title
        self.detail = detail
        self.field = field
        self.extra = extra

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.type_slug

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body

    def to_bytes(self) -> bytes:
        return dumps(self.body())


# The problem types the service raises, one constructor each so titles stay consistent.


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Missing or invalid API key", detail, "Authorization")


def forbidden(detail: str, field: str | None = None, **extra: Any) -> Problem:
    return Problem(403, "forbidden", "Not allowed for this API key", detail, field, **extra)


def not_found(detail: str, field: str | None = None) -> Problem:
    return Problem(404, "not-found", "No such object", detail, field)


def unknown_account(name: str, field: str, status: int = 422) -> Problem:
    """An account the cluster does not have: 422 in a request body, 404 as the path's
    subject (GET /v1/accounts/{name})."""
    return Problem(
        status, "unknown-account", "Unknown account", f"no account {name!r} in this cluster", field
    )


def invalid_field(detail: str, field: str, **extra: Any) -> Problem:
    """A body field the service itself refuses (after the HTTP layer's shape checks)."""
    return Problem(422, "invalid-field", "Invalid field", detail, field, **extra)


def invalid_parameter(detail: str, field: str) -> Problem:
    """A path or query parameter the service refuses."""
    return Problem(400, "invalid-parameter", "Invalid parameter", detail, field)


def invalid_header(detail: str, field: str) -> Problem:
    return Problem(400, "invalid-header", "Invalid header", detail, field)


def invalid_request(detail: str) -> Problem:
    """A request the cluster's wire format cannot carry, found only when sending it."""
    return Problem(400, "invalid-request", "Invalid request", detail)


def key_in_flight(key: str) -> Problem:
    return Problem(
        409,
        "idempotency-key-in-flight",
        "Request with this Idempotency-Key still in flight",
        "the first request with this Idempotency-Key is still being processed; retry later",
        "Idempotency-Key",
    )


def key_reused(route: str) -> Problem:
    return Problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused with a different request",
        f"this Idempotency-Key was first used for a different request ({route}); "
        "use a new key for a new request",
        "Idempotency-Key",
    )


def cluster_timeout(payment_id: str | None, seconds: float, **extra: Any) -> Problem:
    what = f"payment {payment_id}" if payment_id else "the request"
    return Problem(
        504,
        "cluster-timeout",
        "The cluster did not answer in time",
        f"no decision for {what} within {seconds:g} s; it may still be decided: "
        "GET it, or retry with the same Idempotency-Key",
        payment_id=payment_id,
        **extra,
    )


def cluster_unavailable(detail: str) -> Problem:
    return Problem(503, "cluster-unavailable", "The cluster cannot take the request now", detail)


def operation_rejected(reason: str, operation: dict[str, Any], payment_id: str) -> Problem:
    return Problem(
        409,
        "operation-rejected",
        "The cluster rejected the operation",
        f"the cluster rejected the {operation.get('op', 'operation')} of {payment_id}: {reason}",
        reason=reason,
        payment_id=payment_id,
        operation=operation,
    )
