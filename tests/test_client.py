"""Tests for pbft.client: sending, retransmission with backoff, and deciding on f + 1 replies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.client import MAX_BACKOFF_DOUBLINGS, ClientCore, ClientError, Decided
from pbft.config import ClusterConfig
from pbft.events import MessageReceived, Send, Tick
from pbft.messages import Prepare, Reply, Request
from pbft.receipt import Receipt, verify_receipt
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import Envelope, open_envelope, seal

SEED = 47
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(4)]
CLIENT_ID = 2
CLIENT_KEY = SigningKey.derive(SEED, f"client/{CLIENT_ID}")
OTHER_CLIENT_KEY = SigningKey.derive(SEED, "client/9")
KEYRING = KeyRing(
    {("replica", i): key.verify_key for i, key in enumerate(REPLICA_KEYS)}
    | {("client", CLIENT_ID): CLIENT_KEY.verify_key, ("client", 9): OTHER_CLIENT_KEY.verify_key}
)
TIMEOUT_MS = 400
CONFIG = ClusterConfig(replica_count=4, client_timeout_ms=TIMEOUT_MS)
ALL_REPLICAS = [("replica", i) for i in range(4)]
# The client takes its cluster's id as given (replicas and tools compute it from the genesis).
CLUSTER_ID = bytes(range(32))
OTHER_CLUSTER_ID = bytes(range(1, 33))


def _client(cache: VerificationCache | None = None) -> ClientCore:
    return ClientCore(CLIENT_ID, CONFIG, CLIENT_KEY, KEYRING, cache=cache, cluster_id=CLUSTER_ID)


def _submit(client: ClientCore, request_id: int = 1) -> bytes:
    actions = client.submit(request_id, "alice", "bob", 300)
    assert len(actions) == 1
    action = actions[0]
    assert isinstance(action, Send)
    return action.data


def _reply_for(
    request_raw: bytes,
    replica: int,
    *,
    view: int = 0,
    seq: int = 5,
    outcome: str = "confirmed",
    reason: str = "",
    key: SigningKey | None = None,
    request_id: int | None = None,
    client_id: int = CLIENT_ID,
    digest: bytes | None = None,
    cluster_id: bytes = CLUSTER_ID,
) -> bytes:
    opened = open_envelope(request_raw, KEYRING, VerificationCache(), Request)
    request = opened.message
    assert isinstance(request, Request)
    result = ReplyResult(
        client_id,
        request.request_id if request_id is None else request_id,
        opened.body_digest if digest is None else digest,
        seq,
        outcome,
        reason,
    )
    # The middle of a batch of three, as a replica answers when other payments share it.
    neighbours = [ReplyResult(50 + i, i, bytes([i]) * 32, seq, "confirmed", "") for i in (1, 2)]
    signer = REPLICA_KEYS[replica] if key is None else key
    return sign_replies(
        signer, replica, view, seq, cluster_id, [neighbours[0], result, neighbours[1]]
    )[1]


def _deliver(client: ClientCore, data: bytes) -> list[object]:
    return list(client.handle(MessageReceived(data)))


def _sends(actions: list[object]) -> list[Send]:
    assert all(isinstance(action, Send) for action in actions)
    return [action for action in actions if isinstance(action, Send)]


# --- sending and retransmission ----------------------------------------------------------


def test_submit_sends_a_signed_request_to_the_primary_of_its_view() -> None:
    client = _client()
    (send,) = _sends(list(client.submit(1, "alice", "bob", 300)))
    assert send.to == ("replica", 0)
    opened = open_envelope(send.data, KEYRING, VerificationCache(), Request)
    assert opened.message == Request(CLIENT_ID, 1, "transfer", "alice", "bob", 300)


def test_submit_follows_the_clients_view_to_its_primary() -> None:
    client = _client()
    client.view = 6
    assert _sends(list(client.submit(1, "alice", "bob", 300)))[0].to == ("replica", 2)


def test_no_retransmission_before_the_client_timeout() -> None:
    client = _client()
    _submit(client)
    assert client.handle(Tick(TIMEOUT_MS - 1)) == []
    assert client.statistics().retransmissions == 0


def test_after_the_timeout_the_request_goes_to_every_replica() -> None:
    client = _client()
    raw = _submit(client)
    sends = _sends(list(client.handle(Tick(TIMEOUT_MS))))
    assert [send.to for send in sends] == ALL_REPLICAS
    assert all(send.data == raw for send in sends)
    assert client.statistics().retransmissions == 1


def test_retransmissions_back_off_exponentially_up_to_a_cap() -> None:
    client = _client()
    raw = _submit(client)
    retransmitted_at: list[int] = []
    for now_ms in range(0, 20_000, 50):
        sends = _sends(list(client.handle(Tick(now_ms))))
        if sends:
            assert [send.to for send in sends] == ALL_REPLICAS
            assert {send.data for send in sends} == {raw}
            retransmitted_at.append(now_ms)
    # 400, then waits of 800, 1600, 3200, and 3200 from then on (three doublings at most).
    assert MAX_BACKOFF_DOUBLINGS == 3
    assert retransmitted_at == [400, 1200, 2800, 6000, 9200, 12400, 15600, 18800]
    assert client.statistics().retransmissions == len(retransmitted_at)


def test_timeout_counts_from_the_time_of_submission() -> None:
    client = _client()
    client.handle(Tick(1000))
    _submit(client)
    assert client.handle(Tick(1000 + TIMEOUT_MS - 1)) == []
    assert len(_sends(list(client.handle(Tick(1000 + TIMEOUT_MS))))) == 4


def test_decided_request_is_no_longer_retransmitted() -> None:
    client = _client()
    raw = _submit(client)
    _deliver(client, _reply_for(raw, 0))
    _deliver(client, _reply_for(raw, 1))
    assert client.handle(Tick(10 * TIMEOUT_MS)) == []


def test_submitting_a_request_id_already_in_flight_raises() -> None:
    client = _client()
    _submit(client, 4)
    with pytest.raises(ClientError):
        client.submit(4, "alice", "carol", 1)
    assert client.statistics().outstanding == 1


def test_request_id_may_be_reused_once_decided() -> None:
    client = _client()
    raw = _submit(client, 4)
    _deliver(client, _reply_for(raw, 0))
    _deliver(client, _reply_for(raw, 1))
    assert len(client.submit(4, "alice", "bob", 300)) == 1


def test_too_many_requests_in_flight_raises() -> None:
    client = ClientCore(
        CLIENT_ID, CONFIG, CLIENT_KEY, KEYRING, max_outstanding=2, cluster_id=CLUSTER_ID
    )
    client.submit(1, "a", "b", 1)
    client.submit(2, "a", "b", 1)
    with pytest.raises(ClientError):
        client.submit(3, "a", "b", 1)


def test_client_key_must_match_the_key_ring() -> None:
    with pytest.raises(ValueError):
        ClientCore(CLIENT_ID, CONFIG, OTHER_CLIENT_KEY, KEYRING, cluster_id=CLUSTER_ID)
    with pytest.raises(ValueError):
        ClientCore(77, CONFIG, CLIENT_KEY, KEYRING, cluster_id=CLUSTER_ID)
    with pytest.raises(ValueError, match="cluster id is 32 bytes"):
        ClientCore(CLIENT_ID, CONFIG, CLIENT_KEY, KEYRING, cluster_id=b"short")


def test_handle_rejects_what_is_not_an_event() -> None:
    with pytest.raises(TypeError):
        _client().handle("tick")  # type: ignore[arg-type]


# --- deciding ----------------------------------------------------------------------------


def test_f_plus_one_matching_replies_decide_exactly_once() -> None:
    client = _client()
    raw = _submit(client, 7)
    assert _deliver(client, _reply_for(raw, 3, outcome="rejected", reason="unknown_account")) == []
    actions = _deliver(client, _reply_for(raw, 1, outcome="rejected", reason="unknown_account"))
    assert len(actions) == 1
    decided = actions[0]
    assert isinstance(decided, Decided)
    assert (
        decided.client_id,
        decided.request_id,
        decided.outcome,
        decided.reason,
        decided.seq,
    ) == (
        CLIENT_ID,
        7,
        "rejected",
        "unknown_account",
        5,
    )
    # A third matching reply comes too late to decide again.
    assert _deliver(client, _reply_for(raw, 2, outcome="rejected", reason="unknown_account")) == []
    statistics = client.statistics()
    assert (statistics.decided, statistics.outstanding) == (1, 0)


def test_decision_carries_a_receipt_that_verifies_offline() -> None:
    client = _client()
    raw = _submit(client, 7)
    replies = [_reply_for(raw, 2, view=1), _reply_for(raw, 0, view=1)]
    _deliver(client, replies[0])
    (decided,) = _deliver(client, replies[1])
    assert isinstance(decided, Decided)
    receipt = decided.receipt
    assert isinstance(receipt, Receipt)
    assert receipt.request == raw
    assert sorted(receipt.replies) == sorted(replies)
    assert receipt.cluster_id == CLUSTER_ID
    for candidate in (receipt, receipt.encode()):
        verified = verify_receipt(candidate, KEYRING, CLUSTER_ID)
        assert (verified.request_id, verified.amount, verified.outcome, verified.seq) == (
            7,
            300,
            "confirmed",
            5,
        )
        assert sorted(verified.replicas) == [0, 2]


def test_replies_naming_another_cluster_are_dropped_and_counted() -> None:
    # Genuinely signed by this cluster's replica keys, but for another cluster (one that
    # shares the keys): they must not decide anything here, however many arrive.
    client = _client()
    raw = _submit(client)
    for replica in range(4):
        assert _deliver(client, _reply_for(raw, replica, cluster_id=OTHER_CLUSTER_ID)) == []
    statistics = client.statistics()
    assert (statistics.decided, statistics.outstanding) == (0, 1)
    assert statistics.drops == {"other_cluster": 4}
    # This cluster's own replies still decide.
    _deliver(client, _reply_for(raw, 0))
    (decided,) = _deliver(client, _reply_for(raw, 1))
    assert isinstance(decided, Decided)


def test_f_matching_replies_are_not_enough() -> None:
    client = _client()
    raw = _submit(client)
    assert _deliver(client, _reply_for(raw, 0)) == []
    # Two replies that disagree (seq) are f for each decision: still no decision.
    assert _deliver(client, _reply_for(raw, 1, seq=6)) == []
    assert client.statistics().outstanding == 1
    assert client.statistics().decided == 0


def test_the_same_reply_twice_counts_once() -> None:
    client = _client()
    raw = _submit(client)
    reply = _reply_for(raw, 0)
    assert _deliver(client, reply) == []
    assert _deliver(client, reply) == []
    assert _deliver(client, _reply_for(raw, 0, view=1)) == []
    assert client.statistics().decided == 0


def test_conflicting_reply_from_one_replica_is_dropped_and_counted() -> None:
    client = _client()
    raw = _submit(client)
    assert _deliver(client, _reply_for(raw, 0, seq=5)) == []
    assert _deliver(client, _reply_for(raw, 0, seq=6)) == []
    assert client.statistics().drops == {"conflicting_reply": 1}
    # Its first word stands and still counts; the second never does.
    assert _deliver(client, _reply_for(raw, 1, seq=6)) == []
    (decided,) = _deliver(client, _reply_for(raw, 2, seq=5))
    assert isinstance(decided, Decided)
    assert decided.seq == 5


def test_conflicting_replies_cannot_make_a_replica_count_twice() -> None:
    client = _client()
    raw = _submit(client)
    _deliver(client, _reply_for(raw, 0, outcome="confirmed"))
    _deliver(client, _reply_for(raw, 0, outcome="rejected", reason="insufficient_funds"))
    _deliver(client, _reply_for(raw, 0, outcome="rejected", reason="unknown_account"))
    assert client.statistics().drops == {"conflicting_reply": 2}
    assert client.statistics().decided == 0


def test_late_reply_is_dropped_without_a_signature_check() -> None:
    cache = VerificationCache()
    client = _client(cache)
    raw = _submit(client)
    _deliver(client, _reply_for(raw, 0))
    _deliver(client, _reply_for(raw, 1))
    misses = cache.statistics().misses
    # A reply for the decided request, and one for a request never sent, both with a
    # forged signature: dropped as late before any signature is checked.
    assert _deliver(client, _reply_for(raw, 2, key=OTHER_CLIENT_KEY)) == []
    assert _deliver(client, _reply_for(raw, 3, request_id=999, key=OTHER_CLIENT_KEY)) == []
    assert client.statistics().drops == {"late_reply": 2}
    statistics = cache.statistics()
    assert (statistics.misses, statistics.failures) == (misses, 0)


def test_forged_reply_is_dropped_as_bad_signature() -> None:
    client = _client()
    raw = _submit(client)
    assert _deliver(client, _reply_for(raw, 0, key=REPLICA_KEYS[1])) == []
    assert _deliver(client, _reply_for(raw, 1, key=CLIENT_KEY)) == []
    assert client.statistics().drops == {"bad_signature": 2}
    # The forgeries did not count: two genuine replies are still needed.
    assert _deliver(client, _reply_for(raw, 0)) == []
    assert len(_deliver(client, _reply_for(raw, 1))) == 1


def test_reply_for_another_client_is_dropped() -> None:
    client = _client()
    raw = _submit(client)
    assert _deliver(client, _reply_for(raw, 0, client_id=9)) == []
    assert client.statistics().drops == {"not_for_us": 1}


def test_reply_for_another_request_body_is_dropped() -> None:
    client = _client()
    raw = _submit(client)
    assert _deliver(client, _reply_for(raw, 0, digest=b"\x07" * 32)) == []
    assert _deliver(client, _reply_for(raw, 1, digest=b"\x07" * 32)) == []
    assert client.statistics().drops == {"reply_for_other_body": 2}
    assert client.statistics().decided == 0


def test_message_that_is_not_a_reply_is_dropped() -> None:
    client = _client()
    _submit(client)
    prepare = seal(Prepare(0, 1, 0, b"\x00" * 32), REPLICA_KEYS[0])
    assert _deliver(client, prepare) == []
    assert _deliver(client, b"\xc1garbage") == []
    assert client.statistics().drops == {"malformed_malformed": 1, "unexpected_type": 1}


def test_reply_with_tampered_body_is_dropped() -> None:
    client = _client()
    raw = _submit(client)
    envelope = Envelope.decode(_reply_for(raw, 0, outcome="confirmed"))
    original = Reply.decode(envelope.body)
    assert original.outcome == "confirmed"
    flipped = replace(original, outcome="rejected")
    tampered = Envelope(
        envelope.version, envelope.type_code, envelope.sender, flipped.encode(), envelope.signature
    ).encode()
    assert _deliver(client, tampered) == []
    # The result is no longer under the signed root: caught by hashing, no signature check.
    assert client.statistics().drops == {"bad_reply_proof": 1}


# --- the client's view -------------------------------------------------------------------


def test_client_view_follows_the_smallest_view_among_the_deciding_replies() -> None:
    client = _client()
    raw = _submit(client, 1)
    _deliver(client, _reply_for(raw, 1, view=5))
    _deliver(client, _reply_for(raw, 2, view=3))
    assert client.view == 3
    # The next request goes to the primary of view 3.
    assert _sends(list(client.submit(2, "alice", "bob", 1)))[0].to == ("replica", 3)


def test_a_single_replica_cannot_move_the_clients_view_alone() -> None:
    client = _client()
    raw = _submit(client, 1)
    # A lying replica reports a huge view; the correct one reports view 1.
    _deliver(client, _reply_for(raw, 3, view=1_000_000))
    _deliver(client, _reply_for(raw, 0, view=1))
    assert client.view == 1


def test_client_view_never_moves_backwards() -> None:
    client = _client()
    raw = _submit(client, 1)
    _deliver(client, _reply_for(raw, 1, view=4))
    _deliver(client, _reply_for(raw, 2, view=4))
    assert client.view == 4
    raw = _submit(client, 2)
    _deliver(client, _reply_for(raw, 1, view=2))
    _deliver(client, _reply_for(raw, 2, view=2))
    assert client.view == 4
