"""Settings for `bench/api_bench.py`: the app's own settings, plus the baseline route.

Everything else (middleware, authentication, CONN_MAX_AGE, health checks) is the
app's, so the figures describe what production serves.
"""

from harmont.settings import *  # noqa: F401,F403

ROOT_URLCONF = "bench.urls"
