"""What the agent knows of a claimed job: the server's claim answer, as one value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobSpec:
    id: str
    token: str
    command: str
    env: dict[str, str]
    timeout_seconds: int
    image: str | None
    step_key: str
    # Where a root job's code comes from: {"kind": "archive", "path"} (uploaded with the
    # build), {"kind": "url", "url", "sha256"} (a tarball) or {"kind": "git", "url",
    # "commit", "branch"} (clone the repository); None: start empty.
    source: dict[str, Any] | None
    parent_workspace_path: str | None
    upload_workspace: bool
    cancel_grace_seconds: float
    # A render job: {"source_slug", "result_path"}; the agent renders the pipeline
    # from the checked-out `.hm/*.py` instead of running a command.
    render: dict[str, Any] | None = None
    # Secret values in `env`: the shipper replaces them with [REDACTED] (SecretMasker).
    mask: list[str] = field(default_factory=list)
    # A builds_in child's parent filesystem, for container executors: {"job_id" (whose snapshot),
    # "path" (GET it)}; the host executor starts from the parent's workspace files only.
    parent_snapshot: dict[str, Any] | None = None
    # A job with builds_in children: where a container executor PUTs its filesystem snapshot,
    # {"path", "max_bytes"}.
    snapshot_upload: dict[str, Any] | None = None
    # The X-Request-Id of the request that claimed it (the server's log names it too).
    claim_request_id: str | None = None
    # The server takes the start with the finish (builds/agent/starts.py).
    start_with_finish: bool = False

    @classmethod
    def from_claim(cls, data: dict[str, Any]) -> "JobSpec":
        job = data["job"]
        return cls(
            id=job["id"], token=data["job_token"], command=job["command"], env=job["env"],
            timeout_seconds=job["timeout_seconds"], image=job.get("image"), step_key=job["step_key"],
            source=job.get("source"), parent_workspace_path=job.get("parent_workspace_path"),
            render=job.get("render"),
            upload_workspace=job.get("upload_workspace", False),
            cancel_grace_seconds=job.get("cancel_grace_seconds", 10),
            mask=job.get("mask", []),
            parent_snapshot=job.get("parent_snapshot"), snapshot_upload=job.get("snapshot_upload"),
            claim_request_id=data.get("claim_request_id"),
            start_with_finish=job.get("start_with_finish", False) is True,
        )
