"""The pipeline page's trends: its last 100 builds as a chart, their pass rate and durations, and each step's.

Two queries however many builds and jobs there are: the builds (newest first,
off the (pipeline, number) index) and one aggregate over their jobs grouped by
step. Everything else is arithmetic here, and the chart is SVG drawn by the
template from the geometry computed here.

Definitions (Buildkite's): the pass rate counts finished builds that passed
against those that passed or failed (a canceled or skipped build says nothing
about the code); durations are of builds that passed or failed, from start to
finish. A step's failure rate counts every attempt that ran to an end (a
failed attempt that a retry fixed still failed: that is what flakiness looks
like here), its average duration every attempt that started and finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db.models import Avg, Count, DurationField, ExpressionWrapper, F, Q

from builds.models import Build, BuildState, Job, JobState
from pipelines.models import Pipeline

# The pipeline page's window: its trends, and its most frequent and flaky tests (builds.test_results).
RECENT_BUILDS = 100
CHART_H = 120
BAR_W = 8
BAR_GAP = 2
MIN_BAR_H = 3  # a build with no duration yet (running, canceled before it started) still shows
# The steps listed: most failing first, then slowest.
MAX_STEPS = 30

JUDGED = (BuildState.PASSED, BuildState.FAILED)
FAILED_JOB_STATES = (JobState.FAILED, JobState.TIMED_OUT)
ENDED_JOB_STATES = (JobState.PASSED, *FAILED_JOB_STATES)


@dataclass(frozen=True)
class ChartBar:
    number: int
    state: str
    branch: str
    seconds: float | None
    x: int
    y: int
    h: int


@dataclass(frozen=True)
class StepTrend:
    key: str
    runs: int
    failed: int
    average_seconds: float | None

    @property
    def failure_rate(self) -> float:
        return self.failed / self.runs if self.runs else 0.0


@dataclass(frozen=True)
class Trends:
    builds: int  # how many builds the figures are of (at most RECENT_BUILDS)
    bars: list[ChartBar]
    width: int
    height: int
    longest_seconds: float | None
    pass_rate: float | None  # None: no build passed or failed yet
    judged: int
    p50_seconds: float | None
    p95_seconds: float | None
    steps: list[StepTrend]


def pipeline_trends(pipeline: Pipeline) -> Trends:
    """The trends of the pipeline's last RECENT_BUILDS builds (two queries)."""
    rows = list(Build.objects.filter(pipeline=pipeline).order_by("-number")
                .values("id", "number", "state", "branch", "started_at", "finished_at")[:RECENT_BUILDS])
    rows.reverse()  # the chart reads oldest to newest, left to right
    steps = step_trends(pipeline, [row["id"] for row in rows]) if rows else []
    return summarise(rows, steps)


def step_trends(pipeline: Pipeline, build_ids: list[Any]) -> list[StepTrend]:
    """Per step of those builds: attempts that ran to an end, how many failed, their average duration."""
    took = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    ended = Q(state__in=ENDED_JOB_STATES, started_at__isnull=False, finished_at__isnull=False)
    grouped = (Job.objects.filter(build_id__in=build_ids, organization_id=pipeline.organization_id)
               .values("step_key")
               .annotate(runs=Count("id", filter=ended), failed=Count("id", filter=Q(state__in=FAILED_JOB_STATES)),
                         average=Avg(took, filter=ended))
               .order_by())
    trends = [StepTrend(row["step_key"], row["runs"], row["failed"], _seconds(row["average"])) for row in grouped]
    trends.sort(key=lambda t: (-t.failure_rate, -(t.average_seconds or 0), t.key))
    return trends[:MAX_STEPS]


def summarise(rows: list[dict[str, Any]], steps: list[StepTrend]) -> Trends:
    """The figures and the chart of `rows` (builds, oldest first, as `pipeline_trends` reads them)."""
    durations = {row["number"]: _duration(row) for row in rows}
    judged = [row for row in rows if row["state"] in JUDGED]
    timed = sorted(durations[row["number"]] for row in judged if durations[row["number"]] is not None)
    longest = max((d for d in durations.values() if d is not None), default=None)
    bars = []
    for i, row in enumerate(rows):
        seconds = durations[row["number"]]
        height = MIN_BAR_H if not seconds or not longest else max(MIN_BAR_H, round(CHART_H * seconds / longest))
        bars.append(ChartBar(row["number"], row["state"], row["branch"], seconds, i * (BAR_W + BAR_GAP),
                             CHART_H - height, height))
    passed = sum(row["state"] == BuildState.PASSED for row in judged)
    return Trends(
        builds=len(rows), bars=bars, width=max(1, len(rows) * (BAR_W + BAR_GAP) - BAR_GAP), height=CHART_H,
        longest_seconds=longest, pass_rate=passed / len(judged) if judged else None, judged=len(judged),
        p50_seconds=percentile(timed, 50), p95_seconds=percentile(timed, 95), steps=steps)


def percentile(ordered: list[float], p: float) -> float | None:
    """The nearest-rank percentile of an ascending list (None when empty): a duration one build really took."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _duration(row: dict[str, Any]) -> float | None:
    if row["started_at"] is None or row["finished_at"] is None:
        return None
    return max(0.0, (row["finished_at"] - row["started_at"]).total_seconds())


def _seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    # The backends differ in what an average of durations comes back as.
    return value.total_seconds() if isinstance(value, timedelta) else float(value) / 1_000_000
