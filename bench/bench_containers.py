"""What running jobs in containers costs: `make bench-containers`.

One run: a fresh PostgreSQL database, the server as production serves it (gunicorn,
harmont/gunicorn_conf.py), an image made here (a busybox-static root filesystem, `podman
import`: no registry is reachable), and real `manage.py runagent` processes.

1. Overhead per job: a build of 50 independent `true` steps, run by one host agent,
   then by one `--executor podman` agent. Per job, the server's times: claimed →
   finished (what the agent spends on it) and started → finished (from the start
   report on: the container's create, start, attach, remove). Medians and p90,
   and podman's median against the host's, in the same run.
2. A snapshot: a parent that writes 100 MB into /opt (`dd` from /dev/urandom, which no
   compression would shrink) with a `builds_in` child, the parent on one agent and the
   child on another: the snapshot's size, the commit, upload and load times the agents
   log, and each job's time; then the same build on one agent, where the child starts
   from the agent's own copy; and the parent alone (no children: no snapshot) as its
   baseline.

Usage: .venv/bin/python bench/bench_containers.py [--jobs N] [--keep] [--db NAME] [--engine podman|docker]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.harness import BASE_DIR, ScratchRun, free_port, loadavg, percentile, say
from bench.seeding import independent_steps, migrate_and_create_user
from bench.server import start_server, stop_group

DB_NAME = os.environ.get("HARMONT_BENCH_CONTAINERS_DB", "harmont_bench_containers")
ULIMITS = ["--container-option=--ulimit=nofile=1024:1024", "--container-option=--ulimit=nproc=1024:1024"]
INSTALL_MB = 100
BUILD_TIMEOUT = 600


# ------------------------------------------------------------------ the image


def make_image(engine: str, work: Path) -> str:
    """A busybox-static root filesystem imported as `localhost/harmont-bench-busybox:<pid>`."""
    busybox = next((Path(p) for p in ("/bin/busybox", "/usr/bin/busybox") if Path(p).is_file()), None)
    if busybox is None:
        raise SystemExit("no busybox: apt-get install busybox-static")
    root = work / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split():
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for directory in ("etc", "tmp", "opt", "root", "proc", "sys", "dev", "run"):
        (root / directory).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    with tarfile.open(work / "rootfs.tar", "w") as tar:
        tar.add(root, arcname=".")
    name = f"localhost/harmont-bench-busybox:{os.getpid()}"
    subprocess.run([engine, "import", str(work / "rootfs.tar"), name], capture_output=True, check=True)
    return name


# ------------------------------------------------------------------ agents


def start_agent(name: str, *, server: str, token: str, work: Path, env: dict[str, str],
                options: list[str]) -> subprocess.Popen:
    agent_env = {k: v for k, v in env.items() if k not in ("DATABASE_URL", "HARMONT_SECRET_KEY")}
    agent_env["HARMONT_AGENT_TOKEN"] = token
    with (work / f"{name}.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "manage.py", "runagent", "--server", server, "--name", name,
             "--workdir", str(work / name), "--poll-interval", "0.2", *options],
            cwd=BASE_DIR, env=agent_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)


def stop_agent(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # finish the job (there is none), disconnect, exit
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stop_group(process, grace=1)


# ------------------------------------------------------------------ builds


def new_build(pipeline: Any, ir: dict[str, Any]) -> Any:
    from builds.services import create_build, validate_build_request

    return create_build(pipeline=pipeline, request=validate_build_request(branch="main", commit="abc123",
                                                                           pipeline_ir=ir))


def run_build(pipeline: Any, ir: dict[str, Any]) -> Any:
    from builds.models import Build

    build = new_build(pipeline, ir)
    deadline = time.monotonic() + BUILD_TIMEOUT
    while True:
        build = Build.objects.get(pk=build.pk)
        if build.finished_at is not None:
            return build
        if time.monotonic() > deadline:
            raise SystemExit(f"build #{build.number} did not finish in {BUILD_TIMEOUT} s")
        time.sleep(0.2)


def job_times(build: Any) -> list[tuple[float, float]]:
    """(claimed → finished, started → finished) of each job, in seconds."""
    from builds.models import Job

    times = []
    for job in Job.objects.filter(build=build):
        if job.state != "passed":
            raise SystemExit(f"job {job.step_key} of build #{build.number} ended {job.state}: {job.error_message}")
        times.append(((job.finished_at - job.assigned_at).total_seconds(),
                      (job.finished_at - job.started_at).total_seconds()))
    return times


def meta(job: Any) -> str:
    from builds.models import LogChunk, StreamKind

    return "".join(LogChunk.objects.filter(job=job, stream_kind=StreamKind.META).order_by("seq")
                   .values_list("content", flat=True))


def seconds_in(text: str, pattern: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def in_image(ir: dict[str, Any], image: str) -> dict[str, Any]:
    for node in ir["graph"]["nodes"]:
        node["step"]["image"] = image
    return ir


def with_child(image: str, *, child: bool) -> dict[str, Any]:
    nodes = [{"step": {"key": "install", "image": image,
                       "cmd": f"dd if=/dev/urandom of=/opt/big bs=1M count={INSTALL_MB} 2>/dev/null"}, "env": {}}]
    edges = []
    if child:
        nodes.append({"step": {"key": "use", "cmd": "ls -l /opt/big | awk '{print $5}'"}, "env": {}})
        edges.append([0, 1, "builds_in"])
    return {"version": "0", "graph": {"nodes": nodes, "edges": edges, "node_holes": [], "edge_property": "directed"}}


# ------------------------------------------------------------------ the run


def overhead(pipeline: Any, *, jobs: int, image: str, start: Any) -> dict[str, list[tuple[float, float]]]:
    results = {}
    for label, options in (("host", ["--executor", "host"]), ("container", start.container_options)):
        agent = start(f"overhead-{label}", options)
        try:
            build = run_build(pipeline, in_image(independent_steps(jobs, "true"), image))
            results[label] = job_times(build)
        finally:
            stop_agent(agent)
        say(f"  {label}: {jobs} jobs in {(build.finished_at - build.created_at).total_seconds():.1f} s")
    return results


def snapshot(pipeline: Any, *, image: str, start: Any) -> dict[str, Any]:
    from builds.models import Job

    found: dict[str, Any] = {}
    # The parent alone: no builds_in children, no snapshot.
    agent = start("alone", start.container_options)
    try:
        alone = run_build(pipeline, with_child(image, child=False))
    finally:
        stop_agent(agent)
    found["alone"] = job_times(alone)[0][1]
    # Parent and child on two agents: the first runs one job (`--once`) and exits, dropping its copy.
    first = start("parent", [*start.container_options, "--once"])
    second = None
    try:
        build = new_build(pipeline, with_child(image, child=True))
        first.wait(timeout=BUILD_TIMEOUT)
        second = start("child", start.container_options)
        deadline = time.monotonic() + BUILD_TIMEOUT
        while Job.objects.filter(build=build, finished_at__isnull=True).exists():
            if time.monotonic() > deadline:
                raise SystemExit("the snapshot build did not finish")
            time.sleep(0.2)
    finally:
        stop_agent(first)
        if second is not None:
            stop_agent(second)
    jobs = {job.step_key: job for job in Job.objects.filter(build=build)}
    for job in jobs.values():
        if job.state != "passed":
            raise SystemExit(f"{job.step_key} ended {job.state}: {job.error_message}\n{meta(job)}")
    parent_log, child_log = meta(jobs["install"]), meta(jobs["use"])
    found.update(
        size=jobs["install"].snapshot_image.size,
        commit=seconds_in(parent_log, r"snapshot taken for the builds_in children \(([\d.]+) s\)"),
        upload=seconds_in(parent_log, r"uploaded the filesystem snapshot \(\d+ bytes, ([\d.]+) s\)"),
        load=seconds_in(child_log, r"loaded the builds_in parent's filesystem snapshot \(\d+ bytes, ([\d.]+) s\)"),
        parent=(jobs["install"].finished_at - jobs["install"].started_at).total_seconds(),
        child_other=(jobs["use"].finished_at - jobs["use"].started_at).total_seconds(),
        child_output=_stdout(jobs["use"]),
    )
    # Both on one agent: the child starts from the agent's own copy.
    agent = start("both", start.container_options)
    try:
        same = run_build(pipeline, with_child(image, child=True))
    finally:
        stop_agent(agent)
    same_jobs = {job.step_key: job for job in Job.objects.filter(build=same)}
    found["child_same"] = (same_jobs["use"].finished_at - same_jobs["use"].started_at).total_seconds()
    found["kept"] = "kept on this agent" in meta(same_jobs["use"])
    return found


def _stdout(job: Any) -> str:
    from builds.models import LogChunk, StreamKind

    return "".join(LogChunk.objects.filter(job=job, stream_kind=StreamKind.STDOUT).values_list("content", flat=True))


def ms(values: list[float], q: float | None = None) -> str:
    value = statistics.median(values) if q is None else percentile(values, q)
    return f"{value * 1000:8.0f}"


def report(results: dict[str, list[tuple[float, float]]], snap: dict[str, Any], engine: str) -> None:
    say("")
    say(f"per job ({len(results['host'])} jobs each, ms)    claimed→finished     started→finished")
    say(f"{'':36} {'median':>8} {'p90':>8}    {'median':>8} {'p90':>8}")
    for label, times in results.items():
        claimed, started = [t[0] for t in times], [t[1] for t in times]
        name = engine if label == "container" else "host"
        say(f"{name:36} {ms(claimed)} {ms(claimed, 90)}    {ms(started)} {ms(started, 90)}")
    host = statistics.median(t[0] for t in results["host"])
    container = statistics.median(t[0] for t in results["container"])
    say(f"container overhead per job (median claimed→finished): +{(container - host) * 1000:.0f} ms "
        f"({container / host:.1f}× the host's)")
    say("")
    say(f"snapshot of a parent with {INSTALL_MB} MB in /opt")
    say(f"  image size stored:                 {snap['size'] / 1e6:8.1f} MB")
    say(f"  commit (parent's agent):           {snap['commit'] or 0:8.1f} s")
    say(f"  upload, streamed (parent's agent): {snap['upload'] or 0:8.1f} s")
    say(f"  download + load (child's agent):   {snap['load'] or 0:8.1f} s")
    say(f"  parent job, no children:           {snap['alone']:8.1f} s")
    say(f"  parent job, with a child:          {snap['parent']:8.1f} s")
    say(f"  child on another agent:            {snap['child_other']:8.1f} s")
    say(f"  child on the same agent:           {snap['child_same']:8.1f} s  (kept copy used: {snap['kept']})")
    say(f"  the child sees /opt/big of {snap['child_output'].strip()} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs per executor (default 50)")
    parser.add_argument("--engine", default="podman", choices=["podman", "docker"])
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--db", default=DB_NAME, help=f"scratch database (dropped and created; default {DB_NAME})")
    args = parser.parse_args()
    if shutil.which(args.engine) is None:
        raise SystemExit(f"no {args.engine} here: apt-get install podman runc busybox-static")

    with ScratchRun(args.db, prefix="harmont-bench-containers-", keep=args.keep) as run:
        from organizations.services import create_agent_token, create_organization
        from pipelines.services import create_pipeline

        user = migrate_and_create_user()
        org = create_organization(name="bench", owner=user)
        pipeline = create_pipeline(org=org, name="app", repository="", default_branch="main")
        token = create_agent_token(organization=org, created_by=user, description="container bench").raw
        image = make_image(args.engine, run.work)
        run.defer(subprocess.run, [args.engine, "rmi", "--force", image], capture_output=True)
        port = free_port()
        server = start_server(port, run.server_log, run.env)
        run.defer(stop_group, server)
        server_url = f"http://127.0.0.1:{port}"

        def start(name: str, options: list[str]) -> subprocess.Popen:
            process = start_agent(name, server=server_url, token=token, work=run.work, env=run.env, options=options)
            run.defer(stop_group, process, grace=1)
            return process

        start.container_options = ["--executor", args.engine, "--default-image", image,  # type: ignore[attr-defined]
                                   *(ULIMITS if args.engine == "podman" else [])]
        say(f"database {args.db}; image {image}; {args.jobs} jobs per executor; load {loadavg()}")
        results = overhead(pipeline, jobs=args.jobs, image=image, start=start)
        say("  snapshot builds...")
        snap = snapshot(pipeline, image=image, start=start)
        report(results, snap, args.engine)
        say(f"load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
