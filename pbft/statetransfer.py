"""State transfer in chunks, and the byte budget that bounds catch-up service.

Part of the sans-I/O core: the replica calls into this module with what arrived and the
driver's clock, and builds, seals and sends the messages itself.

A stable checkpoint's ledger digest is an RFC 6962 Merkle root over the ledger's leaves
(the header, one per account, one per client: see pbft/ledger.py). Level h of that tree
holds the roots of the aligned blocks of 2**h leaves, so a block of leaves is proven by
the audit path of its root at level h. The server cuts the leaves into blocks of
`state_chunk_leaves` (a power of two) and, when a block is more bytes than
`state_chunk_bytes`, sends an aligned half of it (then a quarter, ...). Each chunk carries
the checkpoint's 2f + 1 proof, so any chunk from any replica can be checked on arrival;
the receiver asks for the next leaf it lacks, of whichever replica it trusts next.

Memory and time: the server restores its stable snapshot once (a generated genesis's
snapshot holds only the changed accounts), proves a chunk from that ledger's Merkle tree
(copy-on-write over the shared genesis tree, so nothing is O(accounts) but the leaves it
sends), and builds one chunk at a time; the receiver keeps the ledger tables
it is rebuilding, O(log n) subtree roots, and the one chunk in hand (besides the ledger it
runs on until the new one is complete).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from crypto.merkle import merkle_root, node_hash, verify_node
from pbft.drops import DropReason
from pbft.ledger import Ledger, LedgerSnapshotError
from pbft.ledger_leaves import LedgerBuilder, SnapshotLeaves
from pbft.messages import MAX_CHUNK_LEVEL, MAX_LEAF_COUNT, StateChunk

# Bytes a chunk message adds around its leaves: the proof, the path, msgpack framing.
CHUNK_OVERHEAD_BYTES = 64 * 1024
# The first chunk, sent unasked-for in answer to a FETCH (or to a stale vote), is at most
# this much: it is what a FETCH storm costs us, and a small ledger still fits in it whole.
# The receiver then asks for the rest; chunks grow back to full size as the start aligns.
OFFER_BYTES = 64 * 1024


class ChunkRejected(Exception):
    """A chunk that does not fit the transfer in progress. `reason` is a drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StateTooLarge(Exception):
    """One leaf of our own state does not fit a frame: that state cannot be sent."""


@dataclass(frozen=True)
class ChunkData:
    """One chunk of a checkpoint's leaves, before it is put into a StateChunk."""

    leaf_count: int
    start: int
    level: int
    leaves: tuple[bytes, ...]
    path: tuple[bytes, ...]


@dataclass
class _ServedCheckpoint:
    seq: int
    leaves: SnapshotLeaves


