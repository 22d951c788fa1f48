"""The checkers run at the end of every simulation, over the correct replicas only.

Each returns a `CheckResult`; a violated check lists (a bounded number of) concrete
counterexamples, so a failing run says what went wrong, not just that it did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from crypto.keys import KeyRing
from crypto.signing import VerificationCache
from pbft.client import Decided
from pbft.events import Executed, ExecutedRequest
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
    # replica life -> seq -> the batch it executed there (its first execution of that seq):
    # postings and releases, for the checks of holds, refunds and their agreement
    executed_batches: dict[int, dict[int, Executed]] = field(default_factory=dict)


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
    """Money only moves: every correct replica's ledger ends with the genesis total of
    available + held balances (tracked and recounted) and no negative balance, and every
    operation it executed posted changes that sum to zero."""
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
    for replica in sorted(observed.correct):
        for seq, executed in sorted(observed.executed_batches.get(replica, {}).items()):
            for record in executed.requests:
                # Money only moves: what an operation takes from available and held
                # balances it puts back in some account's.
                net = sum(p.available_delta + p.held_delta for p in record.postings)
                if net:
                    result.fail(
                        f"replica {replica} seq {seq}: {record.op} "
                        f"{(record.client_id, record.request_id)} changed the total by {net}"
                    )
    return result


# --- operations: holds, refunds and their agreement ---------------------------------------

_CONFIRMED = "confirmed"


@dataclass
class _Hold:
    payer: str
    payee: str
    amount: int
    # the ledger time (ms) at or after which it is released
    expires_at_ms: int
    # "open", or how it closed: "captured", "voided", "expired"
    fate: str = "open"
    closed_at_seq: int = 0


class _Replay:
    """One correct replica's executed batches replayed from genesis, in sequence order, by
    their records alone (never the replica's ledger): which holds are open, what each
    account holds, what each payment paid and had refunded. Every confirmed capture or void
    must find its hold open, every release an open hold whose time has come, every refund
    its payment with enough left; and what an account holds must equal the sum of its open
    holds after every batch (a capture that keeps the remainder held breaks that)."""

    def __init__(self, replica: int, holds: CheckResult, refunds: CheckResult) -> None:
        self.replica = replica
        self.holds_result = holds
        self.refunds_result = refunds
        self.holds: dict[PaymentId, _Hold] = {}
        self.open_by_expiry: dict[PaymentId, None] = {}
        # account -> held balance by the postings and releases / by the open holds
        self.held: Counter[str] = Counter()
        self.open_held: Counter[str] = Counter()
        # payment -> (payer, payee, amount paid)
        self.paid: dict[PaymentId, tuple[str, str, int]] = {}
        self.refunded: Counter[PaymentId] = Counter()
        # The ledger's time: the largest batch timestamp so far (it never goes backwards).
        self.now_ms = 0

    def hold_fail(self, seq: int, detail: str) -> None:
        self.holds_result.fail(f"replica {self.replica} seq {seq}: {detail}")

    def batch(self, executed: Executed) -> None:
        seq = executed.seq
        self.now_ms = max(self.now_ms, executed.timestamp_ms)
        # dicts, not sets: the simulator iterates nothing in hash order
        touched: dict[str, None] = {}
        released: dict[PaymentId, None] = {}
        for release in executed.released:
            ident = (release.hold_client, release.hold_request)
            released[ident] = None
            touched[release.payer] = None
            self.held[release.payer] -= release.amount
            hold = self.holds.get(ident)
            if hold is None:
                self.hold_fail(seq, f"released hold {ident}, which no authorize placed")
                continue
            if hold.fate != "open":
                self.hold_fail(
                    seq,
                    f"released hold {ident} after it was {hold.fate} at seq {hold.closed_at_seq}",
                )
                continue
            if (release.payer, release.amount) != (hold.payer, hold.amount):
                self.hold_fail(
                    seq,
                    f"released hold {ident} as {release.amount} of {release.payer!r}; it holds "
                    f"{hold.amount} of {hold.payer!r}",
                )
            if hold.expires_at_ms > self.now_ms:
                self.hold_fail(
                    seq,
                    f"released hold {ident} at batch time {self.now_ms} ms, before it expires "
                    f"at {hold.expires_at_ms} ms",
                )
            self.close(ident, hold, "expired", seq)
        for ident in list(self.open_by_expiry):
            hold = self.holds[ident]
            if hold.expires_at_ms <= self.now_ms and ident not in released:
                self.hold_fail(
                    seq,
                    f"hold {ident} expired at {hold.expires_at_ms} ms but was not released at "
                    f"batch time {self.now_ms} ms",
                )
                # Said once: it is not looked at again.
                del self.open_by_expiry[ident]
        for record in executed.requests:
            for posting in record.postings:
                touched[posting.account] = None
                self.held[posting.account] += posting.held_delta
            if record.fresh and record.outcome == _CONFIRMED:
                self.request(seq, record)
        for account in sorted(touched):
            if self.held[account] != self.open_held[account]:
                self.hold_fail(
                    seq,
                    f"account {account!r} holds {self.held[account]} by its postings, its open "
                    f"holds {self.open_held[account]}",
                )
                # Resynchronised so one bug is reported where it happens, not at every batch.
                self.held[account] = self.open_held[account]

    def close(self, ident: PaymentId, hold: _Hold, fate: str, seq: int) -> None:
        hold.fate = fate
        hold.closed_at_seq = seq
        self.open_held[hold.payer] -= hold.amount
        self.open_by_expiry.pop(ident, None)

    def request(self, seq: int, record: ExecutedRequest) -> None:
        ident = (record.client_id, record.request_id)
        ref = (record.ref_client, record.ref_request)
        if record.op == "transfer":
            self.paid[ident] = (record.payer, record.payee, record.amount)
        elif record.op == "authorize":
            self.holds[ident] = _Hold(
                record.payer, record.payee, record.amount, self.now_ms + record.expires_in_ms
            )
            self.open_by_expiry[ident] = None
            self.open_held[record.payer] += record.amount
        elif record.op in ("capture", "void"):
            fate = "captured" if record.op == "capture" else "voided"
            hold = self.holds.get(ref)
            if hold is None:
                self.hold_fail(seq, f"{fate} hold {ref}, which no authorize placed ({ident})")
                return
            if hold.fate != "open":
                self.hold_fail(
                    seq,
                    f"{fate} hold {ref} ({ident}) after it was {hold.fate} at seq "
                    f"{hold.closed_at_seq}",
                )
                return
            if record.op == "capture":
                if record.amount > hold.amount:
                    self.hold_fail(
                        seq, f"captured {record.amount} of hold {ref}, which holds {hold.amount}"
                    )
                # A capture is the payment the customer knows by the hold's id.
                self.paid[ref] = (hold.payer, hold.payee, record.amount)
            self.close(ref, hold, fate, seq)
        elif record.op == "refund":
            self.refund(seq, ident, ref, record)

    def refund(self, seq: int, ident: PaymentId, ref: PaymentId, record: ExecutedRequest) -> None:
        where = f"replica {self.replica} seq {seq}: refund {ident}"
        payment = self.paid.get(ref)
        if payment is None:
            self.refunds_result.fail(f"{where} of payment {ref}, which nobody paid")
            return
        payer, payee, amount = payment
        self.refunded[ref] += record.amount
        if self.refunded[ref] > amount:
            self.refunds_result.fail(
                f"{where}: payment {ref} paid {amount}, refunded {self.refunded[ref]} in all"
            )
        moved = sorted((p.account, p.available_delta, p.held_delta) for p in record.postings)
        expected = sorted([(payee, -record.amount, 0), (payer, record.amount, 0)])
        if moved != expected:
            self.refunds_result.fail(f"{where} of payment {ref} posted {moved}, not {expected}")


def _contiguous_batches(batches: Mapping[int, Executed]) -> Iterable[Executed]:
    """A replica's batches from seq 1 up to its first gap: one that state transfer skipped
    cannot be replayed (the agreement of effects still covers what follows)."""
    seq = 1
    while seq in batches:
        yield batches[seq]
        seq += 1


def check_holds_and_refunds(observed: Observations) -> tuple[CheckResult, CheckResult]:
    """No hold captured or voided twice, nor both, nor after it expired; releases exactly
    when the batch time reaches a hold's expiry; held balances equal the open holds; refunds
    never exceed what their payment paid. Each correct replica by its own records."""
    holds = CheckResult("holds")
    refunds = CheckResult("refunds")
    for replica in sorted(observed.correct):
        replay = _Replay(replica, holds, refunds)
        for executed in _contiguous_batches(observed.executed_batches.get(replica, {})):
            replay.batch(executed)
    return holds, refunds


def _effects(executed: Executed) -> tuple[object, ...]:
    """What a batch did to the ledger, as every correct replica must have done it: the holds
    released and each request's outcome and postings. (Not the batch time itself: two
    replicas that read different times but release the same holds agree on every fate.)"""
    return (
        executed.released,
        tuple(
            (record.client_id, record.request_id, record.outcome, record.reason, record.postings)
            for record in executed.requests
        ),
    )


def check_effects_agree(observed: Observations) -> CheckResult:
    """Every correct replica that executed a sequence number did the same to the ledger
    there: the same postings and the same holds released (expiry decided by the agreed
    batch time, never a replica's clock), so every hold has one fate everywhere."""
    result = CheckResult("hold_fates")
    by_seq: dict[int, dict[tuple[object, ...], tuple[list[int], Executed]]] = {}
    for replica in sorted(observed.correct):
        for seq, executed in observed.executed_batches.get(replica, {}).items():
            sides = by_seq.setdefault(seq, {})
            replicas, _ = sides.setdefault(_effects(executed), ([], executed))
            replicas.append(replica)
    for seq in sorted(by_seq):
        if len(by_seq[seq]) > 1:
            shown = "; ".join(
                f"replicas {replicas} at {executed.timestamp_ms} ms released "
                f"{[(r.hold_client, r.hold_request) for r in executed.released]}, outcomes "
                f"{[(r.client_id, r.request_id, r.outcome, r.reason) for r in executed.requests]}"
                for replicas, executed in by_seq[seq].values()
            )
            result.fail(f"seq {seq}: correct replicas did different things: {shown}")
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
        *check_holds_and_refunds(observed),
        check_effects_agree(observed),
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
    "holds",
    "refunds",
    "hold_fates",
    "receipts",
    "new_view_kept",
)
