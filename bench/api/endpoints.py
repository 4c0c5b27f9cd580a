"""The four measured endpoints: their URLs, the check that a response is the intended page, and the
SQL each runs (counted in-process through the full middleware stack)."""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench.api import BUILDS, DEEP, MIDDLE
from bench.api.seed import Seed


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    path: str
    authenticated: bool


def targets_for(seed: Seed) -> list[Target]:
    from harmont.pagination import encode_cursor

    builds = f"/api/v0/organizations/{seed.org}/pipelines/{seed.pipeline}/builds"
    # Newest first: after skipping DEEP builds the page starts at number BUILDS - DEEP,
    # i.e. its cursor is the key just above that. Encoded by the app's own codec.
    deep_cursor = encode_cursor(BUILDS - DEEP + 1)
    return [
        Target("a", "baseline (DRF, 1 row, no auth)", f"/bench/baseline/{seed.middle_build_id}", False),
        Target("b", f"GET build #{MIDDLE}", f"{builds}/{MIDDLE}", True),
        Target("c", "build list, first page", builds, True),
        Target("d", f"build list, {DEEP:,} deep", f"{builds}?cursor={deep_cursor}", True),
    ]


def auth_headers(target: Target, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if target.authenticated else {}


def check_body(target: Target, body: Any) -> str:
    """What the response shows, or an exception if it is not what the target is meant to measure."""
    if target.key in ("a", "b"):
        if body.get("number") != MIDDLE:
            raise RuntimeError(f"{target.label}: expected build {MIDDLE}, got {body!r:.200}")
        return f"build #{body['number']}"
    numbers = [item["number"] for item in body["data"]]
    expected_first = BUILDS if target.key == "c" else BUILDS - DEEP
    if len(numbers) != 50 or abs(numbers[0] - expected_first) > 1 or not body.get("next_cursor"):
        raise RuntimeError(f"{target.label}: expected 50 builds from #{expected_first}, got {numbers[:3]}...")
    return f"{len(numbers)} builds, #{numbers[0]}..#{numbers[-1]}"


def http_get_json(base: str, target: Target, token: str) -> Any:
    request = urllib.request.Request(base + target.path, headers=auth_headers(target, token))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def count_queries(targets: list[Target], token: str) -> list[tuple[Target, int, list[str], int]]:
    """Each target once in-process (full middleware stack): (target, queries, SQL heads, first-call queries)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {token}")
    results = []
    for target in targets:
        counts = []
        for _ in range(2):  # the first call may write the token's last_used_at; the second is steady state
            with CaptureQueriesContext(connection) as captured:
                response = client.get(target.path)
            if response.status_code != 200:
                raise RuntimeError(f"{target.label}: in-process GET {target.path} -> {response.status_code} "
                                   f"{response.content[:300]!r}")
            check_body(target, response.json())
            counts.append(captured.captured_queries)
        heads = [shorten_sql(q["sql"]) for q in counts[1]]
        results.append((target, len(counts[1]), heads, len(counts[0])))
    return results


def shorten_sql(statement: str) -> str:
    """One line per query: table, joins, a cut WHERE, ORDER BY and LIMIT."""
    statement = re.sub(r'"([a-z_]+)"\."([a-z_]+)"', r"\2", statement)
    match = re.match(r"(SELECT|UPDATE|INSERT|DELETE)\b.*?\bFROM (\S+)(.*?)"
                     r"(?: WHERE (.*?))?(?: ORDER BY (.*?))?(?: LIMIT (\d+))?$", statement, re.S)
    if not match:
        return statement[:90]
    verb, table, joins, where, order, limit = match.groups()
    joined = re.findall(r"JOIN (\S+)", joins or "")
    text = f"{verb} {table.strip(chr(34))}"
    if joined:
        text += " JOIN " + ", ".join(j.strip(chr(34)) for j in joined)
    if where:
        text += f" WHERE {where[:60]}{'...' if len(where) > 60 else ''}"
    if order:
        text += f" ORDER BY {order}"
    if limit:
        text += f" LIMIT {limit}"
    return text
