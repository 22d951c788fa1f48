"""Which peer's frame the core handles next: one bounded queue per peer, and a fair scheduler.

The transport's reader tasks `put` each authenticated frame into the queue of the principal
it came from; the one task that owns the protocol core takes the next frame with `receive`
when it is ready for it, so the choice is made as late as possible. The order:

1. Replicas before clients. Correct replicas send a bounded amount (votes and heartbeats in
   proportion to the work clients bring), and the cluster's liveness depends on their
   frames being handled promptly; a flood from clients must not sit in front of them.
   Not absolutely: after `replica_burst` replica frames in a row while a client frame
   waits, one client frame is served, so a Byzantine replica flooding us slows clients
   down but cannot shut them out.
2. Within each class, deficit round robin (Shreedhar and Varghese, 1995) over the peers
   with a frame queued. A frame costs `frame_cost + len(frame)`: the core spends a fixed
   amount on every frame whatever its size (an Ed25519 check and a msgpack decode, about
   what hashing 100-200 KiB costs on this code's machines), and on top of it time in
   proportion to the bytes (hashing, decoding, copying). Counting frames alone would let a
   replica's 16 MiB frames take as many turns as small votes; counting bytes alone would
   let a client's small signed requests (a signature check each) take hundreds of turns
   for one big frame's bytes. With the default cost a client frame (at most 64 KiB) costs
   between 1x and 2x another's. The quantum is the cost of a 1 KiB frame, so a visit
   serves one vote or one request (a few hundred bytes): round robin by frames in the
   common case, while a bigger frame waits a visit per quantum of its cost. A client that
   floods gets its share of the core, the same as one that sends one request, and no more.

3. A client's frames are also paced: at most `client_rate` small frames a second (a frame
   counts its cost in quanta, so a 64 KiB frame counts two), after a burst of
   `client_burst`. Deficit round robin alone is work-conserving: a flood gets every cycle
   nobody else wants, and a replica sharing its machine (or a payment network's operator
   paying for CPU) pays for all of them. Correct clients send far less (at most
   client_pending_limit requests outstanding, one frame each; the benchmark's clients send
   about 130 a second each), so pacing never touches them. A paced reader simply waits
   before it queues, so TCP pushes back on the flood, as for a full queue.

Every queue is bounded in frames and bytes. When a peer's queue is full its reader waits
(`put` blocks), so it stops reading that connection and TCP pushes back on the sender:
nothing a correct peer sent is dropped because another peer floods (every wait is
counted, `backpressure` in `statistics()`). A queue with nothing in it always takes one
frame, whatever its size (the transport's frame limit bounds it). Queues exist only while
they hold frames: a peer that went away leaves nothing behind. Memory is bounded by the
number of principals in the key ring (a principal has at most two connections, and both
put into its one queue) times the per-peer bounds.

Nothing here touches a socket; the unit tests drive it with plain trio tasks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import trio

from crypto.keys import Principal
from runtime.buckets import TokenBuckets

__all__ = [
    "DEFAULT_FRAME_COST",
    "DEFAULT_REPLICA_BURST",
    "InboundScheduler",
    "InboundStatistics",
]

# What a frame costs the core before its bytes are counted, in bytes (see the docstring).
DEFAULT_FRAME_COST: Final = 64 * 1024
# A visit's credit, beyond the fixed cost: a frame up to this size is served in one visit.
QUANTUM_FRAME_BYTES: Final = 1024
DEFAULT_REPLICA_BURST: Final = 32
DEFAULT_CLIENT_RATE: Final = 400.0  # small frames a second, per client
DEFAULT_CLIENT_BURST: Final = 400

REPLICA: Final = "replica"
CLIENT: Final = "client"


@dataclass(frozen=True)
class InboundStatistics:
    """A snapshot. `served`, `backpressure` and `queued` are by class (replica, client)."""

    queued: int  # frames waiting now, all peers
    queued_bytes: int  # their payload bytes
    peers_waiting: int  # peers with a frame queued now
    readers_blocked: int  # readers waiting for room in their peer's queue now
    served: Mapping[str, int] = field(default_factory=dict)  # frames handed to the owner
    backpressure: Mapping[str, int] = field(default_factory=dict)  # times a reader waited
    paced: int = 0  # times a client's reader waited for its pace (see client_rate)
    picks: int = 0  # frames handed to the owner in all


class _PeerQueue:
    """One principal's frames, oldest first, and its deficit counter."""

    __slots__ = ("bytes", "deficit", "frames", "principal", "space")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.frames: deque[bytes] = deque()
        self.bytes = 0
        self.deficit = 0
        self.space: trio.Event | None = None  # set when room frees up, if a reader waits


