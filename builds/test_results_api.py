"""`GET .../builds/{number}/test-results`: the build's parsed JUnit reports, its failed test cases keyset-paged."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from builds import test_results
from builds.api import BuildScopedView
from builds.serializers import TestResultsSerializer
from harmont.pagination import paginate
from harmont.serializers import ErrorSerializer
from pipelines.api import PAGE_PARAMS

# Unreadable report files listed per answer; a job's count of them is exact.
UNPARSED_LISTED = 100


class BuildTestResultsView(BuildScopedView):
    @extend_schema(operation_id="getBuildTestResults", tags=["builds"], parameters=PAGE_PARAMS,
                   responses={200: TestResultsSerializer, 400: ErrorSerializer, 404: ErrorSerializer})
    def get(self, request: Request, org: str, pipeline: str, number: str) -> Response:
        """Test counts of the build and of each job that stored JUnit XML reports (artifacts under the
        pipeline's `test_results_glob`), and the failed test cases, oldest report first, keyset-paged."""
        # The page first: a bad limit or cursor is a 400 before anything else is read.
        page = paginate(request, test_results.failures_query(self.build), key="id")
        rows = test_results.job_count_rows(self.build)
        unparsed = (test_results.unparsed_reports(self.build, limit=UNPARSED_LISTED)
                    if any(row["unparsed"] for row in rows) else [])
        latest = [row for row in rows if not row["job__retried"]]
        body = {
            "summary": {"tests": sum(row["tests"] for row in latest),
                        "failed": sum(row["failures"] + row["errors"] for row in latest),
                        "skipped": sum(row["skipped"] for row in latest)},
            "jobs": [{"job_id": row["job_id"], "step_key": row["job__step_key"], "attempt": row["job__attempt"],
                      "retried": row["job__retried"], "tests": row["tests"],
                      "failed": row["failures"] + row["errors"], "errors": row["errors"], "skipped": row["skipped"],
                      "reports": row["reports"], "unparsed": row["unparsed"]} for row in rows],
            "unparsed": unparsed,
            "data": page.items,
            "next_cursor": page.next_cursor,
        }
        return Response(TestResultsSerializer(body).data)
