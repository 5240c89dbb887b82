"""`JobStore` on one SQLite file: the single-machine default, shared by threads and processes alike.

Every change is a read-modify-write of one row inside `BEGIN IMMEDIATE`, which takes SQLite's write lock
up front: two processes can never both read a job as queued and both claim it. WAL lets readers (the API
polling status) proceed while a writer holds that lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from wanserve.disk import has_room
from wanserve.errors import InvalidRequest, JobNotFound, QueueFull, StoreUnavailable, unavailable_on
from wanserve.jobs import CURSOR_TTL_S, IDEMPOTENCY_TTL_S, QUEUE_FULL_RETRY_AFTER, WORKER_LOST_MESSAGE
from wanserve.jobs.model import Counts, Job, JobStatus, holder_worker

# `seq` is the arrival order: it breaks priority ties and is never rewritten, so a released or reaped job
# returns to its original place. The columns beside `data` are copies of Job fields, kept for the indexes.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    lease_expires_at REAL,
    expires_at REAL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (model, status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS gone (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, gone_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
"""

_BUSY_TIMEOUT_S = 30.0


# What an SQLite error code (its primary part) says of the store, for the errors that are the store being out
# of order rather than a wrong call: a lock held past the busy timeout (another process stuck mid-transaction, a
# disk that stalls), a full or read-only disk, a file that cannot be opened or is damaged. Like a Redis outage,
# each is an answer of 503 from the API and a wait for a worker, which goes on once the disk has room again or
# the file is put right; never a crash of the process, which would take the API down with it.
_OUT_OF_ORDER = {
    sqlite3.SQLITE_BUSY: "is locked by another process",
    sqlite3.SQLITE_LOCKED: "is locked by another process",
    sqlite3.SQLITE_FULL: "cannot be written: the disk is full",
    sqlite3.SQLITE_READONLY: "cannot be written: the file or its folder is read-only",
    sqlite3.SQLITE_CANTOPEN: "cannot be opened",
    sqlite3.SQLITE_IOERR: "cannot be read or written: disk I/O error",
    sqlite3.SQLITE_CORRUPT: "is damaged: the database file is malformed",
    sqlite3.SQLITE_NOTADB: "is damaged: the file is not an SQLite database",
}


def _code(exc: BaseException) -> int:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one


