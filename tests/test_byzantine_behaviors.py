"""Tests for sim.adversary's replica behaviours: each rewrite on hand-built messages, the
[at_ms, until_ms) window, the scenario fields that configure them, and that every behaviour
has a shipped scenario (tests/test_simulator.py runs every shipped scenario)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from replica_harness import Cluster, broadcast_raws, broadcasts, decode, notes

from crypto.keys import KeyRing, Principal, SigningKey
from crypto.signing import VerificationCache
from pbft.certificates import Verifier
from pbft.chain import batch_digest, entry_digest, genesis_hash
from pbft.config import ClusterConfig
from pbft.messages import (
    Checkpoint,
    Commit,
    Heartbeat,
    Message,
    NewView,
    Prepare,
    PreparedCertificate,
    PrePrepare,
    Reply,
    Request,
    ViewChange,
)
from pbft.replica import Replica
from pbft.replies import ReplyResult, check_reply, sign_replies
from pbft.signed import Rejected, open_envelope, peek, seal
from pbft.status import ViewStatus
from pbft.viewchange import verify_view_change
from sim import adversary as byzantine
from sim.adversary import (
    Adversary,
    Behavior,
    Garbage,
    Replay,
    Slow,
    Twins,
    ViewChangeSpam,
    build_behavior,
)
from sim.checkers import SAFETY_CHECKS
from sim.scenario import (
    BEHAVIOR_KINDS,
    BEHAVIORS,
    CLIENT_BEHAVIORS,
    ByzantineSpec,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from sim.simulator import Simulation, run_scenario

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
    payment = Request(client, request_id, "transfer", f"acct-{client}", "acct-9", 10 + request_id)
    return seal(payment, CLIENT_KEYS[client])


def pre_prepare(seq: int, prev_hash: bytes, requests: tuple[bytes, ...], view: int = 0) -> bytes:
    primary = CONFIG.primary_of(view)
    message = PrePrepare(view, seq, primary, prev_hash, batch_digest(requests), requests, 0)
    return seal(message, REPLICA_KEYS[primary])


def opened(raw: bytes) -> Message:
    """Open as any receiver would: form and signature."""
    return open_envelope(raw, KEYRING, VerificationCache()).message


def entry_of(raw: bytes) -> bytes:
    message = opened(raw)
    assert isinstance(message, PrePrepare)
    return entry_digest(message.seq, message.prev_hash, message.batch_digest, message.timestamp_ms)


def vote(kind: type[Prepare] | type[Commit], replica: int, seq: int, digest: bytes) -> bytes:
    return seal(kind(0, seq, replica, digest), REPLICA_KEYS[replica])


def heartbeat(replica: int = 0, view: int = 0) -> bytes:
    return seal(Heartbeat(view, replica, 0, 0), REPLICA_KEYS[replica])


# --- registry and window ------------------------------------------------------------------


def test_the_registry_declares_each_behavior_consistently() -> None:
    """The scenario loader and the fuzzer take names, parameters and kinds from the
    registry; what it declares must hold together: a behaviour is registered under its own
    name, and one with kinds takes `kind` (and the other way round)."""
    registries: list[dict[str, type]] = [byzantine.BEHAVIORS, byzantine.CLIENT_BEHAVIORS]
    for registry in registries:
        for name, cls in registry.items():
            assert cls.name == name
            assert ("kind" in cls.PARAMETERS) == hasattr(cls, "KINDS"), name
            assert len(set(cls.PARAMETERS)) == len(cls.PARAMETERS), name
    assert BEHAVIORS == tuple(byzantine.BEHAVIORS)
    assert CLIENT_BEHAVIORS == tuple(byzantine.CLIENT_BEHAVIORS)
    assert BEHAVIOR_KINDS["bad_new_view"][0] == "omit_prepared"  # the default comes first


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
    result = ReplyResult(0, 7, b"\x09" * 32, 3, outcome, reason)
    honest = sign_replies(REPLICA_KEYS[1], 1, 0, 3, b"\x0c" * 32, [result, result])[0]
    (sent,) = liar.outgoing(("client", 0), honest, 0)
    envelope, message = peek(sent, Reply)
    assert isinstance(message, Reply)
    # Its proof holds and its root verifies as signed by replica 1: a lie, not garbage.
    check_reply(envelope, message, KEYRING, VerificationCache())
    assert (message.outcome, message.reason) == flipped
    assert (message.seq, message.client_id, message.request_id) == (3, 0, 7)
    assert message.cluster_id == b"\x0c" * 32  # still names (and signs) its own cluster
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
        # kinds of the new replica behaviours
        ('replica = 1\nbehavior = "lie_in_view_change"\nkind = "skip"', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "bad_new_view"\nkind = "omit"', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "forge"\nkind = "split"', "byzantine[0].kind"),
        ('replica = 1\nbehavior = "bad_checkpoint"\ngroups = [[0], [2]]', "byzantine[0].groups"),
        # twins
        ('replica = 1\nbehavior = "twin"', "byzantine[0].groups"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0]]', "byzantine[0].groups"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], [2], [3]]', "byzantine[0].groups"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], []]', "byzantine[0].groups[1]"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], [1]]', "byzantine[0].groups[1][0]"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], [0]]', "byzantine[0].groups[1][0]"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], [4]]', "byzantine[0].groups[1][0]"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], "2"]', "byzantine[0].groups[1]"),
        ('replica = 1\nbehavior = "twin"\ngroups = 2', "byzantine[0].groups"),
        ('replica = 1\nbehavior = "twin"\ngroups = [[0], [2]]\nat_ms = 5', "byzantine[0].at_ms"),
        (
            'replica = 1\nbehavior = "twin"\ngroups = [[0], [2]]\nuntil_ms = 5',
            "byzantine[0].until_ms",
        ),
        # Byzantine clients
        ('client = 3\nbehavior = "steal"', "byzantine[0].client"),
        ('client = -1\nbehavior = "steal"', "byzantine[0].client"),
        ('client = "0"\nbehavior = "steal"', "byzantine[0].client"),
        ('client = true\nbehavior = "steal"', "byzantine[0].client"),
        ('replica = 1\nclient = 0\nbehavior = "steal"', "byzantine[0].client"),
        ('replica = 1\nclient = 0\nbehavior = "silent"', "byzantine[0].client"),
        ('client = 0\nbehavior = "silent"', "byzantine[0].behavior"),
        ("client = 0", "byzantine[0].behavior"),
        ('client = 0\nbehavior = "steal"\nkind = "concurrent"', "byzantine[0].kind"),
        ('client = 0\nbehavior = "reuse_request_id"\nkind = "later"', "byzantine[0].kind"),
        ('client = 0\nbehavior = "replay"\ndelay_ms = 5', "byzantine[0].delay_ms"),
        ('client = 0\nbehavior = "replay"\ngroups = [[0], [1]]', "byzantine[0].groups"),
        ('client = 0\nbehavior = "replay"\nat_ms = 5\nuntil_ms = 5', "byzantine[0].until_ms"),
        ('client = 0\nbehavior = "replay"\nwhen = 5', "byzantine[0].when"),
        ('behavior = "replay"', "byzantine[0].replica"),
    ],
)
def test_scenario_rejects_bad_behaviour_fields(body: str, field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(entry(body))
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("bodies", "field"),
    [
        (
            ['client = 1\nbehavior = "steal"', 'client = 1\nbehavior = "replay"'],
            "byzantine[1].client",
        ),
        (
            [
                'replica = 0\nbehavior = "twin"\ngroups = [[2], [3]]',
                'replica = 1\nbehavior = "twin"\ngroups = [[0, 2], [3]]',
            ],
            "byzantine[1].groups[0][0]",
        ),
        (
            [f'replica = {replica}\nbehavior = "silent"' for replica in range(4)],
            "byzantine",
        ),
    ],
)
def test_scenario_rejects_bad_combinations_of_entries(bodies: list[str], field: str) -> None:
    text = BASE + "".join(f"\n[[byzantine]]\n{body}\n" for body in bodies)
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text)
    assert caught.value.field == field


def test_scenario_accepts_twins_and_byzantine_clients() -> None:
    scenario = parse_scenario(
        BASE
        + """
