"""The dashboard (gateway/static/) in a real browser: Debian's Chromium, headless, driven by
Selenium through Debian's chromedriver, against a real `pbft gateway` process and a real
4-replica cluster (tests/gateway_harness.py). The page asks for an API key, shows the four
replicas with their own status, shows a payment made through the API with its status and
reason, and its receipt checker says valid for the payment's receipt and invalid for a
tampered one. What it renders from outside is text, never markup.

No browser, no test: a missing chromium or chromedriver FAILS this module (`.ci/run`
installs them: apt-get install chromium chromium-driver). Nothing is downloaded: the driver
is named by path, so Selenium Manager is never asked for one.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from gateway_harness import GatewayHarness
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from pbft.messages import Request
from pbft.receipt import Receipt, decode_receipt
from pbft.signed import peek, seal

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Upper bounds on a loaded 2-core machine; the page refreshes every 2 s.
WAIT_S = 45.0
PAGE_LOAD_S = 60.0
# client 0 owns acct-00000 and acct-00001, client 1 acct-00002 and acct-00003 (write_cluster).
PAYER, PAYEE = "acct-00000", "acct-00002"

T = TypeVar("T")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHarness]:
    with GatewayHarness.start(tmp_path_factory.mktemp("dashboard"), clients=2) as started:
        yield started


@pytest.fixture(scope="module")
def token(harness: GatewayHarness) -> str:
    return harness.create_key(0)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(
            f"the dashboard test needs Debian's chromium and chromedriver; missing: "
            f"{', '.join(missing)} (apt-get install chromium chromium-driver, as .ci/run does)"
        )
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox will not start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--window-size=1280,1024",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    """`condition`'s first truthy value within WAIT_S; on a timeout, say what and show the
    page's error line."""

    def check(driver: WebDriver) -> T | bool:
        try:
            return condition(driver)
        except StaleElementReferenceException:  # a refresh replaced the rows: look again
            return False

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(check)  # type: ignore[return-value]
    except TimeoutException:
        shown = driver.find_element(By.ID, "error").text
        raise AssertionError(f"{what}: not within {WAIT_S:g} s (page error: {shown!r})") from None


def sign_in(driver: WebDriver, harness: GatewayHarness, token: str) -> None:
    driver.get(harness.gateway.url + "/")
    if driver.find_element(By.ID, "dashboard").is_displayed():
        return
    driver.find_element(By.ID, "api-key").send_keys(token)
    driver.find_element(By.ID, "key-save").click()
    wait_for(driver, lambda d: d.find_element(By.ID, "dashboard").is_displayed(), "signed in")


