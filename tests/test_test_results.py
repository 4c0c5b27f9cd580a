"""Test results: JUnit XML artifacts parsed into counts and failed cases, flaky tests marked, the API's
`GET .../builds/{n}/test-results`, the build page's "Tests" section and the pipeline page's.

Reports are stored as the agent stores them (the upload route, or the service it calls), and the
parse runs as a worker would run it: the task is enqueued once the upload commits
(`django_capture_on_commit_callbacks`), then `run_tasks()` works the queue off. The pytest report is a
real `pytest --junitxml` file (tests/fixtures/junit); the Maven Surefire and jest-junit ones are written
in those tools' shapes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_tasks_db.models import DBTaskResult
from rest_framework.test import APIClient

from builds import services as build_services
from builds import sql
from builds.models import Agent, Artifact, Build, Job, TestFailure, TestReport
from builds.services import store_artifact
from builds.services import test_results as test_result_services
from organizations.models import ApiToken, User
from pipelines.models import Pipeline
from tests.helpers import assert_error, builds_url, is_postgres, job_url, make_build, parallel_ir, race, run_tasks

pytestmark = pytest.mark.django_db

PYTEST_REPORT = (Path(__file__).parent / "fixtures" / "junit" / "pytest-shop.xml").read_bytes()

# Maven Surefire: one file per test class, a single <testsuite> root, properties, a stack trace as text.
SUREFIRE_REPORT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    xsi:noNamespaceSchemaLocation="https://maven.apache.org/surefire/maven-surefire-plugin/xsd/surefire-test-report-3.0.xsd"
    version="3.0" name="com.acme.shop.CartTest" time="0.214" tests="4" errors="1" skipped="1" failures="1">
  <properties>
    <property name="java.version" value="21.0.2"/>
  </properties>
  <testcase name="addsItems" classname="com.acme.shop.CartTest" time="0.011"/>
  <testcase name="appliesCoupon" classname="com.acme.shop.CartTest" time="0.020">
    <failure message="expected: &lt;90&gt; but was: &lt;100&gt;" type="org.opentest4j.AssertionFailedError"><![CDATA[org.opentest4j.AssertionFailedError: expected: <90> but was: <100>
	at com.acme.shop.CartTest.appliesCoupon(CartTest.java:42)
]]></failure>
  </testcase>
  <testcase name="savesToDatabase" classname="com.acme.shop.CartTest" time="0.003">
    <error message="Connection refused" type="java.net.ConnectException"><![CDATA[java.net.ConnectException: Connection refused
	at com.acme.shop.Db.connect(Db.java:12)
]]></error>
  </testcase>
  <testcase name="exportsCsv" classname="com.acme.shop.CartTest" time="0">
    <skipped message="not on CI"/>
  </testcase>
</testsuite>
"""

# jest-junit: <testsuites> of one <testsuite> per file; classname and name both "<describe> <test>";
# a failure's message only in its text.
JEST_REPORT = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="jest tests" tests="3" failures="1" errors="0" time="1.204">
  <testsuite name="checkout" errors="0" failures="1" skipped="0" timestamp="2026-06-04T10:00:00" time="0.8" tests="2">
    <testcase classname="checkout shows the total" name="checkout shows the total" time="0.012">
    </testcase>
    <testcase classname="checkout submits the order" name="checkout submits the order" time="0.305">
      <failure>Error: expect(received).toBe(expected) // Object.is equality

Expected: 201
Received: 500
    at Object.&lt;anonymous&gt; (src/checkout.test.js:18:27)</failure>
    </testcase>
  </testsuite>
  <testsuite name="cart" errors="0" failures="0" skipped="0" time="0.4" tests="1">
    <testcase classname="cart adds items" name="cart adds items" time="0.004"/>
  </testsuite>
