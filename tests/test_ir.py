"""The v0 IR parser/validator/planner (pipelines.ir).

Pure tests: no database. The happy paths use documents rendered by the real
`harmont` package, so a change in what the DSL emits shows up here first.
"""

from __future__ import annotations

import importlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from pipelines.ir import BASE_JOB_ENV, Plan, PlanError, load_ir, plan_ir
from tests.dsl import hm  # the PyPI DSL; our project package shadows the name `harmont`

# The DSL's global registry of @hm.pipeline functions (not re-exported by the package).
hm_registry = importlib.import_module(f"{hm.__name__}._registry")

KITCHEN_SINK = Path(__file__).parent / "fixtures" / "ir-graph-kitchen-sink.json"
WAIT = {"type": "wait"}


def graph_doc(*nodes: dict, edges: tuple = ()) -> dict[str, Any]:
    return {
        "version": "0",
        "graph": {
            "nodes": list(nodes),
            "edges": [list(edge) for edge in edges],
            "node_holes": [],
            "edge_property": "directed",
        },
    }


def node(key: str, *, node_env: dict | None = None, **step: Any) -> dict[str, Any]:
    return {"step": {"key": key, "cmd": f"run {key}", **step}, "env": node_env or {}}


def flat_doc(*steps: dict, **top: Any) -> dict[str, Any]:
    return {"version": "0", "steps": list(steps), **top}


def cmd(key: str, **fields: Any) -> dict[str, Any]:
    return {"type": "command", "key": key, "cmd": f"run {key}", **fields}


def shape(plan: Plan) -> list[tuple]:
    """The parts of a plan most tests care about: (key, builds_in, depends_on) per job."""
    return [(job.key, job.builds_in, job.depends_on) for job in plan.jobs]


def rejection(raw: Any) -> PlanError:
    with pytest.raises(PlanError) as info:
        plan_ir(raw)
    return info.value


@pytest.fixture
def empty_registry():
    """Give the test harmont's global pipeline registry to itself, then put it back."""
    saved = list(hm_registry.REGISTRATIONS)
    hm_registry.clear_registry()
    yield
    hm_registry.clear_registry()
    hm_registry.REGISTRATIONS.extend(saved)


# --- documents rendered by the harmont package ------------------------------


def test_harmont_chain_fork_wait_and_timeouts_plan_exactly():
    deps = hm.sh("make deps", key="deps")
    build = deps.sh("make build", key="build", env={"OPT": "2", "CI": "false"})
    test = build.fork().sh("make test", key="test")
    lint = build.fork().sh("make lint", key="lint")
    deploy = hm.timeout("30s", hm.sh("make deploy", key="deploy", image="alpine:3"))
    ir = hm.pipeline([test, lint, hm.wait(), deploy], env={"CI": "true"}, timeout="1h")

    plan = plan_ir(ir)

    assert plan.timeout_seconds == 3600
    assert [(job.index, job.key, job.command) for job in plan.jobs] == [
        (0, "deps", "make deps"),
        (1, "build", "make build"),
        (2, "test", "make test"),
        (3, "lint", "make lint"),
        (4, "deploy", "make deploy"),
    ]
    assert shape(plan) == [
        ("deps", None, ()),
        ("build", 0, (0,)),
        ("test", 1, (1,)),
        ("lint", 1, (1,)),
        # The wait orders deploy after everything before it, without a builds_in parent.
        ("deploy", None, (0, 1, 2, 3)),
    ]
    assert [job.timeout_seconds for job in plan.jobs] == [None, None, None, None, 30]
    # harmont stamps its default image on root steps only; children build in a snapshot.
    assert [job.image for job in plan.jobs] == ["ubuntu:24.04", None, None, None, "alpine:3"]
    assert plan.jobs[0].env == {**BASE_JOB_ENV, "CI": "true"}
    assert plan.jobs[1].env == {**BASE_JOB_ENV, "CI": "false", "OPT": "2"}


