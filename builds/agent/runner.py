"""The agent's main loop and one job's run, from claim to finish."""

from __future__ import annotations

import argparse
import fcntl
import http.client
import json
import logging
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from builds.agent.checkout import SourceError, fetch_tarball, git_checkout
from builds.agent.executors import EXECUTORS, AgentContext, Executor, JobStartFailed, make_executor
from builds.agent.executors.host import HostExecutor, stop_process_group
from builds.agent.files import BoundedReader, collect_artifacts, pack, unpack
from builds.agent.isolation import (
    TOKEN_OPTION_WARNING,
    TOKEN_VARIABLE,
    RunAs,
    TokenError,
    forbid_inspection,
    needs_restart,
    read_token,
    restart_cleanly,
    token_file_warning,
)
from builds.agent.logs import MAX_CHUNK_CHARS, META, LogShipper, clean_text
from builds.agent.spec import JobSpec
from builds.agent.starts import START_REPORT_DELAY, PendingStart
from builds.agent.transport import VERSION, AgentError, Transport, Unauthorized
from harmont.redaction import redact_url_credentials

log = logging.getLogger("harmont.agent")

HEARTBEAT_INTERVAL = 5.0
# How long an idle claim may be held by the server (a long poll), and the most it allows.
# As long as the server holds a claim: an idle agent costs the server one request per 30 s.
CLAIM_WAIT_SECONDS = 30.0
MAX_CLAIM_WAIT = 30.0
# A server that held the claim answers with this header (builds.claim_waits); without it, poll.
CLAIM_WAITED_HEADER = "Harmont-Claim-Wait"
# A held claim's 204 may carry a key for the next claim, which the server can then hold at once.
CLAIM_RESUME_HEADER = "Harmont-Claim-Resume"
RENDERER = Path(__file__).with_name("render_pipeline.py")
GUARD = Path(__file__).with_name("guard.py")
LOCK_FILE = ".agent.lock"  # in the work directory, held for the agent's life
TAGS_VARIABLE = "HARMONT_AGENT_TAGS"  # the default of --tags
# The defaults of the executor's options, each `--executor` ... `--container-option` by its name.
EXECUTOR_VARIABLES = {"executor": "HARMONT_AGENT_EXECUTOR", "default_image": "HARMONT_AGENT_DEFAULT_IMAGE",
                      "network": "HARMONT_AGENT_NETWORK", "memory": "HARMONT_AGENT_MEMORY",
                      "cpus": "HARMONT_AGENT_CPUS", "container_options": "HARMONT_AGENT_CONTAINER_OPTIONS"}

# stop_process_group: moved to executors/host.py, still importable from here (the benchmarks use it).
__all__ = ["Agent", "JobStartFailed", "main", "stop_process_group"]


