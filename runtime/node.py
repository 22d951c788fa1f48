"""A replica on trio: the sans-I/O core driven by real sockets, a real clock and a real disk.

One task owns the core. It takes the next event when it is ready for one: a tick when one
is due (every `tick_ms`, however busy the peers keep it), else the next frame the
transport's inbound scheduler picks (replicas first, then clients in fair turns, see
runtime/inbound.py); it steps the core through the host loop (pbft/host.py) and carries out
the `Ready` it returns: every record is written and fsynced (one batch, in a worker thread)
before any message of that step leaves: persist before you speak.

The one exception is pbft/host.py's: a step whose records are all deferrable (a commit
certificate, a stable checkpoint; nothing it says depends on them) sends first, and its
records wait in the writer's queue for the next write, at most one tick: the next step's
PRE-PREPARE or PREPARE then carries them in its own fsync. A lone payment's reply waited
for four fsyncs in a row (the primary's PRE-PREPARE, the backups' PREPARE, everyone's
COMMIT, then the committed entry); now for three, and the replica's next step does not
wait for the fourth.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msgpack
import trio

from crypto.keys import Principal
from pbft.events import Executed, MessageReceived, Note, Persist, Tick
from pbft.host import Outgoing, carry_out_async, peers_of, records_of, step
from pbft.messages import MessageType
from pbft.replica import Replica
from pbft.signed import client_may_send, type_code_of
from pbft.trace_events import (
    certificate_events,
    execute_fields,
    new_view_fields,
    proposal_event,
    settings_fields,
)
from runtime.cluster import Cluster
from runtime.history_store import SqliteHistoryStore, ThreadedHistoryStore
from runtime.inbound import InboundScheduler
from runtime.nurseries import raise_lone
from runtime.storage import DurableStore
from runtime.trace_log import TraceLog
from runtime.transport import Transport, TransportConfig

DATA_DIR_MODE = 0o700
# Events handled in one core step, their records written with one fsync (group commit).
# Bounded so that a step's output (and the wait before its first message goes out) is too.
MAX_EVENTS_PER_STEP = 256
# Deferred batches (pbft/host.py) queued and not yet written; past this, steps wait.
MAX_DEFERRED_BATCHES = 64
# Identical notes (a peer in another view can cause `drop wrong_view` hundreds of times a
# second) are logged once, then summed: one line per kind and reason per interval.
LOG_SUMMARY_INTERVAL_S = 1.0
LOG_SUMMARY_KEYS = 1024
# Drops that happen all the time in a healthy cluster (late votes) are summed, not logged.
QUIET_DROPS = ("stale", "redundant_vote", "state_chunk_unexpected")
NOTABLE_NOTES = (
    "view_change",
    "new_view",
    "checkpoint_stable",
    "state_transfer",
    "suspect",
    "evidence",
    "halt",
    "drop",
    "state_too_large",
)


class DataDirError(RuntimeError):
    """The data directory cannot be created or is not a directory; the message names it."""


@dataclass
class _Window:
    start: float
    suppressed: int = 0  # identical notes since the logged one
    detail: str = ""  # the last of them


class LogSummarizer:
    """Log the first of a run of identical notes at once; sum the rest per interval.

    A note's identity is its kind and, for drops, its reason; for other kinds the whole
    detail. `note` and `flush` return the records to write, so the rule is testable
    without a clock or a stream.
    """

    def __init__(self, interval_s: float = LOG_SUMMARY_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.windows: dict[tuple[str, str], _Window] = {}

    @staticmethod
    def key(note: Note) -> tuple[str, str]:
        return (str(note.kind), str(note.reason) if note.kind == "drop" else note.detail)

    def note(self, note: Note, now: float) -> list[dict[str, object]]:
        """The records to log for this note: itself, or nothing if it is being summed."""
        kind, detail = str(note.kind), note.detail
        key = self.key(note)
        window = self.windows.get(key)
        if window is not None and now < window.start + self.interval_s:
            window.suppressed += 1
            window.detail = detail
            return []
        records = self._close(key) if window is not None else []
        if len(self.windows) >= LOG_SUMMARY_KEYS:
            records += self.flush(now, everything=True)
        self.windows[key] = _Window(now)
        records.append({"event": kind, "detail": detail})
        return records

    def flush(self, now: float, *, everything: bool = False) -> list[dict[str, object]]:
        """Summaries of the windows that have ended (all of them if `everything`)."""
        records: list[dict[str, object]] = []
        for key, window in list(self.windows.items()):
            if everything or now >= window.start + self.interval_s:
                records += self._close(key)
        return records

    def _close(self, key: tuple[str, str]) -> list[dict[str, object]]:
        window = self.windows.pop(key)
        if not window.suppressed:
            return []
        kind, reason = key
        record: dict[str, object] = {
            "event": kind,
            "detail": window.detail,
            "repeated": window.suppressed,
            "over_s": self.interval_s,
        }
        if kind == "drop":
            record["reason"] = reason
        return [record]


class _Writer:
    """The one task that writes the store: batches in the order they were queued, all of
    those queued meanwhile in one `apply` (one fsync). A batch someone waits for
    (`persist`) is written at once; deferred batches alone wait up to `delay_s` for one to
    share a write with (pbft/host.py: nothing sent depends on them). The price: a vote
    that comes just after the delay ran out waits for that write to finish. Measured
    against writing them at once (four replicas sharing one disk, interleaved): the same
    lone latency within the noise, and about 10.3 fsyncs a lone payment instead of 12."""

    def __init__(
        self,
        store: DurableStore,
        delay_s: float,
        before_checkpoint: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.delay_s = delay_s
        # Called (in the thread) with its seq before a write that holds a new stable
        # checkpoint: history must hold, durably, every batch recovery will not re-execute.
        self.before_checkpoint = before_checkpoint
        self.queue: list[tuple[Sequence[Persist], trio.Event | None]] = []
        self.work = trio.Event()  # something is queued
        self.urgent = trio.Event()  # a waited-for batch is queued
        self.written = trio.Event()  # set after each write (then replaced)
        self.deferred = 0  # deferred batches queued, not yet written
        # A write raised (even one that left the store usable, as a ValueError from its
        # checks does): its batch is gone, so nothing queued after it may be written.
        self.failed = False

    async def persist(self, records: Sequence[Persist]) -> None:
        done = trio.Event()
        self.queue.append((records, done))
        self.work.set()
        self.urgent.set()
        await done.wait()

    async def defer(self, records: Sequence[Persist]) -> None:
        # Bounded: a disk that falls behind makes the steps wait, as persist would.
        while self.deferred >= MAX_DEFERRED_BATCHES:
            await self.written.wait()
        self.queue.append((records, None))
        self.deferred += 1
        self.work.set()

    async def run(self) -> None:
        while True:
            await self.work.wait()
            if not self.urgent.is_set():
                with trio.move_on_after(self.delay_s):
                    await self.urgent.wait()
            # No checkpoint between here and the thread: what is taken is what is written.
            self.work, self.urgent = trio.Event(), trio.Event()
            batch, self.queue = self.queue, []
            records = [record for records, _ in batch for record in records]
            try:
                await trio.to_thread.run_sync(self._write, records)
            except BaseException:
                self.failed = True
                raise
            self.deferred -= sum(1 for _, done in batch if done is None)
            for _, done in batch:
                if done is not None:
                    done.set()
            written, self.written = self.written, trio.Event()
            written.set()

    def flush(self) -> None:
        """Write what is still queued, here and now (at a stop: the task is gone; a write in
        its thread has finished, as trio waits for the thread); nothing after a failed
        write, so the log stays a prefix of the steps."""
        if self.failed:
            return
        batch, self.queue = self.queue, []
        records = [record for records, _ in batch for record in records]
        if records:
            self._write(records)

    def _write(self, records: Sequence[Persist]) -> None:
        if self.before_checkpoint is not None:
            seqs = [
                checkpoint_seq(record.value)
                for record in records
                if record.key == ("checkpoint",) and record.value is not None
            ]
            if seqs:
                self.before_checkpoint(max(seqs))
        self.store.apply(records_of(records))


def checkpoint_seq(value: bytes) -> int:
    """The seq of this replica's own ("checkpoint",) record ([seq, chain hash, digest,
    snapshot, proof]: pbft/checkpoints.py make_stable), read without unpacking the
    snapshot behind it."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(value[:16])  # an array header and an int take at most 10 bytes
    unpacker.read_array_header()
    seq = unpacker.unpack()
    if type(seq) is not int:
        raise ValueError(f"checkpoint record starts with {seq!r}, not a seq")
    return seq


