# %% [markdown]
# # Latency against offered load, in the simulator
#
# Runs `scenarios/fault-free.toml` at several arrival rates and cluster sizes and plots
# confirmation latency (p50, p99, simulated ms) and the share of payments decided, so a
# change to batching or timers can be judged by its curve, not one number.
# A notebook in percent format: open it in Jupyter (jupytext) or VS Code, or run it as a
# script: `python notebooks/latency_throughput.py [--quick] [--out=PATH]` writes
# `reports/latency_throughput.png` (or PATH).

# %%
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the figure goes to a file
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim.scenario import load_scenario  # noqa: E402
from sim.simulator import run_scenario  # noqa: E402

QUICK = "--quick" in sys.argv
RATES_PER_S = [50, 200, 800] if QUICK else [50, 100, 200, 400, 800, 1600]
SIZES = [4] if QUICK else [4, 7]
PAYMENTS = 60 if QUICK else 600

# %%
base = load_scenario(ROOT / "scenarios" / "fault-free.toml")
rows = []
for replicas in SIZES:
    for rate in RATES_PER_S:
        scenario = dataclasses.replace(
            base,
            cluster=dataclasses.replace(base.cluster, replicas=replicas),
            workload=dataclasses.replace(base.workload, payments=PAYMENTS, rate_per_s=rate),
        )
        result = run_scenario(scenario)
        rows.append(
            {
                "replicas": replicas,
                "rate_per_s": rate,
                "p50_ms": result.latency_ms["p50"],
                "p99_ms": result.latency_ms["p99"],
                "decided": (result.submitted - result.undecided) / max(1, result.submitted),
                "verdict": result.verdict,
            }
        )
        print(rows[-1])

# %%
figure, (latency_axis, decided_axis) = plt.subplots(1, 2, figsize=(11, 4))
for replicas in SIZES:
    mine = [row for row in rows if row["replicas"] == replicas]
    rates = [row["rate_per_s"] for row in mine]
    latency_axis.plot(rates, [row["p50_ms"] for row in mine], "o-", label=f"n = {replicas} p50")
    latency_axis.plot(rates, [row["p99_ms"] for row in mine], "x--", label=f"n = {replicas} p99")
    decided_axis.plot(rates, [row["decided"] for row in mine], "o-", label=f"n = {replicas}")
latency_axis.set(xscale="log", xlabel="offered load (payments/s)", ylabel="latency (simulated ms)")
decided_axis.set(xscale="log", xlabel="offered load (payments/s)", ylabel="share decided")
latency_axis.legend()
decided_axis.legend()
figure.suptitle("fault-free cluster: confirmation latency against load")
outputs = [argument.split("=", 1)[1] for argument in sys.argv if argument.startswith("--out=")]
output = Path(outputs[0]) if outputs else ROOT / "reports" / "latency_throughput.png"
output.parent.mkdir(parents=True, exist_ok=True)
figure.savefig(output, dpi=100, bbox_inches="tight")
print(f"wrote {output}")