[[byzantine]]
client = 2
behavior = "reuse_request_id"

[[byzantine]]
replica = 0
behavior = "twin"
groups = [[1], [2, 3]]

[[byzantine]]
client = 0
behavior = "steal"
at_ms = 10
until_ms = 20

[[byzantine]]
replica = 1
behavior = "censor"
client = 2

[[byzantine]]
replica = 2
behavior = "bad_new_view"
kind = "split"
"""
    )
    reuse, twin, steal, censor, split = scenario.byzantine  # in the file's order
    assert reuse == ByzantineSpec(None, "reuse_request_id", client=2, kind="after_decision")
    assert reuse.is_client and reuse.params == {"kind": "after_decision"}
    assert twin == ByzantineSpec(0, "twin", groups=((1,), (2, 3)))
    assert not twin.is_client and twin.params == {}
    assert steal == ByzantineSpec(None, "steal", at_ms=10, until_ms=20, client=0)
    assert steal.params == {}
    assert censor.params == {"client": 2} and not censor.is_client
    assert split.kind == "split"
    # Three Byzantine replicas is the most for n = 4; client entries do not count.
    assert sum(not spec.is_client for spec in scenario.byzantine) == 3
    for name, kind in (("lie_in_view_change", "omit_prepared"), ("bad_new_view", "omit_prepared")):
        (spec,) = parse_scenario(entry(f'replica = 1\nbehavior = "{name}"')).byzantine
        assert spec.kind == kind


def test_the_simulator_builds_client_behaviours_from_the_scenario() -> None:
    scenario = parse_scenario(
        entry('client = 1\nbehavior = "reuse_request_id"\nkind = "concurrent"\nat_ms = 7')
    )
    simulation = Simulation(scenario)
    built = simulation.client_behaviors[1]
    assert type(built) is byzantine.ReuseRequestId
    assert (built.client_id, built.kind, built.at_ms, built.until_ms) == (1, "concurrent", 7, None)
    assert built.key is simulation.clients[1].key
    assert set(simulation.client_behaviors) == {1}
    assert all(node.behavior is None for node in simulation.replicas)
    assert simulation.observed.byzantine_clients == {1}
    assert simulation.observed.correct == frozenset(range(4))


def test_every_behaviour_has_a_shipped_scenario_and_one_is_timed() -> None:
    shipped = [load_scenario(path) for path in sorted((ROOT / "scenarios").glob("*.toml"))]
    covered = {
        spec.behavior for scenario in shipped for spec in scenario.byzantine if not spec.is_client
    }
    assert covered >= set(BEHAVIORS)
    covered_clients = {
        spec.behavior for scenario in shipped for spec in scenario.byzantine if spec.is_client
    }
    assert covered_clients >= set(CLIENT_BEHAVIORS)
    assert any(
        spec.at_ms > 0 and spec.until_ms is not None
        for scenario in shipped
        for spec in scenario.byzantine
    )


# --- view change, checkpoints, identity (against real replicas from the test harness) -----


def harness_behavior(cluster: Cluster, name: str, replica: int, **params: str) -> Behavior:
    return build_behavior(
        name,
        replica,
        cluster.replica_keys[replica],
        Adversary.for_cluster(cluster.n, frozenset({replica})),
        config=cluster.config,
        params=params,
        genesis_ledger_digest=cluster.genesis_ledger_digest,
        keyring=cluster.keyring,
    )


def harness_verifier(cluster: Cluster) -> Verifier:
    return Verifier(cluster.config, cluster.keyring, cluster.genesis_ledger_digest)


def in_view_change(cluster: Cluster, replica_id: int, new_view: int = 1) -> Replica:
    """A correct replica that gave up on view 0 (f + 1 suspicions) and awaits a NEW-VIEW."""
    replica = cluster.replica(replica_id)
    others = [other for other in range(cluster.n) if other != replica_id][: cluster.f + 1]
    cluster.deliver(replica, *(cluster.suspect(new_view - 1, other) for other in others))
    assert (replica.view, replica.status) == (new_view, ViewStatus.VIEW_CHANGE)
    return replica


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_lie_in_view_change_omit_prepared_sends_a_valid_view_change_without_certificates(
    cluster: Cluster,
) -> None:
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    second = chain.append([cluster.request(2)])
    certificates = [cluster.prepared_certificate(first), cluster.prepared_certificate(second)]
    honest = cluster.view_change(1, 3, certificates)
    liar = harness_behavior(cluster, "lie_in_view_change", 3, kind="omit_prepared")
    (sent,) = liar.outgoing(("replica", 1), honest, 0)
    change = verify_view_change(sent, harness_verifier(cluster))  # signed by 3: it verifies
    assert change.message.replica == 3 and change.prepared == {}
    # The same lie to everyone, retransmissions included; other messages untouched.
    assert liar.outgoing(("replica", 2), honest, 50) == [sent]
    beat = cluster.heartbeat(1, replica=3)
    assert liar.outgoing(("replica", 2), beat, 50) == [beat]
    # The new primary still re-proposes both entries: replica 2 reports them.
    primary = cluster.replica(1)
    actions = cluster.deliver(primary, sent, cluster.view_change(1, 2, certificates))
    (new_view,) = broadcasts(actions, NewView)
    proposals = [primary.verifier.proposal(raw) for raw in new_view.pre_prepares]
    assert [proposal.entry_digest for proposal in proposals] == [first.digest, second.digest]


def test_lie_in_view_change_stale_checkpoint_cites_the_genesis(cluster: Cluster) -> None:
    chain = cluster.chain()
    entries = [chain.append([cluster.request(seq)]) for seq in range(1, 11)]
    ledger_digest = cluster.model_ledger(entries[:4]).digest()
    proof = cluster.checkpoint_proof(4, entries[3].digest, ledger_digest, [0, 1, 2])
    checkpoint = (4, entries[3].digest, ledger_digest, proof)
    # Seq 5 fits the genesis window (0, 8]; seq 9 only the real one (4, 12].
    certificates = [
        cluster.prepared_certificate(entries[4]),
        cluster.prepared_certificate(entries[8]),
    ]
    honest = cluster.view_change(1, 3, certificates, checkpoint=checkpoint)
    liar = harness_behavior(cluster, "lie_in_view_change", 3, kind="stale_checkpoint")
    (sent,) = liar.outgoing(("replica", 1), honest, 0)
    change = verify_view_change(sent, harness_verifier(cluster))
    assert change.checkpoint.seq == 0 and change.message.checkpoint_proof == ()
    assert change.checkpoint.chain_hash == cluster.genesis_chain_hash
    assert sorted(change.prepared) == [5]
    # Already at the genesis: nothing to lie about.
    genesis = cluster.view_change(1, 3, certificates[:1])
    assert liar.outgoing(("replica", 1), genesis, 0) == [genesis]


@pytest.mark.parametrize("liar_id", [3, 0])
def test_lie_in_view_change_forged_certificate_is_refused(cluster: Cluster, liar_id: int) -> None:
    """Replica 3 forges every signature in its certificate; replica 0, the previous view's
    primary, can sign the pre-prepare, but never the backups' prepares."""
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    honest = cluster.view_change(1, liar_id, [cluster.prepared_certificate(first)])
    liar = harness_behavior(cluster, "lie_in_view_change", liar_id, kind="forge_certificate")
    (sent,) = liar.outgoing(("replica", 1), honest, 0)
    message = opened_by(cluster, sent)
    assert isinstance(message, ViewChange) and len(message.prepared) == 2
    forged = message.prepared[-1]
    pre_prepare = decode(forged.pre_prepare)
    assert isinstance(pre_prepare, PrePrepare)
    assert (pre_prepare.view, pre_prepare.seq, pre_prepare.replica) == (0, 2, 0)
    assert pre_prepare.requests == ()
    assert [decode(raw).sender for raw in forged.prepares] == [1, 2]
    verifier = harness_verifier(cluster)
    with pytest.raises(Rejected) as caught:
        verify_view_change(sent, verifier)
    assert caught.value.reason == "bad_signature"
    if liar_id == 0:
        verifier.proposal(forged.pre_prepare)  # its own signature, as that view's primary
    # A correct new primary drops it and does not count it towards the NEW-VIEW.
    primary = cluster.replica(1)
    actions = cluster.deliver(primary, sent, cluster.view_change(1, 2))
    assert primary.drops["bad_signature"] == 1
    assert broadcasts(actions, NewView) == []


