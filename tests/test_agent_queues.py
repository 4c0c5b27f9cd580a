"""Agent queues (tags and selectors) and concurrency groups: the planner, registration, the claim, why a job waits."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from builds import services as build_services
from builds import states
from builds.models import Agent, ConcurrencySlot, Job, JobState
from builds.selectors import with_waiting_reasons
from builds.views import build_url
from organizations.models import ApiToken
from pipelines import agent_tags
from pipelines.models import Pipeline
from tests.helpers import (
    assert_error,
    build_at,
    builds_url,
    is_postgres,
    make_agent,
    make_build,
    race,
    register,
)

J = JobState
T0 = timezone.now() - timedelta(hours=1)


def step(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "key": key, "cmd": f"echo {key}", **fields}


def flat(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"version": "0", "steps": list(steps)}


def tagged_agent(org, name: str, **tags: str) -> Agent:
    agent = make_agent(org, name=name)
    Agent.objects.filter(pk=agent.pk).update(tags=tags)
    agent.tags = tags
    return agent


def claimed_key(agent: Agent) -> str | None:
    claim = build_services.claim_job(agent=agent)
    return None if claim is None else claim.job.step_key


def finish(key: str, state: str = J.PASSED) -> None:
    job = Job.objects.get(step_key=key)
    if job.state == J.ASSIGNED:
        build_services.start_job(job=job)
    assert build_services.finish_job(job=Job.objects.get(pk=job.pk), state=state, exit_code=0)


# ------------------------------------------------------------------ the planner


@pytest.mark.django_db
def test_jobs_store_their_effective_selector(pipeline):
    build = make_build(pipeline, pipeline_ir=flat(
        step("plain"), step("arm", agents={"queue": "arm64", "os": "linux*"}), step("listed", agents=["os=mac"]),
        step("runner", runner="gpu"), step("both", runner="gpu", agents={"queue": "cpu"})))
    stored = dict(Job.objects.filter(build=build).values_list("step_key", "agents"))
    assert stored == {
        "plain": {"queue": "default"},
        "arm": {"queue": "arm64", "os": "linux*"},
        "listed": {"os": "mac", "queue": "default"},  # names no queue: wants queue=default (Buildkite)
        "runner": {"queue": "gpu"},  # runner without a queue in the selector means queue=<runner>
        "both": {"queue": "cpu"},  # the selector's own queue wins over the runner
    }


@pytest.mark.django_db
def test_a_steps_agents_replace_the_pipeline_default_whole(pipeline):
    Pipeline.objects.filter(pk=pipeline.pk).update(default_agents={"queue": "linux", "size": "large"})
    pipeline.refresh_from_db()
    build = make_build(pipeline, pipeline_ir=flat(step("inherits"), step("own", agents={"os": "mac"})))
    stored = dict(Job.objects.filter(build=build).values_list("step_key", "agents"))
    assert stored == {"inherits": {"queue": "linux", "size": "large"}, "own": {"os": "mac", "queue": "default"}}


@pytest.mark.django_db
def test_concurrency_fields_are_stored_and_make_their_slots(pipeline, org):
    make_build(pipeline, pipeline_ir=flat(step("a", concurrency_group="deploy", concurrency=2),
                                          step("b", concurrency_group="deploy", concurrency=3), step("c")))
    assert dict(Job.objects.values_list("step_key", "concurrency_group")) == {"a": "deploy", "b": "deploy", "c": None}
    assert sorted(ConcurrencySlot.objects.filter(organization=org, group="deploy").values_list("index", flat=True)) \
        == [0, 1, 2]
    make_build(pipeline, pipeline_ir=flat(step("a", concurrency_group="deploy", concurrency=2)))
    assert ConcurrencySlot.objects.count() == 3  # existing slots stay as they are


@pytest.mark.django_db
@pytest.mark.parametrize(("fields", "message"), [
    ({"agents": "queue=arm64"}, "'agents' must be an object"),
    ({"agents": {"queue": 5}}, "rule 'queue' must be a string"),
    ({"agents": {"queue": ""}}, "rule 'queue' must not be empty"),
    ({"agents": {"bad key": "x"}}, "'bad key' is not a tag name"),
    ({"agents": {"queue": "x" * 256}}, "at most 255"),
    ({"agents": {"queue": "a\nb"}}, "printable"),
    ({"agents": ["queue"]}, "\"key=value\" strings"),
    ({"agents": ["queue=a", "queue=b"]}, "names 'queue' twice"),
    ({"concurrency_group": "deploy"}, "without 'concurrency'"),
    ({"concurrency": 2}, "without 'concurrency_group'"),
    ({"concurrency_group": "deploy", "concurrency": 0}, "from 1 to 1000"),
    ({"concurrency_group": "deploy", "concurrency": 1001}, "from 1 to 1000"),
    ({"concurrency_group": "deploy", "concurrency": True}, "from 1 to 1000"),
    ({"concurrency_group": "", "concurrency": 1}, "non-empty string"),
])
def test_bad_selectors_and_concurrency_reject_the_plan_naming_the_step(api, pipeline, fields, message):
    response = api.post(builds_url(pipeline), {"branch": "main", "commit": "abc123",
                                               "pipeline_ir": flat(step("ok"), step("bad", **fields))}, format="json")
    error = assert_error(response, 422, "build_plan_rejected")
    assert "steps[1] ('bad')" in error["message"] and message in error["message"], error["message"]
    assert not Job.objects.exists()
    assert not ConcurrencySlot.objects.exists()


def test_matching_rules():
    linux = {"queue": "arm64", "os": "linux-gnu", "note": "50%_off[1]"}
    assert agent_tags.selector_matches({"queue": "default"}, {})
    assert not agent_tags.selector_matches({"queue": "default"}, {"queue": "arm64"})
    assert agent_tags.selector_matches({"queue": "arm*", "os": "linux?gnu"}, linux)
    assert not agent_tags.selector_matches({"queue": "arm64", "gpu": "*"}, linux)  # a tag it lacks
    assert not agent_tags.selector_matches({"queue": "ARM64"}, linux)  # case-sensitive
    assert agent_tags.selector_matches({"queue": "arm64", "note": "50%_off[1]"}, linux)
    assert not agent_tags.selector_matches({"queue": "arm64", "note": "5%"}, linux)  # % is no wildcard


# ------------------------------------------------------------------ pipelines


@pytest.mark.django_db
def test_pipeline_create_takes_default_agents_in_either_form(admin_api, org):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines", {
        "name": "Arm CI", "repository": "https://github.com/acme/arm.git", "default_branch": "main",
        "default_agents": ["queue=arm64", "os=linux"]}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["default_agents"] == {"queue": "arm64", "os": "linux"}
    assert Pipeline.objects.get(slug="arm-ci").default_agents == {"queue": "arm64", "os": "linux"}
    shown = admin_api.get(f"/api/v0/organizations/{org.slug}/pipelines/arm-ci").json()
    assert shown["default_agents"] == {"queue": "arm64", "os": "linux"}


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [{"queue": 1}, "queue=arm64", ["queue"], {"k y": "v"}])
def test_pipeline_create_with_a_bad_default_selector_is_422_and_creates_nothing(admin_api, org, bad):
    response = admin_api.post(f"/api/v0/organizations/{org.slug}/pipelines", {
        "name": "Arm CI", "repository": "https://github.com/acme/arm.git", "default_branch": "main",
        "default_agents": bad}, format="json")
    error = assert_error(response, 422, "pipeline_invalid")
    assert set(error["fields"]) == {"default_agents"}
    assert not Pipeline.objects.filter(slug="arm-ci").exists()


@pytest.mark.django_db
def test_the_render_job_uses_the_pipelines_default_selector(pipeline):
    Pipeline.objects.filter(pk=pipeline.pk).update(default_agents={"queue": "render"}, definition=None)
    pipeline.refresh_from_db()
    build = make_build(pipeline)
    render = Job.objects.get(build=build)
    assert (render.kind, render.agents) == ("render", {"queue": "render"})


# ------------------------------------------------------------------ registration


@pytest.mark.django_db
def test_agents_register_with_tags_shown_in_the_agents_list(agent_token, api, org):
    response = register(agent_token.raw, name="arm-1", tags={"queue": "arm64", "os": "linux"})
    assert response.status_code == 201, response.content
    assert response.json()["agent"]["tags"] == {"queue": "arm64", "os": "linux"}
    assert Agent.objects.get(name="arm-1").tags == {"queue": "arm64", "os": "linux"}
    listed = api.get(f"/api/v0/organizations/{org.slug}/agents").json()["data"]
    assert [(a["name"], a["tags"]) for a in listed] == [("arm-1", {"queue": "arm64", "os": "linux"})]


@pytest.mark.django_db
@pytest.mark.parametrize(("tags", "message"), [
    ({"queue": "arm*"}, "glob characters"),
    ({"queue": "a?"}, "glob characters"),
    ({"queue": 64}, "must be a string"),
    ({"queue": ""}, "must not be empty"),
    ({"bad key": "x"}, "is not a tag name"),
    ({"k" * 65: "x"}, "is not a tag name"),
    ({"queue": "x" * 256}, "at most 255"),
    ({f"t{i}": "x" for i in range(33)}, "at most 32"),
    (["queue=arm64"], "Must be an object"),
])
def test_bad_tags_are_422_with_fields_and_register_nothing(agent_token, tags, message):
    error = assert_error(register(agent_token.raw, tags=tags), 422, "validation_failed")
    assert set(error["fields"]) == {"tags"} and message in " ".join(error["fields"]["tags"]), error["fields"]
    assert not Agent.objects.exists()


# ------------------------------------------------------------------ the claim: queues


@pytest.mark.django_db
def test_each_job_goes_only_to_an_agent_whose_tags_match(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(
        step("arm", agents={"queue": "arm64"}), step("general"), step("linux", agents={"queue": "arm64", "os": "lin*"}),
        step("gpu", runner="gpu")))
    plain = make_agent(org, name="plain")
    arm = tagged_agent(org, "arm", queue="arm64")
    arm_linux = tagged_agent(org, "arm-linux", queue="arm64", os="linux")
    gpu = tagged_agent(org, "gpu", queue="gpu", os="linux")

    # Oldest first among what each may take: the plain agent passes over the arm64 job.
    assert claimed_key(plain) == "general"
    assert claimed_key(plain) is None
    assert claimed_key(arm) == "arm"
    assert claimed_key(arm) is None  # `linux` also wants os=lin*, which this agent lacks
    assert claimed_key(gpu) == "gpu"
    assert claimed_key(arm_linux) == "linux"
    assert dict(Job.objects.values_list("step_key", "agent__name")) == {
        "arm": "arm", "general": "plain", "linux": "arm-linux", "gpu": "gpu"}


@pytest.mark.django_db
@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("linux*", "linux-gnu", True), ("linux?", "linux2", True), ("linux?", "linux", False),
    ("*", "anything", True), ("a_b", "axb", False), ("a_b", "a_b", True), ("5%", "50", False),
    ("5%", "5%", True), ("x[1]", "x[1]", True), ("x[1]", "x1", False), ("a\\b", "a\\b", True),
    ("Linux", "linux", False),
])
def test_the_claims_glob_matching_agrees_with_the_rules(org, pipeline, pattern, value, matches):
    build_at(pipeline, T0, pipeline_ir=flat(step("j", agents={"queue": "q", "tag": pattern})))
    agent = make_agent(org, name="a")
    # Tag values may not hold glob characters at registration; here the row is written directly
    # to try brackets and backslashes on both sides.
    Agent.objects.filter(pk=agent.pk).update(tags={"queue": "q", "tag": value})
    assert agent_tags.selector_matches({"queue": "q", "tag": pattern}, {"queue": "q", "tag": value}) is matches
    assert (claimed_key(agent) == "j") is matches


@pytest.mark.django_db
def test_jobs_from_before_selectors_go_to_the_default_queue(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(step("old")))
    Job.objects.update(agents=None)
    assert claimed_key(tagged_agent(org, "arm", queue="arm64")) is None
    assert claimed_key(make_agent(org, name="plain")) == "old"


@pytest.mark.django_db
def test_a_finish_report_that_claims_the_next_job_honours_the_tags(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(step("first", agents={"queue": "arm64"}), step("general"),
                                            step("second", agents={"queue": "arm64"})))
    arm = tagged_agent(org, "arm", queue="arm64")
    claim = build_services.claim_job(agent=arm)
    assert claim.job.step_key == "first"
    build_services.start_job(job=claim.job)
    job = Job.objects.get(pk=claim.job.pk)
    job.agent_serving = True
    outcome = build_services.finish_and_claim_next(job=job, exit_code=0, claim_next=True)
    assert outcome.next is not None and outcome.next.job.step_key == "second"


# ------------------------------------------------------------------ the claim: concurrency groups


@pytest.mark.django_db
def test_a_full_group_is_passed_over_until_one_of_it_ends(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(*[step(f"d{i}", concurrency_group="deploy", concurrency=2)
                                              for i in range(4)], step("other")))
    agents = [make_agent(org, name=f"a{i}") for i in range(4)]
    assert [claimed_key(agent) for agent in agents[:3]] == ["d0", "d1", "other"]
    assert claimed_key(agents[3]) is None  # two of deploy run: d2 waits, still scheduled
    assert Job.objects.get(step_key="d2").state == J.SCHEDULED
    finish("d0")
    assert claimed_key(agents[3]) == "d2"
    finish("d1", J.FAILED)
    finish("d2")
    assert claimed_key(agents[0]) == "d3"


@pytest.mark.django_db
def test_a_canceled_job_frees_its_place(org, pipeline):
    build = build_at(pipeline, T0, pipeline_ir=flat(step("d0", concurrency_group="g", concurrency=1)))
    later = build_at(pipeline, T0 + timedelta(seconds=1), pipeline_ir=flat(step("e0", concurrency_group="g",
                                                                                concurrency=1)))
    agent = make_agent(org, name="a")
    assert claimed_key(agent) == "d0"
    assert claimed_key(agent) is None
    build_services.cancel_build(build=build)
    # canceling until the agent reports: still live, still holding the place
    assert claimed_key(agent) is None
    build_services.finish_job(job=Job.objects.get(step_key="d0"), state=J.CANCELED)
    assert claimed_key(agent) == "e0"
    assert Job.objects.get(build=later).agent_id == agent.pk


@pytest.mark.django_db
def test_a_job_takes_only_places_below_its_own_concurrency(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(step("wide", concurrency_group="g", concurrency=3),
                                            step("wide2", concurrency_group="g", concurrency=3),
                                            step("narrow", concurrency_group="g", concurrency=2)))
    agents = [make_agent(org, name=f"a{i}") for i in range(3)]
    assert claimed_key(agents[0]) == "wide"
    assert claimed_key(agents[1]) == "wide2"
    assert claimed_key(agents[2]) is None  # two run; `narrow` allows two


@pytest.mark.django_db
def test_groups_are_per_organization(org, pipeline, other_org, other_pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(step("ours", concurrency_group="g", concurrency=1)))
    build_at(other_pipeline, T0, pipeline_ir=flat(step("theirs", concurrency_group="g", concurrency=1)))
    assert claimed_key(make_agent(org, name="a")) == "ours"
    assert claimed_key(make_agent(other_org, name="b")) == "theirs"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_claimers_never_exceed_a_groups_concurrency_nor_claim_a_job_twice(org, pipeline):
    if not is_postgres():
        pytest.skip("the race needs PostgreSQL's row locks; SQLite serialises all writers")
    grouped, free = 24, 16
    steps = [step(f"g{i}", concurrency_group="deploy", concurrency=2) if i % 5 < 3 else step(f"f{i}")
             for i in range(grouped + free)]
    grouped_keys = {s["key"] for s in steps if "concurrency_group" in s}
    build_at(pipeline, T0, pipeline_ir=flat(*steps))
    agents = [make_agent(org, name=f"racer-{i}") for i in range(8)]
    claims: list[tuple[str, int]] = []
    most_live = [0]
    lock = threading.Lock()

    def live_in_group() -> int:
        return Job.objects.filter(concurrency_group="deploy", state__in=(J.ASSIGNED, J.RUNNING)).count()

    def run(i: int) -> None:
        while (claim := build_services.claim_job(agent=agents[i])) is not None:
            live = live_in_group()
            with lock:
                claims.append((claim.job.step_key, i))
                most_live[0] = max(most_live[0], live)
            build_services.start_job(job=claim.job)
            time.sleep(0.01)  # hold it while the others claim
            live = live_in_group()
            with lock:
                most_live[0] = max(most_live[0], live)
            build_services.report_finish(job=Job.objects.get(pk=claim.job.pk), exit_code=0)

    race(len(agents), run)

    keys = [key for key, _ in claims]
    assert not [key for key, n in Counter(keys).items() if n > 1]
    assert sorted(keys) == sorted(s["key"] for s in steps)
    assert len(grouped_keys) == grouped
    assert most_live[0] == 2  # never more than the group's concurrency, and it did run two at once
    assert set(Job.objects.values_list("state", flat=True)) == {J.PASSED}


# ------------------------------------------------------------------ why a job waits


def connect(agent: Agent) -> None:
    Agent.objects.filter(pk=agent.pk).update(last_seen_at=timezone.now())


@pytest.mark.django_db
def test_scheduled_jobs_say_why_they_wait(api, org, pipeline):
    build = build_at(pipeline, T0, pipeline_ir=flat(
        step("arm", agents={"queue": "arm64"}), step("d0", concurrency_group="deploy", concurrency=1),
        step("d1", concurrency_group="deploy", concurrency=1), step("free")))
    plain = make_agent(org, name="plain")
    stopped = tagged_agent(org, "stopped-arm", queue="arm64")
    Agent.objects.filter(pk=stopped.pk).update(stopped_at=timezone.now())
    lost = tagged_agent(org, "lost-arm", queue="arm64")
    Agent.objects.filter(pk=lost.pk).update(last_seen_at=timezone.now() - timedelta(hours=1))
    assert claimed_key(plain) == "d0"
    connect(plain)

    body = api.get(builds_url(pipeline, f"/{build.number}/jobs")).json()["data"]
    reasons = {job["step_key"]: job["waiting_reason"] for job in body}
    assert reasons == {"arm": "waiting for an agent with queue=arm64", "d0": None,
                       "d1": "waiting for concurrency group deploy (1 of 1 running)", "free": None}
    assert [job["agents"] for job in body][:2] == [{"queue": "arm64"}, {"queue": "default"}]
    assert (body[1]["concurrency_group"], body[1]["concurrency"]) == ("deploy", 1)
    one = api.get(builds_url(pipeline, f"/{build.number}/jobs/{Job.objects.get(step_key='arm').pk}")).json()
    assert one["waiting_reason"] == "waiting for an agent with queue=arm64"

    tagged_agent(org, "arm-now", queue="arm64")  # connected just now
    reasons = {job["step_key"]: job["waiting_reason"]
               for job in api.get(builds_url(pipeline, f"/{build.number}/jobs")).json()["data"]}
    assert reasons["arm"] is None


@pytest.mark.django_db
def test_the_build_page_shows_why_a_job_waits(client, owner, org, pipeline):
    build = build_at(pipeline, T0, pipeline_ir=flat(step("arm", agents={"queue": "arm64"})))
    client.force_login(owner)
    build.pipeline.organization = org
    page = client.get(build_url(build))
    assert page.status_code == 200
    assert "waiting for an agent with queue=arm64" in page.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("size", [3, 30])
def test_waiting_reasons_cost_two_queries_however_many_jobs_and_agents(api, owner, org, pipeline,
                                                                       django_assert_num_queries, size):
    build_at(pipeline, T0, pipeline_ir=flat(*[step(f"s{i}", concurrency_group=f"g{i % 3}", concurrency=1,
                                                   agents={"queue": f"q{i % 4}"}) for i in range(size)]))
    for i in range(size):
        tagged_agent(org, f"agent-{i}", queue=f"q{i % 2}")
    ApiToken.objects.filter(user=owner).update(last_used_at=timezone.now())
    # token, the build, its jobs, their edges, the agents' tag sets, the groups' live jobs
    with django_assert_num_queries(6):
        response = api.get(builds_url(pipeline, "/1/jobs"))
    assert response.status_code == 200
    reasons = {job["step_key"]: job["waiting_reason"] for job in response.json()["data"]}
    assert reasons["s0"] is None and reasons["s2"] == "waiting for an agent with queue=q2"


@pytest.mark.django_db
def test_another_organizations_agents_and_groups_dont_count(org, other_org, pipeline, other_pipeline):
    build = build_at(pipeline, T0, pipeline_ir=flat(step("arm", agents={"queue": "arm64"}),
                                                    step("d", concurrency_group="deploy", concurrency=1)))
    build_at(other_pipeline, T0, pipeline_ir=flat(step("theirs", concurrency_group="deploy", concurrency=1)))
    assert claimed_key(make_agent(other_org, name="theirs")) == "theirs"
    tagged_agent(other_org, "their-arm", queue="arm64")
    make_agent(org, name="ours")
    jobs = with_waiting_reasons(list(Job.objects.filter(build=build).order_by("position")),
                                organization_id=org.pk)
    assert [job.waiting_reason for job in jobs] == ["waiting for an agent with queue=arm64", None]


@pytest.mark.django_db
def test_a_job_handed_back_to_scheduled_can_be_claimed_again_into_its_place(org, pipeline):
    build_at(pipeline, T0, pipeline_ir=flat(step("d0", concurrency_group="g", concurrency=1),
                                            step("d1", concurrency_group="g", concurrency=1)))
    agent = make_agent(org, name="a")
    assert claimed_key(agent) == "d0"
    job = Job.objects.get(step_key="d0")
    # assigned → scheduled: an agent that vanished before starting hands its job back.
    assert states.transition_jobs([job.pk], to=J.SCHEDULED, now=timezone.now(), only_from=(J.ASSIGNED,)) == 1
    again = claimed_key(agent)
    assert claimed_key(agent) is None  # still one of the group at a time
    if is_postgres():
        # Its slot stays reserved for it while it waits again (d1 can't take it), and it takes it back.
        assert again == "d0"
        assert ConcurrencySlot.objects.get(group="g").holder_id == job.pk
    else:
        # SQLite counts live jobs: the handed-back job is newer now (scheduled again), d1 goes first.
        assert again == "d1"


def test_runagent_reads_tags_as_key_value_pairs():
    from builds.agent.runner import parse_tags

    assert parse_tags("queue=arm64, os=linux") == {"queue": "arm64", "os": "linux"}
    assert parse_tags("") == {}
    for bad in ("queue", "=x", "a=1,a=2"):
        with pytest.raises(ValueError):
            parse_tags(bad)


@pytest.mark.django_db
def test_the_agents_page_shows_each_agents_tags(client, owner, org):
    tagged_agent(org, "arm-box", queue="arm64", os="linux")
    make_agent(org, name="plain-box")
    client.force_login(owner)
    page = client.get(f"/orgs/{org.slug}/agents")
    assert page.status_code == 200
    html = page.content.decode()
    assert "queue=arm64, os=linux" in html  # the queue first, then by name, on either database
    assert "queue=default" in html  # an untagged agent's implied queue


@pytest.mark.django_db
def test_the_graph_form_takes_agents_and_concurrency_too(pipeline):
    ir = {"version": "0", "graph": {"nodes": [
        {"step": {"key": "a", "cmd": "true", "agents": {"queue": "arm64"}, "concurrency_group": "g",
                  "concurrency": 1}, "env": {}},
        {"step": {"key": "b", "cmd": "true", "agents": ["os=linux"]}, "env": {}}],
        "edges": [], "node_holes": [], "edge_property": "directed"}}
    build = make_build(pipeline, pipeline_ir=ir)
    rows = {key: (agents, group, limit) for key, agents, group, limit in Job.objects.filter(build=build)
            .values_list("step_key", "agents", "concurrency_group", "concurrency")}
    assert rows == {"a": ({"queue": "arm64"}, "g", 1), "b": ({"os": "linux", "queue": "default"}, None, None)}
