"""The rules and effects of each ledger operation (issue 11), for pbft/ledger.py's Ledger.

Part of the sans-I/O protocol core. `OperationRules` is a base of Ledger: it decides one
operation against the balances (through the accessors Ledger defines) and the records
(pbft/holds.py), at the ledger's batch time. Each op checks its rules in a fixed order and
the first failing rule is the answer, so a retry gets the same one:

- every op: first `invalid_request` if a field the op does not use is not empty.
- transfer: invalid_amount, same_account, unknown_account (payer, then payee), unauthorized
  (payer's owner), insufficient_funds, invalid_amount (payee would overflow).
- authorize: invalid_amount, invalid_expiry (not in 1..max_hold_duration_ms),
  same_account, unknown_account, unauthorized (payer's owner), too_many_holds (open ones),
  insufficient_funds.
- capture: invalid_amount, hold_not_found (also to a client who is neither the payer's
  nor the payee's owner), unauthorized (the payer's owner: only the payee's may capture),
  hold_already_captured / hold_already_voided / hold_expired, exceeds_hold,
  invalid_amount (payee would overflow).
- void: hold_not_found (also to a client who is neither the payer's nor the payee's
  owner, the only ones who may void), hold_already_captured / hold_already_voided /
  hold_expired.
- refund: invalid_amount, payment_not_found (also to a client who is neither the payer's
  nor the payee's owner), unauthorized (the payer's owner: only the payee's may refund),
  exceeds_refundable, insufficient_funds (payee's available), invalid_amount (payer would
  overflow).
- open_account: invalid_account_name, account_exists, too_many_accounts.
To a stranger (not a party to it) a hold or payment is answered as absent, so nobody probes
which request ids of other clients exist; authority comes before a hold's or payment's
state, so nobody learns the fate of a hold that is not theirs. Postings list the account
money leaves first, then the one it reaches.
"""

from __future__ import annotations

from pbft.holds import Hold, HoldState, Records
from pbft.operations import Op, Payment, Posting, Reason

MAX_AMOUNT = 2**63 - 1
_STATE_REASONS = {
    HoldState.CAPTURED: Reason.HOLD_ALREADY_CAPTURED,
    HoldState.VOIDED: Reason.HOLD_ALREADY_VOIDED,
    HoldState.EXPIRED: Reason.HOLD_EXPIRED,
}

Outcome = tuple[Reason, tuple[Posting, ...]]


