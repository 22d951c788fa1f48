"""A ledger's state as Merkle leaves, for state transfer: the leaves of one of our own
snapshots cut out on demand (SnapshotLeaves, what a replica serves), and a ledger built
back leaf by leaf from leaves each proven against a checkpoint's digest (LedgerBuilder,
what a catching-up replica does). The leaf layout itself is the ledger's (pbft/ledger.py,
Ledger.leaf); this module only reads and writes it a range at a time.

Part of the sans-I/O protocol core: no I/O, clock or randomness.
"""

from __future__ import annotations

from typing import Any

import msgpack

from pbft.holds import MAX_TIME_MS, RECORD_TAGS, LedgerLimits, RecordError, Records
from pbft.ledger import (
    _MAX_SNAPSHOT_STR_SIZE_BYTES,
    BODY_DIGEST_SIZE_BYTES,
    MAX_AMOUNT,
    MAX_ID,
    MAX_SNAPSHOT_SIZE_BYTES,
    MAX_TOTAL,
    SNAPSHOT_FORMAT_VERSION,
    GeneratedAccounts,
    Ledger,
    LedgerSnapshotError,
    _ClientRecord,
    _genesis_from_rule,
    _is_int,
    _snapshot_client,
    _snapshot_int,
    _validate_account_name,
)

# Every leaf of the digest's Merkle tree is a msgpack array tagged with its kind (the
# layout Ledger.leaf writes).
_LEAF_TAGS = {"header": 8, "account": 5, "client": 4, **RECORD_TAGS}


class SnapshotLeaves:
    """The digest's leaves of one of our own snapshots, encoded on demand.

    State transfer serves a checkpoint's leaves a range at a time; holding them all as
    separate objects would cost several times the snapshot. This restores the snapshot to a
    ledger (without its Merkle tree: a generated genesis stays a rule and the balances that
    changed) and encodes each leaf when it is asked for. Only for snapshots we produced
    ourselves, though they are checked all the same.
    """

    def __init__(self, snapshot: bytes) -> None:
        self._ledger = Ledger.restore(snapshot)

    def __len__(self) -> int:
        return self._ledger.leaf_count()

    def leaf(self, index: int) -> bytes:
        return self._ledger.leaf(index)

    def leaves(self, start: int, stop: int) -> list[bytes]:
        return self._ledger.leaves(start, stop)

    def node_path(self, level: int, index: int) -> list[bytes]:
        """Audit path of node `index` of tree level `level` to the digest: the tree is
        built on first use from the genesis tree and what changed, not from every leaf."""
        return self._ledger.merkle_tree().node_path(level, index)


