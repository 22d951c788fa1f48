"""ClientCore(view=None): a fresh client learns the view from f + 1 signed replies instead of
assuming view 0; and the client refuses, with ClientError, what cannot go on the wire."""

from __future__ import annotations

import pytest

from crypto.keys import KeyRing, SigningKey
from crypto.signing import VerificationCache
from pbft.client import ClientCore, ClientError, Decided
from pbft.config import ClusterConfig
from pbft.events import MessageReceived, Send
from pbft.messages import Request
from pbft.replies import ReplyResult, sign_replies
from pbft.signed import open_envelope

SEED = 11
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{i}") for i in range(4)]
CLIENT_ID = 3
CLIENT_KEY = SigningKey.derive(SEED, f"client/{CLIENT_ID}")
KEYRING = KeyRing(
    {("replica", i): key.verify_key for i, key in enumerate(REPLICA_KEYS)}
    | {("client", CLIENT_ID): CLIENT_KEY.verify_key}
)
CONFIG = ClusterConfig(replica_count=4, client_timeout_ms=400)
CLUSTER_ID = bytes(range(32))
ALL_REPLICAS = [("replica", i) for i in range(4)]


def _client(view: int | None) -> ClientCore:
    return ClientCore(CLIENT_ID, CONFIG, CLIENT_KEY, KEYRING, cluster_id=CLUSTER_ID, view=view)


def _destinations(actions: list[object]) -> list[object]:
    return [action.to for action in actions if isinstance(action, Send)]


def _reply(request_raw: bytes, replica: int, view: int, seq: int = 7) -> bytes:
    request = open_envelope(request_raw, KEYRING, VerificationCache(), Request)
    message = request.message
    assert isinstance(message, Request)
    result = ReplyResult(CLIENT_ID, message.request_id, request.body_digest, seq, "confirmed", "")
    (raw,) = sign_replies(REPLICA_KEYS[replica], replica, view, seq, CLUSTER_ID, [result])
    return raw


def _request_raw(actions: list[object]) -> bytes:
    sends = [action for action in actions if isinstance(action, Send)]
    return sends[0].data


def test_a_client_that_assumes_view_0_sends_to_replica_0_only() -> None:
    client = _client(0)
    assert _destinations(list(client.submit(1, "a", "b", 5))) == [("replica", 0)]


def test_a_fresh_client_sends_its_first_request_to_every_replica() -> None:
    client = _client(None)
    assert _destinations(list(client.submit(1, "a", "b", 5))) == ALL_REPLICAS
    # Still unknown while no reply came: the next one goes to everyone too.
    assert _destinations(list(client.submit(2, "a", "b", 5))) == ALL_REPLICAS


def test_f_plus_1_signed_replies_teach_the_view_and_later_requests_go_to_its_primary() -> None:
    client = _client(None)
    raw = _request_raw(list(client.submit(1, "a", "b", 5)))
    assert client.handle(MessageReceived(_reply(raw, 1, view=2))) == []
    assert not client.view_known  # one replica's word is not enough
    decided = client.handle(MessageReceived(_reply(raw, 3, view=2)))
    assert [type(action) for action in decided] == [Decided]
    assert client.view_known and client.view == 2
    assert _destinations(list(client.submit(2, "a", "b", 5))) == [("replica", 2)]


def test_view_claims_count_before_the_request_is_decided() -> None:
    """Replies that do not match (different seqs) still carry views: f + 1 of them suffice."""
    client = _client(None)
    raw = _request_raw(list(client.submit(1, "a", "b", 5)))
    assert client.handle(MessageReceived(_reply(raw, 1, view=1, seq=7))) == []
    assert client.handle(MessageReceived(_reply(raw, 2, view=1, seq=8))) == []
    assert client.view_known and client.view == 1


def test_one_byzantine_replica_cannot_pull_a_fresh_client_to_a_far_view() -> None:
    client = _client(None)
    raw = _request_raw(list(client.submit(1, "a", "b", 5)))
    client.handle(MessageReceived(_reply(raw, 3, view=1000)))
    client.handle(MessageReceived(_reply(raw, 1, view=1)))
    # f + 1 = 2 claims: {1000, 1}; only view 1 is vouched for by a correct replica.
    assert client.view == 1


@pytest.mark.parametrize(
    ("request_id", "payer", "payee", "amount", "says"),
    [
        (-1, "a", "b", 5, "request id"),
        (2**64, "a", "b", 5, "request id"),
        (1, "x" * 5000, "b", 5, "payer account name must be 1..64 characters, got 5000"),
        (1, "a", "", 5, "payee account name"),
        (1, "a", "b", -5, "amount"),
        (1, "a", "b", 2**64, "amount"),
    ],
)
def test_what_cannot_go_on_the_wire_is_a_client_error(
    request_id: int, payer: str, payee: str, amount: int, says: str
) -> None:
    client = _client(None)
    with pytest.raises(ClientError, match=says):
        client.submit(request_id, payer, payee, amount)
    assert not client.outstanding
    with pytest.raises(ClientError, match="account name"):
        client.query_balance(1, "y" * 65)
