"""The worker loop in-process, with the real tiny engine, a real SQLite store and real local files."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from wanserve.catalog import lookup
from wanserve.config import Settings
from wanserve.engine.engine import Engine
from wanserve.jobs import Job, JobStatus, new_job_id, open_store
from wanserve.request import GenerationRequest, resolve
from wanserve.storage import open_storage
from wanserve.storage.local import LocalStorage
from wanserve.worker import Worker

from service import wait_for
from videos import decode_mp4, png_bytes


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Engine:
    return Engine.load("tiny-t2v", Settings(cache_dir=tiny_cache))


class SlowStorage(LocalStorage):
    """Local files behind a slow link (a distant S3 bucket): every upload takes `delay` seconds more. With
    `fail_first`, the first upload is refused, as by a storage outage."""

    def __init__(self, root: Path, delay: float = 0.0, fail_first: bool = False) -> None:
        super().__init__(root)
        self.delay, self.fail_next = delay, fail_first

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next = False
            raise OSError("storage unreachable")
        super().put_file(key, path, content_type)


class RefusingStorage(LocalStorage):
    """Every upload fails with `failure`."""

    def __init__(self, root: Path, failure: Exception) -> None:
        super().__init__(root)
        self.failure = failure

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        raise self.failure


class Harness:
    def __init__(
        self, tmp: Path, engine: Engine, storage: LocalStorage | None = None, start: bool = True, **settings: object
    ) -> None:
        values = {"lease_seconds": 2, "poll_interval": 0.05, "progress_interval": 0, **settings}
        self.settings = Settings(data_dir=tmp, **values)  # type: ignore[arg-type]
        self.store = open_store(self.settings.store_url)
        self.storage = storage or open_storage(self.settings.storage_url)
        self.worker = Worker("tiny-t2v", self.settings, self.store, self.storage, engine=engine)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        if start:
            self.thread.start()

    def submit(self, prompt: str = "a fox", seed: int = 1, **fields: object) -> str:
        spec = lookup("tiny-t2v")
        assert spec is not None
        request = resolve(GenerationRequest(prompt=prompt, seed=seed, **fields), spec)  # type: ignore[arg-type]
        job = self.store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request=request.to_dict()))
        return job.id

    def finished(self, job_id: str, timeout: float = 60) -> Job:
        return wait_for(lambda: (j := self.store.get(job_id)).status.finished and j, timeout, f"{job_id} to finish")

    def stop(self) -> None:
        self.worker.drain(grace=0)
        if self.thread.is_alive():
            self.thread.join(30)


@pytest.fixture
def harness(tmp_path: Path, engine: Engine) -> Iterator[Harness]:
    h = Harness(tmp_path, engine)
    yield h
    h.stop()


def test_completes_with_files_keyed_by_job_id(harness: Harness) -> None:
    job_id = harness.submit(num_inference_steps=3, num_frames=13)
    job = harness.finished(job_id)
    assert job.status == JobStatus.COMPLETED and job.progress == 1.0 and job.attempts == 1
    assert job.result is not None and job.result["video_key"] == f"{job_id}/video.mp4"
    video = harness.settings.data_dir / "videos" / job_id / "video.mp4"
    assert decode_mp4(video).frames.shape[0] == 13
    assert (video.parent / "thumbnail.webp").exists()
    assert set(job.result["timings"]) >= {"encode_prompt", "denoise", "vae_decode", "video_encode"}


def test_progress_is_written_while_running(harness: Harness) -> None:
    job_id = harness.submit(num_inference_steps=150, width=128, height=128, num_frames=17)
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = harness.store.get(job_id)
        if job.status == JobStatus.IN_PROGRESS and job.stage == "denoise":
            seen.add(round(job.progress, 2))
        if job.status.finished:
            break
        time.sleep(0.02)
    assert len(seen) >= 3, seen  # real, moving progress: not 0 then 100


def test_a_handed_back_jobs_queue_wait_counts_from_its_hand_back(tmp_path: Path, engine: Engine) -> None:
    """wanserve_job_queue_wait_seconds counted from the job's submission on every attempt: a job handed back
    by a draining worker (or requeued when its worker died) had that worker's whole run counted as waiting."""
    from wanserve.metrics import Metrics

    h = Harness(tmp_path, engine, start=False)
    metrics = Metrics(["tiny-t2v"])
    h.worker = Worker("tiny-t2v", h.settings, h.store, h.storage, metrics, engine=engine)
    h.thread = threading.Thread(target=h.worker.run, daemon=True)
    spec = lookup("tiny-t2v")
    assert spec is not None
    request = resolve(GenerationRequest(prompt="a fox", seed=1, num_inference_steps=2), spec).to_dict()
    an_hour_ago = time.time() - 3600  # submitted, then run for an hour by a worker that was drained
    job = h.store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request=request, created_at=an_hour_ago))
    assert h.store.claim("tiny-t2v", "drained-worker", 3600) is not None
    assert h.store.release(job.id, "drained-worker")
    h.thread.start()
    try:
        assert h.finished(job.id).status is JobStatus.COMPLETED
        waited = metrics.registry.get_sample_value("wanserve_job_queue_wait_seconds_sum", {"model": "tiny-t2v"})
        assert waited is not None and waited < 60, waited  # since the hand-back, not since submission
    finally:
        h.stop()


