"""The shop's decisions (examples/shop/shop_orders.py) and books (shop_store.py), without
any process: each stage against every kind of gateway answer, the HTTP answers reduced to
those kinds, and the SQLite journal's transactions, including a reopen as after kill -9.

The walk at the end drives the decisions and the books together through every sequence of
answers the gateway can give (a small exhaustive model): whatever happens, an order ends
charged if and only if it holds an item.
"""

from __future__ import annotations

import itertools
import re
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "shop"))

# examples/shop is not an installed package: its modules are imported by path.
from shop_orders import (
    PROBLEM_PREFIX,
    Answer,
    Call,
    Do,
    Kind,
    Outcome,
    Stage,
    after,
    classify,
    first_step,
    idempotency_key,
)
from shop_store import OrderConflict, ShopError, ShopStore


def payment(status: str, reason: str = "none") -> Answer:
    return Answer(Kind.PAYMENT, status, reason, "pay_1_7")


def rejected(reason: str) -> Answer:
    return Answer(Kind.REJECTED, reason=reason)


RETRY = Answer(Kind.RETRY, reason="504")


# --- decisions -------------------------------------------------------------------------------


def test_each_unfinished_stage_resumes_with_its_one_call() -> None:
    assert first_step(Stage.STARTED).call is Call.AUTHORIZE
    assert first_step(Stage.RESERVED).call is Call.CAPTURE
    assert first_step(Stage.OUT_OF_STOCK).call is Call.VOID
    assert first_step(Stage.RELEASED).call is Call.VOID
    with pytest.raises(ValueError):
        first_step(Stage.DONE)


def test_authorize_answers() -> None:
    assert after(Stage.STARTED, payment("held")).do is Do.RESERVE
    declined = after(Stage.STARTED, payment("rejected", "insufficient_funds"))
    assert (declined.do, declined.outcome) == (Do.FINISH, Outcome.DECLINED)
    assert declined.note == "insufficient_funds"
    refused = after(Stage.STARTED, Answer(Kind.REFUSED, reason="422 validation"))
    assert (refused.do, refused.outcome) == (Do.FINISH, Outcome.DECLINED)
    assert after(Stage.STARTED, payment("expired")).outcome is Outcome.DECLINED
    unauthorized = after(Stage.STARTED, rejected("unauthorized"))
    assert (unauthorized.do, unauthorized.outcome) == (Do.FINISH, Outcome.DECLINED)
    assert after(Stage.STARTED, rejected("hold_expired")).do is Do.STUCK
    assert after(Stage.STARTED, payment("pending")).do is Do.RETRY
    assert after(Stage.STARTED, RETRY) == after(Stage.STARTED, RETRY)
    assert after(Stage.STARTED, RETRY).call is Call.AUTHORIZE
    # The shop never captures before it reserved: a captured hold here is not its own doing.
    assert after(Stage.STARTED, payment("captured")).do is Do.STUCK
    assert after(Stage.STARTED, payment("confirmed")).do is Do.STUCK


def test_capture_answers() -> None:
    assert after(Stage.RESERVED, payment("captured")).outcome is Outcome.FULFILLED
    assert after(Stage.RESERVED, rejected("hold_already_captured")).outcome is Outcome.FULFILLED
    for reason in ("hold_expired", "hold_already_voided", "hold_not_found", "unauthorized"):
        step = after(Stage.RESERVED, rejected(reason))
        assert (step.do, step.note) == (Do.RELEASE, reason)
    assert after(Stage.RESERVED, payment("expired")).do is Do.RELEASE
    assert after(Stage.RESERVED, payment("held")).do is Do.RETRY
    assert after(Stage.RESERVED, RETRY).call is Call.CAPTURE
    # A capture the gateway refuses as input: keep the item and the hold, tell a person.
    assert after(Stage.RESERVED, Answer(Kind.REFUSED, reason="404")).do is Do.STUCK