class _Host:
    """The process as a replica's host (pbft.host.AsyncHost): the durable store (through
    its writer), the transport, the log."""

    def __init__(self, node: ReplicaNode, writer: _Writer, transport: Transport) -> None:
        self.node = node
        self.writer = writer
        self.transport = transport

    async def persist(self, records: Sequence[Persist]) -> None:
        self.node.trace_certificates(records)
        await self.writer.persist(records)
        # The thread ignores cancellation: if we are stopping, the transport may be gone
        # already, so stop here rather than send into it.
        await trio.lowlevel.checkpoint_if_cancelled()

    async def defer(self, records: Sequence[Persist]) -> None:
        self.node.trace_certificates(records)
        await self.writer.defer(records)

    def send(self, message: Outgoing) -> None:
        trace = self.node.trace
        if trace is not None and type_code_of(message.data) == MessageType.PRE_PREPARE:
            event = proposal_event(message.data)
            if event is not None:
                trace.write("propose", *event)
        for destination in message.to:
            self.transport.send(destination, message.data)

    def executed(self, executed: Executed) -> None:
        self.node.batches_executed += 1
        if self.node.trace is not None:
            self.node.trace.write(
                "execute",
                f"{executed.seq} {executed.entry_digest.hex()[:16]} {len(executed.requests)}",
                execute_fields(executed),
            )

    def note(self, note: Note) -> None:
        if note.kind == "checkpoint_stable":
            self.node.checkpoints_stable += 1  # for metrics (runtime/metrics.py)
        self.node._note(note)


