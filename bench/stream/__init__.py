"""The live log stream benchmark (`bench/stream_bench.py`): its database and targets."""

DB_NAME = "harmont_bench_stream"
DELAY_P95_TARGET = 0.5  # seconds, append -> receipt
THROUGHPUT_RATIO_TARGET = 0.7  # GET build with streams / without