def test_void_answers() -> None:
    for stage, outcome in (
        (Stage.OUT_OF_STOCK, Outcome.OUT_OF_STOCK),
        (Stage.RELEASED, Outcome.CANCELLED),
    ):
        assert after(stage, payment("voided")).outcome is outcome
        assert after(stage, payment("expired")).outcome is outcome
        assert after(stage, rejected("hold_expired")).outcome is outcome
        assert after(stage, rejected("hold_already_voided")).outcome is outcome
        assert after(stage, RETRY).call is Call.VOID
        assert after(stage, rejected("hold_already_captured")).do is Do.STUCK
        assert after(stage, payment("captured")).do is Do.STUCK


def test_a_denied_key_or_a_reused_key_is_never_guessed_around() -> None:
    for stage in (Stage.STARTED, Stage.RESERVED, Stage.OUT_OF_STOCK, Stage.RELEASED):
        assert after(stage, Answer(Kind.DENIED, reason="401")).do is Do.STUCK
        assert after(stage, Answer(Kind.KEY_REUSED, reason="422")).do is Do.STUCK
        assert after(stage, Answer(Kind.UNKNOWN, reason="409 not-a-hold")).do is Do.STUCK


def problem(slug: str, **extra: object) -> dict[str, object]:
    return {"type": PROBLEM_PREFIX + slug, "title": slug, "detail": "d", **extra}


def test_classify_http_answers() -> None:
    answer = classify(
        200, {"object": "payment", "id": "pay_0_9", "status": "held", "reason": "none"}
    )
    assert answer == Answer(Kind.PAYMENT, "held", "none", "pay_0_9")
    assert classify(None, None) == Answer(Kind.RETRY, reason="no answer: unknown")
    odd = {"object": "payment", "id": "../v1/accounts/x", "status": "held"}
    assert classify(200, odd) == Answer(Kind.PAYMENT, "held", "", "")
    assert classify(None, "ConnectError: refused").reason == "no answer: ConnectError: refused"
    assert classify(200, ["not", "a", "payment"]).kind is Kind.RETRY
    assert classify(200, {"object": "payment"}).kind is Kind.RETRY
    timeout = classify(504, problem("cluster-timeout", payment_id="pay_0_9"))
    assert (timeout.kind, timeout.payment_id) == (Kind.RETRY, "pay_0_9")
    assert classify(409, problem("idempotency-key-in-flight")).kind is Kind.RETRY
    assert classify(409, problem("payment-pending")).kind is Kind.RETRY
    refused = classify(409, problem("operation-rejected", reason="hold_expired"))
    assert (refused.kind, refused.reason) == (Kind.REJECTED, "hold_expired")
    decided = classify(403, problem("forbidden", reason="unauthorized", operation={}))
    assert (decided.kind, decided.reason) == (Kind.REJECTED, "unauthorized")
    assert classify(409, problem("not-a-hold")).kind is Kind.UNKNOWN
    assert classify(409, None).kind is Kind.UNKNOWN
    assert classify(500, "oops").kind is Kind.RETRY
    assert classify(503, None).kind is Kind.RETRY
    assert classify(429, None).kind is Kind.RETRY
    assert classify(401, problem("unauthenticated")).kind is Kind.DENIED
    assert classify(403, problem("forbidden")).kind is Kind.DENIED
    assert classify(403, problem("forbidden", field="Authorization")).kind is Kind.DENIED
    # Someone else's account in the order: refused before anything is recorded.
    assert classify(403, problem("forbidden", field="from")).kind is Kind.REFUSED
    assert classify(422, problem("idempotency-key-reused")).kind is Kind.KEY_REUSED
    assert classify(422, problem("validation", field="amount")).kind is Kind.REFUSED
    assert classify(404, problem("not-found")).kind is Kind.REFUSED
    assert classify(400, {"type": 7}).kind is Kind.REFUSED


