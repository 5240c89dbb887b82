"""The worker loop in-process, with the real tiny engine, a real SQLite store and real local files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wanserve.catalog import lookup
from wanserve.config import Settings
from wanserve.engine.engine import Engine
from wanserve.jobs import Job, JobStatus, new_job_id, open_store
from wanserve.request import GenerationRequest, resolve
from wanserve.storage import open_storage
from wanserve.worker import Worker

from service import wait_for
from videos import decode_mp4


@pytest.fixture(scope="module")
def engine(tiny_cache: Path) -> Engine:
    return Engine.load("tiny-t2v", Settings(cache_dir=tiny_cache))


class Harness:
    def __init__(self, tmp: Path, engine: Engine, **settings: object) -> None:
        self.settings = Settings(data_dir=tmp, lease_seconds=2, poll_interval=0.05, progress_interval=0, **settings)
        self.store = open_store(self.settings.store_url)
        self.storage = open_storage(self.settings.storage_url)
        self.worker = Worker("tiny-t2v", self.settings, self.store, self.storage, engine=engine)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def submit(self, **fields: object) -> str:
        spec = lookup("tiny-t2v")
        assert spec is not None
        request = resolve(GenerationRequest(prompt="a fox", seed=1, **fields), spec)  # type: ignore[arg-type]
        job = self.store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request=request.to_dict()))
        return job.id

    def finished(self, job_id: str, timeout: float = 60) -> Job:
        return wait_for(lambda: (j := self.store.get(job_id)).status.finished and j, timeout, f"{job_id} to finish")

    def stop(self) -> None:
        self.worker.drain(grace=0)
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


def test_task_timeout_fails_the_job_with_a_reason(tmp_path: Path, engine: Engine) -> None:
    h = Harness(tmp_path, engine, task_timeout=0.3)
    try:
        job = h.finished(h.submit(num_inference_steps=200, width=128, height=128, num_frames=17))
    finally:
        h.stop()
    assert job.status == JobStatus.FAILED and job.error_code == "timeout"
    assert job.error_message is not None and "task_timeout" in job.error_message


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
