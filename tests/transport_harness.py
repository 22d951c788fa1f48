"""What the transport tests share: keys, fast timeouts, bounded runs on 127.0.0.1, and the
small waits they are written with (tests/test_transport*.py)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from crypto.keys import KeyRing, SigningKey
from runtime.transport import Transport, TransportConfig

HOST = "127.0.0.1"
TEST_DEADLINE_S = 10.0  # no single test may take longer, unless it says so

KEYS = {
    **{("replica", i): SigningKey.derive(4, f"replica/{i}") for i in range(4)},
    **{("client", j): SigningKey.derive(4, f"client/{j}") for j in range(3)},
}
RING = KeyRing({principal: key.verify_key for principal, key in KEYS.items()})
R0, R1, R2 = ("replica", 0), ("replica", 1), ("replica", 2)
C0, C1 = ("client", 0), ("client", 1)

FAST = TransportConfig(
    handshake_timeout=1.0,
    frame_timeout=0.5,
    send_timeout=1.0,
    connect_timeout=1.0,
    backoff_initial=0.02,
    backoff_max=0.2,
)


def make(principal: tuple[str, int], config: TransportConfig = FAST) -> Transport:
    return Transport(principal, KEYS[principal], RING, config)


# Raw test connections, closed when the test ends (so a leak reported by -W error is ours).
_RAW_STREAMS: list[trio.SocketStream] = []


async def connected(server: Transport, server_principal: tuple[str, int], peer: Transport) -> None:
    """`peer` dials `server` on a fresh 127.0.0.1 port; returns once both ends have the
    connection."""
    port = await server.listen(HOST, 0)
    peer.connect_to(server_principal, HOST, port)
    await peer.wait_connected(server_principal)
    await server.wait_connected(peer.principal)


async def open_raw(port: int, local_address: str | None = None) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(HOST, port, local_address=local_address)
    _RAW_STREAMS.append(stream)
    return stream


def run(test: Callable[[], Awaitable[None]], deadline_s: float = TEST_DEADLINE_S) -> None:
    async def bounded() -> None:
        try:
            with trio.fail_after(deadline_s):
                await test()
        finally:
            while _RAW_STREAMS:
                await close_with_reset(_RAW_STREAMS.pop())

    trio.run(bounded)


async def close_with_reset(stream: trio.SocketStream) -> None:
    """Close with an RST: no TIME_WAIT left behind. The flood and churn tests open thousands
    of connections; left in TIME_WAIT they crowd the ephemeral ports, and a later test that
    picks "free" ports for replica processes (runtime.ports.free_ports) loses races."""
    try:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    await trio.aclose_forcefully(stream)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def receive(transport: Transport, timeout: float = 5.0) -> tuple[tuple[str, int], bytes]:
    with trio.fail_after(timeout):
        return await transport.inbound.receive()


async def nothing_more(transport: Transport, wait: float = 0.2) -> bool:
    """True if nothing more arrives within `wait` seconds."""
    with trio.move_on_after(wait):
        await transport.inbound.receive()
        return False
    return True


async def closed_by_peer(stream: trio.SocketStream, timeout: float = 3.0) -> bool:
    """True once the other side closes (EOF or reset); whatever it sent first is skipped."""
    with trio.move_on_after(timeout):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False
