"""`stream_bench.py --server-experiment NAME`: experiments, not the product.

Each is the body of a gunicorn `post_worker_init` hook (see bench/server.py for how they
are applied) that replaces a function in every worker, to measure what a change to the
server would buy before it is made.

hub-poll-with-arrays: the LogHub's poll as two statements with array parameters instead of
  an ORM query OR-ing one condition per watched job (see the code for why).
switch-interval-1ms: the interpreter hands the GIL over every 1 ms instead of 5 ms, so a REST
  thread back from the database waits less behind the event loop's thread.
"""

STREAM_EXPERIMENTS = {
    "hub-poll-with-arrays": """
    from django.db import DatabaseError, close_old_connections, connection

    from builds import stream
    from builds.models import Job, LogChunk

    # Built once per worker, from the models' names, so each poll pays only for running them.
    job_id, job_state = Job._meta.pk.column, Job._meta.get_field("state").column
    chunk_job, seq, kind, content, ts = (LogChunk._meta.get_field(name).column
                                         for name in ("job", "seq", "stream_kind", "content", "ts"))
    states_sql = f"SELECT {job_id}, {job_state} FROM {Job._meta.db_table} WHERE {job_id} = ANY(%s)"
    chunks_sql = (
        f"SELECT c.{chunk_job}, c.{seq}, c.{kind}, c.{content}, c.{ts} FROM {LogChunk._meta.db_table} c "
        f"JOIN unnest(%s::uuid[], %s::int[]) AS w(job_id, seq) ON c.{chunk_job} = w.job_id AND c.{seq} > w.seq "
        f"ORDER BY c.{chunk_job}, c.{seq}")

    def fetch_updates(cursors):
        # The stock poll ORs one Q(job_id=..., seq__gt=...) per watched job: building and compiling
        # that in Python costs time proportional to the watched jobs, five times a second, under
        # the GIL the REST threads need. Here: two statements with array parameters.
        try:
            ids = list(cursors)
            with connection.cursor() as cursor:
                cursor.execute(states_sql, [ids])
                states = dict(cursor.fetchall())
                cursor.execute(chunks_sql, [ids, [cursors[i] for i in ids]])
                chunks = cursor.fetchall()
            return states, chunks
        except DatabaseError:
            close_old_connections()
            raise

    stream.fetch_updates = fetch_updates
""",
    "switch-interval-1ms": """
    import sys

    sys.setswitchinterval(0.001)
""",
}
