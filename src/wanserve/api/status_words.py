"""The one place where `JobStatus` becomes each surface's words. Clients of the systems wanserve replaces
compare these strings literally, so every surface takes its words from here and nowhere else."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from wanserve.jobs.model import Job, JobStatus

# OpenAI's video status has no "cancelled": a cancelled job is failed with error.code "cancelled".
OPENAI: Mapping[JobStatus, str] = MappingProxyType(
    {
        JobStatus.QUEUED: "queued",
        JobStatus.IN_PROGRESS: "in_progress",
        JobStatus.COMPLETED: "completed",
        JobStatus.FAILED: "failed",
        JobStatus.CANCELLED: "failed",
    }
)

# /video/* (requestId-style API).
VIDEO: Mapping[JobStatus, str] = MappingProxyType(
    {
        JobStatus.QUEUED: "InQueue",
        JobStatus.IN_PROGRESS: "InProgress",
        JobStatus.COMPLETED: "Succeed",
        JobStatus.FAILED: "Failed",
        JobStatus.CANCELLED: "Cancelled",
    }
)

# /api/v1/* and /submit + /status (task_id-style API).
API_V1: Mapping[JobStatus, str] = MappingProxyType(
    {
        JobStatus.QUEUED: "queued",
        JobStatus.IN_PROGRESS: "processing",
        JobStatus.COMPLETED: "completed",
        JobStatus.FAILED: "failed",
        JobStatus.CANCELLED: "cancelled",
    }
)
SUBMIT: Mapping[JobStatus, str] = API_V1

CANCELLED_CODE = "cancelled"
CANCELLED_MESSAGE = "the job was cancelled"


def job_error(job: Job) -> dict[str, Any] | None:
    """`{code, message}` for a failed or cancelled job, else None. Cancelled jobs always carry code
    `cancelled`, whatever the store recorded, so clients can tell a cancel from a failure."""
    if job.status == JobStatus.CANCELLED:
        return {"code": CANCELLED_CODE, "message": job.error_message or CANCELLED_MESSAGE}
    if job.status == JobStatus.FAILED:
        return {"code": job.error_code or "generation_failed", "message": job.error_message or "generation failed"}
    return None
