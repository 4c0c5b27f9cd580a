"""The live log stream benchmark (`bench/stream_bench.py`): its database and targets."""

DB_NAME = "harmont_bench_stream"
DELAY_P95_TARGET = 0.25  # seconds, append -> receipt, at 1,000 viewers (issue 18)
THROUGHPUT_RATIO_TARGET = 0.7  # GET build with streams / without
