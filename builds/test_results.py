"""Reads of test results (written by builds.services.test_results): the build page's section and its
jobs' counts, the pipeline page's most frequent failures and flaky tests, the API's answer.

Every read here is a fixed number of queries, however many jobs, reports and
failures there are; aggregates are computed by the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, Max, Q, QuerySet, Sum

from builds.models import Build, Job, TestFailure, TestReport, TestReportStatus
from builds.trends import RECENT_BUILDS  # the pipeline page's window, the same for its trends
from pipelines.models import Pipeline

# The build page shows this many failures (and unreadable files); the API pages through all of them.
FAILURES_ON_PAGE = 50
UNPARSED_SHOWN = 20
# The pipeline page's list lengths.
TOP_TESTS = 10

# What a failure row of the build page and of the API shows.
FAILURE_FIELDS = ("id", "job_id", "report__artifact_id", "report__artifact__path", "suite", "classname", "name",
                  "kind", "message", "details", "duration", "flaky")


@dataclass(frozen=True)
class JobCounts:
    tests: int
    failed: int  # failures and errors
    errors: int
    skipped: int
    reports: int
    unparsed: int  # reports that could not be read
    stored: int  # failed cases stored (the rest is beyond the job's cap)


@dataclass
class BuildTestResults:
    """The build page's section: totals over the latest attempts, the first failures, the unreadable files."""

    tests: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    # Failed cases of the build not listed: beyond the page's list, or beyond a job's stored cap.
    not_shown: int = 0
    unparsed: list[dict[str, Any]] = field(default_factory=list)
    unparsed_count: int = 0


def job_count_rows(build: Build) -> list[dict[str, Any]]:
    """Each reporting job's counts, summed over its reports, in dependency order (one query)."""
    return list(TestReport.objects.filter(build=build).order_by()
                .values("job_id", "job__step_key", "job__attempt", "job__retried", "job__position")
                .annotate(tests=Sum("tests"), failures=Sum("failures"), errors=Sum("errors"), skipped=Sum("skipped"),
                          stored=Sum("failures_stored"), reports=Count("id"),
                          unparsed=Count("id", filter=~Q(status=TestReportStatus.PARSED)))
                .order_by("job__position", "job__attempt"))


def job_counts(build: Build) -> dict[Any, JobCounts]:
    """Each reporting job's counts by job id (one query)."""
    rows = job_count_rows(build)
    return {row["job_id"]: JobCounts(tests=row["tests"], failed=row["failures"] + row["errors"], errors=row["errors"],
                                     skipped=row["skipped"], reports=row["reports"], unparsed=row["unparsed"],
                                     stored=row["stored"])
            for row in rows}


def unparsed_reports(build: Build, *, limit: int) -> list[dict[str, Any]]:
    return list(TestReport.objects.filter(build=build).exclude(status=TestReportStatus.PARSED)
                .order_by("id").values("artifact_id", "job_id", "artifact__path", "status", "error")[:limit])


def failures_query(build: Build) -> QuerySet[TestFailure]:
    """The build's failed cases, oldest report first (keyset-paged by id), as dicts of FAILURE_FIELDS."""
    return TestFailure.objects.filter(build=build).values(*FAILURE_FIELDS)


def build_test_results(build: Build, *, jobs: list[Job], has_artifacts: bool) -> BuildTestResults | None:
    """The build page's section, and each of `jobs` gets `test_counts` (a JobCounts, or None).

    None when no job reported. Without artifacts there can be no report, so a
    build without any (most builds) costs no query here; otherwise one, plus one
    for the failures when some test failed and one for the unreadable files when
    some file was.
    """
    for job in jobs:
        job.test_counts = None
    if not has_artifacts:
        return None
    counts = job_counts(build)
    if not counts:
        return None
    results = BuildTestResults()
    stored = 0
    for job in jobs:
        job.test_counts = counts.get(job.pk)
        if job.test_counts is None:
            continue
        stored += job.test_counts.stored
        results.unparsed_count += job.test_counts.unparsed
        if not job.retried:  # a retried attempt's results were replaced by its retry's
            results.tests += job.test_counts.tests
            results.failed += job.test_counts.failed
            results.skipped += job.test_counts.skipped
    all_failed = sum(c.failed for c in counts.values())
    if stored:
        steps = {job.pk: job for job in jobs}
        results.failures = list(failures_query(build).order_by("id")[:FAILURES_ON_PAGE])
        for row in results.failures:
            row["job"] = steps.get(row["job_id"])
    results.not_shown = all_failed - len(results.failures)
    if results.unparsed_count:
        results.unparsed = unparsed_reports(build, limit=UNPARSED_SHOWN)
    return results


@dataclass(frozen=True)
class PipelineTestFailures:
    """The pipeline page's section: over its last RECENT_BUILDS builds."""

    frequent: list[dict[str, Any]]
    flaky: list[dict[str, Any]]
    window: int = RECENT_BUILDS


def _by_test(failures: QuerySet[TestFailure]) -> QuerySet[TestFailure]:
    # Grouped by identity; the names are the same on every row of one (they make it).
    return (failures.order_by().values("identity")
            .annotate(test_name=Max("name"), test_classname=Max("classname"), test_suite=Max("suite"),
                      builds=Count("build_id", distinct=True), last_build=Max("build__number"),
                      flaky_builds=Count("build_id", distinct=True, filter=Q(flaky=True))))


def pipeline_test_failures(pipeline: Pipeline) -> PipelineTestFailures | None:
    """The tests that failed in most of the pipeline's last builds, and those marked flaky there (two queries).

    None, without a query, for a pipeline none of whose reports was ever parsed.
    """
    if not pipeline.has_test_results:
        return None
    # The last builds by the (pipeline, number) index; failures by their build index.
    recent = Build.objects.filter(pipeline=pipeline).order_by("-number").values("id")[:RECENT_BUILDS]
    failures = TestFailure.objects.filter(build_id__in=recent)
    frequent = list(_by_test(failures).order_by("-builds", "-last_build", "identity")[:TOP_TESTS])
    flaky = list(_by_test(failures.filter(flaky=True)).order_by("-builds", "-last_build", "identity")[:TOP_TESTS])
    return PipelineTestFailures(frequent=frequent, flaky=flaky)
