"""Durable job queues: the `JobStore` protocol and its backends, chosen by URL with `open_store`."""

from __future__ import annotations

from pathlib import Path

from wanserve.jobs.model import Job, JobStatus, JobStore, new_job_id

__all__ = ["QUEUE_FULL_RETRY_AFTER", "WORKER_LOST_MESSAGE", "Job", "JobStatus", "JobStore", "new_job_id", "open_store"]

# A store cannot know how fast a queue drains; this is the Retry-After both backends put in QueueFull.
QUEUE_FULL_RETRY_AFTER = 5

# The error_message of a job reaped for the last time (code `worker_lost`); `%d` is the attempt count.
# A %-template rather than an f-string so the Redis backend's Lua script formats it identically.
WORKER_LOST_MESSAGE = (
    "the job kept losing its worker: its lease expired on each of its %d attempts "
    "(the worker crashed, was killed or stalled); giving up"
)

_SCHEMES = "sqlite:///<path> (four slashes for an absolute path), redis://, rediss:// or unix://"


def open_store(url: str) -> JobStore:
    """The store for `url`. SQLite URLs follow the SQLAlchemy rule: `sqlite:///jobs.db` is relative to the
    working directory, `sqlite:////var/lib/wanserve/jobs.db` is absolute."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"job store URL {url!r} names no database file; expected {_SCHEMES}")
        from wanserve.jobs.sqlite import SQLiteJobStore

        return SQLiteJobStore(Path(path))
    if sep and scheme in ("redis", "rediss", "unix"):
        # Imported here so that SQLite deployments never need the redis package at import time.
        from wanserve.jobs.redis_store import RedisJobStore

        return RedisJobStore(url)
    raise ValueError(f"unsupported job store URL {url!r}; expected {_SCHEMES}")
