"""The measured agents: real `manage.py runagent` processes, each in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import BASE_DIR


@dataclass
class AgentProc:
    name: str
    process: subprocess.Popen
    log_path: Path



def start_agents(count: int, *, server: str, token: str, poll_interval: float, work: Path,
                 env: dict[str, str]) -> list[AgentProc]:
    agents = []
    # The agent needs no Django settings or database; give it none, as on a separate machine.
    agent_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "HARMONT_SECRET_KEY")}
    agent_env["HARMONT_AGENT_TOKEN"] = token
    for i in range(1, count + 1):
        name = f"bench-agent-{i}"
        log_path = work / f"{name}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "manage.py", "runagent", "--server", server, "--name", name,
                 "--workdir", str(work / name), "--poll-interval", str(poll_interval)],
                cwd=BASE_DIR, env=agent_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: cleanup kills it and anything it left behind
            )
        agents.append(AgentProc(name, process, log_path))
    return agents


def stop_agents(agents: list[AgentProc]) -> None:
    # First SIGTERM: the agent stops claiming, finishes its job, disconnects, exits 0.
    for agent in agents:
        if agent.process.poll() is None:
            try:
                agent.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for agent in agents:
        try:
            agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for agent in agents:
        try:
            os.killpg(agent.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            agent.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_for_agents(org_slug: str, count: int, agents: list[AgentProc], timeout: float = 30) -> None:
    from builds.models import Agent

    deadline = time.monotonic() + timeout
    while True:
        registered = Agent.objects.filter(organization__slug=org_slug, stopped_at__isnull=True).count()
        if registered >= count:
            return
        dead = [a for a in agents if a.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {a.name}:\n{a.log_path.read_text()[-1500:]}" for a in (dead or agents[:2]))
            raise RuntimeError(f"only {registered} of {count} agents registered\n{tails}")
        time.sleep(0.2)

