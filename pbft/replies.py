"""Replies: one signature per executed batch, and what a replica keeps for replays.

- `sign_replies`: a replica signs, once per executed batch, the RFC 6962 Merkle root of the
  batch's results (one leaf per request, see `reply_leaf`), together with the cluster id,
  its replica id, its view, the batch's sequence number and size (`root_statement`). Each
  client's REPLY carries its own result, that signature and the result's inclusion proof.
- `check_reply`: the client's (and a receipt verifier's) check of a REPLY: the proof, its
  length bounded before any hashing, then the root's signature through a verification
  cache, so a root is verified once however many of a client's replies it answers.
- `SignedReplies`: the REPLY for each decided (client, request id, body digest), kept and
  sent again on a retransmission, never signed anew (issue 8, point 4). A replayed request
  costs a lookup, not an Ed25519 signature. Bounded: the oldest entries go first; an
  evicted reply is signed again once (as a batch of one), and kept again.
The replica pays for replays and relays from a token bucket per client (pbft/budget.py).

Time comes from the replica's driver clock (`now_ms`), never from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crypto.keys import KeyRing, SigningKey
from crypto.merkle import MerkleProof, leaf_hash, level_up, verify_inclusion
from crypto.signing import VerificationCache
from pbft.codec import pack
from pbft.config import MAX_BATCH_SIZE
from pbft.drops import DropReason
from pbft.history import RequestRecord
from pbft.ledger import Decision
from pbft.messages import MAX_REPLY_PATH, MessageType, Reply
from pbft.signed import PROTOCOL_VERSION, Envelope, Rejected

# The signature domain of a batch's root. The hyphen keeps it apart from every message
# type's domain (pbft.signed.domain_of uses the type's name, which has none).
REPLY_ROOT_DOMAIN = b"pbft/v1/reply-root"
# The first element of every leaf: a reply leaf cannot be read as any other packed record.
REPLY_LEAF_TAG = "pbft/reply-leaf/v1"

# About 450 bytes per reply (a batch of 64 carries a 6-hash proof): 65,536 replies are
# about 30 MiB.
SIGNED_REPLIES_LIMIT = 65_536


@dataclass(frozen=True)
class ReplyResult:
    """One executed request's result: what a reply's leaf binds besides the cluster id."""

    client_id: int
    request_id: int
    request_digest: bytes
    seq: int
    outcome: str
    reason: str

    @classmethod
    def of(
        cls, client_id: int, request_id: int, request_digest: bytes, decision: Decision
    ) -> ReplyResult:
        """The result a reply carries for a request the ledger decided."""
        return cls(
            client_id,
            request_id,
            request_digest,
            decision.seq,
            decision.outcome.value,
            decision.reason.value,
        )

    @classmethod
    def of_record(cls, record: RequestRecord) -> ReplyResult:
        """The result a reply carries for a request as its history record keeps it."""
        return cls(
            record.client_id,
            record.request_id,
            record.request_digest,
            record.seq,
            record.outcome,
            record.reason,
        )


def reply_leaf(cluster_id: bytes, result: ReplyResult) -> bytes:
    return pack(
        [
            REPLY_LEAF_TAG,
            cluster_id,
            result.seq,
            result.client_id,
            result.request_id,
            result.request_digest,
            result.outcome,
            result.reason,
        ]
    )


def root_statement(
    cluster_id: bytes, replica: int, view: int, batch_seq: int, batch_size: int, root: bytes
) -> bytes:
    """What a replica signs for a batch: the bytes under the shared signature."""
    return pack([cluster_id, replica, view, batch_seq, batch_size, root])


def result_of(reply: Reply) -> ReplyResult:
    return ReplyResult(
        reply.client_id,
        reply.request_id,
        reply.request_digest,
        reply.seq,
        reply.outcome,
        reply.reason,
    )


def _tree(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the RFC 6962 tree over `leaves`, leaf hashes first, the root last:
    built once, so each of the batch's proofs costs O(log n), not a rebuild."""
    levels = [[leaf_hash(leaf) for leaf in leaves]]
    while len(levels[-1]) > 1:
        levels.append(level_up(levels[-1], 1))
    return levels


def _path(levels: list[list[bytes]], index: int) -> tuple[bytes, ...]:
    """The audit path of leaf `index`, bottom-up (as crypto.merkle.inclusion_proof)."""
    path = []
    position = index
    for level in levels[:-1]:
        sibling = position ^ 1
        # The last node of an odd level has no sibling: it moves up without a path entry.
        if sibling < len(level):
            path.append(level[sibling])
        position //= 2
    return tuple(path)


