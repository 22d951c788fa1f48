"""The `caller` dependency every /v1 route takes: the Bearer token -> Caller.

A module of its own so routers of other modules (webhooks, cluster status) can depend on it
without importing gateway.app, which includes them. The Gateway is
`request.app.state.gateway`; its `authenticate` (gateway/service.py) decides:

401 for a missing, malformed, unknown or revoked key (one answer for all four: which one it
was is no business of whoever holds a wrong key); 403 for a live key whose client this
gateway does not act for (it has no `--client` for it, so it cannot sign that client's
requests).

Anyone may send tokens, without a key of their own: the cost of a wrong one is bounded
here. A token refused once is remembered (a bounded LRU of their hashes) and refused again
without the store: a random token never becomes a key, and a revoked key stays revoked.
At most MAX_CONCURRENT_LOOKUPS token lookups wait for the store at once, so a flood of
fresh wrong tokens queues behind them rather than in front of every payment's store call.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import trio
from fastapi import Request

from gateway.errors import Problem
from gateway.keys import Caller

MAX_REFUSED_TOKENS = 4096
REFUSED_TTL_S = 600.0
MAX_CONCURRENT_LOOKUPS = 4


class TokenGuard:
    """The refused tokens and the lookup slots of one app (at request.app.state)."""

    def __init__(
        self,
        max_refused: int = MAX_REFUSED_TOKENS,
        ttl_s: float = REFUSED_TTL_S,
        max_lookups: int = MAX_CONCURRENT_LOOKUPS,
    ) -> None:
        self.max_refused = max_refused
        self.ttl_s = ttl_s
        self.lookups = trio.Semaphore(max_lookups)
        # sha256(Authorization) -> (monotonic time refused, the 401 it got)
        self.refused: OrderedDict[bytes, tuple[float, Problem]] = OrderedDict()
        self.refused_from_memory = 0

    async def authenticate(self, gateway: object, authorization: str | None) -> Caller:
        digest = hashlib.sha256((authorization or "").encode("utf-8", "replace")).digest()
        remembered = self.refused.get(digest)
        if remembered is not None:
            refused_at, problem = remembered
            if time.monotonic() - refused_at < self.ttl_s:
                self.refused_from_memory += 1
                raise _copy(problem)
            del self.refused[digest]
        async with self.lookups:
            try:
                caller: Caller = await gateway.authenticate(authorization)  # type: ignore[attr-defined]
            except Problem as problem:
                if problem.status == 401:
                    self._remember(digest, problem)
                raise
        return caller

    def _remember(self, digest: bytes, problem: Problem) -> None:
        # A copy without the traceback (and the request's frames it holds).
        self.refused[digest] = (time.monotonic(), _copy(problem))
        self.refused.move_to_end(digest)
        while len(self.refused) > self.max_refused:
            self.refused.popitem(last=False)


def _copy(problem: Problem) -> Problem:
    """A new exception each time: one instance raised again and again keeps growing its
    traceback."""
    return Problem(
        problem.status,
        problem.type_slug,
        problem.title,
        problem.detail,
        problem.field,
        **problem.extra,
    )


def token_guard(request: Request) -> TokenGuard:
    guard = getattr(request.app.state, "token_guard", None)
    if guard is None:  # an app not made by gateway.app.create_app
        guard = request.app.state.token_guard = TokenGuard()
    return guard


async def caller(request: Request) -> Caller:
    return await token_guard(request).authenticate(
        request.app.state.gateway, request.headers.get("authorization")
    )
