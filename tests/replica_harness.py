"""A test harness for driving one `Replica` with hand-made signed messages.

`Cluster` holds a small cluster's configuration (n = 4, f = 1), every private key
(replicas and clients), the key ring and the genesis accounts, and builds correctly
signed and chained protocol messages as any of its members. `Chain` hands out
pre-prepares chained from the genesis hash. The module-level extractors pick the
interesting actions out of what `Replica.handle` returns, and `Network` wires four
real replicas and some client cores together in memory for end-to-end tests.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.client import (
    BalanceRead,
    ClientAction,
    ClientCore,
    Decided,
    LookupResult,
    ReplicaStatus,
)
from pbft.config import ClusterConfig
from pbft.events import (
    Action,
    Broadcast,
    Event,
    Executed,
    MessageReceived,
    Note,
    Persist,
    Send,
    Tick,
)
from pbft.genesis import compute_cluster_id
from pbft.history import HistoryReader, MemoryHistoryStore
from pbft.host import Outgoing, carry_out, carry_out_client, peers_of, step, write_records
from pbft.ledger import Account, Ledger, LedgerSnapshotError, Payment
from pbft.messages import (
    Checkpoint,
    CheckpointState,
    Commit,
    CommitCertificate,
    Fetch,
    Heartbeat,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Request,
    Suspect,
    ViewChange,
)
from pbft.replica import Replica
from pbft.signed import open_envelope, peek, seal

SEED = 424242
CLIENT_COUNT = 3
# Clients 0 and 1 own accounts; client 2 owns none.
GENESIS_ACCOUNTS: dict[str, Account] = {
    "alice": Account(owner=0, balance=1000),
    "bob": Account(owner=0, balance=500),
    "carol": Account(owner=1, balance=1000),
    "dave": Account(owner=1, balance=0),
}
DEFAULT_SETTINGS: dict[str, int] = {
    "replica_count": 4,
    "batch_size": 2,
    "batch_timeout_ms": 0,
    "checkpoint_interval": 4,
    "watermark_window": 8,
    "view_change_timeout_ms": 300,
    "heartbeat_interval_ms": 50,
    "retransmit_interval_ms": 60,
    "client_timeout_ms": 400,
}


@dataclass(frozen=True)
class Entry:
    """A signed PRE-PREPARE together with the digests a test wants to check against."""

    view: int
    seq: int
    primary: int
    prev_hash: bytes
    batch_digest: bytes
    digest: bytes  # the entry digest prepares and commits vote on
    requests: tuple[bytes, ...]
    raw: bytes
    timestamp_ms: int = 0


class Cluster:
    """Configuration, keys and signed-message builders for a 4-replica test cluster."""

    def __init__(
        self,
        *,
        accounts: Mapping[str, Account] | None = None,
        clients: int = CLIENT_COUNT,
        **overrides: int,
    ) -> None:
        settings = {**DEFAULT_SETTINGS, **overrides}
        self.config = ClusterConfig(**settings)
        self.n = self.config.replica_count
        self.f = self.config.fault_tolerance
        self.quorum = self.config.quorum
        self.replica_keys = [SigningKey.derive(SEED, f"replica/{i}") for i in range(self.n)]
        # Restoring a snapshot refuses more clients than the cluster has keys.
        self.client_keys = [SigningKey.derive(SEED, f"client/{j}") for j in range(clients)]
        self.keyring = KeyRing()
        for i, key in enumerate(self.replica_keys):
            self.keyring.add(("replica", i), key.verify_key)
        for j, key in enumerate(self.client_keys):
            self.keyring.add(("client", j), key.verify_key)
        self.accounts: Mapping[str, Account] = (
            dict(GENESIS_ACCOUNTS) if accounts is None else accounts
        )
        self.cluster_id = compute_cluster_id(self.config, self.keyring, self.accounts)
        genesis = self.genesis_ledger()
        self.genesis_snapshot = genesis.snapshot()
        self.genesis_ledger_digest = genesis.digest()
        self.genesis_chain_hash = genesis_hash(self.genesis_ledger_digest)
        self.cache = VerificationCache()

    # --- principals -------------------------------------------------------------------

    def replica(
        self,
        replica_id: int,
        records: dict[tuple[str | int, ...], bytes] | None = None,
        history: HistoryReader | None = None,
    ) -> Replica:
        return Replica(
            replica_id,
            self.config,
            self.replica_keys[replica_id],
            self.keyring,
            self.accounts,
            records=records,
            history=history,
        )

    def client(self, client_id: int) -> ClientCore:
        return ClientCore(
            client_id,
            self.config,
            self.client_keys[client_id],
            self.keyring,
            cluster_id=self.cluster_id,
        )

    def primary(self, view: int) -> int:
        return self.config.primary_of(view)

    def backups(self, view: int, *, excluding: Iterable[int] = ()) -> list[int]:
        skip = {self.primary(view), *excluding}
        return [i for i in range(self.n) if i not in skip]

    def genesis_ledger(self) -> Ledger:
        return Ledger(self.accounts, self.config.dedup_window, self.config.ledger_limits())

    def chain(self) -> Chain:
        return Chain(self)

    # --- client requests --------------------------------------------------------------

    def request(
        self,
        request_id: int,
        amount: int = 10,
        *,
        client: int = 0,
        payer: str | None = None,
        payee: str | None = None,
        key: SigningKey | None = None,
    ) -> bytes:
        """A signed payment; by default client 0 pays from alice to carol (client 1: carol to
        alice). `key` signs with another key (a forgery)."""
        if payer is None:
            payer = "alice" if client != 1 else "carol"
        if payee is None:
            payee = "carol" if client != 1 else "alice"
        message = Request(client, request_id, "transfer", payer, payee, amount)
        return seal(message, key if key is not None else self.client_keys[client])

    # --- normal case ------------------------------------------------------------------

    def pre_prepare(
        self,
        seq: int,
        requests: Sequence[bytes] = (),
        *,
        view: int = 0,
        prev_hash: bytes | None = None,
        replica: int | None = None,
        batch: bytes | None = None,
        timestamp_ms: int = 0,
    ) -> Entry:
        """A signed PRE-PREPARE; by default from the view's primary, chained to genesis."""
        requests = tuple(requests)
        prev = prev_hash if prev_hash is not None else self.genesis_chain_hash
        sender = replica if replica is not None else self.primary(view)
        digest_of_batch = batch if batch is not None else batch_digest(requests)
        message = PrePrepare(view, seq, sender, prev, digest_of_batch, requests, timestamp_ms)
        raw = seal(message, self.replica_keys[sender])
        return Entry(
            view,
            seq,
            sender,
            prev,
            digest_of_batch,
            entry_digest(seq, prev, digest_of_batch, timestamp_ms),
            requests,
            raw,
            timestamp_ms,
        )

    def prepare(self, replica: int, entry: Entry, *, view: int | None = None) -> bytes:
        return self.prepare_vote(
            entry.view if view is None else view, entry.seq, replica, entry.digest
        )

    def prepare_vote(
        self, view: int, seq: int, replica: int, digest: bytes, *, key: SigningKey | None = None
    ) -> bytes:
        signer = key if key is not None else self.replica_keys[replica]
        return seal(Prepare(view, seq, replica, digest), signer)

    def commit(self, replica: int, entry: Entry, *, view: int | None = None) -> bytes:
        return self.commit_vote(
            entry.view if view is None else view, entry.seq, replica, entry.digest
        )

    def commit_vote(self, view: int, seq: int, replica: int, digest: bytes) -> bytes:
        return seal(Commit(view, seq, replica, digest), self.replica_keys[replica])

    def prepares(self, entry: Entry, replicas: Iterable[int]) -> list[bytes]:
        return [self.prepare(replica, entry) for replica in replicas]

    def commits(self, entry: Entry, replicas: Iterable[int]) -> list[bytes]:
        return [self.commit(replica, entry) for replica in replicas]

    def prepared_certificate(
        self, entry: Entry, replicas: Sequence[int] | None = None
    ) -> PreparedCertificate:
        """The pre-prepare plus quorum - 1 prepares (by default from the first backups)."""
        voters = (
            replicas
            if replicas is not None
            else self.backups(entry.view)[: self.config.prepare_quorum]
        )
        return PreparedCertificate(entry.raw, tuple(self.prepares(entry, voters)))

    def commit_certificate(
        self, entry: Entry, replicas: Sequence[int] | None = None, *, sender: int = 0
    ) -> bytes:
        voters = replicas if replicas is not None else list(range(self.quorum))
        message = CommitCertificate(sender, entry.raw, tuple(self.commits(entry, voters)))
        return seal(message, self.replica_keys[sender])

    def heartbeat(
        self,
        view: int = 0,
        *,
        replica: int | None = None,
        last_proposed: int = 0,
        last_executed: int = 0,
    ) -> bytes:
        sender = replica if replica is not None else self.primary(view)
        return seal(
            Heartbeat(view, sender, last_proposed, last_executed), self.replica_keys[sender]
        )

    # --- checkpoints and catch-up -----------------------------------------------------

    def checkpoint(self, seq: int, replica: int, chain_hash: bytes, ledger_digest: bytes) -> bytes:
        return seal(Checkpoint(seq, replica, chain_hash, ledger_digest), self.replica_keys[replica])

    def checkpoint_proof(
        self, seq: int, chain_hash: bytes, ledger_digest: bytes, replicas: Iterable[int]
    ) -> tuple[bytes, ...]:
        return tuple(self.checkpoint(seq, i, chain_hash, ledger_digest) for i in replicas)

    def checkpoint_state(
        self,
        seq: int,
        chain_hash: bytes,
        snapshot: bytes,
        proof: Sequence[bytes],
        *,
        sender: int = 0,
        ledger_digest: bytes | None = None,
    ) -> bytes:
        """By default the message claims the digest of the snapshot it carries."""
        if ledger_digest is None:
            try:
                ledger_digest = Ledger.restore(snapshot).digest()
            except LedgerSnapshotError:
                ledger_digest = hashlib.sha256(snapshot).digest()
        message = CheckpointState(sender, seq, chain_hash, ledger_digest, snapshot, tuple(proof))
        return seal(message, self.replica_keys[sender])

    def fetch(self, replica: int, from_seq: int, stable_seq: int = 0, view: int = 0) -> bytes:
        return seal(Fetch(replica, from_seq, stable_seq, view), self.replica_keys[replica])

    def model_ledger(self, entries: Iterable[Entry]) -> Ledger:
        """The ledger a correct replica has after executing `entries` in order."""
        ledger = self.genesis_ledger()
        for entry in entries:
            for raw in entry.requests:
                opened = open_envelope(raw, self.keyring, self.cache, Request)
                request = opened.message
                assert isinstance(request, Request)
                payment = Payment(
                    request.client_id,
                    request.request_id,
                    request.payer,
                    request.payee,
                    request.amount,
                )
                ledger.execute(payment, opened.body_digest, entry.seq)
        return ledger

    # --- failure detection and view change --------------------------------------------

    def suspect(self, view: int, replica: int) -> bytes:
        return seal(Suspect(view, replica), self.replica_keys[replica])

    def view_change(
        self,
        new_view: int,
        replica: int,
        prepared: Sequence[PreparedCertificate] = (),
        *,
        checkpoint: tuple[int, bytes, bytes, tuple[bytes, ...]] | None = None,
    ) -> bytes:
        """A signed VIEW-CHANGE; `checkpoint` is (seq, chain hash, ledger digest, proof),
        the genesis state by default."""
        if checkpoint is None:
            checkpoint = (0, self.genesis_chain_hash, self.genesis_ledger_digest, ())
        seq, chain_hash, ledger_digest, proof = checkpoint
        message = ViewChange(
            new_view, replica, seq, chain_hash, ledger_digest, tuple(proof), tuple(prepared)
        )
        return seal(message, self.replica_keys[replica])

    def new_view(
        self,
        view: int,
        view_changes: Sequence[bytes],
        pre_prepares: Sequence[bytes],
        *,
        replica: int | None = None,
    ) -> bytes:
        sender = replica if replica is not None else self.primary(view)
        message = NewView(view, sender, tuple(view_changes), tuple(pre_prepares))
        return seal(message, self.replica_keys[sender])

    # --- driving one replica ----------------------------------------------------------

    @staticmethod
    def deliver(replica: Replica, *raws: bytes, link: Principal | None = None) -> list[Action]:
        """Hand each message to the replica in turn (as delivered by `link`, if given); all
        actions, in order."""
        actions: list[Action] = []
        for raw in raws:
            actions.extend(replica.handle(MessageReceived(raw, link)))
        return actions

    @staticmethod
    def tick(replica: Replica, now_ms: int) -> list[Action]:
        return replica.handle(Tick(now_ms))

    def drive_prepared(self, replica: Replica, entry: Entry) -> list[Action]:
        """Make `replica` prepared on `entry`: the pre-prepare (if it is a backup) and just
        enough prepares from other backups."""
        actions: list[Action] = []
        is_primary = replica.id == entry.primary
        if not is_primary:
            actions += self.deliver(replica, entry.raw)
        needed = self.config.prepare_quorum - (0 if is_primary else 1)
        others = self.backups(entry.view, excluding=[replica.id])[:needed]
        actions += self.deliver(replica, *self.prepares(entry, others))
        return actions

    def drive_commit(self, replica: Replica, entry: Entry) -> list[Action]:
        """Prepare `entry` at `replica`, then deliver quorum - 1 commits from other replicas."""
        actions = self.drive_prepared(replica, entry)
        others = [i for i in range(self.n) if i != replica.id][: self.quorum - 1]
        actions += self.deliver(replica, *self.commits(entry, others))
        return actions


