"""How fast the webhook dispatcher delivers, next to plain HTTP POSTs in the same run.

    python -m gateway.webhooks_bench [--events 2000] [--concurrency 16]

Both sides POST the same signed bodies to the same receiver on 127.0.0.1 (a minimal HTTP/1.1
server in this process) with at most `--concurrency` in flight:
- baseline: httpx.AsyncClient POSTs, nothing recorded;
- dispatcher: event rows written into a fresh gateway database, then gateway/webhooks.py
  fans them out, claims, POSTs and records each result (SQLite, synchronous=FULL).
The ratio is the price of at-least-once bookkeeping per delivery.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from gateway.store import connect
from gateway.webhooks import WebhookConfig, Webhooks, sign


class Sink:
    """Answers 200 to every POST and counts them (one request per connection)."""

    def __init__(self) -> None:
        self.count = 0
        self.port = 0
        self.changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            try:
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    body += chunk
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            except (trio.BrokenResourceError, ValueError):
                return
            self.count += 1
            self.changed.set()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            self.changed = trio.Event()
            await self.changed.wait()


def event_body(event_id: int) -> str:
    return json.dumps(
        {
            "object": "event",
            "id": f"evt_{event_id}",
            "type": "payment.confirmed",
            "created_ms": 0,
            "data": {"object": "payment", "id": f"pay_0_{event_id}", "status": "confirmed"},
        },
        separators=(",", ":"),
    )


async def baseline(sink: Sink, events: int, concurrency: int) -> float:
    url = f"http://127.0.0.1:{sink.port}/hooks"
    start_count = sink.count
    limiter = trio.CapacityLimiter(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as http, trio.open_nursery() as nursery:
        for event_id in range(1, events + 1):
            body = event_body(event_id).encode()

            async def post(body: bytes = body) -> None:
                async with limiter:
                    headers = {"Pbft-Signature": sign("whsec_bench", int(time.time()), body)}
                    await http.post(url, content=body, headers=headers)

            nursery.start_soon(post)
    await sink.wait_for(start_count + events)
    return time.perf_counter() - started


async def dispatcher(sink: Sink, events: int, concurrency: int, directory: Path) -> float:
    conn = connect(directory / "bench.sqlite")
    config = WebhookConfig(
        max_concurrency=concurrency, max_per_endpoint=concurrency, poll_interval_s=0.01,
        allow_private=True,  # the sink listens on 127.0.0.1
    )
    hooks = Webhooks(connect(directory / "bench.sqlite"), config)
    await hooks.create_endpoint(0, f"http://127.0.0.1:{sink.port}/hooks", None, None)
    with conn:
        for event_id in range(1, events + 1):
            conn.execute(
                "INSERT INTO events (id, type, payment_id, client_id, created_ms, body)"
                " VALUES (?, 'payment.confirmed', ?, 0, 0, ?)",
                (event_id, f"pay_0_{event_id}", event_body(event_id)),
            )
    start_count = sink.count
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(hooks.dispatch)
        await sink.wait_for(start_count + events)
        # Delivered means recorded, too: wait for the last result to be written.
        while hooks.statistics().get("delivered", 0) < events:
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    conn.close()
    hooks.store.conn.close()
    return elapsed


async def measure(events: int, concurrency: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as directory:
        async with trio.open_nursery() as nursery:
            sink = Sink()
            await nursery.start(sink.serve)
            plain = await baseline(sink, events, concurrency)
            hooked = await dispatcher(sink, events, concurrency, Path(directory))
            nursery.cancel_scope.cancel()
    return plain, hooked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    arguments = parser.parse_args(argv)
    if not 1 <= arguments.events <= 1_000_000 or not 1 <= arguments.concurrency <= 256:
        print("--events must be 1..1000000 and --concurrency 1..256", file=sys.stderr)
        return 2
    plain, hooked = trio.run(measure, arguments.events, arguments.concurrency)
    n = arguments.events
    print(f"events: {n}, concurrency: {arguments.concurrency}")
    print(f"baseline (httpx POSTs, nothing recorded): {n / plain:8.0f}/s  {plain:.2f} s")
    print(f"dispatcher (fan-out, claim, POST, record): {n / hooked:8.0f}/s  {hooked:.2f} s")
    print(f"dispatcher / baseline time: {hooked / plain:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
