"""The `caller` dependency every /v1 route takes: the Bearer token -> Caller.

A module of its own so routers of other modules (webhooks, cluster status) can depend on it
without importing gateway.app, which includes them. The Gateway is
`request.app.state.gateway`.

401 for a missing, malformed, unknown or revoked key (one answer for all four: which one it
was is no business of whoever holds a wrong key); 403 for a live key whose client this
gateway does not act for (it has no `--client` for it, so it cannot sign that client's
requests).
"""

from __future__ import annotations

from fastapi import Request

from gateway.errors import forbidden, unauthorized
from gateway.keys import Caller, bearer_token


async def caller(request: Request) -> Caller:
    gateway = request.app.state.gateway
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise unauthorized("send an API key as `Authorization: Bearer gk_...`")
    found = await gateway.store.lookup_token(token)
    if found is None:
        raise unauthorized("this API key is not valid (unknown or revoked)")
    if found.client_id not in gateway.clients:
        served = ", ".join(str(client) for client in sorted(gateway.clients))
        raise forbidden(
            f"this API key acts for client {found.client_id}, which this gateway does not "
            f"serve (its clients: {served})",
            "Authorization",
            client=found.client_id,
        )
    return found
