"""What the database knows, as Prometheus gauges read when `/metrics` is scraped (harmont.metrics).

A few bounded queries per scrape, on indexes the claim and the agents page use
already: the jobs that are not finished (by state), the scheduled ones per
organization (count and the oldest one's age), the agents seen in the last day
(connected, lost, stopped) and the task queue's ready tasks. Finished jobs are
not counted here: their number only grows, and `harmont_claim_latency_seconds`
and the request metrics say what a scrape needs to know about throughput.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Min, Q
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from builds import states
from builds.models import Agent, Job, JobState
from builds.selectors import AGENT_LIST_WINDOW, agent_silence_allowed

UNFINISHED = sorted(set(JobState.values) - states.TERMINAL_JOB_STATES)


class DatabaseCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = timezone.now()
        jobs = GaugeMetricFamily("harmont_jobs", "Jobs not finished, by state.", labels=["state"])
        counts = dict(Job.objects.filter(state__in=UNFINISHED).order_by().values_list("state")
                      .annotate(n=Count("id")))
        for state in UNFINISHED:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs

        depth = GaugeMetricFamily("harmont_queue_depth", "Scheduled jobs waiting for an agent, per organization.",
                                  labels=["organization"])
        oldest = GaugeMetricFamily("harmont_queue_oldest_seconds",
                                   "Age of the oldest scheduled job, per organization.", labels=["organization"])
        queued = (Job.objects.filter(state=JobState.SCHEDULED).order_by().values_list("organization__slug")
                  .annotate(n=Count("id"), first=Min("scheduled_at")))
        for slug, count, first in queued:
            depth.add_metric([slug], count)
            oldest.add_metric([slug], max(0.0, (now - first).total_seconds()) if first else 0.0)
        yield depth
        yield oldest

        agents = GaugeMetricFamily("harmont_agents", "Agents seen in the last day, by connection.", labels=["state"])
        seen = Agent.objects.filter(last_seen_at__gte=now - AGENT_LIST_WINDOW).aggregate(
            stopped=Count("id", filter=Q(stopped_at__isnull=False)),
            lost=Count("id", filter=Q(stopped_at__isnull=True, last_seen_at__lt=now - agent_silence_allowed())),
            connected=Count("id", filter=Q(stopped_at__isnull=True, last_seen_at__gte=now - agent_silence_allowed())))
        for state in ("connected", "lost", "stopped"):
            agents.add_metric([state], seen[state] or 0)
        yield agents

        from django_tasks_db.models import DBTaskResult

        tasks = GaugeMetricFamily("harmont_task_queue_depth", "Background tasks waiting for a worker (db_worker).")
        tasks.add_metric([], DBTaskResult.objects.ready().count())
        yield tasks
