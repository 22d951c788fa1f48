"""The host loop (pbft/host.py): what a step returns, and the order a host is asked to act in.

A recording host logs every call; the rule under test is persist before send, for every
message of a step, with the synchronous and the awaited disk alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing
from replica_harness import Cluster

from crypto.keys import Principal
from pbft.client import BalanceRead, ClientAction, Decided, LookupResult
from pbft.events import (
    Action,
    Broadcast,
    Event,
    Executed,
    ExecutedRequest,
    MessageReceived,
    Note,
    Persist,
    Send,
    Tick,
)
from pbft.host import (
    Outgoing,
    Ready,
    carry_out,
    carry_out_async,
    carry_out_client,
    peers_of,
    step,
    write_records,
)

PEERS: tuple[Principal, ...] = (("replica", 0), ("replica", 2), ("replica", 3))


class ScriptedCore:
    """A core that answers each event with the next scripted list of actions."""

    def __init__(self, script: Sequence[list[Action]]) -> None:
        self.script = list(script)
        self.seen: list[Event] = []

    def handle(self, event: Event) -> list[Action]:
        self.seen.append(event)
        return self.script.pop(0)


class RecordingHost:
    """Logs every call in order; `durable` is what persist has written so far."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.durable: dict[tuple[str | int, ...], bytes] = {}
        # For every frame sent: the records that were durable at that moment.
        self.durable_at_send: list[dict[tuple[str | int, ...], bytes]] = []

    def persist(self, records: Sequence[Persist]) -> None:
        self.calls.append(("persist", tuple(records)))
        write_records(self.durable, records)

    def send(self, message: Outgoing) -> None:
        self.calls.append(("send", message))
        self.durable_at_send.append(dict(self.durable))

    def executed(self, executed: Executed) -> None:
        self.calls.append(("executed", executed))

    def note(self, note: Note) -> None:
        self.calls.append(("note", note))


class AwaitedDiskHost(RecordingHost):
    """The runtime's shape: persist returns only when the disk says so."""

    def __init__(self) -> None:
        super().__init__()
        self.disk_done = trio.Event()
        self.fail: BaseException | None = None

        self.queued: list[Persist] = []  # deferred, to be written ahead of the next persist

    async def persist(self, records: Sequence[Persist]) -> None:  # type: ignore[override]
        await self.disk_done.wait()
        if self.fail is not None:
            raise self.fail
        queued, self.queued = self.queued, []
        super().persist([*queued, *records])

    async def defer(self, records: Sequence[Persist]) -> None:
        self.calls.append(("defer", tuple(records)))
        self.queued.extend(records)


def _executed(seq: int) -> Executed:
    request = ExecutedRequest(
        0, seq, b"d" * 32, "a", "b", 1, "confirmed", "", True, "transfer", 0, 0, 0, ()
    )
    return Executed(0, seq, bytes([seq]) * 32, (request,), 0, 0, b"b" * 32, ())


def _mixed_script() -> list[list[Action]]:
    """Three events; records and messages interleaved the way a replica emits them."""
    return [
        [Persist(("vote", 1), b"v1"), Broadcast(b"prepare-1"), Note("view_change", "to 1")],
        [Send(("client", 5), b"reply-1"), Persist(("vote", 2), b"v2"), _executed(1)],
        [Broadcast(b"commit-2"), Persist(("vote", 1), None), Note("checkpoint_stable", "4")],
    ]


def test_persist_happens_before_every_send_of_the_step() -> None:
    ready = step(ScriptedCore(_mixed_script()), [Tick(1), Tick(2), Tick(3)], PEERS)
    host = RecordingHost()
    carry_out(ready, host)
    kinds = [kind for kind, _ in host.calls]
    # One write for the whole step, before anything else.
    assert kinds[0] == "persist" and kinds.count("persist") == 1
    final = {("vote", 2): b"v2"}
    assert host.durable == final
    # Every frame, including the ones made before the last record, left after all of them.
    assert len(host.durable_at_send) == 3
    assert all(durable == final for durable in host.durable_at_send)