def test_a_jobs_queue_wait_is_counted_when_it_is_claimed(tmp_path: Path, engine: Engine) -> None:
    """It was counted when the job ended: an alert on the queue wait lagged by a whole job (an hour for a 14B
    video), and a job handed back on a drain never counted its wait at all."""
    from wanserve.metrics import Metrics

    h = Harness(tmp_path, engine, start=False)
    metrics = Metrics(["tiny-t2v"])
    h.worker = Worker("tiny-t2v", h.settings, h.store, h.storage, metrics, engine=engine)
    h.thread = threading.Thread(target=h.worker.run, daemon=True)
    h.thread.start()
    try:
        job_id = h.submit(num_inference_steps=200, width=128, height=128, num_frames=17)
        wait_for(lambda: h.store.get(job_id).stage == "denoise", 30, "denoising")
        claims = metrics.registry.get_sample_value("wanserve_job_queue_wait_seconds_count", {"model": "tiny-t2v"})
        assert claims == 1
        h.store.request_cancel(job_id, ttl=60)
        assert h.finished(job_id).status is JobStatus.CANCELLED
    finally:
        h.stop()


def test_task_timeout_fails_the_job_with_a_reason(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path, engine, task_timeout=0.3)
    try:
        job = h.finished(h.submit(num_inference_steps=200, width=128, height=128, num_frames=17))
    finally:
        h.stop()
    assert job.status == JobStatus.FAILED and job.error_code == "timeout"
    assert job.error_message is not None and "longer than WANSERVE_TASK_TIMEOUT (0.3 s)" in job.error_message
    assert f"job {job.id} failed (timeout)" in caplog.text  # the log said nothing of it


def test_expired_results_are_deleted_from_store_and_storage(tmp_path: Path, engine: Engine) -> None:
    h = Harness(tmp_path, engine, result_ttl=0.5)
    try:
        job_id = h.submit(num_inference_steps=2)
        h.finished(job_id)
        folder = h.settings.data_dir / "videos" / job_id
        assert folder.exists()
        wait_for(lambda: not folder.exists(), 30, "the expired files to be deleted")
        from wanserve.errors import JobNotFound

        with pytest.raises(JobNotFound):
            h.store.get(job_id)
    finally:
        h.stop()


def test_cancel_requested_while_running(harness: Harness) -> None:
    job_id = harness.submit(num_inference_steps=200, width=128, height=128, num_frames=17)
    wait_for(lambda: harness.store.get(job_id).stage == "denoise", 30, "denoising")
    harness.store.request_cancel(job_id, ttl=60)
    job = harness.finished(job_id, timeout=10)
    assert job.status == JobStatus.CANCELLED and job.progress < 1.0
    assert not (harness.settings.data_dir / "videos" / job_id).exists()


class HungStorage(LocalStorage):
    """An upload that does not come back until released: like a hung VAE decode, driver or S3 connection, an
    engine call with no step boundary where the worker could notice a timeout or a cancel."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered, self.release = threading.Event(), threading.Event()

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        self.entered.set()
        self.release.wait(120)
        super().put_file(key, path, content_type)


class HungEngine:
    """An engine whose call hangs before its first step (a wedged GPU), then carries on once released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.entered, self.release = threading.Event(), threading.Event()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(120)
        return self.engine.generate(*args, **kwargs)


@pytest.mark.parametrize("why", ["timeout", "cancel"])
def test_a_job_whose_engine_call_hangs_still_ends_and_the_worker_says_it_is_stuck(
    tmp_path: Path, engine: Engine, why: str
) -> None:
    """It used to be held forever: the heartbeat renewed its lease, and the timeout and the cancel were only
    looked at between denoising steps. Now it ends `stuck_after` past its timeout or the cancel, liveness says
    stuck, and once the call comes back its late files are dropped, it is counted once, and the worker carries
    on. Deleting the ended job meanwhile (what a user does to a job that looks hung) changes none of that."""
    from wanserve.metrics import Metrics
    from wanserve.roles import ops_app

    # The timeout case hangs before any step, so no step boundary can notice the timeout; the cancel case hangs
    # in the upload, after the last step, so the late files are there to be dropped.
    hung: HungStorage | HungEngine = HungEngine(engine) if why == "timeout" else HungStorage(tmp_path / "videos")
    h = Harness(
        tmp_path,
        hung.engine if isinstance(hung, HungEngine) else engine,
        storage=hung if isinstance(hung, HungStorage) else None,
        start=False,
        task_timeout=1.0 if why == "timeout" else 3600.0,
        stuck_after=1.0,
        overlap_jobs=False,
        lease_seconds=10,  # no lease runs out here, however loaded the machine: only the hang is at play
    )
    if isinstance(hung, HungEngine):
        h.worker.engine = hung  # type: ignore[assignment]
    metrics = Metrics()
    h.worker.metrics = metrics
    h.thread.start()
    try:
        job_id = h.submit(num_inference_steps=2)
        assert hung.entered.wait(60)
        if why == "cancel":
            h.store.request_cancel(job_id, ttl=60)
        job = h.finished(job_id, timeout=30)  # the engine call is still hung
        assert job.status is (JobStatus.FAILED if why == "timeout" else JobStatus.CANCELLED)
        if why == "timeout":
            assert job.error_code == "timeout" and "did not stop (stuck in" in (job.error_message or "")
        from fastapi.testclient import TestClient

        with TestClient(ops_app(h.worker, metrics, h.store)) as ops:
            health = ops.get("/health")
            assert health.status_code == 503 and job_id in health.json()["stuck"]
            assert ops.get("/ready").status_code == 503
            ended = h.store.get(job_id)
            h.store.delete(job_id)
            h.storage.delete_prefix(job_id)
            assert ops.get("/health").status_code == 503  # still hung, whatever became of the job

            hung.release.set()
            # The next job is an ordinary one: it must not meet the 1 s timeout the hang was set up with, which
            # a loaded machine's 2 steps and decode can outlast (the job then failed "stuck in vae_decode").
            h.settings.task_timeout = 3600.0
            assert h.finished(h.submit(num_inference_steps=2, seed=2)).status is JobStatus.COMPLETED
            assert ops.get("/health").status_code == 200 and h.worker.stuck is None
            assert ops.get("/health").json()["status"] == "healthy"  # the API's body, on the worker's port too
    finally:
        hung.release.set()
        h.stop()
    assert not (tmp_path / "videos" / job_id).exists()  # the late upload was removed
    assert ended.status is job.status  # and the ended job stayed ended
    status = "failed" if why == "timeout" else "cancelled"
    other = "cancelled" if why == "timeout" else "failed"
    assert metrics.registry.get_sample_value(
        "wanserve_jobs_finished_total", {"model": "tiny-t2v", "status": other}
    ) in (
        None,
        0,
    )
    counted = metrics.registry.get_sample_value("wanserve_jobs_finished_total", {"model": "tiny-t2v", "status": status})
    assert counted == 1