</testsuites>
"""


def junit(cases: dict[str, str], *, classname: str = "tests.test_flaky") -> bytes:
    """A pytest-shaped report: {test name: "passed" | "failed" | "skipped"}."""
    rows = []
    for name, outcome in cases.items():
        inner = {"passed": "", "failed": f'<failure message="assert {name} failed">E   AssertionError</failure>',
                 "skipped": '<skipped message="later"/>'}[outcome]
        rows.append(f'<testcase classname="{classname}" name="{name}" time="0.01">{inner}</testcase>')
    return (f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="{len(cases)}">'
            f'{"".join(rows)}</testsuite></testsuites>').encode()


@pytest.fixture(autouse=True)
def media(settings: Any, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


@pytest.fixture
def store(django_capture_on_commit_callbacks: Any):  # noqa: ANN201
    """Store an artifact as the upload route does, then work the task queue off; returns the artifact."""
    def stored(job: Job, path: str, content: bytes) -> Artifact:
        with django_capture_on_commit_callbacks(execute=True):
            artifact = store_artifact(job=job, path=path, content=content).artifact
        run_tasks()
        return artifact
    return stored


@pytest.fixture
def job(running: tuple[dict[str, Any], APIClient]) -> Job:
    """Job `a` of the `build` fixture (commit c0ffee...), claimed and running."""
    return Job.objects.get(pk=running[0]["id"])


def report_of(artifact: Artifact) -> TestReport:
    return TestReport.objects.get(artifact=artifact)


def failures_of(job: Job) -> list[tuple[str, str, str, str, bool]]:
    return list(TestFailure.objects.filter(job=job).order_by("id")
                .values_list("classname", "name", "kind", "message", "flaky"))


def counts(report: TestReport) -> tuple[str, int, int, int, int, int]:
    return (report.status, report.tests, report.failures, report.errors, report.skipped, report.failures_stored)


# ===================================================================== parsing


def test_an_uploaded_pytest_report_is_parsed_into_counts_and_failures_with_messages(
        running: tuple[dict[str, Any], APIClient], django_capture_on_commit_callbacks: Any) -> None:
    spec, job_client = running
    with django_capture_on_commit_callbacks(execute=True):
        response = job_client.put(job_url(spec["id"], "artifacts"), PYTEST_REPORT,
                                  content_type="application/octet-stream", QUERY_STRING="path=test-results/pytest.xml")
    assert response.status_code == 201, response.content
    task = DBTaskResult.objects.get()
    assert task.task_path == "builds.tasks.parse_test_report" and task.args_kwargs["args"] == [response.json()["id"]]

    assert run_tasks() == 1

    report = TestReport.objects.get()
    assert counts(report) == ("parsed", 6, 2, 1, 1, 3)
    assert str(report.job_id) == spec["id"] and report.error == ""
    job = Job.objects.get(pk=spec["id"])
    assert failures_of(job) == [
        ("test_shop", "test_checkout_applies_discount", "failure",
         "AssertionError: discount not applied\nassert 90.0 == 80", False),
        ("test_shop", "test_payment_gateway_times_out", "failure", "TimeoutError: gateway did not answer in 5 s", False),
        ("test_shop", "test_orders_are_saved", "error",
         'failed on setup with "ConnectionError: could not connect to server: Connection refused"', False),
    ]
    discount = TestFailure.objects.get(name="test_checkout_applies_discount")
    assert discount.suite == "shop" and discount.duration is not None and discount.duration >= 0
    assert discount.details.startswith("def test_checkout_applies_discount():")
    assert "E       assert 90.0 == 80" in discount.details
    assert job.state == "running"  # parsing never touches the job


def test_surefire_and_jest_reports_are_read_with_their_own_shapes(job: Job, store: Any) -> None:
    surefire = report_of(store(job, "test-results/surefire/TEST-com.acme.shop.CartTest.xml", SUREFIRE_REPORT))
    jest = report_of(store(job, "test-results/jest/junit.xml", JEST_REPORT))

    assert counts(surefire) == ("parsed", 4, 1, 1, 1, 2)
    assert counts(jest) == ("parsed", 3, 1, 0, 0, 1)
    assert failures_of(job) == [
        ("com.acme.shop.CartTest", "appliesCoupon", "failure", "expected: <90> but was: <100>", False),
        ("com.acme.shop.CartTest", "savesToDatabase", "error", "Connection refused", False),
        # No message attribute: the first line of the text is the message.
        ("checkout submits the order", "checkout submits the order", "failure",
         "Error: expect(received).toBe(expected) // Object.is equality", False),
    ]
    coupon = TestFailure.objects.get(name="appliesCoupon")
    assert coupon.suite == "com.acme.shop.CartTest"
    assert "CartTest.java:42" in coupon.details
    assert TestFailure.objects.get(name="checkout submits the order").suite == "checkout"


def test_only_artifacts_under_the_pipelines_glob_are_parsed(api: APIClient, org: Any, pipeline: Pipeline, job: Job,
                                                            store: Any) -> None:
    store(job, "coverage/junit.xml", PYTEST_REPORT)  # the default glob is test-results/**/*.xml
    store(job, "test-results/notes.txt", b"not a report")
    assert TestReport.objects.count() == 0 and DBTaskResult.objects.count() == 0

    response = api.patch(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}",
                         {"test_results_glob": "reports/*.xml, **/TEST-*.xml"}, format="json")
    assert response.status_code == 200 and response.json()["test_results_glob"] == "reports/*.xml, **/TEST-*.xml"
    # A PATCH of other settings leaves it as it is.
    response = api.patch(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}", {"name": "Web CI 2"},
                         format="json")
    assert response.json()["test_results_glob"] == "reports/*.xml, **/TEST-*.xml"
    store(job, "reports/junit.xml", PYTEST_REPORT)
    store(job, "reports/nested/junit.xml", PYTEST_REPORT)  # `*` stays within its directory
    store(job, "target/surefire-reports/TEST-CartTest.xml", SUREFIRE_REPORT)
    store(job, "test-results/pytest.xml", PYTEST_REPORT)  # the old glob no longer applies

    assert sorted(TestReport.objects.values_list("artifact__path", flat=True)) == [
        "reports/junit.xml", "target/surefire-reports/TEST-CartTest.xml"]


@pytest.mark.parametrize(("glob", "message"), [
    ("/abs/*.xml", "'/abs/*.xml' is absolute; artifact paths are relative to $HARMONT_ARTIFACTS."),
    ("test-results/../*.xml", "'test-results/../*.xml' has a `..` segment; artifact paths never do."),
    ("x" * 501, "At most 500 characters."),
])
def test_a_bad_glob_is_422_and_changes_nothing(api: APIClient, org: Any, pipeline: Pipeline, glob: str,
                                               message: str) -> None:
    response = api.patch(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}",
                         {"test_results_glob": glob}, format="json")
    assert assert_error(response, 422, "pipeline_invalid")["fields"] == {"test_results_glob": [message]}
    pipeline.refresh_from_db()
    assert pipeline.test_results_glob == "test-results/**/*.xml"


def test_an_empty_glob_parses_nothing(api: APIClient, org: Any, pipeline: Pipeline, job: Job, store: Any) -> None:
    response = api.patch(f"/api/v0/organizations/{org.slug}/pipelines/{pipeline.slug}", {"test_results_glob": ""},
                         format="json")
    assert response.status_code == 200 and response.json()["test_results_glob"] == ""
    store(job, "test-results/pytest.xml", PYTEST_REPORT)
    assert not TestReport.objects.exists()


def test_parsing_again_replaces_and_never_duplicates(job: Job, store: Any,
                                                     django_capture_on_commit_callbacks: Any) -> None:
    artifact = store(job, "test-results/pytest.xml", PYTEST_REPORT)
    first = report_of(artifact)
    before = failures_of(job)

    # The queue delivers at least once: the same task again, twice.
    for _ in range(2):
        test_result_services.enqueue_report(artifact_id=artifact.pk)
    assert run_tasks() == 2

    assert TestReport.objects.count() == 1 and report_of(artifact).pk == first.pk
    assert counts(report_of(artifact)) == counts(first)
    assert failures_of(job) == before and TestFailure.objects.count() == 3


def test_a_malformed_file_is_recorded_and_neither_the_task_nor_the_job_fails(
        running: tuple[dict[str, Any], APIClient], store: Any) -> None:
    spec, job_client = running
    job = Job.objects.get(pk=spec["id"])
    broken = store(job, "test-results/broken.xml", b'<testsuite name="x"><testcase name="a"')
    html = store(job, "test-results/index.xml", b"<html><body>not a report</body></html>")

    assert counts(report_of(broken)) == ("malformed", 0, 0, 0, 0, 0)
    assert report_of(broken).error == "Not well-formed XML: unclosed token: line 1, column 20."
    assert counts(report_of(html)) == ("malformed", 0, 0, 0, 0, 0)
    assert report_of(html).error == ("Not a JUnit report: the root element is <html>, not <testsuites> or "
                                     "<testsuite>.")
    assert list(DBTaskResult.objects.values_list("status", flat=True)) == ["SUCCESSFUL", "SUCCESSFUL"]
    assert job_client.post(job_url(spec["id"], "finish"), {"exit_code": 0}, format="json").status_code == 200
    job.refresh_from_db()
    assert job.state == "passed"


def test_an_oversized_file_is_not_read_and_says_so(job: Job, store: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(test_result_services, "MAX_REPORT_BYTES", 1_000)
    opened: list[str] = []
    real_read = test_result_services._read
    monkeypatch.setattr(test_result_services, "_read", lambda artifact: opened.append(artifact.path) or real_read(artifact))
    big = junit({f"test_{i}": "failed" for i in range(40)})
    assert len(big) > 1_000

    report = report_of(store(job, "test-results/big.xml", big))

    assert counts(report) == ("too_large", 0, 0, 0, 0, 0)
    assert report.error == f"The file is {len(big):,} bytes; reports over 1,000 bytes are not read."
    assert not TestFailure.objects.exists()
    small = report_of(store(job, "test-results/small.xml", junit({"test_ok": "passed"})))
    assert counts(small) == ("parsed", 1, 0, 0, 0, 0)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<testsuite name="bomb"><testcase classname="x" name="y"><failure message="&lol9;"/></testcase></testsuite>
"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE testsuite [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<testsuite name="xxe"><testcase classname="x" name="y"><failure message="&secret;"/></testcase></testsuite>
"""


