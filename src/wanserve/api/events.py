"""Server-sent events: one job's status as a stream, so a client learns of progress and the finished video
the moment the store does, without polling.

Every backend is read the same way, through `JobStore.get` every half second or second; an event goes out
only when what a client would see changes. The stream ends after the event that carries a final status, when
the job is deleted, or when the API process stops (the client reconnects, to another replica if there is
one, and gets the current state first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any

import anyio
import anyio.to_thread

from wanserve.errors import JobNotFound, StoreUnavailable
from wanserve.jobs.model import Job, JobStatus

log = logging.getLogger(__name__)

# How often the store is read for each open stream, by the job's status (as `openai-poll-after-ms` tells
# pollers): a running job's progress moves once per denoising step, a queued job's place more slowly.
POLL_INTERVAL_S: Mapping[JobStatus, float] = MappingProxyType({JobStatus.QUEUED: 1.0, JobStatus.IN_PROGRESS: 0.5})
# After the store failed to answer: what the API's 503 tells pollers (`Retry-After: 5`), rather than adding
# a retry every half second per stream to the load of a store that is down.
STORE_RETRY_S = 5.0
# On a server that stops, how long the last read may take before the stream ends without it.
LAST_READ_S = 1.0
# Proxies (nginx, cloud balancers) cut connections idle for 60 s or so: a comment line keeps them open.
HEARTBEAT_S = 15.0
# What an EventSource waits before reconnecting after the server ends a stream early (a restart).
RETRY_MS = 2000
# Threads that all of a process's streams may hold at once for their reads, of the 40 in the pool that every
# other request runs on. A read takes a millisecond, so a few threads serve thousands of streams; but during a
# store outage each read waits out the store's retries (about 10 s for Redis), and streams left to the shared
# pool would hold all of it: /ready, cancels and page loads queued behind them.
STREAM_READ_THREADS = 8

HEADERS = {
    # The events carry the prompt: no cache keeps them (as the API's JSON answers).
    "Cache-Control": "no-store",
    # nginx buffers proxied answers unless told not to, which would hold every event back.
    "X-Accel-Buffering": "no",
}


# The id of the event that carries a final status. An EventSource sends it back as Last-Event-ID when it
# reconnects (a client that did not close() it): the answer is then a 204, which tells it to stop, instead of
# the same last state every 2 s for as long as the tab stays open.
FINAL_ID = "final"


def frame(data: dict[str, Any], event: str | None = None, event_id: str | None = None) -> str:
    lines = [f"event: {event}"] if event is not None else []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


def _job_frame(job: Job, body: dict[str, Any]) -> str:
    return frame(body, event_id=FINAL_ID if job.status.finished else None)


def _gone(exc: JobNotFound) -> str:
    # Not `error`: EventSource fires its own `error` on a dropped connection, and a listener gets both.
    error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": "not_found"}
    return frame({"error": error}, event="gone")


async def job_events(
    load: Callable[[], Job],
    render: Callable[[Job], tuple[Job, dict[str, Any]]],
    closing: threading.Event,
    limiter: anyio.CapacityLimiter,
    first: Job | None = None,
) -> AsyncIterator[str]:
    """The frames of one job's stream. `load` reads the job (raising JobNotFound once it is gone) and
    `render` turns it into what the client sees, with the job that shows (read again if it had moved on: the
    stream ends on the job it showed, never on an older read); both run on a thread, since stores block, taken under
    `limiter` (shared by the process's streams, see STREAM_READ_THREADS). `first`, the job as the route just
    read it, spares the first read."""
    unread = [first] if first is not None else []

    async def read() -> tuple[Job, dict[str, Any]]:
        return await anyio.to_thread.run_sync(snapshot, limiter=limiter)

    def snapshot() -> tuple[Job, dict[str, Any]]:
        return render(unread.pop() if unread else load())

    yield f"retry: {RETRY_MS}\n\n"
    sent: dict[str, Any] | None = None
    quiet_since = time.monotonic()
    reading: asyncio.Task[tuple[Job, dict[str, Any]]] | None = None
    while not closing.is_set():
        reading = _started(read())
        # While the read is out (a store that does not answer holds it for seconds, and it may wait its turn
        # behind other streams' reads), the stream still beats: proxies cut one silent for a minute.
        while not reading.done() and not closing.is_set():
            await asyncio.wait({reading}, timeout=0.1)
            if not reading.done() and time.monotonic() - quiet_since >= HEARTBEAT_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
        if not reading.done():
            break  # the server stops: the read still out is the last one
        wait = STORE_RETRY_S
        try:
            job, body = reading.result()
        except JobNotFound as exc:
            yield _gone(exc)
            return
        except StoreUnavailable as exc:
            # The job is still there, only unreadable for now: the stream waits it out, as a poller would.
            log.warning("event stream: %s", exc)
        else:
            if body != sent:
                yield _job_frame(job, body)
                sent, quiet_since = body, time.monotonic()
                if job.status.finished:
                    return
            wait = POLL_INTERVAL_S.get(job.status, STORE_RETRY_S)
        reading = None
        deadline = time.monotonic() + wait
        while not closing.is_set() and (left := deadline - time.monotonic()) > 0:
            if time.monotonic() - quiet_since >= HEARTBEAT_S:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await anyio.sleep(min(left, 0.1))  # in slices: a stopping server ends its streams at once
    # The server stops. `serve` stops once its drain is over, often within one poll of the job it waited for
    # completing: one last read, so the stream ends with that job's last state rather than just before it.
    last = reading if reading is not None else _started(read())
    await asyncio.wait({last}, timeout=LAST_READ_S)
    if not last.done():
        return
    try:
        job, body = last.result()
    except JobNotFound as exc:
        yield _gone(exc)
    except StoreUnavailable:
        pass
    else:
        if body != sent:
            yield _job_frame(job, body)


def _started(read: Coroutine[Any, Any, tuple[Job, dict[str, Any]]]) -> asyncio.Task[tuple[Job, dict[str, Any]]]:
    """The read as a task of its own, which the stream waits on while it beats. A stream closed meanwhile (the
    client left) leaves it to end on its thread; its outcome is then nobody's."""
    task = asyncio.ensure_future(read)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task
