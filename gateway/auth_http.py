"""The `caller` dependency every /v1 route takes: the Bearer token -> Caller.

A module of its own so routers of other modules (webhooks, cluster status) can depend on it
without importing gateway.app, which includes them. The Gateway is
`request.app.state.gateway`; its `authenticate` (gateway/service.py) decides:

401 for a missing, malformed, unknown or revoked key (one answer for all four: which one it
was is no business of whoever holds a wrong key); 403 for a live key whose client this
gateway does not act for (it has no `--client` for it, so it cannot sign that client's
requests).
"""

from __future__ import annotations

from fastapi import Request

from gateway.keys import Caller


async def caller(request: Request) -> Caller:
    gateway = request.app.state.gateway
    caller: Caller = await gateway.authenticate(request.headers.get("authorization"))
    return caller
