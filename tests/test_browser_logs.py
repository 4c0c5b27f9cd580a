"""The job log panel in a real browser: line numbers and links to lines, sections, timestamps, find.

Same server, browser and agent stand-ins as tests/test_browser.py (its fixtures, imported). What
they prove: lines are numbered as the log counts them (a line continued across chunks is one
line, and the numbers stay real when older lines leave the page); `#job-<id>-L<n>` (and `#L<n>`
on a build of one job) opens the panel at that line; lines starting `--- ` / `+++ ` open
collapsed / expanded sections; the timestamps toggle shows when each line began; find
highlights and counts matches, steps through them and opens the section of the current one,
fast enough over the 5,000 lines a panel keeps; a 10 MB log loads without long stalls. The
screenshot docs/log-search.png is taken here, on every run.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from builds import services as build_services
from builds.models import Agent, Build, Job
from builds.services import ChunkIn
from organizations.models import User
from pipelines.models import Pipeline
from tests.dsl import hm
from tests.helpers import make_build
from tests.test_browser import (  # noqa: F401  (fixtures, used by name)
    PROJECT_ROOT,
    Runner,
    _sync_django_beside_playwright,
    agent,
    browser,
    build_path,
    context,
    job_row,
    page,
    server,
    sign_in,
)

from playwright.sync_api import Page, expect  # noqa: E402 (after tests.test_browser, which skips without it)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SCREENSHOT = PROJECT_ROOT / "docs" / "log-search.png"
T0_NS = 1_736_164_805_000_000_000  # 2025-01-06 12:00:05 UTC


def open_log(page: Page, context: Any, server: str, owner: User, build: Build, job: Job, *, hash: str = "") -> Any:
    """Sign in, open the build page (at `hash`), open the job's panel unless the hash did; its <pre>."""
    sign_in(context, server, owner)
    page.goto(build_path(build) + hash)
    if not hash:
        job_row(page, job).get_by_role("button", name="Log").click()
    return job_row(page, job).locator("pre.log")


def line(log: Any, n: int) -> Any:
    """The line numbered n: the parent of the link whose data-n is n (a `:has()` selector is slow over 5,000 lines)."""
    return log.locator(f"a.ln[data-n='{n}']").locator("xpath=..")


def numbers(log: Any) -> list[int]:
    return log.evaluate("pre => Array.from(pre.querySelectorAll('a.ln'), a => Number(a.dataset.n))")


def texts(log: Any) -> list[str]:
    """Each line's text (the number and time are generated content: no part of it)."""
    return log.evaluate("pre => Array.from(pre.querySelectorAll('.line'), l => l.textContent.replace(/\\n$/, ''))")


# ---------------------------------------------------------------- lines and links


def test_lines_are_numbered_as_the_log_counts_them_and_a_continued_line_stays_one(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, "one\ntwo\n", "thr", "ee \x1b[31mred", " still red\n", "\x1b[0mfour\r\n", "five\r", "\nsix")
    log = open_log(page, context, server, owner, build, a)
    expect(line(log, 6)).to_contain_text("six")
    assert numbers(log) == [1, 2, 3, 4, 5, 6]
    assert texts(log) == ["one", "two", "three red still red", "four", "five", "six"]
    # Colour carries across chunks and stays within the line it was set on.
    assert line(log, 3).locator("span.f1").evaluate_all("spans => spans.map(s => s.textContent)") == [
        "red", " still red"]
    assert line(log, 4).locator("span.f1").count() == 0
    run.log(a, " and more\nseven\n")  # the open last line goes on
    expect(line(log, 7)).to_contain_text("seven")
    assert texts(log)[5:] == ["six and more", "seven"]
    href = line(log, 6).locator("a.ln").get_attribute("href")
    assert href == f"#job-{a.pk}-L6"
    line(log, 6).locator("a.ln").click()
    expect(page).to_have_url(f"{server}{build_path(build)}#job-{a.pk}-L6")
    expect(line(log, 6)).to_have_class("line is-target")


