"""Ends a job's commands when their agent dies: run as a process of its own beside the agent.

The agent starts this once (`python -I guard.py [--engine PATH] [UID GID]`) with a pipe
on its stdin and tells it, a line each, the process group of every command it starts
(`+PGID`) and of every command that ended (`-PGID`), and with a container executor the
name of every job container it creates (`+container NAME`) and removed (`-container
NAME`). When the agent is gone, however it went (SIGKILL included), the kernel closes
the pipe: the guard SIGKILLs every group still named, kills and removes every container
still named (through the engine's CLI at PATH), and with UID and GID (the agent's
`--run-as` user) SIGKILLs every process of that user too, so nothing a job started
outlives it there either.

Why not the kernel's parent-death signal (PR_SET_PDEATHSIG) on the command: it reaches
only the one process the agent started (`bash`), never what that shell started in turn,
and it fires when the thread that started the command ends, not the agent.

Standalone on purpose: nothing of the project is imported, so it starts in a few
milliseconds, from any directory, as any user that may run the agent's Python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def kill_user_processes(uid: int, gid: int) -> None:
    """SIGKILL every process of `uid` but this helper itself: kill(-1) from a child running as that user."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def remove_containers(engine: str, names: set[str]) -> None:
    """SIGKILL the containers' processes, then remove them (both engines take these two commands)."""
    for name in names:
        for command in (["kill", name], ["rm", "--force", name]):
            try:
                subprocess.run([engine, *command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=60, cwd="/")
            except (OSError, subprocess.SubprocessError):
                pass


def main(argv: list[str]) -> int:
    # A Ctrl-C in the agent's terminal reaches this process too: the agent decides what
    # stops, and this process goes when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    engine = None
    if argv[:1] == ["--engine"] and len(argv) >= 2:
        engine, argv = argv[1], argv[2:]
    groups: set[int] = set()
    containers: set[str] = set()
    for line in sys.stdin:
        line = line.strip()
        if line[:1] in ("+", "-") and line[1:].isdigit():
            (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
        elif line[1:].startswith("container ") and line[:1] in ("+", "-"):
            (containers.add if line[0] == "+" else containers.discard)(line[len("+container "):])
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if engine is not None and containers:
        remove_containers(engine, containers)
    if len(argv) == 2 and groups:
        kill_user_processes(int(argv[0]), int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