def opened_by(cluster: Cluster, raw: bytes) -> Message:
    return open_envelope(raw, cluster.keyring, VerificationCache()).message


def honest_new_view(cluster: Cluster, *prepared: PreparedCertificate) -> tuple[Replica, bytes]:
    """Replica 1, primary of view 1, builds its NEW-VIEW from view changes of 2 and 3 that
    report `prepared`."""
    primary = cluster.replica(1)
    actions = cluster.deliver(
        primary, cluster.view_change(1, 2, prepared), cluster.view_change(1, 3, prepared)
    )
    (raw,) = broadcast_raws(actions, NewView)
    return primary, raw


def test_the_honest_new_view_is_installed(cluster: Cluster) -> None:
    entry = cluster.chain().append([cluster.request(1)])
    _, raw = honest_new_view(cluster, cluster.prepared_certificate(entry))
    backup = in_view_change(cluster, 2)
    cluster.deliver(backup, raw)
    assert (backup.view, backup.status) == (1, ViewStatus.NORMAL)


@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        ("omit_prepared", "re-proposal for seq 1 differs"),
        ("invent", "re-proposal for seq 2 differs"),
        ("few_view_changes", "2 view changes, need 2f + 1"),
    ],
)
def test_bad_new_view_is_refused_by_every_backup(cluster: Cluster, kind: str, detail: str) -> None:
    chain = cluster.chain()
    first = chain.append([cluster.request(1)])
    chain.append([cluster.request(2)])
    third = chain.append([cluster.request(3)])
    # Seq 2 was prepared nowhere: a null entry in the plan.
    _, raw = honest_new_view(
        cluster, cluster.prepared_certificate(first), cluster.prepared_certificate(third)
    )
    liar = harness_behavior(cluster, "bad_new_view", 1, kind=kind)
    relayed = cluster.request(7, client=1)
    assert liar.outgoing(("replica", 0), relayed, 0) == [relayed]  # it learns requests
    (sent,) = liar.outgoing(("replica", 2), raw, 0)
    assert sent != raw
    assert liar.outgoing(("replica", 3), raw, 10) == [sent]
    message = opened_by(cluster, sent)  # signed by replica 1, the view's primary
    assert isinstance(message, NewView) and message.replica == 1
    if kind == "invent":
        proposal = harness_verifier(cluster).proposal(message.pre_prepares[1])
        assert [opened.raw for opened in proposal.requests] == [relayed]
    for backup_id in (0, 2, 3):
        backup = in_view_change(cluster, backup_id)
        actions = cluster.deliver(backup, sent)
        assert backup.drops["bad_new_view"] == 1
        assert any(note.detail == f"bad_new_view {detail}" for note in notes(actions, "drop"))
        assert backup.status is ViewStatus.VIEW_CHANGE


