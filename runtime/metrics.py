"""A replica's metrics in Prometheus's text format (`pbft replica --metrics 127.0.0.1:PORT`).

Nothing is counted for the metrics on the hot path: a custom collector reads the node's,
the core's, the store's and the transport's own statistics at scrape time. One registry
of the replica's own (not prometheus_client's global one). Label values come from closed
sets: drop reasons are the core's DropReason values (and its two derived families,
`malformed_*` and `batch_request_*`), anything else is counted as "other".

The server is a small trio loop on a loopback address: one GET per connection, its head
bounded in size and time, a bounded number of connections at once (more are closed at
once), so a hostile scraper costs the replica little and cannot starve it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from pbft.drops import DropReason
from runtime.storage import FSYNC_BUCKETS_S

if TYPE_CHECKING:
    from runtime.node import ReplicaNode

MAX_REQUEST_HEAD_BYTES = 8 * 1024
REQUEST_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 8
_KNOWN_DROPS = frozenset(reason.value for reason in DropReason)
_DERIVED_DROP = re.compile(r"(malformed|batch_request)_[a-z0-9_]{1,48}")
_LABEL = re.compile(r"[a-z0-9_]{1,48}")


class MetricsAddressError(ValueError):
    """A --metrics address that is malformed, not loopback, or cannot be bound."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT with a loopback HOST (127.0.0.0/8, ::1, or localhost) and a PORT in
    1..65535. The metrics say how the replica runs: not for other machines."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise MetricsAddressError(f"--metrics: {text!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise MetricsAddressError(f"--metrics: port {port} is not in 1..65535")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise MetricsAddressError(
            f"--metrics: {host} is not a loopback address (use 127.0.0.1): "
            "metrics are served to this machine only"
        )
    return host, port


def drop_reason_label(reason: str) -> str:
    if reason in _KNOWN_DROPS or _DERIVED_DROP.fullmatch(reason):
        return reason
    return "other"


def _label(value: str) -> str:
    return value if _LABEL.fullmatch(value) else "other"


def _by_label(
    family: CounterMetricFamily, counts: Mapping[str, int], *, core_drops: bool = False
) -> CounterMetricFamily:
    summed: dict[str, int] = {}
    for key, count in counts.items():
        name = drop_reason_label(key) if core_drops else _label(key)
        summed[name] = summed.get(name, 0) + count
    for name, count in sorted(summed.items()):
        family.add_metric([name], count)
    return family


class ReplicaCollector(Collector):
    """Reads one ReplicaNode's statistics at each scrape."""

    def __init__(self, node: ReplicaNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        prefix = "pbft_replica"

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{prefix}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{prefix}_{name}", doc, value=value)

        yield counter("events_handled", "Events the core handled.", node.events_handled)
        yield counter("steps", "Core steps (events_handled / steps: group commit).", node.steps)
        yield counter("batches_executed", "Batches executed.", node.batches_executed)
        yield counter("ticks", "Clock ticks given to the core.", node.ticks)
        yield counter(
            "checkpoints_stable",
            "Checkpoints this replica saw become stable.",
            node.checkpoints_stable,
        )
        yield counter(
            "client_frames_refused", "Client frames refused unparsed.", node.client_frames_refused
        )
        core = node.core
        if core is not None:
            stats = core.statistics()
            yield gauge("view", "The current view.", stats.view)
            yield gauge(
                "view_changing",
                "1 while waiting for a NEW-VIEW, else 0.",
                int(stats.status != "normal"),
            )
            yield gauge(
                "last_executed", "Sequence number of the last executed batch.", stats.last_executed
            )
            yield gauge(
                "stable_checkpoint",
                "Sequence number of the stable checkpoint.",
                stats.stable_checkpoint,
            )
            yield counter(
                "view_changes_started", "View changes started.", stats.view_changes_started
            )
            yield counter("new_views_installed", "NEW-VIEWs installed.", stats.new_views_installed)
            yield counter("messages_sent", "Protocol messages the core sent.", stats.messages_sent)
            yield gauge("halted", "1 if the core halted itself, else 0.", int(bool(stats.halted)))
            drops = CounterMetricFamily(
                f"{prefix}_drops", "Inputs the core dropped, by reason.", labels=["reason"]
            )
            yield _by_label(drops, stats.drops, core_drops=True)
        depth = GaugeMetricFamily(
            f"{prefix}_queue_depth",
            "Items waiting now: inbound frames, outbound frames, client requests pending, "
            "history batches for the history thread, write batches for the store's writer.",
            labels=["queue"],
        )
        if core is not None:
            depth.add_metric(["requests"], len(core.requests.pending))
        if node.history is not None:
            depth.add_metric(["history"], node.history.pending())
        if node.writer is not None:
            depth.add_metric(["writer"], len(node.writer.queue))
        transport = node.transport
        if transport is not None:
            carried = transport.statistics()
            depth.add_metric(["inbound"], carried.inbound_queued)
            depth.add_metric(["outbound"], carried.queued)
            yield gauge(
                "peers_connected", "Principals with a connection now.", carried.connected_peers
            )
            yield gauge("connections", "Authenticated connections open now.", carried.connections)
            yield counter("frames_in", "Data frames received.", carried.frames_in)
            yield counter("frames_out", "Data frames sent.", carried.frames_out)
            yield counter("bytes_in", "Payload bytes received.", carried.bytes_in)
            yield counter("bytes_out", "Payload bytes sent.", carried.bytes_out)
            lost = CounterMetricFamily(
                f"{prefix}_transport_drops",
                "Outgoing frames lost, by reason.",
                labels=["reason"],
            )
            yield _by_label(lost, carried.drops)
        yield depth
        store = node.store
        if store is not None:
            stored = store.statistics()
            yield counter("fsyncs", "fsyncs of the replica's log.", stored.fsyncs)
            yield counter("records_written", "Records written to the log.", stored.records_written)
            if stored.fsync_buckets:
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for bound, count in zip(
                    (*map(str, FSYNC_BUCKETS_S), "+Inf"), stored.fsync_buckets, strict=True
                ):
                    cumulative += count
                    buckets.append((bound, cumulative))
                yield HistogramMetricFamily(
                    f"{prefix}_fsync_seconds",
                    "Time of each fsync of the replica's log.",
                    buckets=buckets,
                    sum_value=stored.fsync_seconds,
                )


def registry_for(node: ReplicaNode) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReplicaCollector(node))
    return registry


async def open_metrics_listener(host: str, port: int) -> trio.SocketListener:
    """Bind now, before the replica starts, so a taken port is one clear line."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as error:
        raise MetricsAddressError(
            f"--metrics: cannot listen on {host}:{port}: {error.strerror or error}"
        ) from None
    return listeners[0]


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _read_head(stream: trio.abc.Stream) -> bytes | None:
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        head += chunk
    return head


class MetricsServer:
    """Serves GET /metrics; counts what it refused."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.active = 0
        self.served = 0
        self.refused = 0
        self.errors = 0

    async def serve(self, listener: trio.SocketListener) -> None:
        await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.active >= MAX_CONNECTIONS:
                self.refused += 1
                return
            self.active += 1
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    await self._answer(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the scraper went away
            finally:
                self.active -= 1

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = await _read_head(stream)
        if head is None:
            self.refused += 1
            await stream.send_all(_response("400 Bad Request", b"bad or oversized request\n"))
            return
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3 or request_line[0] != b"GET":
            await stream.send_all(_response("405 Method Not Allowed", b"GET only\n"))
            return
        if request_line[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            await stream.send_all(_response("404 Not Found", b"try /metrics\n"))
            return
        try:
            body = generate_latest(self.registry)
        except Exception:  # a collector bug must not stop the replica
            self.errors += 1
            await stream.send_all(_response("500 Internal Server Error", b"collector failed\n"))
            return
        self.served += 1
        await stream.send_all(_response("200 OK", body, CONTENT_TYPE_LATEST))
