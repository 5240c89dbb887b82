"""Server-sent events: one job's status as a stream, so a client learns of progress and the finished video
the moment the store does, without polling.

Every backend is read the same way, through `JobStore.get` every `interval` seconds; an event goes out only
when what a client would see changes. The stream ends after the event that carries a final status, when
the job is deleted, or when the API process stops (the client reconnects, to another replica if there is
one, and gets the current state first).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.concurrency import run_in_threadpool

from wanserve.errors import JobNotFound, StoreUnavailable
from wanserve.jobs.model import Job

log = logging.getLogger(__name__)

# How often the store is read for each open stream: progress moves once per denoising step, seconds apart
# on a GPU, so half a second adds little delay and costs one read per stream.
POLL_INTERVAL_S = 0.5
# Proxies (nginx, cloud balancers) cut connections idle for 60 s or so: a comment line keeps them open.
HEARTBEAT_S = 15.0
# What an EventSource waits before reconnecting after the server ends a stream early (a restart).
RETRY_MS = 2000

HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied answers unless told not to, which would hold every event back.
    "X-Accel-Buffering": "no",
}


def frame(data: dict[str, Any], event: str | None = None, event_id: int | None = None) -> str:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


async def job_events(
    load: Callable[[], Job],
    render: Callable[[Job], dict[str, Any]],
    closing: threading.Event,
    interval: float | None = None,
    heartbeat: float | None = None,
) -> AsyncIterator[str]:
    """The frames of one job's stream. `load` reads the job (raising JobNotFound once it is gone) and
    `render` turns it into what the client sees; both run in the thread pool, since stores block."""

    interval = POLL_INTERVAL_S if interval is None else interval
    heartbeat = HEARTBEAT_S if heartbeat is None else heartbeat

    def snapshot() -> tuple[Job, dict[str, Any]]:
        job = load()
        return job, render(job)

    yield f"retry: {RETRY_MS}\n\n"
    sent: dict[str, Any] | None = None
    count = 0
    quiet_since = time.monotonic()
    while not closing.is_set():
        try:
            job, body = await run_in_threadpool(snapshot)
        except JobNotFound as exc:
            error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": "not_found"}
            yield frame({"error": error}, event="error")
            return
        except StoreUnavailable as exc:
            # The job is still there, only unreadable for now: the stream waits it out, as a poller would.
            log.warning("event stream: %s", exc)
        else:
            if body != sent:
                count += 1
                yield frame(body, event_id=count)
                sent = body
                quiet_since = time.monotonic()
                if job.status.finished:
                    return
        if time.monotonic() - quiet_since >= heartbeat:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await _sleep(interval, closing)


async def _sleep(seconds: float, closing: threading.Event) -> None:
    # In slices, so that a stopping server ends its streams within a tenth of a second.
    deadline = time.monotonic() + seconds
    while not closing.is_set() and (left := deadline - time.monotonic()) > 0:
        await anyio.sleep(min(left, 0.1))
