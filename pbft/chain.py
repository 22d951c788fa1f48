"""The hash-chained log: how batches and log entries are digested.

Each entry's digest covers its sequence number, the previous entry's digest, its
batch digest and the batch timestamp the primary proposed, so agreeing on one entry
digest is agreeing on the whole history before it, times included (Raft's log
matching, Tangaroa's incremental hash). Prepares and commits vote on entry digests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from crypto.merkle import merkle_root

ENTRY_TAG = b"pbft/entry/v2"
GENESIS_TAG = b"pbft/genesis/v1"


def batch_digest(request_envelopes: Sequence[bytes]) -> bytes:
    """Merkle root over the signed request envelopes in batch order; empty is a null batch."""
    return merkle_root(list(request_envelopes))


def entry_digest(seq: int, prev_hash: bytes, batch: bytes, timestamp_ms: int) -> bytes:
    return hashlib.sha256(
        ENTRY_TAG + seq.to_bytes(8, "big") + prev_hash + batch + timestamp_ms.to_bytes(8, "big")
    ).digest()


def genesis_hash(genesis_ledger_digest: bytes) -> bytes:
    """The chain hash at sequence 0: clusters with different genesis ledgers never share a chain."""
    return hashlib.sha256(GENESIS_TAG + genesis_ledger_digest).digest()