class _Round:
    """Deficit round robin among the peers of one class that have frames queued."""

    __slots__ = ("active", "frame_cost", "quantum")

    def __init__(self, frame_cost: int, quantum: int) -> None:
        self.frame_cost = frame_cost
        self.quantum = quantum
        self.active: deque[_PeerQueue] = deque()  # the next one to visit first

    def next_queue(self) -> _PeerQueue:
        """The queue whose oldest frame is served next (there must be one). Each visit to a
        queue that cannot afford its head frame adds one quantum to its deficit and moves on,
        so this ends (deficits only grow until spent) and, amortised, visits a queue about
        once per quantum of cost served."""
        active = self.active
        while True:
            queue = active[0]
            if queue.deficit >= self.frame_cost + len(queue.frames[0]):
                return queue
            queue.deficit += self.quantum
            if queue.deficit >= self.frame_cost + len(queue.frames[0]):
                return queue
            active.rotate(-1)

    def served(self, queue: _PeerQueue, size: int) -> None:
        """`queue`'s head frame (`size` bytes) was taken: charge it; the next visit goes on."""
        queue.deficit -= self.frame_cost + size
        if not queue.frames:
            # An idle peer keeps no credit (DRR): it cannot save up turns while quiet.
            queue.deficit = 0
            self.active.popleft()
        elif queue.deficit < self.frame_cost + len(queue.frames[0]):
            self.active.rotate(-1)  # its turn is over