def test_harmont_labels_and_derived_keys_carry_through():
    ir = hm.pipeline([hm.sh("make docs", label=":book: Docs").sh("make publish")])

    plan = plan_ir(ir)

    assert [job.label for job in plan.jobs] == [":book: Docs", None]
    assert plan.jobs[0].key == "docs"
    # The unlabeled child gets harmont's 12-character hash key.
    assert len(plan.jobs[1].key) == 12
    assert shape(plan)[1][1:] == (0, (0,))


def test_harmont_json_string_and_bytes_plan_like_the_dict(tmp_path):
    ir = hm.pipeline([hm.sh("a", key="a").sh("b", key="b"), hm.wait(), hm.sh("c", key="c")])
    text = hm.pipeline_to_json(
        ir, pipeline_org="acme", pipeline_slug="ci", now=0, base_path=tmp_path, env={}
    )

    assert plan_ir(text) == plan_ir(text.encode()) == plan_ir(ir)
    assert shape(plan_ir(text)) == [("a", None, ()), ("b", 0, (0,)), ("c", None, (0, 1))]


def test_harmont_registry_envelope_definitions_plan(empty_registry, tmp_path):
    @hm.pipeline("ci", env={"CI": "true"}, timeout="20m")
    def ci():
        setup = hm.sh("apt-get update", key="setup", cache=hm.ttl(timedelta(days=1)))
        return (setup.sh("make test", key="test"), setup.sh("make lint", key="lint"))

    @hm.pipeline("nightly")
    def nightly():
        return hm.sh("make bench", key="bench")

    envelope = json.loads(
        hm.dump_registry_json(pipeline_org="acme", now=0, base_path=tmp_path, env={})
    )
    plans = {entry["slug"]: plan_ir(entry["definition"]) for entry in envelope["pipelines"]}

    assert set(plans) == {"ci", "nightly"}
    assert shape(plans["ci"]) == [("setup", None, ()), ("test", 0, (0,)), ("lint", 0, (0,))]
    assert plans["ci"].timeout_seconds == 1200
    assert all(job.env == {**BASE_JOB_ENV, "CI": "true"} for job in plans["ci"].jobs)
    # The cache policy passes through untouched, including harmont's resolved key.
    assert plans["ci"].jobs[0].cache["policy"] == "ttl"
    assert "key" in plans["ci"].jobs[0].cache
    assert shape(plans["nightly"]) == [("bench", None, ())]
    assert plans["nightly"].timeout_seconds is None
    # A definition stored as a JSON string plans the same as the object.
    definition = envelope["pipelines"][0]["definition"]
    assert plan_ir(json.dumps(definition)) == plans["ci"]


def test_kitchen_sink_fixture_is_accepted():
    plan = plan_ir(KITCHEN_SINK.read_bytes())

    assert len(plan.jobs) == 10
    assert [job.key for job in plan.jobs] == [
        "fdcc2fd62363", "verify", "build", "431f35b84318", "fmt",
        "c8d9fda86ff3", "uv-install", "uv-sync", "239c4926568b", "lint",
    ]  # fmt: skip
    builds_in_edges = {(job.builds_in, job.index) for job in plan.jobs if job.builds_in is not None}
    assert builds_in_edges == {(0, 1), (1, 2), (2, 3), (1, 4), (5, 6), (6, 7), (7, 8), (7, 9)}
    # Only builds_in edges in this document, so each job's prerequisites are its parent.
    assert all(
        job.depends_on == (() if job.builds_in is None else (job.builds_in,)) for job in plan.jobs
    )
    assert plan.timeout_seconds is None
    assert all(job.env["CI"] == "true" for job in plan.jobs)
    assert plan.jobs[2].cache == {"paths": ["infra/agent/CMakeLists.txt"], "policy": "on_change"}


# --- graph form, hand-written -----------------------------------------------


