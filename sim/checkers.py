"""The checkers run at the end of every simulation, over the correct replicas only.

Each returns a `CheckResult`; a violated check lists (a bounded number of) concrete
counterexamples, so a failing run says what went wrong, not just that it did.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from crypto.keys import KeyRing
from crypto.signing import VerificationCache
from pbft.client import Decided
from pbft.events import ExecutedRequest
from pbft.receipt import ReceiptError, verify_receipt

DETAIL_LIMIT = 10
UNSTORED_REASONS = ("id_reused", "request_expired")

PaymentId = tuple[int, int]


@dataclass
class CheckResult:
    name: str
    ok: bool = True
    details: list[str] = field(default_factory=list)

    def fail(self, detail: str) -> None:
        self.ok = False
        if len(self.details) < DETAIL_LIMIT:
            self.details.append(detail)


@dataclass
class Observations:
    """What the simulator saw, per replica, for the checkers."""

    correct: frozenset[int]
    initial_total: int
    # replica -> seq -> entry digest of the batch it executed there
    executed_entries: dict[int, dict[int, bytes]] = field(default_factory=dict)
    # (replica, seq, first digest, later digest): one replica executed two batches at a seq
    self_conflicts: list[tuple[int, int, bytes, bytes]] = field(default_factory=list)
    # replica -> payment -> every execution of it (seq, record)
    executed_requests: dict[int, dict[PaymentId, list[tuple[int, ExecutedRequest]]]] = field(
        default_factory=dict
    )
    # payment -> digest of the body the client signed
    submitted: dict[PaymentId, bytes] = field(default_factory=dict)
    decided: dict[PaymentId, Decided] = field(default_factory=dict)
    # replica -> (tracked total, recounted total, smallest balance) at the end
    final_ledgers: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    # Byzantine clients: they sign requests besides the ones they submitted (another body
    # under a submitted id, a payment out of someone else's account). Signed by them, those
    # may be ordered, but must never be confirmed; `submitted` holds only the submitted ones.
    byzantine_clients: frozenset[int] = frozenset()
    # replica life -> view -> seq -> entry digest its installed NEW-VIEW assigned there
    new_view_plans: dict[int, dict[int, dict[int, bytes]]] = field(default_factory=dict)
    # (replica life, view, seq, assigned digest, prepared digest): a PREPARE in a view at a
    # sequence number that view's NEW-VIEW assigned, for another entry
    new_view_breaches: list[tuple[int, int, int, bytes, bytes]] = field(default_factory=list)


def check_agreement(observed: Observations) -> CheckResult:
    result = CheckResult("agreement")
    for replica, seq, first, later in observed.self_conflicts:
        if replica in observed.correct:
            result.fail(
                f"replica {replica} executed two batches at seq {seq}: "
                f"{first.hex()[:12]} then {later.hex()[:12]}"
            )
    by_seq: dict[int, dict[bytes, list[int]]] = {}
    for replica in sorted(observed.correct):
        for seq, digest in observed.executed_entries.get(replica, {}).items():
            by_seq.setdefault(seq, {}).setdefault(digest, []).append(replica)
    for seq in sorted(by_seq):
        if len(by_seq[seq]) > 1:
            sides = "; ".join(
                f"{digest.hex()[:12]} at {replicas}" for digest, replicas in by_seq[seq].items()
            )
            result.fail(f"seq {seq}: different batches executed: {sides}")
    outcomes: dict[PaymentId, dict[tuple[str, str, int], list[int]]] = {}
    for replica in sorted(observed.correct):
        for payment, executions in observed.executed_requests.get(replica, {}).items():
            for seq, record in executions:
                if record.fresh and record.reason not in UNSTORED_REASONS:
                    key = (record.outcome, record.reason, seq)
                    outcomes.setdefault(payment, {}).setdefault(key, []).append(replica)
    for payment in sorted(outcomes):
        if len(outcomes[payment]) > 1:
            result.fail(f"payment {payment}: different outcomes {outcomes[payment]}")
    return result


def check_validity(observed: Observations) -> CheckResult:
    """Only payments that clients signed and submitted are executed. A Byzantine client's
    other requests (signed by it, never submitted) may be ordered, but only to be rejected."""
    result = CheckResult("validity")
    for replica in sorted(observed.correct):
        for payment, executions in observed.executed_requests.get(replica, {}).items():
            for seq, record in executions:
                if observed.submitted.get(payment) == record.request_digest:
                    continue
                if payment[0] in observed.byzantine_clients:
                    if record.outcome != "rejected":
                        result.fail(
                            f"replica {replica} seq {seq}: {record.outcome} a request "
                            f"Byzantine client {payment[0]} never submitted: {payment}"
                        )
                    continue
                result.fail(f"replica {replica} seq {seq}: executed unsubmitted {payment}")
    return result


def check_integrity(observed: Observations) -> CheckResult:
    """No payment takes effect twice at any correct replica."""
    result = CheckResult("integrity")
    for replica in sorted(observed.correct):
        for payment, executions in observed.executed_requests.get(replica, {}).items():
            effective = [
                seq
                for seq, record in executions
                if record.fresh and record.reason not in UNSTORED_REASONS
            ]
            if len(effective) > 1:
                result.fail(f"replica {replica}: payment {payment} executed at seqs {effective}")
    return result


def check_conservation(observed: Observations) -> CheckResult:
    result = CheckResult("conservation")
    for replica in sorted(observed.correct):
        ledger = observed.final_ledgers.get(replica)
        if ledger is None:
            continue
        tracked, recounted, smallest = ledger
        if not tracked == recounted == observed.initial_total:
            result.fail(
                f"replica {replica}: total {recounted} (tracked {tracked}), "
                f"expected {observed.initial_total}"
            )
        if smallest < 0:
            result.fail(f"replica {replica}: a balance went negative ({smallest})")
    return result


def check_receipts(
    observed: Observations,
    keyring: KeyRing,
    cluster_id: bytes,
    cache: VerificationCache | None = None,
) -> CheckResult:
    """Every receipt a client accepted verifies offline (against this cluster's keys and
    id) and matches the correct replicas. `cache`: signatures already verified in this
    process (verification is a pure function of its inputs, so the verdict is the same)."""
    result = CheckResult("receipts")
    for payment in sorted(observed.decided):
        decided = observed.decided[payment]
        if decided.receipt is None:
            # Outcome unknown (the cluster forgot the request id): nothing is claimed.
            continue
        try:
            verified = verify_receipt(decided.receipt, keyring, cluster_id, cache)
        except ReceiptError as error:
            result.fail(f"payment {payment}: receipt does not verify: {error}")
            continue
        claimed = (verified.outcome, verified.reason, verified.seq)
        submitted = observed.submitted.get(payment)
        for replica in sorted(observed.correct):
            for seq, record in observed.executed_requests.get(replica, {}).get(payment, []):
                if not record.fresh or record.reason in UNSTORED_REASONS:
                    continue
                if payment[0] in observed.byzantine_clients and record.request_digest != submitted:
                    # Another body the Byzantine client sent under this id: the receipt is
                    # for the submitted body only (validity checks the other one).
                    continue
                if (record.outcome, record.reason, seq) != claimed:
                    result.fail(
                        f"payment {payment}: receipt says {claimed}, replica {replica} "
                        f"executed {(record.outcome, record.reason, seq)}"
                    )
    return result


def check_liveness(observed: Observations) -> CheckResult:
    result = CheckResult("liveness")
    for payment in sorted(observed.submitted):
        if payment[0] in observed.byzantine_clients:
            # Only correct clients are promised a decision.
            continue
        decided = observed.decided.get(payment)
        if decided is None:
            result.fail(f"payment {payment} undecided at the end")
        elif decided.receipt is None:
            result.fail(f"payment {payment}: outcome unknown ({decided.reason})")
    return result


def check_new_view_kept(observed: Observations) -> CheckResult:
    """PBFT's view-change rule, checked where it is broken rather than where it ends in a
    fork: in view v a correct replica prepares, at a sequence number v's NEW-VIEW assigned,
    only that assignment (also after a restart). A breach needs a Byzantine primary to
    offer another batch and a quorum to follow it before it splits executions; this check
    sees it at the first PREPARE."""
    result = CheckResult("new_view_kept")
    for replica, view, seq, assigned, prepared in observed.new_view_breaches:
        if replica in observed.correct:
            result.fail(
                f"replica {replica} prepared {prepared.hex()[:12]} at seq {seq} in view {view}, "
                f"where its NEW-VIEW assigned {assigned.hex()[:12]}"
            )
    return result


def run_checks(
    observed: Observations,
    keyring: KeyRing,
    cluster_id: bytes,
    cache: VerificationCache | None = None,
) -> Mapping[str, CheckResult]:
    results = [
        check_agreement(observed),
        check_validity(observed),
        check_integrity(observed),
        check_conservation(observed),
        check_receipts(observed, keyring, cluster_id, cache),
        check_new_view_kept(observed),
        check_liveness(observed),
    ]
    return {result.name: result for result in results}


SAFETY_CHECKS = (
    "agreement",
    "validity",
    "integrity",
    "conservation",
    "receipts",
    "new_view_kept",
)
