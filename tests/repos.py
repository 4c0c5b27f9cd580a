"""Local git repositories with `.hm/*.py` pipeline files, for registration and checkout tests.

Everything is local (`file://` URLs): no network. The pipeline envelope is
rendered the way the `hm` CLI does it: the real `harmont` package runs the
repository's `.hm/*.py` in its own process and prints `dump_registry_json()`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
                "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com"}

RENDER = """
import runpy, sys
from pathlib import Path
import harmont
sys.path[:0] = [str(Path('.hm').resolve()), str(Path.cwd())]
for path in sorted(Path('.hm').glob('*.py')):
    runpy.run_path(str(path))
print(harmont.dump_registry_json())
"""


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_IDENTITY}, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


@dataclass
class GitRepo:
    path: Path

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        """Write the files, commit them on the current branch, return the commit id."""
        for name, content in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        git("add", "-A", cwd=self.path)
        git("commit", "--quiet", "-m", message, cwd=self.path)
        return git("rev-parse", "HEAD", cwd=self.path)

    def envelope(self) -> dict[str, Any]:
        """The pipeline envelope of the checked-out tree, rendered by the harmont package."""
        done = subprocess.run([sys.executable, "-I", "-c", RENDER], cwd=self.path, check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def make_repo(path: Path, files: dict[str, str], *, branch: str = "main") -> tuple[GitRepo, str]:
    """A new repository at `path` with one commit of `files` on `branch`; returns it and the commit."""
    path.mkdir(parents=True)
    git("init", "--quiet", f"--initial-branch={branch}", cwd=path)
    repo = GitRepo(path)
    return repo, repo.commit(files, "first")


CI_PY = '''
import harmont as hm

@hm.pipeline("ci", name="CI", triggers=[hm.push(branch=["main", "release/*"]), hm.pull_request()])
def ci():
    build = hm.sh("cat VERSION > built.txt && echo built $(cat VERSION)", key="build")
    return [build.sh("echo testing $(cat built.txt)", key="test")]

@hm.pipeline("deploy", triggers=[hm.push(tag="v*")], allow_manual=False)
def deploy():
    return [hm.sh("echo deploying $(cat VERSION)", key="deploy")]
'''
