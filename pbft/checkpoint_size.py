"""How large a replica's stable checkpoint can grow, from the cluster's configuration alone.

A replica persists its stable checkpoint as one record (pbft/checkpoints.py, `make_stable`):
msgpack [seq, chain_hash, ledger_digest, snapshot, proof]. The snapshot (`Ledger.snapshot`)
holds every listed genesis account, or for a generated genesis its rule and the accounts
whose balance payments changed (at worst all of them; payments never create an account),
and, for every client that had a request decided, at most `dedup_window` decisions. A
request is executed only if a client key of the cluster signed it, so there are at most as
many client records as client keys. The largest snapshot therefore follows from the
genesis accounts, the number of clients and dedup_window; any client can fill its own
window and payments can change every balance, so the bound is reachable.

Issue 11's records (pbft/holds.py) each count against one client with a key: at most
max_holds_per_client holds, max_refundable_per_client refundable payments and
max_accounts_per_client opened accounts per client, each row counted at its widest (names
as long as a genesis name, or as MAX_ACCOUNT_NAME_LENGTH four-byte characters when
accounts may be opened). Their retention times only make them go sooner.

A configuration whose largest checkpoint a replica could not store or read back is refused
before any replica starts (`checkpoint_size_problem`): otherwise every replica would die at
the same checkpoint once the state grew past the limit, and again on every restart. The
runtime adds its store's value limit (runtime/cluster.py); the simulator, whose storage is
a dict, checks the core's own limits, so both refuse the same configurations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pbft.codec import MAX_LOCAL_RECORD_BYTES
from pbft.config import ClusterConfig
from pbft.holds import LIMITS_ROW_LENGTH, MAX_CLIENT_ID, HoldState, LedgerLimits
from pbft.ledger import (
    BODY_DIGEST_SIZE_BYTES,
    MAX_ACCOUNT_NAME_LENGTH,
    MAX_SNAPSHOT_SIZE_BYTES,
    Account,
    GeneratedAccounts,
    Outcome,
    Reason,
)
from pbft.messages import Checkpoint
from pbft.signed import ENVELOPE_OVERHEAD

__all__ = [
    "CheckpointSize",
    "checkpoint_record_bound",
    "checkpoint_size",
    "checkpoint_size_problem",
    "records_size_bound",
    "snapshot_size_bound",
]

_UINT = 9  # the longest msgpack unsigned (or -1) integer: marker and 8 bytes
_HASH = 2 + 32  # bin8 header and a 32-byte hash


def _uint_bytes(value: int) -> int:
    """A msgpack unsigned integer (the shortest form, as msgpack writes it)."""
    return (
        1
        if value < 128
        else 2
        if value < 2**8
        else 3
        if value < 2**16
        else 5
        if value < 2**32
        else 9
    )


def _str_bytes(length: int) -> int:
    """A msgpack str of `length` UTF-8 bytes: header and bytes."""
    if length < 32:
        return 1 + length
    return (2 if length < 2**8 else 3 if length < 2**16 else 5) + length


def _array_header(items: int) -> int:
    return 1 if items < 16 else 3 if items < 2**16 else 5


def _bin_bytes(length: int) -> int:
    return (2 if length < 2**8 else 3 if length < 2**16 else 5) + length


# One retained decision: [request_id, outcome, reason, seq, body_digest].
DECISION_BYTES = (
    1
    + _UINT
    + max(_str_bytes(len(outcome.value.encode())) for outcome in Outcome)
    + max(_str_bytes(len(reason.value.encode())) for reason in Reason)
    + _UINT
    + _bin_bytes(BODY_DIGEST_SIZE_BYTES)
)
# One account, [name, owner, available, held], without name and owner (both fixed at
# genesis); balances change, so the widest.
_ACCOUNT_FIXED_BYTES = 1 + 2 * _UINT
# After the clients: [limits, batch time, record slot count, records header].
_RECORDS_FIXED_BYTES = 1 + LIMITS_ROW_LENGTH * _UINT + 2 * _UINT + 5
# The longest name an opened account can have: UTF-8 takes up to 4 bytes a character.
_OPENED_NAME_BYTES = _str_bytes(4 * MAX_ACCOUNT_NAME_LENGTH)
_CLIENT = _uint_bytes(MAX_CLIENT_ID)


def _record_row_bytes(slot: int, name: int) -> tuple[int, int, int]:
    """The widest snapshot rows [slot, tag, ...] of a hold, a payment and an opened account,
    with slots below `slot` and encoded names of at most `name` bytes (pbft/holds.py's
    fields())."""
    slot_bytes = _uint_bytes(slot)
    state = max(_str_bytes(len(state.value)) for state in HoldState)
    # [slot, "hold", client, request, payer, payee, amount, expires_at, state, closed_at]
    hold = 1 + slot_bytes + _str_bytes(4) + _CLIENT + 4 * _UINT + 2 * name + state
    # [slot, "payment", client, request, payer, payee, amount, refunded, refundable_until]
    payment = 1 + slot_bytes + _str_bytes(7) + _CLIENT + 4 * _UINT + 2 * name
    # [slot, "opened", name, owner, available, held]
    opened = 1 + slot_bytes + _str_bytes(6) + _OPENED_NAME_BYTES + 3 * _UINT
    return hold, payment, opened


def _longest_name_bytes(accounts: Mapping[str, Account], limits: LedgerLimits) -> int:
    """The encoded size of the longest name a record can carry."""
    if limits.max_accounts_per_client:
        return _OPENED_NAME_BYTES
    if isinstance(accounts, GeneratedAccounts):
        return _str_bytes(len(accounts.name(accounts.count - 1).encode())) if accounts else 0
    return max((_str_bytes(len(name.encode())) for name in accounts), default=0)


def records_size_bound(
    accounts: Mapping[str, Account], client_count: int, limits: LedgerLimits
) -> int:
    """The most bytes issue 11's record rows can take in a snapshot (header included in
    `snapshot_size_bound`): every client at every cap, every row at its widest."""
    per_client = (
        limits.max_holds_per_client,
        limits.max_refundable_per_client if limits.refund_window_ms else 0,
        limits.max_accounts_per_client,
    )
    slots = client_count * sum(per_client)
    rows = _record_row_bytes(slots, _longest_name_bytes(accounts, limits))
    return client_count * sum(count * row for count, row in zip(per_client, rows, strict=True))


def _names_and_owners_bytes(accounts: Mapping[str, Account]) -> int:
    """The encoded names and owners of all accounts."""
    if isinstance(accounts, GeneratedAccounts):
        # One rule, one name length: no need to build a million names.
        name = _str_bytes(len(accounts.name(accounts.count - 1).encode()))
        owners = accounts.owners  # account i belongs to owners[i % len(owners)]
        full, rest = divmod(accounts.count, len(owners))
        owner_bytes = sum(
            _uint_bytes(owner) * (full + (index < rest)) for index, owner in enumerate(owners)
        )
        return accounts.count * name + owner_bytes
    return sum(
        _str_bytes(len(name.encode())) + _uint_bytes(account.owner)
        for name, account in accounts.items()
    )


def _genesis_rule_bytes(accounts: Mapping[str, Account]) -> int:
    """The snapshot's genesis field: nil, or [count, balance, prefix, min_width, [owners]]."""
    if not isinstance(accounts, GeneratedAccounts):
        return 1
    owners = _array_header(len(accounts.owners)) + sum(map(_uint_bytes, accounts.owners))
    return 1 + 3 * _UINT + _str_bytes(len(accounts.prefix.encode())) + owners