def test_a_line_link_opens_the_panel_and_scrolls_to_the_line(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, *["".join(f"step {n}\n" for n in range(start, start + 50)) for start in range(1, 301, 50)])
    run.log(a, "--- details\n", "hidden detail\n", "+++ summary\n", "all good\n")
    log = open_log(page, context, server, owner, build, a, hash=f"#job-{a.pk}-L150")
    target = line(log, 150)
    expect(target).to_have_class("line is-target")
    expect(target).to_be_in_viewport()
    expect(line(log, 1)).not_to_be_in_viewport()
    assert job_row(page, a).get_by_role("button", name="Hide log").is_visible()
    # Another line, by changing the hash: one inside a collapsed section opens it.
    page.evaluate(f"location.hash = '#job-{a.pk}-L302'")
    expect(line(log, 302)).to_have_class("line is-target")
    expect(line(log, 302)).to_be_visible()
    expect(line(log, 302)).to_be_in_viewport()
    assert log.locator(".line.is-target").count() == 1
    # The plain `#job-<id>` still only opens the panel.
    page.goto(build_path(build) + f"#job-{a.pk}")
    page.reload()
    expect(line(log, 304)).to_contain_text("all good")
    assert log.locator(".line.is-target").count() == 0


def test_a_short_line_link_works_on_a_build_of_one_job(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline, pipeline_ir=hm.pipeline([hm.sh("make", key="only")]))
    run = Runner(agent)
    job = run.start("only", build)
    run.log(job, "".join(f"row {n}\n" for n in range(1, 201)))
    log = open_log(page, context, server, owner, build, job, hash="#L180")
    expect(line(log, 180)).to_have_class("line is-target")
    expect(line(log, 180)).to_be_in_viewport()


def test_line_numbers_stay_real_when_older_lines_leave_the_page(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, "--- setup\n", *["".join(f"line {n}\n" for n in range(start, start + 100))
                                for start in range(2, 7002, 100)])
    log = open_log(page, context, server, owner, build, a, hash=f"#job-{a.pk}-L10")
    expect(line(log, 7001)).to_contain_text("line 7001")
    shown = numbers(log)
    # The header of the section the kept lines belong to stays, so they can still be folded.
    assert shown[0] == 1 and shown[1:] == list(range(2003, 7002)), (shown[:3], len(shown))
    assert log.locator(".log-section").count() == 1
    expect(job_row(page, a).locator("[data-log-note]")).to_contain_text("line 10 is in it")
    # More output, across the cap, in a frame of its own.
    run.log(a, "".join(f"more {n}\n" for n in range(2000)), "the end\n")
    expect(line(log, 9002)).to_contain_text("the end")
    shown = numbers(log)
    assert shown[0] == 1 and shown[1:] == list(range(4004, 9003)), (shown[:3], len(shown))
    assert log.locator(".line").count() == 5000


# ---------------------------------------------------------------- sections and timestamps


def test_sections_start_at_dashes_collapsed_and_at_pluses_expanded(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, "preparing\n", "--- Installing dependencies\n", "pip install -r requirements.txt\n",
            "Successfully installed 42 packages\n", "+++ Running tests\n", "tests/test_api.py ....\n",
            "tests/test_pages.py ...F\n", "\x1b[1m--")
    log = open_log(page, context, server, owner, build, a)
    expect(line(log, 8)).to_have_text("--")  # too short yet to say whether it starts a section
    run.log(a, "- Uploading\x1b[0m artifacts\n", "uploaded 3 files\n")
    expect(line(log, 9)).to_be_attached()
    sections = log.locator(".log-section")
    expect(sections).to_have_count(3)
    heads = sections.locator(".section-head")
    assert heads.evaluate_all("els => els.map(e => e.textContent)") == [
        "--- Installing dependencies\n", "+++ Running tests\n", "--- Uploading artifacts\n"]
    assert numbers(log) == list(range(1, 10))
    expect(line(log, 1)).to_be_visible()  # before the first header: not in a section
    install, tests, upload = sections.nth(0), sections.nth(1), sections.nth(2)
    expect(line(log, 3)).to_be_hidden()
    expect(line(log, 4)).to_be_hidden()
    expect(line(log, 6)).to_be_visible()
    expect(line(log, 9)).to_be_hidden()
    expect(install.locator(".section-head")).to_have_attribute("data-count", "2 lines")
    expect(install.locator(".fold")).to_have_attribute("aria-expanded", "false")
    expect(tests.locator(".fold")).to_have_attribute("aria-expanded", "true")
    install.locator(".section-head").click(position={"x": 200, "y": 5})  # on its text
    expect(line(log, 3)).to_be_visible()
    expect(install.locator(".fold")).to_have_attribute("aria-expanded", "true")
    tests.locator(".fold").click()
    expect(line(log, 6)).to_be_hidden()
    upload.locator(".fold").focus()
    page.keyboard.press("Enter")
    expect(line(log, 9)).to_be_visible()
    # Lines streaming later join the last section.
    run.log(a, "done\n")
    expect(upload.locator(".section-head")).to_have_attribute("data-count", "2 lines")
    expect(line(log, 10)).to_be_visible()


