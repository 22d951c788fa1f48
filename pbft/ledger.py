"""The payment ledger: the deterministic state machine every replica executes.

Part of the sans-I/O protocol core. Every replica must reach byte-identical state
from the same ordered requests, so this module does no I/O, reads no clock or
randomness, never uses floats for money and never iterates a set (str hash order
differs between processes).

Every account has an available and a held balance; money is conserved over both (checked
after every request and every batch's expiries). The operations' rules are in
pbft/ledger_ops.py, their records (holds, refundable payments, opened accounts, and what
bounds them) in pbft/holds.py.

Cost that does not grow with the ledger. The state digest is an RFC 6962 Merkle root over
the leaves [header, accounts in name order (["account", name, owner, available, held]),
clients in id order, record slots (pbft/holds.py)]. The tree keeps its inner nodes
(crypto.merkle.MerkleTree): a digest rehashes only the header and the leaves the requests
since the last digest touched, each in O(log n). A client's first decision inserts its
leaf among the clients and moves the later client leaves and every record leaf one place
up: their hashes are kept, so that costs O(clients + records) node hashes once per client,
never a re-encoding of their decisions (id order keeps the digest independent of which
client came first).

A generated genesis (GeneratedAccounts, a count and a rule) is never materialised per
account: the ledger stores only the balances that differ from the rule's, and its tree is
copy-on-write over the genesis tree, built once per process and shared by every ledger of
that genesis (all replicas of a simulation). We chose a shared, once-built genesis tree over
a sparse Merkle tree with cheap default leaves because the generated leaves are not equal
(each names its account and owner), the flat RFC 6962 layout is what state transfer's block
proofs and balance proofs already speak, and the build (a few seconds per million accounts)
is paid once. For the same reason a snapshot of a generated ledger holds the rule and the
changed balances, not a million accounts: its size grows with the accounts payments touched
and the dedup table, not with the genesis.

What still grows: a touched client's leaf is re-encoded whole (up to dedup_window
decisions) at the next digest; a checkpoint still serialises its snapshot when it is taken
(O(changed accounts + retained decisions)); a replica catching up by state transfer still
receives every leaf, a million for a million accounts.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgpack

from crypto.merkle import MerkleProof, MerkleTree, leaf_hash, tree_levels
from pbft.holds import MAX_TIME_MS, HoldState, LedgerLimits, RecordError, Records
from pbft.ledger_ops import OperationRules
from pbft.operations import Payment, Posting, Reason, Release

MAX_AMOUNT = 2**63 - 1
# Identifiers and counters travel as msgpack unsigned integers.
MAX_ID = 2**64 - 1
# The sum of all balances is stored in snapshots as a msgpack unsigned integer.
MAX_TOTAL = 2**64 - 1
MAX_ACCOUNT_NAME_LENGTH = 64
BODY_DIGEST_SIZE_BYTES = 32
# Eviction floor of a client that has not forgotten anything yet (-1 in snapshots).
NOTHING_EVICTED = -1
SNAPSHOT_FORMAT_VERSION = 4
# Snapshots arrive from other replicas during state transfer and are untrusted;
# this bounds the memory a malicious snapshot can make us allocate.
MAX_SNAPSHOT_SIZE_BYTES = 256 * 1024 * 1024
# Longest msgpack str in a valid snapshot: an account name, up to 4 UTF-8 bytes per char.
_MAX_SNAPSHOT_STR_SIZE_BYTES = 4 * MAX_ACCOUNT_NAME_LENGTH
MAX_GENERATED_ACCOUNTS = 10_000_000


class Outcome(enum.StrEnum):
    CONFIRMED = "confirmed"
    REJECTED = "rejected"


# Rejections answered without being stored: storing them would overwrite or
# resurrect the decision the id really belongs to.
_UNSTORED_REASONS = (Reason.ID_REUSED, Reason.REQUEST_EXPIRED)
_OUTCOMES_BY_CODE: dict[str, Outcome] = {outcome.value: outcome for outcome in Outcome}
_REASONS_BY_CODE: dict[str, Reason] = {reason.value: reason for reason in Reason}


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: Reason
    seq: int  # sequence number of the batch in which this request was first executed
    body_digest: bytes  # digest of the payment body it was decided for


@dataclass(frozen=True)
class Account:
    owner: int  # client id that may debit it
    balance: int


@dataclass(frozen=True)
class ExecutionResult:
    decision: Decision
    fresh: bool  # False for a retransmission: the stored decision, nothing changed
    # What this execution did to each account, in a fixed order; empty unless confirmed
    # and fresh.
    postings: tuple[Posting, ...] = ()


class LedgerSnapshotError(ValueError):
    """Malformed snapshot bytes (untrusted input from state transfer)."""


class LedgerInvariantError(RuntimeError):
    """A local bug, e.g. money not conserved; the replica must stop, not continue."""


@dataclass
class _ClientRecord:
    """The retained decisions of one client and what has been forgotten."""

    decisions: dict[int, Decision] = field(default_factory=dict)
    # Min-heap of the keys of `decisions`, so eviction of the smallest id is O(log n).
    request_id_heap: list[int] = field(default_factory=list)
    # Largest evicted request id; every retained id is above it. Request id 0 is
    # valid, so "nothing evicted yet" needs its own value below every id.
    eviction_floor: int = NOTHING_EVICTED


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but True is not an amount or an identifier.
    return isinstance(value, int) and not isinstance(value, bool)


def _require_identifier(value: object, name: str) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_ID:
        raise ValueError(f"{name} must be an int in [0, {MAX_ID}], got {value!r}")


def _validate_account_name(name: object) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_ACCOUNT_NAME_LENGTH:
        raise ValueError(
            f"account name must be a non-empty str of at most "
            f"{MAX_ACCOUNT_NAME_LENGTH} chars, got {name!r}"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be encoded into a snapshot.
        raise ValueError(f"account name is not valid unicode: {name!r}") from None


class GeneratedAccounts(Mapping[str, Account]):
    """A genesis of `count` accounts described by a rule rather than listed one by one.

    Account i is named prefix + i zero-padded to the width of count - 1 or `min_width`,
    whichever is wider (so name order is index order), holds `balance` and is owned by
    owners[i % len(owners)]. The same rule gives the same ledger in every process; the
    Ledger never builds an Account object per entry, which keeps a million-account genesis
    quick.
    """

    def __init__(
        self, count: int, balance: int, prefix: str, owners: Sequence[int], min_width: int = 0
    ) -> None:
        if not _is_int(count) or not 1 <= count <= MAX_GENERATED_ACCOUNTS:
            raise ValueError(f"generated account count must be in 1..{MAX_GENERATED_ACCOUNTS}")
        if not _is_int(balance) or not 0 <= balance <= MAX_AMOUNT:
            raise ValueError(f"generated balance must be an int in [0, {MAX_AMOUNT}]")
        if balance * count > MAX_TOTAL:
            raise ValueError(f"total balance {balance * count} exceeds {MAX_TOTAL}")
        if not isinstance(prefix, str):
            raise ValueError(f"generated account prefix must be a str, got {prefix!r}")
        if not _is_int(min_width) or not 0 <= min_width <= MAX_ACCOUNT_NAME_LENGTH:
            raise ValueError(f"min_width must be an int in [0, {MAX_ACCOUNT_NAME_LENGTH}]")
        if not owners:
            raise ValueError("generated accounts need at least one owner")
        for owner in owners:
            _require_identifier(owner, "owner of generated accounts")
        self.count = count
        self.balance = balance
        self.prefix = prefix
        self.owners = tuple(owners)
        self.min_width = min_width
        self._width = max(min_width, len(str(count - 1)))
        # Values derived from the rule alone, memoised by whoever derives them (the cluster
        # id's account rows), so the replicas of one process sharing a genesis pay once.
        self.derived: dict[str, bytes] = {}
        # Every name has the same length, so the longest is the only one that can be too
        # long or badly encoded.
        _validate_account_name(self.name(count - 1))

    def rule(self) -> list[Any]:
        """The rule as snapshots and the digest's header leaf carry it."""
        return [self.count, self.balance, self.prefix, self.min_width, list(self.owners)]

    def total(self) -> int:
        return self.balance * self.count

    def name(self, index: int) -> str:
        return f"{self.prefix}{index:0{self._width}d}"

    def names(self) -> list[str]:
        prefix, width = self.prefix, self._width
        return [f"{prefix}{index:0{width}d}" for index in range(self.count)]

    def owner(self, index: int) -> int:
        return self.owners[index % len(self.owners)]

    def index(self, name: object) -> int | None:
        """The account's index, None if the rule has no account of that name."""
        if not isinstance(name, str) or not name.startswith(self.prefix):
            return None
        digits = name[len(self.prefix) :]
        if len(digits) != self._width or not digits.isascii() or not digits.isdigit():
            return None
        index = int(digits)
        return index if index < self.count else None

    def __getitem__(self, name: str) -> Account:
        index = self.index(name)
        if index is None:
            raise KeyError(name)
        return Account(owner=self.owner(index), balance=self.balance)

    def __contains__(self, name: object) -> bool:
        return self.index(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (self.name(index) for index in range(self.count))

    def __len__(self) -> int:
        return self.count


def genesis_total(accounts: Mapping[str, Account]) -> int:
    """The money in a genesis, without an Account object per generated account."""
    if isinstance(accounts, GeneratedAccounts):
        return accounts.total()
    return sum(account.balance for account in accounts.values())


def _genesis_from_rule(rule: object) -> GeneratedAccounts | None:
    """The inverse of GeneratedAccounts.rule() for untrusted input (None: listed accounts)."""
    if rule is None:
        return None
    if not isinstance(rule, list) or len(rule) != 5:
        raise LedgerSnapshotError(f"genesis rule must be nil or a 5-item array, got {rule!r}")
    count, balance, prefix, min_width, owners = rule
    if not isinstance(owners, list) or not all(_is_int(owner) for owner in owners):
        raise LedgerSnapshotError("genesis rule owners must be an array of ints")
    try:
        return GeneratedAccounts(count, balance, prefix, owners, min_width)
    except ValueError as error:
        raise LedgerSnapshotError(f"genesis rule: {error}") from None


# The leaf hashes of generated genesis trees, keyed by the genesis header leaf (which holds
# the whole rule). A pure function of the key, so sharing it across ledgers of one process
# cannot make two replicas differ; bounded, since each holds about 64 bytes per account.
_GENESIS_TREES: dict[bytes, tuple[bytes, ...]] = {}
_GENESIS_TREE_CACHE_SIZE = 2


def _generated_tree(genesis: GeneratedAccounts, header_leaf: bytes) -> tuple[bytes, ...]:
    levels = _GENESIS_TREES.get(header_leaf)
    if levels is not None:
        return levels
    # Every leaf is ["account", name, owner, available, held]; all names have one length, so the
    # encoding is a fixed head, the name (prefix and zero-padded index, formatted straight
    # into bytes) and one of len(owners) tails.
    first = genesis.name(0).encode("utf-8")
    head = b"\x00" + _FIXARRAY_5 + _ACCOUNT_TAG + _packb(genesis.name(0))[: -len(first)]
    head += genesis.prefix.encode("utf-8")
    width = len(first) - len(genesis.prefix.encode("utf-8"))
    # Every generated account starts with nothing held.
    tails = [_packb(owner) + _packb(genesis.balance) + _packb(0) for owner in genesis.owners]
    sha256 = hashlib.sha256
    if len(tails) == 1:
        tail = tails[0]
        hashes = [
            sha256(b"%b%0*d%b" % (head, width, index, tail)).digest()
            for index in range(genesis.count)
        ]
    else:
        period = len(tails)
        hashes = [
            sha256(b"%b%0*d%b" % (head, width, index, tails[index % period])).digest()
            for index in range(genesis.count)
        ]
    levels = tuple(tree_levels([leaf_hash(header_leaf), *hashes]))
    while len(_GENESIS_TREES) >= _GENESIS_TREE_CACHE_SIZE:
        del _GENESIS_TREES[next(iter(_GENESIS_TREES))]
    _GENESIS_TREES[header_leaf] = levels
    return levels


def _packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


_FIXARRAY_5 = b"\x95"
_ACCOUNT_TAG = _packb("account")


class Ledger(OperationRules):
    """Balances (available and held), per-client decisions and the records of holds,
    refundable payments and opened accounts (pbft/holds.py), executed in the replicated
    order. The rules of each operation are OperationRules' (pbft/ledger_ops.py)."""

    def __init__(
        self,
        accounts: Mapping[str, Account],
        dedup_window: int = 4096,
        limits: LedgerLimits | None = None,
    ) -> None:
        if not _is_int(dedup_window) or not 1 <= dedup_window <= MAX_ID:
            raise ValueError(f"dedup_window must be an int in [1, {MAX_ID}], got {dedup_window!r}")
        limits = limits if limits is not None else LedgerLimits()
        if not isinstance(limits, LedgerLimits):
            raise ValueError(f"limits must be LedgerLimits, got {limits!r}")
        if isinstance(accounts, GeneratedAccounts):
            # Validated once as a rule; no account is stored until a payment changes it.
            self._assemble(accounts, {}, {}, dedup_window, accounts.total(), limits)
            return
        for name in accounts:
            _validate_account_name(name)
        balances: dict[str, int] = {}
        owners: dict[str, int] = {}
        # Sorted so that internal order never depends on the caller's insertion order.
        for name in sorted(accounts):
            account = accounts[name]
            if not isinstance(account, Account):
                raise ValueError(f"account {name!r} must be an Account, got {account!r}")
            _require_identifier(account.owner, f"owner of account {name!r}")
            if not _is_int(account.balance) or not 0 <= account.balance <= MAX_AMOUNT:
                raise ValueError(
                    f"balance of account {name!r} must be an int in [0, {MAX_AMOUNT}], "
                    f"got {account.balance!r}"
                )
            balances[name] = account.balance
            owners[name] = account.owner
        total = sum(balances.values())
        if total > MAX_TOTAL:
            raise ValueError(f"total balance {total} exceeds {MAX_TOTAL}")
        self._assemble(None, balances, owners, dedup_window, total, limits)

    def _assemble(
        self,
        genesis: GeneratedAccounts | None,
        balances: dict[str, int],
        owners: dict[str, int],
        dedup_window: int,
        total: int,
        limits: LedgerLimits,
    ) -> None:
        """Take over already validated tables: for listed accounts (genesis None) every
        balance in name order and every owner; for a generated genesis only the balances
        that differ from the rule's, and no owners (the rule has them; touched accounts'
        owners are cached there as they are looked up)."""
        self._genesis = genesis
        # Available balances (of a generated genesis: those that differ from the rule's).
        self._balances = balances
        # Held balances of genesis accounts, only where not 0 (opened accounts hold theirs).
        self._held: dict[str, int] = {}
        self._owners = owners
        self._limits = limits
        self._records = Records(limits)
        # Listed accounts: name -> position among the account leaves (names never change).
        self._positions: dict[str, int] = (
            {name: index for index, name in enumerate(balances)} if genesis is None else {}
        )
        self._names: list[str] = list(balances) if genesis is None else []
        self._dedup_window = dedup_window
        self._initial_total = total
        # Available plus held, tracked incrementally so the conservation check after each
        # payment is O(1).
        self._total = total
        self._executed_count = 0
        self._batch_time_ms = 0
        self._clients: dict[int, _ClientRecord] = {}
        # Client ids in id order: position i is client leaf i.
        self._client_order: list[int] = []
        # Each client's leaf hash as of the last digest, so a shifted leaf is not rehashed.
        self._client_hashes: dict[int, bytes] = {}
        # The lowest client position whose leaf moved since the last digest, if any.
        self._shifted_from: int | None = None
        # The digest's tree, built on the first digest; then only the leaves changed since
        # (dicts, not sets: their order is the same in every process) are rehashed.
        self._tree: MerkleTree | None = None
        self._dirty_accounts: dict[str, None] = {}
        self._dirty_clients: dict[int, None] = {}
        # Each record slot's leaf hash as of the last digest (rehashed only when dirty).
        self._record_hashes: list[bytes] = []

    # -- queries ---------------------------------------------------------------

    @property
    def initial_total(self) -> int:
        return self._initial_total

    @property
    def batch_time_ms(self) -> int:
        """The time of the batch being (or last) executed: the largest batch timestamp seen."""
        return self._batch_time_ms

    @property
    def executed_count(self) -> int:
        return self._executed_count

    @property
    def dedup_window(self) -> int:
        return self._dedup_window

    def lookup(self, client_id: int, request_id: int) -> Decision | None:
        record = self._clients.get(client_id)
        if record is None:
            return None
        return record.decisions.get(request_id)

    def eviction_floor(self, client_id: int) -> int | None:
        """Largest request id of this client that has been forgotten, None if none."""
        record = self._clients.get(client_id)
        if record is None or record.eviction_floor == NOTHING_EVICTED:
            return None
        return record.eviction_floor

    def _position(self, account: str) -> int | None:
        """The account's place among the account leaves, None if there is no such account."""
        genesis = self._genesis
        if genesis is None:
            return self._positions.get(account)
        return genesis.index(account)

    @property
    def limits(self) -> LedgerLimits:
        return self._limits

    @property
    def records(self) -> Records:
        """Holds, refundable payments and opened accounts (read-only for callers)."""
        return self._records

    def balance(self, account: str) -> int | None:
        """The account's available balance, None if there is no such account."""
        if not isinstance(account, str):
            return None
        opened = self._records.opened.get(account)
        if opened is not None:
            return opened.available
        balance = self._balances.get(account)
        if balance is not None or self._genesis is None:
            return balance
        return self._genesis.balance if self._genesis.index(account) is not None else None

    def held(self, account: str) -> int | None:
        """The account's held balance (money authorized, not yet captured or released)."""
        if not isinstance(account, str):
            return None
        opened = self._records.opened.get(account)
        if opened is not None:
            return opened.held
        if self._position(account) is None:
            return None
        return self._held.get(account, 0)

    def _account_exists(self, account: str) -> bool:
        return account in self._records.opened or self._position(account) is not None

    def _valid_account_name(self, name: str) -> bool:
        try:
            _validate_account_name(name)
        except ValueError:
            return False
        return True

    def _owner(self, account: str) -> int:
        opened = self._records.opened.get(account)
        if opened is not None:
            return opened.owner
        genesis = self._genesis
        if genesis is None:
            return self._owners[account]
        # A generated ledger's _owners caches the owners of accounts payments touched (an
        # owner never changes): each checkpoint's snapshot names them all.
        owner = self._owners.get(account)
        if owner is not None:
            return owner
        index = genesis.index(account)
        if index is None:
            raise KeyError(account)
        owner = genesis.owner(index)
        if account in self._balances:
            self._owners[account] = owner
        return owner

    def genesis_rule(self) -> list[Any] | None:
        """The generated genesis's rule (GeneratedAccounts.rule), None for listed accounts."""
        return self._genesis.rule() if self._genesis is not None else None

    def account_count(self) -> int:
        return self._genesis.count if self._genesis is not None else len(self._balances)

    def accounts(self) -> dict[str, Account]:
        """Every genesis account with its available balance, in name order: O(accounts),
        for tests, audits and tools (opened accounts: `records.opened`)."""
        genesis = self._genesis
        if genesis is None:
            return {
                name: Account(owner=self._owners[name], balance=balance)
                for name, balance in self._balances.items()
            }
        changed, default = self._balances, genesis.balance
        return {
            name: Account(owner=genesis.owner(index), balance=changed.get(name, default))
            for index, name in enumerate(genesis.names())
        }

    def min_balance(self) -> int:
        """The smallest balance of any account, without visiting untouched generated ones."""
        genesis = self._genesis
        if genesis is None:
            return min(self._balances.values(), default=0)
        smallest = min(self._balances.values(), default=genesis.balance)
        if len(self._balances) < genesis.count:
            smallest = min(smallest, genesis.balance)
        return smallest

    def total_balance(self) -> int:
        """The incrementally tracked sum of all available and held balances, O(1)."""
        return self._total

    def recount_total(self) -> int:
        """Sum of all available and held balances recomputed from scratch, O(stored
        accounts); for tests and audits."""
        genesis = self._genesis
        opened = self._records.opened.values()
        extra = sum(self._held.values()) + sum(
            account.available + account.held for account in opened
        )
        if genesis is None:
            return sum(self._balances.values()) + extra
        untouched = genesis.count - len(self._balances)
        return genesis.balance * untouched + sum(self._balances.values()) + extra

    # -- execution -------------------------------------------------------------

    def begin_batch(self, seq: int, timestamp_ms: int) -> tuple[Release, ...]:
        """Start executing batch `seq`, proposed at `timestamp_ms`: every open hold with
        expires_at <= the batch time is released, in (expires_at, hold id) order, and
        returned; closed holds and payments past their retention are forgotten."""
        _require_identifier(seq, "seq")
        _require_identifier(timestamp_ms, "timestamp_ms")
        # Time never goes backwards in execution, whatever a proposal says, and stays where
        # a deadline (time + a bounded duration) fits the wire.
        now = self._batch_time_ms = max(self._batch_time_ms, min(timestamp_ms, MAX_TIME_MS))
        records = self._records
        released = []
        for hold in records.due_expiries(now):
            self._release(hold)
            records.close_hold(hold, HoldState.EXPIRED, now)
            released.append(Release(hold.client_id, hold.request_id, hold.payer, hold.amount))
        records.forget(now)
        self._check_conservation()
        return tuple(released)

    def execute(self, payment: Payment, body_digest: bytes, seq: int) -> ExecutionResult:
        """Apply one ordered request; same inputs in the same order give the same state."""
        # Precondition violations are caller bugs (identifiers are validated when the
        # request is decoded); they cannot be stored, so they are not a rejection.
        _require_identifier(payment.client_id, "client_id")
        _require_identifier(payment.request_id, "request_id")
        _require_identifier(seq, "seq")
        if not isinstance(body_digest, bytes) or len(body_digest) != BODY_DIGEST_SIZE_BYTES:
            raise ValueError(f"body_digest must be {BODY_DIGEST_SIZE_BYTES} bytes")

        record = self._clients.get(payment.client_id)
        if record is not None:
            stored = record.decisions.get(payment.request_id)
            if stored is not None:
                if stored.body_digest == body_digest:
                    return ExecutionResult(decision=stored, fresh=False)
                return self._reject_unstored(Reason.ID_REUSED, body_digest, seq)
            if payment.request_id <= record.eviction_floor:
                return self._reject_unstored(Reason.REQUEST_EXPIRED, body_digest, seq)

        reason, postings = self._apply_operation(payment)
        if reason is Reason.NONE:
            decision = Decision(Outcome.CONFIRMED, Reason.NONE, seq, body_digest)
        else:
            decision = Decision(Outcome.REJECTED, reason, seq, body_digest)
        self._store(payment.client_id, payment.request_id, decision)
        self._executed_count += 1
        self._check_conservation()
        return ExecutionResult(decision=decision, fresh=True, postings=postings)

    def _check_conservation(self) -> None:
        if self._total != self._initial_total:
            raise LedgerInvariantError(
                f"money not conserved: total {self._total} != initial {self._initial_total}"
            )

    def _reject_unstored(self, reason: Reason, body_digest: bytes, seq: int) -> ExecutionResult:
        self._executed_count += 1
        decision = Decision(Outcome.REJECTED, reason, seq, body_digest)
        return ExecutionResult(decision=decision, fresh=True)

    def _stored_balance(self, account: str) -> int:
        """A genesis account's available balance (KeyError if there is no such account)."""
        balance = self._balances.get(account)
        if balance is not None:
            return balance
        if self._genesis is None:
            raise KeyError(account)
        return self._genesis.balance

    def _set_balance(self, account: str, balance: int) -> None:
        """Set an account's available balance, keeping the total in step."""
        if not 0 <= balance <= MAX_AMOUNT:
            raise LedgerInvariantError(f"available balance {balance} of {account!r}")
        opened = self._records.opened.get(account)
        if opened is not None:
            self._total += balance - opened.available
            opened.available = balance
            self._records.touch(opened)
            return
        self._total += balance - self._stored_balance(account)
        genesis = self._genesis
        # A generated ledger keeps only balances that differ from the rule's, so equal
        # states store equal tables (and snapshot to equal bytes).
        if genesis is not None and balance == genesis.balance:
            self._balances.pop(account, None)
        else:
            self._balances[account] = balance
        self._dirty_accounts[account] = None

    def _set_held(self, account: str, held: int) -> None:
        """Set an account's held balance, keeping the total in step."""
        if not 0 <= held <= MAX_AMOUNT:
            raise LedgerInvariantError(f"held balance {held} of {account!r}")
        opened = self._records.opened.get(account)
        if opened is not None:
            self._total += held - opened.held
            opened.held = held
            self._records.touch(opened)
            return
        if self._position(account) is None:
            raise KeyError(account)
        self._total += held - self._held.get(account, 0)
        if held:
            self._held[account] = held
        else:
            self._held.pop(account, None)
        self._dirty_accounts[account] = None

    def _store(self, client_id: int, request_id: int, decision: Decision) -> None:
        record = self._clients.get(client_id)
        if record is None:
            record = self._clients[client_id] = _ClientRecord()
            self._add_client_position(client_id)
        self._dirty_clients[client_id] = None
        record.decisions[request_id] = decision
        heapq.heappush(record.request_id_heap, request_id)
        # Add before evicting: if the new id is the smallest it is the one forgotten,
        # which keeps every retained id above the floor.
        if len(record.decisions) > self._dedup_window:
            evicted = heapq.heappop(record.request_id_heap)
            del record.decisions[evicted]
            if evicted <= record.eviction_floor:
                raise LedgerInvariantError(
                    f"client {client_id}: evicted {evicted} <= floor {record.eviction_floor}"
                )
            record.eviction_floor = evicted

    def _add_client_position(self, client_id: int) -> None:
        position = bisect.bisect_left(self._client_order, client_id)
        self._client_order.insert(position, client_id)
        if self._shifted_from is None or position < self._shifted_from:
            self._shifted_from = position

    # -- the digest and its leaves ------------------------------------------------

    def digest(self) -> bytes:
        """Canonical hash of the whole state: equal states give equal digests.

        A Merkle root over the state's leaves (a header, then one leaf per account in name
        order, then one per client in the order of its first decision), so a checkpoint's
        digest can later prove one account's balance with an inclusion proof instead of the
        whole state. Costs O(log n) per leaf changed since the last digest.
        """
        return self._current_tree().root()

    def account_proof(self, account: str) -> tuple[bytes, MerkleProof] | None:
        """The account's leaf and its inclusion proof against `digest()`; an opened
        account's leaf is its record's (["opened", name, owner, available, held])."""
        if not isinstance(account, str):
            return None
        opened = self._records.opened.get(account)
        if opened is not None:
            tree = self._current_tree()
            return self._records.leaf(opened.slot), tree.proof(self._first_record() + opened.slot)
        position = self._position(account)
        if position is None:
            return None
        return self._account_leaf(account), self._current_tree().proof(1 + position)

    def _first_record(self) -> int:
        """The leaf index of record slot 0."""
        return 1 + self.account_count() + len(self._clients)

    def merkle_tree(self) -> MerkleTree:
        """The digest's tree, up to date (read-only for callers: proofs and block roots)."""
        return self._current_tree()

    def leaves(self, start: int, stop: int) -> list[bytes]:
        return [self.leaf(index) for index in range(start, stop)]

    def leaf_count(self) -> int:
        """Leaves of the digest's Merkle tree: the header, the accounts, the clients, the
        record slots."""
        return self._first_record() + len(self._records)

    def leaf(self, index: int) -> bytes:
        """The digest's leaf `index` (what state transfer serves), encoded on demand."""
        if not 0 <= index < self.leaf_count():
            raise IndexError(f"leaf {index} out of range for {self.leaf_count()} leaves")
        if index == 0:
            return self._header_leaf()
        position = index - 1
        accounts = self.account_count()
        if position < accounts:
            genesis = self._genesis
            name = self._names[position] if genesis is None else genesis.name(position)
            return self._account_leaf(name)
        position -= accounts
        if position < len(self._client_order):
            return self._client_leaf(self._client_order[position])
        return self._records.leaf(position - len(self._client_order))

    def _leaves(self) -> list[bytes]:
        return [self.leaf(index) for index in range(self.leaf_count())]

    def _header_leaf(self) -> bytes:
        rule = self._genesis.rule() if self._genesis is not None else None
        return _header_leaf(
            self._dedup_window,
            self._initial_total,
            self._executed_count,
            rule,
            self._limits,
            self._batch_time_ms,
        )

    def _account_leaf(self, name: str) -> bytes:
        available = self._stored_balance(name)
        return _packb(["account", name, self._owner(name), available, self._held.get(name, 0)])

    def _client_leaf(self, client_id: int) -> bytes:
        record = self._clients[client_id]
        return _packb(["client", client_id, record.eviction_floor, _decision_rows(record)])

    def _current_tree(self) -> MerkleTree:
        """The digest's tree, brought up to date with the leaves changed since last time."""
        tree = self._tree
        if tree is None:
            return self._build_tree()
        accounts = self.account_count()
        changed = {0: leaf_hash(self._header_leaf())}
        for name in self._dirty_accounts:
            position = self._position(name)
            if position is None:
                raise LedgerInvariantError(f"changed account {name!r} is not in the ledger")
            changed[1 + position] = leaf_hash(self._account_leaf(name))
        hashes, order, first = self._client_hashes, self._client_order, 1 + accounts
        for client_id in self._dirty_clients:
            hashes[client_id] = leaf_hash(self._client_leaf(client_id))
            changed[first + bisect.bisect_left(order, client_id)] = hashes[client_id]
        if self._shifted_from is not None:
            for position in range(self._shifted_from, len(order)):
                changed[first + position] = hashes[order[position]]
        records, record_hashes, first_record = (
            self._records,
            self._record_hashes,
            first + len(order),
        )
        for slot in sorted(records.dirty):
            leaf = leaf_hash(records.leaf(slot))
            if slot < len(record_hashes):
                record_hashes[slot] = leaf
            else:  # new slots are only ever added at the end
                record_hashes.append(leaf)
            changed[first_record + slot] = leaf
        if self._shifted_from is not None:
            # A new client moved every record leaf one place up (their hashes are kept).
            for slot, leaf in enumerate(record_hashes):
                changed[first_record + slot] = leaf
        records.dirty.clear()
        self._dirty_accounts.clear()
        self._dirty_clients.clear()
        self._shifted_from = None
        tree.update(changed)
        return tree

    def _build_tree(self) -> MerkleTree:
        genesis = self._genesis
        self._client_hashes = {
            client_id: leaf_hash(self._client_leaf(client_id)) for client_id in self._client_order
        }
        records = self._records
        self._record_hashes = [leaf_hash(records.leaf(slot)) for slot in range(len(records))]
        records.dirty.clear()
        if genesis is None:
            hashes = [leaf_hash(self.leaf(index)) for index in range(1 + len(self._names))]
            hashes.extend(self._client_hashes[client_id] for client_id in self._client_order)
            hashes.extend(self._record_hashes)
            tree = MerkleTree(tree_levels(hashes))
        else:
            # Copy-on-write over the shared genesis tree: only what differs is hashed.
            genesis_header = _header_leaf(
                self._dedup_window, genesis.total(), 0, genesis.rule(), self._limits, 0
            )
            tree = MerkleTree(_generated_tree(genesis, genesis_header))
            changed = {0: leaf_hash(self._header_leaf())}
            # Sorted: the two tables' union, in one order in every process.
            for name in sorted(self._balances.keys() | self._held.keys()):
                index = genesis.index(name)
                if index is None:
                    raise LedgerInvariantError(f"changed account {name!r} is not in the ledger")
                changed[1 + index] = leaf_hash(self._account_leaf(name))
            first = 1 + genesis.count
            for position, client_id in enumerate(self._client_order):
                changed[first + position] = self._client_hashes[client_id]
            first += len(self._client_order)
            for slot, leaf in enumerate(self._record_hashes):
                changed[first + slot] = leaf
            tree.update(changed)
        self._tree = tree
        self._dirty_accounts.clear()
        self._dirty_clients.clear()
        self._shifted_from = None
        return tree

    # -- snapshots -------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Canonical msgpack encoding; the same state always gives the same bytes.

        Layout (arrays only, no maps, so there is no key order to get wrong):
        [version, dedup_window, initial_total, executed_count,
         genesis rule (nil for listed accounts, else [count, balance, prefix, min_width,
         [owner, ...]]),
         [[name, owner, available, held], ...] sorted by name: every listed account, or the
         generated accounts whose available differs from the rule's or that hold money,
         [[client_id, eviction_floor,
           [[request_id, outcome, reason, seq, body_digest], ...] sorted by request id],
          ...] sorted by client id,
         limits (LedgerLimits.row()), batch_time_ms, record slot count,
         [[slot, *record leaf fields], ...] sorted by slot (pbft/holds.py)]
        """
        genesis, held = self._genesis, self._held
        if genesis is None:
            accounts = [
                [name, self._owners[name], balance, held.get(name, 0)]
                for name, balance in self._balances.items()
            ]
        else:
            accounts = [
                [name, self._owner(name), self._stored_balance(name), held.get(name, 0)]
                for name in sorted(self._balances.keys() | held.keys())
            ]
        clients = [
            [
                client_id,
                self._clients[client_id].eviction_floor,
                _decision_rows(self._clients[client_id]),
            ]
            for client_id in self._client_order
        ]
        state = [
            SNAPSHOT_FORMAT_VERSION,
            self._dedup_window,
            self._initial_total,
            self._executed_count,
            genesis.rule() if genesis is not None else None,
            accounts,
            clients,
            self._limits.row(),
            self._batch_time_ms,
            len(self._records),
            self._records.rows(),
        ]
        return _packb(state)

    @classmethod
    def restore(
        cls,
        snapshot: bytes,
        limits: LedgerLimits | None = None,
        *,
        max_clients: int | None = None,
    ) -> Ledger:
        """Inverse of snapshot(); anything but a canonical valid snapshot raises
        LedgerSnapshotError. With `limits` (the cluster's), a snapshot with other record
        limits is refused before anything is sized by them. With `max_clients` (the
        cluster's client keys: only their requests execute, so only they have dedup
        entries), a snapshot listing more clients is refused before the record slots are
        sized by its count (each client may own up to its caps in slots)."""
        if not isinstance(snapshot, bytes | bytearray | memoryview):
            raise LedgerSnapshotError(f"snapshot must be bytes, got {type(snapshot).__name__}")
        snapshot = bytes(snapshot)
        if len(snapshot) > MAX_SNAPSHOT_SIZE_BYTES:
            raise LedgerSnapshotError(f"snapshot of {len(snapshot)} bytes is too large")
        try:
            state = msgpack.unpackb(
                snapshot,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_str_len=_MAX_SNAPSHOT_STR_SIZE_BYTES,
                max_bin_len=BODY_DIGEST_SIZE_BYTES,
                max_array_len=len(snapshot),
                max_map_len=0,
                max_ext_len=0,
            )
        # Broad on purpose: the decoder is a C extension fed untrusted bytes, and the
        # contract is that nothing but LedgerSnapshotError escapes.
        except Exception as error:
            raise LedgerSnapshotError(f"undecodable snapshot: {error}") from error

        try:
            ledger = cls._from_state(state, limits, max_clients)
        except MemoryError:  # a backstop: every count is bounded before it is allocated
            raise LedgerSnapshotError("snapshot too large to restore") from None
        # Rejects every non-canonical encoding (wider int formats, etc.) at once.
        if ledger.snapshot() != snapshot:
            raise LedgerSnapshotError("snapshot is not canonically encoded")
        return ledger

    @classmethod
    def _from_state(
        cls, state: Any, expected_limits: LedgerLimits | None, max_clients: int | None
    ) -> Ledger:
        fields = _snapshot_array(state, "state", length=11)
        version, dedup_window, initial_total, executed_count, rule, accounts, clients = fields[:7]
        limits_row, batch_time_ms, slot_count, record_rows = fields[7:]
        if version != SNAPSHOT_FORMAT_VERSION or not _is_int(version):
            raise LedgerSnapshotError(f"unsupported snapshot version {version!r}")
        dedup_window = _snapshot_int(dedup_window, "dedup_window", low=1, high=MAX_ID)
        initial_total = _snapshot_int(initial_total, "initial_total", low=0, high=MAX_TOTAL)
        executed_count = _snapshot_int(executed_count, "executed_count", low=0, high=MAX_ID)
        batch_time_ms = _snapshot_int(batch_time_ms, "batch_time_ms", low=0, high=MAX_TIME_MS)
        try:
            limits = LedgerLimits.from_row(limits_row)
            if expected_limits is not None and limits != expected_limits:
                raise RecordError(f"record limits {limits_row!r} are not the cluster's")
            client_count = len(_snapshot_array(clients, "clients"))
            if max_clients is not None and client_count > max_clients:
                raise RecordError(
                    f"{client_count} clients, more than the cluster's {max_clients} client keys"
                )
            records = Records.from_rows(
                limits, slot_count, record_rows, batch_time_ms, client_count
            )
        except RecordError as error:
            raise LedgerSnapshotError(str(error)) from None
        genesis = _genesis_from_rule(rule)

        account_map: dict[str, Account] = {}
        held: dict[str, int] = {}
        previous_name: str | None = None
        for entry in _snapshot_array(accounts, "accounts"):
            name, owner, balance, held_balance = _snapshot_array(entry, "account", length=4)
            if not isinstance(name, str):
                raise LedgerSnapshotError(f"account name must be str, got {name!r}")
            # str comparison is code-point order, identical in every process.
            if previous_name is not None and name <= previous_name:
                raise LedgerSnapshotError(f"accounts unsorted or duplicated at {name!r}")
            previous_name = name
            owner = _snapshot_int(owner, f"owner of {name!r}", low=0, high=MAX_ID)
            balance = _snapshot_int(balance, f"balance of {name!r}", low=0, high=MAX_AMOUNT)
            held_balance = _snapshot_int(held_balance, f"held of {name!r}", low=0, high=MAX_AMOUNT)
            account_map[name] = Account(owner=owner, balance=balance)
            if held_balance:
                held[name] = held_balance
        if genesis is None:
            try:
                ledger = cls(account_map, dedup_window=dedup_window, limits=limits)
            except ValueError as error:
                raise LedgerSnapshotError(str(error)) from error
            total = ledger._initial_total
        else:
            ledger = cls(genesis, dedup_window=dedup_window, limits=limits)
            total = genesis.total()
            for name, account in account_map.items():
                index = genesis.index(name)
                if index is None or genesis.owner(index) != account.owner:
                    raise LedgerSnapshotError(f"account {name!r} is not the rule's")
                if account.balance == genesis.balance and name not in held:
                    raise LedgerSnapshotError(f"account {name!r} holds the rule's balance")
                total += account.balance - genesis.balance
                if account.balance != genesis.balance:
                    ledger._balances[name] = account.balance
        ledger._held = held
        ledger._records = records
        ledger._batch_time_ms = batch_time_ms
        total += sum(held.values())
        total += sum(account.available + account.held for account in records.opened.values())
        if total != initial_total:
            raise LedgerSnapshotError(
                f"balances sum to {total}, initial_total says {initial_total}"
            )
        ledger._initial_total = ledger._total = total
        ledger._check_records()

        retained_count = 0
        previous_client_id = -1
        for entry in _snapshot_array(clients, "clients"):
            client_id, record = _snapshot_client(entry, dedup_window)
            if client_id <= previous_client_id:
                raise LedgerSnapshotError(f"clients unsorted or duplicated at {client_id}")
            previous_client_id = client_id
            retained_count += len(record.decisions)
            ledger._clients[client_id] = record
            ledger._client_order.append(client_id)
        if executed_count < retained_count:
            raise LedgerSnapshotError(
                f"executed_count {executed_count} < {retained_count} retained decisions"
            )
        ledger._executed_count = executed_count
        return ledger

    def _check_records(self) -> None:
        """Untrusted records against the balances: every account a record names exists, no
        opened account shadows a genesis one, and each account holds exactly what its
        open holds add up to (LedgerSnapshotError otherwise)."""
        records = self._records
        for name in records.opened:
            if self._position(name) is not None:
                raise LedgerSnapshotError(f"opened account {name!r} is a genesis account")
        expected: dict[str, int] = {}
        for hold_id, hold in records.holds.items():
            for name in (hold.payer, hold.payee):
                if not self._account_exists(name):
                    raise LedgerSnapshotError(f"hold {hold_id} names no account {name!r}")
            if hold.state is HoldState.OPEN:
                expected[hold.payer] = expected.get(hold.payer, 0) + hold.amount
        for payment_id, paid in records.payments.items():
            for name in (paid.payer, paid.payee):
                if not self._account_exists(name):
                    raise LedgerSnapshotError(f"payment {payment_id} names no account {name!r}")
        actual = dict(self._held)
        actual.update(
            (name, account.held) for name, account in records.opened.items() if account.held
        )
        if sorted(actual.items()) != sorted(expected.items()):
            raise LedgerSnapshotError("held balances differ from the open holds")


def _header_leaf(
    dedup_window: int,
    total: int,
    executed_count: int,
    rule: Any,
    limits: LedgerLimits,
    batch_time_ms: int,
) -> bytes:
    """The digest's first leaf: the state's header (a genesis tree's too, executed 0)."""
    return _packb(
        [
            "header",
            SNAPSHOT_FORMAT_VERSION,
            dedup_window,
            total,
            executed_count,
            rule,
            limits.row(),
            batch_time_ms,
        ]
    )


def _decision_rows(record: _ClientRecord) -> list[list[Any]]:
    # StrEnum members are str: msgpack packs them as the code itself.
    return [
        [request_id, decision.outcome, decision.reason, decision.seq, decision.body_digest]
        for request_id, decision in sorted(record.decisions.items())
    ]


def _snapshot_array(value: object, what: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise LedgerSnapshotError(f"{what} must be an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise LedgerSnapshotError(f"{what} must have {length} items, got {len(value)}")
    return value


def _snapshot_int(value: object, what: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise LedgerSnapshotError(f"{what} must be an int in [{low}, {high}], got {value!r}")
    return value


def _snapshot_client(entry: object, dedup_window: int) -> tuple[int, _ClientRecord]:
    client_id, floor, decisions = _snapshot_array(entry, "client", length=3)
    client_id = _snapshot_int(client_id, "client_id", low=0, high=MAX_ID)
    record = _ClientRecord(
        eviction_floor=_snapshot_int(floor, "eviction_floor", low=NOTHING_EVICTED, high=MAX_ID)
    )
    previous_request_id = record.eviction_floor
    for decision_entry in _snapshot_array(decisions, "decisions"):
        request_id, decision = _snapshot_decision(decision_entry)
        # Sorted, unique and above the floor, all in one comparison.
        if request_id <= previous_request_id:
            raise LedgerSnapshotError(
                f"client {client_id}: request id {request_id} unsorted, duplicated "
                f"or not above the eviction floor {record.eviction_floor}"
            )
        previous_request_id = request_id
        record.decisions[request_id] = decision
    count = len(record.decisions)
    # A client exists only once it has a decision, and count never shrinks.
    if count == 0 or count > dedup_window:
        raise LedgerSnapshotError(f"client {client_id}: {count} retained decisions")
    # Eviction only happens with a full window, which then stays full.
    if record.eviction_floor != NOTHING_EVICTED and count != dedup_window:
        raise LedgerSnapshotError(f"client {client_id}: floor set but window not full")
    # Sorted ascending is already a valid min-heap.
    record.request_id_heap = list(record.decisions)
    return client_id, record


def _snapshot_decision(entry: object) -> tuple[int, Decision]:
    request_id, outcome_code, reason_code, seq, body_digest = _snapshot_array(
        entry, "decision", length=5
    )
    request_id = _snapshot_int(request_id, "request_id", low=0, high=MAX_ID)
    outcome = _OUTCOMES_BY_CODE.get(outcome_code) if isinstance(outcome_code, str) else None
    reason = _REASONS_BY_CODE.get(reason_code) if isinstance(reason_code, str) else None
    if outcome is None or reason is None:
        raise LedgerSnapshotError(f"unknown outcome/reason {outcome_code!r}/{reason_code!r}")
    if (outcome is Outcome.CONFIRMED) != (reason is Reason.NONE):
        raise LedgerSnapshotError(f"outcome {outcome.value!r} with reason {reason.value!r}")
    if reason in _UNSTORED_REASONS:
        raise LedgerSnapshotError(f"reason {reason.value!r} is never stored")
    seq = _snapshot_int(seq, "seq", low=0, high=MAX_ID)
    if not isinstance(body_digest, bytes) or len(body_digest) != BODY_DIGEST_SIZE_BYTES:
        raise LedgerSnapshotError(f"body_digest must be {BODY_DIGEST_SIZE_BYTES} bytes")
    return request_id, Decision(outcome, reason, seq, body_digest)