def snapshot_size_bound(
    accounts: Mapping[str, Account],
    client_count: int,
    dedup_window: int,
    limits: LedgerLimits | None = None,
) -> int:
    """The most bytes `Ledger.snapshot()` can take for this genesis, at most `client_count`
    clients, this dedup window and these record limits (None: no records at all; they are
    counted by `records_size_bound`). tests/test_checkpoint_size.py checks it against a
    ledger filled to the brim."""
    header = 1 + 1 + 3 * _UINT  # [version, dedup_window, initial_total, executed_count, ...
    header += _genesis_rule_bytes(accounts)
    accounts_bytes = (
        _array_header(len(accounts))
        + len(accounts) * _ACCOUNT_FIXED_BYTES
        + _names_and_owners_bytes(accounts)
    )
    per_client = 1 + _UINT + _UINT + _array_header(dedup_window) + dedup_window * DECISION_BYTES
    clients = _array_header(client_count) + client_count * per_client
    records = 0 if limits is None else records_size_bound(accounts, client_count, limits)
    return header + accounts_bytes + clients + _RECORDS_FIXED_BYTES + records


def checkpoint_record_bound(config: ClusterConfig, snapshot_bytes: int) -> int:
    """The most bytes of the ("checkpoint",) record around a snapshot of `snapshot_bytes`:
    seq, two hashes, the snapshot and a proof of up to n signed CHECKPOINT messages."""
    signed_checkpoint = ENVELOPE_OVERHEAD + Checkpoint.max_bytes()
    proof = _array_header(config.replica_count) + config.replica_count * _bin_bytes(
        signed_checkpoint
    )
    return 1 + _UINT + 2 * _HASH + _bin_bytes(snapshot_bytes) + proof


@dataclass(frozen=True)
class CheckpointSize:
    snapshot_bytes: int
    record_bytes: int


def checkpoint_size(
    config: ClusterConfig, accounts: Mapping[str, Account], client_count: int
) -> CheckpointSize:
    snapshot = snapshot_size_bound(
        accounts, client_count, config.dedup_window, config.ledger_limits()
    )
    return CheckpointSize(snapshot, checkpoint_record_bound(config, snapshot))


def checkpoint_size_problem(
    config: ClusterConfig,
    accounts: Mapping[str, Account],
    client_count: int,
    store_limit: int | None = None,
    remedy: str = (
        "use fewer accounts or clients, or a smaller protocol.dedup_window, "
        "max_holds_per_client or max_refundable_per_client"
    ),
) -> str | None:
    """Why a replica of this cluster could not store or restore its largest checkpoint, in
    one line ending in `remedy`, or None. `store_limit` is the driver's largest storable
    value, if it has one."""
    size = checkpoint_size(config, accounts, client_count)
    records = records_size_bound(accounts, client_count, config.ledger_limits())
    limits = [
        (size.snapshot_bytes, MAX_SNAPSHOT_SIZE_BYTES, "ledger snapshot", "a replica restores"),
        (size.record_bytes, MAX_LOCAL_RECORD_BYTES, "checkpoint record", "a replica reads back"),
    ]
    if store_limit is not None:
        limits.append((size.record_bytes, store_limit, "checkpoint record", "the store holds"))
    for needed, limit, what, who in limits:
        if needed > limit:
            return (
                f"the {what} can reach {needed:,} bytes ({len(accounts):,} accounts, "
                f"{client_count:,} clients x dedup_window {config.dedup_window:,} decisions of "
                f"up to {DECISION_BYTES} bytes, {records:,} bytes of holds, refundable "
                f"payments and opened accounts), more than the {limit:,} bytes {who}; {remedy}"
            )
    return None
