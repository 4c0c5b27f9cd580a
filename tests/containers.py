"""Podman for the end-to-end tests of container executors: a test image made here, agents that use it.

The image is a busybox-static root filesystem (`podman import`, once per session) with
a marker file, /etc/harmont-test-image, that only a command inside it can read. No
registry is reachable from these machines, so nothing is pulled: a missing image is
one nobody made.

`container_agents` runs agents with `--executor podman` against the production entry
point (harmont.asgi under uvicorn, tests/live.py): agents upload snapshots chunked, as
`podman save` makes them, which Django's own test server can't read. Without podman
(or where it can't run containers) a test that asks for them is skipped with the
reason, and fails instead under CI (.ci/run installs podman). Loaded as a plugin by
tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from builds.models import Job, StreamKind
from organizations import services as org_services
from pipelines.models import Pipeline
from tests.e2e import Agents, AgentProcess, job_log

MARKER = "/etc/harmont-test-image"
MARKER_TEXT = "inside the harmont test image"
# What this kernel needs of podman (see the machine notes): runc's default limits can't be set here.
ULIMITS = ("--container-option=--ulimit=nofile=1024:1024", "--container-option=--ulimit=nproc=1024:1024")
ENGINE_TIMEOUT = 60


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=ENGINE_TIMEOUT, check=check)


def unusable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"podman is needed under CI: {reason}")
    pytest.skip(reason)


def busybox_root(root: Path) -> None:
    """A root filesystem: a static busybox, a link for each of its applets, the marker."""
    busybox = next((Path(p) for p in ("/bin/busybox", "/usr/bin/busybox") if Path(p).is_file()), None)
    if busybox is None:
        unusable("no busybox (apt-get install busybox-static)")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    for directory in ("etc", "tmp", "opt", "root", "proc", "sys", "dev", "run"):
        (root / directory).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / MARKER.lstrip("/")).write_text(MARKER_TEXT + "\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")


@pytest.fixture(scope="session")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`localhost/harmont-test-busybox:<pid>`, imported for the session and removed after it."""
    if shutil.which("podman") is None:
        unusable("podman is not installed (apt-get install podman runc busybox-static)")
    base = tmp_path_factory.mktemp("image")
    busybox_root(base / "root")
    with tarfile.open(base / "rootfs.tar", "w") as tar:
        tar.add(base / "root", arcname=".")
    name = f"localhost/harmont-test-busybox:{os.getpid()}"
    imported = podman("import", str(base / "rootfs.tar"), name, check=False)
    if imported.returncode != 0:
        unusable(f"podman import failed: {imported.stderr.strip()}")
    ran = podman("run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", name, "cat", MARKER,
                 check=False)
    if ran.returncode != 0 or ran.stdout.strip() != MARKER_TEXT:
        podman("rmi", name, check=False)
        unusable(f"podman can't run containers here: {ran.stderr.strip()}")
    try:
        yield name
    finally:
        podman("rmi", "--force", name, check=False)


def in_image(ir: dict[str, Any], image: str) -> dict[str, Any]:
    """The IR with every step that names an image (roots: the DSL's ubuntu:24.04) naming `image`."""
    for node in ir["graph"]["nodes"]:
        if "image" in node["step"]:
            node["step"]["image"] = image
    return ir


def containers_of(label: str) -> list[str]:
    """The containers (any state) with this label, `key=value`."""
    return podman("ps", "--all", "--quiet", "--filter", f"label={label}").stdout.split()


@pytest.fixture
def asgi_url(asgi_server: tuple[str, int]) -> str:
    host, port = asgi_server
    return f"http://{host}:{port}"


class ContainerAgents(Agents):
    image: str = ""

    def start_podman(self, name: str, *, options: tuple[str, ...] = (), **kwargs: Any) -> AgentProcess:
        return self.start(name, options=("--executor", "podman", "--default-image", self.image, *ULIMITS, *options),
                          **kwargs)


@pytest.fixture
def container_agents(asgi_url: str, transactional_db: None, e2e_settings: Any,
                     agent_token: org_services.IssuedAgentToken, tmp_path: Path, pipeline: Pipeline,
                     test_image: str) -> Iterator[ContainerAgents]:
    """Agents of the `org` fixture's organization with the podman executor (`start_podman`), against the
    production entry point; killed at teardown, with every container and snapshot they left."""
    pipeline.repository = ""
    pipeline.save(update_fields=["repository"])
    pool = ContainerAgents(server=asgi_url, token=agent_token.raw, base=tmp_path / "agents")
    pool.image = test_image
    pool.base.mkdir()
    try:
        yield pool
    finally:
        pool.close()
        for agent in pool.started:
            for container in containers_of(f"harmont.agent={agent.workdir.resolve()}"):
                podman("rm", "--force", container, check=False)
        from builds.agent.executors.container import agent_key

        for agent in pool.started:
            repository = f"localhost/harmont-snapshot-{agent_key(agent.workdir.resolve())}"
            for image in podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split():
                if image.startswith(repository + ":"):
                    podman("rmi", image, check=False)


def meta_of(job: Job) -> str:
    return job_log(job, kinds=(StreamKind.META,))