class ChunkServer:
    """Cuts our stable checkpoint's leaves into proven chunks, one request at a time."""

    def __init__(self, chunk_leaves: int, chunk_bytes: int) -> None:
        if chunk_leaves < 1 or chunk_leaves & (chunk_leaves - 1):
            raise ValueError(f"chunk_leaves must be a power of two, got {chunk_leaves}")
        self.block_level = chunk_leaves.bit_length() - 1
        self.chunk_bytes = chunk_bytes
        self._served: _ServedCheckpoint | None = None
        # The last chunk built: the same first chunk answers every FETCH, and a request
        # repeated after a timeout asks for the same chunk again.
        self._last: tuple[tuple[int, int, int], ChunkData] | None = None

    def _checkpoint(self, seq: int, snapshot: bytes) -> _ServedCheckpoint:
        served = self._served
        if served is None or served.seq != seq:
            # Once per stable checkpoint: the snapshot restored (its size, not the genesis's);
            # its tree, copy-on-write over the genesis tree, is built when first needed.
            self._served = None  # drop the old one before building the new
            served = self._served = _ServedCheckpoint(seq, SnapshotLeaves(snapshot))
        return served

    def chunk(
        self, seq: int, snapshot: bytes, start: int, frame_bytes: int, byte_limit: int = 0
    ) -> ChunkData | None:
        """The chunk of checkpoint `seq` (whose snapshot is given) that begins at leaf
        `start`, at most `byte_limit` (if set, else chunk_bytes) of leaves unless one leaf
        alone is more, or None when there is no such leaf. Raises StateTooLarge when one
        leaf alone exceeds a frame."""
        limit = min(byte_limit or self.chunk_bytes, self.chunk_bytes)
        key = (seq, start, byte_limit)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        served = self._checkpoint(seq, snapshot)
        count = len(served.leaves)
        if not 0 <= start < count:
            return None
        # The largest aligned block at `start`, halved while its leaves are more bytes than
        # the limit. Leaves are encoded only until they pass the limit, not the whole block:
        # the small chunk answering a FETCH costs a few leaves, not state_chunk_leaves.
        level = self.block_level
        while level > 0 and start % (1 << level) != 0:
            level -= 1
        encoded: list[bytes] = []
        total = 0
        for index in range(start, start + min(1 << level, count - start)):
            leaf = served.leaves.leaf(index)
            total += len(leaf)
            if encoded and total > limit:
                break  # every larger block holds these leaves too: none of them fits
            encoded.append(leaf)
        while level > 0:
            size = min(1 << level, count - start)
            if size <= len(encoded) and sum(map(len, encoded[:size])) <= limit:
                break
            level -= 1
        leaves = encoded[: min(1 << level, count - start)]
        if sum(map(len, leaves)) + CHUNK_OVERHEAD_BYTES > frame_bytes:
            raise StateTooLarge(f"leaf {start} alone exceeds a frame")
        path = served.leaves.node_path(level, start >> level)
        data = ChunkData(count, start, level, tuple(leaves), tuple(path))
        self._last = (key, data)
        return data


def chunk_proves(
    ledger_digest: bytes,
    leaf_count: int,
    start: int,
    level: int,
    leaves: Sequence[bytes],
    path: Sequence[bytes],
) -> bool:
    """True if `leaves` are the aligned block of 2**level leaves (or the short last one)
    at `start` of the tree of `leaf_count` leaves whose root is `ledger_digest`."""
    return _proven_block_root(ledger_digest, leaf_count, start, level, leaves, path) is not None


def _proven_block_root(
    ledger_digest: bytes,
    leaf_count: int,
    start: int,
    level: int,
    leaves: Sequence[bytes],
    path: Sequence[bytes],
) -> bytes | None:
    if not 0 <= level <= MAX_CHUNK_LEVEL or not 0 <= start < leaf_count <= MAX_LEAF_COUNT:
        return None
    size = 1 << level
    if start % size != 0 or len(leaves) != min(size, leaf_count - start):
        return None
    root = merkle_root(leaves)
    level_size = (leaf_count + size - 1) // size
    if not verify_node(ledger_digest, root, start >> level, level_size, path):
        return None
    return root


def _fold(subtrees: list[tuple[int, bytes]]) -> bytes:
    """The RFC 6962 root of leaves given as perfect subtrees of decreasing size, left to
    right, the last of which may be short (the tree's right edge)."""
    root = subtrees[-1][1]
    for _, left in reversed(subtrees[:-1]):
        root = node_hash(left, root)
    return root


