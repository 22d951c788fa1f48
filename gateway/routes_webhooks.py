"""The webhook routes: endpoints (POST, GET, DELETE /v1/webhook_endpoints) and GET /v1/events.

Shape checks here (pydantic, strict, no unknown fields; query bounds), substance in
gateway/webhooks.py, whose WebhookError becomes the Problem gateway/app.py renders. Every
route acts for the caller's client only: another client's endpoint is not found.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from gateway import errors
from gateway.auth_http import caller
from gateway.errors import Problem
from gateway.keys import Caller
from gateway.webhooks import (
    EVENT_TYPES,
    MAX_DESCRIPTION_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_LIST_LIMIT,
    MAX_URL_CHARS,
    EndpointNotFound,
    IdempotencyMismatch,
    InvalidInput,
    TooManyEndpoints,
    WebhookError,
    Webhooks,
    webhooks_of,
)

router = APIRouter(tags=["webhooks"])

CallerDep = Annotated[Caller, Depends(caller)]
OptionalIdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description="Optional here: the same key with the same body replays the first answer "
        "(the same endpoint, the same secret) instead of making a second endpoint.",
    ),
]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_URL_CHARS)]
    description: Annotated[str, Field(strict=True, max_length=MAX_DESCRIPTION_CHARS)] | None = None


def _problem(error: WebhookError, where: str) -> Problem:
    """The Problem gateway/app.py would give for the same kind of mistake: a bad body field
    is 422 invalid-field, a bad query or path parameter 400 invalid-parameter."""
    if isinstance(error, InvalidInput):
        if where == "body":
            return Problem(422, "invalid-field", "Invalid field", error.detail, error.field)
        return Problem(400, "invalid-parameter", "Invalid parameter", error.detail, error.field)
    if isinstance(error, EndpointNotFound):
        return errors.not_found(error.detail, "endpoint_id")  # the path parameter's name
    if isinstance(error, IdempotencyMismatch):
        return Problem(
            422,
            error.slug,
            "Idempotency-Key reused with a different request",
            error.detail,
            error.field,
        )
    if isinstance(error, TooManyEndpoints):
        return Problem(409, error.slug, "Too many webhook endpoints", error.detail, error.field)
    return Problem(error.status, error.slug, "Invalid request", error.detail, error.field)


async def _hooks(request: Request) -> Webhooks:
    return await webhooks_of(request.app.state.gateway)


@router.post("/v1/webhook_endpoints")
async def create_endpoint(
    request: Request, who: CallerDep, body: EndpointCreate, key: OptionalIdempotencyKey = None
) -> Response:
    """Register a URL to receive this client's payment events (every decision: confirmed,
    rejected, held, captured, voided, expired, refunded) as signed POSTs. The answer holds
    the endpoint's `secret` (whsec_...): it is shown only here; keep it to check the
    `Pbft-Signature` header of each delivery."""
    hooks = await _hooks(request)
    try:
        status, data = await hooks.create_endpoint(who.client_id, body.url, body.description, key)
    except WebhookError as error:
        raise _problem(error, "body") from None
    return Response(data, status, media_type="application/json")


@router.get("/v1/webhook_endpoints")
async def list_endpoints(request: Request, who: CallerDep) -> Any:
    """This client's endpoints (without their secrets)."""
    return await (await _hooks(request)).list_endpoints(who.client_id)


@router.delete("/v1/webhook_endpoints/{endpoint_id}")
async def delete_endpoint(
    request: Request,
    who: CallerDep,
    endpoint_id: Annotated[str, Path(pattern=r"^we_[0-9]{1,18}$", max_length=21)],
) -> Any:
    """Stop delivering to an endpoint; its deliveries not yet made are marked failed."""
    try:
        return await (await _hooks(request)).delete_endpoint(who.client_id, endpoint_id)
    except WebhookError as error:
        raise _problem(error, "path") from None


@router.get("/v1/events")
async def list_events(
    request: Request,
    who: CallerDep,
    event_type: Annotated[
        str | None,
        Query(alias="type", description=f"One of: {', '.join(EVENT_TYPES)}", max_length=40),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 10,
    starting_after: Annotated[
        str | None,
        Query(
            pattern=r"^evt_[0-9]{1,18}$",
            max_length=22,
            description="The last event id of the previous page; the next page is older.",
        ),
    ] = None,
) -> Any:
    """This client's events, newest first, each with its delivery state per endpoint
    (pending, sending, delivered, failed; attempts, last HTTP status and error)."""
    try:
        return await (await _hooks(request)).list_events(
            who.client_id, event_type, limit, starting_after
        )
    except WebhookError as error:
        raise _problem(error, "query") from None
