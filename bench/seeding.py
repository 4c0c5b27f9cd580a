"""What every benchmark's seed starts from: the migrated scratch database, the user it acts as, and
pipelines of independent one-line steps. Called after Django is set up (`ScratchRun`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from organizations.models import User


def migrate_and_create_user() -> User:
    """Migrates the scratch database and creates the user every benchmark acts as."""
    from django.core.management import call_command

    from organizations.services import create_user

    call_command("migrate", interactive=False, verbosity=0)
    return create_user(email="bench@example.com", name="Bench User")


def independent_steps(count: int, command: str, *, timeout_seconds: int = 600) -> dict[str, Any]:
    """`count` independent one-line steps, in the graph form `hm.pipeline([...])` renders."""
    return {
        "version": "0",
        "timeout_seconds": timeout_seconds,
        "graph": {
            "nodes": [{"step": {"key": f"job-{i:03d}", "label": f"job {i}", "cmd": command}, "env": {}}
                      for i in range(count)],
            "edges": [],
            "node_holes": [],
            "edge_property": "directed",
        },
    }


def analyze() -> None:
    """Fresh planner statistics for the freshly seeded tables, as a database in use would have."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
