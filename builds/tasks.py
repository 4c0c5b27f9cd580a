"""Background work of the builds app: tasks on the django-tasks queue, run by `manage.py db_worker`.

Each task takes ids, not objects, re-reads what it acts on, and is safe to run
twice (the services it calls decide with compare-and-sets), because the queue
delivers at least once: the reaper hands a task whose worker died to the queue again.
"""

from __future__ import annotations

from django_tasks import task

from builds.services import webhooks


@task()
def process_webhook_delivery(delivery_pk: int) -> int:
    """Build what a recorded webhook delivery triggers; returns how many builds it created (0: nothing to do)."""
    result = webhooks.process_webhook_delivery(delivery_pk=delivery_pk)
    return 0 if result is None else len(result.builds)
