"""Planning and inserting a 1,000-step build with waits, against a same-run baseline: `make bench-plan`.

One run: a fresh PostgreSQL database, one pipeline, and for each definition
(1,000 independent steps as the baseline, 500 + a wait + 500, ten segments of
100 with nine waits) several builds created through `create_build`. It prints the
median plan time, plan + insert time, the job list's rows and JSON, and a
settle after a failure (which skips every later job), each also as a ratio to
the baseline; and, once, 500 + 500 in the graph form with an edge per pair, what
every wait cost before it became a barrier. Target: plan + insert of each flat
build with waits under 1 s.

Usage: .venv/bin/python bench/plan_bench.py [--keep] [--rounds N] [--db NAME]
"""

from __future__ import annotations

import argparse
import sys
import time

import rootpath  # noqa: F401 (before any `bench` import: puts the project root on sys.path)

from bench.harness import ScratchRun, loadavg, say, verdict
from bench.plan import DB_NAME, STEPS
from bench.plan.cases import cases, measure
from bench.seeding import migrate_and_create_user

TARGET_SECONDS = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--rounds", type=int, default=5, help="builds per definition; medians are reported")
    parser.add_argument("--db", default=DB_NAME, help=f"scratch database (dropped and created; default {DB_NAME})")
    args = parser.parse_args()

    with ScratchRun(args.db, prefix="harmont-bench-plan-", keep=args.keep):
        from organizations.services import create_organization
        from pipelines.services import create_pipeline

        user = migrate_and_create_user()
        org = create_organization(name="bench", owner=user)
        pipeline = create_pipeline(org=org, name="app", repository="", default_branch="main")
        say(f"database {args.db}: migrated; {args.rounds} builds per definition; load {loadavg()}")
        results = []
        for case in cases(STEPS):
            started = time.monotonic()
            results.append((case, measure(case, pipeline, args.rounds)))
            say(f"  {case.title}: measured in {time.monotonic() - started:.1f} s")

        base = results[0][1]
        say("")
        say(f"{'definition':44} {'plan ms':>8} {'plan+insert ms':>15} {'jobs JSON ms':>13} {'settle ms':>10}"
            f" {'edge rows':>10} {'wait pairs':>11} {'depends_on ids':>15}")
        for case, t in results:
            say(f"{case.title:44} {t.plan * 1000:8.1f} {t.create * 1000:15.1f} {t.jobs_json * 1000:13.1f}"
                f" {t.settle * 1000:10.1f} {t.edges:10,} {case.pairs:11,} {t.depends_on:15,}")
        say("")
        say("as a multiple of the baseline (plan, plan+insert, jobs JSON, settle):")
        for case, t in results[1:]:
            say(f"  {case.title:42} {t.plan / base.plan:6.2f} {t.create / base.create:6.2f}"
                f" {t.jobs_json / base.jobs_json:6.2f} {t.settle / base.settle:6.2f}")
        say("")
        for case, t in results[1:]:
            if case.rounds is not None:
                continue  # the comparison, not a target
            say(f"target: {case.title}, plan + insert < {TARGET_SECONDS:.0f} s: {t.create:.3f} s "
                f"{verdict(t.create < TARGET_SECONDS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