def test_bad_new_view_invent_appends_an_entry_when_no_entry_is_null(cluster: Cluster) -> None:
    _, raw = honest_new_view(cluster)  # nothing prepared: no re-proposal at all
    liar = harness_behavior(cluster, "bad_new_view", 1, kind="invent")
    relayed = cluster.request(7, client=1)
    liar.outgoing(("replica", 0), relayed, 0)
    (sent,) = liar.outgoing(("replica", 2), raw, 0)
    message = opened_by(cluster, sent)
    assert isinstance(message, NewView) and len(message.pre_prepares) == 1
    proposal = harness_verifier(cluster).proposal(message.pre_prepares[0])
    assert proposal.seq == 1 and proposal.prev_hash == cluster.genesis_chain_hash
    backup = in_view_change(cluster, 3)
    cluster.deliver(backup, sent)
    assert backup.drops["bad_new_view"] == 1


def test_bad_new_view_split_sends_two_valid_new_views(cluster: Cluster) -> None:
    # Only the new primary prepared seq 1: its own view change is the one that reports it.
    entry = cluster.chain().append([cluster.request(1)])
    primary = cluster.replica(1)
    cluster.drive_prepared(primary, entry)
    actions = cluster.deliver(primary, cluster.view_change(1, 2), cluster.view_change(1, 3))
    (raw,) = broadcast_raws(actions, NewView)
    liar = harness_behavior(cluster, "bad_new_view", 1, kind="split")
    assert isinstance(liar, byzantine.BadNewView)
    assert liar.adversary.fork_side == {2, 3}
    assert liar.outgoing(("replica", 0), raw, 0) == [raw]
    (second,) = liar.outgoing(("replica", 2), raw, 0)
    assert liar.outgoing(("replica", 3), raw, 0) == [second] and second != raw
    first_message, second_message = opened_by(cluster, raw), opened_by(cluster, second)
    assert isinstance(first_message, NewView) and isinstance(second_message, NewView)
    assert len(first_message.pre_prepares) == 1 and second_message.pre_prepares == ()
    assert liar.split_plans_differ == 1
    # Both are valid: each side installs the one it got.
    for backup_id, new_view in ((0, raw), (2, second), (3, second)):
        backup = in_view_change(cluster, backup_id)
        cluster.deliver(backup, new_view)
        assert (backup.view, backup.status) == (1, ViewStatus.NORMAL), backup_id


