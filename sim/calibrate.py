"""`pbft calibrate`: this machine's figures for the simulator's CPU model (sim/cpu.py).

- sign_us, verify_us: Ed25519 through `cryptography` (crypto.keys), one core, timed on a
  message the size of a payment request (median of several rounds).
- fsync_us: a 4 KiB append and fsync in the temporary directory, wall time, four files at
  once as four replicas share a disk (a durable write's wait: a replica's votes wait for
  it before they are sent).
- per_message_us: what the real replica and client cores cost per message beyond their
  signatures. A fault-free run of the simulator with the model switched on at zero cost
  counts every message each node handles; the CPU time of the run, less the Ed25519 work
  it really did (each signature made, each signature the shared cache really checked),
  divided by the messages handled. The simulator's own bookkeeping (its event queue, the
  trace hash) is in that figure, as a real host's framing and scheduling would be.

With `--bench FILE` (the JSON of `pbft bench --json`), per_request_us is fitted as well, to
the real replicas' CPU per payment measured there (sim.calibrate.fit_to_bench), so the
model carries the runtime's own costs as well as the core's; without it per_request_us = 0.

Figures only, measured now: a busy machine gives larger ones. The file written is what a
scenario's `[cluster] cpu = "FILE"` reads: a [cpu] table and, for the reader, [machine].
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from crypto.keys import SigningKey
from sim.scenario import parse_scenario
from sim.simulator import Simulation

ROUNDS = 5
CALIBRATION_PAYMENTS = 400

_SCENARIO = """
name = "calibrate"
seed = 1
[cluster]
replicas = {replicas}
cpu = {{ sign_us = 0, verify_us = 0, per_message_us = 0 }}
[workload]
payments = {payments}
rate_per_s = {rate}
overdraw = 0.0
"""


class CalibrationError(ValueError):
    """A bench file that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Calibration:
    sign_us: float
    verify_us: float
    per_message_us: float
    per_request_us: float
    fsync_us: float
    messages: int  # handled in the per-message run
    run_cpu_s: float
    # Where the runtime's costs come from: the simulated core alone, or a bench file.
    per_message_from: str = "simulated core"

    def document(self) -> dict[str, Any]:
        return {
            "cpu": {
                "sign_us": round(self.sign_us, 2),
                "verify_us": round(self.verify_us, 2),
                "per_message_us": round(self.per_message_us, 2),
                "per_request_us": round(self.per_request_us, 2),
                "fsync_us": round(self.fsync_us, 2),
            },
            "machine": {
                "python": platform.python_version(),
                "processor": platform.machine(),
                "cores": len(os.sched_getaffinity(0)),
                "load_average": [round(value, 2) for value in os.getloadavg()],
                "per_message_from": self.per_message_from,
                "messages_counted": self.messages,
                # The timed run's CPU seconds; fitted to a bench: its replica CPU per payment.
                (
                    "run_cpu_s"
                    if self.per_message_from == "simulated core"
                    else "bench_replica_cpu_s_per_payment"
                ): round(self.run_cpu_s, 6),
            },
        }


def _per_call_us(call: Callable[[], object], seconds: float) -> float:
    """Median over ROUNDS rounds of `seconds / ROUNDS` each, in CPU microseconds per call."""
    rounds = []
    for _ in range(ROUNDS):
        count = 0
        started = time.process_time()
        while (elapsed := time.process_time() - started) < seconds / ROUNDS:
            for _ in range(20):
                call()
            count += 20
        rounds.append(elapsed / count * 1e6)
    return statistics.median(rounds)


