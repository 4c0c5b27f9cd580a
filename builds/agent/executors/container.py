"""The container executor: each job in a fresh container of its step's image, through podman's or docker's CLI.

Both engines take the same flags; the binary's name (`--executor podman|docker`)
picks which runs. One job's container lives from `create` to `rm`:

- `create --pull=missing` with the workspace mounted at /workspace (its working
  directory), the artifacts directory at /harmont/artifacts and a directory of
  the agent's at /harmont/run holding the job's environment; labels name the
  agent (by its work directory) and the job, so a restarted agent finds what a
  crashed run of itself left, and never touches another agent's. A failure here
  (an image that can't be pulled, options the engine refuses) fails the job with
  `image_unavailable` and the engine's message.
- `start --attach`: the command's output comes back on the CLI's stdout and
  stderr, and its exit status is the command's.
- cancel, timeout: `stop --time <grace>` (SIGTERM, the grace, SIGKILL); then
  `rm --force`, whatever the end. guard.py removes the container if the agent
  is killed outright.

The job's environment is not given to the engine (`--env`, `--env-file`): the
engine keeps such variables in the container's configuration, which `commit`
copies into the image, so a snapshot made for `builds_in` children would carry
the parent's secrets to every agent that loads it (and to the environment of
every container started from it). It goes instead in a file (mode 0600) in the
mounted /harmont/run, sourced and removed by the container's first process
before it runs the command. Nothing of the agent's own environment reaches the
container: the engine's CLI runs with a short list of variables it needs, and
podman is told not to pass proxy variables on.

Snapshots (`builds_in`): a passed job with children is committed to an image
(`hand_over`), streamed to the server (`save` piped into the request body), and
kept here under this agent's name; a child loads its parent's (`load` fed from
the download) unless this agent has it already. The last few are kept
(SNAPSHOT_CACHE, least recently used first out); the rest are removed, and all
of them when the agent exits or starts again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from builds.agent.executors import AgentContext, Executor, JobStartFailed, stop_requested, supervise
from builds.agent.logs import META, STDERR, STDOUT, LogShipper, clean_text, pump
from builds.agent.spec import JobSpec
from builds.agent.transport import AgentError, Unauthorized

WORKSPACE = "/workspace"
ARTIFACTS = "/harmont/artifacts"
RUN_DIR = "/harmont/run"  # the job's environment file, gone once the container's first process read it
ENV_FILE = "env"
# Snapshot images kept by one agent for children that may follow on it: a parent's children
# usually come right after it, and each snapshot may hold a whole toolchain.
SNAPSHOT_CACHE = 3
DOWNLOAD_ATTEMPTS = 3
UPLOAD_ATTEMPTS = 3
COPY_CHUNK = 1024 * 1024
# What the engine's CLI gets of the agent's environment: where the engine and its configuration are,
# and, for podman (which pulls images itself), the proxies to pull through.
ENGINE_VARIABLES = (
    "PATH", "HOME", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
    "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY",
    "CONTAINER_HOST", "CONTAINER_CONNECTION", "CONTAINER_SSHKEY", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF", "REGISTRY_AUTH_FILE",
)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# `start --attach` exits with these when the engine, not the command, failed to run the container.
ENGINE_FAILURE_STATUSES = (125, 126, 127)
KEPT_STDERR_BYTES = 4000
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# The container's first process: the job's environment, then the command in bash if the image has
# it (as on the host executor), else in sh. The command is "$1", never part of this script.
LAUNCHER = (f'. {RUN_DIR}/{ENV_FILE} && rm -f {RUN_DIR}/{ENV_FILE} || exit 125; '
            'if command -v bash >/dev/null 2>&1; then exec bash -c "$1"; fi; exec sh -c "$1"')


class ImageUnavailable(Exception):
    """The job's image could not be had (pulled, loaded) or its container not created or started."""


class SnapshotTooLarge(Exception):
    """The snapshot grew past what the server takes; the upload stops there."""


def agent_key(workdir: Path) -> str:
    """A short name for the agent in the engine's names: two agents of one host never share one."""
    return hashlib.sha256(str(workdir).encode()).hexdigest()[:12]