def test_a_stuck_run_does_not_end_the_run_that_took_its_job_over(tmp_path: Path, engine: Engine) -> None:
    """The hung call's lease ran out (a store outage kept it from being renewed), the job was requeued and
    claimed again, here by the same worker id (a worker that restarted under its pod name): the stale run's
    heartbeat must see the new attempt and leave it be, not fail the run that took over for its own hang."""
    hung = HungEngine(engine)
    h = Harness(tmp_path, engine, start=False, task_timeout=1.0, stuck_after=1.0, overlap_jobs=False, lease_seconds=3)
    h.worker.engine = hung  # type: ignore[assignment]
    h.thread.start()
    try:
        job_id = h.submit(num_inference_steps=2)
        assert hung.entered.wait(60)
        assert [j.id for j in h.store.reap(max_attempts=3, ttl=60, now=time.time() + 3600)] == [job_id]
        again = h.store.claim("tiny-t2v", h.worker.worker_id, 3600)
        assert again is not None and again.id == job_id and again.attempts == 2
        wait_for(lambda: h.worker.stuck is not None, 30, "the hung call to be reported stuck")
        time.sleep(1.5)  # a beat more: the heartbeat that saw the hang has had its chance to end the job
        job = h.store.get(job_id)
        assert job.status is JobStatus.IN_PROGRESS and job.attempts == 2 and job.error_code is None
    finally:
        hung.release.set()
        h.stop()


def test_a_run_that_lost_its_lease_leaves_alone_the_claim_that_took_its_job_over(
    tmp_path: Path, engine: Engine
) -> None:
    """A store outage longer than the lease: the job went back to the queue while its upload hung, and was
    claimed again under the same worker id. The stores knew holders by worker id alone, so the stale run's
    writes were taken as the new attempt's: it completed the job under the new claim's feet (or, stopped by then,
    deleted its files and marked it cancelled with nobody having asked). Each claim now holds under its own name."""
    storage = HungStorage(tmp_path / "videos")
    h = Harness(tmp_path, engine, storage=storage, overlap_jobs=False, lease_seconds=3)
    try:
        job_id = h.submit(num_inference_steps=2)
        assert storage.entered.wait(60)  # the video is made; its upload hangs
        assert [j.id for j in h.store.reap(max_attempts=3, ttl=60, now=time.time() + 3600)] == [job_id]
        again = h.store.claim("tiny-t2v", h.worker.worker_id, 3600)
        assert again is not None and again.id == job_id and again.attempts == 2
        storage.release.set()
        wait_for(lambda: h.worker._running is None, 30, "the stale run to end")
        time.sleep(0.5)
        job = h.store.get(job_id)
        assert job.status is JobStatus.IN_PROGRESS and job.worker_id == h.worker.worker_id and job.attempts == 2
    finally:
        storage.release.set()
        h.stop()


class DownStore:
    """The worker's store in an outage while `down` is set: renew and set_progress take `stall` seconds (the
    client's own retries) and then fail. Counts the calls made from the thread that denoises."""

    def __init__(self, store: Any, stall: float) -> None:
        self.store, self.stall = store, stall
        self.down = threading.Event()
        self.calls_while_denoising = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _maybe_down(self) -> None:
        if self.down.is_set():
            if not threading.current_thread().name.startswith("heartbeat"):
                self.calls_while_denoising += 1
            time.sleep(self.stall)
            from wanserve.errors import StoreUnavailable

            raise StoreUnavailable("the job store (test): down")

    def renew(self, *args: Any, **kwargs: Any) -> bool:
        self._maybe_down()
        return bool(self.store.renew(*args, **kwargs))

    def set_progress(self, *args: Any, **kwargs: Any) -> bool:
        self._maybe_down()
        return bool(self.store.set_progress(*args, **kwargs))

    claims_too = False  # claims fail too while down (else only a running job's writes do)

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        if self.claims_too:
            self._maybe_down()
        return self.store.claim(*args, **kwargs)


