"""`pbft calibrate`: this machine's figures for the simulator's CPU model (sim/cpu.py).

- sign_us, verify_us: Ed25519 through `cryptography` (crypto.keys), one core, timed on a
  message the size of a payment request (median of several rounds).
- per_message_us: what the real replica and client cores cost per message beyond their
  signatures. A fault-free run of the simulator with the model switched on at zero cost
  counts every message each node handles; the CPU time of the run, less the Ed25519 work
  it really did (each signature made, each signature the shared cache really checked),
  divided by the messages handled. The simulator's own bookkeeping (its event queue, the
  trace hash) is in that figure, as a real host's framing and scheduling would be.

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
rate_per_s = 1000
overdraw = 0.0
"""


@dataclass(frozen=True)
class Calibration:
    sign_us: float
    verify_us: float
    per_message_us: float
    messages: int  # handled in the per-message run
    run_cpu_s: float

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
                "messages_timed": self.messages,
                "run_cpu_s": round(self.run_cpu_s, 3),
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
    scenario = parse_scenario(_SCENARIO.format(replicas=replicas, payments=payments))
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


def calibrate(seconds: float = 1.0) -> Calibration:
    sign_us, verify_us = measure_crypto(seconds)
    per_message_us, messages, cpu_s = measure_per_message(sign_us, verify_us)
    return Calibration(sign_us, verify_us, per_message_us, messages, cpu_s)
