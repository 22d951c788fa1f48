"""Issue 8 attacks against one replica's transport and decoder: figures, old against new.

    python -m runtime.bench_attacks [--bomb-mib 16] [--flood-rate 25 ...] [--flood-seconds 4]

Decode bomb: nested empty arrays (the issue's case), as a whole frame and as the body of
a REQUEST and of a VIEW_CHANGE envelope, handed to the old decoder (msgpack with the
per-level limits `peek` used to apply, envelope then body) and to today's `peek`; at the
client frame limit (64 KiB) and at `bomb-mib`. Time, and peak traced memory, of each.

Connect flood: strangers open TCP connections at `flood-rate` a second (25 and 100 by
default) and stay silent; after `flood-seconds`, a client and a replica try to connect.
Run against the old admission (one pool of 64, no per-address cap, no reserved slots,
5 s per handshake step, as configured before issue 8) and today's defaults, with the
flood from another address (127.0.0.2, a stranger's host) and from the clients' own
address (127.0.0.1). Everything listens on 127.0.0.1. Figures only; nothing asserted.
"""

from __future__ import annotations

import argparse
import struct
import time
import tracemalloc
from collections.abc import Callable

import msgpack
import trio

from crypto.keys import KeyRing, SigningKey
from pbft.codec import MAX_FRAME_BYTES
from pbft.messages import MessageType
from pbft.signed import Rejected, peek
from runtime.transport import Transport, TransportConfig

MIB = 1024 * 1024
HOST = "127.0.0.1"
STRANGER = "127.0.0.2"
DIAL_PATIENCE = 10.0  # seconds a client or replica keeps trying before we call it locked out