def test_graph_steps_are_reordered_when_the_document_order_is_not_a_dependency_order():
    doc = graph_doc(
        node("test"), node("build"), node("lint"),
        edges=((1, 0, "builds_in"), (1, 2, "depends_on")),
    )  # fmt: skip

    plan = plan_ir(doc)

    assert shape(plan) == [("build", None, ()), ("test", 0, (0,)), ("lint", None, (0,))]
    assert [job.index for job in plan.jobs] == [0, 1, 2]


def test_independent_steps_keep_the_document_order():
    doc = graph_doc(node("c"), node("a"), node("b"), edges=((2, 0, "depends_on"),))

    # "c" waits for "b", so the ready steps go first, in their own document order.
    assert [job.key for job in plan_ir(doc).jobs] == ["a", "b", "c"]
    assert [job.key for job in plan_ir(graph_doc(node("z"), node("y"), node("x"))).jobs] == [
        "z", "y", "x",
    ]  # fmt: skip


def test_duplicate_edges_collapse_and_both_kinds_count_as_prerequisites():
    doc = graph_doc(
        node("a"), node("b"), node("c"),
        edges=(
            (0, 2, "depends_on"), (0, 2, "depends_on"), (0, 2, "builds_in"),
            (1, 2, "depends_on"), (0, 2, "builds_in"),
        ),
    )  # fmt: skip

    assert shape(plan_ir(doc))[2] == ("c", 0, (0, 1))


def test_env_layers_merge_base_then_node_then_step_then_build():
    doc = graph_doc(
        node(
            "a",
            node_env={"TERM": "xterm", "LAYER": "node", "NODE": "1"},
            env={"LAYER": "step", "STEP": "1", "BUILD": "step"},
        )
    )

    job = plan_ir(doc, build_env={"BUILD": "build"}).jobs[0]

    assert job.env == {
        "DEBIAN_FRONTEND": "noninteractive",
        "TERM": "xterm",
        "LAYER": "step",
        "NODE": "1",
        "STEP": "1",
        "BUILD": "build",
    }


def test_build_env_overrides_step_env_in_both_forms():
    graph = graph_doc(node("a", node_env={"X": "node"}, env={"X": "step"}))
    flat = flat_doc(cmd("a", env={"X": "step"}), env={"X": "top"})

    for doc in (graph, flat):
        assert plan_ir(doc).jobs[0].env["X"] == "step"
        assert plan_ir(doc, build_env={"X": "build"}).jobs[0].env["X"] == "build"


def test_optional_step_fields_pass_through():
    doc = graph_doc(
        node(
            "a",
            label="A",
            image="debian:12",
            timeout_seconds=90,
            cache={"policy": "forever", "env_keys": []},
            runner="firecracker",
            runner_args={"cpus": 2},
        )
    )

    job = plan_ir(doc).jobs[0]

    assert (job.label, job.image, job.timeout_seconds) == ("A", "debian:12", 90)
    assert job.cache == {"policy": "forever", "env_keys": []}
    assert (job.runner, job.runner_args) == ("firecracker", {"cpus": 2})


def test_null_optional_fields_mean_absent():
    doc = graph_doc(node("a", label=None, image=None, env=None, timeout_seconds=None, cache=None))
    doc["timeout_seconds"] = None

    plan = plan_ir(doc)

    assert plan.timeout_seconds is None
    assert plan.jobs[0].label is None and plan.jobs[0].cache is None
    assert plan.jobs[0].env == BASE_JOB_ENV


def test_planned_jobs_do_not_alias_the_document():
    doc = graph_doc(node("a", cache={"policy": "forever", "env_keys": []}))

    job = plan_ir(doc).jobs[0]
    doc["graph"]["nodes"][0]["step"]["cache"]["env_keys"].append("LATER")

    assert job.cache == {"policy": "forever", "env_keys": []}


# --- flat form ----------------------------------------------------------------


