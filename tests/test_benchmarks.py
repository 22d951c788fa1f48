"""Short CI versions of the two benchmarks: the input fuzz and the kill -9 soak.

The full runs (`python -m runtime.inputfuzz --inputs 1000000`, `python -m runtime.soak
--rounds 100`) print their figures; these runs check the same verdicts on a small budget,
and that the checks can fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pbft.events import MessageReceived
from pbft.replica import Replica
from runtime import inputfuzz
from runtime.localcluster import LocalCluster
from runtime.soak import SoakResult, SoakSettings, check_ledgers, run_soak


def test_input_fuzz_20000_inputs_no_crash_and_bounded_state() -> None:
    report = inputfuzz.run_fuzz(20_000, seed=7)
    assert report.crash_count == 0, report.crashes
    assert sum(report.tried.values()) == 20_000
    assert all(report.tried[name] > 0 for name in inputfuzz.CATEGORIES)
    # Hostile but well-signed messages got past the signature check into the handlers,
    # and every kind of refusal was exercised.
    assert report.accepted["signed_hostile"] > 0
    assert report.accepted["random_bytes"] == 0
    for reason in ("malformed_malformed", "malformed_non_canonical", "bad_signature"):
        assert report.drops[reason] > 0, reason
    assert report.decoder["oversize_frame"] > 0 and report.decoder["frames"] > 0
    assert any(key.startswith("server ok") for key in report.handshakes)
    assert any(key.startswith("client ok") for key in report.handshakes)
    assert any("malformed" in key for key in report.handshakes)
    # Bounded: the target's tables stay within their limits, and memory after the
    # warm-up tenth of the run grows by little (the bounded signature cache, mostly).
    state = report.replica_state
    assert state["pending_requests"] <= inputfuzz.CONFIG.pending_request_limit
    assert state["slots"] <= 2 * inputfuzz.CONFIG.watermark_window
    assert state["evidence"] <= 64
    assert report.rss_end - report.rss_warm < 32 * 2**20


def test_input_fuzz_is_deterministic_given_the_seed() -> None:
    first = inputfuzz.run_fuzz(1_500, seed=3)
    again = inputfuzz.run_fuzz(1_500, seed=3)
    other = inputfuzz.run_fuzz(1_500, seed=4)
    assert first.outcome_digest == again.outcome_digest
    assert first.tried == again.tried and first.drops == again.drops
    assert other.outcome_digest != first.outcome_digest


def test_input_fuzz_counts_an_exception_from_the_replica_as_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    handle = Replica.handle

    def fragile(self: Replica, event: object) -> list:
        # No corpus frame is this short; random_bytes inputs of 7 bytes are.
        if isinstance(event, MessageReceived) and len(event.data) == 7:
            raise IndexError("planted")
        return handle(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(Replica, "handle", fragile)
    assert inputfuzz.main(["--inputs", "3000", "--seed", "1"]) == 1
    printed = capsys.readouterr().out
    assert "IndexError('planted')" in printed
    assert "reproduce: python -m runtime.inputfuzz --seed 1 --inputs" in printed


@pytest.mark.slow
def test_soak_3_rounds_of_kill_9_no_lost_receipts(tmp_path: Path) -> None:
    settings = SoakSettings(rounds=3, clients=2, seed=5, final_settle_s=2.0)
    result = run_soak(settings, tmp_path)
    assert result.ok, result.failures
    assert result.rounds == 3 and result.kills >= 3
    assert result.submitted == result.decided > 0
    assert result.receipts_checked == result.decided
    assert result.lost_receipts == result.mismatches == result.undecided == 0
    assert result.conserved and result.digests_agree
    assert 0 < result.longest_stall_s < 60
    # The check has teeth: with two replicas' durable logs gone, receipts are held by
    # fewer than 2f + 1 ledgers and count as lost.
    for replica in (0, 1):
        shutil.rmtree(tmp_path / f"data-{replica}")
        (tmp_path / f"data-{replica}").mkdir()

    recheck = SoakResult()
    local = LocalCluster(tmp_path, tmp_path / "cluster.toml")
    check_ledgers(local, result.receipts, recheck)
    assert recheck.lost_receipts == recheck.receipts_checked == result.decided
