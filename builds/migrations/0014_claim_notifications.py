"""PostgreSQL triggers that wake long-polling claims when jobs become claimable (builds.sql)."""

from django.db import migrations


def create_triggers(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor != "postgresql":
        return
    from builds import sql

    for statement in sql.claim_notification_sql():
        schema_editor.execute(statement)


def drop_triggers(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor != "postgresql":
        return
    from builds import sql

    for statement in sql.drop_claim_notification_sql():
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("builds", "0013_step_caches")]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
