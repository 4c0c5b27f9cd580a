"""`stream_bench.py --server-experiment NAME`: experiments, not the product.

Each is the body of a gunicorn `post_worker_init` hook (see bench/server.py for how they
are applied) that replaces a function in every worker, to measure what a change to the
server would buy before it is made.

hub-poll-with-arrays: the LogHub's poll as two statements with array parameters instead of
  an ORM query OR-ing one condition per watched job (see the code for why).
"""

STREAM_EXPERIMENTS = {
    "hub-poll-with-arrays": """
    from django.db import DatabaseError, close_old_connections, connection

    from builds import stream

    def fetch_updates(cursors):
        # The stock poll ORs one Q(job_id=..., seq__gt=...) per watched job: building and compiling
        # that in Python costs time proportional to the watched jobs, five times a second, under
        # the GIL the REST threads need. Here: two statements with array parameters.
        try:
            ids = list(cursors)
            with connection.cursor() as cursor:
                cursor.execute("SELECT id, state FROM builds_job WHERE id = ANY(%s)", [ids])
                states = dict(cursor.fetchall())
                cursor.execute(
                    "SELECT c.job_id, c.seq, c.stream_kind, c.content, c.ts FROM builds_logchunk c "
                    "JOIN unnest(%s::uuid[], %s::int[]) AS w(job_id, seq) ON c.job_id = w.job_id AND c.seq > w.seq "
                    "ORDER BY c.job_id, c.seq", [ids, [cursors[i] for i in ids]])
                chunks = cursor.fetchall()
            return states, chunks
        except DatabaseError:
            close_old_connections()
            raise

    stream.fetch_updates = fetch_updates
""",
}