def test_flat_steps_plan_with_builds_in_by_key():
    doc = flat_doc(cmd("setup"), cmd("build", builds_in="setup"), cmd("test", builds_in="build"))

    plan = plan_ir(doc)

    assert shape(plan) == [("setup", None, ()), ("build", 0, (0,)), ("test", 1, (1,))]
    assert [job.command for job in plan.jobs] == ["run setup", "run build", "run test"]


def test_wait_makes_later_steps_depend_on_earlier_ones():
    doc = flat_doc(cmd("a"), cmd("b"), WAIT, cmd("c"), cmd("d"), WAIT, cmd("e"))

    assert shape(plan_ir(doc)) == [
        ("a", None, ()),
        ("b", None, ()),
        ("c", None, (0, 1)),
        ("d", None, (0, 1)),
        # Only the steps since the previous wait; a and b are reached through c and d.
        ("e", None, (2, 3)),
    ]


def test_consecutive_waits_act_as_one_barrier():
    doc = flat_doc(cmd("a"), WAIT, WAIT, cmd("b"))

    assert shape(plan_ir(doc)) == [("a", None, ()), ("b", None, (0,))]


def test_leading_and_trailing_waits_add_no_dependencies():
    doc = flat_doc(WAIT, cmd("a"), cmd("b"), WAIT)

    assert shape(plan_ir(doc)) == [("a", None, ()), ("b", None, ())]


def test_flat_depends_on_may_name_a_later_step():
    doc = flat_doc(cmd("report", depends_on=["test", "lint"]), cmd("test"), cmd("lint"))

    assert shape(plan_ir(doc)) == [
        ("test", None, ()),
        ("lint", None, ()),
        ("report", None, (0, 1)),
    ]


def test_flat_builds_in_and_wait_combine():
    doc = flat_doc(cmd("a"), cmd("b"), WAIT, cmd("c", builds_in="a", depends_on=["a"]))

    assert shape(plan_ir(doc))[2] == ("c", 0, (0, 1))


def test_default_image_applies_only_to_steps_without_an_image():
    doc = flat_doc(cmd("a"), cmd("b", image="alpine:3"), default_image="ubuntu:24.04")

    assert [job.image for job in plan_ir(doc).jobs] == ["ubuntu:24.04", "alpine:3"]


def test_flat_top_level_env_sits_under_step_env():
    doc = flat_doc(cmd("a", env={"B": "step"}), cmd("b"), env={"A": "top", "B": "top"})

    plan = plan_ir(doc)

    assert plan.jobs[0].env == {**BASE_JOB_ENV, "A": "top", "B": "step"}
    assert plan.jobs[1].env == {**BASE_JOB_ENV, "A": "top", "B": "top"}


def test_flat_timeouts_are_read_at_both_levels():
    plan = plan_ir(flat_doc(cmd("a", timeout_seconds=60), cmd("b"), timeout_seconds=600))

    assert plan.timeout_seconds == 600
    assert [job.timeout_seconds for job in plan.jobs] == [60, None]


@pytest.mark.parametrize("step", [{"key": "a", "cmd": "make"}, {"type": None, "key": "a", "cmd": "make"}])
def test_flat_step_without_type_is_invalid_ir(step):
    error = rejection(flat_doc(cmd("first"), step))

    assert error.code == "invalid_ir"
    assert error.message == ("steps[1] has no 'type'; a flat step is {\"type\": \"command\", ...} or "
                             "{\"type\": \"wait\"}.")


# --- empty documents and input types ------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        {"version": "0"},
        {"version": "0", "steps": []},
        {"version": "0", "graph": {}},
        graph_doc(),
        flat_doc(WAIT, WAIT),
    ],
    ids=["version-only", "empty-steps", "empty-graph-object", "empty-graph", "only-waits"],
)
def test_documents_without_steps_plan_zero_jobs(doc):
    assert plan_ir(doc) == Plan(jobs=(), timeout_seconds=None)