class LedgerBuilder:
    """Rebuilds a ledger from its digest's leaves, fed in order a range at a time.

    The leaves come from peers during state transfer (each range proven against the digest
    first, but checked here all the same): anything that is not the canonical leaf a valid
    ledger would have at that place raises LedgerSnapshotError. Holds only the tables being
    built, never the leaves.
    """

    def __init__(self) -> None:
        self.next_index = 0
        self._header: tuple[int, int, int] | None = None  # dedup_window, initial_total, count
        self._genesis: GeneratedAccounts | None = None
        self._limits = LedgerLimits()
        self._batch_time_ms = 0
        self._records: Records | None = None  # from the first record leaf on
        self._account_count = 0
        self._balances: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._owners: dict[str, int] = {}
        self._total = 0
        self._previous_name: str | None = None
        self._clients: dict[int, _ClientRecord] = {}
        self._previous_client_id = -1
        self._retained = 0

    def add(self, leaf: bytes) -> None:
        if not isinstance(leaf, bytes) or len(leaf) > MAX_SNAPSHOT_SIZE_BYTES:
            raise LedgerSnapshotError("a leaf must be bytes within the snapshot size limit")
        try:
            fields = msgpack.unpackb(
                leaf,
                raw=False,
                use_list=True,
                strict_map_key=True,
                max_str_len=_MAX_SNAPSHOT_STR_SIZE_BYTES,
                max_bin_len=BODY_DIGEST_SIZE_BYTES,
                max_array_len=len(leaf),
                max_map_len=0,
                max_ext_len=0,
            )
        except Exception as error:  # the C decoder's failures on hostile bytes vary
            raise LedgerSnapshotError(f"undecodable leaf {self.next_index}: {error}") from error
        if not isinstance(fields, list) or not fields or _LEAF_TAGS.get(fields[0]) != len(fields):
            raise LedgerSnapshotError(f"leaf {self.next_index} is not a tagged leaf")
        if msgpack.packb(fields, use_bin_type=True) != leaf:
            raise LedgerSnapshotError(f"leaf {self.next_index} is not canonically encoded")
        tag = fields[0]
        if (tag == "header") != (self.next_index == 0):
            raise LedgerSnapshotError(f"leaf {self.next_index}: {tag} out of place")
        if tag == "header":
            self._add_header(fields[1:])
        elif tag == "account":
            self._add_account(fields[1:])
        elif tag == "client":
            self._add_client(fields[1:])
        else:
            self._add_record(fields)
        self.next_index += 1

    def _add_header(self, fields: list[Any]) -> None:
        version, dedup_window, initial_total, executed_count, rule, limits, batch_time = fields
        if version != SNAPSHOT_FORMAT_VERSION or not _is_int(version):
            raise LedgerSnapshotError(f"unsupported snapshot version {version!r}")
        self._header = (
            _snapshot_int(dedup_window, "dedup_window", low=1, high=MAX_ID),
            _snapshot_int(initial_total, "initial_total", low=0, high=MAX_TOTAL),
            _snapshot_int(executed_count, "executed_count", low=0, high=MAX_ID),
        )
        self._genesis = _genesis_from_rule(rule)
        try:
            self._limits = LedgerLimits.from_row(limits)
        except RecordError as error:
            raise LedgerSnapshotError(str(error)) from None
        self._batch_time_ms = _snapshot_int(batch_time, "batch_time_ms", low=0, high=MAX_TIME_MS)

    def _add_account(self, fields: list[Any]) -> None:
        name, owner, balance, held = fields
        if self._clients or self._previous_client_id >= 0 or self._records is not None:
            raise LedgerSnapshotError(f"account {name!r} after the clients")
        if not isinstance(name, str):
            raise LedgerSnapshotError(f"account name must be str, got {name!r}")
        owner = _snapshot_int(owner, f"owner of {name!r}", low=0, high=MAX_ID)
        balance = _snapshot_int(balance, f"balance of {name!r}", low=0, high=MAX_AMOUNT)
        held = _snapshot_int(held, f"held of {name!r}", low=0, high=MAX_AMOUNT)
        if held:
            self._held[name] = held
        genesis = self._genesis
        if genesis is not None:
            # The rule fixes every account's name and owner at its place.
            index = self._account_count
            if index >= genesis.count:
                raise LedgerSnapshotError(f"more than the rule's {genesis.count} accounts")
            if name != genesis.name(index) or owner != genesis.owner(index):
                raise LedgerSnapshotError(f"account {name!r} is not the rule's account {index}")
            if balance != genesis.balance:
                self._balances[name] = balance
        else:
            try:
                _validate_account_name(name)
            except ValueError as error:
                raise LedgerSnapshotError(str(error)) from None
            if self._previous_name is not None and name <= self._previous_name:
                raise LedgerSnapshotError(f"accounts unsorted or duplicated at {name!r}")
            self._previous_name = name
            self._owners[name] = owner
            self._balances[name] = balance
        self._account_count += 1
        self._total += balance + held
        if self._total > MAX_TOTAL:
            raise LedgerSnapshotError(f"balances sum beyond {MAX_TOTAL}")

    def _add_client(self, fields: list[Any]) -> None:
        if self._header is None:
            raise LedgerSnapshotError("client leaf before the header")
        if self._records is not None:
            raise LedgerSnapshotError("client leaf after the records")
        self._check_account_count()
        client_id, record = _snapshot_client(fields, self._header[0])
        if client_id <= self._previous_client_id:
            raise LedgerSnapshotError(f"clients unsorted or duplicated at {client_id}")
        self._previous_client_id = client_id
        self._retained += len(record.decisions)
        self._clients[client_id] = record

    def _add_record(self, fields: list[Any]) -> None:
        if self._header is None:
            raise LedgerSnapshotError("record leaf before the header")
        self._check_account_count()
        if self._records is None:
            self._records = Records(self._limits)
        try:
            self._records.load_leaf(
                len(self._records), fields, self._batch_time_ms, len(self._clients)
            )
        except RecordError as error:
            raise LedgerSnapshotError(f"leaf {self.next_index}: {error}") from None

    def _check_account_count(self) -> None:
        if self._genesis is not None and self._account_count != self._genesis.count:
            raise LedgerSnapshotError(
                f"{self._account_count} accounts, the rule has {self._genesis.count}"
            )

    def finish(self) -> Ledger:
        """The ledger the leaves describe, once all of them have been added."""
        if self._header is None:
            raise LedgerSnapshotError("no header leaf")
        dedup_window, initial_total, executed_count = self._header
        self._check_account_count()
        records = self._records if self._records is not None else Records(self._limits)
        try:
            records.finish_loading()
        except RecordError as error:
            raise LedgerSnapshotError(str(error)) from None
        opened = records.opened.values()
        total = self._total + sum(account.available + account.held for account in opened)
        if total != initial_total:
            raise LedgerSnapshotError(
                f"balances sum to {total}, initial_total says {initial_total}"
            )
        if executed_count < self._retained:
            raise LedgerSnapshotError(
                f"executed_count {executed_count} < {self._retained} retained decisions"
            )
        ledger = Ledger.__new__(Ledger)
        ledger._assemble(
            self._genesis, self._balances, self._owners, dedup_window, initial_total, self._limits
        )
        ledger._held = self._held
        ledger._records = records
        ledger._batch_time_ms = self._batch_time_ms
        ledger._check_records()
        ledger._clients = self._clients
        ledger._client_order = list(self._clients)  # added in id order
        ledger._executed_count = executed_count
        return ledger
