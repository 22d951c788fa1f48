"""The gateway process: hypercorn's trio worker serving the API, the gateway's
PaymentClients, its background tasks and (with `--replica J`) replica J itself, all in one
trio program.

Order of stopping, on SIGTERM or SIGINT (or `shutdown` set): hypercorn stops accepting,
then lets the requests in flight finish (up to `graceful_timeout_s`); only then are the
background tasks, the clients and the embedded replica cancelled, so a request being
drained still has a cluster to talk to. Starting is the reverse: the replica and the
clients first, the listener last, so the first request finds them running.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from gateway import metrics
from gateway.app import create_app

DEFAULT_GRACEFUL_TIMEOUT_S = 15.0
# hypercorn closes a connection whose peer sent nothing for this long while a read was due
# (its default: never). The backstop behind the app's own body deadline (408, BodyLimit)
# and keep_alive_timeout (idle between requests): a request silently waiting for its
# answer must not be cut, so it is well above the cluster timeout (10 s by default).
DEFAULT_READ_TIMEOUT_S = 60
# Modules with background work, each `async def run(gateway, *, task_status)`; started when
# the module exists (gateway/webhooks.py arrives with its own branch).
BACKGROUND_MODULES = ("gateway.service", "gateway.webhooks")


class ListenAddressError(ValueError):
    """A --listen address the gateway refuses; the message says why in one line."""


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT with HOST a loopback IP address (the gateway speaks plain HTTP: it is for
    a reverse proxy or a test on the same machine, never for a network) and PORT 0..65535
    (0: any free port, logged once listening)."""
    host, separator, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not separator or not host:
        raise ListenAddressError(f"--listen: {text!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ListenAddressError(
            f"--listen: {host!r} is not an IP address (use 127.0.0.1)"
        ) from None
    if not address.is_loopback:
        raise ListenAddressError(
            f"--listen: {host} is not a loopback address; the gateway serves plain HTTP and "
            "listens only on 127.0.0.1 (put a TLS proxy in front of it)"
        )
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenAddressError(f"--listen: port {port_text!r} is not in 0..65535")
    return str(address), int(port_text)


def log_line(stream: TextIO, event: str, **fields: object) -> None:
    """One JSON line, as the replicas log (runtime/node.py), so one reader reads both."""
    record: dict[str, object] = {"time": round(time.time(), 6), "gateway": True, "event": event}
    record.update(fields)
    stream.write(json.dumps(record) + "\n")
    stream.flush()


def hypercorn_config(
    host: str,
    port: int,
    graceful_timeout_s: float,
    read_timeout_s: int = DEFAULT_READ_TIMEOUT_S,
) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout_s
    config.read_timeout = read_timeout_s
    config.accesslog = None  # requests are counted in /metrics, not logged one by one
    config.loglevel = "WARNING"  # "Running on ...": our own `listening` line says it
    config.include_server_header = False
    return config


def read_timeout_for(cluster_timeout_s: float) -> int:
    """hypercorn's read timeout for a gateway whose cluster calls take up to
    `cluster_timeout_s`: a request may make a few of them (a balance read, its submit, a
    status lookup) while its peer rightly sends nothing."""
    return max(DEFAULT_READ_TIMEOUT_S, math.ceil(3 * cluster_timeout_s) + 10)


def _background_tasks() -> list[Callable[..., Awaitable[None]]]:
    tasks = []
    for name in BACKGROUND_MODULES:
        if importlib.util.find_spec(name) is not None:
            run = getattr(importlib.import_module(name), "run", None)
            if run is not None:
                tasks.append(run)
    return tasks


async def run_gateway(
    cluster: Any,
    client_ids: list[int],
    store: Any,
    listen: tuple[str, int],
    *,
    timeout_s: float,
    node: Any = None,
    shutdown: trio.Event | None = None,
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    log: TextIO | None = None,
    webhook_allow_private: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`pbft gateway`: open the Gateway (its PaymentClients) on `store` and serve it.
    `webhook_allow_private`: the operator's opt-in to webhooks on loopback/private addresses."""
    from gateway.service import Gateway

    async with Gateway.open(cluster, client_ids, store, timeout_s=timeout_s) as gateway:
        gateway.node = node
        if webhook_allow_private:
            from gateway.webhooks import WebhookConfig, webhooks_of

            # The first call fixes the gateway's webhook config (routes and dispatcher).
            await webhooks_of(gateway, WebhookConfig(allow_private=True))
        await serve(
            gateway,
            listen,
            shutdown=shutdown,
            graceful_timeout_s=graceful_timeout_s,
            log=log,
            task_status=task_status,
        )


async def serve(
    gateway: Any,
    listen: tuple[str, int],
    *,
    shutdown: trio.Event | None = None,
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    log: TextIO | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an open `gateway` (its clients running) on `listen` until `shutdown` is set
    (or SIGTERM/SIGINT arrive, when `shutdown` is None), then drain and stop. Runs
    `gateway.node`, the embedded replica, if there is one. `task_status.started` gets the
    base URL."""
    stream = log if log is not None else sys.stderr
    host, port = listen
    stop = shutdown if shutdown is not None else trio.Event()
    metrics.instrument_gateway(gateway)
    app = create_app(gateway)
    async with trio.open_nursery() as nursery:
        if shutdown is None:
            await nursery.start(_stop_on_signal, stop, stream)
        node = getattr(gateway, "node", None)
        if node is not None:
            await nursery.start(node.run)
        async with trio.open_nursery() as background:
            for run in _background_tasks():
                await background.start(run, gateway)
            config = hypercorn_config(
                host, port, graceful_timeout_s, read_timeout_for(gateway.service.timeout_s)
            )
            http_done = trio.Event()
            binds = await background.start(_serve_http, app, config, stop, http_done)
            url = binds[0] if binds else f"http://{host}:{port}"
            log_line(stream, "listening", url=url, clients=sorted(gateway.clients))
            task_status.started(url)
            await stop.wait()
            log_line(stream, "draining", graceful_timeout_s=graceful_timeout_s)
            # hypercorn returns once the requests in flight are answered (or the graceful
            # timeout passed); only then may the background tasks and the clients go.
            await http_done.wait()
            background.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    log_line(stream, "stopped")


async def _serve_http(
    app: Any,
    config: Config,
    stop: trio.Event,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
    finally:
        done.set()


async def _stop_on_signal(
    stop: trio.Event,
    stream: TextIO,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Ignored while the receiver is open, as `pbft replica` does: a second signal (a Ctrl-C
    # that reaches a whole process group) must not cut the drain short. SIGKILL still works.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log_line(stream, "signal", signal=signal.Signals(signum).name)
            stop.set()
            break
        await trio.sleep_forever()  # keep the receiver (and the ignoring) until the end