@unavailable_on(
    (sqlite3.DatabaseError,),
    StoreUnavailable,
    "the job store (SQLite)",
    when=lambda exc: _code(exc) in _OUT_OF_ORDER,
    state=lambda exc: _OUT_OF_ORDER[_code(exc)],
)
class SQLiteJobStore:
    def __init__(self, path: str | Path, busy_timeout: float = _BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Each thread's connection, with its thread: the server's worker threads come and go (anyio lets an idle
        # one end after 10 s), and a connection left open by each would, burst after burst, use up the process's
        # file descriptors until the store could not be opened at all.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._pid = os.getpid()
        try:
            with self._tx() as conn:
                # Statement by statement: executescript() would COMMIT behind our BEGIN IMMEDIATE.
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
        except sqlite3.DatabaseError as exc:  # at start, the operator is told which file
            if _code(exc) not in _OUT_OF_ORDER:
                raise
            unavailable = StoreUnavailable(f"the job store {self.path} {_OUT_OF_ORDER[_code(exc)]}: {exc}")
            unavailable.public = f"the job store (SQLite) {_OUT_OF_ORDER[_code(exc)]}"
            raise unavailable from exc

    # ---- connections -------------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        # A forked child must not touch its parent's connections (SQLite forbids it); it opens its own.
        if os.getpid() != self._pid:
            self._local = threading.local()
            self._lock = threading.Lock()  # another thread may have held it at the fork
            self._connections = []
            self._pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN ourselves. check_same_thread=False only so close() can
            # close every thread's connection; each connection is otherwise used by its own thread.
            timeout = self._busy_timeout
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._wal(conn, timeout)
            # FULL fsyncs the WAL at every commit: an acknowledged enqueue survives power loss, not just kill -9.
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn = conn
            with self._lock:
                for thread, old in [pair for pair in self._connections if not pair[0].is_alive()]:
                    old.close()  # its thread has ended: nobody will use it again
                    self._connections.remove((thread, old))
                self._connections.append((threading.current_thread(), conn))
        return conn

    @staticmethod
    def _wal(conn: sqlite3.Connection, timeout: float) -> None:
        """Turn on WAL. Changing the journal mode does not wait in the busy handler: processes opening a new
        store at the same moment (an API and a worker started together on a fresh data dir) were refused at
        once with "database is locked", one of them ending at start. Tried again, as busy_timeout would."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if _code(exc) != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # a disk error may have made SQLite roll it back already
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---- rows --------------------------------------------------------------------------------------------

    @staticmethod
    def _load(conn: sqlite3.Connection, job_id: str) -> Job:
        row = conn.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise SQLiteJobStore._missing(conn, job_id)
        return Job.from_dict(json.loads(row[0]))

    @staticmethod
    def _missing(conn: sqlite3.Connection, job_id: str) -> JobNotFound:
        """Told apart from an id never known: a job deleted or expired lately "no longer exists"."""
        since = time.time() - CURSOR_TTL_S
        gone = conn.execute("SELECT 1 FROM gone WHERE id = ? AND gone_at >= ?", (job_id, since)).fetchone()
        return JobNotFound(job_id, deleted=gone is not None)

    @staticmethod
    def _save(conn: sqlite3.Connection, job: Job) -> None:
        conn.execute(
            "UPDATE jobs SET status = ?, priority = ?, lease_expires_at = ?, expires_at = ?, data = ? WHERE id = ?",
            (job.status.value, job.priority, job.lease_expires_at, job.expires_at, json.dumps(job.to_dict()), job.id),
        )

    def _held(self, conn: sqlite3.Connection, job_id: str, worker_id: str) -> Job | None:
        """The job if `worker_id` runs it now, else None (finished, reaped, handed on, deleted)."""
        try:
            job = self._load(conn, job_id)
        except JobNotFound:
            return None
        if job.status != JobStatus.IN_PROGRESS or job.worker_id != worker_id:
            return None
        return job

    @staticmethod
    def _finish(job: Job, status: JobStatus, ttl: float, now: float) -> None:
        job.status = status
        job.updated_at = job.completed_at = now
        job.expires_at = now + ttl
        job.lease_expires_at = None

    @staticmethod
    def _requeue(job: Job, now: float) -> None:
        job.status = JobStatus.QUEUED
        job.updated_at = job.queued_at = now
        job.worker_id = job.lease_expires_at = job.started_at = job.stage = None
        job.progress = 0.0

    # ---- JobStore ----------------------------------------------------------------------------------------

    def enqueue(self, job: Job, max_queued: int | None = None) -> Job:
        if job.status != JobStatus.QUEUED:
            raise ValueError(f"enqueue takes a queued job, not a {job.status.value} one")
        stored = replace(job)
        with self._tx() as conn:
            key, now = job.idempotency_key, time.time()
            if key is not None:
                row = conn.execute(
                    "SELECT job_id FROM idempotency WHERE key = ? AND expires_at > ?", (key, now)
                ).fetchone()
                if row is not None:
                    try:
                        return self._load(conn, row[0])
                    except JobNotFound:  # deleted since: the key is free again
                        pass
            if max_queued is not None and self._depth(conn, job.model) >= max_queued:
                raise QueueFull(job.model, max_queued, QUEUE_FULL_RETRY_AFTER)
            try:
                conn.execute(
                    "INSERT INTO jobs (id, model, status, priority, created_at, lease_expires_at, expires_at, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.id,
                        job.model,
                        job.status.value,
                        job.priority,
                        job.created_at,
                        job.lease_expires_at,
                        job.expires_at,
                        json.dumps(stored.to_dict()),
                    ),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a job with id {job.id!r} already exists") from None
            if key is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency (key, job_id, expires_at) VALUES (?, ?, ?)",
                    (key, job.id, now + IDEMPOTENCY_TTL_S),
                )
                # A few expired keys go with each new one: the table stays the size of a day's keyed creates.
                conn.execute(
                    "DELETE FROM idempotency WHERE key IN"
                    " (SELECT key FROM idempotency WHERE expires_at <= ? ORDER BY expires_at LIMIT 16)",
                    (now,),
                )
        return stored

    def get(self, job_id: str) -> Job:
        return self._load(self._conn(), job_id)

    def claim(
        self, model: str, worker_id: str, lease_seconds: float, now: float | None = None, op: str | None = None
    ) -> Job | None:  # `op`: see complete's
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute(
                "SELECT data FROM jobs WHERE model = ? AND status = 'queued' ORDER BY priority DESC, seq LIMIT 1",
                (model,),
            ).fetchone()
            if row is None:
                return None
            job = Job.from_dict(json.loads(row[0]))
            job.status = JobStatus.IN_PROGRESS
            job.attempts += 1
            job.worker_id = worker_id
            job.started_at = job.updated_at = now
            job.lease_expires_at = now + lease_seconds
            self._save(conn, job)
        return job

    def claimed(self, worker_id: str, op: str) -> Job | None:
        return None  # a transaction commits or raises: no claim's reply is ever lost

    def peek(self, model: str, limit: int = 1) -> list[Job]:
        rows = self._conn().execute(
            "SELECT data FROM jobs WHERE model = ? AND status = 'queued' ORDER BY priority DESC, seq LIMIT ?",
            (model, max(limit, 0)),
        )
        return [Job.from_dict(json.loads(row[0])) for row in rows.fetchall()]

    def renew(self, job_id: str, worker_id: str, lease_seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            if job is None:
                return False
            # Still extended when cancel is requested: the worker holds the job until it marks it cancelled.
            job.lease_expires_at = now + lease_seconds
            self._save(conn, job)
            return not job.cancel_requested

    def set_progress(self, job_id: str, worker_id: str, progress: float, stage: str | None = None) -> bool:
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            if job is None:
                return False
            job.progress = min(max(progress, 0.0), 1.0)
            if stage is not None:
                job.stage = stage
            job.updated_at = time.time()
            self._save(conn, job)
            return not job.cancel_requested

    # `op` needs no keeping here: a transaction either commits or raises, so a retry never follows a lost reply.
    def complete(self, job_id: str, worker_id: str, result: dict[str, Any], ttl: float, op: str | None = None) -> bool:
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            if job is None or job.cancel_requested:
                return False
            job.result = result
            job.progress, job.stage = 1.0, "done"
            self._finish(job, JobStatus.COMPLETED, ttl, time.time())
            self._save(conn, job)
            return True

    def fail(self, job_id: str, worker_id: str, code: str, message: str, ttl: float, op: str | None = None) -> bool:
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            if job is None:
                return False
            job.error_code, job.error_message = code, message
            self._finish(job, JobStatus.FAILED, ttl, time.time())
            self._save(conn, job)
            return True

    def mark_cancelled(self, job_id: str, worker_id: str, ttl: float, op: str | None = None) -> bool:
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            if job is None:
                return False
            self._finish(job, JobStatus.CANCELLED, ttl, time.time())
            self._save(conn, job)
            return True

    def release(self, job_id: str, worker_id: str) -> bool:
        with self._tx() as conn:
            job = self._held(conn, job_id, worker_id)
            # A job the user cancelled must not run again: the worker marks it cancelled (or reap does).
            if job is None or job.cancel_requested:
                return False
            job.attempts -= 1
            self._requeue(job, time.time())
            self._save(conn, job)
            return True

    def request_cancel(self, job_id: str, ttl: float, now: float | None = None) -> tuple[Job, bool]:
        now = time.time() if now is None else now
        with self._tx() as conn:
            job = self._load(conn, job_id)
            ended = job.status == JobStatus.QUEUED
            if ended:
                self._finish(job, JobStatus.CANCELLED, ttl, now)
                self._save(conn, job)
            elif job.status == JobStatus.IN_PROGRESS and not job.cancel_requested:
                job.cancel_requested = True
                job.updated_at = now
                self._save(conn, job)
        return job, ended

    def reap(self, max_attempts: int, ttl: float, now: float | None = None) -> list[Job]:
        now = time.time() if now is None else now
        changed: list[Job] = []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT data FROM jobs WHERE status = 'in_progress' AND lease_expires_at < ? ORDER BY seq", (now,)
            ).fetchall()
            for (data,) in rows:
                job = Job.from_dict(json.loads(data))
                if job.cancel_requested:  # its worker died while stopping: the user's cancel stands
                    self._finish(job, JobStatus.CANCELLED, ttl, now)
                elif job.attempts >= max_attempts:
                    job.error_code, job.error_message = "worker_lost", WORKER_LOST_MESSAGE % job.attempts
                    self._finish(job, JobStatus.FAILED, ttl, now)
                else:
                    self._requeue(job, now)
                self._save(conn, job)
                changed.append(job)
        return changed

    def queue_position(self, job_id: str) -> int | None:
        conn = self._conn()
        row = conn.execute(
            """
            SELECT j.status, (
                SELECT COUNT(*) FROM jobs o
                WHERE o.model = j.model AND o.status = 'queued'
                  AND (o.priority > j.priority OR (o.priority = j.priority AND o.seq < j.seq))
            )
            FROM jobs j WHERE j.id = ?
            """,
            (job_id,),
        ).fetchone()
        if row is None:
            raise self._missing(conn, job_id)
        status, ahead = row
        return ahead + 1 if status == JobStatus.QUEUED.value else None

    @staticmethod
    def _depth(conn: sqlite3.Connection, model: str) -> int:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE model = ? AND status = 'queued'", (model,)).fetchone()[0]

    def queue_depth(self, model: str) -> int:
        return self._depth(self._conn(), model)

    def keyed(self, key: str) -> bool:
        row = self._conn().execute(
            "SELECT 1 FROM idempotency JOIN jobs ON jobs.id = idempotency.job_id"
            " WHERE idempotency.key = ? AND idempotency.expires_at > ?",
            (key, time.time()),
        )
        return row.fetchone() is not None

    def running_count(self, model: str) -> int:
        row = self._conn().execute("SELECT COUNT(*) FROM jobs WHERE model = ? AND status = 'in_progress'", (model,))
        return row.fetchone()[0]

    def counts(self, model: str) -> Counts:
        # One statement, so one snapshot: the count of the queue, then the holder of each running job.
        rows = (
            self._conn()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE model = ? AND status = 'queued' UNION ALL"
                " SELECT COALESCE(json_extract(data, '$.worker_id'), id) FROM jobs"
                " WHERE model = ? AND status = 'in_progress'",
                (model, model),
            )
            .fetchall()
        )
        holders = [str(holder) for (holder,) in rows[1:]]
        return Counts(int(rows[0][0]), len(holders), len({holder_worker(h) for h in holders}))

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")
        conn = self._conn()
        where, params = "", ()
        if after is not None:
            row = conn.execute(
                "SELECT seq FROM jobs WHERE id = ? UNION ALL SELECT seq FROM gone WHERE id = ? AND gone_at >= ?",
                (after, after, time.time() - CURSOR_TTL_S),
            ).fetchone()
            if row is None:
                raise JobNotFound(after)
            where, params = ("WHERE seq < ?" if order == "desc" else "WHERE seq > ?"), (row[0],)
        rows = conn.execute(
            f"SELECT data FROM jobs {where} ORDER BY seq {order.upper()} LIMIT ?", (*params, limit + 1)
        ).fetchall()
        jobs = [Job.from_dict(json.loads(data)) for (data,) in rows[:limit]]
        return jobs, len(rows) > limit

    def delete(self, job_id: str) -> Job:
        with self._tx() as conn:
            job = self._load(conn, job_id)
            if job.status == JobStatus.IN_PROGRESS and not job.cancel_requested:
                raise InvalidRequest("id", "the job is running; cancel it before deleting it")
            (seq,) = conn.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            # Its place in the list outlives it for a while (CURSOR_TTL_S): see `list`.
            now = time.time()
            conn.execute("INSERT OR REPLACE INTO gone (id, seq, gone_at) VALUES (?, ?, ?)", (job_id, seq, now))
            conn.execute("DELETE FROM gone WHERE gone_at < ?", (now - CURSOR_TTL_S,))
        return job

    def expired(self, now: float | None = None, limit: int = 100, skip: int = 0) -> list[Job]:
        now = time.time() if now is None else now
        rows = (
            self._conn()
            .execute(
                "SELECT data FROM jobs WHERE expires_at <= ? ORDER BY expires_at, seq LIMIT ? OFFSET ?",
                (now, limit, skip),
            )
            .fetchall()
        )
        return [Job.from_dict(json.loads(data)) for (data,) in rows]

    def ping(self) -> bool:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return has_room(self.path.parent)  # reads still work on a full disk; the next submit would not

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for _thread, conn in connections:
            conn.close()
        self._local = threading.local()
