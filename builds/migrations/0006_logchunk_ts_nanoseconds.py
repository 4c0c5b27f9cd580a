"""Log chunks keep their time as Unix nanoseconds, the unit the live stream sends."""

from django.db import migrations, models

BATCH = 2000


def to_nanoseconds(apps, schema_editor):
    from harmont.timestamps import ns_from_datetime

    LogChunk = apps.get_model("builds", "LogChunk")
    batch = []
    for chunk in LogChunk.objects.only("id", "ts").iterator(chunk_size=BATCH):
        chunk.ts_ns = ns_from_datetime(chunk.ts)
        batch.append(chunk)
        if len(batch) == BATCH:
            LogChunk.objects.bulk_update(batch, ["ts_ns"])
            batch = []
    if batch:
        LogChunk.objects.bulk_update(batch, ["ts_ns"])


def to_datetimes(apps, schema_editor):
    from harmont.timestamps import datetime_from_ns

    LogChunk = apps.get_model("builds", "LogChunk")
    batch = []
    for chunk in LogChunk.objects.only("id", "ts_ns").iterator(chunk_size=BATCH):
        chunk.ts = datetime_from_ns(chunk.ts_ns)
        batch.append(chunk)
        if len(batch) == BATCH:
            LogChunk.objects.bulk_update(batch, ["ts"])
            batch = []
    if batch:
        LogChunk.objects.bulk_update(batch, ["ts"])


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
