"""Tests for sim.byzantine's replica behaviours: each rewrite on hand-built messages, the
[at_ms, until_ms) window, the scenario fields that configure them, and that every behaviour
has a shipped scenario (tests/test_simulator.py runs every shipped scenario)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.certificates import Verifier
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.config import ClusterConfig
from pbft.messages import (
    Commit,
    Heartbeat,
    Message,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
)
from pbft.signed import Rejected, open_envelope, seal
from pbft.viewchange import verify_view_change
from sim import byzantine
from sim.byzantine import (
    Adversary,
    Behavior,
    Garbage,
    Replay,
    Slow,
    ViewChangeSpam,
    build_behavior,
)
from sim.scenario import BEHAVIORS, ByzantineSpec, ScenarioError, load_scenario, parse_scenario
from sim.simulator import Simulation

SEED = 77
CONFIG = ClusterConfig()
REPLICA_KEYS = [SigningKey.derive(SEED, f"replica/{replica}") for replica in range(4)]
CLIENT_KEYS = [SigningKey.derive(SEED, f"client/{client}") for client in range(3)]
KEYRING = KeyRing()
for _replica, _key in enumerate(REPLICA_KEYS):
    KEYRING.add(("replica", _replica), _key.verify_key)
for _client, _key in enumerate(CLIENT_KEYS):
    KEYRING.add(("client", _client), _key.verify_key)
GENESIS_LEDGER = hashlib.sha256(b"test genesis ledger").digest()
GENESIS_CHAIN = genesis_hash(GENESIS_LEDGER)
VERIFIER = Verifier(CONFIG, KEYRING, GENESIS_LEDGER, VerificationCache())
REPLICAS: list[Principal] = [("replica", replica) for replica in range(4)]
ROOT = Path(__file__).resolve().parent.parent


def behavior(name: str, replica: int = 0, **kwargs: object) -> Behavior:
    params = kwargs.pop("params", None)
    return build_behavior(
        name,
        replica,
        REPLICA_KEYS[replica],
        Adversary.for_cluster(4, frozenset({replica})),
        config=CONFIG,
        params=params,  # type: ignore[arg-type]
        genesis_ledger_digest=GENESIS_LEDGER,
        **kwargs,  # type: ignore[arg-type]
    )


def request(client: int, request_id: int) -> bytes:
    payment = Request(client, request_id, f"acct-{client}", "acct-9", 10 + request_id)
    return seal(payment, CLIENT_KEYS[client])


def pre_prepare(seq: int, prev_hash: bytes, requests: tuple[bytes, ...], view: int = 0) -> bytes:
    primary = CONFIG.primary_of(view)
    message = PrePrepare(view, seq, primary, prev_hash, batch_digest(requests), requests)
    return seal(message, REPLICA_KEYS[primary])


def opened(raw: bytes) -> Message:
    """Open as any receiver would: form and signature."""
    return open_envelope(raw, KEYRING, VerificationCache()).message


def entry_of(raw: bytes) -> bytes:
    message = opened(raw)
    assert isinstance(message, PrePrepare)
    return entry_digest(message.seq, message.prev_hash, message.batch_digest)


def vote(kind: type[Prepare] | type[Commit], replica: int, seq: int, digest: bytes) -> bytes:
    return seal(kind(0, seq, replica, digest), REPLICA_KEYS[replica])


def heartbeat(replica: int = 0, view: int = 0) -> bytes:
    return seal(Heartbeat(view, replica, 0, 0), REPLICA_KEYS[replica])


# --- registry and window ------------------------------------------------------------------


def test_every_scenario_behavior_has_an_implementation() -> None:
    assert set(BEHAVIORS) == set(byzantine.BEHAVIORS)
    for name, cls in byzantine.BEHAVIORS.items():
        assert cls.name == name


def test_outside_the_window_a_behavior_sends_what_the_core_wrote() -> None:
    withhold = behavior("withhold_votes", 2, at_ms=100, until_ms=200)
    prepare = vote(Prepare, 2, 1, b"\x01" * 32)
    assert withhold.outgoing(REPLICAS[1], prepare, 99) == [prepare]
    assert withhold.outgoing(REPLICAS[1], prepare, 100) == []
    assert withhold.outgoing(REPLICAS[1], prepare, 199) == []
    assert withhold.outgoing(REPLICAS[1], prepare, 200) == [prepare]
    silent = behavior("silent", 2, at_ms=50)
    assert silent.outgoing(REPLICAS[1], prepare, 49) == [prepare]
    assert silent.outgoing(REPLICAS[1], prepare, 10**9) == []


# --- as primary ---------------------------------------------------------------------------


def test_slow_holds_pre_prepares_and_releases_them_on_a_later_send() -> None:
    slow = behavior("slow", params={"delay_ms": 100})
    assert isinstance(slow, Slow)
    proposal = pre_prepare(1, GENESIS_CHAIN, (request(0, 1),))
    beat = heartbeat()
    assert slow.outgoing(REPLICAS[1], proposal, 0) == []
    # Everything else goes out at once; a retransmission is held, not queued twice.
    assert slow.outgoing(REPLICAS[1], beat, 50) == [beat]
    assert slow.outgoing(REPLICAS[1], proposal, 60) == []
    assert slow.outgoing(REPLICAS[2], proposal, 60) == []
    # Released towards a destination on the first send to it after the delay.
    assert slow.outgoing(REPLICAS[1], beat, 100) == [proposal, beat]
    assert slow.outgoing(REPLICAS[1], beat, 150) == [beat]
    assert slow.outgoing(REPLICAS[2], beat, 130) == [proposal, beat]
    # Once its time has come, a copy goes straight out.
    assert slow.outgoing(REPLICAS[3], proposal, 120) == [proposal]


def test_slow_defaults_to_most_of_the_view_change_timeout_and_releases_after_its_window() -> None:
    assert behavior("slow").delay_ms == CONFIG.view_change_timeout_ms * 4 // 5  # type: ignore[attr-defined]
    slow = behavior("slow", until_ms=100)
    proposal = pre_prepare(1, GENESIS_CHAIN, (request(0, 1),))
    beat = heartbeat()
    assert slow.outgoing(REPLICAS[1], proposal, 90) == []
    assert slow.outgoing(REPLICAS[1], beat, 100) == [proposal, beat]
    later = pre_prepare(2, entry_of(proposal), (request(0, 2),))
    assert slow.outgoing(REPLICAS[1], later, 101) == [later]


def test_censor_cuts_one_clients_requests_and_rechains_consistently() -> None:
    censor = behavior("censor", params={"client": 1})
    first = pre_prepare(1, GENESIS_CHAIN, (request(0, 1), request(1, 1), request(2, 1)))
    sent = [censor.outgoing(destination, first, 0) for destination in REPLICAS[1:]]
    assert sent[0] == sent[1] == sent[2] and len(sent[0]) == 1
    rewritten = VERIFIER.proposal(sent[0][0])  # signed by the primary, batch digest right
    assert [request.message.sender for request in rewritten.requests] == [0, 2]
    assert rewritten.prev_hash == GENESIS_CHAIN
    # The next proposal (no censored request in it) follows the rewritten entry.
    second = pre_prepare(2, entry_of(first), (request(0, 2),))
    (chained,) = censor.outgoing(REPLICAS[1], second, 1)
    assert VERIFIER.proposal(chained).prev_hash == rewritten.entry_digest
    assert opened(chained).requests == opened(second).requests  # type: ignore[attr-defined]
    # And so do the primary's own votes.
    (commit,) = censor.outgoing(REPLICAS[1], vote(Commit, 0, 1, entry_of(first)), 2)
    assert opened(commit) == Commit(0, 1, 0, rewritten.entry_digest)
    # A batch of only the censored client's requests becomes a null batch.
    third = pre_prepare(3, entry_of(second), (request(1, 2),))
    assert VERIFIER.proposal(censor.outgoing(REPLICAS[1], third, 3)[0]).is_null


def test_censor_keeps_the_chain_it_started_after_its_window() -> None:
    censor = behavior("censor", params={"client": 1}, until_ms=10)
    first = pre_prepare(1, GENESIS_CHAIN, (request(1, 1), request(0, 1)))
    (rewritten,) = censor.outgoing(REPLICAS[1], first, 0)
    second = pre_prepare(2, entry_of(first), (request(1, 2),))
    (after,) = censor.outgoing(REPLICAS[1], second, 10)
    assert opened(after).requests == (request(1, 2),)  # type: ignore[attr-defined]
    assert VERIFIER.proposal(after).prev_hash == entry_of(rewritten)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("bad_signature", "batch_request_bad_signature"),
        ("duplicate", "batch_duplicate_request"),
    ],
)
def test_invalid_batch_proposals_are_refused_by_the_proposal_check(kind: str, reason: str) -> None:
    invalid = behavior("invalid_batch", params={"kind": kind})
    original = pre_prepare(1, GENESIS_CHAIN, (request(0, 1), request(1, 1)))
    (sent,) = invalid.outgoing(REPLICAS[1], original, 0)
    assert sent != original
    message = opened(sent)  # still signed by the primary, with a matching batch digest
    assert isinstance(message, PrePrepare)
    assert batch_digest(message.requests) == message.batch_digest
    with pytest.raises(Rejected) as caught:
        VERIFIER.proposal(sent)
    assert caught.value.reason == reason
    assert invalid.outgoing(REPLICAS[2], original, 0) == [sent]


def test_invalid_batch_unsent_re_includes_an_earlier_request() -> None:
    invalid = behavior("invalid_batch", params={"kind": "unsent"})
    first = pre_prepare(1, GENESIS_CHAIN, (request(0, 1),))
    # Nothing earlier to replay at the first sequence number.
    assert invalid.outgoing(REPLICAS[1], first, 0) == [first]
    second = pre_prepare(2, entry_of(first), (request(2, 1),))
    (sent,) = invalid.outgoing(REPLICAS[1], second, 1)
    proposal = VERIFIER.proposal(sent)  # well-formed: the backups accept it
    assert [opened.raw for opened in proposal.requests] == [request(2, 1), request(0, 1)]
    assert proposal.prev_hash == entry_of(first)


@pytest.mark.parametrize(
    ("kind", "seq", "expected"),
    [
        ("skip", 5, 6),
        ("reuse", 5, 4),
        ("reuse", 1, 1),
        ("outside_window", 5, 5 + CONFIG.watermark_window),
    ],
)
def test_bad_sequence_renumbers_pre_prepares(kind: str, seq: int, expected: int) -> None:
    renumber = behavior("bad_sequence", params={"kind": kind})
    original = pre_prepare(seq, b"\x07" * 32, (request(0, seq),))
    (sent,) = renumber.outgoing(REPLICAS[1], original, 0)
    proposal = VERIFIER.proposal(sent)
    assert proposal.seq == expected
    assert (sent == original) == (seq == expected)


def test_bad_chain_names_a_wrong_predecessor() -> None:
    bad_chain = behavior("bad_chain")
    original = pre_prepare(1, GENESIS_CHAIN, (request(0, 1),))
    (sent,) = bad_chain.outgoing(REPLICAS[1], original, 0)
    proposal = VERIFIER.proposal(sent)
    assert proposal.prev_hash != GENESIS_CHAIN
    assert proposal.batch_digest == opened(original).batch_digest  # type: ignore[attr-defined]
    beat = heartbeat()
    assert bad_chain.outgoing(REPLICAS[1], beat, 0) == [beat]


# --- as backup ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Prepare, Commit])
def test_double_vote_sends_two_digests_to_the_two_halves(
    kind: type[Prepare] | type[Commit],
) -> None:
    double = behavior("double_vote", 2)
    real = b"\x05" * 32
    raw = vote(kind, 2, 3, real)
    digests = {}
    for destination in (REPLICAS[0], REPLICAS[1], REPLICAS[3]):
        (sent,) = double.outgoing(destination, raw, 0)
        message = opened(sent)  # signed by replica 2
        assert isinstance(message, kind)
        assert (message.view, message.seq, message.replica) == (0, 3, 2)
        digests[destination[1]] = message.entry_digest
    fork_side = double.adversary.fork_side
    assert fork_side == {1, 3}
    assert digests[0] == real
    assert digests[1] == digests[3] != real
    beat = heartbeat(2)
    assert double.outgoing(REPLICAS[1], beat, 0) == [beat]


def test_vote_without_proposal_adds_votes_for_the_next_three_seqs() -> None:
    phantom = behavior("vote_without_proposal", 2)
    raw = vote(Prepare, 2, 4, b"\x05" * 32)
    sent = phantom.outgoing(REPLICAS[1], raw, 0)
    assert sent[0] == raw
    extra = [opened(message) for message in sent[1:]]
    assert sorted((type(m).__name__, m.seq) for m in extra) == sorted(  # type: ignore[attr-defined]
        (kind, seq) for kind in ("Prepare", "Commit") for seq in (5, 6, 7)
    )
    assert all(m.replica == 2 and m.entry_digest != b"\x05" * 32 for m in extra)  # type: ignore[attr-defined]
    request_raw = request(0, 1)
    assert phantom.outgoing(REPLICAS[1], request_raw, 0) == [request_raw]


def test_withhold_votes_drops_votes_only() -> None:
    withhold = behavior("withhold_votes", 2)
    assert withhold.outgoing(REPLICAS[1], vote(Prepare, 2, 1, b"\x01" * 32), 0) == []
    assert withhold.outgoing(REPLICAS[1], vote(Commit, 2, 1, b"\x01" * 32), 0) == []
    for raw in (heartbeat(2), pre_prepare(1, GENESIS_CHAIN, (request(0, 1),))):
        assert withhold.outgoing(REPLICAS[1], raw, 0) == [raw]


@pytest.mark.parametrize(
    ("outcome", "reason", "flipped"),
    [
        ("confirmed", "", ("rejected", "insufficient_funds")),
        ("rejected", "insufficient_funds", ("confirmed", "")),
        ("rejected", "unknown_account", ("confirmed", "")),
    ],
)
def test_wrong_reply_flips_the_outcome_and_signs_it(
    outcome: str, reason: str, flipped: tuple[str, str]
) -> None:
    liar = behavior("wrong_reply", 1)
    reply = Reply(0, 3, 1, 0, 7, b"\x09" * 32, outcome, reason)
    (sent,) = liar.outgoing(("client", 0), seal(reply, REPLICA_KEYS[1]), 0)
    message = opened(sent)  # verifies as signed by replica 1
    assert isinstance(message, Reply)
    assert (message.outcome, message.reason) == flipped
    assert (message.seq, message.client_id, message.request_id) == (3, 0, 7)
    beat = heartbeat(1)
    assert liar.outgoing(REPLICAS[0], beat, 0) == [beat]


# --- noise --------------------------------------------------------------------------------


def test_replay_resends_an_earlier_views_message_with_bounded_memory() -> None:
    replay = behavior("replay", 1)
    assert isinstance(replay, Replay)
    first = vote(Prepare, 1, 1, b"\x01" * 32)
    assert replay.outgoing(REPLICAS[2], first, 0) == [first]
    second = vote(Commit, 1, 1, b"\x01" * 32)
    assert replay.outgoing(REPLICAS[2], second, 1) == [second, first]
    new_view = seal(Prepare(1, 2, 1, b"\x02" * 32), REPLICA_KEYS[1])
    sent = replay.outgoing(REPLICAS[2], new_view, 2)
    assert sent[0] == new_view and opened(sent[1]).view == 0  # type: ignore[attr-defined]
    for seq in range(3, 300):
        raw = seal(Prepare(1, seq, 1, b"\x03" * 32), REPLICA_KEYS[1])
        sent = replay.outgoing(REPLICAS[2], raw, seq)
        assert len(sent) == 2 and opened(sent[1]).view == 0  # type: ignore[attr-defined]
    assert len(replay.recent) + len(replay.earlier) <= 64


def test_garbage_never_opens_and_is_deterministic() -> None:
    garbage = behavior("garbage", 2)
    again = behavior("garbage", 2)
    other = behavior("garbage", 3)
    assert isinstance(garbage, Garbage)
    raws = [vote(Prepare, 2, seq, b"\x04" * 32) for seq in range(1, 70)]
    sizes = []
    variants = set()
    for index, raw in enumerate(raws):
        sent = garbage.outgoing(REPLICAS[index % 4], raw, index)
        assert again.outgoing(REPLICAS[index % 4], raw, index) == sent
        assert sent[0] == raw and len(sent) == 2
        junk = sent[1]
        sizes.append(len(junk))
        assert 1 <= len(junk) <= 64 * 1024
        with pytest.raises(Rejected):
            open_envelope(junk, KEYRING, VerificationCache())
        other_junk = other.outgoing(REPLICAS[index % 4], raw, index)[1]
        if raw.startswith(junk):
            variants.add("truncated")
        elif len(junk) == len(raw) and junk[:-1] == raw[:-1]:
            variants.add("bad_signature")
        else:
            variants.add("random")
            # Random bytes are seeded by (replica, counter): another replica sends others.
            assert other_junk != junk
    assert variants == {"truncated", "bad_signature", "random"}
    assert max(sizes) == 64 * 1024


def test_view_change_spam_sends_valid_view_changes_at_most_every_50_ms() -> None:
    spam = behavior("view_change_spam", 2)
    assert isinstance(spam, ViewChangeSpam)
    beat = heartbeat(2)
    sent = spam.outgoing(REPLICAS[1], beat, 0)
    assert sent[0] == beat
    views = []
    for raw in sent[1:]:
        change = verify_view_change(raw, VERIFIER)  # valid: signed by 2, genesis checkpoint
        assert change.message.replica == 2 and not change.prepared
        views.append(change.message.new_view)
    assert views == [2**61, 1, 2, 3]
    assert spam.outgoing(REPLICAS[1], beat, 49) == [beat]
    assert len(spam.outgoing(REPLICAS[3], beat, 49)) == 5
    assert len(spam.outgoing(REPLICAS[1], beat, 50)) == 5
    assert spam.outgoing(("client", 0), beat, 500) == [beat]
    # It follows the view its own messages show.
    later = seal(Prepare(5, 1, 2, b"\x01" * 32), REPLICA_KEYS[2])
    views = [opened(raw).new_view for raw in spam.outgoing(REPLICAS[1], later, 100)[1:]]  # type: ignore[attr-defined]
    assert views == [2**61, 6, 7, 8]
    assert all(isinstance(opened(raw), ViewChange) for raw in spam._messages())


# --- scenario fields ----------------------------------------------------------------------

BASE = """
name = "b"
[workload]
clients = 3
"""


def entry(body: str) -> str:
    return BASE + f"\n[[byzantine]]\n{body}\n"


def test_scenario_accepts_the_behaviour_fields() -> None:
    scenario = parse_scenario(
        BASE
        + """