def sign_replies(
    key: SigningKey,
    replica: int,
    view: int,
    batch_seq: int,
    cluster_id: bytes,
    results: Sequence[ReplyResult],
) -> list[bytes]:
    """The REPLY frames of a batch's results, in order, under one signature."""
    if not 1 <= len(results) <= MAX_BATCH_SIZE:
        raise ValueError(f"a batch holds 1..{MAX_BATCH_SIZE} results, got {len(results)}")
    levels = _tree([reply_leaf(cluster_id, result) for result in results])
    root = levels[-1][0]
    size = len(results)
    signature = key.sign(
        REPLY_ROOT_DOMAIN, root_statement(cluster_id, replica, view, batch_seq, size, root)
    )
    # The results come from this replica's own execution of decoded requests, so they fit
    # the schema; the first reply is built as a checked Reply (a bug fails loudly there) and
    # the rest are packed straight to the same canonical bytes, which is most of the cost
    # of a batch after its one signature (tests compare the two encodings).
    first = results[0]
    Reply(
        view,
        first.seq,
        replica,
        first.client_id,
        first.request_id,
        first.request_digest,
        first.outcome,
        first.reason,
        cluster_id,
        batch_seq,
        size,
        0,
        _path(levels, 0),
        root,
    )
    reply_type = int(MessageType.REPLY)
    frames = []
    for index, result in enumerate(results):
        body = pack(
            [
                view,
                result.seq,
                replica,
                result.client_id,
                result.request_id,
                result.request_digest,
                result.outcome,
                result.reason,
                cluster_id,
                batch_seq,
                size,
                index,
                list(_path(levels, index)),
                root,
            ]
        )
        frames.append(pack([PROTOCOL_VERSION, reply_type, replica, body, signature]))
    return frames


def check_reply(
    envelope: Envelope, reply: Reply, keyring: KeyRing, cache: VerificationCache
) -> None:
    """Raise Rejected unless `reply`'s result is under its root and the root is signed by
    the replica it names. The proof first (a few hashes), then the signature (cached: a
    root shared by several replies is verified once while the cache holds it)."""
    size = reply.batch_size
    # The decoder bounds the path already; a verifier handed a Reply built some other way
    # must not hash an unbounded list either.
    if len(reply.path) > MAX_REPLY_PATH or not 0 <= reply.index < size <= MAX_BATCH_SIZE:
        raise Rejected(DropReason.BAD_REPLY_PROOF, f"index {reply.index} of {size}")
    if len(reply.path) != _height(reply.index, size):
        raise Rejected(
            DropReason.BAD_REPLY_PROOF, f"{len(reply.path)} proof nodes for a tree of {size}"
        )
    proof = MerkleProof(reply.index, size, reply.path)
    if not verify_inclusion(reply.root, reply_leaf(reply.cluster_id, result_of(reply)), proof):
        raise Rejected(DropReason.BAD_REPLY_PROOF, "result not under its root")
    verify_key = keyring.get(("replica", envelope.sender))
    if verify_key is None:
        raise Rejected(DropReason.UNKNOWN_SENDER, f"replica {envelope.sender}")
    statement = root_statement(
        reply.cluster_id, reply.replica, reply.view, reply.batch_seq, size, reply.root
    )
    if not cache.verify(verify_key, REPLY_ROOT_DOMAIN, statement, envelope.signature):
        raise Rejected(DropReason.BAD_SIGNATURE, f"REPLY root from replica {envelope.sender}")


def _height(index: int, size: int) -> int:
    """How many siblings leaf `index` has on its way up a tree of `size` leaves."""
    height = 0
    position, last = index, size - 1
    while last > 0:
        if position ^ 1 <= last:
            height += 1
        position //= 2
        last //= 2
    return height


class SignedReplies:
    def __init__(self, limit: int = SIGNED_REPLIES_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._replies: dict[tuple[int, int, bytes], bytes] = {}
        self.hits = 0

    def get(self, client_id: int, request_id: int, body_digest: bytes) -> bytes | None:
        raw = self._replies.get((client_id, request_id, body_digest))
        if raw is not None:
            self.hits += 1
        return raw

    def put(self, client_id: int, request_id: int, body_digest: bytes, raw: bytes) -> None:
        key = (client_id, request_id, body_digest)
        if key in self._replies:
            return
        while len(self._replies) >= self.limit:
            del self._replies[next(iter(self._replies))]
        self._replies[key] = raw

    def __len__(self) -> int:
        return len(self._replies)
