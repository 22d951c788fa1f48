"""Free ports on 127.0.0.1 for local clusters (tests, benchmarks, `pbft cluster up`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """Ports the OS just handed out on 127.0.0.1 (closed again, so normally still free)."""
    sockets = []
    for _ in range(count):
        handle = socket.socket()
        handle.bind(("127.0.0.1", 0))
        sockets.append(handle)
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


# Where Linux hands out ports for outgoing connections, when /proc does not say.
DEFAULT_EPHEMERAL_PORTS = (32768, 60999)
# Ports below this are left to system services.
LOWEST_CLUSTER_PORT = 10000


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_PORTS


def consecutive_free_ports(count: int) -> list[int]:
    """`count` consecutive ports free on 127.0.0.1 a moment ago, outside the OS's ephemeral
    range: a replica that restarts must get its port back, and meanwhile the OS hands out
    ephemeral ports to every outgoing connection on the machine. The search starts at a
    random place, so clusters set up at once rarely race for the same ports."""
    low, high = ephemeral_port_range()
    ranges = [
        (start, end)
        for start, end in ((LOWEST_CLUSTER_PORT, low - 1), (high + 1, 65535))
        if end - start + 1 >= count
    ]
    candidates = [base for start, end in ranges for base in range(start, end - count + 2, count)]
    if not candidates:
        candidates = [free_ports(1)[0]]
    offset = int.from_bytes(os.urandom(4), "big") % len(candidates)
    for index in range(min(len(candidates), 500)):
        base = candidates[(offset + index) % len(candidates)]
        if base + count > 65536:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                handle = socket.socket()
                sockets.append(handle)
                handle.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for handle in sockets:
                handle.close()
    raise OSError("no run of free consecutive ports on 127.0.0.1")
