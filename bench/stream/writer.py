"""The writer: 100 chunks/s in total, round robin over a session's jobs, with `append_log` in this process.

Each chunk's content carries `time.time()` taken just before the append (one clock on one
machine), so the clients compute append -> receipt from it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Writer:
    jobs: list[str]
    rate: float
    appended: dict[str, int] = field(default_factory=dict)  # job id -> last seq written
    behind: list[float] = field(default_factory=list)  # how late each append started vs its schedule
    append_seconds: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    began: float = 0.0
    ended: float = 0.0

    def run(self) -> None:
        """Appends until `stop` is set; run in a thread of its own (an error lands in `error`)."""
        from django.db import connections

        from builds import services
        from builds.models import Job
        from builds.sql import CREDENTIAL_JOB

        try:
            # Loaded as the log route's credential lookup loads them (the state, the log's size, the
            # agent's last sight), so an append costs here what it costs behind the agent API.
            handles = {job_id: Job.objects.only(*(f.name for f in CREDENTIAL_JOB.fields)).get(pk=job_id)
                       for job_id in self.jobs}
            for handle in handles.values():
                handle.agent_seen_recently = True
            self.appended = {job_id: 1 for job_id in self.jobs}  # seq 1 was seeded
            start = time.monotonic()
            self.began = time.time()
            k = 0
            while not self.stop.is_set():
                wait = start + k / self.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.behind.append(max(0.0, -wait))
                job_id = self.jobs[k % len(self.jobs)]
                seq = self.appended[job_id] + 1
                stamp = time.time()
                content = f"bench job={k % len(self.jobs)} seq={seq} t={stamp:.6f}\n"
                services.append_log(job=handles[job_id], chunks=[services.ChunkIn(
                    seq=seq, stream_kind=0, content=content, ts=time.time_ns())])
                self.append_seconds.append(time.time() - stamp)
                self.appended[job_id] = seq
                k += 1
            self.ended = time.time()
        except BaseException as exc:  # noqa: BLE001 (reported by the orchestrator)
            self.error = exc
        finally:
            connections.close_all()

