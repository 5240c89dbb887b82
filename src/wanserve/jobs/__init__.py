"""Durable job queues: the `JobStore` protocol and its backends, chosen by URL with `open_store`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from wanserve.jobs.model import Job, JobStatus, JobStore, new_job_id

__all__ = [
    "CURSOR_TTL_S",
    "IDEMPOTENCY_TTL_S",
    "QUEUE_FULL_RETRY_AFTER",
    "WORKER_LOST_MESSAGE",
    "Job",
    "JobStatus",
    "JobStore",
    "check_store_url",
    "every_job",
    "new_job_id",
    "open_store",
    "sqlite_path",
]

# A store cannot know how fast a queue drains; this is the Retry-After both backends put in QueueFull.
QUEUE_FULL_RETRY_AFTER = 5

# How long a deleted (or expired) job's place in the list is remembered, so that a client paging with it
# as `after` (a clean-up loop deleting as it goes) carries on instead of meeting a 404.
CURSOR_TTL_S = 7 * 24 * 3600

# How long an Idempotency-Key keeps naming the job it created (as Stripe's do): a client retries within
# minutes, and a key reused a day later is a new request.
IDEMPOTENCY_TTL_S = 24 * 3600

# The error_message of a job reaped for the last time (code `worker_lost`); `%d` is the attempt count.
# A %-template rather than an f-string so the Redis backend's Lua script formats it identically.
WORKER_LOST_MESSAGE = (
    "the job kept losing its worker: its lease expired on each of its %d attempts "
    "(the worker crashed, was killed or stalled); giving up"
)

_SCHEMES = "sqlite:///<path> (four slashes for an absolute path), redis://, rediss:// or unix://"


def redacted(url: str) -> str:
    """`url` fit for a log or a message: a password in it (`redis://:secret@host`) shown as `***`. Read by hand,
    not by urlsplit, which ends the host part at a `/`, `#` or `?` in the password (a base64 one has them) and
    then finds none: a URL it cannot read is the one an error message prints."""
    head, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    path, question, query = rest.partition("?")
    if question and "password=" in query:  # redis://host/0?password=…, which redis-py reads too
        pairs = [(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        rest = f"{path}?{urlencode(pairs, safe='*')}"
    return f"{head}://{rest}"


def check_store_url(url: str) -> str:
    """The backend `url` names ("sqlite" or "redis"), or ValueError saying what a store URL looks like."""
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        path = url[len("sqlite:///") :]
        if not url.lower().startswith("sqlite:///") or not path:
            raise ValueError(f"job store URL {redacted(url)!r} names no database file; expected {_SCHEMES}")
        if path == ":memory:" or path.startswith(":memory:?"):
            # Each connection (each thread) would get a database of its own: the API's jobs no worker sees.
            raise ValueError("an in-memory SQLite database is not shared by the API and the workers: name a file")
        if "?" in path:  # taken as part of the file's name: `jobs.db?mode=ro` would be a new, empty file
            raise ValueError(f"job store URL {redacted(url)!r}: a SQLite store takes no options after '?'")
        if path.endswith("/"):
            raise ValueError(f"job store URL {redacted(url)!r} names a folder, not a database file")
        return "sqlite"
    if sep and scheme in ("redis", "rediss", "unix"):
        _check_redis_url(url, scheme)
        return "redis"
    raise ValueError(f"unsupported job store URL {redacted(url)!r}; expected {_SCHEMES}")


def _check_redis_url(url: str, scheme: str) -> None:
    """What redis-py would read otherwise without a word: a database that is not a number as database 0 (two
    fleets on `/staging` and `/prod` would share one queue), no host as localhost, no socket path as none."""
    shown = redacted(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        # (Not the parser's words: they quote what it took for the port, a piece of the password.)
        raise ValueError(
            f"job store URL {shown!r} is not a URL (its host and port cannot be read); a password holding "
            "/ # ? @ or % must be percent-encoded (python3 -c 'import sys, urllib.parse; "
            'print(urllib.parse.quote(sys.argv[1], safe=""))\' PASSWORD)'
        ) from None
    if scheme == "unix":
        if not parts.path.strip("/"):
            raise ValueError(f"job store URL {shown!r} names no socket; expected unix:///path/to/redis.sock")
        db = dict(parse_qsl(parts.query)).get("db", "0")
    else:
        if not parts.hostname:
            raise ValueError(f"job store URL {shown!r} names no host; expected {scheme}://[:password@]host:6379/0")
        db = parts.path.strip("/") or "0"
    if not (db.isascii() and db.isdigit()):
        example = "?db=0" if scheme == "unix" else "/0"
        raise ValueError(f"job store URL {shown!r}: the database must be a number (such as {example}), got {db!r}")


def sqlite_path(url: str) -> Path | None:
    """The database file an SQLite URL names; None for Redis. SQLite URLs follow the SQLAlchemy rule:
    `sqlite:///jobs.db` is relative to the working directory, `sqlite:////var/lib/wanserve/jobs.db` absolute."""
    if check_store_url(url) != "sqlite":
        return None
    return Path(url[len("sqlite:///") :])


def every_job(store: JobStore, most: int = 10_000_000) -> Iterator[Job]:
    """Every job in the store, oldest first, page by page (the list route's paging), at most `most`."""
    after: str | None = None
    seen = 0
    while seen < most:
        page, more = store.list(limit=500, after=after, order="asc")
        yield from page[: most - seen]
        seen += len(page)
        if not more or not page:
            return
        after = page[-1].id


def open_store(url: str) -> JobStore:
    """The store for `url` (see `sqlite_path` for SQLite's)."""
    path = sqlite_path(url)
    if path is not None:
        from wanserve.jobs.sqlite import SQLiteJobStore

        return SQLiteJobStore(path)
    # Imported here so that SQLite deployments never need the redis package at import time.
    from wanserve.jobs.redis_store import RedisJobStore

    return RedisJobStore(url)