def test_an_idle_worker_says_when_the_store_answers_again(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Each outage was logged ("trying again"), its end never: an operator could not tell when work resumed."""
    caplog.set_level("INFO", logger="wanserve.worker")
    h = Harness(tmp_path, engine, start=False)
    down = DownStore(h.store, stall=0.05)
    down.claims_too = True
    h.worker.store = down  # type: ignore[assignment]
    down.down.set()
    h.thread.start()
    try:
        wait_for(lambda: "trying again" in caplog.text, 30, "a claim to find the store down")
        down.down.clear()
        wait_for(lambda: "the job store answers again (after" in caplog.text, 30, "the worker to say it is back")
        assert h.finished(h.submit(num_inference_steps=1)).status is JobStatus.COMPLETED
    finally:
        h.stop()


def test_a_store_outage_does_not_hold_up_every_denoising_step(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """While the store is down, each per-step write waited out the client's retries (~9 s for Redis) before
    the step went on: a job all but stopped. One write finds it down; the rest wait for the heartbeat to
    reach the store again, and the job goes on at full speed, writing its progress again once it can, which
    the log says as it said the outage."""
    caplog.set_level("INFO", logger="wanserve.worker")
    h = Harness(tmp_path, engine, start=False, overlap_jobs=False, lease_seconds=3)
    down = DownStore(h.store, stall=0.3)
    h.worker.store = down  # type: ignore[assignment]
    h.thread.start()
    try:
        down.down.set()
        job_id = h.submit(num_inference_steps=200, width=256, height=256, num_frames=33)  # far beyond the test
        wait_for(lambda: down.calls_while_denoising > 0, 30, "a write to find the store down")
        time.sleep(3.0)  # ten stalls' worth: one write per step would have made about ten more
        calls = down.calls_while_denoising
        assert h.worker._running is not None  # still denoising: the count is of its per-step writes
        assert calls <= 2, calls
        down.down.clear()  # the store is back: the heartbeat reaches it, and progress is written again
        wait_for(lambda: h.store.get(job_id).progress > 0, 30, "progress written again")
        assert f"job {job_id}: the job store answers again; progress writes resume" in caplog.text
        h.store.request_cancel(job_id, ttl=60)
        assert h.finished(job_id).status is JobStatus.CANCELLED
    finally:
        h.stop()


def test_a_job_whose_input_image_is_gone_fails_saying_so(harness: Harness) -> None:
    """Input images live in the storage (`<id>/input`); one removed by hand, or lost with the storage, fails
    its job with a reason instead of a traceback or a video made without it."""
    job_id = new_job_id()
    spec = lookup("tiny-t2v")
    assert spec is not None
    record = {**resolve(GenerationRequest(prompt="a fox", seed=1), spec).to_dict(), "image_key": f"{job_id}/input"}
    harness.store.enqueue(Job(id=job_id, model="tiny-t2v", request=record))
    job = harness.finished(job_id)
    assert job.status is JobStatus.FAILED and job.error_code == "input_missing"
    assert f"{job_id}/input" in (job.error_message or "")


class LosesOneAnswer:
    """A store whose first `method` call that changes something goes through but whose reply is lost (the
    connection broke after Redis ran the script, or Redis answered after the client's timeout, and redis-py's
    own retries ran out): the worker must ask again, and hear of what that call did."""

    def __init__(self, store: Any, method: str) -> None:
        self.store, self.method, self.lost = store, method, False

    def __getattr__(self, name: str) -> Any:
        if name != self.method:
            return getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            answer = getattr(self.store, name)(*args, **kwargs)
            if answer and not self.lost:  # a claim that took nothing loses nothing
                self.lost = True
                from wanserve.errors import StoreUnavailable

                raise StoreUnavailable("the job store (Redis) cannot be reached: Timeout reading from socket")
            return answer

        return call


def test_a_completion_whose_reply_was_lost_is_still_the_workers(tmp_path: Path, engine: Engine) -> None:
    """The retry carries the first try's token, so it hears "completed" again: the result is kept and counted
    once, not logged as lost (the retry used to get "no change", the job being completed already)."""
    from wanserve.metrics import Metrics

    from conftest import free_tcp_port, start_redis, stop_redis

    # A Redis of its own: on the session's shared one, a worker of another test could claim this job first.
    port = free_tcp_port()
    server = start_redis(port, tmp_path / "redis", appendonly=False)
    h = Harness(tmp_path, engine, start=False, store=f"redis://127.0.0.1:{port}/0")
    h.worker.store = LosesOneAnswer(h.store, "complete")  # type: ignore[assignment]
    metrics = Metrics()
    h.worker.metrics = metrics
    h.thread.start()
    try:
        job = h.finished(h.submit(num_inference_steps=2))
        assert h.worker.store.lost  # type: ignore[attr-defined]
    finally:
        h.stop()
        stop_redis(server)
    assert job.status is JobStatus.COMPLETED and (tmp_path / "videos" / job.id / "video.mp4").exists()
    labels = {"model": "tiny-t2v", "status": "completed"}
    assert metrics.registry.get_sample_value("wanserve_jobs_finished_total", labels) == 1


def test_a_claim_whose_reply_was_lost_runs_its_job_at_once(tmp_path: Path, engine: Engine) -> None:
    """The retry was a new claim (a new holder, a new token): the job the first one took sat in_progress for
    nobody until its lease ran out, and ran on its second attempt (three such moments failed it)."""
    from conftest import free_tcp_port, start_redis, stop_redis

    port = free_tcp_port()
    server = start_redis(port, tmp_path / "redis", appendonly=False)
    h = Harness(tmp_path, engine, start=False, store=f"redis://127.0.0.1:{port}/0")
    h.settings.lease_seconds = 600.0  # a lost job would wait this long: the test's timeout says so first
    h.worker.store = LosesOneAnswer(h.store, "claim")  # type: ignore[assignment]
    h.thread.start()
    try:
        job = h.finished(h.submit(num_inference_steps=2), timeout=120)
        assert h.worker.store.lost  # type: ignore[attr-defined]
    finally:
        h.stop()
        stop_redis(server)
    assert job.status is JobStatus.COMPLETED and job.attempts == 1, job


def test_a_worker_stopped_while_a_claims_answer_is_lost_hands_its_job_back(tmp_path: Path, engine: Engine) -> None:
    """Stopped during the outage that lost a claim's answer: the job that claim took stayed in_progress for nobody
    until its lease ran out (a restart, a scale-down in the middle of a Redis blip)."""
    from conftest import free_tcp_port, start_redis, stop_redis

    port = free_tcp_port()
    server = start_redis(port, tmp_path / "redis", appendonly=False)
    h = Harness(tmp_path, engine, start=False, store=f"redis://127.0.0.1:{port}/0")
    h.settings.lease_seconds = 600.0
    lossy = LosesOneAnswer(h.store, "claim")
    original = lossy.claim

    def claim_then_stop(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            if lossy.lost:
                h.worker.drain(grace=0)  # the stop comes while the worker waits for the store

    lossy.claim = claim_then_stop  # type: ignore[method-assign]
    h.worker.store = lossy  # type: ignore[assignment]
    job_id = h.submit(num_inference_steps=2)
    h.thread.start()
    try:
        assert h.worker.wait_stopped(60)
        assert lossy.lost
        job = h.store.get(job_id)
        assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.worker_id is None, job
        assert h.store.queue_position(job_id) == 1
    finally:
        h.stop()
        stop_redis(server)


@pytest.mark.parametrize("case", ["never_sent", "cancelled_meanwhile"])
def test_a_stop_during_a_lost_claim_takes_nothing_and_ends_a_cancelled_job(
    tmp_path: Path, engine: Engine, case: str
) -> None:
    """never_sent: the claim never reached Redis; the stop asked again, claiming afresh (the head of the queue
    "running" for a moment, its wait restarted). cancelled_meanwhile: the job the lost claim took was cancelled
    during the outage; a release is refused then, and it stayed in_progress for nobody until its lease ran out."""
    from wanserve.errors import StoreUnavailable

    from conftest import free_tcp_port, start_redis, stop_redis

    port = free_tcp_port()
    server = start_redis(port, tmp_path / "redis", appendonly=False)
    h = Harness(tmp_path, engine, start=False, store=f"redis://127.0.0.1:{port}/0")
    h.settings.lease_seconds = 600.0
    job_id = h.submit(num_inference_steps=2)
    queued = h.store.get(job_id)
    store, tries = h.store, []

    class Outage:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            tries.append(args)
            if case == "cancelled_meanwhile":
                store.claim(*args, **kwargs)  # it ran; its answer is lost
                store.request_cancel(job_id, ttl=60)  # the user cancels during the outage
            h.worker.drain(grace=0)  # and the worker is stopped
            raise StoreUnavailable("the job store (Redis) cannot be reached: Timeout reading from socket")

    h.worker.store = Outage()  # type: ignore[assignment]
    h.thread.start()
    try:
        assert h.worker.wait_stopped(60) and len(tries) == 1
        job = h.store.get(job_id)
        if case == "never_sent":
            assert job.status is JobStatus.QUEUED and job.attempts == 0 and job.started_at is None, job
            assert job.queued_at == queued.queued_at  # never taken: its wait goes on from its submit
        else:
            assert job.status is JobStatus.CANCELLED, job
    finally:
        h.stop()
        stop_redis(server)


class BlinkingStorage(LocalStorage):
    """Storage that cannot be reached for its first upload (an S3 restart): the video must wait, not be lost."""

    blinked = False

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        if not self.blinked:
            self.blinked = True
            from wanserve.errors import StorageUnavailable

            raise StorageUnavailable("the result storage (S3) cannot be reached: connection reset")
        super().put_file(key, path, content_type)


def test_a_storage_blip_during_the_upload_does_not_lose_the_video(tmp_path: Path, engine: Engine) -> None:
    storage = BlinkingStorage(tmp_path / "videos")
    h = Harness(tmp_path, engine, storage=storage)
    try:
        job = h.finished(h.submit(num_inference_steps=2))
    finally:
        h.stop()
    assert storage.blinked and job.status is JobStatus.COMPLETED, job
    assert (tmp_path / "videos" / job.id / "video.mp4").exists()


class UndeletableStorage(LocalStorage):
    """Storage that cannot delete (an S3 whose DeleteObjects keeps failing): cleanup fails, uploads work."""

    def delete_prefix(self, prefix: str) -> None:
        from wanserve.errors import StorageUnavailable

        raise StorageUnavailable("the result storage (S3) cannot be reached: InternalError")


def test_files_that_cannot_be_removed_never_stop_the_worker(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel whose cleanup the storage refuses, past its retries: the job still ends cancelled and the
    worker takes the next job (the error used to end the worker thread, and with it `serve`)."""
    import wanserve.worker as worker_module

    monkeypatch.setattr(worker_module, "STORE_OUTAGE_WAIT_S", 0.5)
    h = Harness(tmp_path, engine, storage=UndeletableStorage(tmp_path / "videos"))
    try:
        job_id = h.submit(num_inference_steps=200, width=128, height=128, num_frames=17)
        wait_for(lambda: h.store.get(job_id).stage == "denoise", 30, "denoising")
        h.store.request_cancel(job_id, ttl=60)
        assert h.finished(job_id).status is JobStatus.CANCELLED
        assert h.finished(h.submit(num_inference_steps=2, seed=2)).status is JobStatus.COMPLETED
        assert h.thread.is_alive()
    finally:
        h.stop()


# ---- overlap: the next job starts while the previous one is stored; its prompt is encoded ahead -------------


class ActOnUpload(LocalStorage):
    """Calls `act(job_id)` once, right after the first file of a job is stored: the user cancels or deletes the
    job while its video is uploaded, after the last denoising step."""

    act: Callable[[str], None] = staticmethod(lambda _job_id: None)
    acted = False

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        super().put_file(key, path, content_type)
        if not self.acted:
            self.acted = True
            self.act(key.split("/")[0])


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("action", ["cancel", "delete"])
def test_a_cancel_or_delete_during_the_upload_still_wins(
    tmp_path: Path, engine: Engine, action: str, overlap: bool
) -> None:
    storage = ActOnUpload(tmp_path / "videos")
    h = Harness(tmp_path, engine, storage=storage, start=False, overlap_jobs=overlap)

    def act(job_id: str) -> None:  # what POST .../cancel and DELETE /v1/videos/{id} do to a running job
        h.store.request_cancel(job_id, ttl=60)
        if action == "delete":
            h.store.delete(job_id)
            h.storage.delete_prefix(job_id)

    storage.act = staticmethod(act)
    h.thread.start()
    try:
        job_id = h.submit(num_inference_steps=2)
        wait_for(lambda: storage.acted, 30, "the upload")
        # The worker goes on with the next job; once that one is stored, the first one's end is settled.
        assert h.finished(h.submit(num_inference_steps=2, seed=2)).status == JobStatus.COMPLETED
        assert not (tmp_path / "videos" / job_id).exists()
        if action == "cancel":
            job = h.store.get(job_id)
            assert job.status == JobStatus.CANCELLED and job.result is None
            assert job.stage != "done" and job.progress < 1.0  # it was made, never done
        else:
            from wanserve.errors import JobNotFound

            with pytest.raises(JobNotFound):
                h.store.get(job_id)
    finally:
        h.stop()


@pytest.mark.parametrize("overlap", [True, False])
def test_next_job_runs_while_the_previous_video_is_uploaded(tmp_path: Path, engine: Engine, overlap: bool) -> None:
    storage = SlowStorage(tmp_path / "videos", delay=0.75)
    h = Harness(tmp_path, engine, storage=storage, start=False, overlap_jobs=overlap)
    first, second = h.submit(num_inference_steps=3), h.submit(num_inference_steps=3, seed=2)
    h.thread.start()
    try:
        a, b = h.finished(first), h.finished(second)
    finally:
        h.stop()
    assert a.status == b.status == JobStatus.COMPLETED
    assert a.completed_at is not None and b.started_at is not None
    if overlap:  # claimed and generated while the first upload (1.5 s) was still going
        assert b.started_at < a.completed_at
    else:
        assert b.started_at >= a.completed_at
    for job in (a, b):
        assert decode_mp4(tmp_path / "videos" / job.id / "video.mp4").frames.shape[0] == 9


def _unreachable_s3() -> Exception:
    from wanserve.errors import StorageUnavailable

    """As the S3 backend raises it (`unavailable_on`): the endpoint and key in the message, a public text beside."""
    error = StorageUnavailable(
        "the result storage (S3) cannot be reached: Could not connect to the endpoint URL: "
        '"http://10.0.0.7:9000/private-bucket/video_x/video.mp4"'
    )
    error.public = "the result storage (S3) cannot be reached"
    return error


@pytest.mark.parametrize(
    ("failure", "told"),
    [
        (_unreachable_s3(), "the result storage (S3) cannot be reached"),
        (OSError(28, "No space left on device", "/srv/private/videos/x.mp4"), "OSError: No space left on device"),
    ],
)
def test_a_failed_upload_tells_the_client_why_but_not_where(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch, failure: Exception, told: str
) -> None:
    """Any client may read a job's error: it says what went wrong, not the storage's address or a server path."""
    import wanserve.worker as worker_module

    monkeypatch.setattr(worker_module, "STORE_OUTAGE_WAIT_S", 0.5)  # an outage outlasts the retries sooner
    h = Harness(tmp_path, engine, storage=RefusingStorage(tmp_path / "videos", failure))
    try:
        failed = h.finished(h.submit(num_inference_steps=2))
    finally:
        h.stop()
    assert failed.status == JobStatus.FAILED and failed.error_code == "storage_failed"
    assert failed.error_message == f"the video could not be stored: {told}"


class DownAndCancelled(LocalStorage):
    """A storage that cannot be reached (S3 down) while its job's user cancels it: `act(job_id)` once, at the
    first upload."""

    act: Callable[[str], None] = staticmethod(lambda _job_id: None)
    tries = 0

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        from wanserve.errors import StorageUnavailable

        self.tries += 1
        if self.tries == 1:
            self.act(key.split("/")[0])
        raise StorageUnavailable("the result storage (S3) cannot be reached")


def test_a_cancel_while_the_storage_is_down_ends_the_job_cancelled(tmp_path: Path, engine: Engine) -> None:
    """docs/api.md: a job cancelled while it uploads its video ends cancelled. With the storage down it went on
    trying for a minute, deaf to the cancel, then ended failed with storage_failed."""
    storage = DownAndCancelled(tmp_path / "videos")
    h = Harness(tmp_path, engine, storage=storage, start=False)
    storage.act = staticmethod(lambda job_id: h.store.request_cancel(job_id, ttl=60))
    h.thread.start()
    try:
        job = h.finished(h.submit(num_inference_steps=2))
    finally:
        h.stop()
    assert job.status == JobStatus.CANCELLED and job.error_code is None, job
    assert storage.tries < 10  # the retries stopped at the cancel, not after their minute
    assert not (tmp_path / "videos" / job.id).exists()


class DownEntirely(DownAndCancelled):
    """As above, and removing files fails too (the whole S3 is down)."""

    removals = 0

    def delete_prefix(self, prefix: str) -> None:
        from wanserve.errors import StorageUnavailable

        self.removals += 1
        raise StorageUnavailable("the result storage (S3) cannot be reached")


def test_a_cancel_while_the_whole_storage_is_down_is_written_without_waiting_on_it(
    tmp_path: Path, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancelled job's files were tried for a minute more before the cancel was written: the job read
    in_progress all that while, the worker took no other job, and the log then said "files removed"."""
    storage = DownEntirely(tmp_path / "videos")
    h = Harness(tmp_path, engine, storage=storage, start=False)
    storage.act = staticmethod(lambda job_id: h.store.request_cancel(job_id, ttl=60))
    h.thread.start()
    try:
        with caplog.at_level("INFO", logger="wanserve.worker"):
            job = h.finished(h.submit(num_inference_steps=2))
    finally:
        h.stop()
    assert job.status == JobStatus.CANCELLED and job.error_code is None, job
    assert storage.removals == 1  # one try: its files go with the record at its expiry
    said = caplog.text
    assert "cancelled while its video was stored: its files go when it expires" in said, said
    assert "files removed" not in said


def test_no_room_for_scratch_files_fails_the_job_not_the_worker(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $TMPDIR that cannot take the job's folder (full, read-only, removed): the error ended the worker, and
    with it `serve`'s API, and left the job in progress until a restart and a lease."""
    import tempfile

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    h = Harness(tmp_path, engine)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(a_file / "tmp"))  # no folder can be made there
        job = h.finished(h.submit(num_inference_steps=2))
        assert job.status == JobStatus.FAILED and job.error_code == "generation_failed", job
        assert job.error_message is not None and job.error_message.startswith("the worker cannot write its files")
        assert str(a_file) not in job.error_message  # no server path for the client
        monkeypatch.undo()
        assert h.finished(h.submit(num_inference_steps=2, seed=2)).status == JobStatus.COMPLETED
        assert h.thread.is_alive()
    finally:
        h.stop()


def test_drain_waits_for_the_video_being_uploaded(tmp_path: Path, engine: Engine) -> None:
    h = Harness(tmp_path, engine, storage=SlowStorage(tmp_path / "videos", delay=1.0))
    job_id = h.submit(num_inference_steps=2)
    wait_for(lambda: h.store.get(job_id).stage == "done", 30, "the frames to be written")
    h.worker.drain(grace=0)  # nothing left to stop: the job is past its last step
    assert h.worker.wait_stopped(30)
    assert h.store.get(job_id).status == JobStatus.COMPLETED  # stored before the worker stopped, not after
    assert (tmp_path / "videos" / job_id / "video.mp4").exists()


@pytest.mark.parametrize("overlap", [True, False])
def test_an_upload_that_fails_fails_the_job_and_the_worker_goes_on(
    tmp_path: Path, engine: Engine, overlap: bool
) -> None:
    h = Harness(tmp_path, engine, storage=SlowStorage(tmp_path / "videos", fail_first=True), overlap_jobs=overlap)
    try:
        lost, kept = h.finished(h.submit(num_inference_steps=2)), h.finished(h.submit(num_inference_steps=2))
    finally:
        h.stop()
    assert lost.status == JobStatus.FAILED and lost.error_code == "storage_failed"
    assert lost.error_message == "the video could not be stored: OSError"  # its words may name a server path
    assert not (tmp_path / "videos" / lost.id).exists()
    assert kept.status == JobStatus.COMPLETED


class FailWriteRefused:
    """The store, except that `fail` cannot be written for `seconds` from the first try (an outage just as
    the failure is recorded)."""

    def __init__(self, store: Any, seconds: float) -> None:
        self.store, self.seconds = store, seconds
        self.down_until: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def fail(self, *args: Any, **kwargs: Any) -> bool:
        from wanserve.errors import StoreUnavailable

        if self.down_until is None:
            self.down_until = time.monotonic() + self.seconds
        if time.monotonic() < self.down_until:
            raise StoreUnavailable("the job store (test): down")
        return bool(self.store.fail(*args, **kwargs))


def test_a_job_whose_failure_could_not_be_written_keeps_its_input_image(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload failed, and so did writing the failure (the store was down too): the worker removed the job's
    files all the same, its input image with them, and the run after the lease ran out failed input_missing."""
    import wanserve.worker as worker_module
    from wanserve.inputs import store_request

    monkeypatch.setattr(worker_module, "STORE_OUTAGE_WAIT_S", 0.5)  # give up on the failure write at once
    settings = Settings(data_dir=tmp_path, lease_seconds=2, poll_interval=0.05, progress_interval=0)
    store = open_store(settings.store_url)
    storage = SlowStorage(tmp_path / "videos")
    i2v = Engine.load("tiny-i2v", Settings(cache_dir=tiny_cache))
    spec = lookup("tiny-i2v")
    assert spec is not None
    job_id = new_job_id()
    request = resolve(GenerationRequest(prompt="p", image=png_bytes((9, 9, 9)), num_inference_steps=2, seed=1), spec)
    store.enqueue(Job(id=job_id, model="tiny-i2v", request=store_request(request, job_id, storage)))
    storage.fail_next = True  # the video's upload is refused
    worker = Worker("tiny-i2v", settings, FailWriteRefused(store, 5.0), storage, engine=i2v)  # type: ignore[arg-type]
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        job = wait_for(lambda: (j := store.get(job_id)).status.finished and j, 120, "the job to end")
    finally:
        worker.drain(grace=0)
        thread.join(30)
        store.close()
    assert job.status is JobStatus.COMPLETED and job.attempts == 2, (job.status, job.error_code, job.error_message)


def test_next_prompt_is_encoded_while_the_current_job_denoises(tmp_path: Path, engine: Engine) -> None:
    tokenizer, length = engine.pipe.tokenizer, engine.settings.max_sequence_length
    encoded: list[tuple[str, float, str]] = []  # (thread, time, ids) of every text encoder call

    def record(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        ids = args[0][0].tolist()
        encoded.append((threading.current_thread().name, time.time(), str(ids)))

    def ids_of(text: str) -> str:
        return str(tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids)

    hook = engine.pipe.text_encoder.register_forward_pre_hook(record)
    h = Harness(tmp_path, engine, start=False)
    try:
        long_job = h.submit("an owl over a frozen lake", num_inference_steps=120, width=128, height=128)
        next_job = h.submit("a heron wading at dawn", num_inference_steps=2, seed=5)
        h.thread.start()
        done = h.finished(next_job, timeout=120)
        assert h.finished(long_job).status == done.status == JobStatus.COMPLETED
    finally:
        hook.remove()
        h.stop()
    heron = [(thread, at) for thread, at, ids in encoded if ids == ids_of("a heron wading at dawn")]
    assert len(heron) == 1  # encoded once: ahead of the job, which then found it cached
    thread, at = heron[0]
    assert thread.startswith("prefetch-") and done.started_at is not None and at < done.started_at

    # The prefetched embeddings give exactly the video the job would have got without them.
    engine.clear_prompt_cache()
    request = GenerationRequest.from_dict(done.request)
    direct = engine.generate(request, tmp_path / "direct.mp4").video_path.read_bytes()
    assert (tmp_path / "videos" / next_job / "video.mp4").read_bytes() == direct


def test_scratch_left_by_a_killed_worker_is_removed_at_start(
    tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-job (kill -9, OOM) leaves its scratch folder; the next worker start removes it, and
    never a folder of a process that is still running, even one with the same pid (PID 1 in containers)."""
    import fcntl
    import subprocess
    import sys
    import tempfile

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    # A process that made its scratch folder, wrote half a video and died without cleaning up.
    killed = (
        "import os, signal; from wanserve.scratch import job_folder\n"
        "(job_folder('video_0123') / 'video.mp4').write_bytes(b'partial')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(scratch_root), "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", killed], env=env, timeout=60)
    (orphan,) = scratch_root.glob("wanserve-scratch-*")
    assert list(orphan.glob("video_0123-*/video.mp4"))
    # A live process's folder, whatever its name says: its lock is held (here, by this test).
    alive = scratch_root / "wanserve-scratch-alive"
    (alive / "video_4567-x").mkdir(parents=True)
    held = os.open(alive / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)

    h = Harness(tmp_path, engine)
    try:
        assert h.finished(h.submit(num_inference_steps=2)).status == JobStatus.COMPLETED
    finally:
        h.stop()
        os.close(held)
    assert not orphan.exists() and (alive / "video_4567-x").exists()
    (own,) = set(scratch_root.iterdir()) - {alive}  # this process's folder: the job's sub-folder went with it
    assert [p.name for p in own.iterdir()] == [".lock"]
