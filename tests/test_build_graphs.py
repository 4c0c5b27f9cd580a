"""The build page's job graph and timeline (builds.graphs): where nodes, edges and bars go."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone

from builds import graphs
from builds.graphs import JobFacts

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=dt_timezone.utc)


def facts(key: str, position: int, *, edges: dict[str, str] | None = None, after: tuple[str, ...] = (),
          segment: int | None = None, after_segment: int | None = None, state: str = "passed",
          times: tuple[float | None, float | None, float | None] = (None, None, None), label: str = "") -> JobFacts:
    at = [None if t is None else T0 + timedelta(seconds=t) for t in times]
    edges = edges or {}
    return JobFacts(id=f"id-{key}", key=key, label=label or key, state=state, position=position, edges=edges,
                    prerequisites=tuple(dict.fromkeys([*edges, *after])), segment=segment,
                    after_segment=after_segment, scheduled_at=at[0], started_at=at[1], finished_at=at[2])


def by_id(graph: graphs.Graph) -> dict[str, graphs.Node]:
    return {node.id: node for node in graph.nodes}


def test_a_chain_goes_left_to_right_one_layer_per_step() -> None:
    graph = graphs.job_graph([facts("a", 0), facts("b", 1, edges={"a": "builds_in"}),
                              facts("c", 2, edges={"b": "depends_on"})])

    nodes = by_id(graph)
    assert [nodes[f"id-{k}"].layer for k in "abc"] == [0, 1, 2]
    assert nodes["id-a"].x < nodes["id-b"].x < nodes["id-c"].x
    assert nodes["id-a"].y == nodes["id-b"].y == nodes["id-c"].y
    assert [edge.kind for edge in graph.edges] == ["builds_in", "depends_on"]
    # Each edge leaves its source's right side and enters its target's left side.
    a, b = nodes["id-a"], nodes["id-b"]
    assert graph.edges[0].path.startswith(f"M{a.x + a.w},{a.y + a.h // 2} ")
    assert graph.edges[0].path.endswith(f" {b.x},{b.y + b.h // 2}")
    assert graph.width == nodes["id-c"].x + nodes["id-c"].w + graphs.PAD


def test_a_fan_out_and_in_shares_a_layer_and_the_join_sits_between() -> None:
    graph = graphs.job_graph([facts("a", 0), facts("b", 1, edges={"a": "builds_in"}),
                              facts("c", 2, edges={"a": "builds_in"}),
                              facts("d", 3, edges={"b": "depends_on", "c": "depends_on"})])

    nodes = by_id(graph)
    assert (nodes["id-b"].layer, nodes["id-c"].layer, nodes["id-d"].layer) == (1, 1, 2)
    assert nodes["id-b"].y < nodes["id-c"].y
    assert nodes["id-b"].y < nodes["id-d"].y < nodes["id-c"].y
    assert len(graph.edges) == 4


def test_a_wait_is_one_node_between_the_jobs_before_and_after_it() -> None:
    before = [facts(f"s{i}", i, segment=0) for i in range(3)]
    after = [facts(f"t{i}", 3 + i, after_segment=0, after=("s0", "s1", "s2")) for i in range(3)]

    graph = graphs.job_graph([*before, *after])

    nodes = by_id(graph)
    wait = nodes["wait-0"]
    assert wait.is_wait and wait.layer == 1
    assert all(nodes[f"id-t{i}"].layer == 2 for i in range(3))
    # 3 into the wait and 3 out of it, not 3 × 3 between the jobs.
    assert len(graph.edges) == 6 and {edge.kind for edge in graph.edges} == {"wait"}


def test_order_edges_another_path_implies_are_not_drawn_but_builds_in_edges_are() -> None:
    # deploy waits for all three (as a wait's steps do); c builds in a's files directly too.
    graph = graphs.job_graph([
        facts("a", 0), facts("b", 1, edges={"a": "builds_in"}), facts("c", 2, edges={"b": "builds_in", "a": "builds_in"}),
        facts("deploy", 3, edges={"a": "depends_on", "b": "depends_on", "c": "depends_on"}),
    ])

    nodes = by_id(graph)
    drawn = sorted((edge.kind, edge.path.split(" ")[0], edge.path.split(" ")[-1]) for edge in graph.edges)
    a, c, deploy = nodes["id-a"], nodes["id-c"], nodes["id-deploy"]
    assert len(graph.edges) == 4  # a→b, b→c, a→c (builds_in), c→deploy
    assert ("depends_on", f"M{c.x + c.w},{c.y + c.h // 2}", f"{deploy.x},{deploy.y + deploy.h // 2}") in drawn
    assert sum(kind == "builds_in" for kind, _, _ in drawn) == 3
    assert all(not start.startswith(f"M{a.x + a.w},") or kind == "builds_in" for kind, start, _ in drawn)


def test_an_edge_that_skips_a_column_runs_through_its_gap_not_behind_its_node() -> None:
    graph = graphs.job_graph([facts("a", 0), facts("b", 1, edges={"a": "builds_in"}),
                              facts("c", 2, edges={"b": "builds_in", "a": "builds_in"})])

    nodes = by_id(graph)
    b = nodes["id-b"]
    (long_edge,) = [edge for edge in graph.edges if " L" in edge.path]
    # Straight across b's column, level, above or below b.
    run = long_edge.path.split(" L")[1].split(" ")[0]
    x, y = (int(v) for v in run.split(","))
    assert x == b.x + b.w
    assert y <= b.y - graphs.GAP_Y // 2 or y >= b.y + b.h + graphs.GAP_Y // 2


def test_an_edge_to_a_step_outside_the_latest_attempts_is_left_out_and_labels_are_shortened() -> None:
    long_label = "🚀 deploy the whole fleet to production"
    graph = graphs.job_graph([facts("a", 0, label=long_label), facts("b", 1, edges={"gone": "builds_in"})])

    nodes = by_id(graph)
    assert graph.edges == []
    assert nodes["id-a"].label == long_label
    assert nodes["id-a"].short_label == long_label[:graphs.NODE_LABEL_CHARS - 1] + "…"


def test_a_long_chain_of_steps_and_waits_is_laid_out_without_recursion() -> None:
    # Each step waits for the one before it (a wait between every two): 800 layers deep with the waits.
    jobs = [facts("s0", 0, segment=0)] + [
        facts(f"s{i}", i, segment=i, after_segment=i - 1, after=(f"s{i - 1}",)) for i in range(1, graphs.MAX_GRAPH_NODES)]

    graph = graphs.job_graph(jobs[::-1])  # the last step first: its layer is found through all the others

    nodes = by_id(graph)
    assert nodes[f"id-s{graphs.MAX_GRAPH_NODES - 1}"].layer == 2 * (graphs.MAX_GRAPH_NODES - 1)
    assert len(graph.edges) == 2 * (graphs.MAX_GRAPH_NODES - 1)


def test_a_build_too_large_to_draw_says_so() -> None:
    jobs = [facts(f"s{i}", i) for i in range(graphs.MAX_GRAPH_NODES + 1)]
    assert graphs.job_graph(jobs).too_large
    assert graphs.job_graph([]).nodes == []


def test_the_timeline_puts_each_job_on_one_time_axis_and_marks_the_critical_path() -> None:
    jobs = [
        facts("a", 0, times=(0, 10, 30)),
        facts("quick", 1, times=(0, 2, 12)),  # in parallel, done early: not critical
        facts("b", 2, edges={"a": "builds_in", "quick": "depends_on"}, times=(30, 35, 60)),
    ]

    line = graphs.timeline(jobs, now=T0 + timedelta(hours=1))

    scale = graphs.CHART_W / 60
    bars = {bar.id: bar for bar in line.bars}
    assert line.seconds == 60
    assert bars["id-a"].waiting == graphs.Span(graphs.LABEL_W, round(10 * scale, 1))
    assert bars["id-a"].running == graphs.Span(round(graphs.LABEL_W + 10 * scale, 1), round(20 * scale, 1))
    assert bars["id-b"].running == graphs.Span(round(graphs.LABEL_W + 35 * scale, 1), round(25 * scale, 1))
    assert {bar.id for bar in line.bars if bar.critical} == {"id-a", "id-b"}
    assert [bar.y for bar in line.bars] == [graphs.AXIS_H, graphs.AXIS_H + graphs.ROW_H, graphs.AXIS_H + 2 * graphs.ROW_H]
    assert [tick.label for tick in line.ticks] == ["0s", "10s", "20s", "30s", "40s", "50s", "1m"]
    assert line.ticks[-1].x == graphs.LABEL_W + graphs.CHART_W


def test_a_running_job_grows_to_now_and_an_unscheduled_one_has_no_bar() -> None:
    jobs = [facts("a", 0, state="running", times=(0, 5, None)), facts("b", 1, state="pending",
                                                                     edges={"a": "builds_in"})]

    line = graphs.timeline(jobs, now=T0 + timedelta(seconds=20))

    a, b = line.bars
    assert line.seconds == 20
    assert a.running.x + a.running.w == graphs.LABEL_W + graphs.CHART_W
    assert (b.waiting, b.running, b.critical) == (None, None, False)
    assert a.critical


def test_a_build_nothing_of_which_was_scheduled_has_rows_and_no_axis() -> None:
    line = graphs.timeline([facts("a", 0, state="held")], now=T0)
    assert [bar.waiting for bar in line.bars] == [None] and line.ticks == []


def test_the_poll_geometry_is_the_timeline_drawn() -> None:
    line = graphs.timeline([facts("a", 0, times=(0, 1, 4))], now=T0)

    geometry = graphs.timeline_geometry(line)

    bar = line.bars[0]
    assert geometry["bars"] == {"id-a": {"waiting": [bar.waiting.x, bar.waiting.w],
                                         "running": [bar.running.x, bar.running.w],
                                         "critical": True, "state": "passed"}}
    assert geometry["ticks"] == [{"x": tick.x, "label": tick.label} for tick in line.ticks]
