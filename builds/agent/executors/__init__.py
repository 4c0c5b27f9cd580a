"""Where a job's command runs: on the agent's host, or in a fresh container of its step's image.

One interface, one module each (host.py, container.py); the runner drives whichever
`make_executor` gave it and never asks which. An executor gets the job's workspace
and artifacts directories ready, runs the command with its output going to the
job's shipper, stops it on cancel or timeout, and answers the result the finish
report carries: `{"outcome", "exit_code", "signal"}`, or a failure of its own
(`error_code`, `error_message`) when the command never ran.

`supervise` is the one loop both use while a command runs: log shipments,
cancel, timeout and the agent's own stop, whatever the command runs in.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builds.agent.isolation import RunAs
from builds.agent.logs import META, LogShipper
from builds.agent.spec import JobSpec
from builds.agent.transport import Transport

FLUSH_INTERVAL = 0.5  # seconds between log shipments while a command runs
EXECUTORS = ("host", "podman", "docker")


class JobStartFailed(Exception):
    """One job could not be prepared, started or run for a reason of the agent's host; the job fails, not the agent."""


@dataclass
class AgentContext:
    """What an executor needs of the agent that drives it."""

    transport: Transport
    workdir: Path
    abort: threading.Event  # the agent's second stop signal: cancel the job that runs
    tell_guard: Callable[[str], None]  # a line for guard.py: `+PGID`, `-PGID`, `+container NAME`, ...
    run_as: RunAs | None = None


class Executor:
    """Runs one job's command at a time for one agent."""

    kind = "host"

    def __init__(self, context: AgentContext) -> None:
        self.context = context

    def guard_arguments(self) -> list[str]:
        """Options for guard.py, so that it can end this executor's commands when the agent dies."""
        return []

    def guard_environment(self) -> dict[str, str]:
        """What guard.py's environment needs besides PATH to reach this executor's engine."""
        return {}

    def clean_up_after_crash(self) -> int:
        """End what a crashed run of this agent left running besides its processes; how many things it removed."""
        return 0

    def execute(self, job: JobSpec, *, workspace: Path, artifacts: Path, shipper: LogShipper,
                argv: list[str] | None = None) -> dict[str, Any]:
        """Run the job's command (or `argv`) in `workspace` until it ends or is stopped; the finish report's result.

        Raises JobStartFailed when the command can't be started for a reason of this host.
        """
        raise NotImplementedError

    def hand_over(self, job: JobSpec, shipper: LogShipper) -> None:
        """The job passed and has `builds_in` children: keep for them what this executor can (besides the
        workspace, which the runner uploads whatever the executor)."""

    def close(self) -> None:
        """The agent is exiting."""


def supervise(process: subprocess.Popen, *, job: JobSpec, shipper: LogShipper, context: AgentContext,
              deadline: float, stop: Callable[[], None]) -> str | None:
    """Wait for the command's process, shipping its log; stop it on cancel, timeout or the agent's abort.

    Returns the outcome (`canceled`, `timed_out`) or None when the command ended by itself.
    Heartbeats go from their own thread (runner.Heartbeat); its directives arrive as the
    shipper's events. Whatever this raises (the agent going down), the caller stops the
    command: nobody would be left to watch, stop or report it.
    """
    next_flush = time.monotonic() + FLUSH_INTERVAL
    outcome: str | None = None
    while process.poll() is None:
        now = time.monotonic()
        if now >= next_flush:
            shipper.flush()
            next_flush = now + FLUSH_INTERVAL
        if outcome is None and shipper.timeout_requested.is_set():
            outcome = "timed_out"
        if outcome is None and shipper.cancel_requested.is_set():
            outcome = "canceled"
        if outcome is None and context.abort.is_set():
            outcome = "canceled"
        if outcome is None and now >= deadline:
            outcome = "timed_out"
            # Shows the job as timing_out while the command is being stopped.
            context.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/heartbeat", token=job.token,
                                   body={"timing_out": True})
        if outcome is not None:
            reason = "timed out" if outcome == "timed_out" else "canceled"
            shipper.add(META, f"harmont-agent: {reason}; stopping the command\n")
            stop()
            break
        try:  # returns as soon as the command ends, instead of sleeping past it
            process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    return outcome


def stop_requested(job: JobSpec, shipper: LogShipper, context: AgentContext) -> bool:
    """Whether the job was canceled, timed out or the agent is aborting (checked outside `supervise`)."""
    return (shipper.cancel_requested.is_set() or shipper.timeout_requested.is_set() or context.abort.is_set())


def make_executor(kind: str, context: AgentContext, *, default_image: str | None = None, network: str | None = None,
                  memory: str | None = None, cpus: str | None = None,
                  options: Sequence[str] = ()) -> Executor:
    """The executor `--executor` names: `host`, or a container engine's CLI (`podman`, `docker`)."""
    from builds.agent.executors.host import HostExecutor

    if kind == "host":
        return HostExecutor(context)
    if kind in ("podman", "docker"):
        from builds.agent.executors.container import ContainerExecutor

        return ContainerExecutor(context, engine=kind, default_image=default_image, network=network,
                                 memory=memory, cpus=cpus, options=list(options))
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