class ReplicaHalted(RuntimeError):
    """The core stopped itself (for example, its state diverged from 2f + 1 replicas)."""


@dataclass(frozen=True)
class NodeStatus:
    replica_id: int
    view: int
    last_executed: int
    stable_checkpoint: int
    ledger_digest: str


class ReplicaNode:
    def __init__(
        self,
        cluster: Cluster,
        replica_id: int,
        data_dir: Path,
        *,
        tick_ms: int = 5,
        log: TextIO | None = None,
        transport_config: TransportConfig | None = None,
        history_retention_seqs: int | None = None,
    ) -> None:
        self.cluster = cluster
        # What lookups read (runtime/history_store.py), kept in the data directory.
        # None: the cluster file's ([history] retention_seqs).
        self.history_retention_seqs = history_retention_seqs
        self.history: ThreadedHistoryStore | None = None
        self.replica_id = replica_id
        self.data_dir = Path(data_dir)
        self.tick_ms = tick_ms
        self.log_stream = log if log is not None else sys.stderr
        self._transport_config = transport_config
        self.core: Replica | None = None
        self.store: DurableStore | None = None
        self.transport: Transport | None = None
        self.events_handled = 0
        self.steps = 0  # core steps: events_handled / steps is the group-commit batch size
        self.batches_executed = 0
        self.quiet_drops = 0
        self.log_summary = LogSummarizer()
        self.client_frames_refused = 0
        self.ticks = 0
        # DATA/trace-<id>.jsonl (runtime/trace_log.py), for `pbft explain`; open while running.
        self.trace: TraceLog | None = None
        self.checkpoints_stable = 0
        self.writer: _Writer | None = None  # while running; its queue depth is a metric
        self._clock_started: float | None = None
        self._next_tick = 0.0

    @property
    def transport_config(self) -> TransportConfig:
        """The limits given, else the cluster file's ([transport])."""
        if self._transport_config is not None:
            return self._transport_config
        return self.cluster.transport_config()

    @property
    def history_retention(self) -> int:
        """The seqs of history kept: the one given, else the cluster file's ([history])."""
        if self.history_retention_seqs is not None:
            return self.history_retention_seqs
        return self.cluster.history_retention_seqs

    def log(self, event: str, **fields: object) -> None:
        record = {"time": round(time.time(), 6), "replica": self.replica_id, "event": event}
        record.update(fields)
        self.log_stream.write(json.dumps(record) + "\n")
        self.log_stream.flush()

    def status(self) -> NodeStatus | None:
        core = self.core
        if core is None:
            return None
        return NodeStatus(
            self.replica_id,
            core.view,
            core.last_executed,
            core.stable.seq,
            core.ledger.digest().hex(),
        )

    def statistics(self) -> dict[str, int]:
        """Counters since start, for `pbft bench` (logged as a `statistics` line on SIGUSR1
        and at stop): what the core handled, what the store fsynced, what the transport
        carried (data frames, both directions)."""
        figures = {
            "events_handled": self.events_handled,
            "batches_executed": self.batches_executed,
            "ticks": self.ticks,
        }
        if self.store is not None:
            stored = self.store.statistics()
            figures.update(fsyncs=stored.fsyncs, records_written=stored.records_written)
        if self.history is not None:
            # history_batches / history_transactions: batches per SQLite transaction;
            # history_syncs: those made durable (one per checkpoint, about).
            figures.update(
                history_batches=self.history.batches_written,
                history_transactions=self.history.transactions,
                history_syncs=self.history.syncs,
            )
        if self.transport is not None:
            carried = self.transport.statistics()
            figures.update(
                frames_in=carried.frames_in,
                frames_out=carried.frames_out,
                bytes_in=carried.bytes_in,
                bytes_out=carried.bytes_out,
                writes_out=carried.writes_out,  # frames_out / writes_out: coalescing
            )
        return figures

    def record_history(self, executed: Sequence[Executed]) -> None:
        """Queue a step's executed batches for the history thread
        (runtime/history_store.py's ThreadedHistoryStore). History never lags the stable
        checkpoint a restart resumes from: the writer has it synced through the checkpoint
        before writing one."""
        if self.history is not None and executed:
            self.history.record_all(executed)

    async def _history_room(self) -> None:
        """Past the bound, stop stepping until the history thread catches up."""
        history = self.history
        if history is not None and history.pending() >= history.max_pending:
            await trio.to_thread.run_sync(history.wait_for_room)

    def log_statistics(self) -> None:
        self.log("statistics", **self.statistics())

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. `task_status.started` reports the port it listens on."""
        # The key first: a wrong or exposed key must not leave a data directory behind.
        key = self.cluster.load_private_key("replica", self.replica_id)
        keyring = self.cluster.keyring()
        self._prepare_data_dir()
        store = DurableStore.open(self.data_dir / f"replica-{self.replica_id}.log")
        self.store = store
        try:
            self._open_trace()
            self.history = ThreadedHistoryStore(
                SqliteHistoryStore(
                    self.data_dir / f"history-{self.replica_id}.sqlite",
                    self.history_retention,
                ),
                checkpoint_interval=self.cluster.config.checkpoint_interval,
            )
            records = store.records()
            repaired = store.recovery_report.repaired
            core = Replica(
                self.replica_id,
                self.cluster.config,
                key,
                keyring,
                self.cluster.accounts,
                records=records or None,
                lost_votes=repaired,
                history=self.history,
            )
            self.core = core
            # Recovery re-executed from the checkpoint: those rows again (idempotent).
            self.record_history(core.recovered_executions)
            self.log(
                "start",
                recovered_records=len(records),
                last_executed=core.last_executed,
                view=core.view,
                torn_tail=store.recovery_report.torn_tail is not None,
                # Its last batch may have been sent: no votes in this view (pbft/replica.py).
                silent_through_view=core.silent_through_view,
            )
            principal = ("replica", self.replica_id)
            async with Transport(principal, key, keyring, self.transport_config) as transport:
                self.transport = transport
                address = self.cluster.replica(self.replica_id)
                port = await transport.listen(address.host, address.port)
                for peer in self.cluster.replicas:
                    if peer.replica_id != self.replica_id:
                        transport.connect_to(("replica", peer.replica_id), peer.host, peer.port)
                self.log("listening", host=address.host, port=port)
                task_status.started(port)
                await self._drive(core, store, transport)
        finally:
            self.log_statistics()
            store.close()
            if self.history is not None:
                self.history.close()
            self._log_records(self.log_summary.flush(time.monotonic(), everything=True))
            if self.trace is not None:
                self.trace.close()
            self.log("stopped")

    def _prepare_data_dir(self) -> None:
        """Create the data directory owner-only (0700): the log holds balances and votes.

        An existing one open to group or others is restricted, with a warning, rather than
        refused: the data is this replica's own, and refusing would turn an upgrade from a
        release that made it 0755 into an outage. The log itself gets the same treatment
        in runtime/storage.py.
        """
        try:
            self.data_dir.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
            mode = stat.S_IMODE(self.data_dir.stat().st_mode)
            if not self.data_dir.is_dir():
                raise DataDirError(f"data directory {self.data_dir} is not a directory")
            if mode & 0o077:
                self.data_dir.chmod(mode & 0o700)
                self.log("data_dir_restricted", path=str(self.data_dir), was=f"{mode:#o}")
        except OSError as error:
            raise DataDirError(
                f"cannot prepare data directory {self.data_dir}: {error.strerror or error}"
            ) from None

    async def _drive(self, core: Replica, store: DurableStore, transport: Transport) -> None:
        history = self.history
        writer = _Writer(
            store, self.tick_ms / 1000, history.sync_through if history is not None else None
        )
        self.writer = writer
        host = _Host(self, writer, transport)
        peers = peers_of(self.replica_id, (peer.replica_id for peer in self.cluster.replicas))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                while events := await self._next_events(transport.inbound):
                    # Group commit: every event ready now goes into one step, so their
                    # records share one write and one fsync, and then their messages go out.
                    ready = step(core, events, peers)
                    self.events_handled += ready.events
                    self.steps += 1
                    self.record_history(ready.executed)
                    await carry_out_async(ready, host)
                    await self._history_room()
                    if core.halted is not None:
                        self.log("halted", reason=core.halted)
                        raise ReplicaHalted(core.halted)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what ends it (a halt, a failed write, from either task):
            # raised unwrapped, as it was before the writer had a task.
            raise_lone(group)
        finally:
            if not store.failed:
                # A stop keeps what a crash could lose (deferred records): less to catch up.
                writer.flush()

    async def _next_events(self, inbound: InboundScheduler) -> list[Tick | MessageReceived]:
        """The next event (waiting for it), then every further one ready without waiting,
        up to MAX_EVENTS_PER_STEP, in the order _next_event would give them: a due tick
        ends the list. Empty once the transport has stopped."""
        first = await self._next_event(inbound)
        if first is None:
            return []
        events: list[Tick | MessageReceived] = [first]
        while len(events) < MAX_EVENTS_PER_STEP and not isinstance(events[-1], Tick):
            if trio.current_time() >= self._next_tick:
                events.append(self._tick(trio.current_time()))
                break
            try:
                principal, data = inbound.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            event = self._admit(principal, data)
            if event is not None:
                events.append(event)
        return events

    async def _next_event(self, inbound: InboundScheduler) -> Tick | MessageReceived | None:
        """The next event for the core, chosen now (not when it arrived): a tick if one is
        due, else the scheduler's next frame, waiting for whichever comes first. None once
        the transport has stopped. Ticks come every `tick_ms` whatever the load, so
        heartbeats, batching and timers run on time under a flood."""
        if self._clock_started is None:
            self._clock_started = trio.current_time()
            self._next_tick = self._clock_started + self.tick_ms / 1000
        while True:
            now = trio.current_time()
            if now >= self._next_tick:
                return self._tick(now)
            item: tuple[Principal, bytes] | None = None
            with trio.move_on_at(self._next_tick):
                try:
                    item = await inbound.receive()
                except trio.EndOfChannel:
                    return None
            if item is None:
                continue  # a tick is due
            event = self._admit(*item)
            if event is not None:
                return event

    def _tick(self, now: float) -> Tick:
        self._next_tick = now + self.tick_ms / 1000
        self.ticks += 1
        if self.log_summary.windows:
            self._log_records(self.log_summary.flush(time.monotonic()))
        if self.trace is not None:
            self.trace.maybe_flush()
        # Timers run on this process's monotonic clock; batch timestamps on Unix time, the
        # one clock replicas on different machines (and restarted ones) share.
        return Tick(int((now - self._clock_started) * 1000), time.time_ns() // 1_000_000)

    def _admit(self, principal: Principal, data: bytes) -> MessageReceived | None:
        if principal[0] == "client" and not client_may_send(data):
            self.client_frames_refused += 1  # unparsed: see client_may_send
            return None
        return MessageReceived(data, principal)

    def _open_trace(self) -> None:
        path = self.data_dir / f"trace-{self.replica_id}.jsonl"
        try:
            self.trace = TraceLog(path, f"r{self.replica_id}")
        except OSError as error:
            # The trace explains; the replica runs without it rather than not at all.
            self.log("trace_unavailable", path=str(path), error=str(error.strerror or error))
            return
        self.trace.write(
            "settings", f"replica {self.replica_id}", settings_fields(self.cluster.config)
        )

    def trace_certificates(self, records: Sequence[Persist]) -> None:
        if self.trace is not None:
            for kind, detail, fields in certificate_events(records):
                self.trace.write(kind, detail, fields)

    def _trace_note(self, note: Note) -> None:
        """Every note but the drops a healthy cluster makes all the time (counted only)."""
        trace = self.trace
        if trace is None or (note.kind == "drop" and note.reason in QUIET_DROPS):
            return
        fields: dict[str, object] = {}
        core = self.core
        if core is not None:
            fields["view_now"] = core.view
            fields["primary_now"] = self.cluster.config.primary_of(core.view)
            if note.kind == "new_view" and core.new_view_message is not None:
                fields.update(new_view_fields(core.new_view_message))
        if note.reason:
            fields["reason"] = note.reason
        trace.write(str(note.kind), note.detail, fields)

    def _note(self, note: Note) -> None:
        self._trace_note(note)
        if note.kind not in NOTABLE_NOTES:
            return
        if note.kind == "drop" and note.reason in QUIET_DROPS:
            self.quiet_drops += 1
            return
        records = self.log_summary.note(note, time.monotonic())
        for record in records:
            if record["event"] == "checkpoint_stable" and self.core is not None:
                if "repeated" not in record:
                    record["ledger_digest"] = self.core.stable.ledger_digest.hex()
                    record["seq"] = self.core.stable.seq
        self._log_records(records)

    def _log_records(self, records: list[dict[str, object]]) -> None:
        for record in records:
            fields = dict(record)
            self.log(str(fields.pop("event")), **fields)