def measure_fsync(writes: int = 30, writers: int = 4) -> float:
    """Median wall time of a 4 KiB append plus fsync in the temporary directory (where
    `pbft bench` puts its replicas' stores), in microseconds, with `writers` files synced
    at once from as many threads: a bench's replicas share one disk."""
    timings: list[float] = []
    lock = threading.Lock()

    def write(path: str) -> None:
        mine = []
        with open(path, "ab") as file:
            block = bytes(4096)
            for _ in range(writes):
                started = time.perf_counter()
                file.write(block)
                file.flush()
                os.fsync(file.fileno())
                mine.append((time.perf_counter() - started) * 1e6)
        with lock:
            timings.extend(mine)

    with tempfile.TemporaryDirectory(prefix="pbft-calibrate-") as root:
        threads = [
            threading.Thread(target=write, args=(os.path.join(root, f"fsync-{index}"),))
            for index in range(writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return statistics.median(timings)


def measure_crypto(seconds: float = 1.0) -> tuple[float, float]:
    """(sign_us, verify_us) of Ed25519 on this machine now."""
    key = SigningKey.derive(0, "calibrate")
    payload = bytes(range(160))
    signature = key.sign(b"calibrate", payload)
    verify_key = key.verify_key
    sign_us = _per_call_us(lambda: key.sign(b"calibrate", payload), seconds)
    verify_us = _per_call_us(lambda: verify_key.verify(b"calibrate", payload, signature), seconds)
    return sign_us, verify_us


def measure_per_message(
    sign_us: float, verify_us: float, replicas: int = 4, payments: int = CALIBRATION_PAYMENTS
) -> tuple[float, int, float]:
    """(per_message_us, messages handled, CPU seconds of the run)."""
    scenario = parse_scenario(_SCENARIO.format(replicas=replicas, payments=payments, rate=1000))
    simulation = Simulation(scenario)
    started = time.process_time()
    simulation.run()
    cpu_s = time.process_time() - started
    assert simulation.cores is not None  # the scenario switches the model on
    messages = sum(core.messages for core in simulation.cores.values())
    signs = sum(core.key.signs for core in simulation.cores.values())
    verified = simulation.signature_cache.statistics().misses
    crypto_s = (signs * sign_us + verified * verify_us) / 1e6
    per_message_us = max(0.0, cpu_s - crypto_s) / max(1, messages) * 1e6
    return per_message_us, messages, cpu_s


def fit_to_bench(
    bench: dict[str, Any], sign_us: float, verify_us: float, per_message_us: float
) -> tuple[float, int, float]:
    """per_request_us that makes the model's replica CPU per payment what `pbft bench`
    measured (its first run): the real replicas' CPU per payment (/proc), less what the
    model counts for a payment (signatures, checks, messages at the simulated core's
    per_message_us), over the requests the replicas execute. That puts the runtime's own
    costs (framing, msgpack, trio, syscalls, the durable store's CPU) into the model; per
    request, not per message, because the runtime's CPU per payment hardly falls with
    load while batching makes messages per payment fall."""
    runs = bench.get("runs")
    if not isinstance(runs, list) or not runs or not isinstance(runs[0], dict):
        raise CalibrationError("no runs in it (is it the JSON of pbft bench --json?)")
    run = runs[0]
    replicas = run.get("replicas")
    cpu_s = run.get("cpu_s_per_payment")
    rate = run.get("throughput_per_s")
    for name, value in (("replicas", replicas), ("cpu_s_per_payment", cpu_s)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise CalibrationError(f"runs[0].{name} is not a positive number: {value!r}")
    assert isinstance(replicas, int | float) and isinstance(cpu_s, int | float)
    if not isinstance(rate, int | float) or not 0 < rate <= 100_000:
        rate = 100.0
    if not 4 <= int(replicas) <= 64:
        raise CalibrationError(f"runs[0].replicas is not in 4..64: {replicas!r}")
    scenario = parse_scenario(
        _SCENARIO.format(replicas=int(replicas), payments=CALIBRATION_PAYMENTS, rate=rate)
    )
    simulation = Simulation(scenario)
    simulation.run()
    assert simulation.cores is not None
    decided = max(1, len(simulation.decided_at_us))
    replica_cores = [core for name, core in simulation.cores.items() if name[0] == "replica"]
    messages = sum(core.messages for core in replica_cores)
    crypto_us = sum(
        core.key.signs * sign_us + core.cache.verifies * verify_us for core in replica_cores
    )
    requests = sum(core.requests for core in replica_cores)
    spare_us = max(0.0, cpu_s * 1e6 * decided - crypto_us - messages * per_message_us)
    return spare_us / max(1, requests), messages, float(cpu_s)


def calibrate(seconds: float = 1.0, bench: dict[str, Any] | None = None) -> Calibration:
    sign_us, verify_us = measure_crypto(seconds)
    per_message_us, messages, cpu_s = measure_per_message(sign_us, verify_us)
    per_request_us = 0.0
    source = "simulated core"
    if bench is not None:
        per_request_us, messages, cpu_s = fit_to_bench(bench, sign_us, verify_us, per_message_us)
        source = "pbft bench (replica CPU per payment)"
    fsync_us = measure_fsync()
    return Calibration(
        sign_us, verify_us, per_message_us, per_request_us, fsync_us, messages, cpu_s, source
    )
