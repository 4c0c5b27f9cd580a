"""Test results: a job's JUnit XML artifacts parsed into counts and failed test cases; flaky tests marked.

Where parsing runs: one task per artifact, enqueued once the artifact's row has
committed, when its path is under the pipeline's `test_results_glob`. Not at the
job's end, because
- artifacts are immutable (builds.services.artifacts), so a parse's input never
  changes and running it again is a plain replace of that artifact's rows;
- a job ends through many writers (its agent, the reaper, a cancel, a timeout),
  on the hottest transaction of the server, while artifacts are stored only by
  the agent, while the job is live: this hook sees every report, whatever ends
  the job, and adds nothing to the end of a job;
- each task reads one file of bounded size, and a bad file spoils only its own row.

What is stored: one TestReport per artifact (its counts, or why it was not
read) and one TestFailure per failed or errored case, at most
MAX_FAILURES_PER_JOB per job. Passing cases are not stored: a suite of 10,000
tests would cost 10,000 rows per job per build to remember what is almost
always uninteresting. What a passing case is needed for, flaky marking, is done
while its report is in memory (below).

Flaky: a test that failed in a job and passed in a later job of the same step on
the same commit of the pipeline (a retry, or a rebuild) is flaky; its earlier
failures are marked. The same step, not any job of the commit: a test that fails
under one matrix job and passes under another is a real failure of that one.
When a report is parsed, the earlier failures of its step and commit that it
passes are marked. The reports of one commit are parsed one at a time
(builds.sql.lock_commit_test_results), so two parses can't each miss the
other's rows; a report parsed after a later job's (a queue worked off out of
order) has those later reports parsed again, which marks it then. A test that
passed and then failed is not marked: it failed last, and without stored passes
nothing could tell.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from builds import sql
from builds.junit import ParsedReport, ReportRefused, parse_report
from builds.models import Artifact, Build, Job, TestFailure, TestReport, TestReportStatus
from pipelines import result_globs
from pipelines.models import Pipeline

logger = logging.getLogger(__name__)

# A report bigger than this is not read (a pytest run of 20,000 tests writes about 3 MB).
MAX_REPORT_BYTES = 10 * 1024 * 1024
# Failed cases stored per job, over all its reports; the counts stay exact beyond it.
MAX_FAILURES_PER_JOB = 1_000
# Ids per UPDATE when marking failures flaky (SQLite's limit on parameters is far above).
UPDATE_BATCH = 500


def queue_report(*, artifact: Artifact) -> bool:
    """After an artifact was stored: parse it once the upload has committed, if it is a report.

    Returns whether it is one (its path under the pipeline's `test_results_glob`).
    """
    glob = Pipeline.objects.filter(builds__id=artifact.build_id).values_list("test_results_glob", flat=True).first()
    if not glob or not result_globs.matches(glob, artifact.path):
        return False
    artifact_id = artifact.pk
    transaction.on_commit(lambda: enqueue_report(artifact_id=artifact_id), robust=True)
    return True


def enqueue_report(*, artifact_id: uuid.UUID) -> None:
    from builds.tasks import parse_test_report  # the task module imports the services

    parse_test_report.enqueue(str(artifact_id))


def _read(artifact: Artifact) -> bytes | None:
    """The file's bytes, None when it is over the limit (also when its row says less than storage holds)."""
    if artifact.size > MAX_REPORT_BYTES:
        return None
    # A storage error propagates: the task fails and can be run again; the file is not "malformed".
    with artifact.file.open("rb") as handle:
        data = handle.read(MAX_REPORT_BYTES + 1)
    return None if len(data) > MAX_REPORT_BYTES else data


def _outcome(artifact: Artifact) -> ParsedReport | ReportRefused:
    data = _read(artifact)
    if data is None:
        return ReportRefused(TestReportStatus.TOO_LARGE,
                             f"The file is {artifact.size:,} bytes; reports over {MAX_REPORT_BYTES:,} bytes are not "
                             "read.")
    try:
        return parse_report(data, keep=MAX_FAILURES_PER_JOB)
    except ReportRefused as refused:
        return refused
    except Exception as exc:  # noqa: BLE001: whatever a job wrote must not fail the task
        # junitparser on a shape it does not expect (an attribute it can't convert, say).
        logger.warning("test report %s could not be read", artifact.pk, exc_info=True)
        return ReportRefused(TestReportStatus.MALFORMED, f"Not a JUnit report we can read ({type(exc).__name__}).")


def parse_test_report(*, artifact_id: uuid.UUID, now: datetime | None = None) -> TestReport | None:
    """Parse one stored artifact as a JUnit XML report, replacing what an earlier parse of it stored.

    None when the artifact is gone. A file that can't be read as a report is
    recorded so (`status`, `error`), never an error of the task. Safe to run
    twice: the artifact's report row is updated in place and its failures are
    replaced, in one transaction.
    """
    now = now or timezone.now()
    artifact = (Artifact.objects.filter(pk=artifact_id)
                .only("id", "build_id", "job_id", "path", "size", "file").first())
    if artifact is None:
        return None
    job = Job.objects.only("id", "step_key", "created_at").get(pk=artifact.job_id)
    build = Build.objects.only("id", "pipeline_id", "commit").get(pk=artifact.build_id)
    # Parsed before the transaction: reading a 10 MB file holds no lock.
    outcome = _outcome(artifact)
    parsed = outcome if isinstance(outcome, ParsedReport) else None
    with transaction.atomic():
        sql.lock_commit_test_results(pipeline_id=build.pipeline_id, commit=build.commit)
        report = TestReport.objects.filter(artifact_id=artifact.pk).first()
        created = report is None
        carried: set[str] = set()
        if report is not None:
            # Marks that later reports made (they will not be parsed again for this re-run).
            carried = set(TestFailure.objects.filter(report=report, flaky=True).values_list("identity", flat=True))
            TestFailure.objects.filter(report=report).delete()
        else:
            report = TestReport(artifact_id=artifact.pk, build_id=build.pk, job_id=job.pk)
        failed = ()
        if parsed is not None:
            room = max(0, MAX_FAILURES_PER_JOB - TestFailure.objects.filter(job_id=job.pk).count())
            failed = parsed.failed[:room]
        report.status = TestReportStatus.PARSED if parsed else outcome.status  # type: ignore[union-attr]
        report.error = "" if parsed else outcome.reason[:500]  # type: ignore[union-attr]
        report.tests = parsed.tests if parsed else 0
        report.failures = parsed.failures if parsed else 0
        report.errors = parsed.errors if parsed else 0
        report.skipped = parsed.skipped if parsed else 0
        report.failures_stored = len(failed)
        report.parsed_at = now
        report.save(force_insert=created)
        TestFailure.objects.bulk_create([
            TestFailure(report=report, build_id=build.pk, job_id=job.pk, suite=case.suite, classname=case.classname,
                        name=case.name, identity=case.identity, kind=case.kind, message=case.message,
                        details=case.details, duration=case.duration, flaky=case.identity in carried)
            for case in failed
        ])
        if parsed is not None and parsed.passed:
            _mark_earlier_failures_flaky(job=job, build=build, passed=parsed.passed)
        later: list[uuid.UUID] = []
        if created and failed:
            later = _later_reports(job=job, build=build)
        Pipeline.objects.filter(pk=build.pipeline_id, has_test_results=False).update(has_test_results=True)
    for later_id in later:
        transaction.on_commit(lambda later_id=later_id: enqueue_report(artifact_id=later_id), robust=True)
    return report


def _same_step_on_commit(model: type[TestFailure] | type[TestReport], *, job: Job, build: Build):  # noqa: ANN202
    # Joined through the build's (pipeline, commit) index: a commit has few builds.
    return model.objects.filter(build__pipeline_id=build.pipeline_id, build__commit=build.commit,
                                job__step_key=job.step_key).exclude(job_id=job.pk)


def _mark_earlier_failures_flaky(*, job: Job, build: Build, passed: frozenset[str]) -> int:
    """Mark flaky the failures of earlier jobs of the step, on the commit, of tests this report passes."""
    rows = (_same_step_on_commit(TestFailure, job=job, build=build).filter(flaky=False)
            .values_list("id", "identity", "job__created_at"))
    # Filtered here, not with `identity IN (...)`: `passed` may hold tens of thousands of identities,
    # the commit's unmarked failures of one step are at most MAX_FAILURES_PER_JOB per job.
    ids = [pk for pk, identity, created_at in rows if identity in passed and created_at < job.created_at]
    for start in range(0, len(ids), UPDATE_BATCH):
        TestFailure.objects.filter(pk__in=ids[start:start + UPDATE_BATCH]).update(flaky=True)
    return len(ids)


def _later_reports(*, job: Job, build: Build) -> list[uuid.UUID]:
    """The parsed reports of later jobs of the step on the commit (normally none: the later job runs after)."""
    return list(_same_step_on_commit(TestReport, job=job, build=build)
                .filter(status=TestReportStatus.PARSED, job__created_at__gt=job.created_at)
                .values_list("artifact_id", flat=True))
