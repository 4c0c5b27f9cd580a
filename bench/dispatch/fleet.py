"""The idle fleet of `make bench-fleet`: N simulated agents in one asyncio process, registering, then
long-polling claims for as long as they run.

Run as its own process (`python bench/dispatch/fleet.py ...`), so its CPU is counted apart from the
server's and the bench script's. Each simulated agent registers with tags that no job selects
(queue=fleet-idle, in the agents' own organization: the server must pass them over, not merely
find another organization empty), then claims with `wait` on a keep-alive connection of its own,
again as soon as an answer comes. A tiny HTTP/1.1 client over asyncio streams: a thousand
threads or processes would measure themselves, not the server.

It prints `ready` once every agent is registered, and on SIGTERM a line
of JSON: how many answers of each status it got, and how many were jobs (there must be none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from collections import Counter

TAGS = {"queue": "fleet-idle"}
RESUME_HEADER = "Harmont-Claim-Resume"


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, token: str, body: dict, *, headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes, dict[str, str]]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await self.writer.drain()
        assert self.reader is not None
        status_line = await self.reader.readline()
        if not status_line:
            self.writer = None
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        answer: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            answer[name.strip().lower()] = value.strip()
        length = int(answer.get("content-length", "0"))
        data = await self.reader.readexactly(length) if length else b""
        if answer.get("connection", "").lower() == "close":
            self.writer.close()
            self.writer = None
        return status, data, answer


async def one_agent(number: int, args: argparse.Namespace, counts: Counter, registered: asyncio.Queue,
                    gate: asyncio.Semaphore) -> None:
    conn = Connection(args.host, args.port)
    async with gate:  # registrations a few at a time, as a fleet rolls out
        status, data, _ = await conn.request("/api/v0/agent/register", args.token, {
            "name": f"fleet-{number:04d}", "hostname": "fleet", "version": "bench", "os": "simulated",
            "tags": TAGS})
    if status != 201:
        raise RuntimeError(f"register: {status} {data[:200]!r}")
    session = json.loads(data)["session_token"]
    registered.put_nowait(number)
    # A fleet's agents came up at different times, so their held claims end spread over the wait,
    # not all in the same second: the first claim waits a random share of it. (All in step, an idle
    # window could fall between two waves and see nothing.)
    wait = random.uniform(0.0, args.wait)
    resume: str | None = None  # as real agents do (builds/agent/runner.py): the key of the last 204, sent back
    while True:
        try:
            status, data, answer = await conn.request(
                "/api/v0/agent/claim", session, {"wait": round(wait, 3)},
                headers={RESUME_HEADER: resume} if resume and not args.no_resume else None)
            wait = args.wait
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            counts["reconnects"] += 1
            conn.writer = None
            resume = None
            await asyncio.sleep(0.5)
            continue
        resume = answer.get(RESUME_HEADER.lower()) if status == 204 else None
        counts[str(status)] += 1
        if resume:
            counts["resume keys"] += 1
        if status == 200:
            counts["jobs"] += 1  # a job no fleet agent should have been given
        elif status != 204:
            await asyncio.sleep(1.0)


async def main(args: argparse.Namespace) -> None:
    counts: Counter = Counter()
    registered: asyncio.Queue = asyncio.Queue()
    gate = asyncio.Semaphore(20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    agents = [asyncio.create_task(one_agent(i, args, counts, registered, gate)) for i in range(args.agents)]
    for _ in range(args.agents):
        waiting = asyncio.ensure_future(registered.get())
        done, _ = await asyncio.wait({waiting, *agents}, return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in agents if task.done() and task.exception()]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    print("ready", flush=True)
    await stop.wait()
    for task in agents:
        task.cancel()
    print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="an idle fleet of long-polling agents")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True, help="the organization's agent token (hma_...)")
    parser.add_argument("--agents", type=int, default=1000)
    # What real agents ask for (builds/agent/runner.py CLAIM_WAIT_SECONDS).
    parser.add_argument("--no-resume", action="store_true",
                        help="never send a 204's resume key back: each claim's first attempt is made")
    parser.add_argument("--wait", type=float, default=30.0, help="each claim's wait, in seconds (default 30)")
    asyncio.run(main(parser.parse_args()))
    sys.exit(0)