def test_bad_checkpoint_signs_a_wrong_ledger_digest(cluster: Cluster) -> None:
    liar = harness_behavior(cluster, "bad_checkpoint", 2)
    digest = hashlib.sha256(b"state").digest()
    honest = cluster.checkpoint(4, 2, b"\x01" * 32, digest)
    (sent,) = liar.outgoing(("replica", 0), honest, 0)
    message = opened_by(cluster, sent)
    assert isinstance(message, Checkpoint)
    assert (message.seq, message.replica, message.chain_hash) == (4, 2, b"\x01" * 32)
    assert message.ledger_digest != digest
    assert liar.outgoing(("replica", 3), honest, 40) == [sent]
    beat = cluster.heartbeat(2, replica=2)
    assert liar.outgoing(("replica", 0), beat, 0) == [beat]


def test_forge_adds_a_copy_claiming_another_sender_that_no_receiver_accepts(
    cluster: Cluster,
) -> None:
    forger = harness_behavior(cluster, "forge", 2)
    entry = cluster.chain().append([cluster.request(1)])
    prepare = cluster.prepare(2, entry)
    victims = []
    for destination in (("replica", 1), ("replica", 1), ("replica", 0), ("client", 0)):
        original, forged = forger.outgoing(destination, prepare, 0)
        assert original == prepare
        claimed = decode(forged)
        assert isinstance(claimed, Prepare)
        assert (claimed.view, claimed.seq, claimed.entry_digest) == (0, 1, entry.digest)
        assert claimed.replica not in (2, destination[1] if destination[0] == "replica" else -1)
        victims.append(claimed.replica)
        with pytest.raises(Rejected) as caught:
            open_envelope(forged, cluster.keyring, VerificationCache())
        assert caught.value.reason == "bad_signature"
    assert victims == [0, 3, 1, 0]
    # A correct replica drops the forged copy (here: before the real vote makes it redundant).
    backup = cluster.replica(1)
    real, forged = forger.outgoing(("replica", 1), prepare, 0)
    cluster.deliver(backup, entry.raw, forged, real)
    assert backup.drops["bad_signature"] == 1
    assert backup.ordering.slots[1].prepares.keys() == {1, 2}  # its own and the real one
    # Requests it relays are the clients' words: not forged.
    request_raw = cluster.request(3)
    assert forger.outgoing(("replica", 0), request_raw, 0) == [request_raw]


