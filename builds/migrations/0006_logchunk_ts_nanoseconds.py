"""Log chunks keep their time as Unix nanoseconds, the unit the live stream sends."""

from django.db import migrations, models

BATCH = 2000


def _convert(apps, source: str, target: str, convert) -> None:
    """Fill column `target` of every chunk from `source`, in batches."""
    LogChunk = apps.get_model("builds", "LogChunk")
    batch = []
    for chunk in LogChunk.objects.only("id", source).iterator(chunk_size=BATCH):
        setattr(chunk, target, convert(getattr(chunk, source)))
        batch.append(chunk)
        if len(batch) == BATCH:
            LogChunk.objects.bulk_update(batch, [target])
            batch = []
    if batch:
        LogChunk.objects.bulk_update(batch, [target])


def to_nanoseconds(apps, schema_editor):
    from harmont.timestamps import ns_from_datetime

    _convert(apps, "ts", "ts_ns", ns_from_datetime)


def to_datetimes(apps, schema_editor):
    from harmont.timestamps import datetime_from_ns

    _convert(apps, "ts_ns", "ts", datetime_from_ns)


class Migration(migrations.Migration):
    dependencies = [("builds", "0005_job_claim_key")]

    operations = [
        migrations.AddField("logchunk", "ts_ns", models.BigIntegerField(null=True)),
        # Nullable while both exist, so that going back can re-add `ts` before filling it.
        migrations.AlterField("logchunk", "ts", models.DateTimeField(null=True)),
        migrations.RunPython(to_nanoseconds, to_datetimes),
        migrations.RemoveField("logchunk", "ts"),
        migrations.RenameField("logchunk", "ts_ns", "ts"),
        migrations.AlterField("logchunk", "ts", models.BigIntegerField()),
    ]
