"""The host contract: what a driver gets from a core per step, and the one loop that carries it out.

A driver (the simulator, the trio runtime) supplies a clock, a network and a disk. It feeds
events to `step`, which lets the core handle them and returns one `Ready`: the records to
make durable, then the outputs (messages, executions, notes) in the order the core made
them. `carry_out` (synchronous hosts) and `carry_out_async` (hosts whose disk is awaited)
are the only places that order the two: persist, then release. A step may cover several
events (group commit: handle everything that is ready, persist once, then send all).

What a message depends on, and so what must be durable before it leaves:
- A vote (PRE-PREPARE, PREPARE, COMMIT, VIEW-CHANGE, NEW-VIEW) depends on its own record:
  a replica that sent a vote, crashed and forgot it could vote otherwise after a restart.
  Those records (and the prepared certificate written with a COMMIT) are never deferrable.
- A reply depends on the decision it reports being fixed, not on this replica's copy of
  it. The decision is fixed once 2f + 1 replicas sent matching COMMITs, each made durable
  (with its prepared certificate) before it was sent: a view change then re-proposes the
  entry at its seq, whoever crashed. The replying replica's record of the commit
  certificate ("committed") is its own shortcut, not part of that. If it crashes between
  the reply and that write, it restarts with its prepared certificate and its COMMIT
  (written before the COMMIT left) but without the entry: recovery (pbft/recovery.py)
  re-executes only what its log holds, so it stands one entry behind, learns that from
  the others (heartbeat claims, checkpoints: pbft/catchup.py), fetches their commit
  certificate and executes the same entry to the same result (execution is
  deterministic, and strictly in seq order, so its dedup table gets the same decision
  back before any later entry runs). The client's receipt (f + 1 signed replies) stays
  true: it is signed over that fixed result. A replica that never re-executes it (the
  whole cluster crashed at once) still finds the entry prepared at f + 1 correct
  replicas, so the next view re-proposes it at the same seq, with the same result.
- A stable checkpoint ("checkpoint", and the deletes of what it makes obsolete) holds a
  state 2f + 1 replicas signed, which re-executing the log rebuilds; losing it leaves
  the log as it was before, a prefix.
Those records are marked `Persist.deferrable`. A step whose records are all deferrable
sends first and writes after; one with any record that is not writes all of them first
(one write, in order: deferring part of a step would reorder its writes). Records reach
the disk in the order of their steps, and a step that is not `sends_first` releases
nothing until its records and every earlier step's are durable. So the log on disk is
always a prefix of the steps, and what it may lack is deferrable records only. A
synchronous host writes a deferred step right after its sends; an awaited one may queue
it (`AsyncHost.defer`) to share the next step's write, so a lone payment's replica does
not wait out that fsync before it handles the next request.

Clients have no disk; `carry_out_client` hands a client core's actions to its host.

Modelled on etcd raft's `Ready` (node.go), without its acknowledgement protocol: our cores
do not wait for the host to confirm a step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from crypto.keys import Principal
from pbft.client import BalanceRead, ClientAction, Decided, LookupResult, ReplicaStatus
from pbft.events import Action, Broadcast, Event, Executed, Note, Persist, Send


class Outgoing(NamedTuple):
    """One frame and every destination it goes to (a broadcast keeps its bytes once)."""

    to: tuple[Principal, ...]
    data: bytes


Output = Outgoing | Executed | Note


class Ready(NamedTuple):
    """What one step of a replica core asks of its host.

    The rule: every record in `records` is durable before any message in `outputs` leaves
    (persist before send), unless every one of them is deferrable (`sends_first`): then
    the messages leave first and the records are written ahead of the next step's (before
    any message that waits for a write leaves). A replica that votes, crashes and forgets
    its vote could vote otherwise after a restart; with the rule, what it said is what it
    wrote (a vote's record is never deferrable; the module docstring says which are and
    why). `carry_out` and `carry_out_async` honour it; a host never sends from a Ready
    any other way.

    `outputs` keep the order the core produced them in, across every event of the step:
    observers (the simulator's trace) see executions and notes where they happened
    between the sends. (A NamedTuple, like `Outgoing`: immutable, and built once per step
    in the simulator's hot loop, where a frozen dataclass costs a microsecond more.)
    """

    records: tuple[Persist, ...] = ()
    outputs: tuple[Output, ...] = ()
    # How many events the step handled.
    events: int = 0

    @property
    def must_sync(self) -> bool:
        """Whether the disk has anything to write before the messages may leave."""
        return bool(self.records) and not self.sends_first

    @property
    def sends_first(self) -> bool:
        """Whether the step has records, all of them deferrable: they follow its messages."""
        return bool(self.records) and all(record.deferrable for record in self.records)

    @property
    def messages(self) -> tuple[Outgoing, ...]:
        return tuple(output for output in self.outputs if isinstance(output, Outgoing))

    @property
    def executed(self) -> tuple[Executed, ...]:
        return tuple(output for output in self.outputs if isinstance(output, Executed))

    @property
    def notes(self) -> tuple[Note, ...]:
        return tuple(output for output in self.outputs if isinstance(output, Note))

    def by_destination(self) -> dict[Principal, list[bytes]]:
        """The frames for each destination, in sending order (to coalesce writes per peer)."""
        frames: dict[Principal, list[bytes]] = {}
        for message in self.messages:
            for destination in message.to:
                frames.setdefault(destination, []).append(message.data)
        return frames


class Core(Protocol):
    """A replica core as the loop sees it (pbft.replica.Replica)."""

    def handle(self, event: Event) -> list[Action]: ...


def step(core: Core, events: Iterable[Event], peers: tuple[Principal, ...]) -> Ready:
    """Let `core` handle `events` in order; what they ask for, as one Ready.

    `peers` are the replicas a Broadcast goes to (every replica but this one), in the order
    the frames are to be sent.
    """
    records: list[Persist] = []
    outputs: list[Output] = []
    count = 0
    for event in events:
        count += 1
        for action in core.handle(event):
            if isinstance(action, Persist):
                records.append(action)
            elif isinstance(action, Send):
                outputs.append(Outgoing((action.to,), action.data))
            elif isinstance(action, Broadcast):
                outputs.append(Outgoing(peers, action.data))
            elif isinstance(action, (Executed, Note)):
                outputs.append(action)
            else:
                raise TypeError(f"not an action: {action!r}")
    return Ready(tuple(records), tuple(outputs), count)


def peers_of(replica_id: int, replica_ids: Iterable[int]) -> tuple[Principal, ...]:
    """Where a Broadcast of `replica_id` goes: every other replica, in id order."""
    return tuple(("replica", replica) for replica in replica_ids if replica != replica_id)


class Host(Protocol):
    """A replica's network and observers. `send` may be called only after the step's records
    are durable, or before them if all are deferrable; `carry_out` and `carry_out_async`
    see to it."""

    def send(self, message: Outgoing) -> None: ...

    def executed(self, executed: Executed) -> None: ...

    def note(self, note: Note) -> None: ...


class SyncHost(Host, Protocol):
    """A host whose disk write is done when `persist` returns (the simulator's memory)."""

    def persist(self, records: Sequence[Persist]) -> None: ...


class AsyncHost(Host, Protocol):
    """A host whose disk write is awaited (the runtime fsyncs in a worker thread)."""

    async def persist(self, records: Sequence[Persist]) -> None:
        """Returns once `records`, and all records deferred before them, are durable."""
        ...

    async def defer(self, records: Sequence[Persist]) -> None:
        """Queue deferrable records to be written, in order, before anything persisted or
        deferred later; returns once queued (waiting only while the queue is full)."""
        ...


def release(ready: Ready, host: Host) -> None:
    """Hand the outputs to the host in the order the core made them. Only for records that
    are durable already: use `carry_out` or `carry_out_async`."""
    for output in ready.outputs:
        if isinstance(output, Outgoing):
            host.send(output)
        elif isinstance(output, Executed):
            host.executed(output)
        else:
            host.note(output)


def carry_out(ready: Ready, host: SyncHost) -> None:
    """Persist before send, for a host whose `persist` is synchronous (deferrable records
    only: send, then persist)."""
    if ready.sends_first:
        release(ready, host)
        host.persist(ready.records)
        return
    if ready.records:
        host.persist(ready.records)
    release(ready, host)


async def carry_out_async(ready: Ready, host: AsyncHost) -> None:
    """Persist before send, for a host whose `persist` is awaited: nothing is released
    until the write has returned (if it raises or is cancelled, nothing is sent). A step
    whose records are all deferrable is released first and its records queued, to be
    written ahead of the next step's."""
    if ready.sends_first:
        release(ready, host)
        await host.defer(ready.records)
        return
    if ready.records:
        await host.persist(ready.records)
    release(ready, host)


def write_records(storage: dict[tuple[str | int, ...], bytes], records: Iterable[Persist]) -> None:
    """Apply records to an in-memory store in order (None deletes): a disk in a dict."""
    for record in records:
        if record.value is None:
            storage.pop(record.key, None)
        else:
            storage[record.key] = record.value


def records_of(records: Iterable[Persist]) -> list[tuple[tuple[str | int, ...], bytes | None]]:
    """(key, value) pairs, as a durable store takes them."""
    return [(record.key, record.value) for record in records]


# --- the client side --------------------------------------------------------------------


class ClientHost(Protocol):
    """A client core's network and the waiters for its answers."""

    def send(self, message: Outgoing) -> None: ...

    def decided(self, decided: Decided) -> None: ...

    def balance_read(self, read: BalanceRead) -> None: ...

    def looked_up(self, result: LookupResult) -> None: ...

    def replica_status(self, status: ReplicaStatus) -> None: ...


def carry_out_client(actions: Iterable[ClientAction], host: ClientHost) -> None:
    """Hand a client core's actions to its host, in order (a client persists nothing)."""
    for action in actions:
        if isinstance(action, Send):
            host.send(Outgoing((action.to,), action.data))
        elif isinstance(action, Decided):
            host.decided(action)
        elif isinstance(action, BalanceRead):
            host.balance_read(action)
        elif isinstance(action, LookupResult):
            host.looked_up(action)
        elif isinstance(action, ReplicaStatus):
            host.replica_status(action)
        else:
            raise TypeError(f"not a client action: {action!r}")
