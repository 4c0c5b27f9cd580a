"""The stream bench's data: per session, builds whose jobs are all running, each with one stored chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.seeding import analyze, independent_steps, migrate_and_create_user


@dataclass(frozen=True)
class Seed:
    org: str
    pipeline: str
    api_token: str
    build_number: int  # the build `GET` is measured on
    sessions: list[list[tuple[str, str, str]]]  # per session: (job id, build id, log token) of its running jobs


def migrate_and_seed(builds: int, jobs_per_build: int, sessions: int) -> Seed:
    """For each session, builds whose jobs are all `running`, each with one stored chunk, through the services."""

    from builds import services
    from builds.models import Job
    from builds.services.agents import register_agent
    from harmont.logtokens import mint_log_token
    from organizations.services import create_agent_token, create_organization, create_personal_token
    from pipelines.services import create_pipeline

    user = migrate_and_create_user()
    org = create_organization(name="bench", owner=user)
    api_token = create_personal_token(user=user, description="stream bench").raw
    pipeline = create_pipeline(org=org, name="app", repository="https://example.com/bench/app.git",
                               default_branch="main",
                               definition=independent_steps(jobs_per_build, "make test", timeout_seconds=3600))
    built = [services.create_build(pipeline=pipeline, created_by=user, request=services.validate_build_request(
        branch="main", commit=f"{i:040x}", message=f"stream bench build {i}")) for i in range(builds * sessions)]
    token = create_agent_token(organization=org, created_by=user, description="stream bench").token
    agent = register_agent(token=token, name="bench-seeder", hostname="bench").agent
    while (claim := services.claim_job(agent=agent)) is not None:
        services.start_job(job=claim.job)
    now = time.time_ns()
    log_tokens = {build.pk: mint_log_token(build_id=build.pk).token for build in built}
    jobs = []
    for job in Job.objects.filter(build__in=built).order_by("build__number", "position"):
        assert job.state == "running", job.state
        services.append_log(job=job, chunks=[services.ChunkIn(seq=1, stream_kind=2, ts=now,
                                                              content="harmont-agent: running (seeded)\n")])
        jobs.append((str(job.pk), str(job.build_id), log_tokens[job.build_id]))
    analyze()
    per_session = builds * jobs_per_build
    return Seed(org=org.slug, pipeline=pipeline.slug, api_token=api_token, build_number=built[0].number,
                sessions=[jobs[i * per_session:(i + 1) * per_session] for i in range(sessions)])