@pytest.mark.parametrize("content", [BILLION_LAUGHS, EXTERNAL_ENTITY], ids=["entity-bomb", "external-entity"])
def test_a_report_declaring_entities_is_refused_unexpanded(job: Job, store: Any, content: bytes) -> None:
    report = report_of(store(job, "test-results/evil.xml", content))

    assert counts(report) == ("unsafe", 0, 0, 0, 0, 0)
    assert report.error == ("The file declares a DTD or entities, which a test report never needs (DTDForbidden); "
                            "not read.")
    assert not TestFailure.objects.exists()
    assert DBTaskResult.objects.get().status == "SUCCESSFUL"


def test_stored_failures_are_capped_per_job_while_the_counts_stay_exact(job: Job, store: Any,
                                                                        monkeypatch: Any) -> None:
    monkeypatch.setattr(test_result_services, "MAX_FAILURES_PER_JOB", 3)
    first = report_of(store(job, "test-results/1.xml", junit({"test_a": "failed", "test_b": "failed"})))
    second = report_of(store(job, "test-results/2.xml", junit({"test_c": "failed", "test_d": "failed",
                                                               "test_e": "passed"})))

    assert counts(first) == ("parsed", 2, 2, 0, 0, 2)
    assert counts(second) == ("parsed", 3, 2, 0, 0, 1)
    assert [name for _, name, *_ in failures_of(job)] == ["test_a", "test_b", "test_c"]


