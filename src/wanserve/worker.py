"""The worker loop: claim → generate (progress and lease written as it goes) → store files → complete.

One `Worker` serves one model with one resident engine. It is used in-process by `wanserve serve` and as
its own process by `wanserve worker`. Draining (SIGTERM, POST /drain) stops claiming; the running job gets
`shutdown_grace` seconds to finish and is otherwise handed back to the queue at its next step.

With `overlap_jobs` (the default) the GPU does not wait between queued jobs: once a job's frames are
decoded, its MP4 encoding, upload and completion run on a finisher thread while the loop claims the next
job, and while a job denoises the next queued job's prompt is encoded on a prefetch thread.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from wanserve.config import Settings
from wanserve.errors import (
    Cancelled,
    InvalidRequest,
    JobNotFound,
    ParallelGroupError,
    StorageUnavailable,
    StoreUnavailable,
    public_reason,
)
from wanserve.expiry import housekeeping
from wanserve.inputs import InputMissing, load_request
from wanserve.jobs.model import Job, JobStatus, JobStore
from wanserve.progress import ProgressEvent
from wanserve.request import GenerationRequest
from wanserve.scratch import job_folder
from wanserve.scratch import remove_orphaned as remove_orphaned_scratch
from wanserve.storage.base import CONTENT_TYPES, THUMBNAIL, VIDEO, Storage, key_for

log = logging.getLogger(__name__)


class GenerationEngine(Protocol):
    """What the worker needs of an engine (the real `Engine`, or a group leader under torchrun)."""

    spec: Any

    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: Any,
        should_cancel: Any,
        *,
        write_async: bool = False,  # True: return a Future once the frames are decoded; the file comes later
    ) -> Any: ...


# How often a busy worker looks at the queue for a prompt to encode ahead of its job.
PREFETCH_INTERVAL_S = 1.0


def new_worker_id(model: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{model}:{uuid.uuid4().hex[:6]}"


T = TypeVar("T")


def _holder(job: Job) -> str:
    """Who holds `job` in the store: the claim this run made (worker id and claim number)."""
    return job.worker_id or ""


# How long the writes that end a job (complete, fail, cancelled) retry an unreachable store, beyond the backend's
# own retries: a Redis restart must not fail a job whose video is made. After that the lease decides.
STORE_OUTAGE_WAIT_S = 60.0
STORE_RETRY_INTERVAL_S = 1.0


@dataclass(eq=False)  # compared by identity: two runs are never the same run
class _Running:
    job: Job
    started: float
    keep_going: bool = True  # False once the store says cancel, or the lease was lost
    stop_reason: str | None = None  # "cancel" | "timeout" | "drain" | "lost"
    # Set when the job ends, so the heartbeat stops at once instead of finishing a lease/3 sleep.
    done: threading.Event = field(default_factory=threading.Event)
    heartbeat: threading.Thread | None = None
    counted: bool = False  # its end is in the metrics already (the heartbeat ended it while it was stuck)
    # The heartbeat's write that ends it while stuck, kept with its token so a retry after a lost reply is the
    # same write (see JobStore.complete's `op`).
    end_write: tuple[str, Callable[[], bool]] | None = None
    end_op: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The store did not answer (after its own retries, ~9 s for Redis): per-step writes wait for the heartbeat
    # to reach it again, instead of holding up every denoising step for those seconds.
    store_down: bool = False


def _generation_error(exc: BaseException) -> str:
    """A failed generation as its client reads it: the model's own words (CUDA out of memory, say) help them;
    a disk error's file name is a server path, so only its errno text is shown."""
    return public_reason(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"


class Worker:
    def __init__(
        self,
        model: str,
        settings: Settings,
        store: JobStore,
        storage: Storage,
        metrics: Any = None,
        engine: GenerationEngine | None = None,
        worker_id: str | None = None,
        start_together: threading.Barrier | None = None,
        served: frozenset[str] | None = None,
    ) -> None:
        self.model = model  # canonical served name (spec.name): the queue it claims from
        # Every model of this `serve` process, which alone claims from its store: a requeued job of another waits.
        self.served = served
        # Workers of one process wait here, loaded or failed, before their first claim: loading a model changes
        # process-wide torch state (default dtype, parameter creation) that a job running beside it would see.
        self.start_together = start_together
        self.settings = settings
        self.store = store
        self.storage = storage
        self.metrics = metrics
        self.engine = engine
        self.worker_id = worker_id or new_worker_id(model)
        self._claims = itertools.count(1)
        # A multi-GPU leader's collectives: a job's (the main loop's) or the beat between jobs (_keep_group).
        self._group_lock = threading.Lock()
        self._group_busy = False
        self.loaded = threading.Event()
        # Set before the first claim: until then the worker holds no job, and a stop need not wait for it
        # (a load or a download takes minutes, and is taken up again at the next start).
        self.claiming = threading.Event()
        self.load_error: str | None = None
        self._draining = threading.Event()
        self._drain_deadline: float | None = None
        self._drain_why = "drain grace ran out"  # what the log says of a job handed back at the deadline
        self._stopped = threading.Event()
        self._running: _Running | None = None
        self._stuck: list[_Running] = []  # jobs whose engine call has not come back for stuck_after
        self._stuck_lock = threading.Lock()  # the heartbeat declares a run stuck; its end clears that
        # Re-entrant: drain() runs in signal handlers, and a second signal (SIGTERM, then Ctrl-C) can arrive while
        # the first handler holds the lock on the same thread; a plain Lock would deadlock the process there.
        self._lock = threading.RLock()
        self._last_idle = 0.0
        # overlap_jobs: one thread finishes the previous job (MP4, upload, complete), one encodes prompts ahead.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"finish-{model}")
        self._finishing: Future[None] | None = None
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"prefetch-{model}")
        self._prefetching: Future[None] | None = None
        self._prefetched: str | None = None  # the last job whose prompt was encoded ahead
        self._last_peek = -PREFETCH_INTERVAL_S

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def load(self) -> None:
        if self.engine is None:
            from wanserve.engine.engine import Engine

            try:
                self.engine = Engine.load(self.model, self.settings)
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                raise
        self.loaded.set()

    @property
    def stuck(self) -> str | None:
        """What this worker is stuck on (an engine call past stuck_after), for liveness probes; None if nothing."""
        with self._stuck_lock:
            stuck = list(self._stuck)  # with overlap_jobs, a hung upload and a hung next job can both be here
        if not stuck:
            return None
        now = time.monotonic()
        return "; ".join(f"job {r.job.id}: the engine has not come back for {now - r.started:.0f} s" for r in stuck)

    @property
    def busy(self) -> bool:
        return self._running is not None or (self._finishing is not None and not self._finishing.done())

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self, grace: float | None = None) -> None:
        """Stop claiming; let the running job finish within `grace` seconds, else hand it back. Called again
        with a shorter grace (a second Ctrl-C), the job goes back sooner."""
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        with self._lock:
            if not self._draining.is_set():
                self._drain_deadline = deadline
                if grace <= 0:
                    self._drain_why = "stopped with no grace"
                self._draining.set()
                log.info("worker %s draining (grace %.0f s)", self.worker_id, grace)
            elif self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
                self._drain_why = "stop asked again"
                log.info("worker %s draining: grace cut to %.0f s", self.worker_id, grace)

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def run(self) -> None:
        """Claim and process jobs until drained. Loads the engine first if it was not given."""
        try:
            try:
                if not self.loaded.is_set() and not self._draining.is_set():  # told to stop first: no load
                    self.load()
            finally:
                if self.start_together is not None:
                    self.start_together.wait()
            if getattr(self.engine, "idle", None) is not None:
                # First: the reap below waits out a store that does not answer (seconds), and the followers,
                # already waiting for the first request, would time out meanwhile.
                threading.Thread(target=self._keep_group, name=f"group-{self.model}", daemon=True).start()
            # Once before the first claim (a restarted worker requeues its dead predecessor's job first), then on
            # its own thread: reaping only between claims meant that while every worker was busy (a 30-minute
            # job), a dead worker's job stayed "in_progress" until one of them finished its own.
            self._reap()
            remove_orphaned_scratch()
            threading.Thread(target=self._housekeeping, name=f"reaper-{self.model}", daemon=True).start()
            self.claiming.set()
            down_since: float | None = None
            # A claim whose answer was lost (a Redis that answered after the client's timeout) may have taken a
            # job: it is asked again under the same holder and token, and answers with that job. A new claim
            # left it running for nobody until its lease ran out, an attempt spent.
            unanswered: tuple[str, str] | None = None
            while not self._draining.is_set():
                # Each claim holds the job under a name of its own: a run that lost its lease, while this
                # worker claimed the job again, is no longer its holder, and the store refuses its writes.
                holder, op = unanswered or (f"{self.worker_id}/{next(self._claims)}", uuid.uuid4().hex)
                try:
                    job = self.store.claim(self.model, holder, self.settings.lease_seconds, op=op)
                except StoreUnavailable as exc:  # wait it out: /ready says so meanwhile
                    log.warning("worker %s: %s; trying again", self.worker_id, exc)
                    unanswered = (holder, op)
                    down_since = down_since or time.monotonic()
                    self._draining.wait(STORE_RETRY_INTERVAL_S)
                    continue
                unanswered = None
                if down_since is not None:  # the outage's end, in the log as its start is
                    log.info(
                        "worker %s: the job store answers again (after %.0f s)",
                        self.worker_id,
                        time.monotonic() - down_since,
                    )
                    down_since = None
                if job is None:
                    self._draining.wait(self.settings.poll_interval)
                    continue
                with self._group_lock:  # a beat under way ends first: then the job's collectives are the news
                    self._group_busy = True
                try:
                    self.process(job)
                finally:
                    self._group_busy = False
            if unanswered is not None:
                self._hand_back_unanswered(*unanswered)
        finally:
            self._wait_finishing()  # a drained worker exits after its last video is stored, not before
            self._finisher.shutdown()
            self._prefetcher.shutdown(cancel_futures=True)
            stop_group = getattr(self.engine, "stop", None)  # a GroupLeader releases its follower ranks
            if stop_group is not None:
                with self._group_lock:
                    self._group_busy = True  # no beat after the stop
                    stop_group()
            self._stopped.set()
            log.info("worker %s stopped", self.worker_id)

    def _hand_back_unanswered(self, holder: str, op: str) -> None:
        """Drained while a claim's answer was lost: the job it may have taken goes back to the queue now, in its
        place, rather than staying "running" for nobody until its lease runs out."""
        try:
            job = self.store.claimed(holder, op)  # not a claim again: one that never ran would take a job now
            if job is None:
                return
            if job.cancel_requested:  # cancelled meanwhile: a release is refused, and it would not run again
                removed = self._remove_files(job, patient=False)  # its input image
                if self.store.mark_cancelled(job.id, holder, self.settings.result_ttl):
                    log.info("job %s cancelled before it ran: %s", job.id, _files_said(removed))
                    if self.metrics is not None:
                        self.metrics.job_ended_unrun(job.model, "cancelled")
            elif self.store.release(job.id, holder):
                log.info("job %s handed back to the queue (claimed as the store stopped answering)", job.id)
        except StoreUnavailable as exc:  # still down: its lease decides
            log.warning("worker %s: %s; a job it may have claimed goes back when its lease ends", self.worker_id, exc)

    def _keep_group(self) -> None:
        """Follower ranks wait for the next request in a collective that times out: between jobs, they hear
        from the leader on this thread, whatever the main loop waits on (a claim that retries through a store
        outage for seconds at a time, an upload that retries through a storage one)."""
        interval = min(self.settings.collective_timeout / 4, 10.0)
        while not self._stopped.wait(interval / 2):
            self._keep_group_alive()

    def _keep_group_alive(self) -> None:
        idle = getattr(self.engine, "idle", None)
        if idle is None:
            return
        with self._group_lock:
            now = time.monotonic()
            if self._group_busy or now - self._last_idle < min(self.settings.collective_timeout / 4, 10.0):
                return
            self._last_idle = now
            try:
                idle()
            except Exception:  # a group that broke: the main loop's next collective says so, and ends it
                log.exception("worker %s: could not reach its follower ranks", self.worker_id)

    def _housekeeping(self) -> None:
        """`_reap` every lease/3, busy or idle, until this worker drains."""
        interval = self.settings.housekeeping_interval
        while not self._draining.wait(interval):
            self._reap()

    def _reap(self) -> None:
        """Housekeeping every worker shares: requeue jobs of dead workers, delete expired results."""
        settings = self.settings
        housekeeping(self.store, self.storage, settings.max_attempts, settings.result_ttl, self.metrics, self.served)

    # ---- one job -----------------------------------------------------------------------------------------

    def process(self, job: Job) -> None:
        """Run one claimed job to its end, or (overlap_jobs) until its frames are decoded, handing the rest to
        the finisher thread."""
        assert self.engine is not None
        # Both ends by the store's clock (the claim's started_at), not this host's: hosts' clocks disagree.
        waited = max((job.started_at or time.time()) - job.waiting_since, 0.0)
        running = _Running(job=job, started=time.monotonic())
        self._running = running
        log.info("job %s claimed (attempt %d, waited %.1f s)", job.id, job.attempts, waited)
        if self.metrics is not None:
            self.metrics.job_claimed(job.model, waited)
        running.heartbeat = threading.Thread(
            target=self._heartbeat, args=(running,), name=f"heartbeat-{job.id}", daemon=True
        )
        running.heartbeat.start()
        scratch: Path | None = None
        status = "failed"
        handed_off = False
        try:
            try:
                scratch = job_folder(job.id)
            except OSError as exc:  # a full or read-only $TMPDIR: this job fails, the worker (and serve's API) stays
                log.error("job %s: no scratch folder for its video: %s", job.id, exc)
                status = self._fail(
                    job, "generation_failed", f"the worker cannot write its files: {public_reason(exc)}"
                )
                return
            outcome = self._generate(running, scratch)
            if isinstance(outcome, str):
                status = outcome
            elif isinstance(outcome, Future):
                # At most one finished video waits for its MP4 and upload while the next job runs.
                self._wait_finishing()
                self._finishing = self._finisher.submit(self._finish, running, outcome.result, scratch)
                handed_off = True
            else:
                status = self._store_result(running, outcome)
        finally:
            self._running = None
            if not handed_off:
                self._end(running, status, scratch)

    def _wait_finishing(self) -> None:
        if self._finishing is None:
            return
        # An upload that retries through a storage outage may take minutes: the follower ranks hear from
        # the leader meanwhile (no collective is under way here), or their collective times out.
        busy, self._group_busy = self._group_busy, False
        try:
            self._finishing.result()  # _finish logs its own errors and never raises
        finally:
            with self._group_lock:
                self._group_busy = busy

    def _finish(self, running: _Running, result: Callable[[], Any], scratch: Path) -> None:
        """On the finisher thread: wait for the MP4, then store it and complete the job."""
        status = "failed"
        try:
            try:
                generated = result()
            except Exception as exc:
                log.exception("job %s: writing the video failed", running.job.id)
                status = self._fail(running.job, "generation_failed", _generation_error(exc))
            else:
                status = self._store_result(running, generated)
        except Exception:
            log.exception("job %s: finishing failed", running.job.id)
        finally:
            self._end(running, status, scratch)

    def _end(self, running: _Running, status: str, scratch: Path | None) -> None:
        with self._stuck_lock:
            running.done.set()  # wakes the heartbeat: the join no longer costs up to lease/3 after every job
            if running in self._stuck:
                self._stuck.remove(running)
                log.warning("job %s: the engine came back after all; its result was dropped", running.job.id)
        if running.heartbeat is not None:
            running.heartbeat.join(timeout=5)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if self.metrics is not None and status in ("completed", "failed", "cancelled") and not running.counted:
            self.metrics.job_finished(running.job.model, status, time.monotonic() - running.started)

    def _fail(self, job: Job, code: str, message: str) -> str:
        """Fail the job; "failed", or "lost" when the store took no change (the job was no longer this worker's)."""
        ttl = self.settings.result_ttl
        try:
            if self._store_write(
                "failing it", lambda op: self.store.fail(job.id, _holder(job), code, message, ttl, op)
            ):
                # Every failure says so in the log, those without a traceback too (a timeout, a missing input).
                log.warning("job %s failed (%s): %s", job.id, code, message)
                return "failed"
        except StoreUnavailable:
            log.error("job %s: could not record its failure (%s); its lease will run out", job.id, code)
        return "lost"

    def _store_write(self, what: str, write: Callable[[str], T]) -> T:
        """A store write that ends a job, retried while the store cannot be reached (see STORE_OUTAGE_WAIT_S). Every
        try passes the same token (`op`): a write that went through although its reply was lost answers the
        retry as it answered the first time, instead of "no change", which would drop a stored result."""
        op = uuid.uuid4().hex
        return self._wait_out(StoreUnavailable, f"job store unavailable while {what}", lambda: write(op), drain=True)

    def _storage_call(
        self, what: str, call: Callable[[], T], deadline: float | None = None, stop: Callable[[], bool] | None = None
    ) -> T:
        """A storage call a job's end depends on (its upload, removing its files), retried while the storage
        cannot be reached, as store writes are: a blip of S3 must not throw away a finished video, nor leave the
        files of a cancelled or deleted job behind. Tries start until `deadline` (default: a minute from now),
        or until `stop` says they are no longer wanted; a drain waits for them, as it waits for any decoded video
        to be stored."""
        return self._wait_out(StorageUnavailable, f"result storage unavailable while {what}", call, deadline, stop=stop)

    def _wait_out(
        self,
        unavailable: type[Exception],
        what: str,
        call: Callable[[], T],
        deadline: float | None = None,
        drain: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> T:
        """`call`, tried again every STORE_RETRY_INTERVAL_S while it raises `unavailable`, until `deadline`
        (default: STORE_OUTAGE_WAIT_S from now), `stop()` is true or, with `drain`, a drain's deadline passes."""
        deadline = time.monotonic() + STORE_OUTAGE_WAIT_S if deadline is None else deadline
        while True:
            try:
                return call()
            except unavailable as exc:
                if time.monotonic() >= deadline or (drain and self._drain_deadline_passed()) or (stop and stop()):
                    raise
                log.warning("%s; trying again: %s", what, exc)
                time.sleep(STORE_RETRY_INTERVAL_S)

    def _drain_deadline_passed(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline

    def _generate(self, running: _Running, scratch: Path) -> str | Any:
        """The engine's result (or, with overlap_jobs, a Future of it), or the status the job ended with."""
        job, store = running.job, self.store
        assert self.engine is not None
        last_write = 0.0

        def go_on(answer: Callable[[], bool]) -> bool:
            """The store's answer to renew or set_progress; while it cannot be reached, go on: the lease decides.
            One write finds it down; the next ones wait until the heartbeat has reached it again."""
            if running.store_down:
                return True
            try:
                return answer()
            except StoreUnavailable as exc:
                running.store_down = True
                log.warning("job %s: %s; generating on, without progress writes until it answers", job.id, exc)
                return True

        def on_progress(event: ProgressEvent) -> None:
            nonlocal last_write
            if event.stage == "done":  # the video is written, not stored: complete() says done, a cancel may not
                return
            if event.stage == "vae_decode":
                # Rank 0 alone decodes, writes and stores from here: its followers wait for the next word, and
                # the keep-alive beat gives it, or they time out during a decode, an upload or a store outage.
                self._group_busy = False
            if event.stage == "denoise":
                if not go_on(lambda: store.renew(job.id, _holder(job), self.settings.lease_seconds)):
                    running.keep_going = False
                if self.metrics is not None and event.step_seconds is not None:
                    self.metrics.denoise_step(job.model, event.step_seconds)
                self._maybe_prefetch()
            now = time.monotonic()
            last_step = event.stage == "denoise" and event.step == event.total_steps
            if now - last_write >= self.settings.progress_interval or event.stage != "denoise" or last_step:
                last_write = now
                if not go_on(lambda: store.set_progress(job.id, _holder(job), event.progress, event.stage)):
                    running.keep_going = False

        def should_cancel() -> bool:
            if not running.keep_going:
                running.stop_reason = running.stop_reason or "cancel"
                return True
            if time.monotonic() - running.started > self.settings.task_timeout:
                running.stop_reason = "timeout"
                return True
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                running.stop_reason = "drain"
                return True
            return False

        try:
            request = self._storage_call("reading its input image", lambda: load_request(job.request, self.storage))
        except InputMissing as exc:
            return self._fail(job, "input_missing", str(exc))
        except Exception as exc:  # still unreachable after the retries: as when the video cannot be stored
            log.warning("job %s: its input image could not be read: %s", job.id, exc)
            return self._fail(job, "storage_failed", f"the input image could not be read: {public_reason(exc)}")
        try:
            if self.settings.overlap_jobs:
                return self.engine.generate(request, scratch / VIDEO, on_progress, should_cancel, write_async=True)
            return self.engine.generate(request, scratch / VIDEO, on_progress, should_cancel)
        except Cancelled as exc:
            return self._stopped_early(running, exc)
        except InvalidRequest as exc:  # checked at submit; reaching here means the model changed
            return self._fail(job, "invalid_request", str(exc))
        except Exception as exc:
            if getattr(self.engine, "ctx", None) is not None:
                # In a torchrun group an error on one rank leaves the others mid-collective: the group is
                # out of step. Exit so it restarts; the job's lease runs out and it is redelivered, and a
                # job that keeps doing this ends failed after max_attempts.
                raise ParallelGroupError(f"job {job.id}: {type(exc).__name__}: {exc}") from exc
            log.exception("job %s failed", job.id)
            return self._fail(job, "generation_failed", _generation_error(exc))

    def _store_result(self, running: _Running, result: Any) -> str:
        """Upload the video and thumbnail, then complete the job, unless it was cancelled or deleted meanwhile:
        decoding and uploading take long enough on a real model for a user to change their mind."""
        job = running.job
        try:
            return self._store_and_complete(running, result)
        except StoreUnavailable as exc:  # still down after STORE_OUTAGE_WAIT_S: the lease runs out, the job reruns
            log.error("job %s: %s; leaving it to its lease", job.id, exc)
            return "lost"

    def _store_and_complete(self, running: _Running, result: Any) -> str:
        job = running.job
        lease = self.settings.lease_seconds
        if not running.keep_going or not self._store_write(
            "checking for a cancel", lambda _op: self.store.renew(job.id, _holder(job), lease)
        ):
            return self._cancelled_or_lost(running, "cancelled after its last step")
        try:
            # Keys are the job id, so a redelivered job overwrites its files instead of duplicating them.
            deadline = time.monotonic() + STORE_OUTAGE_WAIT_S  # one minute for both files, not one each
            for name, path in ((VIDEO, result.video_path), (THUMBNAIL, result.thumbnail_path)):
                put = functools.partial(self.storage.put_file, key_for(job.id, name), path, CONTENT_TYPES[name])
                # A cancel seen meanwhile (the heartbeat's renewal) ends the retries: the video is not wanted.
                self._storage_call(f"storing its {name}", put, deadline, stop=lambda: not running.keep_going)
        except Exception as exc:
            # Asked to stop meanwhile (a cancel, a delete): that is how it ends, not as a storage failure.
            if not running.keep_going or not self._store_write(
                "checking for a cancel", lambda _op: self.store.renew(job.id, _holder(job), lease)
            ):
                log.warning("job %s: storing the video failed (%s) after it was cancelled", job.id, exc)
                # The storage just failed: its files are left to its expiry rather than tried for a minute, while
                # the cancel the user waits to see is not written.
                return self._cancelled_or_lost(running, "cancelled while its video was stored", patient=False)
            # Generating again would not help while the storage refuses it; the worker itself keeps serving.
            log.exception("job %s: storing the video failed", job.id)
            status = self._fail(job, "storage_failed", f"the video could not be stored: {public_reason(exc)}")
            # No half-stored job; but only once it has ended: a job still to run again (the failure could not be
            # written, its lease will run out) needs its input image, and a rerun overwrites the rest.
            if status == "failed":
                try:
                    self.storage.delete_prefix(job.id)
                except Exception as cleanup:  # the expiry sweep tries again
                    log.warning("job %s: removing its partial files failed too: %s", job.id, cleanup)
            return status
        payload = {
            "seed": result.seed,
            "width": result.width,
            "height": result.height,
            "num_frames": result.num_frames,
            "fps": result.fps,
            "seconds": round(result.num_frames / result.fps, 3),
            "timings": result.timings,
            "preset": result.preset,
            # What of the preset this machine applied: a GPU without FP8 serves `fastest` without it.
            "accelerations": result.accelerations,
            # What a lossy preset's step cache saved (0 under exact): the price of its speed, per video.
            "step_cache": {"skipped_fraction": result.skipped_fraction, "skipped_steps": result.skipped_steps},
            "video_key": key_for(job.id, VIDEO),
            "thumbnail_key": key_for(job.id, THUMBNAIL),
        }
        ttl = self.settings.result_ttl
        complete = functools.partial(self.store.complete, job.id, _holder(job), payload, ttl)
        if self._store_write("completing it", lambda op: complete(op=op)):
            log.info("job %s completed in %.1f s", job.id, result.timings.get("total", 0.0))
            return "completed"
        return self._cancelled_or_lost(running, "cancelled while its video was stored")

    # ---- prompt prefetch ---------------------------------------------------------------------------------

    def _maybe_prefetch(self) -> None:
        """While a job denoises: now and then, encode the prompt of the job this worker will likely run next."""
        prefetch = getattr(self.engine, "prefetch", None)  # a torchrun group leader has none
        if prefetch is None or not self.settings.overlap_jobs or self._draining.is_set():
            return
        if self._prefetching is not None and not self._prefetching.done():
            return
        now = time.monotonic()
        if now - self._last_peek < PREFETCH_INTERVAL_S:
            return
        self._last_peek = now
        self._prefetching = self._prefetcher.submit(self._prefetch_next, prefetch)

    def _prefetch_next(self, prefetch: Callable[[GenerationRequest], int]) -> None:
        try:
            for job in self.store.peek(self.model, 1):
                if job.id == self._prefetched:  # its prompt is encoded: no need to fetch its image again
                    continue
                if prefetch(load_request(job.request, self.storage)):
                    log.debug("job %s: prompt encoded ahead of its claim", job.id)
                self._prefetched = job.id
        except Exception as exc:  # only a hint: the job reports any real problem when it runs
            log.debug("prompt prefetch skipped: %s: %s", type(exc).__name__, exc)

    def _stopped_early(self, running: _Running, exc: Cancelled) -> str:
        job, store = running.job, self.store
        reason = running.stop_reason
        if reason == "timeout":
            message = (
                f"took longer than WANSERVE_TASK_TIMEOUT ({self.settings.task_timeout:g} s); stopped at step {exc.step}"
            )
            return self._fail(job, "timeout", message)
        try:
            if reason == "drain" and store.release(job.id, _holder(job)):
                log.info("job %s handed back to the queue (%s)", job.id, self._drain_why)
                return "released"
            # A release is refused when the user cancelled meanwhile: then it ends cancelled.
            return self._cancelled_or_lost(running, str(exc))
        except StoreUnavailable as error:  # still down after STORE_OUTAGE_WAIT_S: its lease decides
            log.error("job %s stopped (%s), but %s; leaving it to its lease", job.id, exc, error)
            return "lost"

    def _cancelled_or_lost(self, running: _Running, what: str, patient: bool = True) -> str:
        """End a job the user cancelled or deleted before it completed, leaving no file of it; or let go of one
        the store gave to another worker (its files, under the same keys, are that worker's now). `patient`:
        see `_remove_files`."""
        job = running.job
        try:
            current = self._store_write("reading it", lambda _op: self.store.get(job.id))
        except JobNotFound:  # DELETE while it ran: the record is gone already, the files go now
            removed = self._remove_files(job, patient)
            log.info("job %s deleted while running (%s): %s", job.id, what, _files_said(removed))
            return "cancelled"
        if current.status == JobStatus.IN_PROGRESS and current.worker_id == job.worker_id:
            # Files first: once it reads cancelled, nothing of it is left (what a storage refuses to remove goes
            # with the record at its expiry).
            removed = self._remove_files(job, patient)
            ttl = self.settings.result_ttl
            if self._store_write("cancelling it", lambda op: self.store.mark_cancelled(job.id, _holder(job), ttl, op)):
                log.info("job %s %s: %s", job.id, what, _files_said(removed))
                return "cancelled"
            # Ended meanwhile by another hand (this worker's heartbeat, the reaper): theirs to count.
            return "lost"
        if current.status in (JobStatus.FAILED, JobStatus.CANCELLED) and current.worker_id == job.worker_id:
            # Ended while this worker's engine call was stuck (see _heartbeat), or reaped as cancelled: what it
            # may have stored meanwhile belongs to no one.
            self._remove_files(job)
        self._after_lost(job)
        return "lost"

    def _remove_files(self, job: Job, patient: bool = True) -> bool:
        """Remove what a job that will not complete may have stored, saying whether it is gone; a storage that
        still refuses after its retries (one try only, not `patient`) costs the files (logged), never the
        worker: it goes on to the next job."""
        try:
            if patient:
                self._storage_call("removing its files", lambda: self.storage.delete_prefix(job.id))
            else:
                self.storage.delete_prefix(job.id)
            return True
        except Exception as exc:
            log.error("job %s: its files could not be removed now (they go when it expires): %s", job.id, exc)
            return False

    def _after_lost(self, job: Job) -> None:
        log.warning("job %s is no longer held by this worker (lease lost or deleted); result dropped", job.id)

    def _heartbeat(self, running: _Running) -> None:
        """Renew the lease between steps too: text encoding and VAE decoding can outlast a lease.

        The engine checks the timeout and a cancel only between denoising steps. An engine call that has not come
        back `stuck_after` seconds past its task_timeout, or after a cancel it did not act on, is stuck (a hung
        decode, driver or upload): renewing on would hold the job forever. The worker is reported stuck
        (`/health` 503, so its orchestrator restarts it), the job is ended here, and the lease is let go; if the
        call comes back after all, its late result is dropped."""
        lease, stuck_after = self.settings.lease_seconds, self.settings.stuck_after
        interval = max(lease / 3, 0.05)
        stop_seen: float | None = None
        while not running.done.wait(interval):
            now = time.monotonic()
            timed_out = now - running.started > self.settings.task_timeout + stuck_after
            if timed_out or (stop_seen is not None and now - stop_seen > stuck_after):
                with self._stuck_lock:
                    if running.done.is_set():
                        return
                    if running not in self._stuck:
                        self._stuck.append(running)
                        log.error("job %s: the engine call has not come back (stuck)", running.job.id)
                if self._end_stuck(running, "timeout" if timed_out else "cancel"):
                    return
                continue  # the store did not answer: try again at the next beat, without renewing
            try:
                renewed = self.store.renew(running.job.id, _holder(running.job), lease)
            except StoreUnavailable as exc:  # an outage: one line a beat, not a traceback
                running.store_down = True
                log.warning("job %s: lease not renewed: %s", running.job.id, exc)
            except Exception:
                log.exception("lease renewal failed for job %s", running.job.id)
            else:
                if running.store_down:  # said when it went, said when it is back
                    log.info("job %s: the job store answers again; progress writes resume", running.job.id)
                running.store_down = False
                if not renewed:
                    running.keep_going = False
            if not running.keep_going and stop_seen is None:
                stop_seen = now

    def _end_stuck(self, running: _Running, why: str) -> bool:
        """End a job whose engine call is stuck, if it is still this worker's. True once there is nothing more to
        do: ended here, or no longer this worker's (deleted, reaped); False when the store did not answer, and the
        next beat tries the same write again, under the same token."""
        job, ttl, op = running.job, self.settings.result_ttl, running.end_op
        elapsed = time.monotonic() - running.started
        try:
            current = self.store.get(job.id)
            if current.worker_id != job.worker_id or current.attempts != job.attempts:
                return True  # reaped, and maybe claimed again (by this very worker, too): not this run any more
            if current.status != JobStatus.IN_PROGRESS and running.end_write is None:
                return True
            # In progress: end it. Already ended, after a try whose reply was lost: the same write, under the same
            # token, answers as it did then (True if it was this one that ended it).
            if running.end_write is None:
                if why == "timeout":
                    message = (
                        f"took longer than WANSERVE_TASK_TIMEOUT ({self.settings.task_timeout:g} s) and did not stop "
                        f"(stuck in {current.stage or 'start-up'})"
                    )
                    fail = functools.partial(self.store.fail, job.id, _holder(job), "timeout", message, ttl, op)
                    running.end_write = ("failed", fail)
                elif current.cancel_requested:
                    self.storage.delete_prefix(job.id)
                    cancel = functools.partial(self.store.mark_cancelled, job.id, _holder(job), ttl, op)
                    running.end_write = ("cancelled", cancel)
                else:  # it stopped being asked to stop: nothing to end, only the hang to report
                    return True
            status, write = running.end_write
            ended = write()
        except JobNotFound:  # deleted: nothing left to end
            return True
        except Exception:
            log.exception("job %s: could not end it while its engine call is stuck", job.id)
            return False
        running.keep_going = False
        if ended:
            running.counted = True
            log.error("job %s ended %s: its engine call has not come back for %.0f s", job.id, status, elapsed)
            if self.metrics is not None:
                self.metrics.job_finished(job.model, status, elapsed)
        return True


def _files_said(removed: bool) -> str:
    return "files removed" if removed else "its files go when it expires"