def env_file_text(env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The environment as lines a POSIX shell sources (`export NAME='value'`), and the names left out.

    A name sh can't export (`A-B`, `1X`) is left out: the command could not see it either.
    """
    lines, skipped = [], []
    for name, value in env.items():
        if not SHELL_NAME.match(name):
            skipped.append(name)
            continue
        lines.append(f"export {name}={shlex.quote(value)}\n")
    return "".join(lines), skipped


def engine_environment(environ: Mapping[str, str], *, engine: str) -> dict[str, str]:
    names = ENGINE_VARIABLES + (PROXY_VARIABLES if engine == "podman" else ())
    env = {name: environ[name] for name in names if name in environ}
    env.setdefault("PATH", os.defpath)
    return env


class ContainerExecutor(Executor):
    def __init__(self, context: AgentContext, *, engine: str, binary: str | None = None,
                 default_image: str | None = None, network: str | None = None, memory: str | None = None,
                 cpus: str | None = None, options: list[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        super().__init__(context)
        self.kind = engine
        self.engine = engine
        found = binary or shutil.which(engine)
        if found is None:
            raise ValueError(f"--executor {engine}: no {engine} program on PATH")
        self.binary = found
        self.default_image = default_image
        self.network = network
        self.memory = memory
        self.cpus = cpus
        self.options = list(options or ())
        self.env = engine_environment(os.environ if environ is None else environ, engine=engine)
        self.key = agent_key(context.workdir)
        self.snapshot_repository = f"localhost/harmont-snapshot-{self.key}"
        # Image names by the id of the job whose filesystem they hold, least recently used first.
        self.snapshots: OrderedDict[str, str] = OrderedDict()
        self.committed: dict[str, str] = {}  # job id -> image id, until hand_over uploads it

    # ------------------------------------------------------------ names and command lines

    def container_name(self, job: JobSpec) -> str:
        return f"harmont-{self.key}-{job.id}"

    def snapshot_name(self, job_id: str) -> str:
        return f"{self.snapshot_repository}:{job_id}"

    def run_dir(self, job: JobSpec) -> Path:
        return self.context.workdir / "containers" / job.id

    def labels(self, job: JobSpec) -> list[str]:
        return ["--label", f"harmont.agent={self.context.workdir}", "--label", f"harmont.job={job.id}"]

    def create_command(self, job: JobSpec, *, image: str, workspace: Path, artifacts: Path) -> list[str]:
        """`create`: the container of one job, its command given to the launcher as an argument."""
        argv = [self.binary, "create", "--pull=missing", "--name", self.container_name(job), *self.labels(job),
                "--volume", f"{workspace}:{WORKSPACE}", "--volume", f"{artifacts}:{ARTIFACTS}",
                "--volume", f"{self.run_dir(job)}:{RUN_DIR}", "--workdir", WORKSPACE, "--entrypoint", "/bin/sh"]
        if self.engine == "podman":
            argv.append("--http-proxy=false")  # podman would pass its own proxy variables on
        for option, value in (("--network", self.network), ("--memory", self.memory), ("--cpus", self.cpus)):
            if value:
                argv += [option, value]
        return [*argv, *self.options, image, "-c", LAUNCHER, "harmont", job.command]

    def start_command(self, job: JobSpec) -> list[str]:
        return [self.binary, "start", "--attach", self.container_name(job)]

    def stop_command(self, job: JobSpec) -> list[str]:
        return [self.binary, "stop", "--time", str(max(0, round(job.cancel_grace_seconds))), self.container_name(job)]

    def remove_command(self, name: str) -> list[str]:
        return [self.binary, "rm", "--force", name]

    def commit_command(self, job: JobSpec) -> list[str]:
        return [self.binary, "commit", self.container_name(job), self.snapshot_name(job.id)]

    def save_command(self, image_id: str) -> list[str]:
        # By id, not name: the archive then names no image, and whoever loads it names it themselves.
        return [self.binary, "save", image_id]

    def load_command(self) -> list[str]:
        return [self.binary, "load"]

    def guard_arguments(self) -> list[str]:
        return ["--engine", self.binary]

    def guard_environment(self) -> dict[str, str]:
        return dict(self.env)

    # ------------------------------------------------------------ engine calls

    def _run(self, argv: list[str], *, timeout: float | None = 120) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, cwd="/", stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout)

    def _quietly(self, argv: list[str]) -> bool:
        try:
            return self._run(argv).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _message(self, done: subprocess.CompletedProcess | bytes) -> str:
        data = done if isinstance(done, bytes) else (done.stderr or b"") + (done.stdout or b"")
        return clean_text(data.decode(errors="replace")).strip()[-2000:] or "(no message)"

    def image_exists(self, name: str) -> bool:
        return self._quietly([self.binary, "image", "inspect", "--format", "{{.Id}}", name])

    def remove_image(self, name: str) -> None:
        # A name, never an id: removing it only untags an image another name still holds.
        self._quietly([self.binary, "rmi", name])

    def remove_container(self, name: str) -> None:
        self._quietly(self.remove_command(name))

    # ------------------------------------------------------------ lifecycle

    def clean_up_after_crash(self) -> int:
        """Remove the containers labelled with this agent's work directory, its snapshots and run directories."""
        removed = 0
        try:
            listed = self._run([self.binary, "ps", "--all", "--quiet", "--filter",
                                f"label=harmont.agent={self.context.workdir}"])
            containers = listed.stdout.decode().split() if listed.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            containers = []
        for container in containers:
            self._quietly([self.binary, "kill", container])
            if self._quietly(self.remove_command(container)):
                removed += 1
        for name in self._own_snapshots():
            self.remove_image(name)
            removed += 1
        root = self.context.workdir / "containers"
        for path in root.glob("*"):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        return removed

    def _own_snapshots(self) -> list[str]:
        try:
            listed = self._run([self.binary, "images", "--format", "{{.Repository}}:{{.Tag}}"])
        except (OSError, subprocess.TimeoutExpired):
            return []
        return [line for line in listed.stdout.decode().split()
                if line.startswith(self.snapshot_repository + ":")] if listed.returncode == 0 else []

    def close(self) -> None:
        for name in list(self.snapshots.values()):
            self.remove_image(name)
        self.snapshots.clear()

    def _keep_snapshot(self, job_id: str, name: str) -> None:
        self.snapshots[job_id] = name
        self.snapshots.move_to_end(job_id)
        while len(self.snapshots) > SNAPSHOT_CACHE:
            _, oldest = self.snapshots.popitem(last=False)
            self.remove_image(oldest)

    # ------------------------------------------------------------ one job

    def execute(self, job: JobSpec, *, workspace: Path, artifacts: Path, shipper: LogShipper,
                argv: list[str] | None = None) -> dict[str, Any]:
        if argv is not None:
            raise JobStartFailed("the container executor runs a step's command only")
        deadline = time.monotonic() + job.timeout_seconds
        name = self.container_name(job)
        run_dir = self.run_dir(job)
        created = False
        made_snapshot: str | None = None
        try:
            try:
                image = self._image_for(job, shipper)
            except ImageUnavailable as exc:
                return self._unavailable(shipper, str(exc))
            self._write_environment(job, run_dir, shipper)
            shipper.add(META, f"harmont-agent: running {job.step_key} in a {self.engine} container of {image}\n")
            self.context.tell_guard(f"+container {name}")
            created = True
            stopped = self._create(job, image=image, workspace=workspace, artifacts=artifacts, shipper=shipper,
                                   deadline=deadline)
            if stopped is not None:
                return stopped
            result = self._start(job, shipper, deadline=deadline)
            if (job.snapshot_upload and result.get("outcome") is None and result.get("exit_code") == 0):
                made_snapshot = self._commit(job, shipper)
            return result
        finally:
            if created:
                self.remove_container(name)
                self.context.tell_guard(f"-container {name}")
            shutil.rmtree(run_dir, ignore_errors=True)
            if made_snapshot is not None:
                # Only now: an image a container still uses can't be removed by the cache.
                self._keep_snapshot(job.id, self.snapshot_name(job.id))

    def _unavailable(self, shipper: LogShipper, message: str) -> dict[str, Any]:
        shipper.add(META, f"harmont-agent: the job's container could not be started: {message}\n")
        return {"exit_code": None, "error_code": "image_unavailable", "error_message": message[:2000]}

    def _write_environment(self, job: JobSpec, run_dir: Path, shipper: LogShipper) -> None:
        env = {**job.env, "HARMONT_JOB_ID": job.id, "HARMONT_WORKSPACE": WORKSPACE, "HARMONT_ARTIFACTS": ARTIFACTS}
        text, skipped = env_file_text(env)
        for skipped_name in skipped:
            shipper.add(META, f"harmont-agent: env {skipped_name[:80]!r} left out: not a name a shell can export\n")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True, mode=0o700)
        descriptor = os.open(run_dir / ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8", errors="surrogateescape") as file:
            file.write(text)

    def _image_for(self, job: JobSpec, shipper: LogShipper) -> str:
        """The image the job's container starts from: its parent's snapshot if there is one, else its step's."""
        image = job.image or self.default_image
        parent = job.parent_snapshot
        if parent:
            snapshot = self._parent_snapshot(job, parent, shipper)
            if snapshot is not None:
                return snapshot
        if not image:
            raise ImageUnavailable("the step names no image and this agent has no --default-image")
        return image

    def _parent_snapshot(self, job: JobSpec, parent: dict[str, Any], shipper: LogShipper) -> str | None:
        name = self.snapshot_name(str(parent["job_id"]))
        if str(parent["job_id"]) in self.snapshots or self.image_exists(name):
            self._keep_snapshot(str(parent["job_id"]), name)
            shipper.add(META, "harmont-agent: starting from the builds_in parent's filesystem (kept on this agent)\n")
            return name
        started = time.monotonic()
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                size = self._load(job, parent["path"], name)
            except Unauthorized:
                raise
            except AgentError as exc:
                if exc.status == 404:
                    shipper.add(META, "harmont-agent: the builds_in parent left no filesystem snapshot (it ran on "
                                      "another executor, or its upload was refused); starting from the step's "
                                      "image with the parent's workspace files\n")
                    return None
                if exc.status < 500 or attempt == DOWNLOAD_ATTEMPTS:
                    raise ImageUnavailable(f"the builds_in parent's snapshot could not be downloaded: {exc}") from exc
            except (OSError, ImageUnavailable) as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise ImageUnavailable(f"the builds_in parent's snapshot could not be loaded: {exc}") from exc
            else:
                self._keep_snapshot(str(parent["job_id"]), name)
                shipper.add(META, f"harmont-agent: loaded the builds_in parent's filesystem snapshot "
                                  f"({size} bytes, {time.monotonic() - started:.1f} s)\n")
                return name
            time.sleep(attempt)
        return None  # pragma: no cover - the loop returns or raises

    def _load(self, job: JobSpec, path: str, name: str) -> int:
        """Stream the download into `load`, then name the loaded image; the bytes read."""
        size = 0
        # The engine's progress goes to a file: a pipe nobody reads while the download is copied could fill.
        with self.context.transport.stream("GET", path, token=job.token) as response, \
                tempfile.TemporaryFile() as messages:
            loader = subprocess.Popen(self.load_command(), env=self.env, cwd="/", stdin=subprocess.PIPE,
                                      stdout=messages, stderr=subprocess.STDOUT)
            try:
                assert loader.stdin is not None
                try:
                    while chunk := response.read(COPY_CHUNK):
                        loader.stdin.write(chunk)
                        size += len(chunk)
                finally:
                    loader.stdin.close()
                loader.wait(timeout=600)
            except BaseException:
                loader.kill()
                loader.wait()
                raise
            messages.seek(0)
            output = messages.read()
        if loader.returncode != 0:
            raise ImageUnavailable(self._message(output))
        loaded = [line.rsplit(" ", 1)[-1] for line in output.decode(errors="replace").splitlines()
                  if line.startswith("Loaded image")]
        if not loaded:
            raise ImageUnavailable(f"{self.engine} load named no image: {self._message(output)}")
        tagged = self._run([self.binary, "tag", loaded[-1], name])
        if tagged.returncode != 0:
            raise ImageUnavailable(self._message(tagged))
        return size

    def _wait(self, process: subprocess.Popen, job: JobSpec, shipper: LogShipper,
              deadline: float) -> tuple[bytes, bytes] | str:
        """The output of an engine call that may take long (a pull); the outcome if the job is stopped first."""
        while True:
            try:
                return process.communicate(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            timed_out = time.monotonic() >= deadline or shipper.timeout_requested.is_set()
            if timed_out or stop_requested(job, shipper, self.context):
                process.kill()
                process.communicate()
                return "timed_out" if timed_out else "canceled"
            shipper.flush()

    def _create(self, job: JobSpec, *, image: str, workspace: Path, artifacts: Path, shipper: LogShipper,
                deadline: float) -> dict[str, Any] | None:
        """Create the container; a result if that ended the job (refused, or stopped meanwhile)."""
        try:
            process = subprocess.Popen(self.create_command(job, image=image, workspace=workspace, artifacts=artifacts),
                                       env=self.env, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise JobStartFailed(f"could not run {self.engine}: {exc}") from exc
        waited = self._wait(process, job, shipper, deadline)
        if isinstance(waited, str):
            shipper.add(META, f"harmont-agent: {waited.replace('_', ' ')} while the container was being created\n")
            return {"outcome": waited, "exit_code": None, "signal": None}
        stdout, stderr = waited
        if process.returncode != 0:
            return self._unavailable(shipper, self._message(stderr + stdout))
        return None

    def _start(self, job: JobSpec, shipper: LogShipper, *, deadline: float) -> dict[str, Any]:
        name = self.container_name(job)
        try:
            process = subprocess.Popen(self.start_command(job), env=self.env, cwd="/", stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise JobStartFailed(f"could not run {self.engine}: {exc}") from exc
        self.context.tell_guard(f"+{process.pid}")
        kept = bytearray()
        readers = [threading.Thread(target=pump, args=(process.stdout, STDOUT, shipper), daemon=True),
                   threading.Thread(target=_pump_keeping, args=(process.stderr, shipper, kept), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            outcome = supervise(process, job=job, shipper=shipper, context=self.context, deadline=deadline,
                                stop=lambda: self._stop(job))
        except BaseException:
            # The agent is going down: stop the command now (execute's `finally` removes the container).
            self._stop(job)
            process.kill()
            self.context.tell_guard(f"-{process.pid}")
            raise
        try:
            process.wait(timeout=max(5.0, job.cancel_grace_seconds + 5))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.context.tell_guard(f"-{process.pid}")
        for reader in readers:
            reader.join(timeout=5)
        code = process.returncode
        if outcome is None and code in ENGINE_FAILURE_STATUSES and self._never_ran(name):
            return self._unavailable(shipper, self._message(bytes(kept)))
        shipper.add(META, f"harmont-agent: exit status {code}\n")
        return {"outcome": outcome, "exit_code": code, "signal": None}

    def _never_ran(self, name: str) -> bool:
        """Whether the container is still only created: the engine failed to start it (not the command)."""
        try:
            state = self._run([self.binary, "container", "inspect", "--format", "{{.State.Status}}", name])
        except (OSError, subprocess.TimeoutExpired):
            return False
        return state.returncode == 0 and state.stdout.decode().strip() in ("created", "configured")

    def _stop(self, job: JobSpec) -> None:
        """SIGTERM the container's processes, SIGKILL them after the grace period."""
        try:
            self._run(self.stop_command(job), timeout=job.cancel_grace_seconds + 30)
        except (OSError, subprocess.TimeoutExpired):
            self._quietly([self.binary, "kill", self.container_name(job)])

    # ------------------------------------------------------------ snapshots

    def _commit(self, job: JobSpec, shipper: LogShipper) -> str | None:
        """Commit the passed container for the job's children; the image's id (None: not made)."""
        started = time.monotonic()
        try:
            done = self._run(self.commit_command(job), timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shipper.add(META, f"harmont-agent: no filesystem snapshot for the builds_in children: {exc}\n")
            return None
        lines = done.stdout.decode(errors="replace").split()
        if done.returncode != 0 or not lines:
            shipper.add(META, f"harmont-agent: no filesystem snapshot for the builds_in children: "
                              f"{self._message(done)}\n")
            return None
        image_id = lines[-1].removeprefix("sha256:")
        self.committed[job.id] = image_id
        shipper.add(META, f"harmont-agent: filesystem snapshot taken for the builds_in children "
                          f"({time.monotonic() - started:.1f} s)\n")
        return image_id

    def hand_over(self, job: JobSpec, shipper: LogShipper) -> None:
        """Upload the snapshot `execute` committed, so that children on other agents start from it too."""
        image_id = self.committed.pop(job.id, None)
        if image_id is None or not job.snapshot_upload:
            return
        upload = job.snapshot_upload
        started = time.monotonic()
        body = SaveStream(self.save_command(image_id), env=self.env, limit=upload.get("max_bytes"))
        try:
            status, data = self.context.transport.request(
                "PUT", upload["path"], token=job.token, raw=body, content_type="application/x-tar",
                attempts=UPLOAD_ATTEMPTS)
        except SnapshotTooLarge as exc:
            self.context.transport._drop_connection()  # the request was cut off halfway
            shipper.add(META, f"harmont-agent: filesystem snapshot not uploaded: {exc}; builds_in children on "
                              f"other agents start from their step's image\n")
            return
        except (OSError, AgentError) as exc:
            shipper.add(META, f"harmont-agent: filesystem snapshot not uploaded: {exc}\n")
            return
        finally:
            body.close()
        if status == 204:
            shipper.add(META, f"harmont-agent: uploaded the filesystem snapshot ({body.sent} bytes, "
                              f"{time.monotonic() - started:.1f} s)\n")
        else:
            shipper.add(META, f"harmont-agent: filesystem snapshot upload refused ({status}): {data[:300]!r}\n")


def _pump_keeping(stream: IO[bytes], shipper: LogShipper, kept: bytearray) -> None:
    """`pump` for the CLI's stderr, keeping its tail: the engine's message if it could not start the container."""
    class Tee:
        def read1(self, size: int) -> bytes:
            data = stream.read1(size)  # type: ignore[attr-defined]
            kept.extend(data)
            del kept[:-KEPT_STDERR_BYTES]
            return data

    pump(Tee(), STDERR, shipper)  # type: ignore[arg-type]


class SaveStream:
    """`save`'s output as a request body read as it is made; `seek(0)` (a retried request) saves anew.

    Never held whole: http.client sends what each read returns, chunked. More than
    `limit` bytes raises SnapshotTooLarge, before the server would refuse them.
    """

    def __init__(self, argv: list[str], *, env: dict[str, str], limit: int | None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> None:
        self.argv = argv
        self.env = env
        self.limit = limit
        self.popen = popen
        self.process: subprocess.Popen | None = None
        self.messages: IO[bytes] | None = None
        self.sent = 0

    def seek(self, offset: int) -> None:
        assert offset == 0
        self.close()
        self.sent = 0
        # The engine's messages go to a file: a pipe left unread while the archive is read could fill.
        self.messages = tempfile.TemporaryFile()
        self.process = self.popen(self.argv, env=self.env, cwd="/", stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=self.messages)

    def read(self, size: int = -1) -> bytes:
        if self.process is None:
            self.seek(0)
        assert self.process is not None and self.process.stdout is not None
        data = self.process.stdout.read(size if size and size > 0 else COPY_CHUNK)
        if not data:
            assert self.messages is not None
            self.messages.seek(0)
            error = self.messages.read()
            if self.process.wait() != 0:
                raise OSError(f"{self.argv[0]} save failed: {clean_text(error.decode(errors='replace'))[-500:]}")
            return b""
        self.sent += len(data)
        if self.limit is not None and self.sent > self.limit:
            raise SnapshotTooLarge(f"it is larger than the server takes ({self.limit} bytes)")
        return data

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None
        if self.messages is not None:
            self.messages.close()
            self.messages = None
