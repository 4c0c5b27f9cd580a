"""The agent program: claims jobs from a Harmont server over HTTP and runs them.

It imports nothing from the server (no Django, no database), so it runs on any
machine that has this project's code and can reach the server's URL.

One job at a time:
  claim → fetch source / parent workspace → start → run `bash -c cmd` in its own
  process group, shipping output as numbered chunks every 500 ms and
  heartbeating → upload the workspace (if a `builds_in` child needs it) → finish.

Every request is retried with backoff on network errors and 5xx answers. Log
chunks carry a per-job sequence number and the server stores each (job, seq)
once, so a retried batch never duplicates or loses output.
"""

from __future__ import annotations

import codecs
import http.client
import io
import json
import logging
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("harmont.agent")

VERSION = "1.0"
STDOUT, STDERR, META = 0, 1, 2
FLUSH_INTERVAL = 0.5  # seconds between log shipments while a command runs
MAX_CHUNK_CHARS = 64 * 1024
HEARTBEAT_INTERVAL = 5.0


class AgentError(Exception):
    """The server refused a request in a way retrying will not fix."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Unauthorized(AgentError):
    """The agent token was revoked (or the job credential is no longer valid)."""


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Transport:
    """Small JSON-over-HTTP client: one keep-alive connection per thread, retries with backoff."""

    def __init__(self, server: str, *, timeout: float = 30.0, max_backoff: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(server.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server must be an http(s) URL, got {server!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.base_path = parts.path
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._local = threading.local()
        self.stop_retrying = threading.Event()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = cls(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def request(self, method: str, path: str, *, token: str, body: Any = None, raw: bytes | None = None,
                content_type: str = "application/json", retry: bool = True) -> tuple[int, bytes]:
        """Send until the server gives a non-5xx answer (or retrying is stopped); returns (status, body)."""
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {token}", "User-Agent": f"harmont-agent/{VERSION}"}
        if payload is not None:
            headers["Content-Type"] = content_type
        delay = 0.5
        while True:
            try:
                conn = self._connection()
                conn.request(method, self.base_path + path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.status < 500 or not retry:
                    if response.will_close:
                        self._drop_connection()
                    return response.status, data
                log.warning("%s %s: server error %s; retrying", method, path, response.status)
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if not retry:
                    raise
                log.warning("%s %s: %s; retrying in %.1fs", method, path, exc, delay)
            if self.stop_retrying.is_set():
                raise AgentError(0, "gave up: agent is stopping")
            time.sleep(delay + random.uniform(0, delay / 2))
            delay = min(delay * 2, self.max_backoff)

    def json(self, method: str, path: str, *, token: str, body: Any = None, ok: tuple[int, ...] = (200,)) -> Any:
        status, data = self.request(method, path, token=token, body=body)
        parsed = json.loads(data) if data else None
        if status == 401:
            raise Unauthorized(status, parsed)
        if status not in ok:
            raise AgentError(status, parsed)
        return parsed

    def download(self, path: str, *, token: str) -> bytes:
        status, data = self.request("GET", path, token=token)
        if status == 401:
            raise Unauthorized(status, data[:200])
        if status != 200:
            raise AgentError(status, data[:200])
        return data


@dataclass
class JobSpec:
    id: str
    token: str
    command: str
    env: dict[str, str]
    timeout_seconds: int
    image: str | None
    step_key: str
    source_path: str | None
    parent_workspace_path: str | None
    upload_workspace: bool
    cancel_grace_seconds: float

    @classmethod
    def from_claim(cls, data: dict[str, Any]) -> "JobSpec":
        job = data["job"]
        return cls(
            id=job["id"], token=data["job_token"], command=job["command"], env=job["env"],
            timeout_seconds=job["timeout_seconds"], image=job.get("image"), step_key=job["step_key"],
            source_path=job.get("source_path"), parent_workspace_path=job.get("parent_workspace_path"),
            upload_workspace=job.get("upload_workspace", False),
            cancel_grace_seconds=job.get("cancel_grace_seconds", 10),
        )


@dataclass
class LogShipper:
    """Numbers output chunks and ships them in order; a failed batch is re-sent as it was."""

    transport: Transport
    job: JobSpec
    seq: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    timeout_requested: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stream_kind: int, text: str) -> None:
        if not text:
            return
        with self.lock:
            for start in range(0, len(text), MAX_CHUNK_CHARS):
                self.seq += 1
                self.pending.append({"seq": self.seq, "stream_kind": stream_kind,
                                     "content": text[start:start + MAX_CHUNK_CHARS], "ts": utcnow_iso()})

    def flush(self) -> None:
        with self.lock:
            batch = list(self.pending)
        if not batch:
            return
        answer = self.transport.json("POST", f"/api/v0/agent/jobs/{self.job.id}/logs", token=self.job.token,
                                     body={"chunks": batch})
        with self.lock:
            sent = {chunk["seq"] for chunk in batch}
            self.pending = [chunk for chunk in self.pending if chunk["seq"] not in sent]
        if answer and answer.get("cancel"):
            self.cancel_requested.set()
        if answer and answer.get("timeout"):
            self.timeout_requested.set()


class Agent:
    def __init__(self, *, server: str, token: str, name: str | None = None, workdir: str | None = None,
                 poll_interval: float = 1.0, once: bool = False) -> None:
        self.transport = Transport(server)
        self.token = token
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.workdir = Path(workdir or Path.cwd() / "var" / "agent" / self.name).resolve()
        self.poll_interval = poll_interval
        self.once = once
        self.session: str | None = None
        self.current_job: JobSpec | None = None
        self.stopping = threading.Event()  # first SIGTERM: finish the current job, claim no more
        self.abort = threading.Event()  # second SIGTERM: cancel the current job too

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

    def register(self) -> None:
        data = self.transport.json("POST", "/api/v0/agent/register", token=self.token, ok=(201,), body={
            "name": self.name, "hostname": socket.gethostname(), "version": VERSION,
            "os": f"{platform.system()} {platform.release()}",
        })
        self.session = data["session_token"]
        log.info("registered as %s (%s)", data["agent"]["name"], data["agent"]["id"])

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.register()
            while not self.stopping.is_set():
                claimed = self.claim()
                if claimed is None:
                    if self.once:
                        return 0
                    self.stopping.wait(self.poll_interval * random.uniform(0.8, 1.2))
                    continue
                job = JobSpec.from_claim(claimed)
                self.current_job = job
                try:
                    self.run_job(job)
                except Unauthorized:
                    raise
                except AgentError as exc:
                    # The server refused a report about this job (it ended meanwhile, or the
                    # request was wrong): give the job up, keep serving the others.
                    log.error("job %s abandoned: %s", job.id, exc)
                    shutil.rmtree(self.workdir / job.id, ignore_errors=True)
                finally:
                    self.current_job = None
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
        return 0

    def disconnect(self) -> None:
        if self.session is None:
            return
        try:
            self.transport.request("POST", "/api/v0/agent/disconnect", token=self.session, body={}, retry=False)
        except (OSError, http.client.HTTPException):
            pass  # the server will notice the silence

    def claim(self) -> dict[str, Any] | None:
        assert self.session
        status, data = self.transport.request("POST", "/api/v0/agent/claim", token=self.session, body={})
        if status == 204:
            return None
        if status == 401:
            raise Unauthorized(status, data[:200])
        if status != 200:
            raise AgentError(status, data[:200])
        return json.loads(data)

    # ------------------------------------------------------------ one job

    def run_job(self, job: JobSpec) -> None:
        workspace = self.workdir / job.id
        shutil.rmtree(workspace, ignore_errors=True)
        workspace.mkdir(parents=True)
        shipper = LogShipper(self.transport, job)
        try:
            self._prepare_workspace(job, workspace, shipper)
        except (AgentError, OSError, tarfile.TarError) as exc:
            shipper.add(META, f"harmont-agent: could not prepare the workspace: {exc}\n")
            self._ship_final(shipper)
            self._finish(job, {"exit_code": None, "error_code": "workspace_unavailable",
                               "error_message": str(exc)[:1000]}, shipper)
            return
        started = self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/start", token=job.token,
                                      body={"agent_name": self.name})
        if started.get("cancel"):
            shipper.add(META, "harmont-agent: canceled before start\n")
            self._ship_final(shipper)
            self._finish(job, {"exit_code": None, "outcome": "canceled"}, shipper)
            return
        if job.image:
            shipper.add(META, f"harmont-agent: image {job.image} requested; running on the agent host "
                              f"(no container engine)\n")
        shipper.add(META, f"harmont-agent: running {job.step_key} on {self.name}\n")
        result = self._execute(job, workspace, shipper)
        if job.upload_workspace and result.get("outcome") is None and result.get("exit_code") == 0:
            self._upload_workspace(job, workspace, shipper)
        self._ship_final(shipper)
        self._finish(job, result, shipper)
        shutil.rmtree(workspace, ignore_errors=True)

    def _prepare_workspace(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> None:
        for path, what in ((job.source_path, "source"), (job.parent_workspace_path, "parent workspace")):
            if path:
                archive = self.transport.download(path, token=job.token)
                unpack(archive, workspace)
                shipper.add(META, f"harmont-agent: unpacked {what} ({len(archive)} bytes)\n")

    def _execute(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> dict[str, Any]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", str(workspace)),
               "LANG": "C.UTF-8",
               **job.env, "HARMONT_JOB_ID": job.id, "HARMONT_WORKSPACE": str(workspace)}
        process = subprocess.Popen(
            ["bash", "-c", job.command], cwd=workspace, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        readers = [threading.Thread(target=pump, args=(stream, kind, shipper), daemon=True)
                   for stream, kind in ((process.stdout, STDOUT), (process.stderr, STDERR))]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + job.timeout_seconds
        # `start` was the first sign of life; a short job finishes before its first heartbeat.
        next_flush = time.monotonic() + FLUSH_INTERVAL
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        outcome: str | None = None
        try:
            while process.poll() is None:
                now = time.monotonic()
                if now >= next_flush:
                    shipper.flush()
                    next_flush = now + FLUSH_INTERVAL
                if now >= next_beat:
                    beat = self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/heartbeat", token=job.token,
                                               body={})
                    if beat.get("cancel"):
                        shipper.cancel_requested.set()
                    if beat.get("timeout"):
                        shipper.timeout_requested.set()
                    next_beat = now + HEARTBEAT_INTERVAL
                if outcome is None and shipper.timeout_requested.is_set():
                    outcome = "timed_out"
                if outcome is None and shipper.cancel_requested.is_set():
                    outcome = "canceled"
                if outcome is None and self.abort.is_set():
                    outcome = "canceled"
                if outcome is None and now >= deadline:
                    outcome = "timed_out"
                    # Shows the job as timing_out while the command is being stopped.
                    self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/heartbeat", token=job.token,
                                        body={"timing_out": True})
                if outcome is not None:
                    reason = "timed out" if outcome == "timed_out" else "canceled"
                    shipper.add(META, f"harmont-agent: {reason}; stopping the command\n")
                    stop_process_group(process, grace=job.cancel_grace_seconds)
                    break
                try:  # returns as soon as the command ends, instead of sleeping past it
                    process.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            # The agent is going down (its token was revoked, a report was refused): don't
            # leave the command running with nobody left to watch, stop or report it.
            stop_process_group(process, grace=job.cancel_grace_seconds)
            raise
        process.wait()
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

    def _upload_workspace(self, job: JobSpec, workspace: Path, shipper: LogShipper) -> None:
        archive = pack(workspace)
        status, body = self.transport.request("PUT", f"/api/v0/agent/jobs/{job.id}/workspace", token=job.token,
                                              raw=archive, content_type="application/gzip")
        if status != 204:
            shipper.add(META, f"harmont-agent: workspace upload refused ({status}): {body[:300]!r}\n")

    def _ship_final(self, shipper: LogShipper) -> None:
        # Large tails go ahead on their own; a small one rides along with the finish report.
        if sum(len(chunk["content"]) for chunk in shipper.pending) > MAX_CHUNK_CHARS:
            shipper.flush()

    def _finish(self, job: JobSpec, result: dict[str, Any], shipper: LogShipper | None = None) -> None:
        body = dict(result)
        if shipper is not None:
            with shipper.lock:
                body["chunks"] = list(shipper.pending)
        self.transport.json("POST", f"/api/v0/agent/jobs/{job.id}/finish", token=job.token, body=body)


def pump(stream: io.BufferedReader, kind: int, shipper: LogShipper) -> None:
    """Read a pipe as it fills and hand decoded text to the shipper (UTF-8, bad bytes replaced)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data = stream.read1(65536)
        if not data:
            shipper.add(kind, decoder.decode(b"", final=True))
            return
        shipper.add(kind, decoder.decode(data))


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


