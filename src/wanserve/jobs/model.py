"""The job, its one state machine, and the `JobStore` protocol every backend implements. Torch-free.

    queued ──claim──► in_progress ──complete──► completed
      │                   │ ├──fail─────────► failed
      │                   │ ├──cancel───────► cancelled
      │                   │ └──release / lease expired (attempts < max) ──► queued
      └──cancel──► cancelled

Other status words (`InQueue`, `Succeed`, `processing`…) are mappings of these, in `api/status_words.py`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable


class JobStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class Counts(NamedTuple):
    """A model's jobs at one moment."""

    queued: int
    running: int
    # The workers holding the running jobs: one that finishes a video (MP4, upload) while it runs the next
    # holds two jobs, and is still one worker.
    workers: int

    @property
    def demand(self) -> int:
        """The workers that would leave no job waiting: what an autoscaler sizes a model's workers by."""
        return self.queued + self.workers


def holder_worker(worker_id: str) -> str:
    """The worker of a claim (`<worker id>/<claim number>`)."""
    return worker_id.rsplit("/", 1)[0]


def new_job_id() -> str:
    # OpenAI-style prefix; uuid4 hex keeps ids unguessable and URL-safe.
    return f"video_{uuid.uuid4().hex}"


@dataclass
class Job:
    id: str
    model: str
    request: dict[str, Any]  # GenerationRequest.to_dict() of the *resolved* request
    status: JobStatus = JobStatus.QUEUED
    priority: int = 0  # higher runs first; ties run in arrival order
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    queued_at: float | None = None  # when a hand-back or an expired lease put it back in the queue
    completed_at: float | None = None  # set on any finished state
    expires_at: float | None = None  # when a finished job's files are deleted
    progress: float = 0.0  # 0..1
    stage: str | None = None
    attempts: int = 0  # claims so far
    worker_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    error_code: str | None = None
    error_message: str | None = None
    result: dict[str, Any] | None = None  # seed, timings, storage keys, num_frames, fps...
    source: str = "openai"  # which surface created it (openai, video, api_v1, submit)
    idempotency_key: str | None = None  # the client's Idempotency-Key: a retried create finds this job
    fingerprint: str | None = None  # of the create request, so the same key on another request is refused

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @property
    def waiting_since(self) -> float:
        """When it last entered the queue: its queue wait runs from here, not from an earlier attempt."""
        return self.queued_at if self.queued_at is not None else self.created_at

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        # Fields it does not know are left out: a record written by a newer release, read by an older replica
        # during a rolling upgrade, still loads.
        values = {name: value for name, value in data.items() if name in _FIELD_NAMES}
        values["status"] = JobStatus(values["status"])
        return cls(**values)


_FIELD_NAMES = frozenset(f.name for f in fields(Job))


