"""Step caches: keys, hits decided at planning, cached jobs passed by the settle, scope, TTL, eviction."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from builds import services
from builds.models import Build, BuildState, CacheEntry, Job, JobState, LogChunk, SecretAccess
from builds.services import caches
from builds.services.job_specs import job_spec
from builds.sql import claimed_job
from pipelines.cache_keys import StepCache, step_cache
from tests.dsl import hm
from tests.helpers import build_at, make_build, run_job

J = JobState
FOREVER = {"policy": "forever", "env_keys": []}


def node(key: str, cmd: str, cache: dict | None = None, image: str | None = "ubuntu:24.04") -> dict[str, Any]:
    step: dict[str, Any] = {"key": key, "cmd": cmd}
    if cache is not None:
        step["cache"] = cache
    if image is not None:
        step["image"] = image
    return {"step": step, "env": {}}


def graph(nodes: list[dict[str, Any]], edges: list[list[Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {"version": "0", "graph": {"nodes": nodes, "edges": [list(e) for e in edges], "node_holes": [],
                                      "edge_property": "directed"}}


def setup_ir(cache: dict | None = None, *, command: str = "apt-get install -y tool") -> dict[str, Any]:
    """setup (cached) -builds_in-> test, and lint on its own."""
    return graph([node("setup", command, cache or FOREVER), node("test", "make test", image=None),
                  node("lint", "make lint")], [[0, 1, "builds_in"]])


def jobs_of(build: Build) -> dict[str, Job]:
    return {job.step_key: job for job in Job.objects.filter(build=build, retried=False)}


def store_files(job: Job, *, workspace: bytes = b"w" * 100, snapshot: bytes | None = b"s" * 900) -> None:
    names = {"workspace_archive": default_storage.save(f"workspaces/{job.pk}.tar.gz", ContentFile(workspace))}
    if snapshot is not None:
        names["snapshot_image"] = default_storage.save(f"snapshots/{job.pk}.tar", ContentFile(snapshot))
    Job.objects.filter(pk=job.pk).update(**names)


def run_whole_build(build: Build) -> None:
    """Run every job of the build that agents would take, in order, passing; cached steps store their files."""
    while True:
        scheduled = list(Job.objects.filter(build=build, state=J.SCHEDULED).order_by("position"))
        if not scheduled:
            break
        for job in scheduled:
            assert services.move_job(job=job, state=J.ASSIGNED)
            assert services.move_job(job=job, state=J.RUNNING)
            if job.cache_key:
                store_files(job)
            job.refresh_from_db()
            assert services.finish_job(job=job, state=J.PASSED, exit_code=0)


@pytest.fixture(autouse=True)
def _storage(settings: Any, tmp_path: Any) -> None:
    settings.MEDIA_ROOT = tmp_path / "media"


# ------------------------------------------------------------------ the key (pure)


def key(cache: Any = FOREVER, *, command: str = "make", image: str | None = "img", env: dict | None = None,
        parent: StepCache | None = None, has_parent: bool = False, now: int = 1_700_000_000) -> StepCache | None:
    return step_cache(cache, command=command, image=image, env=env or {"A": "1"}, parent=parent,
                      has_parent=has_parent, now=now)


def test_steps_without_a_policy_or_with_none_or_an_unknown_one_are_not_cached():
    assert key(None) is None
    assert key({"policy": "none"}) is None
    assert key({"policy": "sometimes"}) is None
    assert key("forever") is None
    assert key({"policy": "ttl", "duration_seconds": "a day"}) is None
    assert key({"policy": "ttl", "duration_seconds": 0}) is None


def test_the_key_covers_command_image_env_and_parent():
    base = key()
    assert base is not None and len(base.key) == 64 and base.max_age_seconds is None
    assert key() == base
    others = [key(command="make all"), key(image="other"), key(image=None), key(env={"A": "2"}),
              key(parent=StepCache("f" * 64, None), has_parent=True)]
    assert len({base.key, *(other.key for other in others if other)}) == 6


def test_the_dsls_key_is_taken_and_on_change_needs_it():
    assert key({"policy": "on_change", "paths": ["deps.txt"]}) is None
    with_key = key({"policy": "on_change", "paths": ["deps.txt"], "key": "a" * 64})
    other = key({"policy": "on_change", "paths": ["deps.txt"], "key": "b" * 64})
    assert with_key is not None and other is not None and with_key.key != other.key


def test_a_ttl_resolved_here_changes_with_its_window_and_bounds_the_entries_age():
    day = {"policy": "ttl", "duration_seconds": 86400, "env_keys": []}
    morning, evening, tomorrow = key(day, now=86400 * 100 + 10), key(day, now=86400 * 100 + 80000), key(
        day, now=86400 * 101 + 10)
    assert morning == evening and morning.key != tomorrow.key
    assert morning.max_age_seconds == 86400
    composed = {"policy": "compose", "sub_policies": [day, {"policy": "ttl", "duration_seconds": 3600}]}
    assert key(composed).max_age_seconds == 3600
    assert key({"policy": "compose", "sub_policies": [day, {"policy": "on_change", "paths": ["x"]}]}) is None


def test_env_keys_of_forever_pick_what_the_policy_part_sees():
    picky = {"policy": "forever", "env_keys": ["TOOL"]}
    assert key(picky, env={"TOOL": "1"}) != key(picky, env={"TOOL": "2"})


def test_a_child_of_an_uncached_parent_is_not_cached():
    assert key(has_parent=True, parent=None) is None


# ------------------------------------------------------------------ misses, entries, hits


@pytest.mark.django_db
def test_a_cached_step_runs_the_first_time_and_its_pass_makes_an_entry(pipeline):
    first = make_build(pipeline, pipeline_ir=setup_ir())
    jobs = jobs_of(first)
    assert jobs["setup"].cache_key and jobs["test"].cache_key is None and jobs["lint"].cache_key is None
    assert jobs["setup"].state == J.SCHEDULED and jobs["setup"].reused_job_id is None
    run_whole_build(first)
    entry = CacheEntry.objects.get()
    assert (entry.pipeline_id, entry.step_key, entry.key, entry.branch, entry.secret_access, entry.job_id,
            entry.size_bytes, entry.hits) == (pipeline.pk, "setup", jobs["setup"].cache_key, "main",
                                              first.secret_access, jobs["setup"].pk, 1000, 0)


@pytest.mark.django_db
def test_a_miss_asks_its_agent_for_its_workspace_and_snapshot_even_without_children(pipeline):
    build = make_build(pipeline, pipeline_ir=graph([node("alone", "make", FOREVER), node("plain", "make")]))
    jobs = jobs_of(build)
    cached, plain = job_spec(claimed_job(jobs["alone"].pk)), job_spec(claimed_job(jobs["plain"].pk))
    assert cached["upload_workspace"] is True and cached["snapshot_upload"]["path"].endswith("/snapshot")
    assert plain["upload_workspace"] is False and plain["snapshot_upload"] is None


@pytest.mark.django_db
def test_the_next_build_reuses_the_passed_job_without_an_agent(pipeline):
    first = make_build(pipeline, pipeline_ir=setup_ir())
    run_whole_build(first)
    original = jobs_of(first)["setup"]

    second = make_build(pipeline, pipeline_ir=setup_ir())
    jobs = jobs_of(second)
    setup = jobs["setup"]
    assert (setup.state, setup.reused_job_id, setup.exit_code, setup.agent_id, setup.assigned_at) == (
        J.PASSED, original.pk, 0, None, None)
    assert setup.started_at == setup.finished_at is not None
    # Its builds_in child does not wait: it is scheduled at once, and starts from what the reused job left.
    assert jobs["test"].state == J.SCHEDULED and jobs["lint"].state == J.SCHEDULED
    [line] = LogChunk.objects.filter(job=setup)
    assert line.stream_kind == 2 and f"reuses job {original.pk} of build #{first.number}" in line.content
    assert setup.log_bytes == len(line.content.encode())
    entry = CacheEntry.objects.get()
    assert entry.hits == 1 and entry.last_used_at >= entry.created_at
    spec = job_spec(claimed_job(jobs["test"].pk))
    assert spec["parent_snapshot"]["job_id"] == str(original.pk)


@pytest.mark.django_db
def test_a_child_of_a_hit_downloads_the_reused_jobs_workspace_and_snapshot(pipeline, session):
    from tests.helpers import claim
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    original = CacheEntry.objects.get().job
    second = make_build(pipeline, pipeline_ir=graph([node("setup", "apt-get install -y tool", FOREVER),
                                                     node("test", "make test", image=None)], [[0, 1, "builds_in"]]))
    spec, job_client = claim(session)
    assert spec["step_key"] == "test" and spec["build_id"] == str(second.pk)
    assert spec["parent_snapshot"]["job_id"] == str(original.pk)
    workspace = job_client.get(spec["parent_workspace_path"])
    snapshot = job_client.get(spec["parent_snapshot"]["path"])
    assert workspace.status_code == 200 and b"".join(workspace.streaming_content) == b"w" * 100
    assert snapshot.status_code == 200 and b"".join(snapshot.streaming_content) == b"s" * 900


@pytest.mark.django_db
def test_a_build_of_cached_steps_only_passes_at_create(pipeline):
    ir = graph([node("a", "make a", FOREVER), node("b", "make b", FOREVER)], [[0, 1, "builds_in"]])
    run_whole_build(make_build(pipeline, pipeline_ir=ir))
    again = make_build(pipeline, pipeline_ir=ir)
    again.refresh_from_db()
    assert again.state == BuildState.PASSED and again.finished_at is not None and again.started_at is not None
    assert set(jobs_of(again)[k].state for k in "ab") == {J.PASSED}
    assert again.reuses_jobs


@pytest.mark.django_db
def test_a_changed_command_image_or_env_runs_again(pipeline):
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    changed = make_build(pipeline, pipeline_ir=setup_ir(command="apt-get install -y tool other"))
    assert jobs_of(changed)["setup"].state == J.SCHEDULED
    with_env = make_build(pipeline, pipeline_ir=setup_ir(), env={"EXTRA": "1"})
    assert jobs_of(with_env)["setup"].state == J.SCHEDULED
    image = setup_ir()
    image["graph"]["nodes"][0]["step"]["image"] = "debian:12"
    assert jobs_of(make_build(pipeline, pipeline_ir=image))["setup"].state == J.SCHEDULED


@pytest.mark.django_db
def test_a_hit_whose_parent_runs_passes_when_the_parent_passes_and_is_never_claimed(pipeline):
    ir = graph([node("a", "make a", FOREVER), node("b", "make b", FOREVER), node("c", "make c", image=None)],
               [[0, 1, "builds_in"], [1, 2, "builds_in"]])
    run_whole_build(make_build(pipeline, pipeline_ir=ir))
    first_b = CacheEntry.objects.get(step_key="b").job_id
    CacheEntry.objects.filter(step_key="a").delete()

    build = make_build(pipeline, pipeline_ir=ir)
    jobs = jobs_of(build)
    assert jobs["a"].state == J.SCHEDULED
    assert (jobs["b"].state, jobs["b"].reused_job_id) == (J.PENDING, first_b)
    assert jobs["c"].state == J.PENDING
    run_job(jobs["a"])
    jobs = jobs_of(build)
    assert jobs["b"].state == J.PASSED and jobs["b"].agent_id is None
    assert jobs["c"].state == J.SCHEDULED
    assert job_spec(claimed_job(jobs["c"].pk))["parent_snapshot"]["job_id"] == str(first_b)


@pytest.mark.django_db
def test_a_held_build_keeps_its_cached_roots_until_approved(pipeline, owner):
    from builds.services.builds import validate_build_request
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    request = validate_build_request(branch="main", commit="abc123", pipeline_ir=setup_ir())
    held = services.create_build(pipeline=pipeline, request=request, held=True)
    jobs = jobs_of(held)
    assert jobs["setup"].state == J.HELD and jobs["setup"].reused_job_id is not None
    services.approve_build(build=held, approved_by=owner)
    jobs = jobs_of(held)
    assert (jobs["setup"].state, jobs["test"].state, jobs["lint"].state) == (J.PASSED, J.SCHEDULED, J.SCHEDULED)


@pytest.mark.django_db
def test_a_canceled_build_cancels_its_waiting_cached_jobs(pipeline):
    ir = graph([node("a", "make a"), node("b", "make b", FOREVER)], [[0, 1, "depends_on"]])
    run_whole_build(make_build(pipeline, pipeline_ir=ir))
    build = make_build(pipeline, pipeline_ir=ir)
    assert jobs_of(build)["b"].state == J.PENDING and jobs_of(build)["b"].reused_job_id
    services.cancel_build(build=build)
    assert jobs_of(build)["b"].state == J.CANCELED


# ------------------------------------------------------------------ scope


@pytest.mark.django_db
def test_a_branch_reads_its_own_entries_and_the_default_branchs_but_not_other_branches(pipeline):
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir(), branch="feature-a"))
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir(), branch="feature-b"))["setup"].state == J.SCHEDULED
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir(), branch="main"))["setup"].state == J.SCHEDULED
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir(), branch="feature-a"))["setup"].state == J.PASSED

    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir(command="other"), branch="main"))
    on_feature = make_build(pipeline, pipeline_ir=setup_ir(command="other"), branch="feature-c")
    assert jobs_of(on_feature)["setup"].state == J.PASSED


@pytest.mark.django_db
def test_the_own_branchs_entry_wins_over_the_default_branchs(pipeline):
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir(), branch="main"))
    # The feature branch's own miss (its entries are its own): made directly, as a run would.
    feature = make_build(pipeline, pipeline_ir=setup_ir(), branch="feature")
    assert jobs_of(feature)["setup"].reused_job_id == CacheEntry.objects.get(branch="main").job_id
    job = jobs_of(feature)["setup"]
    CacheEntry.objects.create(organization_id=pipeline.organization_id, pipeline=pipeline, step_key="setup",
                              key=job.cache_key, branch="feature", secret_access=feature.secret_access,
                              job=jobs_of(feature)["lint"], size_bytes=1)
    again = make_build(pipeline, pipeline_ir=setup_ir(), branch="feature")
    assert jobs_of(again)["setup"].reused_job_id == jobs_of(feature)["lint"].pk


@pytest.mark.django_db
def test_entries_are_read_only_by_builds_with_the_same_secret_access(pipeline):
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    entry = CacheEntry.objects.get()
    other = SecretAccess.ALL if entry.secret_access != SecretAccess.ALL else SecretAccess.UNPROTECTED
    CacheEntry.objects.filter(pk=entry.pk).update(secret_access=other)
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir()))["setup"].state == J.SCHEDULED


@pytest.mark.django_db
def test_a_fork_build_neither_reads_nor_writes_entries(pipeline):
    from builds.services.builds import validate_build_request
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    request = validate_build_request(branch="main", commit="abc123", pipeline_ir=setup_ir())
    fork = services.create_build(pipeline=pipeline, request=request, fork=True)
    jobs = jobs_of(fork)
    assert jobs["setup"].state == J.SCHEDULED and jobs["setup"].cache_key is None
    run_whole_build(fork)
    assert CacheEntry.objects.count() == 1


@pytest.mark.django_db
def test_an_entry_older_than_its_ttl_is_not_reused_even_with_the_same_dsl_key(pipeline):
    ttl = {"policy": "ttl", "duration_seconds": 3600, "env_keys": [], "key": "c" * 64}  # baked into a definition
    now = timezone.now()
    run_whole_build(build_at(pipeline, now - timedelta(hours=2), pipeline_ir=setup_ir(ttl)))
    CacheEntry.objects.update(created_at=now - timedelta(hours=2))
    assert jobs_of(build_at(pipeline, now, pipeline_ir=setup_ir(ttl)))["setup"].state == J.SCHEDULED
    CacheEntry.objects.update(created_at=now - timedelta(minutes=30))
    assert jobs_of(build_at(pipeline, now, pipeline_ir=setup_ir(ttl)))["setup"].state == J.PASSED


@pytest.mark.django_db
def test_a_dsl_rendered_on_change_key_hits_and_a_changed_file_misses(pipeline, tmp_path):
    from tests.dsl import render_with_keys
    (tmp_path / "deps.txt").write_text("one\n")

    def rendered() -> dict[str, Any]:
        setup = hm.sh("install", key="setup", cache=hm.on_change("deps.txt"))
        return render_with_keys(hm.pipeline([setup.sh("make test", key="test")]), base_path=tmp_path)

    first = rendered()
    assert first["graph"]["nodes"][0]["step"]["cache"]["key"]
    run_whole_build(make_build(pipeline, pipeline_ir=first))
    assert jobs_of(make_build(pipeline, pipeline_ir=rendered()))["setup"].state == J.PASSED
    (tmp_path / "deps.txt").write_text("two\n")
    assert jobs_of(make_build(pipeline, pipeline_ir=rendered()))["setup"].state == J.SCHEDULED


@pytest.mark.django_db
def test_two_passes_with_one_key_keep_one_entry_the_latest(pipeline):
    first, second = make_build(pipeline, pipeline_ir=setup_ir()), make_build(pipeline, pipeline_ir=setup_ir())
    run_whole_build(first)
    run_whole_build(second)  # planned before the first passed: a miss too
    entry = CacheEntry.objects.get()
    assert entry.job_id == jobs_of(second)["setup"].pk


# ------------------------------------------------------------------ the limit


@pytest.mark.django_db
def test_past_the_limit_the_least_recently_used_entries_go_with_their_files(pipeline, settings,
                                                                            django_capture_on_commit_callbacks):
    settings.CACHE_MAX_BYTES = 2500  # two entries of 1000 bytes fit, not three
    builds = []
    for command in ("one", "two"):
        builds.append(make_build(pipeline, pipeline_ir=setup_ir(command=command)))
        run_whole_build(builds[-1])
    # "one" is used again, so "two" is now the least recently used.
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir(command="one")))["setup"].state == J.PASSED
    two = jobs_of(builds[1])["setup"]
    workspace, snapshot = two.workspace_archive.name, two.snapshot_image.name
    with django_capture_on_commit_callbacks(execute=True):
        run_whole_build(make_build(pipeline, pipeline_ir=setup_ir(command="three")))
    assert sorted(CacheEntry.objects.values_list("job__command", flat=True)) == ["one", "three"]
    two.refresh_from_db()
    assert not two.workspace_archive and not two.snapshot_image
    assert not default_storage.exists(workspace) and not default_storage.exists(snapshot)


@pytest.mark.django_db
def test_an_evicted_entrys_files_stay_while_a_waiting_hit_still_needs_them(pipeline, settings):
    ir = graph([node("a", "make a"), node("b", "make b", FOREVER), node("c", "make c", image=None)],
               [[0, 1, "depends_on"], [1, 2, "builds_in"]])
    run_whole_build(make_build(pipeline, pipeline_ir=ir))
    entry = CacheEntry.objects.get()
    waiting = make_build(pipeline, pipeline_ir=ir)
    assert jobs_of(waiting)["b"].reused_job_id == entry.job_id and jobs_of(waiting)["b"].state == J.PENDING
    caches.evict_over_limit(organization_id=pipeline.organization_id, limit=0)
    assert not CacheEntry.objects.exists()
    kept = Job.objects.get(pk=entry.job_id)
    assert kept.workspace_archive and default_storage.exists(kept.workspace_archive.name)


# ------------------------------------------------------------------ cost


def wide_ir(cached: int) -> dict[str, Any]:
    nodes = [node(f"s{i}", f"make s{i}", FOREVER) for i in range(cached)]
    nodes += [node(f"t{i}", f"make t{i}", image=None) for i in range(cached)]
    return graph(nodes, [[i, cached + i, "builds_in"] for i in range(cached)])


@pytest.mark.django_db
@pytest.mark.parametrize("cached", [2, 10])
def test_creating_a_build_with_hits_costs_the_same_queries_for_2_and_10_cached_steps(
        pipeline, cached, django_assert_num_queries):
    run_whole_build(make_build(pipeline, pipeline_ir=wide_ir(cached)))
    from builds.services.builds import validate_build_request
    request = validate_build_request(branch="main", commit="abc123", pipeline_ir=copy.deepcopy(wide_ir(cached)))
    with django_assert_num_queries(QUERIES_FOR_A_BUILD_WITH_HITS):
        build = services.create_build(pipeline=pipeline, request=request)
    assert {job.state for job in jobs_of(build).values() if job.step_key.startswith("s")} == {J.PASSED}


# The insert as without caches (savepoint, counter, its read, build, jobs, edges, build.created's one
# read of who hears of it, release), plus the entries (1), the hits' log lines and counts (2), and the
# settle that passes the hits: jobs, edges, the pass, its job.finished check, the children's schedule,
# the build's start and build.started (two), the roll-up. However many steps are cached.
QUERIES_FOR_A_BUILD_WITH_HITS = 19


@pytest.mark.django_db
def test_a_rendered_pipelines_hits_pass_once_the_render_job_passes(org, session):
    from pipelines import services as pipeline_services
    from tests.helpers import claim, finish, job_url, start
    repo = pipeline_services.create_pipeline(org=org, name="Site", repository="file:///srv/git/site.git",
                                             default_branch="main", source_slug="ci")
    rendered = setup_ir()
    run_whole_build(make_build(repo, pipeline_ir=rendered))
    original = CacheEntry.objects.get().job_id

    build = make_build(repo)  # no IR: a render job first
    spec, job_client = claim(session)
    start(job_client, spec["id"])
    assert job_client.post(job_url(spec["id"], "pipeline"), {"pipeline_ir": rendered}, format="json").json() == {
        "jobs": 3}
    jobs = jobs_of(build)
    assert (jobs["setup"].state, jobs["setup"].reused_job_id) == (J.PENDING, original)
    assert finish(job_client, spec["id"], exit_code=0).status_code == 200
    jobs = jobs_of(build)
    assert (jobs["setup"].state, jobs["test"].state, jobs["lint"].state) == (J.PASSED, J.SCHEDULED, J.SCHEDULED)


@pytest.mark.django_db
def test_the_build_page_marks_a_cached_job(pipeline, owner):
    from django.test import Client
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    build = make_build(pipeline, pipeline_ir=setup_ir())
    client = Client()
    client.force_login(owner)
    page = client.get(f"/orgs/{pipeline.organization.slug}/pipelines/{pipeline.slug}/builds/{build.number}").content
    setup, lint = jobs_of(build)["setup"], jobs_of(build)["lint"]
    head, _, rest = page.decode().partition(f'id="job-{setup.pk}"')
    own, _, _ = rest.partition('<li class="job')
    assert "data-job-cached" in own and f"reuses job {setup.reused_job_id}" in own
    assert "data-job-cached" not in page.decode().partition(f'id="job-{lint.pk}"')[2].partition('<li class="job')[0]


@pytest.mark.django_db
def test_deleting_an_entry_in_the_admin_frees_its_jobs_files(pipeline, django_capture_on_commit_callbacks):
    from django.test import Client
    from organizations.models import User
    run_whole_build(make_build(pipeline, pipeline_ir=setup_ir()))
    entry = CacheEntry.objects.get()
    name = entry.job.workspace_archive.name
    client = Client()
    client.force_login(User.objects.create_superuser("ops@example.com", "a-long-passphrase"))
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(f"/admin/builds/cacheentry/{entry.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not CacheEntry.objects.exists() and not default_storage.exists(name)
    assert jobs_of(make_build(pipeline, pipeline_ir=setup_ir()))["setup"].state == J.SCHEDULED
