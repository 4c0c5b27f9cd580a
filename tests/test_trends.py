"""The pipeline page's trends (builds.trends): the last builds' chart, pass rate, durations and each step's figures."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from typing import Any

import pytest
from django.test import Client

from builds import trends
from builds.models import Build, BuildState, Job, JobState
from organizations.models import User
from pipelines.models import Pipeline
from tests.helpers import make_build, run_job

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=dt_timezone.utc)


def row(number: int, state: str, seconds: float | None, branch: str = "main") -> dict[str, Any]:
    started = None if seconds is None else T0
    finished = None if seconds is None else T0 + timedelta(seconds=seconds)
    return {"id": number, "number": number, "state": state, "branch": branch, "started_at": started,
            "finished_at": finished}


def test_the_nearest_rank_percentile_is_a_duration_some_build_took() -> None:
    durations = [float(s) for s in range(1, 11)]
    assert trends.percentile(durations, 50) == 5.0
    assert trends.percentile(durations, 95) == 10.0
    assert trends.percentile([7.0], 95) == 7.0
    assert trends.percentile([], 50) is None


def test_the_figures_count_passed_and_failed_builds_and_the_chart_scales_to_the_longest() -> None:
    rows = [row(1, "passed", 60), row(2, "failed", 30), row(3, "canceled", 120), row(4, "passed", 90),
            row(5, "running", None)]

    summary = trends.summarise(rows, [])

    assert (summary.builds, summary.judged) == (5, 3)
    assert summary.pass_rate == pytest.approx(2 / 3)
    # Durations of the passed or failed ones: 30, 60, 90.
    assert (summary.p50_seconds, summary.p95_seconds) == (60.0, 90.0)
    assert summary.longest_seconds == 120.0
    heights = [bar.h for bar in summary.bars]
    assert heights == [60, 30, trends.CHART_H, 90, trends.MIN_BAR_H]
    assert [bar.y + bar.h for bar in summary.bars] == [trends.CHART_H] * 5  # bars stand on the axis
    assert [bar.x for bar in summary.bars] == [i * (trends.BAR_W + trends.BAR_GAP) for i in range(5)]
    assert summary.width == 5 * trends.BAR_W + 4 * trends.BAR_GAP


def test_no_judged_build_has_no_pass_rate() -> None:
    summary = trends.summarise([row(1, "canceled", None), row(2, "running", None)], [])
    assert (summary.pass_rate, summary.p50_seconds, summary.longest_seconds) == (None, None, None)
    assert [bar.h for bar in summary.bars] == [trends.MIN_BAR_H, trends.MIN_BAR_H]


def timed(build: Build, seconds: dict[str, float]) -> None:
    """Give the build and its jobs known durations (the services stamp real times)."""
    for key, took in seconds.items():
        Job.objects.filter(build=build, step_key=key).update(started_at=T0, finished_at=T0 + timedelta(seconds=took))
    Build.objects.filter(pk=build.pk).update(started_at=T0, finished_at=T0 + timedelta(seconds=sum(seconds.values())))


def ran(pipeline: Pipeline, agent: Any, *, a_fails: bool = False) -> Build:
    build = make_build(pipeline)
    run_job(build.jobs.get(step_key="a"), state=JobState.FAILED if a_fails else JobState.PASSED,
            exit_code=1 if a_fails else 0)
    if not a_fails:
        run_job(build.jobs.get(step_key="b"))
    build.refresh_from_db()
    return build


@pytest.mark.django_db
def test_each_steps_failure_rate_and_average_duration_from_the_last_builds(pipeline: Pipeline,
                                                                            monkeypatch: Any) -> None:
    old = ran(pipeline, None, a_fails=True)  # beyond the last three: not counted
    timed(old, {"a": 500})
    first = ran(pipeline, None)
    timed(first, {"a": 10, "b": 20})
    failed = ran(pipeline, None, a_fails=True)
    timed(failed, {"a": 30})
    last = ran(pipeline, None)
    timed(last, {"a": 20, "b": 40})
    monkeypatch.setattr(trends, "RECENT_BUILDS", 3)

    summary = trends.pipeline_trends(pipeline)

    assert [bar.number for bar in summary.bars] == [first.number, failed.number, last.number]
    assert [bar.state for bar in summary.bars] == [BuildState.PASSED, BuildState.FAILED, BuildState.PASSED]
    steps = {step.key: step for step in summary.steps}
    assert (steps["a"].runs, steps["a"].failed) == (3, 1)
    assert steps["a"].average_seconds == pytest.approx(20.0)
    assert steps["a"].failure_rate == pytest.approx(1 / 3)
    # b was skipped once (after a failed): only its two runs count.
    assert (steps["b"].runs, steps["b"].failed, steps["b"].average_seconds) == (2, 0, pytest.approx(30.0))
    assert [step.key for step in summary.steps] == ["a", "b"]  # most failing first
    assert summary.pass_rate == pytest.approx(2 / 3)
    assert (summary.p50_seconds, summary.p95_seconds) == (30.0, 60.0)


@pytest.mark.django_db
def test_trends_are_two_queries_however_many_builds(pipeline: Pipeline, django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(1):  # no builds: nothing to aggregate
        assert trends.pipeline_trends(pipeline).builds == 0
    ran(pipeline, None)
    with django_assert_num_queries(2):
        assert trends.pipeline_trends(pipeline).builds == 1
    for _ in range(6):
        ran(pipeline, None, a_fails=True)
    with django_assert_num_queries(2):
        assert trends.pipeline_trends(pipeline).builds == 7


@pytest.mark.django_db
def test_the_pipeline_page_shows_the_trends(owner: User, pipeline: Pipeline) -> None:
    builds = [ran(pipeline, None), ran(pipeline, None, a_fails=True), ran(pipeline, None)]
    for build in builds:
        timed(build, {"a": 5, "b": 10})
    web = Client()
    web.force_login(owner)

    page = web.get(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/").content.decode()

    assert 'id="trends"' in page and "last 3 builds" in page
    assert '<dd data-pass-rate>67%</dd>' in page
    assert '<dd data-p50>15 s</dd>' in page
    for build in builds:
        assert (f'href="/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/builds/{build.number}" '
                f'data-trend-build="{build.number}" data-state="{build.state}"') in page
    assert '<tr data-step="a">' in page and '<td data-label="Failure rate" class="num failing"' in page
