"""How an agent gets a build's code when it was not uploaded with the build.

Part of the agent program: no Django here. Either a tarball at `source_url`
(checked against `source_sha256` when given) or a `git` checkout of the
pipeline's repository at the build's commit.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

TARBALL_MAX_BYTES = 1024 * 1024 * 1024
DOWNLOAD_TIMEOUT = 60.0
GIT_TIMEOUT = 600.0
# Never ask for credentials on a terminal nobody watches; fail instead.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}


class SourceError(Exception):
    """The build's code could not be fetched; the message says why, for the job's log."""


def fetch_tarball(url: str, *, sha256: str | None) -> bytes:
    """Download a source tarball, refusing it when its SHA-256 is not the expected one."""
    if not url.startswith(("http://", "https://")):
        raise SourceError(f"source_url must be an http(s) URL, got {url[:200]!r}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:  # noqa: S310 (scheme checked)
            data = response.read(TARBALL_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"could not download {url}: {exc}") from exc
    if len(data) > TARBALL_MAX_BYTES:
        raise SourceError(f"{url} is larger than {TARBALL_MAX_BYTES} bytes")
    if sha256:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise SourceError(f"{url} has SHA-256 {actual}, but the build expects {sha256.lower()}")
    return data


def _git(*args: str, cwd: Path) -> str:
    env = {**os.environ, **GIT_ENV}
    try:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=GIT_TIMEOUT)
    except FileNotFoundError as exc:
        raise SourceError("git is not installed on this agent") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceError(f"git {args[0]} took longer than {GIT_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        raise SourceError(f"git {' '.join(args[:1])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def git_checkout(url: str, *, commit: str, branch: str | None, workspace: Path) -> str:
    """Check out `commit` of the repository at `url` into `workspace`; returns the full commit id.

    A full commit id is fetched alone (shallow); when that fails (an abbreviated id,
    a server that refuses fetching by id) every branch, tag and pull request head is
    fetched and `commit` resolved locally. `HEAD` means the tip of the build's branch.

    The server refuses branches and commits git could read as options, but this
    must hold without it: every value from the job spec comes after `--` or
    `--end-of-options`, so `--upload-pack=...` is at worst a ref that does not exist.
    """
    _git("init", "--quiet", "--", ".", cwd=workspace)
    _git("remote", "add", "--", "origin", url, cwd=workspace)
    wanted = commit
    if commit == "HEAD" and branch:
        wanted = branch
    try:
        _git("fetch", "--quiet", "--depth=1", "--", "origin", wanted, cwd=workspace)
        target = "FETCH_HEAD"
    except SourceError:
        # Pull request heads too: a fork's commit is reachable only from refs/pull/N/head.
        _git("fetch", "--quiet", "--", "origin", "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*",
             "+refs/pull/*/head:refs/remotes/origin/pull/*", cwd=workspace)
        target = f"origin/{wanted}" if wanted == branch else wanted
    # checkout reads what follows `--` as paths, so the revision must come before it:
    # resolved to an object id first, which no option starts like.
    revision = _git("rev-parse", "--verify", "--end-of-options", f"{target}^{{commit}}", cwd=workspace)
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", revision, "--", cwd=workspace)
    return _git("rev-parse", "--verify", "HEAD", cwd=workspace)
