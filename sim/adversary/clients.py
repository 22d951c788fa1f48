"""Byzantine clients: wrappers around the actions of an unmodified client core."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import ClassVar

from crypto.keys import SigningKey
from pbft.client import ClientAction, Decided
from pbft.config import ClusterConfig
from pbft.events import Send
from pbft.ledger import Account
from pbft.messages import Request
from pbft.signed import seal
from sim.adversary.base import decode_own, remember


class ClientBehavior:
    """A Byzantine client: rewrites the actions of an unmodified client core (its sends, and
    its decisions, which it may react to). It holds only its own key: anything new it sends
    is a Request sealed by itself. Deterministic and bounded like the replica behaviours."""

    name = "correct"
    PARAMETERS: ClassVar[tuple[str, ...]] = ()  # as Behavior's
    # Request ids the client core never uses (the workload numbers from 1 up).
    OWN_ID_BASE = 1 << 40
    # True: it acts only on the ledger's operations other than transfer, so a transfer-only
    # workload (the fuzzer's) gives it nothing to do.
    OPERATIONS_ONLY: ClassVar[bool] = False

    def __init__(
        self,
        client_id: int,
        key: SigningKey,
        *,
        config: ClusterConfig,
        accounts: Mapping[str, Account],
        params: Mapping[str, int | str] | None = None,
        at_ms: int = 0,
        until_ms: int | None = None,
    ) -> None:
        self.client_id = client_id
        self.key = key
        self.config = config
        self.accounts = dict(accounts)
        self.params = dict(params or {})
        self.at_ms = at_ms
        self.until_ms = until_ms
        # request id -> the request the core first sent under it (the submitted body)
        self.originals: dict[int, Request] = {}
        # (request id, digest) of every extra request it sent, for tests and reports
        self.extra: dict[tuple[int, bytes], None] = {}
        self.setup()

    def setup(self) -> None:
        """Per-behaviour state and parameters."""

    def active(self, now_ms: int) -> bool:
        return now_ms >= self.at_ms and (self.until_ms is None or now_ms < self.until_ms)

    def actions(self, actions: Sequence[ClientAction], now_ms: int) -> list[ClientAction]:
        out: list[ClientAction] = []
        for action in actions:
            out.append(action)
            if isinstance(action, Decided):
                if self.active(now_ms):
                    out.extend(self.on_decided(action))
                continue
            request = decode_own(action.data)
            if not isinstance(request, Request) or request.request_id in self.originals:
                continue
            remember(self.originals, request.request_id, request)
            if self.active(now_ms):
                out.extend(self.on_new_request(action, request))
        return out

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        """Called when the core first sends a request."""
        return []

    def on_decided(self, decided: Decided) -> list[ClientAction]:
        """Called when the core has a decision (a receipt) for one of its requests."""
        return []

    def sealed(self, request: Request) -> bytes:
        raw = seal(request, self.key)
        remember(self.extra, (request.request_id, hashlib.sha256(request.encode()).digest()), None)
        return raw

    def to_replicas(self, raw: bytes, replicas: Sequence[int] | None = None) -> list[ClientAction]:
        targets = self.config.replica_ids() if replicas is None else replicas
        return [Send(("replica", replica), raw) for replica in targets]


class ReuseRequestId(ClientBehavior):
    """Sends other payments under the id of one it submitted, a different one to each half
    of the replicas (same payer, another payee or amount), signed as itself. `kind`:
    - "after_decision": once the original is decided. Every correct replica must refuse
      both as id_reused (never execute them); the original's receipt stands;
    - "concurrent": at the moment the original goes out (to the primary), the others go to
      the backups, which relay them: the bodies race. The others ask for more than all the
      money there is, so whichever body is ordered first, nothing but the original can be
      confirmed; if another body wins, the original is refused as id_reused."""

    name = "reuse_request_id"
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = ("after_decision", "concurrent")

    def setup(self) -> None:
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(
                f"reuse_request_id kind must be one of {self.KINDS}, got {self.kind!r}"
            )
        self.total = sum(account.balance for account in self.accounts.values())

    def _others(self, original: Request, concurrent: bool) -> list[Request]:
        names = sorted(self.accounts)
        others = []
        for index in range(2):
            payees = [name for name in names if name not in (original.payer, original.payee)]
            payee = payees[index % len(payees)] if payees else original.payee
            amount = self.total + 1 + index if concurrent else original.amount + 1 + index
            others.append(replace(original, payee=payee, amount=amount))
        return others

    def _halves(self, replicas: Sequence[int]) -> tuple[list[int], list[int]]:
        middle = (len(replicas) + 1) // 2
        return list(replicas[:middle]), list(replicas[middle:])

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        if self.kind != "concurrent":
            return []
        backups = [replica for replica in self.config.replica_ids() if send.to[1] != replica]
        first, second = self._halves(backups)
        out: list[ClientAction] = []
        for other, half in zip(self._others(request, True), (first, second), strict=True):
            out.extend(self.to_replicas(self.sealed(other), half))
        return out

    def on_decided(self, decided: Decided) -> list[ClientAction]:
        original = self.originals.get(decided.request_id)
        if self.kind != "after_decision" or original is None:
            return []
        first, second = self._halves(list(self.config.replica_ids()))
        out: list[ClientAction] = []
        for other, half in zip(self._others(original, False), (first, second), strict=True):
            out.extend(self.to_replicas(self.sealed(other), half))
        return out


class ClientReplay(ClientBehavior):
    """With each new request, sends every replica one of its own earlier requests again,
    byte for byte, in turn from the last 32 it sent. Replicas must answer from what they
    decided (or order it and find it decided): nothing takes effect twice."""

    name = "replay"
    REMEMBERED = 32

    def setup(self) -> None:
        self.sent: deque[bytes] = deque(maxlen=self.REMEMBERED)
        self.replayed = 0

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        out: list[ClientAction] = []
        if self.sent:
            old = self.sent[self.replayed % len(self.sent)]
            self.replayed += 1
            out = self.to_replicas(old)
        self.sent.append(send.data)
        return out


class Steal(ClientBehavior):
    """With each new request, also sends every replica a payment out of an account it does
    not own (in turn, each other client's accounts) into one of its own (or any other),
    under a request id of its own that the workload never uses, signed as itself. Each must
    be refused as unauthorized by every correct replica."""

    name = "steal"

    def setup(self) -> None:
        names = sorted(self.accounts)
        self.victims = [name for name in names if self.accounts[name].owner != self.client_id]
        self.own = [name for name in names if self.accounts[name].owner == self.client_id]
        self.stolen = 0

    def on_new_request(self, send: Send, request: Request) -> list[ClientAction]:
        if not self.victims:
            return []
        payer = self.victims[self.stolen % len(self.victims)]
        payees = [name for name in self.own or sorted(self.accounts) if name != payer]
        if not payees:
            return []
        payee = payees[self.stolen % len(payees)]
        amount = 1 + self.stolen % 10
        theft = Request(
            self.client_id, self.OWN_ID_BASE + self.stolen, "transfer", payer, payee, amount
        )
        self.stolen += 1
        return self.to_replicas(self.sealed(theft))


class AbuseHolds(ClientBehavior):
    """Tries the obvious abuses of holds and payments, each once its own request has been
    confirmed, under request ids of its own, signed as itself (`kind`):
    - "capture_twice": captures a hold again after its capture: hold_already_captured;
    - "void_after_capture": voids a hold it captured: hold_already_captured;
    - "refund_more": refunds one more than a capture it made paid: exceeds_refundable;
    - "capture_others_hold": captures a hold it placed as the payer whose payee another
      client owns (only the payee's owner captures): unauthorized.
    Each must be refused by every correct replica (the checks of holds and refunds would
    see it confirmed)."""

    name = "abuse_holds"
    OPERATIONS_ONLY = True
    PARAMETERS: ClassVar[tuple[str, ...]] = ("kind",)
    KINDS: ClassVar[tuple[str, ...]] = (
        "capture_twice",
        "void_after_capture",
        "refund_more",
        "capture_others_hold",
    )
    # The refusals each abuse is owed (tests check them against what the replicas decided).
    EXPECTED_REASONS: ClassVar[dict[str, str]] = {
        "capture_twice": "hold_already_captured",
        "void_after_capture": "hold_already_captured",
        "refund_more": "exceeds_refundable",
        "capture_others_hold": "unauthorized",
    }

    def setup(self) -> None:
        self.kind = str(self.params.get("kind", self.KINDS[0]))
        if self.kind not in self.KINDS:
            raise ValueError(f"abuse_holds kind must be one of {self.KINDS}, got {self.kind!r}")
        self.abuses = 0

    def _abuse(self, original: Request) -> Request | None:
        hold = (original.ref_client, original.ref_request)
        request_id = self.OWN_ID_BASE + self.abuses
        if original.op == "capture":
            if self.kind == "capture_twice":
                return replace(original, request_id=request_id)
            if self.kind == "void_after_capture":
                return Request(self.client_id, request_id, "void", "", "", 0, *hold, 0)
            if self.kind == "refund_more":
                amount = original.amount + 1
                return Request(self.client_id, request_id, "refund", "", "", amount, *hold, 0)
        if original.op == "authorize" and self.kind == "capture_others_hold":
            payee = self.accounts.get(original.payee)
            if payee is not None and payee.owner != self.client_id:
                own_hold = (self.client_id, original.request_id)
                amount = original.amount
                return Request(self.client_id, request_id, "capture", "", "", amount, *own_hold, 0)
        return None

    def on_decided(self, decided: Decided) -> list[ClientAction]:
        original = self.originals.get(decided.request_id)
        if original is None or decided.outcome != "confirmed":
            return []
        abuse = self._abuse(original)
        if abuse is None:
            return []
        self.abuses += 1
        return self.to_replicas(self.sealed(abuse))