def test_long_messages_and_details_are_cut(job: Job, store: Any) -> None:
    text = "x" * 10_000
    content = (f'<testsuite name="s"><testcase classname="c" name="{"n" * 900}">'
               f'<failure message="{"m" * 5_000}">{text}</failure></testcase></testsuite>').encode()
    store(job, "test-results/long.xml", content)

    failure = TestFailure.objects.get()
    assert len(failure.message) == 2_000 and failure.message.endswith("m…")
    assert len(failure.details) == 4_000 and failure.details.endswith("x…")
    assert len(failure.name) == 500


# ===================================================================== flaky tests


def run_with_report(agent: Agent, build: Build, step_key: str, store: Any, content: bytes, exit_code: int,
                    **more: bytes) -> Job:
    """Claim the build's scheduled `step_key` job, store its report (and `more` files under test-results/, by
    name), finish it as its agent would."""
    claim = build_services.claim_job(agent=agent)
    assert claim is not None and claim.job.build_id == build.pk and claim.job.step_key == step_key, claim
    build_services.start_job(job=claim.job)
    job = Job.objects.get(pk=claim.job.pk)
    store(job, "test-results/pytest.xml", content)
    for name, extra in more.items():
        store(job, f"test-results/{name}.xml", extra)
    build_services.report_finish(job=job, exit_code=exit_code)
    return job


@pytest.fixture
def agent(session: APIClient) -> Agent:
    return session.agent  # type: ignore[attr-defined]


def test_a_test_that_failed_and_then_passed_on_a_retry_is_flaky(pipeline: Pipeline, agent: Agent, store: Any) -> None:
    build = make_build(pipeline, pipeline_ir=parallel_ir(1))
    first = run_with_report(agent, build, "s0", store, junit({"test_timing": "failed", "test_broken": "failed",
                                                              "test_fine": "passed"}), exit_code=1)
    retry = build_services.retry_job(job=first)

    run_with_report(agent, build, "s0", store, junit({"test_timing": "passed", "test_broken": "failed",
                                                      "test_fine": "passed"}), exit_code=1)

    assert [(name, flaky) for _, name, _, _, flaky in failures_of(first)] == [("test_timing", True),
                                                                              ("test_broken", False)]
    assert [(name, flaky) for _, name, _, _, flaky in failures_of(retry)] == [("test_broken", False)]


def test_a_rebuild_that_passes_the_test_marks_the_first_builds_failure_flaky(
        pipeline: Pipeline, owner: User, agent: Agent, store: Any) -> None:
    build = make_build(pipeline, pipeline_ir=parallel_ir(1))
    first = run_with_report(agent, build, "s0", store, junit({"test_timing": "failed"}), exit_code=1)
    other_commit = make_build(pipeline, pipeline_ir=parallel_ir(1), commit="beef" * 10)
    run_with_report(agent, other_commit, "s0", store, junit({"test_timing": "passed"}), exit_code=0)
    assert failures_of(first)[0][4] is False  # a pass on another commit says nothing

    rebuilt = build_services.rebuild_build(build=build, created_by=owner, creator_role="owner")
    run_with_report(agent, rebuilt, "s0", store, junit({"test_timing": "passed"}), exit_code=0)

    assert failures_of(first)[0][4] is True


def test_a_pass_in_another_step_of_the_commit_is_no_flakiness(pipeline: Pipeline, agent: Agent, store: Any) -> None:
    # Two matrix jobs running the same tests: one fails where the other passes. A real failure of that one.
    build = make_build(pipeline, pipeline_ir=parallel_ir(2))
    failed = run_with_report(agent, build, "s0", store, junit({"test_py39_only": "failed"}), exit_code=1)
    run_with_report(agent, build, "s1", store, junit({"test_py39_only": "passed"}), exit_code=0)

    assert failures_of(failed)[0][4] is False