@dataclass
class IncomingTransfer:
    """A transfer in progress towards one proven checkpoint, from one replica at a time."""

    seq: int
    chain_hash: bytes
    ledger_digest: bytes
    proof: tuple[bytes, ...]
    # The replica we asked last: chunks from anyone else are late copies or unasked for.
    source: int
    last_progress_ms: int
    leaf_count: int | None = None
    # Timeouts in a row without a chunk taken.
    stalls: int = 0
    # Who told us leaf_count. A proof binds a chunk's place only up to the tree's size, so
    # this is that replica's word until the whole state gives the digest.
    count_source: int | None = None
    builder: LedgerBuilder = field(default_factory=LedgerBuilder)
    # The roots of the leaves taken so far, as perfect subtrees of decreasing size (a
    # compact range, O(log n)): at the end they must fold to the ledger digest.
    subtrees: list[tuple[int, bytes]] = field(default_factory=list)
    # Replicas shown to have lied in this transfer: not asked again, not listened to.
    distrusted: set[int] = field(default_factory=set)

    @property
    def next_leaf(self) -> int:
        return self.builder.next_index

    def same_checkpoint(self, chunk: StateChunk) -> bool:
        return (chunk.seq, chunk.chain_hash, chunk.ledger_digest) == (
            self.seq,
            self.chain_hash,
            self.ledger_digest,
        )

    def next_source(self, peers: Sequence[int]) -> int:
        """The replica to ask next: the one after the current source, skipping liars."""
        trusted = [peer for peer in peers if peer not in self.distrusted]
        if not trusted:
            # Only possible beyond f liars, or after honest ones were blamed in conflicts.
            self.distrusted.clear()
            trusted = list(peers)
        later = [peer for peer in trusted if peer > self.source]
        self.source = (later or trusted)[0]
        return self.source

    def _restart(self) -> None:
        self.builder = LedgerBuilder()
        self.subtrees = []
        self.leaf_count = None
        self.count_source = None

    def add(self, chunk: StateChunk, now_ms: int) -> Ledger | None:
        """Take a chunk of this checkpoint; the rebuilt ledger once it was the last one.

        Raises ChunkRejected: `bad_state_chunk` and `state_chunk_conflict` mean someone
        lied (the liars are now distrusted and the transfer may have restarted), anything
        else is a late or unasked-for copy.
        """
        # From any replica not shown to lie: a chunk proves itself, and the one we asked may
        # be slow rather than gone (then both answer; the later copy is dropped here).
        if chunk.replica in self.distrusted or chunk.start != self.next_leaf:
            raise ChunkRejected(DropReason.STATE_CHUNK_UNEXPECTED, f"leaf {chunk.start}")
        block_root = _proven_block_root(
            self.ledger_digest, chunk.leaf_count, chunk.start, chunk.level, chunk.leaves, chunk.path
        )
        if block_root is None:
            self.distrusted.add(chunk.replica)
            raise ChunkRejected(DropReason.BAD_STATE_CHUNK, f"leaves from {chunk.start} disproven")
        if self.leaf_count is not None and chunk.leaf_count != self.leaf_count:
            # Both proven, two sizes: one of the two senders lied. Blame both, start over.
            self.distrusted.update((chunk.replica, self.count_source or chunk.replica))
            self._restart()
            raise ChunkRejected(DropReason.STATE_CHUNK_CONFLICT, f"{chunk.leaf_count} leaves")
        try:
            for leaf in chunk.leaves:
                self.builder.add(leaf)
        except LedgerSnapshotError as error:
            # Proven yet invalid: 2f + 1 replicas signed a broken state. Start over.
            self._restart()
            raise ChunkRejected(DropReason.BAD_STATE_CHUNK, str(error)) from None
        if self.leaf_count is None:
            self.leaf_count = chunk.leaf_count
            self.count_source = chunk.replica
        self.last_progress_ms = now_ms
        self.stalls = 0
        self.subtrees.append((chunk.level, block_root))
        # A whole aligned block joins an equal one to its left (a short one is the last).
        while (
            len(chunk.leaves) == 1 << chunk.level
            and len(self.subtrees) >= 2
            and self.subtrees[-2][0] == self.subtrees[-1][0]
        ):
            (level, left), (_, right) = self.subtrees[-2:]
            self.subtrees[-2:] = [(level + 1, node_hash(left, right))]
        if self.next_leaf < chunk.leaf_count:
            return None
        liar = self.count_source
        try:
            # Every chunk was proven, but the leaf count was only a word: the leaves taken
            # must make exactly the tree of the digest before they replace our state.
            if _fold(self.subtrees) != self.ledger_digest:
                raise LedgerSnapshotError("the leaves make another tree than the digest's")
            ledger = self.builder.finish()
        except LedgerSnapshotError as error:
            if liar is not None:
                self.distrusted.add(liar)
            self._restart()
            raise ChunkRejected(DropReason.BAD_STATE_CHUNK, str(error)) from None
        return ledger
