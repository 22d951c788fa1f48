"""A webhook receiver for tests: a tiny HTTP/1.1 server on 127.0.0.1 that records every POST.

`answer(request, number)` decides each answer: an HTTP status, or None to hang (never answer,
which is what a stuck receiver does). `fail_first(n)` builds the common one. One request per
connection (it answers `Connection: close`), sizes bounded; it runs until its nursery is
cancelled, and the tests wrap everything in trio.fail_after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names lowercased
    body: bytes
    at: float  # trio.current_time() when the body was complete

    @property
    def event_id(self) -> str:
        return self.headers.get("pbft-event-id", "")


Answer = Callable[[Received, int], "int | None"]


def fail_first(n: int, status: int = 500) -> Answer:
    """Answers `status` to the first n requests, 200 afterwards."""
    return lambda _request, number: status if number < n else 200


def always(status: int) -> Answer:
    return lambda _request, _number: status


@dataclass
class Receiver:
    answer: Answer = field(default_factory=lambda: always(200))
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def wait_for(self, predicate: Callable[[list[Received]], bool]) -> None:
        """Returns once `predicate(self.requests)` holds (the caller bounds the wait)."""
        while not predicate(self.requests):
            self.changed = trio.Event()
            await self.changed.wait()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = await self._read(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError):
                return
            if request is None:
                return
            number = len(self.requests)
            self.requests.append(request)
            self.changed.set()
            status = self.answer(request, number)
            if status is None:
                await trio.sleep_forever()
            reply = b"ok" if status < 300 else b"receiver says no"
            head = (
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(reply)}\r\nConnection: close\r\n\r\n"
            )
            try:
                await stream.send_all(head.encode() + reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _read(self, stream: trio.SocketStream) -> Received | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            data += chunk
            if len(data) > MAX_HEAD:
                raise ValueError("head too large")
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        _method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if not 0 <= length <= MAX_BODY:
            raise ValueError("body too large")
        while len(body) < length:
            chunk = await stream.receive_some(length - len(body))
            if not chunk:
                return None
            body += chunk
        return Received(path, headers, body, trio.current_time())
