"""CPU accounting from /proc: what a measurement costs, per process group.

This box has 2 cores and is shared: other processes steal CPU from a measurement.
CPU seconds per request (or per job) is what the work costs; contention moves it
much less than req/s. So each benchmark records the CPU seconds of the server, of
the PostgreSQL backends of its database, of its load generator, and what everything
else on the machine used meanwhile.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    try:
        # Fields after the parenthesised command name: state, ppid, ..., utime (12th), stime (13th),
        # cutime, cstime (reaped children).
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int, *, with_children: bool = False) -> float | None:
    fields = stat_fields(pid)
    if not fields:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def parents() -> dict[int, int]:
    """pid -> parent pid of every process now running."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields:
                found[int(entry.name)] = int(fields[1])
    return found


def children_of(pid: int) -> list[int]:
    return [child for child, parent in parents().items() if parent == pid]


def tree_pids(root: int) -> list[int]:
    """`root` and its descendants."""
    parent_of = parents()
    found, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parent_of.items():
            if ppid == parent:
                found.append(pid)
                frontier.append(pid)
    return found


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def self_cpu_seconds() -> float:
    """This process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """This process's reaped children (wrk runs; a child still running is not in it yet)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    """This process plus its reaped children (wrk)."""
    return self_cpu_seconds() + children_cpu_seconds()


# A group's source: (pids, include their reaped children), or CPU seconds so far.
CpuSource = Callable[[], tuple[list[int], bool] | float]


@dataclass
class CpuSnapshot:
    wall: float
    busy: float
    groups: dict[str, dict[int, float]]


class CpuMeter:
    """CPU seconds per named group of processes between two snapshots.

    `groups` maps a name to a function returning either (pids, include reaped children)
    or CPU seconds so far (a float, e.g. this process's rusage). A process that appears
    between the snapshots counts whole (it started in the window); one that vanished
    counts nothing for the window (never negative).
    """

    def __init__(self, groups: dict[str, CpuSource]) -> None:
        self.groups = groups

    def snapshot(self) -> CpuSnapshot:
        taken: dict[str, dict[int, float]] = {}
        for name, source in self.groups.items():
            found = source()
            if isinstance(found, float):
                taken[name] = {0: found}
                continue
            pids, with_children = found
            taken[name] = {pid: cpu for pid in pids if (cpu := process_cpu(pid, with_children=with_children))
                           is not None}
        return CpuSnapshot(time.monotonic(), busy_cpu_seconds(), taken)

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
        """Seconds per group, plus `others` (the rest of the machine), `_wall` and `_capacity` (wall x cores)."""
        spent: dict[str, float] = {}
        for name, now in after.groups.items():
            then = before.groups.get(name, {})
            spent[name] = sum(max(0.0, cpu - then.get(pid, 0.0)) for pid, cpu in now.items())
        wall = after.wall - before.wall
        spent["_wall"] = wall
        spent["_capacity"] = wall * (os.cpu_count() or 1)
        measured = sum(v for k, v in spent.items() if not k.startswith("_"))
        spent["others"] = max(0.0, (after.busy - before.busy) - measured)
        return spent
