"""A standing adversary: each attack against a local cluster while an honest client pays.

    python -m runtime.attack [--seconds 10] [--only NAME] [--json PATH|-]

For each attack (runtime/adversary.py) a fresh cluster of n replica processes on 127.0.0.1
(a temporary directory, free ports): a baseline phase (the honest client alone, closed loop,
`--concurrency` payments at a time) for `--seconds`, then the same load for `--seconds`
while an attacker process attacks, then `--seconds` more with the attacker gone. Prints,
per attack, the honest p50/p99 in both phases, view changes during the attack (the
replicas' JSON log lines), the replicas' largest RSS and their CPU seconds (/proc), how many
fresh clients (a new connection and one payment each second) paid, what the attacker
sent, and PASS/FAIL against the target:
during an attack the honest p99 stays within 3x of its baseline, no view change happens,
and every replica stays up. Exits 1 if any attack fails (after the whole table), 3 if a
cluster did not come up.

The attacker of catchup_amplification holds a backup's replica key: that replica's own
process is stopped for the attack's baseline and attack phases (the attacker is that
replica, Byzantine), and started again afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import trio

from runtime.adversary import ATTACKS
from runtime.attack_harness import (
    ATTACKER_CLIENT,
    GRACE_S,
    HONEST_CLIENT,
    PAYMENT_TIMEOUT_S,
    Phase,
    measure,
)
from runtime.client import PaymentClient
from runtime.localcluster import ClusterStartError, LocalCluster, cpu_seconds

P99_FACTOR = 3.0


@dataclass
class Result:
    attack: str
    baseline: Phase
    attacked: Phase
    attacker: dict[str, Any]
    attacker_exit: int | None
    byzantine_replica: int | None
    why: list[str]
    after: Phase | None = None  # the attacker gone: does the cluster come back?
    # CPU seconds the attacker process used during the attack phase: on a shared machine
    # its cost lands on the replicas' cores too, without being the replicas' work.
    attacker_cpu_s: float = 0.0

    @property
    def verdict(self) -> str:
        return "FAIL" if self.why else "PASS"

    @property
    def p99_ratio(self) -> float | None:
        if self.attacked.p99 is None or not self.baseline.p99:
            return None
        return self.attacked.p99 / self.baseline.p99

    def as_json(self) -> dict[str, object]:
        ratio = self.p99_ratio
        return {
            "attack": self.attack,
            "verdict": self.verdict,
            "why": self.why,
            "baseline": self.baseline.as_json(),
            "attacked": self.attacked.as_json(),
            "after": None if self.after is None else self.after.as_json(),
            "p99_ratio": None if ratio is None else round(ratio, 2),
            "byzantine_replica": self.byzantine_replica,
            "attacker": self.attacker,
            "attacker_exit": self.attacker_exit,
            "attacker_cpu_s": round(self.attacker_cpu_s, 2),
        }


WARMUP_S = 2.0
SETTLE_S = 1.0
RESTART_SETTLE_S = 3.0
START_ATTEMPTS = 3
# The attacker's connections come from another loopback address than the honest clients'
# (its own host); --attacker-address 127.0.0.1 makes it share theirs (as behind one NAT).
ATTACKER_ADDRESS = "127.0.0.2"


def _failures(baseline: Phase, attacked: Phase, attacker_exit: int | None) -> list[str]:
    why = []
    if attacker_exit != 0:
        # No verdict on an attack that did not run to its end.
        why.append(f"the attacker failed (exit {attacker_exit})")
    if attacked.p99 is None or len(attacked.latencies_ms) == attacked.unfinished:
        why.append("no honest payment completed")
    elif baseline.p99 is None or len(baseline.latencies_ms) == baseline.unfinished:
        why.append("no honest payment completed in the baseline: nothing to compare with")
    elif attacked.p99 > P99_FACTOR * baseline.p99:
        why.append(f"p99 {attacked.p99 / baseline.p99:.1f}x baseline")
    if attacked.view_changes:
        why.append(f"{attacked.view_changes} view changes")
    if attacked.dead:
        why.append("replica(s) died: " + ", ".join(f"{r} ({c})" for r, c in attacked.dead.items()))
    if attacked.halts:
        why.append(f"{attacked.halts} halted")
    return why


async def run_attack(
    name: str,
    local: LocalCluster,
    client: PaymentClient,
    seconds: float,
    concurrency: int,
    *,
    baseline_seconds: float | None = None,
    grace_s: float = GRACE_S,
    after_seconds: float = 0.0,
    source: str = ATTACKER_ADDRESS,
    attacker_prefix: tuple[str, ...] = (),
) -> Result:
    """A baseline phase (`baseline_seconds`, default `seconds`), then the attack phase (an
    attacker process) for `seconds`, then, if `after_seconds`, an aftermath phase without
    the attacker, while `client` pays `concurrency` payments at a time. Payments in flight
    when a phase ends may finish within `grace_s`. The attacker connects from `source`;
    `attacker_prefix` runs it under a wrapper that execs it (nice, taskset)."""
    n = len(local.cluster.replicas)
    primary = local.cluster.config.primary_of(local.current_view())
    # The replica key the attacker holds: a backup's (the highest id that is not primary).
    byzantine = max(r for r in range(n) if r != primary)
    stopped = name == "catchup_amplification"
    if stopped:
        local.stop(byzantine)
        await trio.sleep(SETTLE_S)
    command = [
        *attacker_prefix,
        sys.executable,
        "-m",
        "runtime.adversary",
        name,
        "--cluster",
        str(local.path),
        "--seconds",
        str(seconds),
        "--client",
        str(ATTACKER_CLIENT),
        "--replica",
        str(byzantine),
        "--source",
        source,
    ]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    if process.stdin is None or process.stdout is None:
        raise RuntimeError("no pipes to the attacker process")
    output = bytearray()
    try:
        with trio.move_on_after(120):
            while b"ready\n" not in output:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break
                output += chunk
        if b"ready\n" not in output:
            process.kill()
            await process.wait()
            nothing = Phase(0.0)
            why = [f"the attacker failed before attacking (exit {process.returncode})"]
            return Result(name, nothing, nothing, {}, process.returncode, None, why)
        base_s = seconds if baseline_seconds is None else baseline_seconds
        baseline = await measure(local, client, base_s, concurrency, grace_s)
        attacker_cpu_before = cpu_seconds(process.pid)
        await process.stdin.send_all(b"go\n")
        attacked = await measure(local, client, seconds, concurrency, grace_s)
        attacker_cpu_s = cpu_seconds(process.pid) - attacker_cpu_before
        with trio.fail_after(60):
            while True:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if stopped:
        local.start(byzantine)
        await trio.sleep(RESTART_SETTLE_S)
    after = (
        await measure(local, client, after_seconds, concurrency, grace_s) if after_seconds else None
    )
    await trio.sleep(SETTLE_S)
    lines = output.decode(errors="replace").splitlines()
    attacker: dict[str, Any] = {}
    if process.returncode == 0 and lines and lines[-1].startswith("{"):
        attacker = json.loads(lines[-1])
    return Result(
        name,
        baseline,
        attacked,
        attacker,
        process.returncode,
        byzantine if stopped else None,
        _failures(baseline, attacked, process.returncode),
        after,
        attacker_cpu_s,
    )


async def _run_one(local: LocalCluster, name: str, arguments: argparse.Namespace) -> Result:
    local.start_all()
    try:
        await local.wait_listening()
        client = PaymentClient(local.cluster, HONEST_CLIENT, timeout_s=PAYMENT_TIMEOUT_S)
        async with client:
            await client.wait_connected(timeout_s=30)
            await measure(local, client, WARMUP_S, arguments.concurrency)
            return await run_attack(
                name,
                local,
                client,
                arguments.seconds,
                arguments.concurrency,
                after_seconds=arguments.seconds,
                source=arguments.attacker_address,
                attacker_prefix=_attacker_prefix(arguments),
            )
    finally:
        local.stop_all()


def _attacker_prefix(arguments: argparse.Namespace) -> tuple[str, ...]:
    prefix: tuple[str, ...] = ()
    if arguments.attacker_cpus:
        prefix += ("taskset", "-c", arguments.attacker_cpus)
    if arguments.attacker_nice:
        prefix += ("nice", "-n", str(arguments.attacker_nice))
    return prefix


def _with_fresh_cluster(
    root: Path, name: str, arguments: argparse.Namespace, text: TextIO
) -> Result:
    """Run one attack on a cluster of its own; a cluster that does not come up (ports taken
    by other work on the machine meanwhile) is tried again on new ports, twice at most."""
    for attempt in range(START_ATTEMPTS):
        local = LocalCluster.create(
            root / f"{name}-{attempt}",
            replicas=arguments.replicas,
            clients=3,
            accounts_per_client=arguments.accounts_per_client,
        )
        try:
            return trio.run(_run_one, local, name, arguments)
        except (ClusterStartError, trio.TooSlowError) as error:
            problem = str(error) or "no connection to every replica within 30 s"
            print(f"  {name}: the cluster did not come up: {problem}", file=text, flush=True)
    raise ClusterStartError(f"{name}: no cluster came up in {START_ATTEMPTS} attempts")


def _attacker_summary(result: Result) -> str:
    attacker = result.attacker
    if not attacker:
        return f"attacker failed (exit {result.attacker_exit})"
    seconds = float(attacker.get("seconds") or 1.0)
    sent: dict[str, int] = attacker.get("sent", {})
    parts = [f"{key} {value / seconds:.0f}/s" for key, value in sorted(sent.items())]
    parts.append(f"{int(attacker['bytes_out']) / 2**20:.1f} MiB sent")
    parts.append(f"attacker CPU {result.attacker_cpu_s:.1f} s")
    if result.attack == "catchup_amplification":
        for label in ("old_prepare", "fetch_stable_0", "state_request_0"):
            parts.append(
                f"{label}: {attacker.get(label + '_bytes_out')} B in -> "
                f"{attacker.get(label + '_bytes_in')} B out = "
                f"{attacker.get(label + '_amplification')}x"
            )
    return ", ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(results: list[Result], stream: TextIO) -> None:
    print(
        f"{'attack':<22} {'base p50':>8} {'base p99':>8} {'att p50':>8} {'att p99':>8} "
        f"{'p99 x':>6} {'paid b/a':>11} {'vc b/a':>6} {'RSS MiB b/a':>13} {'CPU s b/a':>11}"
        f" {'fresh b/a':>11} {'load b/a':>9}  verdict",
        file=stream,
    )
    for result in results:
        base, att = result.baseline, result.attacked
        ratio = result.p99_ratio
        paid = f"{base.payments}/{att.payments}"
        rss = f"{base.rss_max_kib / 1024:.0f}/{att.rss_max_kib / 1024:.0f}"
        cpu = f"{base.cpu_s:.1f}/{att.cpu_s:.1f}"
        vc = f"{base.view_changes}/{att.view_changes}"
        load = f"{base.load_average:.1f}/{att.load_average:.1f}"
        fresh = f"{base.fresh_ok}/{base.fresh_tried} {att.fresh_ok}/{att.fresh_tried}"
        why = f" ({'; '.join(result.why)})" if result.why else ""
        print(
            f"{result.attack:<22} {_ms(base.p50):>8} {_ms(base.p99):>8} {_ms(att.p50):>8} "
            f"{_ms(att.p99):>8} {_ms(ratio):>6} {paid:>11} {vc:>6} {rss:>13} "
            f"{cpu:>11} {fresh:>11} {load:>9}  {result.verdict}{why}",
            file=stream,
        )
    print("", file=stream)
    for result in results:
        print(f"{result.attack:<22} {_attacker_summary(result)}", file=stream)
    afterwards = [result for result in results if result.after is not None]
    if afterwards:
        print("\nthe next phase, the attacker gone:", file=stream)
    for result in afterwards:
        after = result.after
        if after is not None:
            print(
                f"{result.attack:<22} p50 {_ms(after.p50)} ms, p99 {_ms(after.p99)} ms, "
                f"{after.payments} paid, {after.view_changes} view changes, "
                f"fresh clients {after.fresh_ok}/{after.fresh_tried}",
                file=stream,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.attack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    parser.add_argument("--only", choices=ATTACKS, help="run this attack only")
    parser.add_argument("--json", metavar="PATH|-", help="also write the results as JSON")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4, help="honest payments at a time")
    parser.add_argument("--accounts-per-client", type=int, default=100)
    parser.add_argument(
        "--attacker-address",
        default=ATTACKER_ADDRESS,
        help=f"the attacker's source address (default {ATTACKER_ADDRESS}; the honest "
        "clients connect from 127.0.0.1)",
    )
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker process at this nice level (0..19): to tell what it costs "
        "the replicas from what it costs the machine",
    )
    parser.add_argument(
        "--attacker-cpus", metavar="LIST", help="pin the attacker process (taskset -c LIST)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the cluster directory")
    arguments = parser.parse_args(argv)
    if not 0.5 <= arguments.seconds <= 3600:
        parser.error(f"--seconds must be in 0.5..3600, got {arguments.seconds}")
    if not 4 <= arguments.replicas <= 16:
        parser.error(f"--replicas must be in 4..16, got {arguments.replicas}")
    if not 1 <= arguments.concurrency <= 64:
        parser.error(f"--concurrency must be in 1..64, got {arguments.concurrency}")
    if not 1 <= arguments.accounts_per_client <= 100_000:
        parser.error("--accounts-per-client must be in 1..100000")
    if not 0 <= arguments.attacker_nice <= 19:
        parser.error(f"--attacker-nice must be in 0..19, got {arguments.attacker_nice}")
    if arguments.attacker_cpus is not None:
        if shutil.which("taskset") is None:
            parser.error("--attacker-cpus needs taskset, which is not installed")
        if not all(part.isdigit() for part in arguments.attacker_cpus.replace("-", ",").split(",")):
            parser.error(f"--attacker-cpus: not a CPU list: {arguments.attacker_cpus!r}")
    if arguments.json not in (None, "-") and not Path(arguments.json).parent.is_dir():
        parser.error(f"--json: no directory {str(Path(arguments.json).parent)!r}")
    try:
        with socket.socket() as probe:
            probe.bind((arguments.attacker_address, 0))
    except (OSError, UnicodeError) as error:
        parser.error(f"--attacker-address {arguments.attacker_address!r}: {error}")
    names = [arguments.only] if arguments.only else list(ATTACKS)
    to_stdout = arguments.json == "-"
    text = sys.stderr if to_stdout else sys.stdout
    root = Path(tempfile.mkdtemp(prefix="pbft-attack-"))
    print(
        f"{arguments.replicas} replica processes on 127.0.0.1, a fresh cluster per attack "
        f"({root}); {arguments.seconds:g} s baseline then {arguments.seconds:g} s attack; "
        f"honest client: {arguments.concurrency} payments at a time",
        file=text,
        flush=True,
    )
    results = []
    try:
        for name in names:
            results.append(_with_fresh_cluster(root, name, arguments, text))
            print(f"  {name}: {results[-1].verdict}", file=text, flush=True)
    except ClusterStartError as error:
        print(f"python -m runtime.attack: {error}", file=sys.stderr)
        return 3
    finally:
        if not arguments.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results, text)
    print(
        f"target: during an attack the honest p99 stays within {P99_FACTOR:g}x of its "
        "baseline, no view change, every replica up",
        file=text,
    )
    document = {
        "seconds": arguments.seconds,
        "replicas": arguments.replicas,
        "concurrency": arguments.concurrency,
        "results": [result.as_json() for result in results],
    }
    if to_stdout:
        print(json.dumps(document, indent=2))
    elif arguments.json:
        Path(arguments.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if all(result.verdict == "PASS" for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
