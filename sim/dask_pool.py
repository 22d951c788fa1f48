"""Run sweep and fuzz tasks on an existing dask.distributed cluster (`--scheduler`).

The cluster's workers must import this project (install it on every worker). A dask
`Client` hands out a `concurrent.futures.Executor`, so the sweep and fuzz loops stay the
same as with a local process pool; each task is one deterministic seed, so where it ran
changes nothing in its result.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

# A scheduler that does not answer within this is reported, not waited on forever.
CONNECT_TIMEOUT_S = 5.0


class SchedulerError(RuntimeError):
    """The scheduler address is malformed or nothing answers there."""


def connect(address: str, timeout_s: float | None = None) -> Any:
    """A `distributed.Client` connected to `address` (e.g. tcp://10.0.0.5:8786)."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    # Only plain tcp: tls would need certificates this command has no options for.
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not host or not port.isdigit():
        raise SchedulerError(f"{address!r} is not an address like tcp://HOST:8786")
    from distributed import Client

    try:
        return Client(address, timeout=timeout_s, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SchedulerError(
            f"cannot reach a dask scheduler at {address} within {timeout_s:g} s ({detail})"
        ) from None


def executor(client: Any) -> Executor:
    # pure=False: dask must never merge two submissions into one task by their arguments.
    result: Executor = client.get_executor(pure=False)
    return result


def worker_threads(client: Any) -> int:
    """How many tasks the cluster runs at once: the default number in flight."""
    return max(1, sum(client.nthreads().values()))