class InboundScheduler:
    """Bounded per-peer queues of inbound frames, served replica-first and fairly.

    `put(principal, frame)` (the reader of that peer's connection) waits while the peer's
    queue is full; `receive()` (the core's owner) returns the next `(principal, frame)` by
    the policy above and waits while nothing is queued. Iterate with `async for`; it ends
    once `close()` was called and the queues are empty. One owner: `receive` is not meant
    to be called from two tasks at once.
    """

    def __init__(
        self,
        *,
        max_frames: int,
        replica_bytes: int,
        client_bytes: int,
        frame_cost: int = DEFAULT_FRAME_COST,
        replica_burst: int = DEFAULT_REPLICA_BURST,
        client_rate: float = DEFAULT_CLIENT_RATE,
        client_burst: int = DEFAULT_CLIENT_BURST,
    ) -> None:
        for name, value in (
            ("max_frames", max_frames),
            ("replica_bytes", replica_bytes),
            ("client_bytes", client_bytes),
            ("replica_burst", replica_burst),
            ("client_burst", client_burst),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(frame_cost, bool) or not isinstance(frame_cost, int) or frame_cost < 0:
            raise ValueError(f"frame_cost must be an int >= 0, got {frame_cost!r}")
        if (
            isinstance(client_rate, bool)
            or not isinstance(client_rate, int | float)
            or not 0 < client_rate < float("inf")
        ):
            raise ValueError(f"client_rate must be a positive number, got {client_rate!r}")
        self.max_frames = max_frames
        self.max_bytes = {REPLICA: replica_bytes, CLIENT: client_bytes}
        self.replica_burst = replica_burst
        quantum = frame_cost + QUANTUM_FRAME_BYTES
        self._frame_cost = frame_cost
        self._quantum = quantum
        # Token buckets by client, in quanta (runtime/buckets.py): memory follows the
        # active clients.
        self._pace: TokenBuckets[Principal] = TokenBuckets(float(client_rate), client_burst)
        self._paced = 0
        self._rounds = {REPLICA: _Round(frame_cost, quantum), CLIENT: _Round(frame_cost, quantum)}
        self._queues: dict[Principal, _PeerQueue] = {}
        self._replica_streak = 0  # replica frames served in a row while a client waited
        self._ready = trio.Event()  # set when a frame is put (or on close): wakes the owner
        self._closed = False
        self._queued = 0
        self._queued_bytes = 0
        self._blocked = 0
        self._served: Counter[str] = Counter()
        self._backpressure: Counter[str] = Counter()
        self.picks = 0

    @staticmethod
    def _class_of(principal: Principal) -> str:
        return REPLICA if principal[0] == REPLICA else CLIENT

    # --- the readers' side --------------------------------------------------------------------

    def has_room(self, principal: Principal, size: int) -> bool:
        """Whether a frame of `size` bytes from `principal` would be queued without waiting."""
        queue = self._queues.get(principal)
        if queue is None or not queue.frames:
            return True  # an empty queue takes one frame of any size
        return (
            len(queue.frames) < self.max_frames
            and queue.bytes + size <= self.max_bytes[self._class_of(principal)]
        )

    async def put(self, principal: Principal, frame: bytes) -> None:
        """Queue `frame` from `principal`, waiting while its queue is full (and, for a
        client, until its pace allows it).

        Raises trio.ClosedResourceError once the scheduler is closed (also while waiting).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the inbound scheduler is closed")
        if principal[0] != REPLICA:
            units = (self._frame_cost + len(frame)) / self._quantum
            delay = self._pace.reserve(principal, units, trio.current_time())
            if delay > 0:
                self._paced += 1
                await trio.sleep(delay)
                if self._closed:
                    raise trio.ClosedResourceError("the inbound scheduler is closed")
        if self.has_room(principal, len(frame)):
            self._enqueue(principal, frame)
            # Queued: a cancellation now must not make the caller think it was not.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self._backpressure[self._class_of(principal)] += 1
        self._blocked += 1
        try:
            while not self.has_room(principal, len(frame)):
                queue = self._queues[principal]  # full, so it exists
                if queue.space is None:
                    queue.space = trio.Event()
                await queue.space.wait()
                if self._closed:
                    raise trio.ClosedResourceError("the inbound scheduler is closed")
        finally:
            self._blocked -= 1
        self._enqueue(principal, frame)

    def _enqueue(self, principal: Principal, frame: bytes) -> None:
        queue = self._queues.get(principal)
        if queue is None:
            queue = self._queues[principal] = _PeerQueue(principal)
        if not queue.frames:
            self._rounds[self._class_of(principal)].active.append(queue)
        queue.frames.append(frame)
        queue.bytes += len(frame)
        self._queued += 1
        self._queued_bytes += len(frame)
        self._ready.set()

    # --- the owner's side ---------------------------------------------------------------------

    def receive_nowait(self) -> tuple[Principal, bytes]:
        """The next frame by the policy. trio.WouldBlock if none is queued;
        trio.EndOfChannel if none is and the scheduler is closed."""
        replicas = self._rounds[REPLICA]
        clients = self._rounds[CLIENT]
        if replicas.active and not (clients.active and self._replica_streak >= self.replica_burst):
            kind = REPLICA
            self._replica_streak = self._replica_streak + 1 if clients.active else 0
        elif clients.active:
            kind = CLIENT
            self._replica_streak = 0
        elif self._closed:
            raise trio.EndOfChannel
        else:
            raise trio.WouldBlock
        scheduled = self._rounds[kind]
        queue = scheduled.next_queue()
        frame = queue.frames.popleft()
        size = len(frame)
        queue.bytes -= size
        scheduled.served(queue, size)
        self._queued -= 1
        self._queued_bytes -= size
        self._served[kind] += 1
        self.picks += 1
        if not queue.frames:
            del self._queues[queue.principal]
        if queue.space is not None:
            queue.space.set()  # the reader, if it waits, retries (the queue may be gone)
            queue.space = None
        return queue.principal, frame

    async def receive(self) -> tuple[Principal, bytes]:
        """The next frame by the policy, waiting for one; trio.EndOfChannel once closed
        and empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                item = self.receive_nowait()
            except trio.WouldBlock:
                self._ready = trio.Event()
                await self._ready.wait()
                continue
            # Taken: a cancellation now must not lose it (as trio's channels do).
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def __aiter__(self) -> InboundScheduler:
        return self

    async def __anext__(self) -> tuple[Principal, bytes]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """No more frames: readers waiting for room fail, the owner gets what is queued and
        then trio.EndOfChannel."""
        self._closed = True
        self._ready.set()
        for queue in self._queues.values():
            if queue.space is not None:
                queue.space.set()
                queue.space = None

    @property
    def closed(self) -> bool:
        return self._closed

    # --- observation --------------------------------------------------------------------------

    def queued(self, principal: Principal) -> int:
        """Frames from `principal` waiting now."""
        queue = self._queues.get(principal)
        return 0 if queue is None else len(queue.frames)

    def statistics(self) -> InboundStatistics:
        return InboundStatistics(
            queued=self._queued,
            queued_bytes=self._queued_bytes,
            peers_waiting=len(self._queues),
            readers_blocked=self._blocked,
            served=dict(sorted(self._served.items())),
            backpressure=dict(sorted(self._backpressure.items())),
            paced=self._paced,
            picks=self.picks,
        )
