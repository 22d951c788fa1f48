"""The gateway's HTTP API: a FastAPI application over one Gateway (gateway/service.py).

This module owns the shape of the API and nothing of its substance: it checks each
request's form (pydantic models with strict types and no unknown fields, the
Idempotency-Key header, a body size limit enforced before anything parses the body), asks
the PaymentService, and sends what it answers. Every error, whatever raised it, leaves as
an RFC 9457 `application/problem+json` body that names the field at fault; an unexpected
exception is logged here and answered 500 without its internals.

Mutating routes send the service's `Stored` bytes as they are: a replay of an
Idempotency-Key must be byte for byte the first answer, and re-encoding a dict could differ.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

import trio
from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import metrics
from gateway.auth_http import TokenGuard, caller
from gateway.errors import PROBLEM_MEDIA_TYPE, Problem
from gateway.keys import Caller
from gateway.payments_json import (
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_LENGTH,
)
from gateway.service import MAX_LIST_LIMIT, MAX_RECEIPT_B64
from gateway.store import MAX_IDEMPOTENCY_KEY_LENGTH
from pbft.ledger import MAX_ACCOUNT_NAME_LENGTH, MAX_AMOUNT

log = logging.getLogger("gateway.app")

# The limits are the service's and the ledger's own (checked again there): the HTTP layer
# only refuses earlier, naming the field, what would be refused anyway.
MAX_BODY_BYTES = 64 * 1024
# A body must arrive whole within this long after its headers (408 otherwise): the body is
# read before authentication, so a peer that promises bytes and sends none must not hold
# its connection (and its task and buffer) for ever.
BODY_TIMEOUT_S = 10.0
# Requests in flight at once; past it a 503 at once, before the body is read or the key
# looked up. A request waiting for the cluster holds its place up to --cluster-timeout-s.
MAX_CONCURRENT_REQUESTS = 256
# Amounts (and expiries) in the API are at most JavaScript's Number.MAX_SAFE_INTEGER: JSON
# numbers past it read back rounded in JSON.parse (the dashboard's) and in every JSON
# library that parses to a double, another amount than the one decided. The ledger's own
# bound (MAX_AMOUNT, 2**63 - 1) is larger; the CLI and PaymentClient still reach it.
MAX_API_AMOUNT = min(2**53 - 1, MAX_AMOUNT)
# The method label of the requests counter: these, anything else is "other" (any token is
# a valid HTTP method, and each label value is a series kept for the life of the process).
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# pay_<client>_<request id>: a client id < 2**32, a request id < 2**64.
PAYMENT_ID_PATTERN = r"^pay_[0-9]{1,10}_[0-9]{1,20}$"
PAYMENT_ID_MAX_LENGTH = 36

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# --- request bodies ---------------------------------------------------------------------------

# strict: 1.0, "1" and true are not amounts, 1 is not a name. (Per field: a strict model
# would also refuse the dict FastAPI hands it.)
Amount = Annotated[
    int,
    Field(
        strict=True,
        ge=1,
        le=MAX_API_AMOUNT,
        description="Integer minor units, 1..2**53 - 1 (JavaScript's safe integers).",
    ),
]
AccountName = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ACCOUNT_NAME_LENGTH)]
MetadataKey = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_METADATA_KEY_LENGTH)]
MetadataValue = Annotated[str, Field(strict=True, max_length=MAX_METADATA_VALUE_LENGTH)]
IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
        description="Any string of 1..255 characters; the same key with the same body "
        "replays the first answer, also after a restart (kept at least 24 hours).",
    ),
]
PaymentId = Annotated[
    str,
    Path(pattern=PAYMENT_ID_PATTERN, max_length=PAYMENT_ID_MAX_LENGTH, examples=["pay_0_1"]),
]


class _Body(BaseModel):
    # forbid: a misspelt field is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PaymentCreate(_Body):
    from_: AccountName = Field(alias="from")
    to: AccountName
    amount: Amount
    capture: Annotated[bool, Field(strict=True)] = True
    expires_in_ms: Annotated[int, Field(strict=True, ge=1, le=MAX_API_AMOUNT)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)] = (
        Field(default_factory=dict)
    )


class CaptureBody(_Body):
    amount: Amount | None = None


class VoidBody(_Body):
    pass


class RefundBody(_Body):
    amount: Amount


class AccountCreate(_Body):
    name: AccountName


class ReceiptVerify(_Body):
    receipt: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_RECEIPT_B64)]


# --- problems ---------------------------------------------------------------------------------


def problem_response(problem: Problem) -> Response:
    return Response(problem.to_bytes(), problem.status, media_type=PROBLEM_MEDIA_TYPE)


def stored_response(status_code: int, body: bytes) -> Response:
    """A stored answer sent as it was stored (an error's body is a problem document)."""
    media_type = PROBLEM_MEDIA_TYPE if status_code >= 400 else "application/json"
    return Response(body, status_code, media_type=media_type)


def _field_name(location: tuple[Any, ...]) -> str:
    """The field a validation error names, as the client wrote it ("from", "metadata.k")."""
    parts = [str(part) for part in location[1:]]
    if not parts:
        return str(location[0]) if location else "body"
    return ".".join(parts)


def validation_problem(errors: list[dict[str, Any]]) -> Problem:
    """The first error decides the status and the field; all of them are listed (bounded)."""
    first = errors[0] if errors else {"loc": ("body",), "type": "invalid", "msg": "invalid"}
    location = tuple(first.get("loc", ("body",)))
    where = str(location[0]) if location else "body"
    kind = str(first.get("type", ""))
    listed = [
        {"field": _field_name(tuple(error.get("loc", ()))), "detail": str(error.get("msg", ""))}
        for error in errors[:10]
    ]
    if kind == "json_invalid":
        return Problem(
            400,
            "malformed-json",
            "Malformed JSON body",
            f"the body is not valid JSON: {first.get('ctx', {}).get('error', kind)}",
            "body",
        )
    if where == "body" and len(location) == 1:
        detail = (
            "a JSON object body is required"
            if kind == "missing"
            else f"the body must be a JSON object: {first.get('msg', kind)}"
        )
        return Problem(400, "invalid-body", "Invalid request body", detail, "body")
    field = _field_name(location)
    if where == "header":
        missing = kind == "missing"
        return Problem(
            400,
            "missing-header" if missing else "invalid-header",
            "Missing header" if missing else "Invalid header",
            f"header {field}: {'required' if missing else first.get('msg', kind)}",
            field,
        )
    if where in ("query", "path"):
        return Problem(
            400,
            "invalid-parameter",
            "Invalid parameter",
            f"{where} parameter {field}: {first.get('msg', kind)}",
            field,
            errors=listed,
        )
    return Problem(
        422,
        "invalid-field",
        "Invalid field",
        f"{field}: {first.get('msg', kind)}",
        field,
        errors=listed,
    )


_HTTP_PROBLEMS = {
    # FastAPI's own 400: a body json.loads gave up on (nested too deep, a number too long).
    400: ("malformed-json", "Malformed JSON body"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
}


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _on_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    content_type = request.headers.get("content-type")
    body_errors = [e for e in errors if tuple(e.get("loc", ()))[:1] == ("body",)]
    if body_errors and not _is_json(content_type) and await request.body():
        # FastAPI parses only a JSON body (a form post is no payment): say so, not that
        # the body is "not an object".
        return problem_response(
            Problem(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                f"the body must be JSON (Content-Type: application/json), not {content_type!r}",
                "Content-Type",
            )
        )
    return problem_response(validation_problem(errors))


async def _on_http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    slug, title = _HTTP_PROBLEMS.get(error.status_code, ("http-error", "HTTP error"))
    detail = str(error.detail) if error.detail else title
    field = "body" if error.status_code == 400 else None
    response = problem_response(Problem(error.status_code, slug, title, detail, field))
    if error.headers:
        response.headers.update(error.headers)
    return response


async def _on_problem(request: Request, error: Exception) -> Response:
    assert isinstance(error, Problem)
    return problem_response(error)


# --- ASGI layers ------------------------------------------------------------------------------


async def _send_problem(
    send: Send, problem: Problem, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = problem.to_bytes()
    await send(
        {
            "type": "http.response.start",
            "status": problem.status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def duplicate_key(body: bytes) -> str | None:
    """The first key a JSON object in `body` repeats, None if none does (or if the body is
    no JSON at all: FastAPI's parser then says what is wrong with it). json.loads keeps the
    last of two equal keys, a proxy or log reader may keep the first: they would see
    another payment than the one made."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except DuplicateKey as duplicate:
        return duplicate.key
    except (ValueError, RecursionError):
        return None
    return None


class RequestLimit:
    """At most `limit` requests in flight; past it 503 with Retry-After at once, before
    the body is read or the key looked up, so a flood (of stalled bodies, of bad tokens)
    holds a bounded number of tasks and buffers."""

    def __init__(self, app: ASGIApp, limit: int = MAX_CONCURRENT_REQUESTS) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _send_problem(
                send,
                Problem(
                    503,
                    "overloaded",
                    "Too many requests in flight",
                    f"the gateway is answering {self.limit} requests already; retry shortly",
                ),
                [(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyLimit:
    """Refuse a body over `limit` bytes with 413 before anything parses it: a declared
    Content-Length at once, a chunked body as soon as it has passed the limit; one that
    has not arrived whole `timeout_s` after the headers with 408; a JSON body that repeats
    a key with 400. The body (at most `limit` bytes) is then handed on in one piece."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S
    ) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit() or len(value) > 18:
                    await _send_problem(
                        send,
                        Problem(
                            400,
                            "invalid-header",
                            "Invalid header",
                            "Content-Length is not a number",
                            "Content-Length",
                        ),
                    )
                    return
                if int(value) > self.limit:
                    await _send_problem(send, self._too_large())
                    return
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await _send_problem(send, self._too_large())
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            # Connection: close, so the server drops the rest of the body with the peer.
            await _send_problem(
                send,
                Problem(
                    408,
                    "body-timeout",
                    "Request body too slow",
                    f"the body did not arrive whole within {self.timeout_s:g} s",
                    "body",
                ),
                [(b"connection", b"close")],
            )
            return
        body = b"".join(chunks)
        duplicate = duplicate_key(body) if body else None
        if duplicate is not None:
            await _send_problem(
                send,
                Problem(
                    400,
                    "malformed-json",
                    "Malformed JSON body",
                    f"the body repeats the key {duplicate[:64]!r}; each key may appear once",
                    "body",
                    key=duplicate[:64],
                ),
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect is left

        await self.app(scope, replay, send)

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "body-too-large",
            "Request body too large",
            f"the body may have at most {self.limit} bytes",
            "body",
            limit=self.limit,
        )


class Guard:
    """The outermost layer: count every answer in the metrics by route template, and turn
    an exception nobody handled into a 500 problem that says nothing of the internals (the
    traceback goes to the log)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not status:
                problem = Problem(
                    500,
                    "internal-error",
                    "Internal error",
                    "the gateway failed to answer this request; it was logged",
                )
                await _send_problem(watch, problem)
        finally:
            # The route's template, never the path itself (ids would make a series each);
            # the dashboard's static mount has an empty path and goes by its name.
            route = scope.get("route")
            template = getattr(route, "path", None) or getattr(route, "name", None) or "unmatched"
            method = str(scope.get("method", ""))
            metrics.http_requests.labels(
                method=method if method in METRIC_METHODS else "other",
                route=template,
                status=str(status[0]) if status else "none",
            ).inc()


# --- the application --------------------------------------------------------------------------

OPTIONAL_ROUTERS = ("gateway.routes_webhooks", "gateway.routes_cluster")


def _include_optional_routers(app: FastAPI) -> None:
    """The routers and the dashboard other parts of the gateway add (webhooks, the cluster
    status, the static page): each is included when its module is there."""
    import importlib.util

    for name in OPTIONAL_ROUTERS:
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            app.include_router(module.router)
    from pathlib import Path as FilePath

    static = FilePath(__file__).with_name("static")
    if (static / "index.html").is_file():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=static, html=True), name="static")


def _service(request: Request) -> Any:
    return request.app.state.gateway.service


CallerDep = Annotated[Caller, Depends(caller)]


def create_app(
    gateway: Any,
    *,
    body_timeout_s: float = BODY_TIMEOUT_S,
    max_requests: int = MAX_CONCURRENT_REQUESTS,
) -> FastAPI:
    """The API over `gateway` (gateway/service.py's Gateway), at request.app.state.gateway."""
    app = FastAPI(
        title="pbft-payments gateway",
        version="1",
        description="Payments confirmed by a Byzantine fault-tolerant cluster, each with an "
        "offline-verifiable receipt. Authenticate with `Authorization: Bearer gk_...`; "
        "every POST that changes something needs an `Idempotency-Key` header. Errors are "
        "RFC 9457 application/problem+json bodies whose `field` names the input at fault.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.state.token_guard = TokenGuard()
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Problem, _on_problem)

    @app.post("/v1/payments", tags=["payments"])
    async def create_payment(
        request: Request, who: CallerDep, key: IdempotencyKey, body: PaymentCreate
    ) -> Response:
        """Pay (`capture: true`, the default) or place a hold (`capture: false`). Answers
        200 with the payment whether confirmed, held or rejected (a rejection is decided
        and receipted too); 504 with its id when the cluster does not answer in time."""
        stored = await _service(request).create_payment(who, key, body.model_dump(by_alias=True))
        return stored_response(stored.status_code, stored.body)

    @app.post("/v1/payments/{payment_id}/capture", tags=["payments"])
    async def capture(
        request: Request,
        who: CallerDep,
        key: IdempotencyKey,
        payment_id: PaymentId,
        body: CaptureBody | None = None,
    ) -> Response:
        """Capture a hold, all of it or `amount` of it (the rest goes back to the payer)."""
        amount = body.amount if body is not None else None
        stored = await _service(request).capture(who, key, payment_id, amount)
        return stored_response(stored.status_code, stored.body)

    @app.post("/v1/payments/{payment_id}/void", tags=["payments"])
    async def void(
        request: Request,
        who: CallerDep,
        key: IdempotencyKey,
        payment_id: PaymentId,
        body: VoidBody | None = None,
    ) -> Response:
        """Release a hold to its payer."""
        stored = await _service(request).void(who, key, payment_id)
        return stored_response(stored.status_code, stored.body)

    @app.post("/v1/payments/{payment_id}/refunds", tags=["payments"])
    async def refund(
        request: Request,
        who: CallerDep,
        key: IdempotencyKey,
        payment_id: PaymentId,
        body: RefundBody,
    ) -> Response:
        """Move `amount` of a confirmed or captured payment back to its payer."""
        stored = await _service(request).refund(who, key, payment_id, body.amount)
        return stored_response(stored.status_code, stored.body)

    @app.get("/v1/payments/{payment_id}", tags=["payments"])
    async def get_payment(request: Request, who: CallerDep, payment_id: PaymentId) -> Any:
        return await _service(request).get_payment(who, payment_id)

    @app.get("/v1/payments", tags=["payments"])
    async def list_payments(
        request: Request,
        who: CallerDep,
        account: Annotated[
            str | None, Query(min_length=1, max_length=MAX_ACCOUNT_NAME_LENGTH)
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 10,
        starting_after: Annotated[
            str | None, Query(pattern=PAYMENT_ID_PATTERN, max_length=PAYMENT_ID_MAX_LENGTH)
        ] = None,
    ) -> Any:
        """This API key's payments, newest first, `limit` at a time: pass the last one's id
        as `starting_after` for the next page (`has_more` says whether there is one)."""
        return await _service(request).list_payments(who, account, limit, starting_after)

    @app.get("/v1/accounts/{name}", tags=["accounts"])
    async def get_account(
        request: Request,
        who: CallerDep,
        name: Annotated[str, Path(min_length=1, max_length=MAX_ACCOUNT_NAME_LENGTH)],
    ) -> Any:
        """The account's available and held balance, and the sequence number the answer
        holds at (f + 1 replicas agree on it)."""
        return await _service(request).account(who, name)

    @app.post("/v1/accounts", tags=["accounts"])
    async def open_account(
        request: Request, who: CallerDep, key: IdempotencyKey, body: AccountCreate
    ) -> Response:
        """Open an account owned by this API key's client, with balance 0."""
        stored = await _service(request).open_account(who, key, body.name)
        return stored_response(stored.status_code, stored.body)

    @app.post("/v1/receipts/verify", tags=["receipts"])
    async def verify_receipt(request: Request, who: CallerDep, body: ReceiptVerify) -> Any:
        """Check a receipt (base64) against this cluster's keys: the verdict and its fields.
        Nothing changes, so no Idempotency-Key."""
        return _service(request).verify_receipt(body.receipt)

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> Response:
        """200 when every client of the gateway is connected to a quorum of replicas
        (enough for the cluster to decide), else 503; the embedded replica's status."""
        body = health(request.app.state.gateway)
        return JSONResponse(body, 200 if body["status"] == "ok" else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    _include_optional_routers(app)
    # The last added is the outermost: Guard counts every answer, the 503s too.
    app.add_middleware(BodyLimit, timeout_s=body_timeout_s)
    app.add_middleware(RequestLimit, limit=max_requests)
    app.add_middleware(Guard)
    return app


def health(gateway: Any) -> dict[str, Any]:
    cluster = gateway.cluster
    needed = cluster.config.quorum  # what the cluster needs to decide anything
    clients = {}
    healthy = True
    for client_id, client in sorted(gateway.clients.items()):
        connected = int(client.statistics()["transport"].connected_peers)
        clients[str(client_id)] = {"connected_replicas": connected}
        healthy = healthy and connected >= needed
    body: dict[str, Any] = {
        "status": "ok" if healthy else "degraded",
        "replicas": len(cluster.replicas),
        "needed": needed,
        "clients": clients,
    }
    node = getattr(gateway, "node", None)
    if node is not None:
        status = node.status()
        body["replica"] = (
            {"id": node.replica_id, "state": "starting"}
            if status is None
            else {
                "id": status.replica_id,
                "state": "running",
                "view": status.view,
                "last_executed": status.last_executed,
                "stable_checkpoint": status.stable_checkpoint,
            }
        )
    return body