def test_a_report_parsed_after_a_later_jobs_report_is_marked_when_that_one_is_parsed_again(
        pipeline: Pipeline, agent: Agent, django_capture_on_commit_callbacks: Any) -> None:
    # The queue worked off out of order: the retry's report before the first attempt's.
    make_build(pipeline, pipeline_ir=parallel_ir(1))
    claim = build_services.claim_job(agent=agent)
    build_services.start_job(job=claim.job)
    first_artifact = store_artifact(job=claim.job, path="test-results/a.xml",
                                    content=junit({"test_timing": "failed"})).artifact
    build_services.report_finish(job=Job.objects.get(pk=claim.job.pk), exit_code=1)
    retry = build_services.retry_job(job=Job.objects.get(pk=claim.job.pk))
    retry_claim = build_services.claim_job(agent=agent)
    assert retry_claim.job.pk == retry.pk
    build_services.start_job(job=retry_claim.job)
    later_artifact = store_artifact(job=retry_claim.job, path="test-results/a.xml",
                                    content=junit({"test_timing": "passed"})).artifact
    assert DBTaskResult.objects.count() == 0  # nothing committed yet: no task enqueued

    test_result_services.parse_test_report(artifact_id=later_artifact.pk)
    with django_capture_on_commit_callbacks(execute=True):
        test_result_services.parse_test_report(artifact_id=first_artifact.pk)
    assert TestFailure.objects.get().flaky is False
    assert list(DBTaskResult.objects.values_list("args_kwargs", flat=True)) == [
        {"args": [str(later_artifact.pk)], "kwargs": {}}]

    assert run_tasks() == 1
    assert TestFailure.objects.get().flaky is True
    # Parsing the first report once more keeps its mark, and asks for nothing again.
    with django_capture_on_commit_callbacks(execute=True):
        test_result_services.parse_test_report(artifact_id=first_artifact.pk)
    assert TestFailure.objects.get().flaky is True and run_tasks() == 0


# ===================================================================== the API


def results_url(build: Build, query: str = "") -> str:
    return builds_url(build.pipeline, f"/{build.number}/test-results{query}")


@pytest.fixture
def reported(job: Job, store: Any) -> dict[str, Any]:
    """Job `a` of `build` stored the pytest report, a broken file and the Surefire report."""
    pytest_report = store(job, "test-results/pytest.xml", PYTEST_REPORT)
    broken = store(job, "test-results/broken.xml", b"<testsuite")
    surefire = store(job, "test-results/TEST-CartTest.xml", SUREFIRE_REPORT)
    return {"job": job, "pytest": pytest_report, "broken": broken, "surefire": surefire}


def failure_json(failure: TestFailure) -> dict[str, Any]:
    return {"id": failure.pk, "job_id": str(failure.job_id), "artifact_id": str(failure.report.artifact_id),
            "path": failure.report.artifact.path, "suite": failure.suite, "classname": failure.classname,
            "name": failure.name, "kind": failure.kind, "message": failure.message, "details": failure.details,
            "duration": failure.duration, "flaky": failure.flaky}


def test_the_api_answers_counts_unreadable_files_and_failures_in_full_pages(api: APIClient, build: Build,
                                                                            reported: dict[str, Any]) -> None:
    job = reported["job"]
    failures = [failure_json(f) for f in TestFailure.objects.select_related("report__artifact").order_by("id")]
    assert [f["name"] for f in failures] == ["test_checkout_applies_discount", "test_payment_gateway_times_out",
                                             "test_orders_are_saved", "appliesCoupon", "savesToDatabase"]
    head = {
        "summary": {"tests": 10, "failed": 5, "skipped": 2},
        "jobs": [{"job_id": str(job.pk), "step_key": "a", "attempt": 1, "retried": False, "tests": 10, "failed": 5,
                  "errors": 2, "skipped": 2, "reports": 3, "unparsed": 1}],
        "unparsed": [{"artifact_id": str(reported["broken"].pk), "job_id": str(job.pk),
                      "path": "test-results/broken.xml", "status": "malformed",
                      "error": "Not well-formed XML: unclosed token: line 1, column 0."}],
    }

    first = api.get(results_url(build, "?limit=3"))
    assert first.status_code == 200
    assert first.json() == {**head, "data": failures[:3], "next_cursor": first.json()["next_cursor"]}
    assert first.json()["next_cursor"]
    second = api.get(results_url(build), {"limit": 3, "cursor": first.json()["next_cursor"]})
    assert second.json() == {**head, "data": failures[3:], "next_cursor": None}
    assert failures[0] == {
        "id": failures[0]["id"], "job_id": str(job.pk), "artifact_id": str(reported["pytest"].pk),
        "path": "test-results/pytest.xml", "suite": "shop", "classname": "test_shop",
        "name": "test_checkout_applies_discount", "kind": "failure",
        "message": "AssertionError: discount not applied\nassert 90.0 == 80",
        "details": TestFailure.objects.get(name="test_checkout_applies_discount").details,
        "duration": TestFailure.objects.get(name="test_checkout_applies_discount").duration, "flaky": False}


