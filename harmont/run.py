"""`make run`: migrate, seed the demo, and serve until interrupted.

Runs the server processes as children and stops every one of them when it is
interrupted (Ctrl-C) or when any of them dies, so nothing is left behind.
Local defaults only: production deployments run gunicorn (and the other
processes) under their own supervisor, as the README describes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR = BASE_DIR / "var"


def local_secret_key() -> str:
    """A secret key kept in var/secret_key, created on first run (sessions survive restarts)."""
    path = VAR / "secret_key"
    if not path.exists():
        VAR.mkdir(exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def manage(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, str(BASE_DIR / "manage.py"), *args], env=env, check=True, cwd=BASE_DIR,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


# All the local agent gets of make run's environment. Its jobs' commands run as this user on
# this host, so the agent must hold nothing of the server's: with the secret key a job could
# forge log tokens for every organization and decrypt every stored secret.
AGENT_ENVIRONMENT = ("PATH", "HOME", "LANG")


def agent_process(*, server: str, token: str, workdir: Path,
                  environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The local agent's command line and environment: the token in HARMONT_AGENT_TOKEN, not on the
    command line (which every process of the host can read), and none of the server's settings."""
    command = [sys.executable, str(BASE_DIR / "manage.py"), "runagent", "--server", server,
               "--name", "local-agent", "--workdir", str(workdir)]
    env = {name: environ[name] for name in AGENT_ENVIRONMENT if name in environ}
    return command, {**env, "HARMONT_AGENT_TOKEN": token}


def server_processes(env: dict[str, str], agent_token: str) -> list[tuple[list[str], dict[str, str]]]:
    """The web server, the reaper, a task worker, and one local agent for the demo organization: (command,
    environment)."""
    port = env["PORT"]
    workers = env.get("HARMONT_WORKERS", "2")
    manage_py = str(BASE_DIR / "manage.py")
    return [
        # harmont/gunicorn_conf.py: harmont.worker's workers (REST on threads, open log streams
        # and waiting claims in an event loop), the drain on SIGTERM, the metrics directory.
        ([sys.executable, "-m", "gunicorn", "-c", "python:harmont.gunicorn_conf", "harmont.wsgi:application",
          "--bind", f"127.0.0.1:{port}", "--workers", workers]
         + (["--access-logfile", "-"] if env.get("HARMONT_ACCESS_LOG") == "1" else []), env),
        ([sys.executable, manage_py, "runreaper"], env),
        # The task queue's worker: webhook deliveries are acted on here, not in their request.
        ([sys.executable, manage_py, "db_worker", "--interval", "0.5"], env),
        agent_process(server=f"http://127.0.0.1:{port}", token=agent_token, workdir=VAR / "agent", environ=env),
    ]


def main() -> int:
    env = dict(os.environ)
    env.setdefault("PORT", "8000")
    if not env.get("HARMONT_SECRET_KEY"):
        env["HARMONT_SECRET_KEY"] = local_secret_key()
    env.setdefault("HARMONT_PUBLIC_URL", f"http://127.0.0.1:{env['PORT']}")
    # The workers' metrics add up across processes here (harmont.metrics); gunicorn clears it at start.
    env.setdefault("HARMONT_METRICS_DIR", str(VAR / "metrics"))
    # A demo on one's own machine: let people try /signup (off by default on a real server).
    env.setdefault("HARMONT_SIGNUP_ENABLED", "1")
    print(manage("migrate", "--noinput", env=env), end="")
    manage("collectstatic", "--noinput", "--verbosity", "0", env=env)
    print(manage("seed_demo", env=env), end="")
    agent_token = manage("createagenttoken", "--org", "demo", "--description", "local agent (make run)",
                         "--replace", env=env).strip()
    print("  a local agent runs the demo organization's jobs (var/agent/)\n", flush=True)

    children = [subprocess.Popen(command, env=command_env, cwd=BASE_DIR)
                for command, command_env in server_processes(env, agent_token)]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [child for child in children if child.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


if __name__ == "__main__":
    sys.exit(main())
