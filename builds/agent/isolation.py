"""What keeps a job's command away from its agent's credentials.

The agent token is the organization's: whoever holds it can register agents and
claim every job of the organization, with its secrets. A job's command runs on
the agent's host, so the agent keeps the token out of everything a command there
can read:

- the command line: /proc/PID/cmdline is readable by every process of the host,
  so the token comes from `--token-file` or `HARMONT_AGENT_TOKEN`;
- the environment: /proc/PID/environ shows the environment a process was
  started with, whatever it removed from `os.environ` since. So an agent that
  was given the token in its environment (or on its command line, or the
  server's settings in its environment) replaces itself at once (`exec`, same
  pid) with a clean environment, the token handed over through a pipe;
- the job's environment, made of the job's own variables and a few of the
  agent's (`job_environment`).

On Linux the agent also forbids other processes of its user to read its memory or
trace it (`forbid_inspection`); root's processes still can, and any process of the
agent's user can read its token file. `--run-as USER` runs commands as another
user, who can do neither (nor read anything else of the agent under /proc).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_VARIABLE = "HARMONT_AGENT_TOKEN"
PR_SET_DUMPABLE = 4  # from <linux/prctl.h>
# What a job gets of its agent's environment (besides LC_*): enough for a shell and its tools.
PASSED_TO_JOBS = ("PATH", "HOME", "LANG", "USER", "TMPDIR")
DEFAULT_PATH = "/usr/bin:/bin"
DEFAULT_LANG = "C.UTF-8"
TOKEN_OPTION_WARNING = (
    "warning: --token puts the agent token on the command line, where every process on this host "
    "can read it (ps, /proc); use --token-file PATH or the HARMONT_AGENT_TOKEN environment variable\n")


class TokenError(Exception):
    """The agent token could not be read; the message says why, for the command line."""


def is_server_setting(name: str) -> bool:
    """The server's configuration (its secret key, database, encryption keys): the agent needs none of it.

    Its own HARMONT_AGENT_TOKEN is one of these too: read before the restart that drops them all.
    """
    return name.startswith("HARMONT_") or name == "DATABASE_URL"


def read_token(*, option: str | None, path: str | None, fd: int | None, environ: Mapping[str, str]) -> str:
    """The agent token from whichever source was given: `--token`, `--token-file`, the hand-over pipe
    of a restart, or else the environment."""
    if option is not None:
        token = option
    elif path is not None:
        try:
            token = Path(path).read_text()
        except OSError as exc:
            raise TokenError(f"--token-file {path}: {exc.strerror or exc}") from exc
    elif fd is not None:
        with os.fdopen(fd, "r") as pipe:
            token = pipe.read()
    elif environ.get(TOKEN_VARIABLE):
        token = environ[TOKEN_VARIABLE]
    else:
        raise TokenError(f"the agent token is missing: pass --token-file PATH or set {TOKEN_VARIABLE}")
    token = token.strip()
    if not token:
        raise TokenError(f"--token-file {path} is empty" if path is not None else "the agent token is empty")
    return token


def token_file_warning(path: str) -> str | None:
    """A warning when other users may read the token file (a job running as another user could)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o044:
        return (f"warning: --token-file {path} is readable by other users (mode {mode & 0o777:o}); "
                f"chmod 600 it\n")
    return None


def forbid_inspection() -> None:
    """Linux: other processes of the agent's user (its commands, without --run-as) may no longer read
    its memory, environment or open files under /proc, nor trace it; only root still may.

    A process that is not "dumpable" gets that from the kernel. It is reset by every exec, so the
    agent's commands are ordinary processes, and so is the agent after its own restart, which is
    why this runs first thing in every start. Elsewhere than on Linux nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl to call (another C library): the protections above still hold


def needs_restart(*, token_on_command_line: bool, environ: Mapping[str, str]) -> bool:
    return token_on_command_line or any(is_server_setting(name) for name in environ)


def restart_cleanly(*, token: str, argv: list[str], options: list[str], environ: Mapping[str, str]) -> None:
    """Replace this process (same pid) by the agent started with `options`, without the server's
    settings and the token in its environment or command line; the token goes through a pipe.

    Returns only when this process was not started as `... argv` (the agent called from Python
    with arguments of its own), which can't be started again.
    """
    prefix_length = len(sys.orig_argv) - len(argv)
    if prefix_length < 1 or sys.orig_argv[prefix_length:] != argv:
        return
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # a few dozen bytes: the pipe's buffer holds them until read
    os.close(write_end)
    os.set_inheritable(read_end, True)
    clean = {name: value for name, value in environ.items() if not is_server_setting(name)}
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, *sys.orig_argv[1:prefix_length], *options, "--token-fd", str(read_end)]
    os.execve(command[0], command, clean)


def job_environment(job_env: Mapping[str, str], *, agent_env: Mapping[str, str], run_as: RunAs | None,
                    default_home: str) -> dict[str, str]:
    """A job's environment: a few variables of the agent's (`PASSED_TO_JOBS`, LC_*), then the job's own.

    Nothing else of the agent's environment reaches the command: whatever the agent was
    started with (credentials of its host, a server's settings) stays with the agent.
    """
    env = {name: value for name, value in agent_env.items()
           if name in PASSED_TO_JOBS or name.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("LANG", DEFAULT_LANG)
    env.setdefault("HOME", default_home)
    if run_as is not None:
        # The agent's home is not the user's to write to; give the command the user's own.
        env.update(HOME=run_as.home, USER=run_as.name)
    return {**env, **job_env}


@dataclass(frozen=True)
class RunAs:
    """The user job commands run as (`--run-as`)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, user: str) -> RunAs:
        """The user named `user`; a LookupError says why it can't be used."""
        if os.geteuid() != 0:
            raise LookupError(f"--run-as {user}: the agent must run as root to start commands as another user")
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f"--run-as {user}: no such user") from None
        if entry.pw_uid == 0:
            raise LookupError(f"--run-as {user}: commands would run as root; choose an unprivileged user")
        return cls(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid,
                   groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)), home=entry.pw_dir)

    def popen_options(self) -> dict[str, Any]:
        # extra_groups too: without it the command would keep the agent's (root's) groups.
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def reaches(self, directory: Path) -> bool:
        """Whether the user can get to `directory` (every directory above it lets them through)."""
        done = subprocess.run(["test", "-x", str(directory)], env={"PATH": DEFAULT_PATH}, stdin=subprocess.DEVNULL,
                              capture_output=True, **self.popen_options())
        return done.returncode == 0

    def kill_all_processes(self) -> None:
        """SIGKILL every process of the user: `kill -1` run as the user, which spares only itself."""
        subprocess.run(["bash", "-c", "kill -KILL -1"], env={"PATH": DEFAULT_PATH}, stdin=subprocess.DEVNULL,
                       capture_output=True, **self.popen_options())

    def give(self, path: Path) -> None:
        """Make `path` and everything below it the user's, without following symbolic links.

        Bottom-up, so that a directory becomes the user's only once everything in it
        is done: a process of the user's left over from an earlier job can't swap a
        directory not yet handled for a link to elsewhere.
        """
        for current, dirnames, filenames in os.walk(path, topdown=False):
            for name in (*filenames, *dirnames):
                os.chown(os.path.join(current, name), self.uid, self.gid, follow_symlinks=False)
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
