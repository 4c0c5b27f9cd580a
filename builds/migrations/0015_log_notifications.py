"""PostgreSQL triggers that tell live log streams a job's chunks were appended or it ended (builds.sql)."""

from django.db import migrations


def create_triggers(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor != "postgresql":
        return
    from builds import sql

    for statement in sql.log_notification_sql():
        schema_editor.execute(statement)


def drop_triggers(apps, schema_editor) -> None:  # noqa: ANN001
    if schema_editor.connection.vendor != "postgresql":
        return
    from builds import sql

    for statement in sql.drop_log_notification_sql():
        schema_editor.execute(statement)


class Migration(migrations.Migration):
    dependencies = [("builds", "0014_claim_notifications")]

    operations = [migrations.RunPython(create_triggers, drop_triggers)]
