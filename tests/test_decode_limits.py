"""Decode bombs: frames that cost little to send and much to parse, refused cheaply.

Issue 8: `peek` used to hand a whole frame to msgpack with a per-level array limit only, so
16 MiB of nested empty arrays (one byte each) built 16 M lists (about 1.1 GiB, 6 s) before
any check. Now a frame longer than its type allows is dropped on its length, and decoding
counts objects by their headers (`count_items`) against a total budget before building any.
Memory is asserted with tracemalloc on generous bounds; times are printed, not asserted
(`python -m runtime.bench_attacks` prints figures against the old decoder).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from replica_harness import Cluster, notes

from pbft.codec import MAX_DECODE_ITEMS, MAX_FRAME_BYTES, DecodeError, count_items, unpack
from pbft.events import MessageReceived
from pbft.messages import MESSAGE_CLASSES, MessageType, Request
from pbft.signed import BODY_LIMITS, ENVELOPE_OVERHEAD, Rejected, client_may_send, peek, seal
from runtime.inbound import InboundScheduler
from runtime.node import ReplicaNode

MIB = 1024 * 1024
SIZE = MAX_FRAME_BYTES - 1024  # room for an envelope around it


def nested_arrays(size: int) -> bytes:
    """The issue's bomb: an array16 of array16s, each of 65535 empty arrays (1 byte each)."""
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    count = min(65535, (size - 3) // len(inner))
    return b"\xdc" + struct.pack(">H", count) + inner * count


def huge_map(size: int) -> bytes:
    """A map32 of (0, 0) pairs: two objects per two bytes."""
    pairs = (size - 5) // 2
    return b"\xdf" + struct.pack(">I", pairs) + b"\x00\x00" * pairs


def deep_nesting(size: int) -> bytes:
    return b"\x91" * (size - 1) + b"\x00"


def claims_huge(size: int) -> bytes:
    """Headers that announce 2**32 - 1 entries, and not much behind them."""
    return b"\xdd\xff\xff\xff\xff" + b"\xdf\xff\xff\xff\xff" * ((size - 5) // 5)


BOMBS: dict[str, Callable[[int], bytes]] = {
    "nested_arrays": nested_arrays,
    "huge_map": huge_map,
    "deep_nesting": deep_nesting,
    "claims_huge": claims_huge,
}


def envelope_around(body: bytes, type_code: int) -> bytes:
    """A canonical envelope [1, type, 0, body, signature] built by hand around any body."""
    return msgpack.packb([1, type_code, 0, body, bytes(64)], use_bin_type=True)


def measure(call: Callable[[], object]) -> tuple[BaseException | None, float, int]:
    """(what it raised, seconds, peak bytes allocated while it ran)."""
    tracemalloc.start()
    started = time.perf_counter()
    raised: BaseException | None = None
    try:
        call()
    except (Rejected, DecodeError) as error:
        raised = error
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return raised, elapsed, peak


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_frame_sized_bomb_is_refused_with_flat_memory(name: str) -> None:
    bomb = BOMBS[name](SIZE)
    cases = {
        "as the envelope": bomb,
        "as a REQUEST body": envelope_around(bomb, int(MessageType.REQUEST)),
        # The type with the largest legitimate budget: the bomb is parsed up to it.
        "as a VIEW_CHANGE body": envelope_around(bomb, int(MessageType.VIEW_CHANGE)),
    }
    for case, frame in cases.items():
        assert len(frame) <= MAX_FRAME_BYTES
        raised, elapsed, peak = measure(lambda frame=frame: peek(frame))  # type: ignore[misc]
        print(f"{name} {case}: {elapsed * 1000:.1f} ms, peak {peak / MIB:.1f} MiB")
        assert isinstance(raised, Rejected), (case, raised)
        # Before: about 1.1 GiB for nested_arrays. Now: the envelope's parse copies the body
        # and its canonical check re-encodes it (a few copies of the frame, no more), plus
        # the headers of one budget (131072 objects at most) read without building them.
        assert peak < 5 * len(frame), (case, peak)
        if case == "as a REQUEST body":
            assert raised.reason == "oversize"  # dropped on its length, nothing parsed


def test_a_small_type_is_dropped_on_its_length_before_parsing() -> None:
    limit = BODY_LIMITS[int(MessageType.REQUEST)]
    assert limit < 1024
    too_long = envelope_around(b"\xc1" * (limit + 1), int(MessageType.REQUEST))
    with pytest.raises(Rejected) as caught:
        peek(too_long)
    assert caught.value.reason == "oversize"
    # Not parsed: the same bytes at the limit fail in the parser instead.
    at_limit = envelope_around(b"\xc1" * limit, int(MessageType.REQUEST))
    with pytest.raises(Rejected) as caught:
        peek(at_limit)
    assert caught.value.reason == "malformed_malformed"


def test_every_legitimate_message_fits_its_type_limit_and_budget() -> None:
    request = Request(7, 1, "transfer", "a" * 64, "b" * 64, 2**64 - 1)
    raw = seal(request, _KEY)
    assert len(Request.encode(request)) <= BODY_LIMITS[int(MessageType.REQUEST)]
    assert len(raw) <= BODY_LIMITS[int(MessageType.REQUEST)] + ENVELOPE_OVERHEAD
    assert peek(raw)[1] == request
    for cls in MESSAGE_CLASSES.values():
        assert 4096 <= cls.decode_budget() <= MAX_DECODE_ITEMS
        assert BODY_LIMITS[int(cls.TYPE)] <= MAX_FRAME_BYTES


_KEY = Cluster().client_keys[0]


def _objects(value: object) -> int:
    if isinstance(value, list):
        return 1 + sum(_objects(item) for item in value)
    if isinstance(value, dict):
        return 1 + sum(_objects(k) + _objects(v) for k, v in value.items())
    return 1


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=70_000)
    | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=20)
        | st.dictionaries(st.integers(min_value=0, max_value=1000), children, max_size=5)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUES)
