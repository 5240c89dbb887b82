"""Files in the result storage that belong to no job: `wanserve prune`.

A job's files go with its record, at expiry or delete (files first). Files outlive their record only when the
record was lost some other way: a Redis without its append-only file restarted, a `jobs.db` removed or put back
from an old copy, an API process killed between storing an input image and queueing its job. Nothing sweeps
those on its own: a store pointed at by mistake (another Redis database, an empty file) would make every
video look orphaned, so deleting them is a command a person runs, after reading what it found.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from wanserve.errors import JobNotFound
from wanserve.jobs.model import JobStore
from wanserve.storage.base import Storage

# What `new_job_id` makes: anything else under the storage's root (a file of the operator's, another tool's
# folder sharing the bucket prefix) is no job's, and not ours to delete.
JOB_FOLDER = re.compile(r"video_[0-9a-f]{32}")


@dataclass(frozen=True)
class Orphan:
    job_id: str
    written_at: float  # when its newest file was written


def find_orphans(store: JobStore, storage: Storage, older_than: float, now: float | None = None) -> Iterator[Orphan]:
    """Job folders untouched for `older_than` seconds whose job the store does not know. A folder written more
    recently may belong to a submit in flight (its input image is stored before the job is queued)."""
    cutoff = (time.time() if now is None else now) - older_than
    for name, written_at in storage.job_folders():
        if not JOB_FOLDER.fullmatch(name) or written_at > cutoff:
            continue
        try:
            store.get(name)
        except JobNotFound:
            yield Orphan(name, written_at)