def test_a_build_without_reports_answers_zeros(api: APIClient, build: Build) -> None:
    response = api.get(results_url(build))
    assert response.status_code == 200
    assert response.json() == {"summary": {"tests": 0, "failed": 0, "skipped": 0}, "jobs": [], "unparsed": [],
                               "data": [], "next_cursor": None}


def test_a_retried_jobs_results_leave_the_summary(api: APIClient, pipeline: Pipeline, agent: Agent,
                                                  store: Any) -> None:
    build = make_build(pipeline, pipeline_ir=parallel_ir(1))
    first = run_with_report(agent, build, "s0", store, junit({"test_timing": "failed", "test_b": "passed"}), 1)
    build_services.retry_job(job=first)
    retry = run_with_report(agent, build, "s0", store, junit({"test_timing": "passed", "test_b": "passed"}), 0)

    body = api.get(results_url(build)).json()

    assert body["summary"] == {"tests": 2, "failed": 0, "skipped": 0}
    assert [(j["job_id"], j["attempt"], j["retried"], j["failed"]) for j in body["jobs"]] == [
        (str(first.pk), 1, True, 1), (str(retry.pk), 2, False, 0)]
    assert [(f["name"], f["flaky"]) for f in body["data"]] == [("test_timing", True)]


def test_another_organizations_build_is_404(stranger_api: APIClient, api: APIClient, build: Build,
                                            reported: dict[str, Any]) -> None:
    assert_error(stranger_api.get(results_url(build)), 404, "organization_not_found")
    assert_error(api.get(builds_url(build.pipeline, "/99/test-results")), 404, "build_not_found")


@pytest.mark.parametrize(("query", "code"), [("?cursor=%25%25%25", "invalid_cursor"), ("?cursor=bm9wZQ", "invalid_cursor"),
                                            ("?limit=0", "invalid_limit"), ("?limit=101", "invalid_limit")])
def test_a_bad_cursor_or_limit_is_400(api: APIClient, build: Build, query: str, code: str) -> None:
    assert_error(api.get(results_url(build, query)), 400, code)


def test_the_answer_costs_the_same_queries_for_any_page_size_and_depth(
        api: APIClient, owner: User, pipeline: Pipeline, agent: Agent, store: Any,
        django_assert_num_queries: Any) -> None:
    assert ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now()) == 1  # no write on auth
    build = make_build(pipeline, pipeline_ir=parallel_ir(3))
    for step in ("s0", "s1"):
        run_with_report(agent, build, step, store, junit({f"test_{step}_{i}": "failed" for i in range(8)}), 1)
    run_with_report(agent, build, "s2", store, junit({f"test_s2_{i}": "failed" for i in range(8)}), 1,
                    bad=b"<oops")
    url = results_url(build)
    cursor = api.get(url, {"limit": 2}).json()["next_cursor"]
    deep = api.get(url, {"limit": 20, "cursor": cursor}).json()["next_cursor"]
    for params in ({"limit": 1}, {"limit": 100}, {"limit": 2, "cursor": cursor}, {"limit": 1, "cursor": deep}):
        # the token, the build with the caller's role, one page of failures, the jobs' counts, the unreadable files
        with django_assert_num_queries(5):
            assert api.get(url, params).status_code == 200
    TestReport.objects.filter(status="malformed").delete()
    with django_assert_num_queries(4):  # every file was read: no look for unreadable ones
        assert api.get(url, {"limit": 5}).status_code == 200


def test_the_operation_is_in_the_openapi_document(client: Client) -> None:
    doc = client.get("/api/v0/openapi.json").json()
    operation = doc["paths"]["/api/v0/organizations/{org}/pipelines/{pipeline}/builds/{number}/test-results"]["get"]
    assert operation["operationId"] == "getBuildTestResults"
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/TestResults"}
    assert set(doc["components"]["schemas"]["TestResults"]["properties"]) == {"summary", "jobs", "unparsed", "data",
                                                                              "next_cursor"}
    assert "test_results_glob" in doc["components"]["schemas"]["Pipeline"]["properties"]


# ===================================================================== the pages


