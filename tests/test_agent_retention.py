"""Agents not seen for more than a day are pruned by the reaper; the jobs they ran stay."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest

from builds.models import Agent, Job, JobState
from builds.reaper import run_reaper
from builds.services.agents import prune_agents
from tests.helpers import make_agent, make_build, run_job

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 6, 4, 12, 0, tzinfo=dt_timezone.utc)
DAY = timedelta(days=1)


def seen(agent: Agent, at: datetime) -> Agent:
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=at)
    return agent


def test_agents_silent_for_more_than_a_day_are_pruned_in_every_organization(org, other_org):
    old = seen(make_agent(org, name="old"), NOW - DAY - timedelta(seconds=1))
    theirs = seen(make_agent(other_org, name="theirs"), NOW - timedelta(days=30))
    recent = seen(make_agent(org, name="recent"), NOW - DAY + timedelta(seconds=1))
    at_the_mark = seen(make_agent(org, name="at-the-mark"), NOW - DAY)

    assert prune_agents(now=NOW) == 2

    assert set(Agent.objects.values_list("name", flat=True)) == {"recent", "at-the-mark"}
    assert not Agent.objects.filter(pk__in=[old.pk, theirs.pk]).exists()
    assert recent.pk and at_the_mark.pk


def test_a_pruned_agents_jobs_keep_their_history(org, pipeline):
    agent = seen(make_agent(org, name="old"), NOW - 2 * DAY)
    build = make_build(pipeline)
    job = Job.objects.filter(build=build).order_by("position").first()  # the first, scheduled
    Job.objects.filter(pk=job.pk).update(agent=agent)
    run_job(job)

    assert prune_agents(now=NOW) == 1

    job.refresh_from_db()
    assert (job.state, job.agent_id) == (JobState.PASSED, None)


def test_a_pass_prunes_at_most_one_batch(org):
    for i in range(5):
        seen(make_agent(org, name=f"old-{i}"), NOW - 2 * DAY)
    assert prune_agents(now=NOW, batch=3) == 3
    assert prune_agents(now=NOW, batch=3) == 2
    assert prune_agents(now=NOW, batch=3) == 0
    assert not Agent.objects.exists()


def test_the_reaper_prunes_long_gone_agents(org):
    seen(make_agent(org, name="old"), datetime.now(dt_timezone.utc) - 2 * DAY)
    live = make_agent(org, name="live")

    run_reaper(stop=threading.Event(), interval=0, once=True)

    assert list(Agent.objects.values_list("pk", flat=True)) == [live.pk]
