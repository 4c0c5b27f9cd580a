"""The in-process cost of each agent call: queries and time through the full middleware stack, no HTTP."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dispatch.seed import Seed, build_body


@dataclass
class CallCost:
    name: str
    queries: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    sample_sql: list[str] = field(default_factory=list)


def shorten_sql(statement: str) -> str:
    """One line per query: verb, table, joins, row locks (`--show-queries`)."""
    statement = re.sub(r'"([a-z_]+)"\."([a-z_]+)"', r"\2", statement)
    cte = re.match(r"WITH \w+ AS \((UPDATE|INSERT INTO|DELETE FROM) \"?([a-z_]+)", statement)
    if cte:  # a data-modifying WITH: what it changes, then what it reads
        read = re.findall(r"FROM \"?([a-z_]+)", statement.split("RETURNING", 1)[-1])
        tables = [t for t in read if t != "ended"]
        return f"WITH ({cte.group(1).split()[0]} {cte.group(2)}) SELECT {', '.join(dict.fromkeys(tables)) or '?'}"
    match = re.match(r"(SELECT|UPDATE|INSERT|DELETE|SAVEPOINT|RELEASE)\b(.*)", statement, re.DOTALL)
    if not match:
        return statement[:80]
    verb, rest = match.groups()
    if verb in ("SAVEPOINT", "RELEASE"):
        return verb
    table = re.search(r'(?:FROM|UPDATE|INTO)\s+"?([a-z_]+)"?', statement)
    tail = " FOR UPDATE" + (" SKIP LOCKED" if "SKIP LOCKED" in statement else "") if "FOR UPDATE" in statement else ""
    joins = re.findall(r'JOIN "?([a-z_]+)"?', rest)
    return f"{verb} {table.group(1) if table else '?'}" + (f" (+{','.join(joins)})" if joins else "") + tail


def measure_agent_calls(probe: Seed, jobs_per_build: int, runs_file: Path) -> dict[str, CallCost]:
    """Queries and in-process time of create-build, claim, start, finish (and an idle claim).

    Goes through the full middleware and DRF stack with django.test.Client, against the
    probe organization (its own agent token), so the measured agents never see these jobs.
    The first build's jobs go as an agent coming back from idle does them with a job that
    outlives the start report's delay (claim, start, finish); the others as a busy agent does
    quick jobs (one finish that carries the start and claims the next, builds/agent/starts.py).
    """
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client()
    costs = {name: CallCost(name) for name in ("create build (REST)", "claim (200)", "start", "finish",
                                               "finish + next claim", "claim (204, idle)")}

    def call(name: str, path: str, token: str, body: dict[str, Any] | None = None, expect: int = 200) -> Any:
        with CaptureQueriesContext(connection) as captured:
            began = time.perf_counter()
            response = client.post(path, data=json.dumps(body or {}), content_type="application/json",
                                   HTTP_AUTHORIZATION=f"Bearer {token}")
            elapsed = time.perf_counter() - began
        if response.status_code != expect:
            raise RuntimeError(f"in-process {path} -> {response.status_code} {response.content[:300]!r}")
        cost = costs[name]
        cost.queries.append(len(captured.captured_queries))
        cost.seconds.append(elapsed)
        if not cost.sample_sql:
            cost.sample_sql = [shorten_sql(q["sql"]) for q in captured.captured_queries]
        return response.json() if response.content else None

    builds_path = f"/api/v0/organizations/{probe.org}/pipelines/{probe.pipeline}/builds"
    for i in range(3):
        call("create build (REST)", builds_path, probe.api_token, build_body(i, runs_file), expect=201)
    register = client.post("/api/v0/agent/register", data=json.dumps({"name": "probe-agent"}),
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {probe.agent_token}")
    session = register.json()["session_token"]
    handed_over = None
    for i in range(3 * jobs_per_build):
        busy = i >= jobs_per_build
        claimed = handed_over or call("claim (200)", "/api/v0/agent/claim", session)
        job_id, job_token = claimed["job"]["id"], claimed["job_token"]
        if not busy:
            call("start", f"/api/v0/agent/jobs/{job_id}/start", job_token, {"agent_name": "probe-agent"})
        # What a real agent sends for a silent command: two meta lines riding on the finish.
        now = time.time_ns()
        chunks = [{"seq": 1, "stream_kind": 2, "content": "harmont-agent: running job on probe-agent\n", "ts": now},
                  {"seq": 2, "stream_kind": 2, "content": "harmont-agent: exit status 0\n", "ts": now}]
        body = {"exit_code": 0, "chunks": chunks, "claim_next": busy}
        if busy:
            body["started"] = {"agent_name": "probe-agent", "elapsed_seconds": 0.002}
        answer = call("finish + next claim" if busy else "finish", f"/api/v0/agent/jobs/{job_id}/finish", job_token,
                      body)
        handed_over = answer.get("next")
    for _ in range(5):
        call("claim (204, idle)", "/api/v0/agent/claim", session, expect=204)
    return costs