def test_step_covers_several_events_in_order() -> None:
    core = ScriptedCore(_mixed_script())
    events: list[Event] = [Tick(5), MessageReceived(b"x"), Tick(10)]
    ready = step(core, events, PEERS)
    assert core.seen == events
    assert ready.events == 3
    assert [record.key for record in ready.records] == [("vote", 1), ("vote", 2), ("vote", 1)]
    assert ready.records[-1].value is None  # a delete stays a delete, in its place
    assert ready.messages == (
        Outgoing(PEERS, b"prepare-1"),
        Outgoing((("client", 5),), b"reply-1"),
        Outgoing(PEERS, b"commit-2"),
    )


def test_notes_and_executed_pass_through_in_the_order_the_core_made_them() -> None:
    ready = step(ScriptedCore(_mixed_script()), [Tick(1), Tick(2), Tick(3)], PEERS)
    host = RecordingHost()
    carry_out(ready, host)
    assert host.calls[1:] == [
        ("send", Outgoing(PEERS, b"prepare-1")),
        ("note", Note("view_change", "to 1")),
        ("send", Outgoing((("client", 5),), b"reply-1")),
        ("executed", _executed(1)),
        ("send", Outgoing(PEERS, b"commit-2")),
        ("note", Note("checkpoint_stable", "4")),
    ]
    assert ready.notes == (Note("view_change", "to 1"), Note("checkpoint_stable", "4"))
    assert ready.executed == (_executed(1),)


def test_a_step_with_nothing_to_persist_does_not_touch_the_disk() -> None:
    ready = step(ScriptedCore([[Send(("client", 1), b"r"), Note("drop", "stale")]]), [Tick(1)], ())
    assert not ready.must_sync
    host = RecordingHost()
    carry_out(ready, host)
    assert [kind for kind, _ in host.calls] == ["send", "note"]


def test_a_broadcast_is_one_frame_for_every_peer_in_id_order() -> None:
    peers = peers_of(1, range(4))
    assert peers == PEERS
    ready = step(ScriptedCore([[Broadcast(b"p"), Send(("replica", 2), b"q")]]), [Tick(1)], peers)
    assert ready.by_destination() == {
        ("replica", 0): [b"p"],
        ("replica", 2): [b"p", b"q"],
        ("replica", 3): [b"p"],
    }


def test_step_refuses_what_is_not_an_action() -> None:
    with pytest.raises(TypeError):
        step(ScriptedCore([[b"not an action"]]), [Tick(1)], PEERS)  # type: ignore[list-item]


def test_awaited_persist_releases_nothing_until_the_disk_returns() -> None:
    ready = step(ScriptedCore(_mixed_script()), [Tick(1), Tick(2), Tick(3)], PEERS)
    host = AwaitedDiskHost()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(carry_out_async, ready, host)
            await trio.testing.wait_all_tasks_blocked()
            assert host.calls == []  # the disk has not answered: nothing may leave
            host.disk_done.set()
        assert [kind for kind, _ in host.calls].count("send") == 3
        assert all(durable == {("vote", 2): b"v2"} for durable in host.durable_at_send)

    trio.run(main)


def test_a_failed_or_cancelled_persist_sends_nothing() -> None:
    ready = step(ScriptedCore(_mixed_script()), [Tick(1), Tick(2), Tick(3)], PEERS)
    failing = AwaitedDiskHost()
    failing.fail = OSError("disk full")
    failing.disk_done.set()
    with pytest.raises(OSError):
        trio.run(carry_out_async, ready, failing)
    assert failing.calls == []

    cancelled = AwaitedDiskHost()

    async def cancel_during_write() -> None:
        with trio.move_on_after(0.01):
            await carry_out_async(ready, cancelled)

    trio.run(cancel_during_write)
    assert cancelled.calls == []


def test_a_real_replica_step_writes_its_vote_before_sending_it() -> None:
    """A backup that accepts a PRE-PREPARE persists it (and its PREPARE) before it sends
    the PREPARE: the rule on a real core, not a script."""
    cluster = Cluster()
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    ready = step(replica, [MessageReceived(entry.raw)], peers_of(1, range(cluster.n)))
    assert ready.records and ready.messages
    host = RecordingHost()
    carry_out(ready, host)
    written = {record.key: record.value for record in ready.records}
    assert all(durable == written for durable in host.durable_at_send)
    assert isinstance(ready, Ready) and host.calls[0][0] == "persist"