def test_dict_str_and_bytes_inputs_plan_identically():
    doc = flat_doc(cmd("a"), WAIT, cmd("b"), env={"A": "1"}, timeout_seconds=5)
    text = json.dumps(doc)

    expected = plan_ir(doc)

    assert plan_ir(text) == expected
    assert plan_ir(text.encode()) == expected
    assert plan_ir(bytearray(text, "utf-8")) == expected


def test_load_ir_returns_the_decoded_object():
    assert load_ir('{"version": "0"}') == {"version": "0"}
    assert load_ir(b'{"version": "0"}') == {"version": "0"}
    doc = {"version": "0"}
    assert load_ir(doc) is doc


def test_plan_error_carries_code_and_message():
    error = rejection("[]")

    assert error.code == "invalid_json"
    assert str(error) == error.message
    assert error.args == ("invalid_json", error.message)


# --- rejected documents -------------------------------------------------------

TWO_NODES = (node("a"), node("b"))


def graph_with_edges(*edges: tuple) -> dict[str, Any]:
    return graph_doc(*TWO_NODES, node("c"), edges=edges)


# (document, expected code, fragments the message must contain to name the culprit)
REJECTIONS: dict[str, tuple[Any, str, list[str]]] = {
    "not-json": ("{version: 0", "invalid_json", ["not valid JSON"]),
    "empty-string": ("", "invalid_json", ["not valid JSON"]),
    "bytes-not-utf8": (b'{"version": "\xff"}', "invalid_json", ["not valid JSON"]),
    "json-array": ("[1, 2]", "invalid_json", ["JSON object", "[1, 2]"]),
    "json-string": ('"hello"', "invalid_json", ["JSON object"]),
    "python-list": ([{"version": "0"}], "invalid_json", ["JSON object"]),
    "too-deep": ("[" * 100_000, "invalid_json", ["not valid JSON"]),
    "missing-version": ({"steps": []}, "bad_version", ["'version'"]),
    "integer-version": ({"version": 0}, "bad_version", ["'version' 0"]),
    "future-version": ({"version": "1", "steps": []}, "bad_version", ['"1"']),
    "graph-and-steps": (
        {"version": "0", "graph": {}, "steps": []}, "invalid_ir", ["'graph' and 'steps'"],
    ),
    "graph-not-object": ({"version": "0", "graph": []}, "invalid_ir", ["'graph'"]),
    "nodes-not-array": ({"version": "0", "graph": {"nodes": {}}}, "invalid_ir", ["graph.nodes"]),
    "edges-not-array": ({"version": "0", "graph": {"edges": "x"}}, "invalid_ir", ["graph.edges"]),
    "steps-not-array": ({"version": "0", "steps": {"a": {}}}, "invalid_ir", ["'steps'"]),
    "node-without-step": (
        graph_doc(node("a"), {"env": {}}), "invalid_ir", ["graph.nodes[1]", "'step'"],
    ),
    "node-not-object": (graph_doc(node("a"), "b"), "invalid_ir", ["graph.nodes[1]"]),
    "flat-step-not-object": (flat_doc(cmd("a"), "wait"), "invalid_ir", ["steps[1]"]),
    "node-holes": (
        {"version": "0", "graph": {"nodes": [], "node_holes": [3]}},
        "invalid_ir",
        ["node_holes", "not supported"],
    ),
    "undirected-graph": (
        {"version": "0", "graph": {"edge_property": "undirected"}},
        "invalid_ir",
        ["edge_property", '"undirected"'],
    ),
    "edge-too-short": (graph_with_edges((0, 1)), "invalid_ir", ["graph.edges[0]", "[0, 1]"]),
    "edge-not-array": (
        {"version": "0", "graph": {"nodes": list(TWO_NODES), "edges": [[0, 1, "depends_on"], {}]}},
        "invalid_ir",
        ["graph.edges[1]", "{}"],
    ),
    "edge-unknown-kind": (
        graph_with_edges((0, 1, "needs")), "invalid_ir", ["graph.edges[0]", '"needs"'],
    ),
    "edge-out-of-range": (
        graph_with_edges((0, 1, "depends_on"), (0, 5, "depends_on")),
        "invalid_ir",
        ["graph.edges[1]", "node 5", "0 to 2"],
    ),
    "edge-negative-index": (
        graph_with_edges((-1, 1, "depends_on")), "invalid_ir", ["graph.edges[0]", "node -1"],
    ),
    "edge-boolean-index": (
        graph_with_edges((True, 2, "depends_on")),
        "invalid_ir",
        ["graph.edges[0]", "true", "node index"],
    ),
    "edge-float-index": (
        graph_with_edges((0, 1.0, "builds_in")),
        "invalid_ir",
        ["graph.edges[0]", "1.0", "node index"],
    ),
    "edge-in-empty-graph": (
        graph_doc(edges=((0, 1, "depends_on"),)), "invalid_ir", ["graph.edges[0]", "no nodes"],
    ),
    "self-edge": (
        graph_with_edges((1, 1, "depends_on")), "invalid_ir", ["graph.edges[0]", "'b'", "itself"],
    ),
    "two-builds-in-parents": (
        graph_with_edges((0, 2, "builds_in"), (1, 2, "builds_in")),
        "invalid_ir",
        ["graph.edges[1]", "'c'", "'a'", "'b'", "builds_in parent"],
    ),
    "node-env-value-not-string": (
        graph_doc(node("a", node_env={"PORT": 8080})), "invalid_ir", ["graph.nodes[0]", "'PORT'"],
    ),
    "step-env-value-not-string": (
        flat_doc(cmd("a"), cmd("b", env={"DEBUG": True})),
        "invalid_ir",
        ["steps[1] ('b')", "'DEBUG'", "strings"],
    ),
    "top-level-env-value-not-string": (
        flat_doc(cmd("a"), env={"N": None}), "invalid_ir", ["top-level 'env'", "'N'"],
    ),
    "env-not-object": (flat_doc(cmd("a", env=["A=1"])), "invalid_ir", ["steps[0] ('a') 'env'"]),
    "zero-pipeline-timeout": (
        flat_doc(cmd("a"), timeout_seconds=0), "invalid_ir", ["top-level 'timeout_seconds'", "0"],
    ),
    "string-pipeline-timeout": (
        flat_doc(cmd("a"), timeout_seconds="30s"), "invalid_ir", ["'timeout_seconds'", '"30s"'],
    ),
    "boolean-pipeline-timeout": (
        {"version": "0", "timeout_seconds": True}, "invalid_ir", ["'timeout_seconds'", "true"],
    ),
    "negative-step-timeout": (
        graph_doc(node("a"), node("b", timeout_seconds=-5)),
        "invalid_ir",
        ["graph.nodes[1].step ('b')", "'timeout_seconds'", "-5"],
    ),
    "fractional-step-timeout": (
        flat_doc(cmd("a", timeout_seconds=1.5)), "invalid_ir", ["steps[0] ('a')", "1.5"],
    ),
    "label-not-string": (flat_doc(cmd("a", label=7)), "invalid_ir", ["steps[0] ('a') 'label'"]),
    "cache-not-object": (
        graph_doc(node("a", cache="forever")), "invalid_ir", ["'cache'", '"forever"'],
    ),
    "builds-in-not-key": (
        flat_doc(cmd("a"), cmd("b", builds_in=0)), "invalid_ir", ["steps[1] ('b') 'builds_in'"],
    ),
    "depends-on-not-list": (
        flat_doc(cmd("a"), cmd("b", depends_on="a")), "invalid_ir", ["steps[1] ('b')"],
    ),
    "flat-self-reference": (
        flat_doc(cmd("a", depends_on=["a"])), "invalid_ir", ["steps[0] ('a')", "itself"],
    ),
    "graph-missing-cmd": (
        graph_doc(node("a"), {"step": {"key": "b"}, "env": {}}),
        "missing_field",
        ["graph.nodes[1].step ('b')", "'cmd'"],
    ),
    "graph-missing-key": (
        graph_doc({"step": {"cmd": "make"}, "env": {}}),
        "missing_field",
        ["graph.nodes[0].step", "'key'"],
    ),
    "empty-cmd": (flat_doc(cmd("a", cmd="")), "missing_field", ["steps[0] ('a')", "'cmd'"]),
    "cmd-not-string": (
        flat_doc(cmd("a", cmd=["make"])), "missing_field", ["steps[0] ('a')", "'cmd'", '["make"]'],
    ),
    "flat-untyped-step": (flat_doc(cmd("a"), {"key": "b"}), "invalid_ir", ["steps[1]", "'type'"]),
    "unknown-step-type": (
        flat_doc(cmd("a"), {"type": "trigger", "pipeline": "deploy"}),
        "unknown_step_type",
        ["steps[1]", '"trigger"'],
    ),
    "graph-duplicate-key": (
        graph_doc(node("build"), node("test"), node("build")),
        "duplicate_key",
        ["graph.nodes[2]", "graph.nodes[0]", "'build'"],
    ),
    "flat-duplicate-key": (
        flat_doc(cmd("a"), WAIT, cmd("a")), "duplicate_key", ["steps[2]", "steps[0]", "'a'"],
    ),
    "unknown-builds-in": (
        flat_doc(cmd("a", builds_in="ghost")),
        "unknown_dependency",
        ["steps[0] ('a')", "builds_in", "'ghost'"],
    ),
    "unknown-depends-on": (
        flat_doc(cmd("a"), cmd("b", depends_on=["a", "gohst"])),
        "unknown_dependency",
        ["steps[1] ('b')", "depends_on", "'gohst'"],
    ),
    "graph-cycle": (
        graph_with_edges((0, 1, "builds_in"), (1, 2, "depends_on"), (2, 0, "depends_on")),
        "cycle",
        ["a -> b -> c -> a"],
    ),
    "graph-two-step-cycle-across-edge-kinds": (
        graph_with_edges((2, 1, "builds_in"), (1, 2, "depends_on")), "cycle", ["b -> c -> b"],
    ),
    "flat-cycle": (
        flat_doc(cmd("a", depends_on=["b"]), cmd("b", builds_in="a")), "cycle", ["a -> b -> a"],
    ),
}


