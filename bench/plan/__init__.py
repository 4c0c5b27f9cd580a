"""The plan bench (`bench/plan_bench.py`): planning and inserting a 1,000-step build with waits."""

DB_NAME = "harmont_bench_plan"
STEPS = 1000
