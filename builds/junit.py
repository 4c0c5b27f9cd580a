"""JUnit XML reports, read: the counts, the failed cases, the identities of the passed ones.

Pure Python over bytes (no ORM), used by builds.services.test_results. The XML
is parsed by defusedxml, never by the standard parser directly: a report is
whatever a job wrote, so a DTD (and with it entity-expansion bombs and external
entities) is refused before anything is expanded. junitparser then reads the
element tree (`JUnitXml.fromroot`), which accepts both a `<testsuites>` root
and a single `<testsuite>` (pytest, Maven Surefire, Jest's jest-junit, Gradle,
go-junit-report all write one of the two).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeElementTree
from junitparser import Error, Failure, JUnitXml, JUnitXmlError, Skipped, TestCase, TestSuite

# Per failed case: what a page or an API answer shows, not a whole log.
MESSAGE_MAX_CHARS = 2_000
DETAILS_MAX_CHARS = 4_000
NAME_MAX_CHARS = 500  # the columns' length (builds.models.TestFailure)


class ReportRefused(Exception):
    """The file is no report we read: `status` is a TestReportStatus value, `reason` says why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class FailedCase:
    suite: str
    classname: str
    name: str
    identity: str
    kind: str  # "failure" or "error"
    message: str
    details: str
    duration: float | None


@dataclass(frozen=True)
class ParsedReport:
    tests: int
    failures: int
    errors: int
    skipped: int
    # The first `keep` failed cases, in file order.
    failed: tuple[FailedCase, ...]
    # Identities of the cases that passed (neither failed, errored nor skipped).
    passed: frozenset[str]


def case_identity(*, suite: str, classname: str, name: str) -> str:
    """The same test across files, jobs and builds: its class (or, without one, its suite) and its name."""
    key = f"{classname or suite}\x00{name}"
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _clean(value: str | None, limit: int) -> str:
    # PostgreSQL text can't hold NUL; XML 1.0 can't either, but a parser is no place to rely on that.
    text = (value or "").replace("\x00", "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(case: TestCase) -> float | None:
    try:
        value = case.time
    except (TypeError, ValueError):  # time="n/a"
        return None
    return value if value is None or value >= 0 else None


def _cases(root: JUnitXml) -> Iterator[tuple[str, TestCase]]:
    """Every test case with the name of the suite it is directly in, nested suites included.

    A loop with a stack, not recursion: suites nested a million deep (a 10 MB
    file of `<testsuite>` tags) must not exhaust the interpreter's stack.
    """
    stack: list[TestSuite] = list(reversed(list(root)))
    while stack:
        suite = stack.pop()
        suite_name = suite.name or ""
        for case in suite.iterchildren(TestCase):
            yield suite_name, case
        stack.extend(reversed(list(suite.testsuites())))


def _message(result: Failure | Error) -> str:
    message = (result.message or "").strip()
    if not message:  # some reporters (older jest-junit) put everything in the element's text
        lines = [line.strip() for line in (result.text or "").splitlines() if line.strip()]
        message = lines[0] if lines else ""
    if not message:
        message = result.type or ""
    return _clean(message, MESSAGE_MAX_CHARS)


def parse_report(data: bytes, *, keep: int) -> ParsedReport:
    """Read one JUnit XML file; keep at most `keep` failed cases. Raises ReportRefused for anything else."""
    try:
        root = SafeElementTree.fromstring(data, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise ReportRefused("unsafe", f"The file declares a DTD or entities, which a test report never needs "
                                      f"({type(exc).__name__}); not read.") from None
    except ParseError as exc:
        raise ReportRefused("malformed", f"Not well-formed XML: {exc}.") from None
    try:
        report = JUnitXml.fromroot(root)
    except JUnitXmlError:
        raise ReportRefused("malformed", f"Not a JUnit report: the root element is <{_clean(str(root.tag), 100)}>, "
                                         "not <testsuites> or <testsuite>.") from None
    tests = failures = errors = skipped = 0
    failed: list[FailedCase] = []
    passed: set[str] = set()
    for suite_name, case in _cases(report):
        tests += 1
        name = case.name or ""
        classname = case.classname or ""
        results = case.result
        bad = next((r for r in results if isinstance(r, (Failure, Error))), None)
        identity = case_identity(suite=suite_name, classname=classname, name=name)
        if bad is None:
            if any(isinstance(r, Skipped) for r in results):
                skipped += 1
            else:
                passed.add(identity)
            continue
        kind = "failure" if isinstance(bad, Failure) else "error"
        if kind == "failure":
            failures += 1
        else:
            errors += 1
        if len(failed) < keep:
            failed.append(FailedCase(
                suite=_clean(suite_name, NAME_MAX_CHARS), classname=_clean(classname, NAME_MAX_CHARS),
                name=_clean(name, NAME_MAX_CHARS) or "(unnamed)", identity=identity, kind=kind,
                message=_message(bad), details=_clean((bad.text or "").strip(), DETAILS_MAX_CHARS),
                duration=_duration(case)))
    return ParsedReport(tests=tests, failures=failures, errors=errors, skipped=skipped, failed=tuple(failed),
                        passed=frozenset(passed))