@pytest.mark.parametrize(("raw", "code", "fragments"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_broken_documents_are_rejected_with_a_code_and_the_culprit_named(raw, code, fragments):
    error = rejection(raw)

    assert error.code == code, error.message
    for fragment in fragments:
        assert fragment in error.message


def test_cycle_message_names_only_the_steps_on_the_loop():
    doc = graph_doc(
        node("root"), node("a"), node("b"), node("after"),
        edges=((0, 1, "builds_in"), (1, 2, "depends_on"), (2, 1, "depends_on"),
               (2, 3, "builds_in")),
    )  # fmt: skip

    error = rejection(doc)

    assert error.code == "cycle"
    assert "a -> b -> a" in error.message
    assert "root" not in error.message and "after" not in error.message


def test_the_first_problem_in_document_order_wins():
    # The missing cmd comes before the bad edge and the duplicate key after it.
    doc = graph_doc(
        node("a"), {"step": {"key": "b"}}, node("a"), edges=((0, 9, "depends_on"),),
    )  # fmt: skip
    assert rejection(doc).code == "missing_field"

    # Version is checked before anything else in the document.
    assert rejection({"version": "2", "graph": "nonsense"}).code == "bad_version"

    # Duplicate keys are found while reading steps, before references are resolved.
    flat = flat_doc(cmd("a", depends_on=["ghost"]), cmd("a"))
    assert rejection(flat).code == "duplicate_key"
