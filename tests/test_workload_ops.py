"""Tests for the operation mix of sim.workload and its `[workload]` keys in scenario files."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sim import ops_cost
from sim.scenario import ScenarioError, parse_scenario
from sim.workload import (
    OPENED_PREFIX,
    REFERENCE_MIN_AGE_US,
    TRANSFER_ONLY,
    UNKNOWN_REFERENCE_BASE,
    PlannedPayment,
    genesis_accounts,
    plan_payments,
)

MIX = (
    ("transfer", 0.5),
    ("authorize", 0.2),
    ("capture", 0.1),
    ("void", 0.05),
    ("refund", 0.1),
    ("open_account", 0.05),
)
CLIENTS = 4
ACCOUNTS = 8


def plan(
    seed: int = 1,
    *,
    rate_per_s: float = 200,
    mix: tuple[tuple[str, float], ...] = MIX,
    overdraw: float = 0.0,
    wrong_ref: float = 0.0,
    payments: int = 600,
) -> list[PlannedPayment]:
    return plan_payments(
        random.Random(seed),
        payments=payments,
        rate_per_s=rate_per_s,
        clients=CLIENTS,
        accounts=ACCOUNTS,
        initial_balance=1000,
        overdraw=overdraw,
        mix=mix,
        expires_in_ms=(100, 900),
        wrong_ref=wrong_ref,
    )


def owner(name: str) -> int:
    if name.startswith(OPENED_PREFIX):
        return int(name[len(OPENED_PREFIX) :].split("-")[0])
    index = genesis_accounts(ACCOUNTS, CLIENTS, 1000).index(name)
    assert index is not None
    return index % CLIENTS


def test_a_transfer_only_mix_plans_what_the_default_plans() -> None:
    default = plan_payments(
        random.Random(3),
        payments=300,
        rate_per_s=100,
        clients=CLIENTS,
        accounts=ACCOUNTS,
        initial_balance=1000,
        overdraw=0.1,
    )
    assert plan(3, rate_per_s=100, mix=TRANSFER_ONLY, overdraw=0.1, payments=300) == default
    assert {request.op for request in default} == {"transfer"}


def test_the_same_seed_plans_the_same_requests_and_another_seed_others() -> None:
    assert plan(7, overdraw=0.1, wrong_ref=0.2) == plan(7, overdraw=0.1, wrong_ref=0.2)
    assert plan(7) != plan(8)


def test_every_operation_of_the_mix_is_planned_roughly_by_its_weight() -> None:
    counts = Counter(request.op for request in plan(payments=2000))
    assert set(counts) == {op for op, _ in MIX}
    # Captures, voids and refunds fall back to transfers while nothing is old enough to name.
    assert counts["authorize"] > counts["capture"] > counts["open_account"]
    assert counts["transfer"] >= 0.5 * 2000


def test_captures_and_voids_name_an_earlier_hold_at_most_once_for_the_payees_owner() -> None:
    requests = plan()
    holds = {
        (request.client_id, request.request_id): request
        for request in requests
        if request.op == "authorize"
    }
    closed: set[tuple[int, int]] = set()
    for request in requests:
        if request.op not in ("capture", "void"):
            continue
        ref = (request.ref_client, request.ref_request)
        hold = holds[ref]
        assert hold.at_us <= request.at_us - REFERENCE_MIN_AGE_US
        assert ref not in closed
        closed.add(ref)
        assert request.payer == request.payee == ""
        if request.op == "capture":
            assert request.client_id == owner(hold.payee)
            assert 1 <= request.amount <= hold.amount
        else:
            assert request.client_id in (owner(hold.payer), owner(hold.payee))
            assert request.amount == 0
    assert closed


def test_refunds_name_an_earlier_payment_and_never_plan_more_than_it_paid() -> None:
    requests = plan(payments=1500)
    paid: dict[tuple[int, int], tuple[str, int]] = {}
    refunded: Counter[tuple[int, int]] = Counter()
    for request in requests:
        if request.op == "transfer":
            paid[(request.client_id, request.request_id)] = (request.payee, request.amount)
        elif request.op == "capture":
            paid[(request.ref_client, request.ref_request)] = ("", request.amount)
        elif request.op == "refund":
            ref = (request.ref_client, request.ref_request)
            payee, amount = paid[ref]
            if refunded[ref] + request.amount > amount:
                # Only once it is refunded in full (then exceeds_refundable, deliberately).
                assert refunded[ref] == amount
            else:
                refunded[ref] += request.amount
            if payee:
                assert request.client_id == owner(payee)
    assert refunded


def test_holds_get_an_expiry_in_the_range_and_other_operations_none() -> None:
    for request in plan():
        if request.op == "authorize":
            assert 100 <= request.expires_in_ms <= 900
        else:
            assert request.expires_in_ms == 0


def test_opened_accounts_are_named_for_their_opener_and_then_used() -> None:
    requests = plan(payments=2000)
    opened = [request for request in requests if request.op == "open_account"]
    assert opened
    for request in opened:
        assert request.payer.startswith(OPENED_PREFIX)
        assert owner(request.payer) == request.client_id
        assert (request.payee, request.amount) == ("", 0)
    names = {request.payer for request in opened}
    used = {
        name
        for request in requests
        if request.op in ("transfer", "authorize")
        for name in (request.payer, request.payee)
    }
    assert names & used


def test_wrong_references_name_closed_holds_or_ids_nobody_used() -> None:
    requests = plan(wrong_ref=0.5, payments=1500)
    holds = {
        (request.client_id, request.request_id) for request in requests if request.op == "authorize"
    }
    named: Counter[tuple[int, int]] = Counter()
    unknown = 0
    for request in requests:
        if request.op in ("capture", "void", "refund"):
            ref = (request.ref_client, request.ref_request)
            if request.ref_request >= UNKNOWN_REFERENCE_BASE:
                unknown += 1
            elif request.op != "refund":
                assert ref in holds
                named[ref] += 1
    assert unknown
    assert any(count > 1 for count in named.values())


def test_overdraw_plans_captures_beyond_the_hold() -> None:
    requests = plan(overdraw=0.5, payments=1500)
    amounts = {
        (request.client_id, request.request_id): request.amount
        for request in requests
        if request.op == "authorize"
    }
    assert any(
        request.amount > amounts[(request.ref_client, request.ref_request)]
        for request in requests
        if request.op == "capture"
    )


SCENARIO = 'name = "mix"\n[workload]\n'


def test_the_mix_loads_in_operation_order_without_zero_weights() -> None:
    workload = parse_scenario(
        SCENARIO + "mix = { refund = 1, transfer = 3, void = 0 }\n"
        "expires_in_ms = { min = 10, max = 20 }\nwrong_ref = 0.25\n"
    ).workload
    assert workload.mix == (("transfer", 3.0), ("refund", 1.0))
    assert workload.expires_in_ms == (10, 20)
    assert workload.wrong_ref == 0.25


def test_a_scenario_without_a_mix_submits_transfers_only() -> None:
    assert parse_scenario(SCENARIO).workload.mix == TRANSFER_ONLY


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("mix = { pay = 1 }", "workload.mix.pay", "unknown operation"),
        ("mix = { transfer = -0.5 }", "workload.mix.transfer", "at least 0"),
        ("mix = { transfer = 0, void = 0 }", "workload.mix", "weight above 0"),
        ("mix = {}", "workload.mix", "weight above 0"),
        ('mix = { transfer = "1" }', "workload.mix.transfer", "expected a number"),
        ("mix = { transfer = nan }", "workload.mix.transfer", "finite"),
        ("mix = 1", "workload.mix", "expected a table"),
        ("expires_in_ms = { min = 5, max = 4 }", "workload.expires_in_ms.max", "at least min"),
        ("expires_in_ms = { min = 0, max = 4 }", "workload.expires_in_ms.min", "must be in"),
        ("expires_in_ms = { max = 4 }", "workload.expires_in_ms.min", "required"),
        ("expires_in_ms = { min = 1, max = 4, at = 2 }", "workload.expires_in_ms.at", "unknown"),
        ("wrong_ref = 1.5", "workload.wrong_ref", "[0, 1]"),
    ],
)
def test_a_bad_mix_or_expiry_is_one_error_naming_the_field(
    text: str, field: str, problem: str
) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario(SCENARIO + text + "\n")
    assert raised.value.field == field
    assert problem in raised.value.problem
    assert "\n" not in str(raised.value)


def test_ops_cost_prints_both_runs_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert ops_cost.main(["scenarios/ops-mix.toml", "--payments", "40", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("scenario   ops-mix (40 requests")
    assert [line.split()[0] for line in lines[2:]] == ["transfers", "mixed", "ratio"]
    assert all("us CPU per request" in line for line in lines[2:4])


@pytest.mark.parametrize("mix", ["transfer=1,pay=2", "transfer=x", "transfer=inf", "void=0"])
def test_ops_cost_refuses_a_bad_mix_in_one_line(
    mix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ops_cost.main(["--mix", mix, "--payments", "10"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ops_cost: --mix: ")
    assert error.count("\n") == 1
