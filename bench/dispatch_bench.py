"""Dispatch throughput: real agents running 1,000 trivial jobs through the HTTP API (see bench/README.md).

One run: a fresh PostgreSQL database `harmont_bench_dispatch`; the production
server (gunicorn with harmont/gunicorn_conf.py, 2 harmont.worker workers; `--interface asgi`
for harmont.asgi on uvicorn workers); N real agent
processes (`manage.py runagent`); builds of independent one-line jobs created
through the REST API. Two phases, 1,000 jobs each:

- burst: all builds created back to back, as fast as one REST client can. Jobs/s
  from the first build's creation to the last job's `passed` is the capacity.
- paced: one build every (jobs per build / --rate) seconds, i.e. jobs arriving at
  the target rate. Time from `scheduled` to claimed is then dispatch latency, not
  time spent queueing behind 999 jobs created in the same second.

All figures are read from the database (server timestamps), so agents, server and
this script share one clock.

With `--idle-fleet N` (`make bench-fleet`: 1,000) the phases run twice: as above, then
again beside N simulated idle agents long-polling the same organization with tags
no job selects (bench/dispatch/fleet.py, one asyncio process). Between the two, the
server's CPU is measured over an idle window without the fleet and one with it: the
difference is what the idle fleet costs.

Usage: .venv/bin/python bench/dispatch_bench.py [--agents 8] [--poll-interval 0.5] [--rate 100]
                                                [--idle-fleet N] [--keep]
"""

from __future__ import annotations

import argparse
import sys
import time

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.cpu import CpuMeter, own_cpu_seconds, tree_pids
from bench.dispatch import DB_NAME, THROUGHPUT_TARGET
from bench.dispatch.agents import AgentProc, start_agents, stop_agents, wait_for_agents
from bench.dispatch.calls import measure_agent_calls
from bench.dispatch.diagnostics import measure_http_stack, measure_spawn, table_oids
from bench.dispatch.fleet_run import Fleet, idle_window, report_fleet, start_fleet, stop_fleet
from bench.dispatch.phase import Phase, run_phase
from bench.dispatch.report import report
from bench.dispatch.seed import migrate_and_seed
from bench.harness import ScratchRun, db_backend_pids, free_port, loadavg, percentile, say
from bench.server import ENTRY_POINTS, start_server, stop_group


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8, help="agent processes (default 8)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="the agents' --poll-interval when idle (default 0.5 s)")
    parser.add_argument("--builds", type=int, default=50, help="builds per phase (default 50)")
    parser.add_argument("--jobs-per-build", type=int, default=20, help="independent jobs per build (default 20)")
    parser.add_argument("--rate", type=float, default=THROUGHPUT_TARGET,
                        help="jobs/s offered in the paced phase (default 100, the throughput target)")
    parser.add_argument("--phases", default="burst,paced", help="comma list of burst, paced (default both)")
    parser.add_argument("--command", default='echo "$HARMONT_JOB_ID" >> "$BENCH_RUNS_FILE"',
                        help="each job's cmd; the default appends the job id to a file (a bash builtin, as "
                             "cheap as `true`) so the script can prove every job ran exactly once")
    parser.add_argument("--idle-fleet", type=int, default=0,
                        help="also run the phases beside this many simulated idle agents (make bench-fleet: 1000)")
    parser.add_argument("--idle-seconds", type=float, default=30.0,
                        help="length of each idle window the fleet's CPU is measured over (default 30 s: one "
                             "claim wait, so every simulated agent's claim ends once in it)")
    parser.add_argument("--show-queries", action="store_true", help="print the SQL of each agent call")
    parser.add_argument("--interface", choices=list(ENTRY_POINTS), default="worker",
                        help="the server: worker (harmont/gunicorn_conf.py, what production runs; default), "
                             "asgi (harmont.asgi on uvicorn workers) or wsgi (sync workers: no long polls)")
    parser.add_argument("--keep", action="store_true", help=f"keep the {DB_NAME} database afterwards")
    args = parser.parse_args()
    names = [n.strip() for n in args.phases.split(",") if n.strip()]
    if not names or any(n not in ("burst", "paced") for n in names):
        parser.error("--phases takes burst and/or paced")

    with ScratchRun(DB_NAME, prefix="harmont-dispatch-", keep=args.keep) as run:
        from django.conf import settings
        from django.db import connections

        runs_file = run.work / "runs.txt"
        say(f"load average at start: {loadavg()}")
        seed, probe = migrate_and_seed(args.jobs_per_build, args.command)
        costs = measure_agent_calls(probe, args.jobs_per_build, run.work / "probe-runs.txt")
        conn_max_age = settings.DATABASES["default"].get("CONN_MAX_AGE")
        relations = table_oids()
        connections.close_all()

        port = free_port()
        server = start_server(port, run.server_log, run.env, interface=args.interface)
        run.defer(stop_group, server)
        base = f"http://127.0.0.1:{port}"
        say(f"server on {base}; starting {args.agents} agents (poll interval {args.poll_interval} s)")
        agents: list[AgentProc] = []
        run.defer(stop_agents, agents)  # stopped before the server, which they talk to
        agents += start_agents(args.agents, server=base, token=seed.agent_token, poll_interval=args.poll_interval,
                               work=run.work, env=run.env)
        wait_for_agents(seed.org, args.agents, agents)
        time.sleep(1.0)  # let every agent reach its idle poll loop

        fleet: list[Fleet] = []
        meter = CpuMeter({
            "server": lambda: (tree_pids(server.pid), False),
            "db": lambda: (db_backend_pids(DB_NAME), False),
            "agents": lambda: ([a.process.pid for a in agents], True),
            "fleet": lambda: ([f.process.pid for f in fleet], False),
            "self": own_cpu_seconds,
        })
        phases: list[Phase] = []
        index = 0

        def run_phases(suffix: str) -> None:
            nonlocal index
            for name in names:
                interval = 0.0 if name == "burst" else args.jobs_per_build / args.rate
                phase = Phase(name + suffix, args.builds, args.jobs_per_build, interval)
                run_phase(phase, port=port, seed=seed, runs_file=runs_file, first_index=index, agents=agents,
                          meter=meter, relations=relations)
                index += phase.builds
                say(f"  phase {phase.name}: {phase.jobs} jobs, {phase.result['jobs_per_s']:.1f} jobs/s end to end, "
                    f"claim p95 {percentile(phase.result['claim'], 95) * 1000:.0f} ms (load {phase.load_after})")
                phases.append(phase)
                time.sleep(1.0)

        run_phases("")
        idle: list[dict[str, float]] = []
        fleet_counts: dict[str, int] = {}
        if args.idle_fleet:
            idle.append(idle_window(meter, args.idle_seconds))
            say(f"starting an idle fleet of {args.idle_fleet} long-polling agents")
            fleet.append(start_fleet(args.idle_fleet, port=port, token=seed.agent_token, work=run.work))
            run.defer(stop_fleet, fleet[0])
            time.sleep(3.0)  # every simulated agent's claim is held
            idle.append(idle_window(meter, args.idle_seconds))
            run_phases(" +fleet")
            fleet_counts = stop_fleet(fleet[0])
        stack = measure_http_stack(port, server.pid)
        stop_agents(agents)
        spawn = measure_spawn(run.work)
        report(phases, costs, args, conn_max_age, stack=stack, spawn=spawn)
        if args.idle_fleet:
            report_fleet(phases, idle, fleet_counts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
