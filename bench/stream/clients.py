"""The SSE client process: `stream_bench.py --role clients --plan FILE --out FILE`.

Everything it does is asyncio on one thread of one process (plain asyncio, no uvloop, raw
`asyncio.open_connection`), so its CPU is one number the orchestrator reads from /proc,
and its event-loop lag (sampled every 10 ms) bounds how much of a measured delay is the
client's own fault.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import self_cpu_seconds

# What the writer appends (bench/stream/writer.py): the append time rides in the chunk.
CONTENT = re.compile(r"bench job=(\d+) seq=(\d+) t=([0-9.]+)")


@dataclass
class ClientResult:
    job: int
    status: int = 0
    seqs: list[int] = field(default_factory=list)  # history, then live chunks, in arrival order
    id_mismatches: int = 0  # `id:` line disagreeing with the chunk's seq
    live: list[tuple[float, float]] = field(default_factory=list)  # (received at, delay s)
    done: bool = False
    error: str | None = None


class SSEParser:
    """Incremental `text/event-stream` parser: feed bytes, get (event, id, data) per blank line."""

    def __init__(self) -> None:
        self.buffer = b""
        self.event, self.event_id, self.data = "message", None, []

    def feed(self, chunk: bytes) -> list[tuple[str, str | None, str]]:
        self.buffer += chunk
        out = []
        while True:
            cut = self.buffer.find(b"\n")
            if cut < 0:
                return out
            line, self.buffer = self.buffer[:cut].rstrip(b"\r").decode(), self.buffer[cut + 1:]
            if not line:
                if self.data:
                    out.append((self.event, self.event_id, "\n".join(self.data)))
                self.event, self.event_id, self.data = "message", None, []
            elif line.startswith(":"):
                continue  # keep-alive comment
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    self.event = value
                elif name == "id":
                    self.event_id = value
                elif name == "data":
                    self.data.append(value)


async def body_chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body as it arrives, with chunked transfer encoding undone."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF
        yield data


async def run_client(result: ClientResult, host: str, port: int, path: str, history_seen: asyncio.Event) -> None:
    """One SSE stream until `done`, into `result`; `history_seen` is set once it is open (or failed)."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                     f"Cache-Control: no-cache\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        result.status = int(status.split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if result.status != 200:
            result.error = f"HTTP {result.status}"
            return
        parser = SSEParser()
        async for data in body_chunks(reader, "chunked" in headers.get("transfer-encoding", "")):
            received = time.time()
            for event, event_id, payload in parser.feed(data):
                if event == "history":
                    result.seqs += [c["seq"] for c in json.loads(payload)["chunks"]]
                    history_seen.set()
                elif event == "chunk":
                    chunk = json.loads(payload)
                    result.seqs.append(chunk["seq"])
                    if event_id != str(chunk["seq"]):
                        result.id_mismatches += 1
                    match = CONTENT.search(chunk["content"])
                    if match:
                        result.live.append((received, received - float(match.group(3))))
                elif event == "done":
                    result.done = True
                    return
        result.error = result.error or "stream ended without done"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        history_seen.set()
        if writer is not None:
            writer.close()


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late a 10 ms timer fires: time the loop spent on other work."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - began - 0.01)


async def clients_main(plan: dict[str, Any]) -> dict[str, Any]:
    """Opens the plan's clients in batches (asking the orchestrator on stdin after each), awaits them all."""
    host, port = "127.0.0.1", plan["port"]
    results = [ClientResult(job=c["job"]) for c in plan["clients"]]
    lags: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(loop_lag(lags, stop))
    began = time.time()
    tasks = []
    opened = 0
    loop = asyncio.get_running_loop()

    async def start(result: ClientResult, path: str) -> None:
        nonlocal opened
        seen = asyncio.Event()
        tasks.append(asyncio.create_task(run_client(result, host, port, path, seen)))
        await seen.wait()
        opened += result.error is None

    # Open in batches; after each, the orchestrator counts the server's PostgreSQL
    # connections and answers GO or STOP (a PostgreSQL shared with others must keep slots).
    pairs = list(zip(results, plan["clients"]))
    for first in range(0, len(pairs), plan["batch"]):
        await asyncio.gather(*(start(r, c["path"]) for r, c in pairs[first:first + plan["batch"]]))
        print(f"OPENED {opened}", flush=True)
        answer = await loop.run_in_executor(None, sys.stdin.readline)
        if answer.strip() != "GO":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.set()
            await lag_task
            return {"stopped": True}
    connected = time.time() - began
    errors = sum(1 for r in results if r.error)
    print(f"CONNECTED {len(results) - errors} {connected:.2f}", flush=True)  # the orchestrator waits for this
    deadline = plan["deadline"]
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.time()))
    for task in pending:
        task.cancel()
    for result in results:
        if not result.done and not result.error:
            result.error = "timed out before done"
    stop.set()
    await lag_task
    return {
        "stopped": False,
        "connect_seconds": connected,
        "cpu_seconds": self_cpu_seconds(),
        "loop_lag": lags,
        "clients": [r.__dict__ for r in results],
    }


def clients_role(args: argparse.Namespace) -> int:
    plan = json.loads(Path(args.plan).read_text())
    out = asyncio.run(clients_main(plan))
    Path(args.out).write_text(json.dumps(out))
    return 0
