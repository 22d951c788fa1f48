"""Hostile input at one replica: malformed bytes, forged signatures, votes that break the
protocol's rules, and equivocation kept as evidence. Nothing here may raise."""

from __future__ import annotations

import msgpack
import pytest
from replica_harness import Cluster, broadcasts, executed, notes

from crypto.keys import SigningKey
from pbft.codec import pack
from pbft.context import EVIDENCE_LIMIT
from pbft.drops import DropReason
from pbft.events import MessageReceived, Note, NoteKind, Tick
from pbft.messages import Commit, Prepare, PrePrepare
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import PROTOCOL_VERSION, Envelope, seal


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


GARBAGE = [
    b"",
    b"garbage",
    b"\x00" * 100,
    b"\xff\xff\xff\xff",
    pack([]),
    pack([1, 2, 3]),
    pack([PROTOCOL_VERSION, 3, 1, b"", b"\x00" * 64]),
    pack([PROTOCOL_VERSION, 3, 1, b"\x90", b"\x00" * 63]),
    pack([PROTOCOL_VERSION, 99, 1, b"\x90", b"\x00" * 64]),
    pack([7, 3, 1, b"\x90", b"\x00" * 64]),
    pack([PROTOCOL_VERSION, 3, 1, pack(["not", "a", "prepare", 0]), b"\x00" * 64]),
    msgpack.packb([PROTOCOL_VERSION, 3, 1, b"\x90", b"\x00" * 64, "extra"]),
]


@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_bytes_are_dropped_and_counted_never_raise(cluster: Cluster, data: bytes) -> None:
    for replica_id in (0, 1):
        replica = cluster.replica(replica_id)
        actions = replica.handle(MessageReceived(data))
        assert [note.kind for note in notes(actions)] == ["drop"]
        assert sum(replica.drops.values()) == 1
        assert replica.statistics().drops == dict(replica.drops)


def test_truncated_and_bit_flipped_messages_are_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    mutations = [entry.raw[:cut] for cut in range(0, len(entry.raw), 7)]
    for position in range(0, len(entry.raw), 5):
        flipped = bytearray(entry.raw)
        flipped[position] ^= 0x40
        mutations.append(bytes(flipped))
    for data in mutations:
        actions = replica.handle(MessageReceived(data))
        assert broadcasts(actions, Prepare) == []
    assert sum(replica.drops.values()) == len(mutations)
    # The untouched message still works afterwards.
    assert len(broadcasts(cluster.deliver(replica, entry.raw), Prepare)) == 1


def test_message_signed_with_wrong_key_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)
    # Replica 2's prepare, signed with replica 3's key: not counted towards prepared.
    forged = cluster.prepare_vote(0, 1, 2, entry.digest, key=cluster.replica_keys[3])
    actions = cluster.deliver(replica, forged)
    assert broadcasts(actions, Commit) == []
    assert replica.drops["bad_signature"] == 1
    assert 2 not in replica.ordering.slots[1].prepares


def test_pre_prepare_signed_with_wrong_key_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    message = PrePrepare(
        0, 1, 0, cluster.genesis_chain_hash, cluster.pre_prepare(1).batch_digest, (), 0
    )
    forged = seal(message, cluster.replica_keys[2])
    assert broadcasts(cluster.deliver(replica, forged), Prepare) == []
    assert replica.drops["bad_signature"] == 1


def test_client_signature_cannot_stand_in_for_replica(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    forged = seal(Prepare(0, 1, 2, b"\x00" * 32), cluster.client_keys[2])
    cluster.deliver(replica, forged)
    assert replica.drops["bad_signature"] == 1


def test_envelope_naming_another_sender_than_body_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    prepare = Prepare(0, 1, 2, b"\x00" * 32)
    body = prepare.encode()
    signature = cluster.replica_keys[3].sign(b"pbft/v1/prepare", body)
    envelope = Envelope(PROTOCOL_VERSION, 3, 3, body, signature).encode()
    cluster.deliver(replica, envelope)
    assert replica.drops["sender_mismatch"] == 1


def test_message_from_unknown_replica_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    stranger = SigningKey.derive(1, "replica/9")
    cluster.deliver(replica, seal(Prepare(0, 1, 9, b"\x00" * 32), stranger))
    assert replica.drops["unknown_sender"] == 1


def test_message_claiming_to_be_from_the_replica_itself_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, cluster.prepare(1, entry))
    assert replica.drops["from_self"] == 1


def _reply(cluster: Cluster) -> bytes:
    result = ReplyResult(0, 1, b"\x00" * 32, 1, "confirmed", "")
    (raw,) = sign_replies(cluster.replica_keys[2], 2, 0, 1, cluster.cluster_id, [result])
    return raw