def test_idempotency_keys_are_fixed_by_shop_instance_order_and_call() -> None:
    keys = {idempotency_key("shop", "1a2b", "o-1", "9f", call) for call in Call}
    assert len(keys) == 3
    assert idempotency_key("shop", "1a2b", "o-1", "9f", Call.CAPTURE) == "shop:1a2b:o-1:9f:capture"
    longest = [idempotency_key("s" * 64, "i" * 16, "o" * 64, "n" * 16, call) for call in Call]
    assert all(len(key) <= 255 for key in longest)


# --- books -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ShopStore:
    books = ShopStore(tmp_path / "shop.db", "shop")
    books.put_item("mug", 700, 1)
    return books


def test_start_journals_the_keys_and_is_idempotent(store: ShopStore) -> None:
    order = store.start("o-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    assert (order.stage, order.amount, order.outcome) == (Stage.STARTED, 700, None)
    assert re.fullmatch(
        rf"shop:{store.instance}:o-1:[0-9a-f]{{16}}:authorize", order.key(Call.AUTHORIZE)
    )
    [(entry, detail)] = store.journal("o-1")
    assert (entry, detail["amount"], detail["expires_in_ms"]) == ("started", 700, 60_000)
    assert (detail["shop_name"], detail["merchant_account"], detail["merchant_client"]) == (
        "shop",
        "acct-00000",
        0,
    )
    assert detail["keys"] == {str(call): order.key(call) for call in Call}
    assert {key.rsplit(":", 1)[1] for key in detail["keys"].values()} == {
        "authorize",
        "capture",
        "void",
    }
    # A price change after the order started does not change what the order authorizes.
    store.put_item("mug", 900, 1)
    assert store.start("o-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0) == order
    assert len(store.journal("o-1")) == 1
    with pytest.raises(OrderConflict) as conflict:
        store.start("o-1", "mug", "acct-00003", 1, 60_000, "acct-00000", 0)
    assert conflict.value.field == "order_id"


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (("o 1", "mug", "acct-00002", 1, 60_000), "order_id"),
        (("", "mug", "acct-00002", 1, 60_000), "order_id"),
        (("o-2", "tea", "acct-00002", 1, 60_000), "sku"),
        (("o-2", "mug", "", 1, 60_000), "buyer_account"),
        (("o-2", "mug", "acct-00002", -1, 60_000), "buyer_client"),
        (("o-2", "mug", "acct-00002", True, 60_000), "buyer_client"),
        (("o-2", "mug", "acct-00002", 1, 0), "expires_in_ms"),
        (("o" * 65, "mug", "acct-00002", 1, 60_000), "order_id"),
        (("o-2", "mug", "acct-00002", 1, 60_000, ""), "merchant_account"),
        (("o-2", "mug", "acct-00002", 1, 60_000, "acct-00000", -1), "merchant_client"),
    ],
)
def test_start_refuses_bad_orders(
    store: ShopStore, arguments: tuple[str | int, ...], field: str
) -> None:
    merchant = ("acct-00000", 0)[len(arguments) - 5 :]
    with pytest.raises(ShopError) as refused:
        store.start(*arguments, *merchant)  # type: ignore[arg-type]
    assert refused.value.field == field
    assert store.orders() == []