def test_count_items_counts_every_object_without_building_them(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    expected = _objects(value)
    assert count_items(data, max_items=10**6, max_depth=10**6) == expected
    if expected > 1:
        with pytest.raises(DecodeError) as caught:
            count_items(data, max_items=expected - 1, max_depth=10**6)
        assert caught.value.reason == "oversize"


def test_count_items_charges_an_announced_length_before_reading_entries() -> None:
    with pytest.raises(DecodeError):
        count_items(b"\xdd\xff\xff\xff\xff", max_items=1000)  # 4 G entries, 5 bytes
    with pytest.raises(DecodeError):
        count_items(b"\x91" * 100 + b"\x00", max_items=1000, max_depth=16)
    # Truncated or invalid input is left to the parser (which rejects it): no error here.
    assert count_items(b"\x93\x01", max_items=1000) == 2
    assert count_items(b"\xc1", max_items=1000) == 1  # the invalid byte itself
    assert count_items(b"\xc6\xff\xff", max_items=1000) == 1
    with pytest.raises(DecodeError) as caught:
        unpack(b"\x92\x01", max_items=2)  # no longer than the budget: not even counted
    assert caught.value.reason == "malformed"  # short input: the parser's verdict


def test_a_replica_drops_a_bomb_and_keeps_working() -> None:
    cluster = Cluster()
    replica = cluster.replica(1)
    bomb = envelope_around(nested_arrays(SIZE), int(MessageType.PRE_PREPARE))
    raised, elapsed, peak = measure(lambda: cluster.deliver(replica, bomb))
    assert raised is None
    print(
        f"replica handles a 16 MiB PRE_PREPARE bomb: {elapsed * 1000:.1f} ms, {peak / MIB:.1f} MiB"
    )
    assert peak < 5 * len(bomb)
    assert replica.drops["malformed_oversize"] == 1
    # And it still takes a genuine request (the primary forwards, a backup relays).
    actions = cluster.deliver(replica, cluster.request(1, 5))
    assert not [note for note in notes(actions, "drop")]


def test_only_the_client_types_pass_from_a_client_connection() -> None:
    cluster = Cluster()
    assert client_may_send(cluster.request(1))
    assert not client_may_send(cluster.prepare(1, cluster.chain().append()))
    # A replica type's bomb from a client connection is refused on one byte.
    assert not client_may_send(envelope_around(nested_arrays(64 * 1024), 9))
    assert not client_may_send(b"")
    assert not client_may_send(nested_arrays(64 * 1024))


def test_a_replica_node_passes_only_client_types_from_client_connections(tmp_path: Path) -> None:
    cluster = Cluster()
    request = cluster.request(1)
    prepare = cluster.prepare(1, cluster.chain().append())
    bomb = envelope_around(nested_arrays(64 * 1024 - 200), int(MessageType.VIEW_CHANGE))
    frames = [
        (("client", 0), bomb),  # a client key, a replica type: dropped on one byte
        (("client", 0), prepare),  # even a genuine replica message, relayed by a client
        (("client", 0), request),
        (("replica", 1), prepare),  # replicas may send every type
    ]

    async def main() -> list[bytes]:
        inbound = InboundScheduler(max_frames=10, replica_bytes=2**20, client_bytes=2**20)
        for principal, frame in frames:
            await inbound.put(principal, frame)
        inbound.close()
        node = ReplicaNode(None, 0, tmp_path)  # type: ignore[arg-type]
        passed = []
        while (event := await node._next_event(inbound)) is not None:
            if isinstance(event, MessageReceived):  # ticks come too
                passed.append(event.data)
        assert node.client_frames_refused == 2
        return passed

    assert trio.run(main) == [prepare, request]  # the replica's frame first
