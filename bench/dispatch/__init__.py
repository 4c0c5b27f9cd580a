"""The dispatch benchmark (`bench/dispatch_bench.py`): its database, organizations and targets."""

import os

# Its own name per checkout when several people bench on one PostgreSQL: the run drops and re-creates it.
DB_NAME = os.environ.get("HARMONT_BENCH_DISPATCH_DB", "harmont_bench_dispatch")
THROUGHPUT_TARGET = 100.0  # jobs/s end to end
CLAIM_P95_TARGET = 1.0  # seconds from scheduled to assigned
ORG_NAME, PIPELINE_NAME = "bench", "dispatch"
PROBE_ORG = "probe"  # a second organization whose jobs the in-process query counts claim