@runtime_checkable
class JobStore(Protocol):
    """What the API and the workers need from a queue. Every method is atomic with respect to the others,
    across processes: two workers never claim the same job, and a job is finished at most once.

    Times are wall-clock seconds (`time.time()`); `now` parameters exist so tests can move time.
    """

    def enqueue(self, job: Job, max_queued: int | None = None) -> Job:
        """Store a new queued job. With `max_queued`, raise QueueFull if that many already wait for its model.

        With `job.idempotency_key`, a job stored under the same key in the last IDEMPOTENCY_TTL_S, and not
        deleted since, is returned instead (its id is not `job.id`) and nothing is stored: a client retrying a
        create whose answer it lost gets the job it made, never a second one, nor QueueFull."""
        ...

    def get(self, job_id: str) -> Job:
        """The job, or JobNotFound."""
        ...

    def claim(
        self, model: str, worker_id: str, lease_seconds: float, now: float | None = None, op: str | None = None
    ) -> Job | None:
        """Take the best waiting job for `model` (highest priority, then oldest): status in_progress,
        attempts + 1, lease until now + lease_seconds. None when nothing waits. `op`, the same on a retry after
        a lost reply (with the same `worker_id`), answers with the job the first call took, not another."""
        ...

    def claimed(self, worker_id: str, op: str) -> Job | None:
        """The job a claim under `op` took and `worker_id` still holds, without claiming anything: None where
        that claim took nothing, never ran, or is forgotten (kept 10 minutes), and always where no reply can be
        lost (SQLite)."""
        ...

    def peek(self, model: str, limit: int = 1) -> list[Job]:
        """The next `limit` jobs `claim` would take for `model`, in that order, unchanged. A hint, not a
        reservation: another worker may claim them first (the worker prefetches their prompts with it)."""
        ...

    def renew(self, job_id: str, worker_id: str, lease_seconds: float, now: float | None = None) -> bool:
        """Extend the lease. Returns whether the caller should keep going: False (and the worker must stop)
        when the job is no longer in_progress under this worker, or when cancel was requested."""
        ...

    def set_progress(self, job_id: str, worker_id: str, progress: float, stage: str | None = None) -> bool:
        """Record progress 0..1; same return meaning as `renew`."""
        ...

    def complete(self, job_id: str, worker_id: str, result: dict[str, Any], ttl: float, op: str | None = None) -> bool:
        """in_progress -> completed (progress 1, stage "done"), only if this worker holds the job and nobody asked
        to cancel it. False otherwise (no change): a cancel that came while the video was decoded or stored still
        wins. `op`, the same on every retry of one write, makes a retry after a lost reply answer as the first
        call did (complete, fail and mark_cancelled alike)."""
        ...

    def fail(self, job_id: str, worker_id: str, code: str, message: str, ttl: float, op: str | None = None) -> bool:
        """in_progress -> failed, only if this worker holds the job."""
        ...

    def mark_cancelled(self, job_id: str, worker_id: str, ttl: float, op: str | None = None) -> bool:
        """in_progress -> cancelled, by the worker that saw the cancel request and stopped."""
        ...

    def release(self, job_id: str, worker_id: str) -> bool:
        """Hand a running job back to the queue (drain): in_progress -> queued, keeping its place by priority
        and original arrival. The attempt is not counted against max_attempts."""
        ...

    def request_cancel(self, job_id: str, ttl: float, now: float | None = None) -> tuple[Job, bool]:
        """A queued job becomes cancelled at once, with `completed_at` = `now`; a running one gets
        cancel_requested (the worker stops at its next step). Finished jobs are returned unchanged.
        Returns the job and whether this call ended it: of several cancels racing for one queued job, exactly
        one says so (the API counts the cancel there)."""
        ...

    def reap(self, max_attempts: int, ttl: float, now: float | None = None) -> list[Job]:
        """Jobs whose lease expired: back to queued, or failed (code `worker_lost`) once attempts reached
        max_attempts. Returns the jobs changed."""
        ...

    def queue_position(self, job_id: str) -> int | None:
        """1-based place among the jobs waiting for the same model; None if the job is not queued."""
        ...

    def queue_depth(self, model: str) -> int: ...

    def keyed(self, key: str) -> bool:
        """Whether a job made under this idempotency key in the last IDEMPOTENCY_TTL_S still exists (a create
        under it would be answered with that job)."""
        ...

    def running_count(self, model: str) -> int: ...

    def counts(self, model: str) -> Counts:
        """`model`'s queued and running jobs and busy workers, read in one snapshot: a job being claimed or
        handed back meanwhile is counted once, never twice or not at all (what an autoscaler reads must not
        flicker)."""
        ...

    def list(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[Job], bool]:
        """Jobs by creation time (`order` asc|desc), starting after the job id `after`; returns (jobs, has_more).
        `after` may name a job deleted within CURSOR_TTL_S: paging goes on from where it stood."""
        ...

    def delete(self, job_id: str) -> Job:
        """Remove the record (the caller removes files). A running job must be cancelled first."""
        ...

    def expired(self, now: float | None = None, limit: int = 100, skip: int = 0) -> list[Job]:
        """Finished jobs whose expires_at has passed (their files are due for deletion), oldest first, past the
        first `skip` of them (those a sweep failed to delete this round)."""
        ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...