class RecordingClientHost:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def send(self, message: Outgoing) -> None:
        self.calls.append(("send", message))

    def decided(self, decided: Decided) -> None:
        self.calls.append(("decided", decided))

    def balance_read(self, read: BalanceRead) -> None:
        self.calls.append(("read", read))

    def looked_up(self, result: LookupResult) -> None:
        self.calls.append(("lookup", result))


def test_client_actions_reach_their_host_in_order() -> None:
    decided = Decided(0, 7, "confirmed", "", 3, None)
    read = BalanceRead(1, "a", True, 10, (0, 1), 3)
    lookup = LookupResult(2, "status", "not_found", 3, (0, 1))
    actions: list[ClientAction] = [Send(("replica", 0), b"req"), decided, lookup, read]
    host = RecordingClientHost()
    carry_out_client(actions, host)
    assert host.calls == [
        ("send", Outgoing((("replica", 0),), b"req")),
        ("decided", decided),
        ("lookup", lookup),
        ("read", read),
    ]


def test_a_client_submit_goes_out_through_the_client_host() -> None:
    cluster = Cluster()
    client = cluster.client(0)
    host = RecordingClientHost()
    carry_out_client(client.submit(1, "alice", "carol", 5), host)
    assert [call[0] for call in host.calls] == ["send"]
    message = host.calls[0][1]
    assert isinstance(message, Outgoing) and message.to == (("replica", 0),)


def _deferred_script() -> list[list[Action]]:
    """A step whose records may all follow its messages (a commit certificate, a stable
    checkpoint's deletes), with a reply made before them."""
    return [
        [Send(("client", 5), b"reply-1"), Persist(("committed", 1), b"c1", deferrable=True)],
        [Broadcast(b"checkpoint-4"), Persist(("committed", 1), None, deferrable=True)],
    ]


def test_a_step_of_deferrable_records_only_sends_first_then_writes_them_all() -> None:
    ready = step(ScriptedCore(_deferred_script()), [Tick(1), Tick(2)], PEERS)
    assert ready.sends_first and not ready.must_sync
    host = RecordingHost()
    carry_out(ready, host)
    assert [kind for kind, _ in host.calls] == ["send", "send", "persist"]
    assert host.durable_at_send == [{}, {}]
    # One write, in the order the core made the records: the delete stays last.
    assert host.calls[-1] == ("persist", ready.records) and host.durable == {}


def test_one_record_that_is_not_deferrable_makes_the_whole_step_write_first() -> None:
    script = _deferred_script()
    script[1].append(Persist(("vote", 2), b"v2"))
    ready = step(ScriptedCore(script), [Tick(1), Tick(2)], PEERS)
    assert ready.must_sync and not ready.sends_first
    host = RecordingHost()
    carry_out(ready, host)
    assert [kind for kind, _ in host.calls] == ["persist", "send", "send"]
    assert host.durable_at_send == [{("vote", 2): b"v2"}] * 2


def test_awaited_deferrable_records_are_queued_ahead_of_the_next_write() -> None:
    first = step(ScriptedCore(_deferred_script()), [Tick(1), Tick(2)], PEERS)
    second = step(
        ScriptedCore([[Persist(("vote", 2), b"v2"), Broadcast(b"prepare-2")]]), [Tick(3)], PEERS
    )
    host = AwaitedDiskHost()

    async def main() -> None:
        # The deferred step's frames leave without the disk; its records are only queued.
        await carry_out_async(first, host)
        assert [kind for kind, _ in host.calls] == ["send", "send", "defer"]
        assert host.durable_at_send == [{}, {}]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(carry_out_async, second, host)
            await trio.testing.wait_all_tasks_blocked()
            assert host.calls[-1][0] == "defer"  # the next vote waits for the disk
            host.disk_done.set()
        # One write: the queued records first, in their order, then the step's own.
        assert host.calls[-2] == ("persist", (*first.records, *second.records))
        assert host.durable_at_send[-1] == {("vote", 2): b"v2"}

    trio.run(main)