# --- twins --------------------------------------------------------------------------------


def test_twins_route_each_copy_to_its_own_part_of_the_network() -> None:
    twins = Twins({0: (frozenset({1}), frozenset({2, 3}))})
    replica: Callable[[int], Principal] = lambda index: ("replica", index)  # noqa: E731
    # What the copies send.
    assert twins.receivers(replica(0), 0, replica(1)) == (0,)
    assert twins.receivers(replica(0), 0, replica(2)) == ()
    assert twins.receivers(replica(0), 1, replica(2)) == (0,)
    assert twins.receivers(replica(0), 1, replica(1)) == ()
    assert twins.receivers(replica(0), 1, ("client", 3)) == (0,)
    # What the copies get: the copy whose group holds the sender; clients reach both.
    assert twins.receivers(replica(1), 0, replica(0)) == (0,)
    assert twins.receivers(replica(3), 0, replica(0)) == (1,)
    assert twins.receivers(("client", 2), 0, replica(0)) == (0, 1)
    # Untwinned replicas and clients talk as ever.
    assert twins.receivers(replica(1), 0, replica(2)) == (0,)
    assert twins.receivers(("client", 2), 0, replica(1)) == (0,)
    # A replica in neither group hears from, and reaches, neither copy.
    partial = Twins({0: (frozenset({1}), frozenset({2}))})
    assert partial.receivers(replica(3), 0, replica(0)) == ()
    assert partial.receivers(replica(0), 1, replica(3)) == ()
    # Two twins pair up by copy.
    pair = Twins({0: (frozenset({2}), frozenset({3})), 1: (frozenset({2}), frozenset({3}))})
    assert pair.receivers(replica(0), 0, replica(1)) == (0,)
    assert pair.receivers(replica(0), 1, replica(1)) == (1,)


def test_the_simulator_runs_two_copies_of_a_twin_with_one_key() -> None:
    scenario = parse_scenario(
        BASE
        + """
[[byzantine]]
replica = 0
behavior = "twin"
groups = [[1], [2, 3]]
"""
    )
    simulation = Simulation(scenario)
    twin = simulation.twin_nodes[0]
    assert twin.key is simulation.replicas[0].key and twin.copy == 1
    assert twin.core is not simulation.replicas[0].core
    assert simulation.replicas[0].behavior is None and twin.behavior is None
    assert set(simulation.twin_nodes) == {0}
    assert simulation.observed.correct == frozenset({1, 2, 3})


def test_shipped_twin_scenario_is_safe_decides_everything_and_convicts_the_twin() -> None:
    result = run_scenario(load_scenario(ROOT / "scenarios" / "byzantine-twin.toml"))
    assert all(result.checks[name].ok for name in SAFETY_CHECKS)
    assert result.undecided == 0
    assert result.confirmed + sum(result.rejected.values()) == result.submitted
    # The copies proposed different batches at the same numbers: the correct replicas hold
    # conflicting pre-prepares signed by replica 0.
    assert result.evidence.get("replica 0", 0) > 0
    assert result.messages_dropped.get("twin_split", 0) > 0
