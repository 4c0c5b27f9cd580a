"""The host executor: `bash -c command` on the agent's own host, in its own process group."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from builds.agent.executors import Executor, JobStartFailed, supervise
from builds.agent.isolation import job_environment
from builds.agent.logs import META, STDERR, STDOUT, LogShipper, pump
from builds.agent.spec import JobSpec


class HostExecutor(Executor):
    kind = "host"

    def execute(self, job: JobSpec, *, workspace: Path, artifacts: Path, shipper: LogShipper,
                argv: list[str] | None = None) -> dict[str, Any]:
        if job.image:
            shipper.add(META, f"harmont-agent: image {job.image} requested; running on the agent host "
                              f"(no container engine)\n")
        run_as = self.context.run_as
        env = {**job_environment(job.env, agent_env=os.environ, run_as=run_as, default_home=str(workspace)),
               "HARMONT_JOB_ID": job.id, "HARMONT_WORKSPACE": str(workspace),
               "HARMONT_ARTIFACTS": str(artifacts)}
        try:
            process = subprocess.Popen(
                argv or ["bash", "-c", job.command], cwd=workspace, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                **(run_as.popen_options() if run_as is not None else {}),
            )
        except (OSError, ValueError) as exc:
            # The program can't be run: missing, not one --run-as's user may run (the agent's own
            # Python, for the renderer), its command or environment too large for exec (E2BIG) or
            # holding a NUL byte (ValueError). The job fails; the agent goes on.
            reason = f"could not start the command: {exc}"
            if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
                reason += " (the command and its environment are larger than this host lets a program start with)"
            raise JobStartFailed(reason) from exc
        tell_guard = self.context.tell_guard
        tell_guard(f"+{process.pid}")
        readers = [threading.Thread(target=pump, args=(stream, kind, shipper), daemon=True)
                   for stream, kind in ((process.stdout, STDOUT), (process.stderr, STDERR))]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + job.timeout_seconds
        try:
            outcome = supervise(process, job=job, shipper=shipper, context=self.context, deadline=deadline,
                                stop=lambda: stop_process_group(process, grace=job.cancel_grace_seconds))
        except BaseException:
            # The agent is going down (its token was revoked, a report was refused): don't
            # leave the command running with nobody left to watch, stop or report it.
            stop_process_group(process, grace=job.cancel_grace_seconds)
            if run_as is not None:
                run_as.kill_all_processes()
            tell_guard(f"-{process.pid}")
            raise
        process.wait()
        tell_guard(f"-{process.pid}")
        if run_as is not None:
            # Nothing of the command may outlive it: a process left behind could read the next
            # job's workspace and secrets (they are that user's too), or swap files under the
            # uploads the agent makes as root.
            run_as.kill_all_processes()
        for reader in readers:
            reader.join(timeout=5)
        code = process.returncode
        result: dict[str, Any] = {"outcome": outcome}
        if code is not None and code < 0:
            result.update(exit_code=128 - code, signal=-code)
        else:
            result.update(exit_code=code, signal=None)
        shipper.add(META, f"harmont-agent: exit status {result['exit_code']}\n")
        return result


def stop_process_group(process: subprocess.Popen, *, grace: float) -> None:
    """SIGTERM the command's whole process group; SIGKILL it if still there after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # also reaps children that outlived the leader
    except ProcessLookupError:
        pass