class Chain:
    """Hands out pre-prepares, each chained to the previous one's entry digest."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.entries: dict[int, Entry] = {}
        self.seq = 0
        self.head = cluster.genesis_chain_hash

    def append(
        self, requests: Sequence[bytes] = (), *, view: int = 0, timestamp_ms: int = 0
    ) -> Entry:
        entry = self.cluster.pre_prepare(
            self.seq + 1, requests, view=view, prev_hash=self.head, timestamp_ms=timestamp_ms
        )
        self.entries[entry.seq] = entry
        self.seq = entry.seq
        self.head = entry.digest
        return entry

    def __getitem__(self, seq: int) -> Entry:
        return self.entries[seq]


# --- reading actions ----------------------------------------------------------------------


def decode(raw: bytes) -> Message:
    """The message inside an envelope (form only; signatures are the replica's business)."""
    return peek(raw)[1]


def broadcast_raws(actions: Iterable[Action], kind: type[Message] | None = None) -> list[bytes]:
    return [
        action.data
        for action in actions
        if isinstance(action, Broadcast) and (kind is None or isinstance(decode(action.data), kind))
    ]


def broadcasts(actions: Iterable[Action], kind: type[Message] | None = None) -> list[Any]:
    """Decoded messages of the Broadcast actions, optionally only of one type."""
    return [decode(raw) for raw in broadcast_raws(actions, kind)]


def send_raws(
    actions: Iterable[Action], to: Principal | None = None, kind: type[Message] | None = None
) -> list[bytes]:
    return [
        action.data
        for action in actions
        if isinstance(action, Send)
        and (to is None or action.to == to)
        and (kind is None or isinstance(decode(action.data), kind))
    ]


def sends(
    actions: Iterable[Action], to: Principal | None = None, kind: type[Message] | None = None
) -> list[Any]:
    """Decoded messages of the Send actions, optionally to one principal / of one type."""
    return [decode(raw) for raw in send_raws(actions, to, kind)]


def persists(actions: Iterable[Action]) -> list[Persist]:
    return [action for action in actions if isinstance(action, Persist)]


def persisted_keys(actions: Iterable[Action]) -> list[tuple[str | int, ...]]:
    return [action.key for action in persists(actions)]


def executed(actions: Iterable[Action]) -> list[Executed]:
    return [action for action in actions if isinstance(action, Executed)]


def notes(actions: Iterable[Action], kind: str | None = None) -> list[Note]:
    return [
        action
        for action in actions
        if isinstance(action, Note) and (kind is None or action.kind == kind)
    ]


def first_index(actions: Sequence[Action], predicate: Any) -> int:
    """Index of the first action satisfying `predicate`; fails the test if there is none."""
    for index, action in enumerate(actions):
        if predicate(action):
            return index
    raise AssertionError(f"no matching action among {len(actions)}")


def is_persist_of(key: tuple[str | int, ...]) -> Any:
    return lambda action: isinstance(action, Persist) and action.key == key


def is_broadcast_of(kind: type[Message]) -> Any:
    return lambda action: isinstance(action, Broadcast) and isinstance(decode(action.data), kind)


def apply_persists(
    records: dict[tuple[str | int, ...], bytes], actions: Iterable[Action]
) -> dict[tuple[str | int, ...], bytes]:
    """Carry out the Persist actions on a dict-backed store (None deletes)."""
    for action in persists(actions):
        if action.value is None:
            records.pop(action.key, None)
        else:
            records[action.key] = action.value
    return records


# --- an in-memory network -----------------------------------------------------------------


@dataclass
class Network:
    """Real replicas and client cores; delivers every Send and Broadcast in FIFO order.

    Replicas in `down` neither receive nor send; a directed replica link (a, b) in `cut`
    loses everything a sends to b. No other loss, no reordering: deterministic.
    """

    cluster: Cluster
    client_ids: Sequence[int] = (0, 1)
    down: set[int] = field(default_factory=set)
    cut: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # Each replica's history, fed from its Executed outputs (as the runtime's node does).
        self.histories = {i: MemoryHistoryStore() for i in range(self.cluster.n)}
        self.replicas = {
            i: self.cluster.replica(i, history=self.histories[i]) for i in range(self.cluster.n)
        }
        self.clients = {j: self.cluster.client(j) for j in self.client_ids}
        # (sending replica or None for a client, destination, bytes)
        self.queue: deque[tuple[int | None, Principal, bytes]] = deque()
        self.decided: list[Decided] = []
        self.reads: list[BalanceRead] = []
        self.lookups: list[LookupResult] = []
        self.statuses: list[ReplicaStatus] = []
        self.executed: dict[int, list[Executed]] = {i: [] for i in self.replicas}
        self.records: dict[int, dict[tuple[str | int, ...], bytes]] = {i: {} for i in self.replicas}
        self.now_ms = 0
        self.delivered = 0

    def submit(self, client: int, request_id: int, payer: str, payee: str, amount: int) -> None:
        self._client_actions(self.clients[client].submit(request_id, payer, payee, amount))

    def _client_actions(self, actions: Iterable[ClientAction]) -> None:
        carry_out_client(actions, _NetworkClientHost(self))

    def _step(self, replica: int, event: Event) -> None:
        """One event through the host loop (pbft/host.py), as the simulator and runtime do."""
        ready = step(self.replicas[replica], (event,), peers_of(replica, self.replicas))
        carry_out(ready, _NetworkReplicaHost(self, replica))

    def run(self, limit: int = 100_000) -> int:
        """Deliver until nothing is in flight; returns how many messages were delivered."""
        count = 0
        while self.queue:
            count += 1
            if count > limit:
                raise AssertionError("the network did not go quiet")
            source, (role, number), data = self.queue.popleft()
            if role == "client":
                if number in self.clients:
                    self._client_actions(self.clients[number].handle(MessageReceived(data)))
            elif number not in self.down and (source, number) not in self.cut:
                self._step(number, MessageReceived(data))
        self.delivered += count
        return count

    def advance(self, until_ms: int, step_ms: int = 10) -> None:
        """Tick every live replica and client every `step_ms` up to `until_ms`, running the
        network until quiet after each tick."""
        while self.now_ms < until_ms:
            self.now_ms = min(until_ms, self.now_ms + step_ms)
            for replica in self.replicas:
                if replica not in self.down:
                    self._step(replica, Tick(self.now_ms))
            for client in self.clients.values():
                self._client_actions(client.handle(Tick(self.now_ms)))
            self.run()


class _NetworkReplicaHost:
    """One replica's disk (`Network.records`) and network (`Network.queue`)."""

    def __init__(self, network: Network, replica: int) -> None:
        self.network = network
        self.replica = replica

    def persist(self, records: Sequence[Persist]) -> None:
        write_records(self.network.records[self.replica], records)

    def send(self, message: Outgoing) -> None:
        for destination in message.to:
            self.network.queue.append((self.replica, destination, message.data))

    def executed(self, executed: Executed) -> None:
        self.network.executed[self.replica].append(executed)
        self.network.histories[self.replica].record(executed)

    def note(self, note: Note) -> None:
        pass  # the in-memory network keeps no log; it never did


class _NetworkClientHost:
    def __init__(self, network: Network) -> None:
        self.network = network

    def send(self, message: Outgoing) -> None:
        for destination in message.to:
            self.network.queue.append((None, destination, message.data))

    def decided(self, decided: Decided) -> None:
        self.network.decided.append(decided)

    def balance_read(self, read: BalanceRead) -> None:
        self.network.reads.append(read)

    def looked_up(self, result: LookupResult) -> None:
        self.network.lookups.append(result)

    def replica_status(self, status: ReplicaStatus) -> None:
        self.network.statuses.append(status)