def test_reserve_takes_the_last_item_once(store: ShopStore) -> None:
    store.start("o-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    store.start("o-2", "mug", "acct-00003", 1, 60_000, "acct-00000", 0)
    assert store.reserve("o-1").stage is Stage.RESERVED
    assert store.reserve("o-1").stage is Stage.RESERVED  # a repeat takes nothing more
    assert store.reserve("o-2").stage is Stage.OUT_OF_STOCK
    assert store.items() == {"mug": (700, 0)}
    assert store.reserved_orders() == {"o-1": "mug"}


def test_release_puts_the_item_back_once(store: ShopStore) -> None:
    store.start("o-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    store.reserve("o-1")
    released = store.release("o-1", "hold_expired")
    assert (released.stage, released.note) == (Stage.RELEASED, "hold_expired")
    store.release("o-1", "hold_expired")
    assert store.items() == {"mug": (700, 1)}
    assert store.reserved_orders() == {}
    done = store.finish("o-1", Outcome.CANCELLED)
    assert (done.stage, done.outcome) == (Stage.DONE, Outcome.CANCELLED)
    assert [entry for entry, _ in store.journal("o-1")] == [
        "started",
        "reserved",
        "released",
        "done",
    ]


def test_the_books_survive_a_reopen(tmp_path: Path) -> None:
    first = ShopStore(tmp_path / "shop.db", "shop")
    first.put_item("mug", 700, 2)
    first.start("o-1", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    first.reserve("o-1")
    first.note_payment("o-1", "pay_1_5")
    first.start("o-2", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    # No close: as after kill -9, only what was committed counts.
    again = ShopStore(tmp_path / "shop.db", "shop")
    assert again.unfinished() == ["o-1", "o-2"]
    unfinished = [again.order(order_id) for order_id in again.unfinished()]
    assert [(order.order_id, order.stage) for order in unfinished if order] == [
        ("o-1", Stage.RESERVED),
        ("o-2", Stage.STARTED),
    ]
    assert again.instance == first.instance
    assert unfinished[0] is not None and unfinished[0].payment_id == "pay_1_5"
    assert again.items() == {"mug": (700, 1)}
    first.close()
    again.close()


def test_stock_never_goes_negative_even_by_hand(store: ShopStore) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("UPDATE items SET stock = -1")
    with pytest.raises(ShopError):
        store.put_item("mug", 0, 1)
    with pytest.raises(ShopError):
        store.put_item("mug", 5, -1)


# --- the decisions and the books together ----------------------------------------------------

# Every answer kind the gateway can give to any call (RETRY stands for 504/409/no answer).
ANSWERS = [
    payment("held"),
    payment("rejected", "insufficient_funds"),
    payment("captured"),
    payment("voided"),
    payment("expired"),
    rejected("hold_expired"),
    rejected("hold_already_captured"),
    rejected("hold_already_voided"),
    rejected("unauthorized"),
    Answer(Kind.REFUSED, reason="422"),
    Answer(Kind.UNKNOWN, reason="409"),
    RETRY,
]


def _is_shop_consistent(answers: tuple[Answer, ...], stock: int) -> None:
    """Run one order through `answers` (one per call; a run may end early). The cluster is
    modelled by what the answers claim: the buyer is charged once any answer says the hold
    was captured."""
    store = ShopStore(Path(":memory:"), "shop")
    store.put_item("mug", 700, stock)
    order = store.start("o", "mug", "acct-00002", 1, 60_000, "acct-00000", 0)
    charged = False
    step = first_step(order.stage)
    for answer in answers:
        if step.do in (Do.FINISH, Do.STUCK):
            break
        if step.do is Do.RESERVE:
            order = store.reserve("o")
            step = first_step(order.stage)
        if step.do is Do.RELEASE:
            order = store.release("o", step.note)
            step = first_step(order.stage)
        if answer.status == "captured" or answer.reason == "hold_already_captured":
            charged = True
        step = after(order.stage, answer)
        if step.do is Do.RETRY:
            step = first_step(order.stage)
        if step.do is Do.FINISH:
            assert step.outcome is not None
            order = store.finish("o", step.outcome, step.note)
    holds_item = "o" in store.reserved_orders()
    if step.do is not Do.STUCK:  # a stuck order waits for a person; nothing was guessed
        if order.stage is Stage.DONE:
            assert holds_item == charged == (order.outcome is Outcome.FULFILLED), answers
        else:
            assert not charged, answers
    store.close()


@pytest.mark.parametrize("stock", [0, 1])
def test_every_answer_sequence_keeps_charge_and_item_together(stock: int) -> None:
    for answers in itertools.product(ANSWERS, repeat=3):
        _is_shop_consistent(answers, stock)