def nested_arrays(size: int) -> bytes:
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    count = min(65535, max(1, (size - 3) // len(inner)))
    if size < len(inner):
        return b"\xdc" + struct.pack(">H", size - 3) + b"\x90" * (size - 3)
    return b"\xdc" + struct.pack(">H", count) + inner * count


def _old_unpack(data: bytes) -> object:
    return msgpack.unpackb(
        data,
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_str_len=MAX_FRAME_BYTES,
        max_bin_len=MAX_FRAME_BYTES,
        max_array_len=1 << 20,
        max_map_len=0,
        max_ext_len=0,
    )


def old_peek(frame: bytes) -> object:
    """What `peek` parsed before issue 8: the whole envelope, then the whole body, each with
    msgpack's per-level limits only (the checks in between were all cheap)."""
    envelope = _old_unpack(frame)
    if type(envelope) is list and len(envelope) == 5 and type(envelope[3]) is bytes:
        return _old_unpack(envelope[3])
    return envelope


def _outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except Rejected as error:
        return f"rejected {error.reason}"
    except Exception as error:  # the old parser's failures, reported as such
        return f"failed {type(error).__name__}"
    return "parsed"


def measure(call: Callable[[], object]) -> tuple[float, float, str]:
    """(seconds, peak MiB, outcome): timed without tracing (tracemalloc slows allocation
    down several times), then run again under tracemalloc for the peak."""
    started = time.perf_counter()
    outcome = _outcome(call)
    elapsed = time.perf_counter() - started
    tracemalloc.start()
    _outcome(call)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak / MIB, outcome


def bench_decode(bomb_mib: float) -> None:
    print("decode bomb: nested empty arrays (one byte each)")
    print(f"  {'frame':36} {'decoder':7} {'time':>11} {'peak':>12}  outcome")
    sizes = [("64 KiB", 64 * 1024), (f"{bomb_mib:g} MiB", int(bomb_mib * MIB))]
    for label, size in sizes:
        bomb = nested_arrays(size - 200)
        frames = {f"{label}, the whole frame": bomb}
        for message_type in (MessageType.REQUEST, MessageType.VIEW_CHANGE):
            frames[f"{label}, a {message_type.name} body"] = msgpack.packb(
                [1, int(message_type), 0, bomb, bytes(64)], use_bin_type=True
            )
        for name, frame in frames.items():
            for decoder, call in (("old", old_peek), ("peek", peek)):
                elapsed, peak, outcome = measure(lambda call=call, frame=frame: call(frame))
                figures = f"{elapsed * 1000:8.1f} ms {peak:8.1f} MiB"
                print(f"  {name:36} {decoder:7} {figures}  {outcome}")


OLD_ADMISSION = TransportConfig(
    max_pending_handshakes=64,
    max_pending_per_address=64,
    reserved_handshakes=0,
    handshake_timeout=5.0,  # a silent connection was held 5 s (the step awaiting AUTH)
)
NEW_ADMISSION = TransportConfig()


async def flood_run(
    config: TransportConfig, flood_from: str, rate: float, seconds: float
) -> dict[str, str]:
    keys = {
        ("replica", 0): SigningKey.derive(1, "replica/0"),
        ("replica", 1): SigningKey.derive(1, "replica/1"),
        ("client", 0): SigningKey.derive(1, "client/0"),
    }
    ring = KeyRing({principal: key.verify_key for principal, key in keys.items()})
    results: dict[str, str] = {}
    streams: list[trio.SocketStream] = []
    async with (
        Transport(("replica", 0), keys[("replica", 0)], ring, config) as replica,
        trio.open_nursery() as nursery,
    ):
        port = await replica.listen(HOST, 0)

        async def flood() -> None:
            while True:
                try:
                    streams.append(await trio.open_tcp_stream(HOST, port, local_address=flood_from))
                except OSError:
                    pass
                await trio.sleep(1.0 / rate)

        nursery.start_soon(flood)
        await trio.sleep(seconds)

        async def dial(principal: tuple[str, int]) -> None:
            started = trio.current_time()
            # Default redial backoff (up to 5 s), as PaymentClient and ReplicaNode use.
            async with Transport(principal, keys[principal], ring) as dialer:
                dialer.connect_to(("replica", 0), HOST, port)
                with trio.move_on_after(DIAL_PATIENCE):
                    await dialer.wait_connected(("replica", 0))
                    results[principal[0]] = f"in after {trio.current_time() - started:.2f} s"
                if principal[0] not in results:
                    failed = dict(dialer.statistics().handshakes_failed)
                    results[principal[0]] = f"locked out for {DIAL_PATIENCE:g} s ({failed})"

        async with trio.open_nursery() as dialers:
            dialers.start_soon(dial, ("client", 0))
            dialers.start_soon(dial, ("replica", 1))
        stats = replica.statistics()
        results["server"] = (
            f"pending {stats.pending_handshakes}, refused "
            f"{stats.handshakes_failed.get('too_many_pending', 0)}, evicted "
            f"{stats.handshakes_failed.get('evicted', 0)}"
        )
        nursery.cancel_scope.cancel()
    for stream in streams:
        await trio.aclose_forcefully(stream)
    return results


def bench_flood(rate: float, seconds: float) -> None:
    print(f"\nconnect flood: {rate:g} silent connects/s; after {seconds:g} s a client and a")
    print(f"replica dial (default redial backoff, {DIAL_PATIENCE:g} s each) while it goes on")
    for flood_from in (STRANGER, HOST):
        for label, config in (("old admission", OLD_ADMISSION), ("new admission", NEW_ADMISSION)):
            results = trio.run(flood_run, config, flood_from, rate, seconds)
            print(f"  flood from {flood_from}, {label}:")
            for who, what in results.items():
                print(f"    {who:8} {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bomb-mib", type=float, default=16.0)
    parser.add_argument("--flood-rate", type=float, action="append")
    parser.add_argument("--flood-seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    rates = args.flood_rate or [25.0, 100.0]
    if not 0.1 <= args.bomb_mib <= 16 or min(rates) <= 0 or args.flood_seconds <= 0:
        parser.error("--bomb-mib must be in 0.1..16; rates and seconds must be positive")
    bench_decode(args.bomb_mib)
    for rate in rates:
        bench_flood(rate, args.flood_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