def test_reply_sent_to_replica_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    reply = _reply(cluster)
    cluster.deliver(replica, reply)
    assert replica.drops["unexpected_type"] == 1


def test_a_drop_note_carries_its_reason_in_a_field_of_its_own(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    actions = cluster.deliver(replica, _reply(cluster))
    drops = [action for action in actions if isinstance(action, Note)]
    assert drops == [Note(NoteKind.DROP, "unexpected_type Reply", DropReason.UNEXPECTED_TYPE)]
    # StrEnums: the same strings as before in traces, counters and logs.
    assert (drops[0].kind, drops[0].reason) == ("drop", "unexpected_type")
    assert all(type(reason) is str for reason in replica.drops)


def test_prepare_from_the_primary_is_dropped(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)
    actions = cluster.deliver(replica, cluster.prepare(0, entry))
    assert broadcasts(actions, Commit) == []
    assert replica.drops["primary_prepare"] == 1
    assert 0 not in replica.ordering.slots[1].prepares


def test_conflicting_prepares_from_one_replica_are_kept_as_evidence(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    first = cluster.prepare_vote(0, 1, 2, b"\x0a" * 32)
    second = cluster.prepare_vote(0, 1, 2, b"\x0b" * 32)
    cluster.deliver(replica, first)
    actions = cluster.deliver(replica, second)
    assert replica.evidence == [("prepare", 2, first, second)]
    assert replica.drops["conflicting_vote"] == 1
    assert [note.detail for note in notes(actions, "evidence")] == ["prepare by replica 2"]
    assert replica.statistics().evidence == 1
    # A repeat of the first is no news.
    assert cluster.deliver(replica, first) == []
    # Neither conflicting vote helps a different proposal get prepared.
    assert broadcasts(cluster.deliver(replica, entry.raw), Commit) == []


def test_conflicting_commits_from_one_replica_are_kept_as_evidence(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    first = cluster.commit_vote(0, 1, 3, b"\x0a" * 32)
    second = cluster.commit_vote(0, 1, 3, b"\x0b" * 32)
    cluster.deliver(replica, first, second)
    assert replica.evidence == [("commit", 3, first, second)]


def test_conflicting_pre_prepares_from_the_primary_are_kept_as_evidence(
    cluster: Cluster,
) -> None:
    replica = cluster.replica(1)
    first = cluster.pre_prepare(1, [cluster.request(1)])
    second = cluster.pre_prepare(1, [cluster.request(2)])
    actions = cluster.deliver(replica, first.raw)
    assert [p.entry_digest for p in broadcasts(actions, Prepare)] == [first.digest]

    actions = cluster.deliver(replica, second.raw)

    assert broadcasts(actions, Prepare) == []
    assert replica.evidence == [("pre_prepare", 0, first.raw, second.raw)]
    assert replica.drops["conflicting_pre_prepare"] == 1
    assert replica.ordering.slots[1].proposal is not None
    assert replica.ordering.slots[1].proposal.entry_digest == first.digest


def test_evidence_is_bounded(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    for seq in range(1, 9):
        for replica_id in (2, 3):
            for salt in range(EVIDENCE_LIMIT // 8):
                digest = bytes([seq, replica_id, salt]) + b"\x00" * 29
                cluster.deliver(replica, cluster.prepare_vote(0, seq, replica_id, digest))
    assert len(replica.evidence) == EVIDENCE_LIMIT


def test_votes_for_a_forged_digest_never_commit_a_real_proposal(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    cluster.deliver(replica, entry.raw)
    fake = b"\x55" * 32
    actions = cluster.deliver(
        replica,
        *(cluster.prepare_vote(0, 1, i, fake) for i in (2, 3)),
        *(cluster.commit_vote(0, 1, i, fake) for i in (0, 2, 3)),
    )
    assert executed(actions) == []
    assert broadcasts(actions, Commit) == []
    assert replica.last_executed == 0


def test_hostile_stream_never_raises_and_replica_keeps_working(cluster: Cluster) -> None:
    replica = cluster.replica(1)
    replica.handle(Tick(0))
    entry = cluster.pre_prepare(1, [cluster.request(1)])
    hostile = [
        *GARBAGE,
        cluster.pre_prepare(1, [cluster.request(1)], replica=3).raw,
        cluster.pre_prepare(500, [cluster.request(1)]).raw,
        cluster.prepare_vote(7, 1, 2, entry.digest),
        cluster.commit_vote(0, 10**6, 2, entry.digest),
        cluster.heartbeat(0, replica=2),
        cluster.fetch(2, 10**9),
    ]
    for data in hostile:
        replica.handle(MessageReceived(data))
    assert replica.halted is None
    actions = cluster.drive_commit(replica, entry)
    assert [e.seq for e in executed(actions)] == [1]