def test_timestamps_toggle_shows_when_each_line_began(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    second = 1_000_000_000
    build_services.append_log(job=a, chunks=[
        ChunkIn(seq=1, stream_kind=0, content="first\nsecond be", ts=T0_NS),
        ChunkIn(seq=2, stream_kind=0, content="gan earlier\nthird\n", ts=T0_NS + 65 * second),
    ])
    log = open_log(page, context, server, owner, build, a)
    expect(line(log, 3)).to_contain_text("third")
    stamp = "line => getComputedStyle(line.querySelector('a.ln'), '::after').content"
    assert line(log, 1).evaluate(stamp) in ("none", "normal")
    job_row(page, a).get_by_role("button", name="Timestamps").click()
    expect(job_row(page, a).get_by_role("button", name="Timestamps")).to_have_attribute("aria-pressed", "true")
    local = page.evaluate("""ts => [ts, ts + 65e9].map(t => { const d = new Date(t / 1e6);
        return [d.getHours(), d.getMinutes(), d.getSeconds()].map(n => String(n).padStart(2, "0")).join(":"); })""",
                          T0_NS)
    assert [line(log, n).evaluate(stamp) for n in (1, 2, 3)] == [f'"{local[0]}"', f'"{local[0]}"', f'"{local[1]}"']
    assert "first" in log.text_content() and local[0] not in log.text_content()  # copied text is the log's
    job_row(page, a).get_by_role("button", name="Timestamps").click()
    assert line(log, 1).evaluate(stamp) in ("none", "normal")


# ---------------------------------------------------------------- find


def test_find_highlights_counts_and_steps_through_the_matches(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, *[f"ok {n}\n" for n in range(1, 80)])
    run.log(a, "Error: first\n", "--- Details\n", "an \x1b[31merr\x1b[0mor across colours\n", "fine\n",
            "+++ Summary\n", "ERROR count: 2, and another error\n")
    log = open_log(page, context, server, owner, build, a)
    expect(line(log, 85)).to_contain_text("ERROR count")
    bar = job_row(page, a).locator(".log-bar")
    find = bar.get_by_role("searchbox")
    count = bar.locator("[data-log-find-count]")
    find.fill("error")
    expect(count).to_have_text("1 of 4")
    marks = log.locator("mark.find")
    assert marks.evaluate_all("ms => ms.map(m => m.textContent)") == ["Error", "err", "or", "ERROR", "error"]
    current = log.locator("mark.find.current")
    expect(current).to_have_text("Error")
    expect(current).to_be_in_viewport()
    expect(line(log, 82)).to_be_hidden()  # in a collapsed section, until the match in it is current
    find.press("Enter")
    expect(count).to_have_text("2 of 4")
    assert current.evaluate_all("ms => ms.map(m => m.textContent)") == ["err", "or"]  # one match over two spans
    expect(line(log, 82)).to_be_visible()
    expect(current.first).to_be_in_viewport()
    bar.get_by_role("button", name="Next match").click()
    expect(count).to_have_text("3 of 4")
    find.press("Enter")
    expect(count).to_have_text("4 of 4")
    find.press("Enter")
    expect(count).to_have_text("1 of 4")  # round again
    find.press("Shift+Enter")
    expect(count).to_have_text("4 of 4")
    bar.get_by_role("button", name="Previous match").click()
    expect(count).to_have_text("3 of 4")
    # Output arriving while a find is on is searched too.
    run.log(a, "one more error\n")
    expect(count).to_have_text("3 of 5")
    expect(marks).to_have_count(6)
    find.fill("no such text")
    expect(count).to_have_text("no matches")
    expect(marks).to_have_count(0)
    find.fill("ok 7")
    expect(count).to_have_text("1 of 11")  # ok 7, ok 70 ... ok 79
    find.press("Escape")
    expect(count).to_have_text("")
    expect(marks).to_have_count(0)
    assert texts(log)[81] == "an error across colours"  # the text is whole again


def test_find_over_5000_lines_is_fast(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, *["".join(f"\x1b[32mok\x1b[0m test_case_{n} passed in 0.{n % 10}s\n" for n in range(s, s + 500))
                 for s in range(0, 5000, 500)])
    log = open_log(page, context, server, owner, build, a)
    expect(line(log, 5000)).to_contain_text("test_case_4999")
    # Enter searches at once (no typing pause): the time is the search's and the highlighting's.
    timings = page.evaluate("""li => {
        const input = li.querySelector("[data-log-find]");
        return ["test_case_4321", "passed in 0.3", "0"].map(query => {
            input.value = query;
            const start = performance.now();
            input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
            return [performance.now() - start, li.querySelector("[data-log-find-count]").textContent];
        });
    }""", job_row(page, a).element_handle())
    print("find over 5,000 lines (ms, count):", timings)
    assert [found for _, found in timings] == ["1 of 1", "1 of 500", "1 of 2000+"]
    assert max(ms for ms, _ in timings) < 1000, timings


def test_a_10_mb_log_loads_without_freezing_the_page(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    row = "x" * 90
    for batch in range(10):  # 100 chunks of 100 KiB-ish, 1,000 lines each: 100,000 lines, ~10 MB
        run.log(a, *["".join(f"{n:07d} {row}\n" for n in range(start, start + 1000))
                     for start in range(batch * 10_000 + 1, (batch + 1) * 10_000 + 1, 1000)])
    sign_in(context, server, owner)
    page.goto(build_path(build))
    page.evaluate("""() => { window.__longest = 0;
        new PerformanceObserver(list => list.getEntries().forEach(e => {
            window.__longest = Math.max(window.__longest, e.duration); })).observe({type: "longtask"}); }""")
    started = time.monotonic()
    job_row(page, a).get_by_role("button", name="Log").click()
    log = job_row(page, a).locator("pre.log")
    expect(line(log, 100_000)).to_contain_text(f"{100_000:07d}", timeout=60_000)
    loaded = time.monotonic() - started
    longest = page.evaluate("window.__longest")
    print(f"10 MB log: on the page after {loaded:.1f} s; longest task {longest:.0f} ms")
    assert log.locator(".line").count() <= 5000
    assert longest < 2000, longest  # generous for a busy CI box: about 0.4 s here (one draw of 5,000 lines)


def test_screenshot_of_a_log_panel_with_a_section_and_a_find(
        page: Page, context: Any, server: str, owner: User, pipeline: Pipeline, agent: Agent) -> None:
    build = make_build(pipeline)
    run = Runner(agent)
    a = run.start("a", build)
    run.log(a, "\x1b[36m==>\x1b[0m checking out \x1b[1mabc123\x1b[0m\n", "--- :pip: Installing dependencies\n",
            "Collecting django>=5.0\n", "Successfully installed 42 packages\n", "+++ :pytest: Running tests\n",
            "\x1b[1m============ test session starts ============\x1b[0m\n",
            "tests/test_api.py \x1b[32m....................\x1b[0m \x1b[32m[ 47%]\x1b[0m\n",
            "tests/test_log_search.py \x1b[32m.........\x1b[0m\x1b[31mF\x1b[0m \x1b[32m[100%]\x1b[0m\n",
            "\x1b[31mFAILED\x1b[0m tests/test_log_search.py::test_limit - assert 3 == 2\n",
            "\x1b[31m============ 1 failed, 41 passed in 3.21s ============\x1b[0m\n")
    log = open_log(page, context, server, owner, build, a, hash=f"#job-{a.pk}-L9")
    expect(line(log, 9)).to_have_class("line is-target")
    job_row(page, a).get_by_role("button", name="Timestamps").click()
    find = job_row(page, a).get_by_role("searchbox")
    find.fill("log_search")
    expect(job_row(page, a).locator("[data-log-find-count]")).to_have_text("1 of 2")
    find.press("Enter")
    expect(job_row(page, a).locator("[data-log-find-count]")).to_have_text("2 of 2")
    page.mouse.move(0, 0)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    job_row(page, a).locator(".log-panel").screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000

