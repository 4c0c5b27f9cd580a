"""End to end: what goes wrong on an agent's host fails one job, never the agent or the fleet.

Real `manage.py runagent` processes against the live server (tests/e2e.py): output the
database can't store as it is.
"""

from __future__ import annotations

import pytest

from tests.dsl import hm
from tests.e2e import create_build, finished, jobs_by_key, stderr_of, stdout_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("e2e_server")]


# ------------------------------------------------------------------ output the database can't hold as it is


def test_output_with_nul_bytes_is_stored_with_replacement_characters(e2e_settings, api, pipeline, agents):
    agents.start("a1")
    command = r"printf 'a\0b\n'; cat /proc/self/environ >&2"
    build = create_build(api, pipeline, hm.pipeline([hm.sh(command, key="nul")]))

    wait_for(lambda: finished(build), 20, what="the build to finish")
    job = jobs_by_key(build)["nul"]
    assert (build.state, job.state) == ("passed", "passed")
    assert stdout_of(job) == "a\ufffdb\n"
    environ = stderr_of(job)
    assert f"\ufffdHARMONT_JOB_ID={job.pk}\ufffd" in "\ufffd" + environ
