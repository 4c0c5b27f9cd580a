"""Background work of the builds app: tasks on the django-tasks queue, run by `manage.py db_worker`.

Each task takes ids, not objects, re-reads what it acts on, and is safe to run
twice (the services it calls decide with compare-and-sets), because the queue
delivers at least once: the reaper hands a task whose worker died to the queue again.
"""

from __future__ import annotations

import uuid

from django_tasks import task

from builds.services import discovery, notifications, test_results, webhooks


@task()
def process_webhook_delivery(delivery_pk: int) -> int:
    """Build what a recorded webhook delivery triggers; returns how many builds it created (0: nothing to do)."""
    result = webhooks.process_webhook_delivery(delivery_pk=delivery_pk)
    return 0 if result is None else len(result.builds)


@task()
def discover_pipelines(build_id: str, envelope: dict) -> int:
    """Register a repository's pipelines again from the envelope a default-branch build rendered; returns the new
    builds made."""
    result = discovery.discover_pipelines(build_id=uuid.UUID(build_id), envelope=envelope)
    return 0 if result is None else len(result.builds)


@task()
def deliver_notifications(lane: str) -> int:
    """Post one lane's queued commit statuses or webhook events, in order; returns how many went out."""
    return notifications.deliver_lane(lane=lane)


@task()
def parse_test_report(artifact_id: str) -> str:
    """Parse one stored JUnit XML artifact into its job's test results; returns the report's status ("gone": no
    such artifact any more)."""
    report = test_results.parse_test_report(artifact_id=uuid.UUID(artifact_id))
    return "gone" if report is None else report.status