class Agent:
    def __init__(self, *, server: str, token: str, name: str | None = None, workdir: str | None = None,
                 poll_interval: float = 1.0, once: bool = False, run_as: RunAs | None = None,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL, tags: dict[str, str] | None = None,
                 executor: str = "host", default_image: str | None = None, network: str | None = None,
                 memory: str | None = None, cpus: str | None = None, container_options: tuple[str, ...] = (),
                 claim_wait: float = CLAIM_WAIT_SECONDS, start_report_delay: float = START_REPORT_DELAY) -> None:
        # A held claim must not look like a dead connection.
        self.transport = Transport(server, timeout=max(30.0, claim_wait + 15))
        self.claim_wait = claim_wait
        self.tags = dict(tags or {})
        self.token = token
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.workdir = Path(workdir or Path.cwd() / "var" / "agent" / self.name).resolve()
        self.poll_interval = poll_interval
        self.once = once
        self.run_as = run_as
        self.heartbeat_interval = heartbeat_interval
        # 0: report every start before the command runs (builds/agent/starts.py).
        self.start_report_delay = start_report_delay
        self.pending_start: PendingStart | None = None  # the current job's, while held back
        self.guard: subprocess.Popen | None = None  # see guard.py; started by run()
        self.session: str | None = None
        self.current_job: JobSpec | None = None
        # The last finish report also asked for the next job (`claim_next`): its answer, a job
        # or None for "none waiting", stands in for the next claim.
        self.handed_over: dict[str, Any] | None = None
        self.has_handover = False
        # Whether idle claims pause `poll_interval` between them: until a server holds one (`claim_wait`).
        self.polling = True
        self.claim_resume: str | None = None  # the key the last claim's 204 carried (CLAIM_RESUME_HEADER)
        self.stopping = threading.Event()  # first SIGTERM: finish the current job, claim no more
        self.abort = threading.Event()  # second SIGTERM: cancel the current job too
        context = AgentContext(transport=self.transport, workdir=self.workdir, abort=self.abort,
                               tell_guard=self._tell_guard, run_as=run_as)
        # Render jobs always run on the host: the renderer is the agent's own Python program.
        self.host_executor = HostExecutor(context)
        self.executor: Executor = (self.host_executor if executor == "host" else make_executor(
            executor, context, default_image=default_image, network=network, memory=memory, cpus=cpus,
            options=container_options))

    # ------------------------------------------------------------ lifecycle

    def handle_signal(self, signum: int, frame: object) -> None:
        if self.stopping.is_set():
            log.info("second stop signal: canceling the current job")
            self.abort.set()
            # Don't stay stuck retrying an unreachable server either.
            self.transport.stop_retrying.set()
        else:
            log.info("stop signal: finishing the current job, then exiting")
            self.stopping.set()
            if self.current_job is None:
                self.transport.stop_retrying.set()  # idle: nothing is left to report
                if self.claim_wait and self.session:
                    # A claim the server holds ends when the agent disconnects (401), not after its wait.
                    threading.Thread(target=self._disconnect, name="disconnect", daemon=True).start()

    def register(self) -> None:
        data = self.transport.json("POST", "/api/v0/agent/register", token=self.token, ok=(201,), body={
            "name": self.name, "hostname": socket.gethostname(), "version": VERSION,
            "os": f"{platform.system()} {platform.release()}", "tags": self.tags,
        })
        self.session = data["session_token"]
        log.info("registered as %s (%s)", data["agent"]["name"], data["agent"]["id"])

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None and not self.run_as.reaches(self.workdir):
            log.error("user %s can't get to the work directory %s (a directory above it is closed to them); "
                      "choose a --workdir they can reach", self.run_as.name, self.workdir)
            return 2
        # Held until this process ends, however it ends: an agent that can take it knows no
        # other one is using the directory, so whatever is there is a crashed run's.
        lock = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            log.error("another agent is using the work directory %s; give each agent a --workdir of its own",
                      self.workdir)
            return 2
        try:
            self.clean_up_after_crash()
            self.start_guard()
            self.register()
            # A job handed over with the last finish is this agent's already: it runs even if a
            # stop signal came meanwhile, like a job claimed just before one.
            while self.handed_over is not None or not self.stopping.is_set():
                claimed = self.claim()
                if claimed is None:
                    if self.once:
                        return 0
                    if self.polling:
                        self.stopping.wait(self.poll_interval * random.uniform(0.8, 1.2))
                    continue
                try:
                    job = JobSpec.from_claim(claimed)
                except (KeyError, TypeError) as exc:
                    log.error("a claimed job could not be read (%r); the reaper will fail it", exc)
                    continue
                self.current_job = job
                CURRENT_JOB.id = job.id
                try:
                    self.run_job(job)
                except AgentError as exc:
                    # The server refused a report about this job (it ended meanwhile, or the
                    # request was wrong): give the job up, keep serving the others. A refused
                    # credential (401) is this job's too: it ended longer ago than its grace,
                    # unless the agent token was revoked, which the next claim tells.
                    log.error("job %s abandoned: %s", job.id, exc)
                    shutil.rmtree(self.workdir / job.id, ignore_errors=True)
                    shutil.rmtree(self._artifacts_dir(job), ignore_errors=True)
                except Exception:  # noqa: BLE001 - not even its failure could be reported: still only this job's
                    log.exception("job %s abandoned: its failure could not be reported", job.id)
                    shutil.rmtree(self.workdir / job.id, ignore_errors=True)
                    shutil.rmtree(self._artifacts_dir(job), ignore_errors=True)
                finally:
                    self.current_job = None
                    CURRENT_JOB.id = None
                if self.once:
                    return 0
        except Unauthorized:
            log.error("the server refused this agent's token (revoked?); exiting")
            return 2
        except AgentError as exc:
            if not self.transport.stop_retrying.is_set():
                raise
            log.warning("stopped while the server was unreachable: %s", exc)
        finally:
            self.disconnect()
            self.executor.close()
            self.stop_guard()
            os.close(lock)
        return 0

    def clean_up_after_crash(self) -> None:
        """End what an earlier run of this agent left in its work directory: commands, workspaces.

        An agent killed outright (SIGKILL, the OOM killer, a power cut) leaves its job's
        workspace and artifacts behind, and commands that outlived their guard; its job
        was failed by the reaper meanwhile. Only what the agent itself makes there is
        touched (entries named by a job's id), so a --workdir that holds other things
        keeps them. Only called with the directory's lock held.
        """
        leftovers = [path for path in (*self.workdir.iterdir(), *self._artifacts_root().glob("*"))
                     if is_job_entry(path.name)]
        roots = tuple(str(path) + os.sep for path in leftovers if path.is_dir() and not path.is_symlink())
        killed = 0
        own_group = os.getpgrp()
        for entry in Path("/proc").glob("[0-9]*") if roots else ():
            try:
                if not (os.readlink(entry / "cwd") + os.sep).startswith(roots):
                    continue
                pid = int(entry.name)
                group = os.getpgid(pid)
                if group != own_group:  # a command's group: what it started in turn goes too
                    os.killpg(group, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to look at
            killed += 1
        if self.run_as is not None:
            self.run_as.kill_all_processes()
        removed = self.executor.clean_up_after_crash()
        if removed:
            log.warning("cleaned up after an earlier run: %d containers, snapshots and run directories of %s removed",
                        removed, self.executor.kind)
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if leftovers:
            log.warning("cleaned up after an earlier run in %s: %d processes ended, %d workspaces and files removed",
                        self.workdir, killed, len(leftovers))

    def start_guard(self) -> None:
        """Start the process that ends this agent's commands if the agent dies (guard.py)."""
        argv = [sys.executable, "-I", str(GUARD), *self.executor.guard_arguments()]
        if self.run_as is not None:
            argv += [str(self.run_as.uid), str(self.run_as.gid)]
        try:
            self.guard = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, cwd="/",
                                          env={"PATH": os.defpath, **self.executor.guard_environment()})
        except OSError as exc:
            log.warning("no guard process (%s): a command may outlive this agent if it is killed", exc)
            self.guard = None

    def stop_guard(self) -> None:
        if self.guard is None:
            return
        try:
            self.guard.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.guard.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.guard.kill()
        self.guard = None

    def _tell_guard(self, line: str) -> None:
        if self.guard is None:
            return
        try:
            self.guard.stdin.write(f"{line}\n".encode())  # type: ignore[union-attr]
            self.guard.stdin.flush()  # type: ignore[union-attr]
        except (OSError, ValueError):
            log.warning("the guard process is gone: a command may outlive this agent if it is killed")
            self.guard = None

    def disconnect(self) -> None:
        if self.session is None:
            return
        self._disconnect()

    def _disconnect(self) -> None:
        try:
            self.transport.request("POST", "/api/v0/agent/disconnect", token=self.session, body={}, retry=False)
        except (OSError, http.client.HTTPException):
            pass  # the server will notice the silence

    def claim(self) -> dict[str, Any] | None:
        """The next job, or None: none came (within `claim_wait`, where the server holds claims)."""
        assert self.session
        if self.has_handover:
            claimed, self.handed_over, self.has_handover = self.handed_over, None, False
            return claimed
        # Every retry of this request sends the same key: if an earlier attempt's answer was
        # lost, the server answers the job it took then rather than taking a second one.
        body: dict[str, Any] = {"claim_key": uuid.uuid4().hex}
        if self.claim_wait:
            body["wait"] = self.claim_wait
        # Only straight after a 204: after anything else the server must look (builds.claim_resumes).
        resume, self.claim_resume = self.claim_resume, None
        status, data = self.transport.request("POST", "/api/v0/agent/claim", token=self.session, body=body,
                                              headers={CLAIM_RESUME_HEADER: resume} if resume else None)
        if status == 204:
            # A server that held the claim says so; one that didn't (or an older one) is polled.
            self.polling = self.transport.last_header(CLAIM_WAITED_HEADER) is None
            self.claim_resume = self.transport.last_header(CLAIM_RESUME_HEADER)
            return None
        if status == 401:
            if self.stopping.is_set():
                return None  # our own disconnect ended the held claim
            raise Unauthorized(status, data[:200])
        if status != 200:
            raise AgentError(status, data[:200])
        return {**json.loads(data), "claim_request_id": self.transport.last_header("X-Request-Id")}

    # ------------------------------------------------------------ one job

    def run_job(self, job: JobSpec) -> None:
        """Run one job, from its claim to its finish report, heartbeating it all along.

        Whatever goes wrong on this host (a command or environment too large for exec, a
        missing shell, an unexpected error) fails this job with `job_start_failed` and the
        reason in its log; the agent goes on with the next. What the server refused
        (AgentError) propagates: the job is given up.
        """
        shipper = LogShipper(self.transport, job)
        # The heartbeat has a thread and a connection of its own: a checkout, a download, an
        # upload or a slow log shipment takes as long as it takes without the job looking lost.
        with Heartbeat(self.transport, job, shipper, interval=self.heartbeat_interval) as heartbeat:
            try:
                self._run_job(job, shipper, heartbeat)
            except AgentError:
                raise
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.exception("job %s failed on this agent", job.id)
                if self.pending_start is not None:
                    self.pending_start.take_for_finish()  # the command never ran: no start to report
                reason = redact_url_credentials(f"{type(exc).__name__}: {exc}" if not isinstance(exc, JobStartFailed)
                                                else str(exc))
                shipper.add(META, f"harmont-agent: the job could not run: {reason}\n")
                self._ship_final(shipper)
                self._finish(job, {"exit_code": None, "error_code": "job_start_failed",
                                   "error_message": clean_text(reason)[:1000]}, shipper)
            finally:
                self.pending_start = None
                shutil.rmtree(self.workdir / job.id, ignore_errors=True)
                shutil.rmtree(self._artifacts_dir(job), ignore_errors=True)

    def _run_job(self, job: JobSpec, shipper: LogShipper, heartbeat: Heartbeat) -> None:
        workspace = self.workdir / job.id
        shutil.rmtree(workspace, ignore_errors=True)
        workspace.mkdir(parents=True)
        try:
            checked_out = self._prepare_workspace(job, workspace, shipper)
            if self.run_as is not None:
                self.run_as.give(workspace)
        except (AgentError, OSError, tarfile.TarError, SourceError) as exc:
            # git and urllib name the URL they failed on, credentials included.
            reason = redact_url_credentials(str(exc))
            shipper.add(META, f"harmont-agent: could not prepare the workspace: {reason}\n")
            self._ship_final(shipper)
            self._finish(job, {"exit_code": None, "error_code": "workspace_unavailable",
                               "error_message": reason[:1000]}, shipper)
            return
        start: dict[str, Any] = {"agent_name": self.name}
        if checked_out is not None:
            start["commit"] = checked_out  # a build of HEAD takes it as its commit
        if job.start_with_finish and self.start_report_delay > 0:
            # Held back (builds/agent/starts.py): a cancel meanwhile reaches the command as any other.
            self.pending_start = PendingStart(start, lambda body: self._report_start(job, body, shipper),
                                              delay=self.start_report_delay)
            shipper.before_send = self.pending_start.send
            heartbeat.expect_start(self.pending_start)
        else:
            started = self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/start", token=job.token, body=start)
            if started.get("cancel"):
                shipper.add(META, "harmont-agent: canceled before start\n")
                self._ship_final(shipper)
                self._finish(job, {"exit_code": None, "outcome": "canceled"}, shipper)
                return
        claimed_by = f" (claimed by request {job.claim_request_id})" if job.claim_request_id else ""
        shipper.add(META, f"harmont-agent: running {job.step_key} on {self.name}{claimed_by}\n")
        artifacts = self._artifacts_dir(job)
        shutil.rmtree(artifacts, ignore_errors=True)
        artifacts.mkdir(parents=True)
        if self.run_as is not None:
            self.run_as.give(artifacts)
        if job.render:
            result = self._render(job, workspace, shipper)
        else:
            result = self._execute(job, workspace, shipper)
        if job.upload_workspace and result.get("outcome") is None and result.get("exit_code") == 0:
            self._upload_workspace(job, workspace, shipper)
            if not job.render:
                self.executor.hand_over(job, shipper)
        self._upload_artifacts(job, artifacts, shipper)  # whatever the result; never changes it
        self._ship_final(shipper)
        self._finish(job, result, shipper)
        shutil.rmtree(workspace, ignore_errors=True)

    def _prepare_workspace(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> str | None:
        """Fill the workspace; returns the full commit id a git checkout landed on (None for other sources)."""
        source = job.source or {}
        revision = None
        if source.get("kind") == "archive":
            archive = self.transport.download(source["path"], token=job.token)
            unpack(archive, workspace)
            shipper.add(META, f"harmont-agent: unpacked source ({len(archive)} bytes)\n")
        elif source.get("kind") == "url":
            archive = fetch_tarball(source["url"], sha256=source.get("sha256"))
            unpack(archive, workspace)
            shipper.add(META, f"harmont-agent: unpacked source from {redact_url_credentials(source['url'])} "
                              f"({len(archive)} bytes)\n")
        elif source.get("kind") == "git":
            revision = git_checkout(source["url"], commit=source["commit"], branch=source.get("branch"),
                                    workspace=workspace)
            shipper.add(META, f"harmont-agent: checked out {redact_url_credentials(source['url'])} at {revision}\n")
        if job.parent_workspace_path:
            archive = self.transport.download(job.parent_workspace_path, token=job.token)
            unpack(archive, workspace)
            shipper.add(META, f"harmont-agent: unpacked parent workspace ({len(archive)} bytes)\n")
        return revision

    def _render(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> dict[str, Any]:
        """Render the build's pipeline from the checkout and send its IR; the server plans the rest."""
        assert job.render is not None
        output = self.workdir / f"{job.id}.pipeline.json"
        # The server asks for the whole envelope too when the build re-registers the repository's pipelines.
        envelope = self.workdir / f"{job.id}.envelope.json" if job.render.get("envelope") else None
        outputs = [path for path in (output, envelope) if path is not None]
        for path in outputs:
            path.unlink(missing_ok=True)
            if self.run_as is not None:
                # The renderer runs as that user, who may not create files in the work directory.
                path.touch()
                self.run_as.give(path)
        argv = [sys.executable, "-I", str(RENDERER), job.render["source_slug"], *map(str, outputs)]
        result = self._execute(job, workspace, shipper, argv=argv)
        if result.get("outcome") is not None:
            return result
        try:
            if result.get("exit_code") != 0:
                problem = f"the renderer exited with status {result.get('exit_code')}"
            else:
                body: dict[str, Any] = {"pipeline_ir": json.loads(output.read_text())}
                if envelope is not None:
                    body["envelope"] = json.loads(envelope.read_text())
                answer = self.transport.json("POST", job.render["result_path"], token=job.token,
                                             body=body, ok=(200, 422))
                if "error" not in answer:
                    shipper.add(META, f"harmont-agent: pipeline sent; {answer['jobs']} jobs planned\n")
                    return result
                # The server already failed the build with the planner's reason.
                problem = f"the server rejected the rendered pipeline: {answer['error']['message']}"
                shipper.add(META, f"harmont-agent: render failed: {problem}\n")
                return {**result, "error_code": "render_failed", "error_message": problem[:2000]}
        except (OSError, ValueError) as exc:
            problem = f"the renderer left no pipeline: {exc}"
        finally:
            for path in outputs:
                path.unlink(missing_ok=True)
        shipper.add(META, f"harmont-agent: render failed: {problem}\n")
        self.transport.json("POST", job.render["result_path"], token=job.token, body={"error": problem})
        return {**result, "error_code": "render_failed", "error_message": problem[:2000]}

    def _execute(self, job: JobSpec, workspace: Path, shipper: LogShipper,
                 argv: list[str] | None = None) -> dict[str, Any]:
        """Run the job's command (or `argv`, the renderer, always on the host) through the agent's executor."""
        executor = self.executor if argv is None else self.host_executor
        return executor.execute(job, workspace=workspace, artifacts=self._artifacts_dir(job), shipper=shipper,
                                argv=argv)

    def _upload_workspace(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> None:
        archive = pack(workspace)
        status, body = self.transport.request("PUT", f"/api/v0/agent/jobs/{job.id}/workspace", token=job.token,
                                              raw=archive, content_type="application/gzip")
        if status != 204:
            shipper.add(META, f"harmont-agent: workspace upload refused ({status}): {body[:300]!r}\n")

    # ------------------------------------------------------------ artifacts

    def _artifacts_root(self) -> Path:
        # Beside the workspaces, not inside the job's: the workspace is packed for builds_in children.
        return self.workdir / "artifacts"

    def _artifacts_dir(self, job: JobSpec) -> Path:
        return self._artifacts_root() / job.id

    def _upload_artifacts(self, job: JobSpec, directory: Path, shipper: LogShipper) -> None:
        """Upload every file the job left under $HARMONT_ARTIFACTS, then remove the directory.

        A file that is not stored (too large, over the build's limit, a path the
        server refuses, the server unreachable) gets a line in the job's log; the
        job's result never changes because of an artifact.
        """
        try:
            files, skipped = collect_artifacts(directory)
            for relative, reason in skipped:
                shipper.add(META, f"harmont-agent: skipped artifact {relative}: {reason}\n")
            if not files:
                return
            for relative, path, nofollow in files:
                if not self._upload_artifact(job, relative, path, nofollow, shipper):
                    break
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong here, the job's report must still go out
            log.exception("job %s: uploading artifacts failed", job.id)
            shipper.add(META, f"harmont-agent: artifacts not uploaded: {exc}\n")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _upload_artifact(self, job: JobSpec, relative: str, path: Path, nofollow: bool,
                         shipper: LogShipper) -> bool:
        """PUT one file; False when the rest can't be stored either (the job ended, the server is gone)."""
        try:
            # O_NONBLOCK: a file swapped for a FIFO meanwhile must not hang the agent; O_NOFOLLOW:
            # nor may one swapped for a link to outside the directory be read.
            flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
            with os.fdopen(os.open(path, flags), "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    shipper.add(META, f"harmont-agent: skipped artifact {relative}: not a regular file\n")
                    return True
                body = BoundedReader(file, info.st_size)
                digest = body.sha256()
                query = urllib.parse.urlencode({"path": relative, "sha256": digest})
                status, data = self.transport.request(
                    "PUT", f"/api/v0/agent/jobs/{job.id}/artifacts?{query}", token=job.token, raw=body,
                    content_type="application/octet-stream", headers={"Content-Length": str(info.st_size)},
                    attempts=ARTIFACT_UPLOAD_ATTEMPTS)
        except (OSError, http.client.HTTPException, AgentError) as exc:
            shipper.add(META, f"harmont-agent: artifact {relative} not uploaded: {exc}\n")
            return not isinstance(exc, AgentError)  # AgentError here: the agent is stopping
        if status in (200, 201):
            shipper.add(META, f"harmont-agent: uploaded artifact {relative} ({info.st_size} bytes)\n")
            return True
        try:
            error = json.loads(data)["error"]
            code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            code, message = f"HTTP {status}", data[:300].decode(errors="replace")
        shipper.add(META, f"harmont-agent: artifact {relative} refused ({code}): {message}\n")
        return status != 401 and code != "job_not_active"

    def _report_start(self, job: JobSpec, body: dict[str, Any], shipper: LogShipper) -> None:
        """A held-back start, sent on its own: the command outlived the delay, or output is about to ship."""
        started = self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/start", token=job.token, body=body)
        if started.get("cancel"):
            shipper.cancel_requested.set()

    def _ship_final(self, shipper: LogShipper) -> None:
        # Large tails go ahead on their own; a small one rides along with the finish report.
        if sum(len(chunk["content"]) for chunk in shipper.pending) > MAX_CHUNK_CHARS:
            shipper.flush()

    def _finish(self, job: JobSpec, result: dict[str, Any], shipper: LogShipper | None = None) -> None:
        body = dict(result)
        if shipper is not None:
            shipper.close()
            with shipper.lock:
                body["chunks"] = list(shipper.pending)
        if self.pending_start is not None:
            started = self.pending_start.take_for_finish()
            if started is not None:
                body["started"] = started
        # A busy agent's next claim rides along with the report, unless it may claim no more.
        body["claim_next"] = not (self.once or self.stopping.is_set())
        if body["claim_next"]:
            body["claim_key"] = uuid.uuid4().hex  # see claim(): a retried report gets the same next job
        answer = self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/finish", token=job.token, body=body)
        if body["claim_next"] and "next" in answer:  # left out by older servers
            handed = answer["next"]
            if handed is not None:
                handed = {**handed, "claim_request_id": self.transport.last_header("X-Request-Id")}
            self.handed_over, self.has_handover = handed, True


def is_job_entry(name: str) -> bool:
    """Whether a work directory entry is one the agent makes for a job: `<job id>`, `<job id>.pipeline.json`."""
    try:
        uuid.UUID(name.removesuffix(".pipeline.json"))
    except ValueError:
        return False
    return True


ARTIFACT_UPLOAD_ATTEMPTS = 3


HEARTBEAT_JOIN_TIMEOUT = 35.0  # a beat under way may take the transport's whole timeout (30 s)


class Heartbeat:
    """Heartbeats one job from a thread of its own, from its claim until its finish report is answered.

    Its own thread has its own connection (Transport keeps one per thread), so no other
    request of the job (a checkout, a download, an upload, a log shipment retried while
    the server is away) delays it. A beat is tried once: the next one follows on time.
    The answer's directives (cancel, timeout) reach the command as the shipper's events.
    """

    def __init__(self, transport: Transport, job: JobSpec, shipper: LogShipper, *, interval: float) -> None:
        self.transport = transport
        self.job = job
        self.shipper = shipper
        self.interval = interval
        self.stop = threading.Event()
        self.wake = threading.Event()  # set by stop and by expect_start: plan the next wait again
        self.pending_start: PendingStart | None = None
        self.thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout=HEARTBEAT_JOIN_TIMEOUT)

    def expect_start(self, pending: PendingStart) -> None:
        """Send `pending` when it comes due, unless the finish or a log shipment took it first."""
        self.pending_start = pending
        self.wake.set()

    def _run(self) -> None:
        sent = False
        next_beat = time.monotonic() + self.interval
        try:
            while not self.stop.is_set():
                pending = self.pending_start
                wait = next_beat - time.monotonic()
                if pending is not None:
                    wait = min(wait, pending.due_in)
                self.wake.wait(max(0.0, wait))
                self.wake.clear()
                if self.stop.is_set():
                    break
                if pending is not self.pending_start:
                    continue  # a start to expect came meanwhile
                if pending is not None and pending.due_in <= 0:
                    self.pending_start = None
                    sent = True
                    try:
                        pending.send()  # the start counts as a beat (the server takes it as one)
                    except (OSError, http.client.HTTPException, ValueError, AgentError):
                        log.warning("job %s: the start report did not go out; the finish will carry it", self.job.id)
                    next_beat = time.monotonic() + self.interval
                    continue
                if time.monotonic() < next_beat:
                    continue
                next_beat = time.monotonic() + self.interval
                sent = True
                try:
                    status, data = self.transport.request("POST", f"/api/v0/agent/jobs/{self.job.id}/heartbeat",
                                                          token=self.job.token, body={}, retry=False)
                    beat = json.loads(data) if status == 200 else {}
                except (OSError, http.client.HTTPException, ValueError):
                    continue  # the next one may get through; the job's other requests report their own failures
                if not isinstance(beat, dict):
                    continue
                if beat.get("cancel"):
                    self.shipper.cancel_requested.set()
                if beat.get("timeout"):
                    self.shipper.timeout_requested.set()
        finally:
            if sent:
                self.transport._drop_connection()  # this thread's connection


def main(argv: list[str] | None = None) -> int:
    """`python manage.py runagent --server URL [--token-file PATH] [--name N] [--workdir DIR] [--once]
    [--run-as USER] [--executor host|podman|docker ...]`, the token in `--token-file` or `HARMONT_AGENT_TOKEN`."""
    forbid_inspection()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="manage.py runagent",
                                     description="Claim an organization's jobs from a Harmont server and run them. "
                                                 f"The agent token (hma_...) comes from --token-file or the "
                                                 f"{TOKEN_VARIABLE} environment variable.")
    parser.add_argument("--server", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", metavar="PATH",
                        help="a file holding the organization's agent token (readable by the agent's user only)")
    tokens.add_argument("--token", help="the agent token on the command line (deprecated: every process on the "
                                        "host can read it there)")
    tokens.add_argument("--token-fd", type=int, help=argparse.SUPPRESS)  # the hand-over of restart_cleanly()
    parser.add_argument("--name", help="this agent's name (default: host name and process id)")
    parser.add_argument("--workdir", help="where job workspaces go (default: var/agent/<name>)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between claims when idle, against a server that does not hold claims")
    parser.add_argument("--claim-wait", type=claim_wait_seconds, default=CLAIM_WAIT_SECONDS,
                        help=f"seconds the server may hold an idle claim until a job comes (0-{MAX_CLAIM_WAIT:g}, "
                             f"default {CLAIM_WAIT_SECONDS:g}; 0: poll every --poll-interval)")
    parser.add_argument("--heartbeat-interval", type=positive_seconds, default=HEARTBEAT_INTERVAL,
                        help=f"seconds between a job's heartbeats (default {HEARTBEAT_INTERVAL:g}); keep it well under "
                             f"the server's HARMONT_AGENT_HEARTBEAT_TIMEOUT")
    parser.add_argument("--tags", metavar="KEY=VALUE,...", default=os.environ.get(TAGS_VARIABLE, ""),
                        help=f"tags jobs select this agent by, e.g. queue=arm64,os=linux (default: "
                             f"${TAGS_VARIABLE}); without a queue tag the agent takes jobs of queue 'default'")
    parser.add_argument("--run-as", metavar="USER",
                        help="run job commands as this user, who then can't read the agent's token file or "
                             "its processes (the agent must run as root)")
    environ = os.environ
    containers = parser.add_argument_group("executor", "where job commands run (each option's default: the "
                                                       "environment variable named)")
    containers.add_argument("--executor", choices=EXECUTORS, default=environ.get(EXECUTOR_VARIABLES["executor"]) or "host",
                            help=f"host: on this host, as before; podman, docker: each job in a fresh container of "
                                 f"its step's image, through that engine's CLI (${EXECUTOR_VARIABLES['executor']})")
    containers.add_argument("--default-image", metavar="IMAGE", default=environ.get(EXECUTOR_VARIABLES["default_image"]),
                            help=f"the image of steps that name none (${EXECUTOR_VARIABLES['default_image']})")
    containers.add_argument("--network", default=environ.get(EXECUTOR_VARIABLES["network"]),
                            help=f"the containers' network, e.g. none (default: the engine's; "
                                 f"${EXECUTOR_VARIABLES['network']})")
    containers.add_argument("--memory", default=environ.get(EXECUTOR_VARIABLES["memory"]),
                            help=f"each container's memory limit, e.g. 4g (${EXECUTOR_VARIABLES['memory']})")
    containers.add_argument("--cpus", default=environ.get(EXECUTOR_VARIABLES["cpus"]),
                            help=f"each container's CPU limit, e.g. 2 or 1.5 (${EXECUTOR_VARIABLES['cpus']})")
    containers.add_argument("--container-option", metavar="OPTION", action="append", dest="container_option",
                            help=f"one more option for the engine's create, split like a shell would, e.g. "
                                 f"--container-option=--ulimit=nofile=1024:1024; repeatable "
                                 f"(${EXECUTOR_VARIABLES['container_options']}: all of them in one value)")
    args = parser.parse_args(argv)
    try:
        args.container_options = container_options(args.container_option, environ.get(
            EXECUTOR_VARIABLES["container_options"], ""))
    except ValueError as exc:
        parser.error(f"--container-option: {exc}")
    if args.executor != "host" and args.run_as:
        parser.error("--run-as applies to the host executor only: a container's command runs as its image's user")
    try:
        tags = parse_tags(args.tags)
    except ValueError as exc:
        parser.error(f"--tags: {exc}")
    run_as = None
    if args.run_as:
        try:
            run_as = RunAs.lookup(args.run_as)
        except LookupError as exc:
            parser.error(str(exc))
    if args.token is not None:
        sys.stderr.write(TOKEN_OPTION_WARNING)
    if args.token_file is not None and (warning := token_file_warning(args.token_file)):
        sys.stderr.write(warning)
    try:
        token = read_token(option=args.token, path=args.token_file, fd=args.token_fd, environ=os.environ)
    except TokenError as exc:
        parser.error(str(exc))
    if not token.startswith("hma_"):
        parser.error("the token must be an agent token (hma_...), not a personal API token")
    restart = needs_restart(token_on_command_line=args.token is not None, environ=os.environ)
    os.environ.pop(TOKEN_VARIABLE, None)
    if restart:
        restart_cleanly(token=token, argv=argv, options=_options_without_token(args), environ=os.environ)
        sys.stderr.write("warning: called from Python, the agent could not start itself again: the environment "
                         "it was started with, as /proc shows it, may still hold the token\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(job)s%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(CURRENT_JOB)
    try:
        agent = Agent(server=args.server, token=token, name=args.name, workdir=args.workdir, once=args.once,
                      poll_interval=args.poll_interval, run_as=run_as, heartbeat_interval=args.heartbeat_interval,
                      tags=tags, executor=args.executor, default_image=args.default_image, network=args.network,
                      memory=args.memory, cpus=args.cpus, container_options=tuple(args.container_options),
                      claim_wait=args.claim_wait)
    except ValueError as exc:  # no such engine on this host
        parser.error(str(exc))
    # First SIGTERM/SIGINT: finish the current job, then exit; a second one cancels it.
    signal.signal(signal.SIGTERM, agent.handle_signal)
    signal.signal(signal.SIGINT, agent.handle_signal)
    return agent.run()


def parse_tags(text: str) -> dict[str, str]:
    """`queue=arm64,os=linux` as a map; the server checks names and values (422 naming the bad tag)."""
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        if key.strip() in tags:
            raise ValueError(f"{key.strip()!r} is given twice")
        tags[key.strip()] = value.strip()
    return tags


def container_options(given: list[str] | None, default: str) -> list[str]:
    """The engine options of `--container-option` (each split like a shell would), else of the variable's value."""
    if given is None:
        return shlex.split(default)
    return [part for value in given for part in shlex.split(value)]


class CurrentJob(logging.Filter):
    """Puts the job the agent is running into each log line (`job <id>: `), from whichever thread logs it."""

    id: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = f"job {self.id}: " if self.id else ""
        return True


CURRENT_JOB = CurrentJob()


def claim_wait_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 <= seconds <= MAX_CLAIM_WAIT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_CLAIM_WAIT:g} seconds, got {value}")
    return seconds


def positive_seconds(value: str) -> float:
    seconds = float(value)
    if not 0 < seconds < 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {value}")
    return seconds


def _options_without_token(args: argparse.Namespace) -> list[str]:
    """The command line's options again (the token aside), for the agent's clean restart."""
    options = ["--server", args.server, "--poll-interval", repr(args.poll_interval),
               "--heartbeat-interval", repr(args.heartbeat_interval), "--claim-wait", repr(args.claim_wait)]
    for option, value in (("--name", args.name), ("--workdir", args.workdir), ("--run-as", args.run_as),
                          ("--tags", args.tags), ("--executor", args.executor),
                          ("--default-image", args.default_image), ("--network", args.network),
                          ("--memory", args.memory), ("--cpus", args.cpus)):
        if value:
            options += [option, value]
    # `=`: an option's value may start with `-`; quoted, since each is split again like a shell would.
    options += [f"--container-option={shlex.quote(part)}" for part in getattr(args, "container_options", [])]
    return options + (["--once"] if args.once else [])