class OperationRules:
    """Decide and apply issue 11's operations; Ledger provides the state accessors."""

    _records: Records
    _batch_time_ms: int
    _total: int

    # Accessors Ledger implements (available balance, held balance, owner, existence).
    def balance(self, account: str) -> int | None:
        raise NotImplementedError

    def held(self, account: str) -> int | None:
        raise NotImplementedError

    def _owner(self, account: str) -> int:
        raise NotImplementedError

    def _set_balance(self, account: str, balance: int) -> None:
        raise NotImplementedError

    def _set_held(self, account: str, held: int) -> None:
        raise NotImplementedError

    def _party(self, payer: str, payee: str, client_id: int) -> bool:
        """Whether the client owns either account of a hold or payment."""
        return client_id in (self._owner(payer), self._owner(payee))

    def _account_exists(self, account: str) -> bool:
        raise NotImplementedError

    def _valid_account_name(self, name: str) -> bool:
        raise NotImplementedError

    # -- dispatch ------------------------------------------------------------------------

    def _apply_operation(self, payment: Payment) -> Outcome:
        """The first failing rule's reason (NONE: done) and the postings of what was done."""
        op = payment.op
        if op == Op.TRANSFER:
            return self._transfer_op(payment)
        if op == Op.AUTHORIZE:
            return self._authorize(payment)
        if op == Op.CAPTURE:
            return self._capture(payment)
        if op == Op.VOID:
            return self._void(payment)
        if op == Op.REFUND:
            return self._refund(payment)
        if op == Op.OPEN_ACCOUNT:
            return self._open_account(payment)
        # Unknown ops are dropped at decode; one here is a caller's bug, still answered.
        return Reason.INVALID_REQUEST, ()

    # -- each op -------------------------------------------------------------------------

    def _transfer_op(self, payment: Payment) -> Outcome:
        if payment.ref_client or payment.ref_request or payment.expires_in_ms:
            return Reason.INVALID_REQUEST, ()
        amount, payer, payee = payment.amount, payment.payer, payment.payee
        if not _valid_amount(amount):
            return Reason.INVALID_AMOUNT, ()
        if payer == payee:
            return Reason.SAME_ACCOUNT, ()
        payer_balance = self.balance(payer)
        if payer_balance is None:
            return Reason.UNKNOWN_ACCOUNT, ()
        payee_balance = self.balance(payee)
        if payee_balance is None:
            return Reason.UNKNOWN_ACCOUNT, ()
        if self._owner(payer) != payment.client_id:
            return Reason.UNAUTHORIZED, ()
        if payer_balance < amount:
            return Reason.INSUFFICIENT_FUNDS, ()
        if payee_balance + amount > MAX_AMOUNT:
            return Reason.INVALID_AMOUNT, ()
        self._set_balance(payer, payer_balance - amount)
        self._set_balance(payee, payee_balance + amount)
        payment_id = (payment.client_id, payment.request_id)
        self._records.add_payment(payment_id, payer, payee, amount, self._batch_time_ms)
        return Reason.NONE, (Posting(payer, -amount, 0), Posting(payee, amount, 0))

    def _authorize(self, payment: Payment) -> Outcome:
        if payment.ref_client or payment.ref_request:
            return Reason.INVALID_REQUEST, ()
        amount, payer, payee = payment.amount, payment.payer, payment.payee
        if not _valid_amount(amount):
            return Reason.INVALID_AMOUNT, ()
        records = self._records
        if not 0 < payment.expires_in_ms <= records.limits.max_hold_duration_ms:
            return Reason.INVALID_EXPIRY, ()
        if payer == payee:
            return Reason.SAME_ACCOUNT, ()
        payer_balance = self.balance(payer)
        if payer_balance is None or self.balance(payee) is None:
            return Reason.UNKNOWN_ACCOUNT, ()
        if self._owner(payer) != payment.client_id:
            return Reason.UNAUTHORIZED, ()
        # Only open holds are refused: closed ones make room (pbft/holds.py).
        open_holds = records.open_holds.get(payment.client_id, 0)
        if open_holds >= records.limits.max_holds_per_client:
            return Reason.TOO_MANY_HOLDS, ()
        if payer_balance < amount:
            return Reason.INSUFFICIENT_FUNDS, ()
        self._set_balance(payer, payer_balance - amount)
        self._set_held(payer, self._held_of(payer) + amount)
        expires_at = self._batch_time_ms + payment.expires_in_ms
        records.add_hold((payment.client_id, payment.request_id), payer, payee, amount, expires_at)
        return Reason.NONE, (Posting(payer, -amount, amount),)

    def _capture(self, payment: Payment) -> Outcome:
        if payment.payer or payment.payee or payment.expires_in_ms:
            return Reason.INVALID_REQUEST, ()
        amount = payment.amount
        if not _valid_amount(amount):
            return Reason.INVALID_AMOUNT, ()
        hold = self._records.holds.get((payment.ref_client, payment.ref_request))
        if hold is None or not self._party(hold.payer, hold.payee, payment.client_id):
            return Reason.HOLD_NOT_FOUND, ()
        if self._owner(hold.payee) != payment.client_id:
            return Reason.UNAUTHORIZED, ()
        if hold.state is not HoldState.OPEN:
            return _STATE_REASONS[hold.state], ()
        if amount > hold.amount:
            return Reason.EXCEEDS_HOLD, ()
        payee_balance = self._available(hold.payee)
        if payee_balance + amount > MAX_AMOUNT:
            return Reason.INVALID_AMOUNT, ()
        rest = hold.amount - amount
        self._set_held(hold.payer, self._held_of(hold.payer) - hold.amount)
        self._set_balance(hold.payer, self._available(hold.payer) + rest)
        self._set_balance(hold.payee, payee_balance + amount)
        self._records.close_hold(hold, HoldState.CAPTURED, self._batch_time_ms)
        # The payment the customer knows is the authorization: refunds name the hold.
        self._records.add_payment(hold.hold_id, hold.payer, hold.payee, amount, self._batch_time_ms)
        return Reason.NONE, (
            Posting(hold.payer, rest, -hold.amount),
            Posting(hold.payee, amount, 0),
        )

    def _void(self, payment: Payment) -> Outcome:
        if payment.payer or payment.payee or payment.amount or payment.expires_in_ms:
            return Reason.INVALID_REQUEST, ()
        hold = self._records.holds.get((payment.ref_client, payment.ref_request))
        # Either party may void, so to anyone else the hold is absent.
        if hold is None or not self._party(hold.payer, hold.payee, payment.client_id):
            return Reason.HOLD_NOT_FOUND, ()
        if hold.state is not HoldState.OPEN:
            return _STATE_REASONS[hold.state], ()
        self._release(hold)
        self._records.close_hold(hold, HoldState.VOIDED, self._batch_time_ms)
        return Reason.NONE, (Posting(hold.payer, hold.amount, -hold.amount),)

    def _refund(self, payment: Payment) -> Outcome:
        if payment.payer or payment.payee or payment.expires_in_ms:
            return Reason.INVALID_REQUEST, ()
        amount = payment.amount
        if not _valid_amount(amount):
            return Reason.INVALID_AMOUNT, ()
        paid = self._records.payments.get((payment.ref_client, payment.ref_request))
        if paid is None or not self._party(paid.payer, paid.payee, payment.client_id):
            return Reason.PAYMENT_NOT_FOUND, ()
        if self._owner(paid.payee) != payment.client_id:
            return Reason.UNAUTHORIZED, ()
        if paid.refunded + amount > paid.amount:
            return Reason.EXCEEDS_REFUNDABLE, ()
        payee_balance = self._available(paid.payee)
        if payee_balance < amount:
            return Reason.INSUFFICIENT_FUNDS, ()
        payer_balance = self._available(paid.payer)
        if payer_balance + amount > MAX_AMOUNT:
            return Reason.INVALID_AMOUNT, ()
        self._set_balance(paid.payee, payee_balance - amount)
        self._set_balance(paid.payer, payer_balance + amount)
        paid.refunded += amount
        self._records.touch(paid)
        return Reason.NONE, (Posting(paid.payee, -amount, 0), Posting(paid.payer, amount, 0))

    def _open_account(self, payment: Payment) -> Outcome:
        if payment.payee or payment.amount or payment.expires_in_ms:
            return Reason.INVALID_REQUEST, ()
        if payment.ref_client or payment.ref_request:
            return Reason.INVALID_REQUEST, ()
        name = payment.payer
        if not self._valid_account_name(name):
            return Reason.INVALID_ACCOUNT_NAME, ()
        if self._account_exists(name):
            return Reason.ACCOUNT_EXISTS, ()
        records = self._records
        if records.opened_by.get(payment.client_id, 0) >= records.limits.max_accounts_per_client:
            return Reason.TOO_MANY_ACCOUNTS, ()
        records.open_account(name, payment.client_id)
        return Reason.NONE, (Posting(name, 0, 0),)

    # -- shared ----------------------------------------------------------------------------

    def _release(self, hold: Hold) -> None:
        """Give a hold's amount back to its payer's available balance."""
        payer, amount = hold.payer, hold.amount
        self._set_held(payer, self._held_of(payer) - amount)
        self._set_balance(payer, self._available(payer) + amount)

    def _available(self, account: str) -> int:
        balance = self.balance(account)
        if balance is None:
            raise KeyError(account)
        return balance

    def _held_of(self, account: str) -> int:
        held = self.held(account)
        if held is None:
            raise KeyError(account)
        return held


def _valid_amount(amount: object) -> bool:
    return type(amount) is int and 0 < amount <= MAX_AMOUNT
