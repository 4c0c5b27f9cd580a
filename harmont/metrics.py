"""Prometheus metrics: what the processes count, and the `/metrics` answer.

Counters and histograms are kept per process by `prometheus-client`. Under
gunicorn every worker is a process of its own, so with HARMONT_METRICS_DIR set
(`make run` sets it) they go to files there (the library's multiprocess mode)
and a scrape of any worker adds up all of them; harmont/gunicorn_conf.py clears
the directory when the server starts and forgets a worker that exits. What the
database knows (jobs by state, queues, agents, the task queue) is read at scrape
time instead (builds.metrics), in a few bounded queries, so it is right however
many processes and machines there are.

Scrapes need `Authorization: Bearer <HARMONT_METRICS_TOKEN>`; without that
setting `/metrics` is a 404, as if it did not exist.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest, multiprocess

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

REQUEST_SECONDS = Histogram("harmont_http_request_duration_seconds",
                            "Time to answer a request (a held claim: each of its attempts), by route pattern.",
                            ["method", "route", "status"], buckets=REQUEST_BUCKETS)
CLAIM_LATENCY = Histogram("harmont_claim_latency_seconds",
                          "From a job becoming claimable (scheduled) to an agent claiming it.",
                          buckets=QUEUE_BUCKETS)
CLAIM_HOLD_SECONDS = Histogram("harmont_claim_hold_seconds",
                               "How long long-poll claims were held, by how they ended (job, empty, 401, gone).",
                               ["outcome"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30))
CLAIMS_RESUMED = Counter("harmont_claims_resumed", "Held claims that began without an attempt, resumed from the "
                         "agent's last one (builds.claim_resumes).")
CLAIMS_HELD = Gauge("harmont_claims_held", "Long-poll claims held now.", multiprocess_mode="livesum")
LOG_BYTES = Counter("harmont_log_bytes_ingested", "Log content stored, in bytes (UTF-8).")
LOG_CHUNKS = Counter("harmont_log_chunks_ingested", "Log chunks stored.")
STREAMS_OPEN = Gauge("harmont_log_streams_open", "Live log streams (SSE) open now.", multiprocess_mode="livesum")
REAPER_PASSES = Counter("harmont_reaper_passes", "Passes of the reaper (manage.py runreaper).")
REAPER_ENDED = Counter("harmont_reaper_ended", "Jobs and builds the reaper ended, by verdict.", ["verdict"])


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


# Collectors of what the database knows, added by the apps (builds.apps).
_scrape_collectors: list[Any] = []


def register_scrape_collector(collector: Any) -> None:
    _scrape_collectors.append(collector)


def process_metrics() -> bytes:
    """What the processes counted: all of this machine's (multiprocess mode), or this process's."""
    registry = CollectorRegistry()
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY  # this process alone: its own metrics are all there are
    return generate_latest(registry)


def exposition() -> bytes:
    """The text a scrape gets: every process's metrics, then the database's."""
    text = process_metrics()
    if _scrape_collectors:
        scraped = CollectorRegistry(auto_describe=False)
        for collector in _scrape_collectors:
            scraped.register(collector)
        text += generate_latest(scraped)
    return text


def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.METRICS_TOKEN
    if not token:
        return HttpResponse(status=404)
    offered = request.headers.get("Authorization", "")
    if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
        return HttpResponse(status=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


def route_of(request: HttpRequest) -> str:
    match = getattr(request, "resolver_match", None)
    return f"/{match.route}" if match is not None and match.route else "unmatched"


class RequestMetricsMiddleware:
    """Counts every request in REQUEST_SECONDS, labelled by its route pattern (never the raw path: ids
    would make a series per build)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        REQUEST_SECONDS.labels(request.method, route_of(request), str(response.status_code)).observe(
            time.perf_counter() - started)
        return response


def count_reaped(verdicts: Iterable[tuple[str, int]]) -> None:
    REAPER_PASSES.inc()
    for verdict, count in verdicts:
        if count:
            REAPER_ENDED.labels(verdict).inc(count)
