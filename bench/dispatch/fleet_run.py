"""The idle fleet's part of the dispatch bench: starting and stopping bench/dispatch/fleet.py, the idle
windows its CPU is measured over, and what it is held to."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import CpuMeter
from bench.dispatch.phase import Phase
from bench.harness import BASE_DIR, percentile, say, verdict

FLEET_SCRIPT = Path(__file__).with_name("fleet.py")
FLEET_CPU_TARGET = 0.10  # of one core, for the server, on an idle fleet of 1,000
FLEET_THROUGHPUT_TARGET = 200.0  # jobs/s through the real agents, beside the fleet
FLEET_CLAIM_P95_TARGET = 0.25  # seconds


@dataclass
class Fleet:
    process: subprocess.Popen
    log_path: Path


def start_fleet(count: int, *, port: int, token: str, work: Path) -> Fleet:
    log_path = work / "fleet.log"
    process = subprocess.Popen([sys.executable, str(FLEET_SCRIPT), "--port", str(port), "--token", token,
                                "--agents", str(count)], cwd=BASE_DIR, stdout=subprocess.PIPE,
                               stderr=log_path.open("w"), stdin=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        raise RuntimeError(f"the fleet did not start ({line!r}):\n{log_path.read_text()[-2000:]}")
    return Fleet(process, log_path)


def stop_fleet(fleet: Fleet) -> dict[str, int]:
    """SIGTERM; the answers it counted (`jobs`: claims that got a job, which must be none)."""
    if fleet.process.poll() is not None:
        return {}
    fleet.process.send_signal(signal.SIGTERM)
    try:
        out, _ = fleet.process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        fleet.process.kill()
        return {}
    lines = [line for line in (out or "").splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def idle_window(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """CPU seconds per group while nothing but waiting happens for `seconds`."""
    before = meter.snapshot()
    time.sleep(seconds)
    return CpuMeter.delta(before, meter.snapshot())


def report_fleet(phases: list[Phase], idle: list[dict[str, float]], counts: dict[str, int],
                 args: argparse.Namespace) -> bool:
    without, with_fleet = idle
    wall = with_fleet["_wall"]

    def core_share(window: dict[str, float], name: str) -> float:
        return window[name] / window["_wall"]

    say()
    say(f"Idle fleet: {args.idle_fleet} simulated agents long-polling (wait 30 s, as agents ask by default), idle windows of "
        f"{args.idle_seconds:.0f} s:")
    say(f"  {'share of one core':<44}{'without':>14}{'with fleet':>14}{'fleet costs':>14}")
    for name, label in (("server", "server (gunicorn master + workers)"), ("db", "PostgreSQL backends"),
                        ("fleet", "the fleet's own process")):
        say(f"  {label:<44}{core_share(without, name):>14.1%}{core_share(with_fleet, name):>14.1%}"
            f"{core_share(with_fleet, name) - core_share(without, name):>14.1%}")
    answered = sum(v for k, v in counts.items() if k.isdigit())
    say(f"  claims answered while the fleet ran: {answered} ({counts}); per agent per minute "
        f"{answered / max(args.idle_fleet, 1) / max(wall, 1e-9) * 60 / max(1, len(idle)):.1f} over the run")
    by_name = {p.name: p for p in phases}
    say()
    say(f"  {'':<44}{'without fleet':>14}{'with fleet':>14}{'ratio':>8}")
    for name in ("burst", "paced"):
        if name in by_name and f"{name} +fleet" in by_name:
            a, b = by_name[name], by_name[f"{name} +fleet"]
            say(f"  {name + ': jobs/s end to end':<44}{a.result['jobs_per_s']:>14.1f}{b.result['jobs_per_s']:>14.1f}"
                f"{b.result['jobs_per_s'] / a.result['jobs_per_s']:>8.2f}")
            pa, pb = percentile(a.result["claim"], 95), percentile(b.result["claim"], 95)
            say(f"  {name + ': claim latency p95 (ms)':<44}{pa * 1000:>14.0f}{pb * 1000:>14.0f}"
                f"{pb / pa if pa else 0:>8.2f}")
    say()
    say("Fleet targets:")
    cost = core_share(with_fleet, "server") - core_share(without, "server")
    ok = cost <= FLEET_CPU_TARGET
    say(f"  server CPU on the idle fleet (of one core)  {cost:7.1%}   target <= {FLEET_CPU_TARGET:.0%}    "
        f"{verdict(cost <= FLEET_CPU_TARGET)}")
    burst = by_name.get("burst +fleet")
    if burst:
        value = burst.result["jobs_per_s"]
        ok &= value >= FLEET_THROUGHPUT_TARGET
        say(f"  jobs/s beside the fleet (burst)             {value:7.1f}   target >= {FLEET_THROUGHPUT_TARGET:.0f}   "
            f"{verdict(value >= FLEET_THROUGHPUT_TARGET)}")
    paced = by_name.get("paced +fleet")
    if paced:
        value = percentile(paced.result["claim"], 95)
        ok &= value <= FLEET_CLAIM_P95_TARGET
        say(f"  claim p95 beside the fleet (paced, ms)      {value * 1000:7.0f}   target <= "
            f"{FLEET_CLAIM_P95_TARGET * 1000:.0f}   {verdict(value <= FLEET_CLAIM_P95_TARGET)}")
    exact = all(p.result["ran_once"] == p.jobs for p in phases) and not counts.get("jobs")
    ok &= exact
    say(f"  every job ran exactly once, none by the fleet  {'yes' if exact else 'NO'}{'':>16}{verdict(exact)}")
    return ok
