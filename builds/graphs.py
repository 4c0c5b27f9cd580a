"""The build page's pictures of a build: the job graph (its DAG) and the timeline (a waterfall).

Pure functions over `JobFacts` (no ORM): builds.views turns the page's jobs into
facts, these place every node, edge and bar, and the templates draw them as
SVG. The status poll sends `timeline_geometry` again (the bars grow while jobs
run); the graph's shape never changes during a build, so the poll only
recolours its nodes.

Only each step's latest attempt is drawn: an older attempt's row is in the job
list. Edges are drawn between steps, so an edge to a job that was retried ends
at its latest attempt. A wait (`after_segment`) is drawn as one small node that
the jobs before it lead into and the jobs after it leave from, instead of an
edge from each job before to each job after.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

# Graph geometry, in SVG user units (the picture scales to its box; see harmont.css).
NODE_W, NODE_H = 168, 34
WAIT_W = 22
GAP_X, GAP_Y = 44, 14
PAD = 8
# Past this many steps the graph is not drawn (the job list still shows every job).
MAX_GRAPH_NODES = 400
NODE_LABEL_CHARS = 21  # what fits a node; the full label is its tooltip

# Timeline geometry.
LABEL_W = 190
CHART_W = 760
ROW_H = 22
BAR_H = 14
AXIS_H = 22
BAR_LABEL_CHARS = 26
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800, 86400)
MAX_TICKS = 6


@dataclass(frozen=True)
class JobFacts:
    """What the pictures need of one job (the latest attempt of its step)."""

    id: str
    key: str
    label: str
    state: str
    position: int
    # Prerequisites by step key, with the kind of each explicit edge (builds_in / depends_on).
    edges: dict[str, str]
    # Every prerequisite by step key, waits included (what the job waited for).
    prerequisites: tuple[str, ...]
    segment: int | None
    after_segment: int | None
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


# ------------------------------------------------------------------ the graph


@dataclass
class Node:
    id: str  # the job's id, or `wait-<segment>`
    label: str
    state: str  # a job state; a wait's is "wait"
    x: int = 0
    y: int = 0
    w: int = NODE_W
    h: int = NODE_H
    is_wait: bool = False
    layer: int = 0

    @property
    def text_x(self) -> int:
        return self.x + 10

    @property
    def text_y(self) -> int:
        return self.y + self.h // 2 + 4

    @property
    def short_label(self) -> str:
        return shorten(self.label, NODE_LABEL_CHARS)


@dataclass(frozen=True)
class Edge:
    kind: str  # builds_in, depends_on or wait
    path: str  # the SVG path's `d`


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0
    too_large: bool = False

    @property
    def legend(self) -> list[tuple[str, str]]:
        """The kinds of edge drawn, with what each means."""
        drawn = {edge.kind for edge in self.edges}
        return [(kind, text) for kind, text in EDGE_MEANINGS if kind in drawn]


EDGE_MEANINGS = (("builds_in", "builds in (starts from its files)"), ("depends_on", "depends on"),
                 ("wait", "wait"))


def job_graph(jobs: Sequence[JobFacts]) -> Graph:
    """Place the build's steps in layers, left to right: a step one layer right of its last prerequisite.

    Within a layer, steps keep their order in the pipeline at first, then move
    towards the middle of their prerequisites (one barycentre pass), which
    uncrosses most edges of ordinary pipelines without a layout library.
    """
    if not jobs:
        return Graph()
    if len(jobs) > MAX_GRAPH_NODES:
        return Graph(too_large=True)
    by_key = {job.key: job for job in jobs}
    nodes: dict[str, Node] = {job.key: Node(job.id, job.label or job.key, job.state) for job in jobs}
    links: list[tuple[str, str, str]] = []  # (from node key, to node key, kind)
    waited = {job.after_segment for job in jobs if job.after_segment is not None}
    for segment in sorted(waited):
        nodes[f"wait-{segment}"] = Node(f"wait-{segment}", "wait", "wait", w=WAIT_W, is_wait=True)
    for job in sorted(jobs, key=lambda j: j.position):
        for key, kind in job.edges.items():
            if key in by_key:
                links.append((key, job.key, kind))
        if job.after_segment is not None:
            links.append((f"wait-{job.after_segment}", job.key, "wait"))
        if job.segment is not None and job.segment in waited:
            links.append((job.key, f"wait-{job.segment}", "wait"))
    order = {key: index for index, key in enumerate(nodes)}
    layer = _longest_path_layers(list(nodes), links)
    links = _without_implied(links, layer)
    incoming: dict[str, list[str]] = defaultdict(list)
    for source, target, _ in links:
        incoming[target].append(source)
    layers: dict[int, list[str]] = defaultdict(list)
    for key in sorted(nodes, key=lambda k: (layer[k], _first_position(k, by_key, order))):
        layers[layer[key]].append(key)
    rank = {key: i for keys in layers.values() for i, key in enumerate(keys)}
    for index in sorted(layers)[1:]:
        keys = layers[index]
        keys.sort(key=lambda k: (sum(rank[p] for p in incoming[k]) / len(incoming[k]) if incoming[k] else rank[k],
                                 rank[k]))
        rank.update({key: i for i, key in enumerate(keys)})
    tallest = max(len(keys) for keys in layers.values())
    for index, keys in layers.items():
        # Each layer centred on the tallest, so a fan-in reads as one.
        offset = (tallest - len(keys)) * (NODE_H + GAP_Y) // 2
        for i, key in enumerate(keys):
            node = nodes[key]
            node.layer = index
            node.x = PAD + index * (NODE_W + GAP_X) + (NODE_W - node.w) // 2  # a wait: mid-column
            node.y = PAD + offset + i * (NODE_H + GAP_Y)
    graph = Graph(list(nodes.values()))
    columns = {index: [nodes[key] for key in keys] for index, keys in layers.items()}
    for source, target, kind in links:
        graph.edges.append(Edge(kind, _edge_path(nodes[source], nodes[target], columns)))
    graph.width = PAD * 2 + (max(layers) + 1) * (NODE_W + GAP_X) - GAP_X
    graph.height = PAD * 2 + tallest * (NODE_H + GAP_Y) - GAP_Y
    return graph


def _longest_path_layers(keys: list[str], links: list[tuple[str, str, str]]) -> dict[str, int]:
    """Each node's layer: one more than its furthest prerequisite's (0 for a root), in topological order.

    Iterative (Kahn's order), not recursive: a chain of hundreds of steps with waits between them
    is deeper than Python's recursion allows. Nodes on a cycle (the planner refuses those) stay
    in layer 0 rather than fail the page.
    """
    layer = dict.fromkeys(keys, 0)
    waiting_on = dict.fromkeys(keys, 0)
    after: dict[str, list[str]] = defaultdict(list)
    for source, target, _ in links:
        after[source].append(target)
        waiting_on[target] += 1
    ready = [key for key in keys if not waiting_on[key]]
    while ready:
        key = ready.pop()
        for target in after[key]:
            layer[target] = max(layer[target], layer[key] + 1)
            waiting_on[target] -= 1
            if not waiting_on[target]:
                ready.append(target)
    return layer


def _edge_path(a: Node, b: Node, columns: dict[int, list[Node]]) -> str:
    """From `a`'s right side to `b`'s left side, through the gaps of the columns in between.

    An edge that skips a column would otherwise run behind that column's nodes and
    look like it ends there: it crosses each such column level, at the height the
    straight line would have, moved into the nearest gap between nodes.
    """
    start, end = (a.x + a.w, a.y + a.h // 2), (b.x, b.y + b.h // 2)
    points = [start]
    between = range(a.layer + 1, b.layer)
    for index in between:
        share = (index - a.layer) / (b.layer - a.layer)
        y = round(start[1] + (end[1] - start[1]) * share)
        for node in columns.get(index, ()):
            if node.y - GAP_Y // 2 < y < node.y + node.h + GAP_Y // 2:
                above, below = node.y - GAP_Y // 2, node.y + node.h + GAP_Y // 2
                y = above if y - above < below - y else below
                break
        left = PAD + index * (NODE_W + GAP_X)
        points += [(left, y), (left + NODE_W, y)]
    points.append(end)
    path = [f"M{start[0]},{start[1]}"]
    for i in range(1, len(points)):
        (x1, y1), (x2, y2) = points[i - 1], points[i]
        if i % 2 == 0 and len(points) > 2:  # through a column: a straight run in its gap
            path.append(f"L{x2},{y2}")
            continue
        bend = max(16, (x2 - x1) // 2)
        path.append(f"C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}")
    return " ".join(path)


def _without_implied(links: list[tuple[str, str, str]], layer: dict[str, int]) -> list[tuple[str, str, str]]:
    """The links minus order-only ones another path already implies (a transitive reduction).

    A step after a wait depends on every step before it, but drawn that way the
    edges from the early steps run behind the later ones: only the last of each
    chain says something. A builds_in edge always stays, as it says where the
    step's files come from.
    """
    bit = {key: 1 << i for i, key in enumerate(layer)}
    successors: dict[str, list[str]] = defaultdict(list)
    for source, target, _ in links:
        successors[source].append(target)
    # What each node reaches by one edge or more; every edge goes to a higher layer.
    reach: dict[str, int] = {}
    for key in sorted(layer, key=layer.__getitem__, reverse=True):
        mask = 0
        for target in successors[key]:
            mask |= bit[target] | reach[target]
        reach[key] = mask
    # What a node reaches through two edges or more (a target's own reach never holds the target).
    indirect = {key: 0 for key in layer}
    for key, targets in successors.items():
        for target in targets:
            indirect[key] |= reach[target]
    return [(source, target, kind) for source, target, kind in links
            if kind == "builds_in" or not indirect[source] & bit[target]]


def _first_position(key: str, by_key: dict[str, JobFacts], order: dict[str, int]) -> int:
    job = by_key.get(key)
    return job.position if job is not None else order[key]


def shorten(label: str, chars: int) -> str:
    return label if len(label) <= chars else f"{label[:chars - 1]}…"


# ------------------------------------------------------------------ the timeline


@dataclass(frozen=True)
class Span:
    x: float
    w: float


@dataclass(frozen=True)
class Bar:
    id: str
    label: str
    state: str
    y: int
    waiting: Span | None  # scheduled → started (or → ended, for a job that never started)
    running: Span | None  # started → finished, or → now while it runs
    critical: bool

    @property
    def bar_y(self) -> int:
        return self.y + (ROW_H - BAR_H) // 2

    @property
    def text_y(self) -> int:
        return self.y + ROW_H // 2 + 4

    @property
    def short_label(self) -> str:
        return shorten(self.label, BAR_LABEL_CHARS)


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    ticks: list[Tick]
    width: int
    height: int
    seconds: float  # what the chart's width stands for

    label_x = LABEL_W - 8  # labels end here, right-aligned
    axis_y = AXIS_H - 6  # the ticks' labels sit on this line
    bar_h = BAR_H


def timeline(jobs: Sequence[JobFacts], now: datetime) -> Timeline:
    """One bar per job from scheduled to started to finished, on one time axis from the first scheduling.

    The critical path is marked: from the job that ended last, back through
    the prerequisite that ended last, and so on (the chain that set the build's
    duration; shortening anything else would not have made it faster).
    """
    rows = sorted(jobs, key=lambda j: j.position)
    scheduled = [job.scheduled_at for job in rows if job.scheduled_at is not None]
    height = AXIS_H + max(1, len(rows)) * ROW_H
    width = LABEL_W + CHART_W
    if not scheduled:
        return Timeline([Bar(job.id, job.label or job.key, job.state, AXIS_H + i * ROW_H, None, None, False)
                         for i, job in enumerate(rows)], [], width, height, 0.0)
    start = min(scheduled)
    ends = {job.key: _end(job, now) for job in rows}
    last = max((end for end in ends.values() if end is not None), default=start)
    seconds = max(1.0, (last - start).total_seconds())
    scale = CHART_W / seconds

    def span(a: datetime | None, b: datetime | None) -> Span | None:
        if a is None or b is None:
            return None
        x = (a - start).total_seconds() * scale
        return Span(round(LABEL_W + x, 1), round(max(1.0, (b - a).total_seconds() * scale), 1))

    critical = _critical_path(rows, ends)
    bars = []
    for i, job in enumerate(rows):
        end = ends[job.key]
        waiting = span(job.scheduled_at, job.started_at or end)
        running = span(job.started_at, end) if job.started_at is not None else None
        bars.append(Bar(job.id, job.label or job.key, job.state, AXIS_H + i * ROW_H, waiting, running,
                        job.key in critical))
    return Timeline(bars, _ticks(seconds, scale), width, height, seconds)


def _end(job: JobFacts, now: datetime) -> datetime | None:
    """Where a job's bar ends: its finish, or now while it is scheduled or running."""
    if job.finished_at is not None:
        return job.finished_at
    if job.started_at is not None or job.scheduled_at is not None:
        return now
    return None


def _critical_path(rows: Sequence[JobFacts], ends: dict[str, datetime | None]) -> set[str]:
    by_key = {job.key: job for job in rows}
    timed = [job for job in rows if ends[job.key] is not None]
    if not timed:
        return set()
    current: JobFacts | None = max(timed, key=lambda j: (ends[j.key], -j.position))
    path: set[str] = set()
    while current is not None and current.key not in path:
        path.add(current.key)
        before = [by_key[k] for k in current.prerequisites if k in by_key and ends[k] is not None]
        current = max(before, key=lambda j: (ends[j.key], -j.position)) if before else None
    return path


def _ticks(seconds: float, scale: float) -> list[Tick]:
    step = next((s for s in TICK_STEPS if seconds / s <= MAX_TICKS), TICK_STEPS[-1])
    ticks = []
    at = 0
    while at <= seconds + 1e-9:
        ticks.append(Tick(round(LABEL_W + at * scale, 1), _tick_label(at)))
        at += step
    return ticks


def _tick_label(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m" if not rest else f"{minutes}m{rest:02d}s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h" if not rest else f"{hours}h{rest // 60:02d}m"


def timeline_geometry(line: Timeline) -> dict:
    """What the status poll sends to redraw the timeline: each bar's spans and the axis."""
    return {
        "bars": {bar.id: {"waiting": _span_json(bar.waiting), "running": _span_json(bar.running),
                          "critical": bar.critical, "state": bar.state} for bar in line.bars},
        "ticks": [{"x": tick.x, "label": tick.label} for tick in line.ticks],
    }


def _span_json(span: Span | None) -> list[float] | None:
    return None if span is None else [span.x, span.w]
