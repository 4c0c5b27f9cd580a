"""The dispatch bench's data: organizations, pipelines of independent one-line jobs, tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dispatch import ORG_NAME, PIPELINE_NAME, PROBE_ORG
from bench.seeding import independent_steps, migrate_and_create_user


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    api_token: str
    agent_token: str


def migrate_and_seed(jobs_per_build: int, command: str) -> tuple[Seed, Seed]:
    """Migrates, then seeds two organizations alike: the agents' (`bench`) and the probe's (`probe`)."""
    from organizations.services import create_agent_token, create_organization, create_personal_token
    from pipelines.services import create_pipeline

    user = migrate_and_create_user()
    api_token = create_personal_token(user=user, description="dispatch bench").raw
    seeds = []
    for name in (ORG_NAME, PROBE_ORG):
        org = create_organization(name=name, owner=user)
        # No repository: root jobs then start from an empty workspace (no source to fetch),
        # so what is measured is dispatch, not a clone per job.
        pipeline = create_pipeline(org=org, name=PIPELINE_NAME, repository="", repo_name=f"{name}/app",
                                   default_branch="main", definition=independent_steps(jobs_per_build, command))
        agent_token = create_agent_token(organization=org, created_by=user, description="dispatch bench").raw
        seeds.append(Seed(org=org.slug, pipeline=pipeline.slug, api_token=api_token, agent_token=agent_token))
    return seeds[0], seeds[1]


def build_body(index: int, runs_file: Path) -> dict[str, Any]:
    return {"branch": "main", "commit": f"{index:040x}", "message": f"dispatch bench build {index}",
            "env": {"BENCH_RUNS_FILE": str(runs_file)}}

