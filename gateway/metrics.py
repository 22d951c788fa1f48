"""The gateway's Prometheus metrics, served at GET /metrics in the text format.

One registry of the gateway's own (not prometheus_client's global default one, which also
collects the process and the Python runtime, and which a test process would share with
every library it imports). Label values come from closed sets (route templates, not paths;
the cluster's reasons, not free text), so the number of series is bounded.

- `http_requests`: requests by method (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS or
  "other": any token is a method to HTTP), route template and status code.
- `payment_decisions`: decisions the cluster gave the gateway's clients, by operation,
  outcome and reason.
- `cluster_round_trip`: seconds from submitting a request (or a lookup) to its f + 1
  matching answers, by kind ("submit", "lookup", "balance") and result ("decided",
  "answered", "timeout").
- `webhook_deliveries`: webhook delivery attempts by result (gateway/webhooks.py
  increments it: `metrics.webhook_deliveries.labels(result="delivered").inc()`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from runtime.client import PaymentTimeout

registry = CollectorRegistry(auto_describe=True)

http_requests = Counter(
    "gateway_http_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
    registry=registry,
)
payment_decisions = Counter(
    "gateway_payment_decisions",
    "Decisions of the cluster on the gateway's requests, by operation, outcome and reason.",
    ["op", "outcome", "reason"],
    registry=registry,
)
cluster_round_trip = Histogram(
    "gateway_cluster_round_trip_seconds",
    "From sending a request or lookup to the cluster to its f + 1 matching answers.",
    ["kind", "result"],
    # Three fsyncs and three message rounds: milliseconds on a quiet machine, seconds when
    # a view change is under way, the client's timeout (10 s by default) at worst.
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=registry,
)
webhook_deliveries = Counter(
    "gateway_webhook_deliveries",
    "Webhook delivery attempts, by result (delivered, failed, ...).",
    ["result"],
    registry=registry,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Ops and outcomes are closed sets of the ledger; anything else is counted as "other" so a
# surprise cannot grow the series without bound.
_MAX_LABEL_LENGTH = 64


def exposition() -> bytes:
    """The registry in Prometheus's text format."""
    return generate_latest(registry)


def _label(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_LABEL_LENGTH else "other"


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _timed(kind: str, call: F) -> F:
    @wraps(call)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await call(*args, **kwargs)
        except PaymentTimeout:
            cluster_round_trip.labels(kind=kind, result="timeout").observe(
                time.perf_counter() - started
            )
            raise
        cluster_round_trip.labels(kind=kind, result="answered").observe(
            time.perf_counter() - started
        )
        return result

    return timed  # type: ignore[return-value]


def on_decision(op: str, outcome: str, reason: str, seconds: float) -> None:
    """The payment service's decision hook (PaymentService.on_decision): every decision,
    also those of requests resumed after a restart."""
    reason = reason or "none"  # a confirmation has no reason; the payment object says "none"
    payment_decisions.labels(op=_label(op), outcome=_label(outcome), reason=_label(reason)).inc()
    cluster_round_trip.labels(kind="submit", result="decided").observe(seconds)


def instrument_gateway(gateway: Any) -> None:
    """Count `gateway`'s decisions (through the service's hook) and time its clients'
    lookups and balance reads. Wrapping `lookup` and `balance` on each client instance sees
    every one (status, history, hold go through `lookup`) without the runtime knowing about
    metrics. Idempotent."""
    gateway.service.on_decision = on_decision
    for client in gateway.clients.values():
        if getattr(client, "_gateway_metrics", False):
            continue
        client.lookup = _timed("lookup", client.lookup)
        client.balance = _timed("balance", client.balance)
        client._gateway_metrics = True
