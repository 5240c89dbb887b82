"""Housekeeping every worker and API replica shares: requeueing the jobs of workers that died (their leases ran
out), and deleting finished jobs whose time is up (`WANSERVE_RESULT_TTL`): their files first, then their records.

Workers sweep on their housekeeping thread and API replicas on one of their own, so both happen on time while
no worker runs (KEDA has scaled a model's workers to zero, or a torchrun group died with its job). Sweepers
may race: the store hands each lost job to one of them, and a job another one deleted first is simply gone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any

from wanserve.errors import JobNotFound, StorageUnavailable, StoreUnavailable
from wanserve.jobs.model import JobStore
from wanserve.storage.base import Storage

log = logging.getLogger(__name__)


BATCH = 100


def housekeeping(
    store: JobStore,
    storage: Storage,
    max_attempts: int,
    ttl: float,
    metrics: Any = None,
    served: Collection[str] | None = None,
) -> None:
    """Requeue (or, past `max_attempts`, fail `worker_lost`) the jobs whose leases ran out, then delete expired
    results. An API replica does it too: a job whose worker died read "in_progress" at its last progress for as
    long as no worker ran. `served`: every model `serve` runs (with aliases), where it alone claims jobs."""
    try:
        for job in store.reap(max_attempts, ttl):
            log.warning(
                "job %s lost its worker on attempt %d of %d: now %s", job.id, job.attempts, max_attempts, job.status
            )
            if job.status.finished and metrics is not None:  # failed (worker_lost) or cancelled
                metrics.job_ended_unrun(job.model, job.status.value)
            elif served is not None and job.model not in served:
                # A `serve` killed mid-job and started with other models: its start-up check saw the job still
                # in progress, and nothing else would say that it now waits for good.
                log.warning(unserved_words(1, job.model))
    except StoreUnavailable as exc:  # an outage: one line a round, not a traceback
        log.warning("housekeeping (reap, expiry) waits for the store: %s", exc)
        if exc.refused != "full":
            return
        # A full Redis refuses the requeues, not the deletes: expiry is how it gets room again. (A replica
        # refuses both: files would go, their records stay.)
    except Exception:
        log.exception("housekeeping (reap, expiry) failed")
        return
    delete_expired(store, storage)


def unserved_words(count: int, model: str) -> str:
    return (
        f"{count} queued job(s) are for {model}, which this server does not serve: they wait for a worker that does "
        f"(this server with --model {model}, or a `wanserve worker` on the same store), or delete them "
        "(DELETE /v1/videos/{id})"
    )


def delete_expired(store: JobStore, storage: Storage) -> None:
    failed = 0  # this round's failures, oldest first: the next batch starts past them
    while True:
        try:
            expired = store.expired(limit=BATCH, skip=failed)
        except StoreUnavailable as exc:  # an outage: one line a round, not a traceback
            log.warning("expiry waits for the store: %s", exc)
            return
        except Exception:
            log.exception("expiry failed")
            return
        for job in expired:
            # One by one: a job whose files cannot be deleted now must not hold up every job behind it.
            try:
                storage.delete_prefix(job.id)  # files first: a crash in between leaves a record, not orphans
                store.delete(job.id)
                log.info("job %s expired: record and files deleted", job.id)
            except JobNotFound:
                continue  # another sweeper (a worker, another replica) was first
            except (StorageUnavailable, StoreUnavailable) as exc:  # the next job would wait out the same outage
                log.warning("expiry paused until the next round: %s", exc)
                return
            except Exception as exc:
                failed += 1
                log.warning("job %s expired, but deleting it failed (tried again next round): %s", job.id, exc)
        if len(expired) < BATCH:
            return


class Housekeeper:
    """`housekeeping` every `interval` seconds on a daemon thread, from `start()` until `stop()`."""

    def __init__(
        self, store: JobStore, storage: Storage, interval: float, max_attempts: int, ttl: float, metrics: Any = None
    ) -> None:
        self.store, self.storage, self.interval = store, storage, interval
        self.max_attempts, self.ttl, self.metrics = max_attempts, ttl, metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expiry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            housekeeping(self.store, self.storage, self.max_attempts, self.ttl, self.metrics)
