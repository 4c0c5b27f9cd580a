"""The API throughput benchmark (`bench/api_bench.py`): what it seeds and what it must reach."""

DB_NAME = "harmont_bench"

BUILDS = 10_000
BATCH = 2_000  # builds per bulk_create
DEEP = 9_000  # the deep page starts after skipping this many builds (newest first)
MIDDLE = BUILDS // 2  # the build GET build and the baseline read
GET_BUILD_TARGET = 0.6  # GET build >= 0.6 x baseline
DEEP_PAGE_TARGET = 0.9  # deep page >= 0.9 x first page
