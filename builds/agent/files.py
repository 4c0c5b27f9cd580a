"""Files an agent moves: workspace archives and the artifacts a job leaves behind."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path


class BoundedReader:
    """A file read as a request body of exactly `size` bytes (its size when it was opened).

    A job's background process may still be appending to it; sending more bytes
    than the Content-Length announced would break the connection.
    """

    def __init__(self, file: io.BufferedReader, size: int) -> None:
        self.file = file
        self.size = size
        self.remaining = size

    def seek(self, offset: int) -> None:
        self.file.seek(offset)
        self.remaining = self.size - offset

    def read(self, n: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        data = self.file.read(self.remaining if n is None or n < 0 else min(n, self.remaining))
        self.remaining -= len(data)
        return data

    def sha256(self) -> str:
        digest = hashlib.sha256()
        self.seek(0)
        while chunk := self.read(1024 * 1024):
            digest.update(chunk)
        self.seek(0)
        return digest.hexdigest()


def printable(name: str) -> str:
    """A file name as UTF-8 text (bytes that aren't UTF-8 become U+FFFD), for the log and the server."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def collect_artifacts(directory: Path) -> tuple[list[tuple[str, Path, bool]], list[tuple[str, str]]]:
    """The files to upload from `directory` as (relative path, path to open, open without following links),
    and the entries skipped with the reason.

    A symbolic link is uploaded only if it leads to a regular file inside the
    directory: a job must not make the agent upload what it can read elsewhere
    on the host (its own token, other jobs' workspaces). Linked directories are
    not entered.
    """
    root = directory.resolve()
    files: list[tuple[str, Path, bool]] = []
    skipped: list[tuple[str, str]] = []
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(current)
        linked_dirs = [name for name in dirnames if (base / name).is_symlink()]
        for name in sorted(filenames + linked_dirs):
            path = base / name
            relative = printable(path.relative_to(root).as_posix())
            try:
                if path.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(root):
                        skipped.append((relative, "a symbolic link to outside $HARMONT_ARTIFACTS"))
                    elif not target.is_file():
                        skipped.append((relative, "a symbolic link to no regular file"))
                    else:
                        files.append((relative, target, False))
                elif not stat.S_ISREG(path.lstat().st_mode):
                    skipped.append((relative, "not a regular file"))
                else:
                    files.append((relative, path, True))
            except (OSError, RuntimeError) as exc:  # removed meanwhile, a link loop
                skipped.append((relative, str(exc)))
    return files, skipped


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