[[byzantine]]
replica = 0
behavior = "slow"
at_ms = 100
until_ms = 900
delay_ms = 50

[[byzantine]]
replica = 1
behavior = "censor"
client = 2

[[byzantine]]
replica = 2
behavior = "bad_sequence"
"""
    )
    slow, censor, renumber = scenario.byzantine
    assert slow == ByzantineSpec(0, "slow", at_ms=100, until_ms=900, delay_ms=50)
    assert slow.params == {"delay_ms": 50}
    assert censor.params == {"client": 2} and censor.until_ms is None and censor.at_ms == 0
    assert renumber.kind == "skip" and renumber.params == {"kind": "skip"}
    assert ByzantineSpec(3, "garbage").params == {}


def test_the_simulator_builds_behaviours_from_the_scenario() -> None:
    scenario = parse_scenario(
        entry('replica = 1\nbehavior = "censor"\nclient = 2\nat_ms = 5\nuntil_ms = 9')
    )
    simulation = Simulation(scenario)
    built = simulation.replicas[1].behavior
    assert type(built) is byzantine.Censor
    assert (built.client, built.at_ms, built.until_ms) == (2, 5, 9)
    assert built.key is simulation.replicas[1].key
    assert simulation.replicas[0].behavior is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('replica = 1\nbehavior = "slow"\ndelay = 5', "byzantine[0].delay"),
        ('replica = 1\nbehavior = "garbage"\ndelay_ms = 5', "byzantine[0].delay_ms"),
        ('replica = 1\nbehavior = "slow"\ndelay_ms = -1', "byzantine[0].delay_ms"),
        ('replica = 1\nbehavior = "slow"\ndelay_ms = "5"', "byzantine[0].delay_ms"),
        ('replica = 1\nbehavior = "slow"\nat_ms = -1', "byzantine[0].at_ms"),
        ('replica = 1\nbehavior = "slow"\nat_ms = 1.5', "byzantine[0].at_ms"),
        ('replica = 1\nbehavior = "slow"\nat_ms = 10\nuntil_ms = 10', "byzantine[0].until_ms"),
        ('replica = 1\nbehavior = "slow"\nuntil_ms = true', "byzantine[0].until_ms"),
        ('replica = 1\nbehavior = "censor"', "byzantine[0].client"),
        ('replica = 1\nbehavior = "censor"\nclient = 3', "byzantine[0].client"),
        ('replica = 1\nbehavior = "censor"\nclient = -1', "byzantine[0].client"),
        ('replica = 1\nbehavior = "censor"\nclient = true', "byzantine[0].client"),
        ('replica = 1\nbehavior = "censor"\nclient = 1\nkind = "skip"', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "invalid_batch"\nkind = "skip"', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "bad_sequence"\nkind = 1', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "bad_chain"\nclient = 1', "byzantine[0].client"),
        ('replica = 1\nbehavior = "spam"', "byzantine[0].behavior"),
    ],
)
def test_scenario_rejects_bad_behaviour_fields(body: str, field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(entry(body))
    assert caught.value.field == field


def test_every_behaviour_has_a_shipped_scenario_and_one_is_timed() -> None:
    shipped = [load_scenario(path) for path in sorted((ROOT / "scenarios").glob("*.toml"))]
    covered = {spec.behavior for scenario in shipped for spec in scenario.byzantine}
    assert covered >= set(BEHAVIORS)
    assert any(
        spec.at_ms > 0 and spec.until_ms is not None
        for scenario in shipped
        for spec in scenario.byzantine
    )
