"""`pbft calibrate`: this machine's figures for the simulator's CPU model (sim/cpu.py).

- sign_us, verify_us: Ed25519 through `cryptography` (crypto.keys), one core, timed on a
  message the size of a payment request (median of several rounds).
- per_message_us: what the real replica and client cores cost per message beyond their
  signatures. A fault-free run of the simulator with the model switched on at zero cost
  counts every message each node handles; the CPU time of the run, less the Ed25519 work
  it really did (each signature made, each signature the shared cache really checked),
  divided by the messages handled. The simulator's own bookkeeping (its event queue, the
  trace hash) is in that figure, as a real host's framing and scheduling would be.

With `--bench FILE` (the JSON of `pbft bench --json`), per_message_us is fitted instead to
the real replicas' CPU per payment measured there (sim.calibrate.fit_to_bench), so the
model carries the runtime's own costs as well as the core's.

Figures only, measured now: a busy machine gives larger ones. The file written is what a
scenario's `[cluster] cpu = "FILE"` reads: a [cpu] table and, for the reader, [machine].
"""

from __future__ import annotations

import os
import platform
import statistics
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
    messages: int  # handled in the per-message run
    run_cpu_s: float
    # Where per_message_us comes from: the simulated core timed here, or a bench file.
    per_message_from: str = "simulated core"

    def document(self) -> dict[str, Any]:
        return {
            "cpu": {
                "sign_us": round(self.sign_us, 2),
                "verify_us": round(self.verify_us, 2),
                "per_message_us": round(self.per_message_us, 2),
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
    bench: dict[str, Any], sign_us: float, verify_us: float
) -> tuple[float, int, float]:
    """per_message_us that makes the model's replica CPU per payment what `pbft bench`
    measured (its first run): the real replicas' CPU per payment (/proc), less the
    signatures and checks the model counts for a payment, over the messages a replica
    handles for one. That puts the runtime's own costs (framing, msgpack, trio, syscalls,
    the durable store) into the figure, which the simulated core alone lacks."""
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
    spare_us = max(0.0, cpu_s * 1e6 * decided - crypto_us)
    return spare_us / max(1, messages), messages, float(cpu_s)


def calibrate(seconds: float = 1.0, bench: dict[str, Any] | None = None) -> Calibration:
    sign_us, verify_us = measure_crypto(seconds)
    if bench is not None:
        per_message_us, messages, cpu_s = fit_to_bench(bench, sign_us, verify_us)
        source = "pbft bench (replica CPU per payment)"
    else:
        per_message_us, messages, cpu_s = measure_per_message(sign_us, verify_us)
        source = "simulated core"
    return Calibration(sign_us, verify_us, per_message_us, messages, cpu_s, source)