def replica_rows(driver: WebDriver) -> dict[str, dict[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#replicas tbody tr")
    return {
        str(row.get_attribute("data-replica")): {
            str(cell.get_attribute("class")).split()[0]: cell.text
            for cell in row.find_elements(By.TAG_NAME, "td")
        }
        for row in rows
    }


def payment_row(driver: WebDriver, payment_id: str) -> dict[str, str] | None:
    for row in driver.find_elements(By.CSS_SELECTOR, "#payments tbody tr"):
        if row.get_attribute("data-payment") == payment_id:
            return {
                str(cell.get_attribute("class")): cell.text
                for cell in row.find_elements(By.TAG_NAME, "td")
            }
    return None


def pay(harness: GatewayHarness, token: str, payee: str = PAYEE, amount: int = 7) -> Any:
    with harness.http(token) as http:
        answer = http.post(
            "/v1/payments",
            json={"from": PAYER, "to": payee, "amount": amount},
            headers={"Idempotency-Key": f"dashboard-{uuid.uuid4()}"},
        )
    assert answer.status_code == 200, answer.text
    return answer.json()


def check_receipt(driver: WebDriver, receipt_b64: str) -> tuple[str, str]:
    box = driver.find_element(By.ID, "receipt-input")
    box.clear()
    box.send_keys(receipt_b64)
    verdict = driver.find_element(By.ID, "receipt-verdict")
    driver.execute_script("arguments[0].removeAttribute('data-verdict')", verdict)
    driver.find_element(By.ID, "receipt-check").click()
    shown = wait_for(
        driver,
        lambda d: d.find_element(By.ID, "receipt-verdict").get_attribute("data-verdict"),
        "a receipt verdict",
    )
    return str(shown), driver.find_element(By.ID, "receipt-detail").text


# --- the tests ------------------------------------------------------------------------------


def test_the_page_asks_for_a_key_and_refuses_a_wrong_one(
    browser: WebDriver, harness: GatewayHarness
) -> None:
    browser.get(harness.gateway.url + "/")
    assert browser.title == "pbft-payments gateway"
    assert browser.find_element(By.ID, "api-key").is_displayed()
    assert not browser.find_element(By.ID, "dashboard").is_displayed()
    browser.find_element(By.ID, "api-key").send_keys("gk_not-a-key")
    browser.find_element(By.ID, "key-save").click()
    status = wait_for(browser, lambda d: d.find_element(By.ID, "key-status").text, "a refusal")
    assert "refused" in status
    assert not browser.find_element(By.ID, "dashboard").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    # A real key, for a client this gateway does not serve (403): refused as well.
    browser.find_element(By.ID, "api-key").send_keys(harness.create_key(7))
    browser.find_element(By.ID, "key-save").click()
    status = wait_for(
        browser,
        lambda d: "client 7" in (text := d.find_element(By.ID, "key-status").text) and text,
        "a refusal naming client 7",
    )
    assert "refused" in status
    assert not browser.find_element(By.ID, "dashboard").is_displayed()


def test_the_page_shows_four_replicas_with_their_status(
    browser: WebDriver, harness: GatewayHarness, token: str
) -> None:
    browser.get_log("browser")  # drop what the wrong key's 401 logged
    sign_in(browser, harness, token)

    def all_answered(driver: WebDriver) -> dict[str, dict[str, str]] | None:
        rows = replica_rows(driver)
        ready = len(rows) == 4 and all(
            row["answered"] == "yes" and row["connected"] == "yes" for row in rows.values()
        )
        # Settled: one view, normal everywhere (a slow start may have cost a view change).
        settled = len({(row["view"], row["view-status"]) for row in rows.values()}) == 1
        return rows if ready and settled and rows["0"]["view-status"] == "normal" else None

    rows = wait_for(browser, all_answered, "four replicas answering, in one view")
    assert sorted(rows) == ["0", "1", "2", "3"]
    ports = {replica.replica_id: replica.port for replica in harness.local.cluster.replicas}
    for replica_id, row in rows.items():
        assert row["address"] == f"127.0.0.1:{ports[int(replica_id)]}"
        assert int(row["view"]) >= 0 and row["view-status"] == "normal"
        assert int(row["last-executed"]) >= 0 and int(row["stable-checkpoint"]) >= 0
    summary = browser.find_element(By.ID, "cluster-summary").text
    assert "n = 4, f = 1" in summary
    # The key stays in this tab's sessionStorage: a reload does not ask again.
    browser.refresh()
    wait_for(browser, lambda d: len(replica_rows(d)) == 4, "replicas after a reload")
    assert not browser.find_element(By.ID, "key-section").is_displayed()
    # No script error, no failed request, no CSP violation on the way.
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []


def test_a_payment_made_through_the_api_appears(
    browser: WebDriver, harness: GatewayHarness, token: str
) -> None:
    sign_in(browser, harness, token)
    payment = pay(harness, token, amount=11)
    assert payment["status"] == "confirmed"
    row = wait_for(browser, lambda d: payment_row(d, payment["id"]), "the payment's row")
    assert (row["status"], row["reason"]) == ("confirmed", "none")
    assert (row["from"], row["to"], row["amount"]) == (PAYER, PAYEE, "11")
    assert row["seq"] == str(payment["seq"])
    # The replicas executed it: their last executed reaches its seq.
    wait_for(
        browser,
        lambda d: all(
            int(row["last-executed"]) >= payment["seq"] for row in replica_rows(d).values()
        ),
        "replicas past the payment's seq",
    )


def test_the_receipt_checker_says_valid_and_invalid(
    browser: WebDriver, harness: GatewayHarness, token: str
) -> None:
    sign_in(browser, harness, token)
    payment = pay(harness, token, amount=13)
    receipt_b64 = payment["receipt"]["data"]
    verdict, _detail = check_receipt(browser, receipt_b64)
    assert verdict == "valid"
    fields = browser.find_element(By.ID, "receipt-fields").text
    assert PAYER in fields and "13" in fields

    # Tampered: the same request claiming a bigger amount, re-signed by its own client.
    receipt = decode_receipt(base64.b64decode(receipt_b64))
    _envelope, request = peek(receipt.request, Request)
    assert isinstance(request, Request)
    bigger = Request(
        request.client_id, request.request_id, request.op, request.payer, request.payee, 13_000,
    )  # fmt: skip
    key = harness.local.cluster.load_private_key("client", request.client_id)
    forged = Receipt(receipt.version, receipt.cluster_id, seal(bigger, key), receipt.replies)
    verdict, detail = check_receipt(browser, base64.b64encode(forged.encode()).decode())
    assert verdict == "invalid", detail
    # Not a receipt at all.
    verdict, _detail = check_receipt(browser, "bm90IGEgcmVjZWlwdA==")
    assert verdict in ("unreadable", "invalid")


def test_what_the_page_shows_from_outside_is_text_not_markup(
    browser: WebDriver, harness: GatewayHarness, token: str
) -> None:
    sign_in(browser, harness, token)
    name = '<img id="pwned" src="x">'
    with harness.http(token) as http:
        opened = http.post(
            "/v1/accounts",
            json={"name": name},
            headers={"Idempotency-Key": f"dashboard-{uuid.uuid4()}"},
        )
    assert opened.status_code in (200, 201), opened.text
    payment = pay(harness, token, payee=name, amount=3)
    row = wait_for(browser, lambda d: payment_row(d, payment["id"]), "the payment's row")
    assert row["to"] == name
    assert browser.find_elements(By.ID, "pwned") == []


def test_a_killed_replica_shows_as_not_answering(
    browser: WebDriver, harness: GatewayHarness, token: str
) -> None:
    sign_in(browser, harness, token)
    harness.local.kill(3)
    row = wait_for(
        browser,
        lambda d: (rows := replica_rows(d)).get("3", {}).get("answered") == "no" and rows["3"],
        "replica 3 not answering",
    )
    assert row["view"] == "—"
    wait_for(
        browser,
        lambda d: replica_rows(d)["3"]["connected"] == "no",
        "replica 3 disconnected",
    )
    others = replica_rows(browser)
    assert all(others[replica]["answered"] == "yes" for replica in ("0", "1", "2"))
    # The API still works with f replicas down.
    with httpx.Client(base_url=harness.gateway.url, timeout=60) as http:
        answer = http.get("/v1/cluster", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
    assert [replica["answered"] for replica in answer.json()["replicas"]] == [
        True,
        True,
        True,
        False,
    ]