@pytest.fixture
def web(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


def page_url(build: Build, suffix: str = "") -> str:
    return f"/orgs/{build.pipeline.organization.slug}/pipelines/{build.pipeline.slug}/builds/{build.number}{suffix}"


def history_url(pipeline: Pipeline) -> str:
    return f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/"


def text(response: Any) -> str:
    return response.content.decode()


def section(html: str, element_id: str) -> str:
    start = html.index(f'id="{element_id}"')
    return html[start:html.index("</section>", start)]


def test_the_build_page_lists_failed_tests_with_messages_and_each_jobs_counts(web: Client, build: Build,
                                                                             reported: dict[str, Any]) -> None:
    html = text(web.get(page_url(build)))

    job_row = html[html.index(f'id="job-{reported["job"].pk}"'):]
    job_row = job_row[:job_row.index("</li>")]
    counts_line = re.sub(r"<[^>]+>", "", re.search(r"data-job-tests>(.*?)</span>\s*\n", job_row)[1])
    assert counts_line == "10 tests, 5 failed, 2 skipped, 1 unreadable report"
    tests = section(html, "test-results")
    summary = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", re.search(r"data-test-summary>(.*?)</p>", tests, re.S)[1]))
    assert summary.strip().startswith("10 tests, 5 failed, 2 skipped")
    names = re.findall(r'class="test-name mono">(?:[^<]*)<strong>([^<]+)</strong>', tests)
    assert names == ["test_checkout_applies_discount", "test_payment_gateway_times_out", "test_orders_are_saved",
                     "appliesCoupon", "savesToDatabase"]
    assert "AssertionError: discount not applied\nassert 90.0 == 80" in tests
    assert "expected: &lt;90&gt; but was: &lt;100&gt;" in tests  # escaped
    assert "CartTest.java:42" in tests  # the details, under each failure
    assert 'class="test-tag error">error<' in tests
    unreadable = tests[tests.index('id="test-reports-unparsed"'):]
    assert "test-results/broken.xml" in unreadable and "Not well-formed XML" in unreadable
    assert html.index('id="test-results"') < html.index("<h2>Artifacts</h2>")


def test_a_build_page_without_reports_has_no_tests_section(web: Client, build: Build, job: Job, store: Any) -> None:
    store(job, "dist/app.tar.gz", b"binary")
    html = text(web.get(page_url(build)))
    assert 'id="test-results"' not in html and "data-job-tests" not in html


def test_the_build_pages_queries_do_not_grow_with_reports_and_failures(
        web: Client, pipeline: Pipeline, agent: Agent, store: Any, django_capture_on_commit_callbacks: Any) -> None:
    def queries(build: Build) -> int:
        with CaptureQueriesContext(connection) as captured:
            assert web.get(page_url(build)).status_code == 200
        return len(captured)

    plain = make_build(pipeline, pipeline_ir=parallel_ir(1))  # no artifacts, so no reports
    claim = build_services.claim_job(agent=agent)
    build_services.start_job(job=claim.job)
    build_services.report_finish(job=Job.objects.get(pk=claim.job.pk), exit_code=0)
    without = queries(plain)
    small = make_build(pipeline, pipeline_ir=parallel_ir(1))
    run_with_report(agent, small, "s0", store, junit({"test_a": "failed", "test_b": "passed"}), 1, broken=b"<no")
    big = make_build(pipeline, pipeline_ir=parallel_ir(3))
    for step in ("s0", "s1", "s2"):
        run_with_report(agent, big, step, store, junit({f"test_{i}": "failed" for i in range(30)}), 1,
                        broken=b"<no", other=junit({"test_x": "failed"}))

    # Three more than a page without artifacts: the jobs' test counts, the failures, the unreadable files.
    assert queries(small) == queries(big) == without + 3
    html = text(web.get(page_url(big)))
    assert html.count("data-test-failure=") == 50
    assert "43 more failed tests not listed here" in html


def test_a_build_page_without_artifacts_reads_no_test_results(web: Client, build: Build) -> None:
    web.get(page_url(build))
    with CaptureQueriesContext(connection) as captured:
        assert web.get(page_url(build)).status_code == 200
    assert not [q for q in captured.captured_queries if "builds_test" in q["sql"]]


def history_queries(web: Client, pipeline: Pipeline) -> tuple[list[str], str]:
    """The SQL of one GET of the pipeline page, and its HTML."""
    with CaptureQueriesContext(connection) as captured:
        response = web.get(history_url(pipeline))
    assert response.status_code == 200
    return [q["sql"] for q in captured.captured_queries], text(response)


def test_the_pipeline_page_lists_the_most_frequent_failures_and_the_flaky_tests(
        web: Client, pipeline: Pipeline, agent: Agent, store: Any) -> None:
    sql, html = history_queries(web, pipeline)
    assert 'id="test-failures"' not in html
    assert not [q for q in sql if "builds_test" in q]  # no report of the pipeline was ever parsed: nothing read
    builds = []
    for n, outcome in enumerate(["failed", "failed", "passed", "failed"]):
        build = make_build(pipeline, pipeline_ir=parallel_ir(1), commit=f"{n:040d}")
        run_with_report(agent, build, "s0", store, junit({"test_always": "failed", "test_sometimes": outcome}), 1)
        builds.append(build)
    first = Job.objects.get(build=builds[0])
    build_services.retry_job(job=first)
    run_with_report(agent, builds[0], "s0", store, junit({"test_always": "failed", "test_sometimes": "passed"}), 1)

    sql, html = history_queries(web, pipeline)

    tests = section(html, "test-failures")
    assert "Tests of the last 100 builds" in tests
    frequent = tests[tests.index('id="frequent-failures"'):tests.index('id="flaky-tests"')]
    rows = re.findall(r"<strong>([^<]+)</strong>.*?data-label=\"Builds failed\" class=\"num\">(\d+)<.*?>#(\d+)<",
                      frequent, re.S)
    assert rows == [("test_always", "4", "4"), ("test_sometimes", "3", "4")]
    assert frequent.count('class="test-tag flaky"') == 1  # test_sometimes, in build 1
    flaky = tests[tests.index('id="flaky-tests"'):]
    assert re.findall(r"<strong>([^<]+)</strong>.*?data-label=\"Builds flaky\" class=\"num\">(\d+)<.*?>#(\d+)<",
                      flaky, re.S) == [("test_sometimes", "1", "1")]
    assert html.index('id="test-failures"') < html.index("<h2>Builds</h2>")

    # Two queries, the most frequent failures and the flaky tests, however many builds and failures.
    assert len([q for q in sql if "builds_testfailure" in q]) == 2
    for n in range(3):
        build = make_build(pipeline, pipeline_ir=parallel_ir(1), commit=f"{n + 10:040d}")
        run_with_report(agent, build, "s0", store, junit({f"test_more_{i}": "failed" for i in range(20)}), 1)
    more_sql, _ = history_queries(web, pipeline)
    assert len(more_sql) == len(sql) and len([q for q in more_sql if "builds_testfailure" in q]) == 2


def test_the_pipeline_pages_window_is_its_last_100_builds(web: Client, pipeline: Pipeline, agent: Agent,
                                                          store: Any, monkeypatch: Any) -> None:
    from builds import test_results

    monkeypatch.setattr(test_results, "RECENT_BUILDS", 2)
    old = make_build(pipeline, pipeline_ir=parallel_ir(1))
    run_with_report(agent, old, "s0", store, junit({"test_old": "failed"}), 1)
    for _ in range(2):
        run_with_report(agent, make_build(pipeline, pipeline_ir=parallel_ir(1)), "s0", store,
                        junit({"test_new": "failed"}), 1)

    tests = section(text(web.get(history_url(pipeline))), "test-failures")
    assert "test_new" in tests and "test_old" not in tests


# ===================================================================== racing parses (PostgreSQL)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_parses_of_one_commit_never_miss_a_flaky_mark(pipeline: Pipeline, agent: Agent,
                                                            monkeypatch: Any) -> None:
    if not is_postgres():
        pytest.skip("needs PostgreSQL's concurrent transactions; SQLite serialises all writers")
    make_build(pipeline, pipeline_ir=parallel_ir(1))
    claim = build_services.claim_job(agent=agent)
    build_services.start_job(job=claim.job)
    failed = store_artifact(job=claim.job, path="test-results/a.xml", content=junit({"test_timing": "failed"})).artifact
    build_services.report_finish(job=Job.objects.get(pk=claim.job.pk), exit_code=1)
    build_services.retry_job(job=Job.objects.get(pk=claim.job.pk))
    retry = build_services.claim_job(agent=agent)
    build_services.start_job(job=retry.job)
    passed = store_artifact(job=retry.job, path="test-results/a.xml", content=junit({"test_timing": "passed"})).artifact

    # Each parse lingers after reading the other's rows, before it commits: the widest window for a lost mark.
    def lingering(read: Any) -> Any:
        def wrapped(**kwargs: Any) -> Any:
            result = read(**kwargs)
            time.sleep(0.5)
            return result
        return wrapped

    monkeypatch.setattr(test_result_services, "_later_reports", lingering(test_result_services._later_reports))
    monkeypatch.setattr(test_result_services, "_mark_earlier_failures_flaky",
                        lingering(test_result_services._mark_earlier_failures_flaky))

    def parse_both() -> bool:
        TestReport.objects.all().delete()
        DBTaskResult.objects.all().delete()  # the uploads' own tasks: parsed here, by hand
        race(2, lambda i: test_result_services.parse_test_report(artifact_id=(failed, passed)[i].pk))
        run_tasks()  # whichever won the lock, what it asked for (a later report parsed again) is done too
        return TestFailure.objects.get().flaky

    real_lock = sql.lock_commit_test_results
    monkeypatch.setattr(sql, "lock_commit_test_results", lambda **kwargs: None)
    assert parse_both() is False  # without the commit's lock, each missed the other's uncommitted rows
    monkeypatch.setattr(sql, "lock_commit_test_results", real_lock)
    assert parse_both() is True
