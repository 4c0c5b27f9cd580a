"""The ASGI entry point `make run` serves (gunicorn with uvicorn workers).

Live log streams (`/v0/...`) go to Django's ASGI handler, where each open
stream is a coroutine. Everything else goes to the ordinary WSGI application
on a small thread pool (a2wsgi): Django's own ASGI path runs sync views one at
a time and drops their persistent database connections, which costs the REST
API most of its throughput. Agents' claims go through builds.claim_waits,
which runs each attempt on that same pool and holds a claim that asked to
wait between attempts, in the event loop.
"""

import asyncio
import os
import signal
import threading

from a2wsgi import WSGIMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "harmont.settings")

from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402

STREAM_PREFIX = "/v0/"
WSGI_THREADS = int(os.environ.get("HARMONT_WSGI_THREADS", "8"))

django_asgi = get_asgi_application()
wsgi = WSGIMiddleware(get_wsgi_application(), workers=WSGI_THREADS)

from builds.claim_waits import CLAIM_PATH, claim_hub, long_poll_claim  # noqa: E402 (needs Django set up)
from builds.stream import hub as log_hub  # noqa: E402


def drain() -> None:
    """The server is stopping (in the event loop): held claims are answered and log streams end with a
    `retry:` hint now, so agents and browsers go to another instance; requests in flight finish."""
    claim_hub().close()
    log_hub().drain()


def drain_on_sigterm() -> None:
    """Chain `drain` before the server's own SIGTERM handler (uvicorn's: stop accepting, wait for
    the requests in flight), in this worker's main thread."""
    if threading.current_thread() is not threading.main_thread():
        return  # a server run in a thread (tests) gets its signals elsewhere
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(drain)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


async def lifespan(receive, send) -> None:  # noqa: ANN001
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            drain_on_sigterm()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:  # noqa: ANN001 (ASGI callables)
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(STREAM_PREFIX):
        await django_asgi(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] == CLAIM_PATH and scope["method"] == "POST":
        await long_poll_claim(scope, receive, send, wsgi)
    else:
        await wsgi(scope, receive, send)