def pack(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in sorted(directory.iterdir()):
            tar.add(entry, arcname=entry.name)
    return buffer.getvalue()


def unpack(archive: bytes, directory: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
        # The "data" filter refuses absolute paths, `..` and device files.
        tar.extractall(directory, filter="data")


def main(argv: list[str] | None = None) -> int:
    """`python manage.py runagent --server URL --token TOKEN [--name N] [--workdir DIR] [--once]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="manage.py runagent",
                                     description="Claim an organization's jobs from a Harmont server and run them.")
    parser.add_argument("--server", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="an agent token of the organization (hma_...)")
    parser.add_argument("--name", help="this agent's name (default: host name and process id)")
    parser.add_argument("--workdir", help="where job workspaces go (default: var/agent/<name>)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between claims when idle")
    args = parser.parse_args(argv)
    if not args.token.startswith("hma_"):
        parser.error("--token must be an agent token (hma_...), not a personal API token")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    agent = Agent(server=args.server, token=args.token, name=args.name, workdir=args.workdir, once=args.once,
                  poll_interval=args.poll_interval)
    # First SIGTERM/SIGINT: finish the current job, then exit; a second one cancels it.
    signal.signal(signal.SIGTERM, agent.handle_signal)
    signal.signal(signal.SIGINT, agent.handle_signal)
    return agent.run()
