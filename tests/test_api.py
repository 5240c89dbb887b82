"""The HTTP API over a real SQLite store and real local storage. There is no engine here: each test plays
the worker's part through the store API (claim → progress → files into storage → complete), exactly the
calls a worker makes, so every surface is checked against the states a real job goes through."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from wanserve.api.app import create_app
from wanserve.api.openai_videos import seconds_to_frames
from wanserve.catalog import ModelSpec, lookup
from wanserve.config import Settings
from wanserve.jobs.model import Job, new_job_id
from wanserve.jobs.sqlite import SQLiteJobStore
from wanserve.metrics import Metrics
from wanserve.roles import api_specs, served_specs
from wanserve.storage.base import THUMBNAIL, VIDEO, key_for
from wanserve.storage.local import LocalStorage

from service import wait_for
from videos import png_bytes

WORKER = "test-worker"
TTL = 3600.0


def _spec(name: str) -> ModelSpec:
    spec = lookup(name)
    assert spec is not None
    return spec


@dataclass
class Api:
    client: TestClient
    store: SQLiteJobStore
    storage: LocalStorage
    settings: Settings
    metrics: Metrics
    media: tuple[Path, Path]

    def create(self, **body: Any) -> dict[str, Any]:
        body.setdefault("prompt", "a red fox")
        response = self.client.post("/v1/videos", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    # The worker's side, through the same store calls a worker makes.

    def claim(self, model: str, expect: str) -> Job:
        job = self.store.claim(model, WORKER, 30.0)
        assert job is not None and job.id == expect, f"claimed {job and job.id}, expected {expect}"
        return job

    def run(self, job_id: str, model: str = "tiny-t2v", progress: float = 0.5, stage: str = "denoise") -> Job:
        self.claim(model, job_id)
        assert self.store.set_progress(job_id, WORKER, progress, stage)
        return self.store.get(job_id)

    def complete(self, job_id: str, model: str = "tiny-t2v") -> Job:
        self.run(job_id, model)
        return self.finish(job_id)

    def finish(self, job_id: str) -> Job:
        """Store the video of a job this test's worker holds and complete it."""
        job = self.store.get(job_id)
        video, thumbnail = self.media
        self.storage.put_file(key_for(job_id, VIDEO), video, "video/mp4")
        self.storage.put_file(key_for(job_id, THUMBNAIL), thumbnail, "image/webp")
        request = job.request
        result = {
            "seed": request["seed"],
            "width": request["width"],
            "height": request["height"],
            "num_frames": request["num_frames"],
            "fps": request["fps"],
            "seconds": request["num_frames"] / request["fps"],
            "timings": {"encode_prompt": 0.1, "denoise": 1.0, "vae_decode": 0.2, "video_encode": 0.1, "total": 1.4},
            "video_key": key_for(job_id, VIDEO),
            "thumbnail_key": key_for(job_id, THUMBNAIL),
        }
        assert self.store.complete(job_id, WORKER, result, TTL)
        return self.store.get(job_id)

    def fail(self, job_id: str, model: str = "tiny-t2v") -> Job:
        self.run(job_id, model)
        assert self.store.fail(job_id, WORKER, "generation_failed", "CUDA out of memory", TTL)
        return self.store.get(job_id)


@contextmanager
def make_api(
    tmp_path: Path,
    media: tuple[Path, Path],
    readiness: Any = None,
    storage: LocalStorage | None = None,
    **overrides: Any,
) -> Iterator[Api]:
    settings = Settings(**{"data_dir": tmp_path, "model": ["tiny-t2v", "tiny-i2v"], **overrides})
    store = SQLiteJobStore(tmp_path / "jobs.db")
    storage = storage or LocalStorage(tmp_path / "videos")
    specs = api_specs(settings)  # as an API replica reads WANSERVE_MODEL and WANSERVE_SHARDED_MODEL
    metrics = Metrics()
    metrics.watch_store(store, list(specs))
    app = create_app(settings, store, storage, specs, metrics=metrics, readiness=readiness)
    try:
        with TestClient(app) as client:
            yield Api(client, store, storage, settings, metrics, media)
    finally:
        store.close()


@pytest.fixture
def api(tmp_path: Path, media: tuple[Path, Path]) -> Iterator[Api]:
    with make_api(tmp_path, media) as made:
        yield made


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] and body["detail"]
    return body


# ---- OpenAI surface: the full lifecycle ---------------------------------------------------------------------


def test_openai_lifecycle_create_poll_download_delete(api: Api) -> None:
    created = api.create(model="tiny-t2v", size="64x64", seconds="1", seed=11)
    video_id = created["id"]
    assert created["object"] == "video" and created["status"] == "queued" and created["progress"] == 0
    assert created["model"] == "tiny-t2v" and created["size"] == "64x64" and created["prompt"] == "a red fox"
    # 1 s at the model's 8 fps → nearest 4k+1 is 9 frames.
    assert created["num_frames"] == 9 and created["fps"] == 8 and created["seconds"] == "1.12"
    assert created["seed"] == 11 and created["queue_position"] == 1 and created["error"] is None
    assert created["remixed_from_video_id"] is None and created["completed_at"] is None
    assert isinstance(created["created_at"], int)

    queued = api.client.get(f"/v1/videos/{video_id}")
    assert queued.headers["openai-poll-after-ms"] == "1000"

    api.run(video_id, progress=0.42, stage="denoise")
    running = api.client.get(f"/v1/videos/{video_id}")
    body = running.json()
    assert body["status"] == "in_progress" and body["progress"] == 42 and body["stage"] == "denoise"
    assert body["queue_position"] is None
    assert running.headers["openai-poll-after-ms"] == "500"

    assert api.store.set_progress(video_id, WORKER, 0.9, "vae_decode")
    video, thumbnail = api.media
    api.storage.put_file(key_for(video_id, VIDEO), video, "video/mp4")
    api.storage.put_file(key_for(video_id, THUMBNAIL), thumbnail, "image/webp")
    result = {
        "seed": 11,
        "width": 64,
        "height": 64,
        "num_frames": 9,
        "fps": 8,
        "seconds": 1.125,
        "timings": {"encode_prompt": 0.1, "denoise": 2.0, "vae_decode": 0.3, "video_encode": 0.1, "total": 2.5},
        "video_key": key_for(video_id, VIDEO),
        "thumbnail_key": key_for(video_id, THUMBNAIL),
    }
    assert api.store.complete(video_id, WORKER, result, TTL)

    done = api.client.get(f"/v1/videos/{video_id}")
    body = done.json()
    assert "openai-poll-after-ms" not in done.headers
    assert body["status"] == "completed" and body["progress"] == 100
    assert body["timings"]["total"] == 2.5 and body["seed"] == 11
    assert isinstance(body["completed_at"], int) and body["expires_at"] >= body["completed_at"]

    content = api.client.get(f"/v1/videos/{video_id}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.headers["accept-ranges"] == "bytes"
    assert content.content == video.read_bytes()
    thumb = api.client.get(f"/v1/videos/{video_id}/content", params={"variant": "thumbnail"})
    assert thumb.headers["content-type"] == "image/webp" and thumb.content == thumbnail.read_bytes()
    head = api.client.head(f"/v1/videos/{video_id}/content")
    assert head.status_code == 200 and int(head.headers["content-length"]) == video.stat().st_size

    deleted = api.client.delete(f"/v1/videos/{video_id}")
    assert deleted.json() == {"id": video_id, "object": "video.deleted", "deleted": True}
    assert api.storage.stat(key_for(video_id, VIDEO)) is None
    assert api.storage.stat(key_for(video_id, THUMBNAIL)) is None
    # A download after its results expired (or after a DELETE) says so, not that the id was never known.
    for gone in (f"/v1/videos/{video_id}", f"/v1/videos/{video_id}/content"):
        error = openai_error(api.client.get(gone), 404)
        assert error["code"] == "not_found" and "no longer exists" in error["message"], error
    assert "no job with id" in openai_error(api.client.get("/v1/videos/video_never"), 404)["message"]


def test_what_the_api_accepts_passes_the_workers_check_again(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """The worker checks the stored (resolved) request once more. A guidance_scale of 1 or less (distilled and
    Lightning weights) was accepted, then failed by the worker on every real model: the default negative prompt
    and second-expert scale filled in at submit read there as if the client had asked for them."""
    from wanserve.inputs import load_request
    from wanserve.request import resolve

    models = ["wan2.1-t2v-1.3b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "tiny-t2v-moe", "wan2.2-ti2v-5b"]
    with make_api(tmp_path, media, model=models) as api:
        image = {"image_url": data_url(png_bytes((10, 20, 30), size=(96, 64)))}
        for model in models:
            for guidance in (None, 0.0, 0.5, 1.0, 1.5, 5.0):
                body: dict[str, Any] = {"prompt": "a cat", "model": model}
                if guidance is not None:
                    body["guidance_scale"] = guidance
                if model == "wan2.2-i2v-a14b":
                    body["input_reference"] = image
                created = api.client.post("/v1/videos", json=body)
                assert created.status_code == 200, (model, guidance, created.text)
                stored = api.store.get(created.json()["id"]).request
                spec = served_specs(api.settings)[model]
                again = resolve(load_request(stored, api.storage), spec).to_dict()  # what the worker runs
                # (The image is stored aside: the record names it, the worker's request holds its bytes.)
                same = {k: v for k, v in again.items() if not k.startswith("image")}
                assert same == {k: v for k, v in stored.items() if not k.startswith("image")}, (model, guidance)


def test_openai_extension_fields_and_explicit_values_win(api: Api) -> None:
    body = api.create(
        model="tiny-t2v",
        size="128x64",
        seconds="4",
        width=96,
        num_frames=13,
        fps=10,
        num_inference_steps=2,
        guidance_scale=3.5,
        flow_shift=2.0,
        negative_prompt="blurry",
        user="someone",  # an OpenAI field that does not apply here: accepted and dropped
    )
    assert body["size"] == "96x64" and body["num_frames"] == 13 and body["fps"] == 10 and body["seconds"] == "1.3"
    request = api.store.get(body["id"]).request
    assert request["num_inference_steps"] == 2 and request["guidance_scale"] == 3.5
    assert request["flow_shift"] == 2.0 and request["negative_prompt"] == "blurry"
    # The answer says what it runs with: the values asked for, and the model's defaults for the rest.
    shown = {k: body[k] for k in ("num_inference_steps", "guidance_scale", "flow_shift", "negative_prompt")}
    assert shown == {"num_inference_steps": 2, "guidance_scale": 3.5, "flow_shift": 2.0, "negative_prompt": "blurry"}
    assert body["guidance_scale_2"] is None and body["boundary_ratio"] is None  # one expert
    defaults = api.client.get(f"/v1/videos/{api.create(model='tiny-t2v')['id']}").json()
    assert defaults["num_inference_steps"] == 4 and defaults["guidance_scale"] == 5.0, defaults


def test_openai_model_by_alias_and_default_model(api: Api) -> None:
    assert api.create(model="TINY-T2V")["model"] == "tiny-t2v"
    assert api.create()["model"] == "tiny-t2v"  # first served model


def stored_image(api: Api, job_id: str) -> bytes | None:
    """The input image a job will run with, read as its worker reads it."""
    from wanserve.inputs import load_request

    return load_request(api.store.get(job_id).request, api.storage).image


def test_an_input_image_is_kept_in_the_storage_not_in_the_job_record(api: Api) -> None:
    """Records are read whole by every status call and list page: a 20 MiB image in each made a list of image
    jobs read gigabytes. The record names the image; a queued job cancelled takes it away with it."""
    image = png_bytes((20, 120, 220), size=(640, 480))
    created = [
        api.client.post("/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files={"input_reference": image})
        for _ in range(2)
    ]
    kept, cancelled = (c.json()["id"] for c in created)
    record = api.store.get(kept).request
    assert "image" not in record and record["image_key"] == f"{kept}/input"
    assert len(json.dumps(record)) < 2000 and stored_image(api, kept) == image
    api.client.post(f"/v1/videos/{cancelled}/cancel")
    # Its only file, gone with the cancel (just after the answer: see the next test).
    wait_for(lambda: api.storage.stat(f"{cancelled}/input") is None, 10, "the cancelled job's image to go")
    assert api.storage.stat(f"{kept}/input") is not None


class HangingDeletes(LocalStorage):
    """Local files whose deletes hang until `release` is set: an S3 endpoint that takes connections and does
    not answer holds each call for its timeouts and retries (minutes)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered, self.release = threading.Event(), threading.Event()

    def delete_prefix(self, prefix: str) -> None:
        self.entered.set()
        self.release.wait(60)
        super().delete_prefix(prefix)


def test_a_cancel_is_answered_while_the_storage_hangs_removing_its_image(
    tmp_path: Path, media: tuple[Path, Path]
) -> None:
    """Cancelling a queued image job removed its input image before answering: with the storage hanging, the
    cancel hung too, for every surface. The removal now follows the answer."""
    storage = HangingDeletes(tmp_path / "videos")
    with make_api(tmp_path, media, storage=storage) as api:
        files = {"input_reference": png_bytes((20, 120, 220))}
        job_id = api.client.post("/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files=files).json()["id"]
        answers: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: answers.append(api.client.post(f"/v1/videos/{job_id}/cancel")))
        caller.start()
        caller.join(30)
        try:
            assert answers and answers[0].status_code == 200, "the cancel waited for the storage"
            assert answers[0].json()["error"]["code"] == "cancelled"
            assert storage.entered.wait(10) and storage.stat(f"{job_id}/input") is not None  # still removing
        finally:
            storage.release.set()
        wait_for(lambda: storage.stat(f"{job_id}/input") is None, 10, "the image to go once the storage answers")


def test_an_image_job_the_queue_refuses_leaves_no_image(tmp_path: Path, media: tuple[Path, Path]) -> None:
    with make_api(tmp_path, media, queue_limit=1) as api:
        form = {"prompt": "p", "model": "tiny-i2v"}
        image = {"input_reference": png_bytes((1, 2, 3))}
        first = api.client.post("/v1/videos", data=form, files=image)
        refused = api.client.post("/v1/videos", data=form, files=image)
        assert first.status_code == 200 and refused.status_code == 429
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [first.json()["id"]]


def test_a_create_retried_under_its_idempotency_key_returns_the_video_it_made(api: Api) -> None:
    key = {"Idempotency-Key": "4b1f9e2c-retry-me"}
    first = api.client.post("/v1/videos", json={"prompt": "a red fox"}, headers=key)
    again = api.client.post("/v1/videos", json={"prompt": "a red fox"}, headers=key)
    assert first.status_code == again.status_code == 200, again.text
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    # The same video, its drawn seed included, and one job in the queue, counted once.
    assert again.json()["id"] == first.json()["id"] and again.json()["seed"] == first.json()["seed"]
    assert [v["id"] for v in api.client.get("/v1/videos").json()["data"]] == [first.json()["id"]]
    assert api.metrics.jobs_submitted.labels(model="tiny-t2v")._value.get() == 1
    # Later, the answer says what became of it.
    api.complete(first.json()["id"])
    assert api.client.post("/v1/videos", json={"prompt": "a red fox"}, headers=key).json()["status"] == "completed"
    # The key on another request is refused, naming the header and the video it made.
    reused = openai_error(api.client.post("/v1/videos", json={"prompt": "a blue fox"}, headers=key), 422)
    assert reused["param"] == "Idempotency-Key" and reused["code"] == "idempotency_key_reused"
    assert first.json()["id"] in reused["message"]
    # The same values in another number type, or as a form's text, are the same request.
    typed = {"Idempotency-Key": "typed"}
    first_typed = api.client.post(
        "/v1/videos", json={"prompt": "p", "guidance_scale": 5, "num_frames": 9}, headers=typed
    )
    as_float = api.client.post(
        "/v1/videos", json={"prompt": "p", "guidance_scale": 5.0, "num_frames": 9.0}, headers=typed
    )
    as_form = api.client.post(
        "/v1/videos", data={"prompt": "p", "guidance_scale": "5", "num_frames": "9"}, headers=typed
    )
    assert as_float.status_code == as_form.status_code == 200, (as_float.text, as_form.text)
    assert as_float.json()["id"] == as_form.json()["id"] == first_typed.json()["id"]
    # No key, or a new one: a new video each time.
    ids = {api.create()["id"], api.create()["id"], first.json()["id"]}
    new_key = api.client.post("/v1/videos", json={"prompt": "a red fox"}, headers={"Idempotency-Key": "other"})
    assert len(ids) == 3 and new_key.json()["id"] not in ids


def test_a_keyed_image_create_retried_on_a_full_queue_gets_its_video_and_leaves_one_image(
    tmp_path: Path, media: tuple[Path, Path]
) -> None:
    with make_api(tmp_path, media, queue_limit=1) as api:
        form, key = {"prompt": "p", "model": "tiny-i2v"}, {"Idempotency-Key": "upload-1"}
        image = {"input_reference": png_bytes((1, 2, 3))}
        first = api.client.post("/v1/videos", data=form, files=image, headers=key)
        again = api.client.post("/v1/videos", data=form, files=image, headers=key)
        assert first.status_code == 200 and again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [first.json()["id"]]
        # Another image under the key is another request; and a new key still meets the full queue.
        other = {"input_reference": png_bytes((9, 9, 9))}
        assert openai_error(api.client.post("/v1/videos", data=form, files=other, headers=key), 422)
        fresh = api.client.post("/v1/videos", data=form, files=image, headers={"Idempotency-Key": "upload-2"})
        assert openai_error(fresh, 429)["code"] == "queue_full"
        # Refused before its image is decoded, as without a key: a flood of fresh keys each made the server
        # decode (seconds of CPU, on the pool every route shares) an image that was then refused.
        junk = {"input_reference": ("big.png", b"\x89PNG not an image at all")}
        flood = api.client.post("/v1/videos", data=form, files=junk, headers={"Idempotency-Key": "upload-3"})
        assert openai_error(flood, 429)["code"] == "queue_full"
        assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [first.json()["id"]]


def test_image_creates_waiting_to_decode_leave_status_reads_answered(tmp_path: Path) -> None:
    """Image creates wait their turn to decode (two at a time); they waited on Starlette's thread pool, which
    every route shares, so forty of them left status reads, cancels and deletes waiting (a flood of image
    creates stalled status polls for 20 s). Both decode slots are held here while 45 creates arrive."""
    import anyio

    from wanserve import request as request_module

    settings = Settings(data_dir=tmp_path, model=["tiny-t2v", "tiny-i2v"])
    store, storage = SQLiteJobStore(tmp_path / "jobs.db"), LocalStorage(tmp_path / "videos")
    app = create_app(settings, store, storage, api_specs(settings), metrics=Metrics())
    form, image = {"prompt": "p", "model": "tiny-i2v"}, {"input_reference": png_bytes((1, 2, 3))}
    answers: dict[str, int] = {}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def create() -> None:
                response = await client.post("/v1/videos", data=form, files=image)
                answers[response.json()["id"]] = response.status_code

            async with anyio.create_task_group() as creates:
                held = [request_module._DECODING.acquire() for _ in range(2)]
                try:
                    for _ in range(45):
                        creates.start_soon(create)
                    await anyio.sleep(0.5)
                    with anyio.move_on_after(20) as waited:
                        answers["read"] = (await client.get("/v1/videos?limit=1")).status_code
                    assert not waited.cancelled_caught, "a status read waited behind the creates"
                finally:
                    for _ in held:
                        request_module._DECODING.release()

    try:
        anyio.run(main)
    finally:
        store.close()
    assert answers.pop("read") == 200 and list(answers.values()) == [200] * 45


def test_cancels_waiting_out_a_write_lock_leave_status_reads_answered(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock (a backup, a second server): each cancel waits up to 30 s for it
    on Starlette's shared thread pool, and 45 of them held every thread, so status reads, which SQLite answers
    during the lock, waited 29 s behind them. Cancels and deletes now wait on threads of their own."""
    import sqlite3

    import anyio

    settings = Settings(data_dir=tmp_path, model=["tiny-t2v"], queue_limit=1000)
    store, storage = SQLiteJobStore(tmp_path / "jobs.db"), LocalStorage(tmp_path / "videos")
    app = create_app(settings, store, storage, api_specs(settings), metrics=Metrics())
    ids = [store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "p"})).id for _ in range(45)]
    answers: dict[str, int] = {}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def cancel(job_id: str) -> None:
                answers[job_id] = (await client.post(f"/v1/videos/{job_id}/cancel")).status_code

            locker = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")  # another process's write, under way
            try:
                async with anyio.create_task_group() as cancels:
                    for job_id in ids:
                        cancels.start_soon(cancel, job_id)
                    await anyio.sleep(0.5)
                    with anyio.move_on_after(10) as waited:
                        answers["read"] = (await client.get(f"/v1/videos/{ids[0]}")).status_code
                    locker.rollback()  # the lock ends: the cancels go through
                    assert not waited.cancelled_caught, "a status read waited behind the cancels"
            finally:
                locker.close()

    try:
        anyio.run(main)
    finally:
        store.close()
    assert answers.pop("read") == 200 and list(answers.values()) == [200] * 45


class ClaimedWhileRead:
    """A store whose worker claims the job between the API's read of it and its queue-place lookup."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def queue_position(self, job_id: str) -> int | None:
        self.store.claim("tiny-t2v", "w/1", 60)
        return self.store.queue_position(job_id)


def test_a_job_claimed_while_it_is_read_is_never_queued_with_no_place(tmp_path: Path) -> None:
    """Read as queued, then claimed before its place was asked: the video showed "queued" with queue_position
    null, which the docs say a waiting job never has (the page's first event showed it so)."""
    settings = Settings(data_dir=tmp_path, model=["tiny-t2v"])
    real = SQLiteJobStore(tmp_path / "jobs.db")
    store: Any = ClaimedWhileRead(real)
    app = create_app(settings, store, LocalStorage(tmp_path / "videos"), api_specs(settings))
    try:
        with TestClient(app) as client:
            for route in ("/v1/videos/{id}", "/api/v1/status/{id}"):
                job = real.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "p"}))
                shown = client.get(route.format(id=job.id)).json()
                assert shown["status"] in ("in_progress", "processing") and shown["queue_position"] is None, shown
    finally:
        real.close()


class AnswerLost:
    """A store whose first enqueue is stored and then not answered (a Redis reply lost to the socket timeout):
    the API answers 503 though the job is queued."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self.store, self.lost = store, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def enqueue(self, job: Job, max_queued: int | None = None) -> Job:
        stored = self.store.enqueue(job, max_queued)
        if not self.lost:
            self.lost = True
            from wanserve.errors import StoreUnavailable

            raise StoreUnavailable("the job store (Redis) cannot be reached: Timeout reading from socket")
        return stored


def test_an_image_create_whose_answer_was_lost_keeps_its_image_for_the_retry(
    tmp_path: Path, media: tuple[Path, Path]
) -> None:
    """The 503 of a create the store took anyway removed the job's input image: the retry under its key was
    answered with that job, which then failed for want of its image."""
    settings = Settings(data_dir=tmp_path, model=["tiny-i2v"])
    store = SQLiteJobStore(tmp_path / "jobs.db")
    storage = LocalStorage(tmp_path / "videos")
    app = create_app(settings, AnswerLost(store), storage, {"tiny-i2v": _spec("tiny-i2v")})  # type: ignore[arg-type]
    image, key = png_bytes((1, 2, 3)), {"Idempotency-Key": "lost-1"}
    try:
        with TestClient(app) as client:
            form, files = {"prompt": "p"}, {"input_reference": ("a.png", image)}
            first = client.post("/v1/videos", data=form, files=files, headers=key)
            assert first.status_code == 503, first.text
            # What to do: the same key again (it said "try again shortly", as for any read).
            assert first.json()["error"]["message"].endswith(
                "send it again with the same Idempotency-Key, which queues it once"
            ), first.text
            (queued,) = store.list()[0]
            again = client.post("/v1/videos", data=form, files=files, headers=key)
            assert again.status_code == 200 and again.json()["id"] == queued.id, again.text
            assert storage.stat(queued.request["image_key"]) is not None
            assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == [queued.id]
    finally:
        store.close()


class DeletedMeanwhile(LocalStorage):
    """Storage on which `meanwhile` runs as a job's input image is looked for: a DELETE landing between a
    retried create's enqueue, which answered with the key's job, and its check that the job has its image."""

    meanwhile: Any = None

    def stat(self, key: str) -> Any:
        if self.meanwhile is not None and key.endswith("/input"):
            run, self.meanwhile = self.meanwhile, None
            run()
        return super().stat(key)


def test_a_retried_image_create_does_not_bring_back_the_image_of_a_video_deleted_meanwhile(tmp_path: Path) -> None:
    """The retry found the image gone (the DELETE had removed it) and wrote it back: a folder of a job with no
    record, which no expiry removes."""
    settings = Settings(data_dir=tmp_path, model=["tiny-i2v"])
    store = SQLiteJobStore(tmp_path / "jobs.db")
    storage = DeletedMeanwhile(tmp_path / "videos")
    app = create_app(settings, store, storage, {"tiny-i2v": _spec("tiny-i2v")})
    key = {"Idempotency-Key": "retried-1"}
    form, files = {"prompt": "p"}, {"input_reference": ("a.png", png_bytes((1, 2, 3)))}
    try:
        with TestClient(app) as client:
            first = client.post("/v1/videos", data=form, files=files, headers=key)
            assert first.status_code == 200, first.text
            video_id = first.json()["id"]
            assert any(storage.root.rglob("input")), "the job's image is stored"
            deleted: list[int] = []
            storage.meanwhile = lambda: deleted.append(client.delete(f"/v1/videos/{video_id}").status_code)
            again = client.post("/v1/videos", data=form, files=files, headers=key)
            assert deleted == [200] and again.status_code == 200 and again.json()["id"] == video_id, again.text
            assert client.get(f"/v1/videos/{video_id}").status_code == 404
            assert not [p for p in storage.root.rglob("*") if p.is_file()], "the deleted video left files"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("k" * 256, "at most 255 characters, got 256"),
        ("two words", "visible ASCII"),
        ("clé", "visible ASCII"),
    ],
)
def test_a_bad_idempotency_key_is_refused_naming_the_header(api: Api, value: str, rule: str) -> None:
    headers = [("Idempotency-Key", value.encode())]  # bytes: the client sends them as they are
    error = openai_error(api.client.post("/v1/videos", json={"prompt": "p"}, headers=headers), 400)
    assert error["param"] == "Idempotency-Key" and rule in error["message"]
    assert api.client.get("/v1/videos").json()["data"] == []


def test_an_idempotency_key_sent_twice_is_refused(api: Api) -> None:
    headers = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    error = openai_error(api.client.post("/v1/videos", json={"prompt": "p"}, headers=headers), 400)
    assert error["param"] == "Idempotency-Key" and "more than once" in error["message"]
    quoted = api.client.post("/v1/videos", json={"prompt": "p"}, headers={"Idempotency-Key": '"abc"'})
    plain = api.client.post("/v1/videos", json={"prompt": "p"}, headers={"Idempotency-Key": "abc"})
    assert quoted.json()["id"] == plain.json()["id"]  # the draft's quoted string is the same key


def test_legacy_creates_honour_an_idempotency_key(api: Api) -> None:
    for path, body, id_field, status in (
        ("/api/v1/generate", {"prompt": "p"}, "task_id", 202),
        ("/submit", {"prompt": "p"}, "task_id", 202),
        ("/video/submit", {"prompt": "p"}, "requestId", 202),
    ):
        key = {"Idempotency-Key": f"legacy{path}"}
        first, again = (api.client.post(path, json=body, headers=key) for _ in range(2))
        assert first.status_code == again.status_code == status, again.text
        assert again.json()[id_field] == first.json()[id_field] and again.headers["idempotent-replayed"] == "true"
        reused = problem(api.client.post(path, json={"prompt": "q"}, headers=key), 422)
        assert reused["field"] == "Idempotency-Key"
    assert len(api.client.get("/v1/videos").json()["data"]) == 3


def test_a_negative_prompt_that_would_change_nothing_is_refused(api: Api) -> None:
    """With guidance_scale at 1 or below the negative prompt is never encoded: two different ones gave the same
    video byte for byte, and the client was not told (as guidance_scale_2 is, in the same case)."""
    body = {"prompt": "p", "negative_prompt": "blurry, static", "guidance_scale": 1}
    error = openai_error(api.client.post("/v1/videos", json=body), 400)
    assert error["param"] == "negative_prompt" and "only when guidance_scale is above 1 (it is 1)" in error["message"]
    assert api.client.post("/v1/videos", json={**body, "negative_prompt": ""}).status_code == 200
    assert api.client.post("/v1/videos", json={**body, "guidance_scale": 5}).status_code == 200
    legacy = problem(api.client.post("/video/submit", json={**body, "guidance_scale": 0.5}), 400)
    assert legacy["field"] == "negative_prompt"


def test_a_local_folder_answers_to_its_models_name_and_seconds_fit_its_frames(
    tmp_path: Path, media: tuple[Path, Path], tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`seconds` was capped at the model's max_frames only, so on weights whose rotary table ends sooner a long
    video became a frame count the same request then refused; and a local copy of a model answered only to its
    folder's path."""
    import shutil

    from wanserve.api import legacy
    from wanserve.catalog import resolve_spec

    monkeypatch.setattr(legacy, "WAN_TASKS", legacy.WAN_TASKS)

    folders = {}
    for name, source in (("my-wan", "tiny-t2v"), ("tiny-ti2v", "tiny-ti2v")):
        (built,) = (tiny_cache / "tiny").glob(f"{source}-v*")
        folders[name] = shutil.copytree(built, tmp_path / "models" / name)
    specs = {spec.name: spec for spec in (resolve_spec(str(folder)) for folder in folders.values())}
    settings = Settings(data_dir=tmp_path, model=[str(folder) for folder in folders.values()])
    store = SQLiteJobStore(tmp_path / "jobs.db")
    app = create_app(settings, store, LocalStorage(tmp_path / "videos"), specs)
    try:
        with TestClient(app) as client:
            models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            generic = models[str(folders["my-wan"])]
            assert generic["limits"]["max_frames"] == 125  # its rotary table's end, before the 161 of Wan
            long = client.post("/v1/videos", json={"prompt": "p", "model": str(folders["my-wan"]), "seconds": "600"})
            assert long.status_code == 200 and long.json()["num_frames"] == 125, long.text
            named = client.post("/v1/videos", json={"prompt": "p", "model": "tiny-ti2v"})
            assert named.status_code == 200 and named.json()["model"] == str(folders["tiny-ti2v"]), named.text
            assert named.json()["size"] == "64x64"  # the model's own default, from its name
            assert client.get("/v1/models/tiny-ti2v").json()["id"] == str(folders["tiny-ti2v"])
            # A task name of the model (as Wan's are of the catalog's) finds the folder too.
            legacy.WAN_TASKS = {**legacy.WAN_TASKS, "tiny-ti2v-task": ("ti2v", ("tiny-ti2v",))}  # type: ignore[misc]
            task = client.post("/api/v1/generate", json={"prompt": "p", "task_type": "tiny-ti2v-task"})
            assert task.status_code == 202, task.text
            assert store.get(task.json()["task_id"]).model == str(folders["tiny-ti2v"])
    finally:
        store.close()


def test_openai_multipart_upload_with_string_numbers(api: Api) -> None:
    image = png_bytes((20, 120, 220))
    response = api.client.post(
        "/v1/videos",
        data={"prompt": "waves", "model": "tiny-i2v", "num_frames": "5", "seed": "7", "guidance_scale": "4.5"},
        files={"input_reference": ("ref.png", image, "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-i2v" and body["num_frames"] == 5 and body["seed"] == 7
    request = api.store.get(body["id"]).request
    assert stored_image(api, body["id"]) == image and request["guidance_scale"] == 4.5


def test_openai_image_as_data_url_json_and_flattened_form(api: Api) -> None:
    image = png_bytes((200, 20, 20))
    body = api.create(model="tiny-i2v", input_reference={"image_url": data_url(image)})
    assert stored_image(api, body["id"]) == image
    # The SDK's multipart encoding of input_reference={"image_url": ...}.
    form = api.client.post("/v1/videos", data={"prompt": "p", "input_reference[image_url]": data_url(image)})
    assert form.status_code == 200, form.text
    assert form.json()["model"] == "tiny-i2v"  # no model named: the served image-to-video model takes it


def test_openai_http_image_url_is_refused_clearly(api: Api) -> None:
    response = api.client.post(
        "/v1/videos", json={"prompt": "p", "input_reference": {"image_url": "https://example.com/cat.png"}}
    )
    error = openai_error(response, 400)
    assert error["param"] == "input_reference.image_url" and "only data: URLs" in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"size": "64by64"}, "size", "WIDTHxHEIGHT"),
        ({"size": "60x64"}, "size", "multiple of 16"),
        ({"size": "528x64"}, "size", "must be at most 512 for tiny-t2v"),
        ({"size": "64x64", "width": 528}, "width", "must be at most 512"),
        ({"width": 64, "height": 1024}, "height", "must be at most 512"),
        ({"num_frames": 10}, "num_frames", "4k+1"),
        ({"size": "6_4x6_4"}, "size", "must look like WIDTHxHEIGHT"),
        ({"size": "６４x６４"}, "size", "must look like WIDTHxHEIGHT"),
        ({"size": "+64x+64"}, "size", "must look like WIDTHxHEIGHT"),
        ({"size": "9" * 5000 + "x64"}, "size", "must look like WIDTHxHEIGHT"),  # past int()'s digit limit
        ({"seconds": "soon"}, "seconds", "seconds"),
        ({"seconds": "soon", "num_frames": 9}, "seconds", "seconds"),
        ({"negative_prompt": "x" * 20_001}, "negative_prompt", "at most 20000 characters"),
        ({"model": "tiny-i2v", "input_reference": {}}, "input_reference", "must hold the image"),
        ({"model": "tiny-i2v"}, "input_reference", "image is required"),
        ({"num_frame": 9}, "num_frame", "not a known field"),
        ({"model": "wan2.1-t2v-14b"}, "model", "served models: tiny-t2v, tiny-i2v"),
        ({"ulysses_size": 2}, "ulysses_size", "parallel layout is server configuration, fixed at start"),
        ({"ring_degree": 2}, "ring_degree", "parallel layout is server configuration"),
        ({"priority": "high"}, "priority", "integer"),
        ({"guidance_scale": "5"}, "guidance_scale", "must be a finite number (a number, not a string), got '5'"),
        ({"num_inference_steps": "4"}, "num_inference_steps", "must be an integer (a number, not a string)"),
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"preset": "turbo"}, "preset", "must be one of exact, fast, fastest"),
        ({"preset": "fastest"}, "preset", "tiny-t2v runs preset 'exact', whose requests may ask for exact or fast"),
    ],
)
def test_openai_validation_errors_name_the_field(api: Api, body: dict[str, Any], param: str, needle: str) -> None:
    response = api.client.post("/v1/videos", json={"prompt": "a fox", **body})
    error = openai_error(response, 400)
    assert error["param"] == param and needle in error["message"], error
    assert api.store.list()[0] == []  # nothing was queued


def test_openai_error_codes(api: Api) -> None:
    unknown = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "frames": 9}), 400)
    assert unknown["code"] == "unknown_parameter"
    unserved = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "model": "sora-2"}), 400)
    assert unserved["code"] == "model_not_found"


def test_multipart_conversion_errors_name_the_field(api: Api) -> None:
    response = api.client.post("/v1/videos", data={"prompt": "p", "seed": "abc"}, files={"unused": ("x.bin", b"abc")})
    # A file part under another name is refused by its name.
    assert openai_error(response, 400)["param"] == "unused"
    response = api.client.post("/v1/videos", data={"prompt": "p", "seed": "abc"})
    assert openai_error(response, 400)["param"] == "seed"
    response = api.client.post("/v1/videos", data={"prompt": "p", "guidance_scale": "lots"})
    assert openai_error(response, 400)["param"] == "guidance_scale"
    # Only input_reference is nested: a bracketed key of any other field is refused, not silently dropped.
    for key in ("num_frames[]", "width[0]"):
        error = openai_error(api.client.post("/v1/videos", data={"prompt": "p", key: "33"}), 400)
        assert error["param"] == key and error["code"] == "unknown_parameter", error
    error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "seed[x]": 1}), 400)
    assert error["param"] == "seed[x]"
    both = api.client.post(
        "/v1/videos",
        data={"prompt": "p", "model": "tiny-i2v", "input_reference[file_id]": "file_1"},
        files={"input_reference": ("a.png", png_bytes((1, 2, 3)))},
    )
    assert openai_error(both, 400)["param"] == "input_reference"
    assert api.store.list()[0] == []
    # A browser form sends the inputs left empty as "": they mean "not given", not a bad value.
    blank = api.client.post("/v1/videos", data={"prompt": "p", "seed": "", "size": "", "num_frames": ""})
    assert blank.status_code == 200, blank.text
    assert blank.json()["size"] == "64x64" and isinstance(blank.json()["seed"], int)
    # As is a file input left empty (a part with no file name); an empty file that was chosen is refused, not
    # taken for "no image" (which would make a text-to-video job of it).
    no_file = api.client.post("/v1/videos", data={"prompt": "p"}, files={"input_reference": ("", b"")})
    assert no_file.status_code == 200, no_file.text
    empty = api.client.post(
        "/v1/videos", data={"prompt": "p"}, files={"input_reference": ("cat.png", b"", "image/png")}
    )
    error = openai_error(empty, 400)
    assert error["param"] == "input_reference" and "'cat.png' is empty" in error["message"]


def test_malformed_json_and_query_validation(api: Api) -> None:
    bad = api.client.post("/v1/videos", content=b"{nope", headers={"content-type": "application/json"})
    assert openai_error(bad, 400)["param"] == "body"
    error = openai_error(api.client.get("/v1/videos", params={"limit": 0}), 422)
    assert error["param"] == "limit" and "limit" in error["message"]
    error = openai_error(api.client.get("/v1/videos", params={"order": "sideways"}), 422)
    assert error["param"] == "order"


def _bomb_png(side: int = 30_000) -> bytes:
    """A real PNG header that declares side x side pixels: tiny to send, gigabytes to decode."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _many_scan_jpeg(scans: int) -> bytes:
    """A small progressive JPEG whose first scan's header is repeated: each repeat is one more pass of the
    decoder over the whole image (a 300 kB file of 20,000 held a decode for 25 s of CPU)."""
    import struct

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (100, 50, 20)).save(out, "JPEG", quality=10, progressive=True)
    data = out.getvalue()
    sos = data.index(b"\xff\xda")
    header_end = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    return data[:-2] + data[sos:header_end] * scans + b"\xff\xd9"


def test_images_that_cost_far_more_than_their_size_are_refused_before_decoding(api: Api) -> None:
    """Small files the API decoded at great cost: a JPEG of thousands of scans (seconds of CPU each, the decode
    slots and then the request threads held, /ready with them), a large WebP (libwebp's decode holds four times
    what the others' do: four at once took an API pod past its 1 GiB)."""
    from PIL import Image

    many = openai_error(
        api.client.post(
            "/v1/videos",
            data={"prompt": "p", "model": "tiny-i2v"},
            files={"input_reference": ("s.jpg", _many_scan_jpeg(150))},
        ),
        400,
    )
    assert many["param"] == "input_reference" and "scans (at most 100" in many["message"], many
    fine = api.client.post(
        "/v1/videos",
        data={"prompt": "p", "model": "tiny-i2v"},
        files={"input_reference": ("s.jpg", _many_scan_jpeg(5))},
    )
    assert fine.status_code == 200, fine.text
    webp = io.BytesIO()
    Image.new("RGB", (4100, 4000), (1, 2, 3)).save(webp, "WEBP", lossless=True, method=0)
    big = problem(
        api.client.post(
            "/video/submit",
            json={"prompt": "p", "model": "tiny-i2v", "image_url": data_url(webp.getvalue(), "image/webp")},
        ),
        400,
    )
    assert big["field"] == "image_url" and "at most 16,000,000 for WebP" in big["detail"], big


def test_an_image_request_without_a_size_is_shaped_like_its_image(api: Api) -> None:
    portrait = png_bytes((10, 20, 30), size=(64, 96))
    created = api.client.post(
        "/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files={"input_reference": ("p.png", portrait)}
    )
    assert created.status_code == 200, created.text
    assert created.json()["size"] == "48x64"  # tiny-i2v's 64x64 area at the photo's 2:3, not a square
    sized = api.client.post("/video/submit", json={"prompt": "p", "image_url": data_url(portrait), "size": "64x64"})
    assert api.store.get(sized.json()["requestId"]).request["width"] == 64  # a size given is kept


def test_damaged_or_unsupported_images_are_refused_at_submit(api: Api) -> None:
    """Images that pass a header check but cannot be decoded (a cut-off upload) were queued, and failed on the
    worker; some crafted ones answered 500. Each is a 400 naming the field, and nothing is queued."""
    import struct

    from PIL import Image

    def encoded(kind: str, size: tuple[int, int] = (64, 48)) -> bytes:
        out = io.BytesIO()
        noise = Image.effect_noise(size, 60).convert("RGB")  # noise: a cut keeps the header, loses pixels
        noise.save(out, format=kind)
        return out.getvalue()

    jpeg, png = encoded("JPEG"), encoded("PNG")
    damaged = {
        "a JPEG cut in half": jpeg[: len(jpeg) // 2],
        "a PNG cut short": png[: len(png) - 200],
        "a BMP (not a format taken)": encoded("BMP"),
        "a GIF (not a format taken)": encoded("GIF"),
        "a crafted DDS header": b"DDS " + struct.pack("<I", 124) + b"\x00" * 120,
    }
    # A whole image of a format not taken is named as one, with what to send instead ("could not be decoded"
    # read as a damaged file).
    said = {"a BMP (not a format taken)": "is a BMP image; send it as PNG", "a GIF (not a format taken)": "is a GIF"}
    before = len(api.client.get("/v1/videos", params={"limit": 100}).json()["data"])
    for what, image in damaged.items():
        answer = openai_error(
            api.client.post(
                "/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files={"input_reference": ("i.png", image)}
            ),
            400,
        )
        assert answer["param"] == "input_reference", (what, answer)
        assert said.get(what, "could not be decoded") in answer["message"], (what, answer)
        legacy = api.client.post(
            "/video/submit", json={"prompt": "p", "model": "tiny-i2v", "image_url": data_url(image)}
        )
        assert problem(legacy, 400)["field"] == "image_url", what
        task = api.client.post(
            "/api/v1/generate", json={"prompt": "p", "task_type": "i2v", "image_url": data_url(image)}
        )
        assert problem(task, 400)["field"] == "image_url", (what, task.json())
    assert len(api.client.get("/v1/videos", params={"limit": 100}).json()["data"]) == before


def test_an_animated_image_is_refused_and_a_phone_jpeg_with_a_second_picture_is_not(api: Api) -> None:
    """Only an animated PNG's or WebP's first frame reached the model, without a word: a 400 now says so. A
    multi-picture JPEG (MPO: a phone photo followed by a preview or depth map) is a photo, taken as before."""
    import io

    from PIL import Image

    first, second = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    for kind in ("PNG", "WEBP"):
        animated = io.BytesIO()
        first.save(animated, format=kind, save_all=True, append_images=[second])
        files = {"input_reference": (f"a.{kind.lower()}", animated.getvalue())}
        answer = openai_error(
            api.client.post("/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files=files), 400
        )
        assert answer["param"] == "input_reference" and "animated image (2 frames)" in answer["message"], answer
        legacy = api.client.post(
            "/video/submit", json={"prompt": "p", "model": "tiny-i2v", "image_url": data_url(animated.getvalue())}
        )
        assert problem(legacy, 400)["field"] == "image_url"
    mpo = io.BytesIO()
    first.save(mpo, format="MPO", save_all=True, append_images=[second])
    files = {"input_reference": ("photo.jpg", mpo.getvalue())}
    taken = api.client.post("/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files=files)
    assert taken.status_code == 200 and taken.json()["size"] == "64x48", taken.text


def test_hostile_bodies_answer_400_and_queue_nothing(api: Api) -> None:
    """Bodies a client can send by mistake or on purpose: each is a 400 naming the field, never a 500, and
    nothing is queued (a lone surrogate once queued a job whose record then broke every list)."""
    surrogate = b'{"prompt": "a \\ud800 b", "num_inference_steps": 1}'
    answer = openai_error(
        api.client.post("/v1/videos", content=surrogate, headers={"content-type": "application/json"}), 400
    )
    assert answer["param"] == "prompt" and "surrogate" in answer["message"]
    legacy = api.client.post("/video/submit", content=surrogate, headers={"content-type": "application/json"})
    assert problem(legacy, 400)["field"] == "prompt"

    deep = b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = openai_error(
        api.client.post("/v1/videos", content=deep, headers={"content-type": "application/json"}), 400
    )
    assert answer["param"] == "body" and "deeply" in answer["message"]

    bomb = api.client.post(
        "/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files={"input_reference": ("b.png", _bomb_png())}
    )
    answer = openai_error(bomb, 400)
    assert answer["param"] == "input_reference" and "too many pixels" in answer["message"]
    legacy = api.client.post(
        "/video/submit", json={"prompt": "p", "model": "tiny-i2v", "image_url": data_url(_bomb_png())}
    )
    assert problem(legacy, 400)["field"] == "image_url"

    json_type = {"content-type": "application/json"}
    in_a_key = b'{"prompt": "p", "\\ud800": 1}'
    answer = openai_error(api.client.post("/v1/videos", content=in_a_key, headers=json_type), 400)
    assert answer["param"] == "\\ud800" and "surrogate" in answer["message"]
    assert problem(api.client.post("/video/submit", content=in_a_key, headers=json_type), 400)["field"] == "\\ud800"

    huge_number = b'{"prompt": "p", "seed": ' + b"1" * 5000 + b"}"
    for path, read in (("/v1/videos", openai_error), ("/api/v1/generate", problem)):
        answer = read(api.client.post(path, content=huge_number, headers=json_type), 400)
        assert answer.get("param", answer.get("field")) == "body", answer

    no_boundary = {"content-type": "multipart/form-data"}
    answer = openai_error(api.client.post("/v1/videos", content=b"prompt=p", headers=no_boundary), 400)
    assert answer["param"] == "body" and answer["code"] == "invalid_value", answer

    # Millions of empty arrays: seconds and hundreds of MB to parse, on the event loop. Refused unparsed.
    many = b'{"prompt": "p", "x": [' + b"[]," * 3_000_000 + b"[]]}"
    answer = openai_error(api.client.post("/v1/videos", content=many, headers=json_type), 400)
    assert answer["param"] == "body" and "too many values" in answer["message"]
    # A refused value is quoted in the error, but not a megabyte of it.
    answer = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "seed": "9" * 1_000_000}), 400)
    assert answer["param"] == "seed" and len(answer["message"]) < 2500

    assert api.client.get("/v1/videos").json()["data"] == []


def test_upload_larger_than_the_limit_is_413(tmp_path: Path, media: tuple[Path, Path]) -> None:
    with make_api(tmp_path, media, max_upload_bytes=2000) as api:
        big = png_bytes((1, 2, 3), size=(400, 400)) + b"\0" * 4000
        response = api.client.post(
            "/v1/videos",
            data={"prompt": "p", "model": "tiny-i2v"},
            files={"input_reference": ("big.png", big, "image/png")},
        )
        # Sizes as a person reads them, in one wording however the image came: the whole file's size, and a
        # limit that rounding never shows as more than it is.
        error = openai_error(response, 413)
        limit = "an input image may be at most 2.0 KiB (2,000 bytes)"
        said = f"input_reference: the image is {len(big) / 1024:.1f} KiB ({len(big):,} bytes); {limit}"
        assert error["param"] == "input_reference" and error["message"] == said
        as_url = problem(api.client.post("/video/submit", json={"prompt": "p", "image_url": data_url(big)}), 413)
        assert as_url["field"] == "image_url" and as_url["detail"].endswith(limit)
        # Far past the limit, the body itself is refused while it streams in, declared length or not.
        huge = b"\0" * 400_000
        response = api.client.post(
            "/v1/videos", data={"prompt": "p"}, files={"input_reference": ("huge.png", huge, "image/png")}
        )
        # A form that large is its image (the web page marked no field and quoted a limit not the image's).
        error = openai_error(response, 413)
        assert error["param"] == "input_reference"
        declared = int(response.request.headers["content-length"])
        assert (
            error["message"] == f"input_reference: the form is {declared / 1024:.1f} KiB ({declared:,} bytes); {limit}"
        )
        chunked = api.client.post("/api/v1/generate", content=iter([b'{"prompt": "', huge, b'"}']))
        assert problem(chunked, 413)["field"] == "body"


def test_another_sites_page_cannot_queue_cancel_or_delete_through_the_browser(api: Api) -> None:
    """With no key set, any page the user visited could queue jobs here: a form, or a "simple" POST, needs no
    CORS preflight. The browser names the sending site (Sec-Fetch-Site); the server's own page is same-origin."""
    queued = api.create()["id"]
    other_site = {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    for same_site in (False, True):
        headers = {**other_site, "Sec-Fetch-Site": "same-site"} if same_site else other_site
        form = api.client.post("/v1/videos", data={"prompt": "from a form"}, headers=headers)
        assert openai_error(form, 403)["code"] == "cross_site_request"
        plain = api.client.post(
            "/video/submit", content=b'{"prompt": "p"}', headers={**headers, "content-type": "text/plain"}
        )
        assert problem(plain, 403)["code"] == "cross_site_request"
        for method, path in (("POST", f"/v1/videos/{queued}/cancel"), ("DELETE", f"/v1/videos/{queued}")):
            assert api.client.request(method, path, headers=headers).status_code == 403
    assert len(api.store.list()[0]) == 1 and api.store.get(queued).status.value == "queued"
    # Over plain http to a host name or a LAN address browsers send no Sec-Fetch-Site: the Origin tells (a form
    # or a simple POST from any page went through there).
    bad = ("http://evil.example", "null", "http://testserver:8080", "http://testserver.evil.example", "http://a:b")
    for origin in bad:
        form = api.client.post("/v1/videos", data={"prompt": "no metadata"}, headers={"Origin": origin})
        assert openai_error(form, 403)["code"] == "cross_site_request", origin
        cancel = api.client.post(f"/v1/videos/{queued}/cancel", headers={"Origin": origin})
        assert cancel.status_code == 403, origin
    assert len(api.store.list()[0]) == 1 and api.store.get(queued).status.value == "queued"
    # The server's own page (its Origin is the Host it was reached at, default port or not, or the Host a proxy
    # noted), a typed URL, curl and the SDKs (no such headers) go through; reads are not refused.
    for headers in (
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {},
        {"Origin": "http://testserver"},
        {"Origin": "http://TESTSERVER:80"},
        {"Origin": "https://testserver"},  # a proxy that ends TLS: the page is https, the server reached over http
        {"Origin": "https://videos.example.com", "X-Forwarded-Host": "videos.example.com"},
    ):
        assert api.client.post("/v1/videos", json={"prompt": "p"}, headers=headers).status_code == 200, headers
    assert api.client.get(f"/v1/videos/{queued}", headers=other_site).status_code == 200


def test_a_trailing_slash_is_named_not_redirected_to_the_host_the_client_sent(api: Api) -> None:
    """Starlette redirected `/v1/videos/` (307, the body kept) to `http://<the Host header>/v1/videos`: any host a
    client, or a proxy, put there."""
    answer = api.client.post("/v1/videos/", json={"prompt": "p"}, headers={"Host": "evil.example"})
    error = openai_error(answer, 404)
    assert "location" not in answer.headers and error["message"].endswith("without the trailing slash, /v1/videos")
    assert "trailing slash" not in openai_error(api.client.get("/v1/nothing/"), 404)["message"]


def test_the_public_url_is_this_servers_origin(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """Behind a proxy that passes its own Host on, the page's Origin is the public URL's."""
    with make_api(tmp_path, media, public_url="https://videos.example.com/wan") as api:
        own = api.client.post("/v1/videos", json={"prompt": "p"}, headers={"Origin": "https://videos.example.com"})
        assert own.status_code == 200
        other = api.client.post("/v1/videos", json={"prompt": "p"}, headers={"Origin": "https://example.com"})
        assert openai_error(other, 403)["code"] == "cross_site_request"


def test_queue_full_is_429_with_retry_after(tmp_path: Path, media: tuple[Path, Path]) -> None:
    with make_api(tmp_path, media, queue_limit=2) as api:
        api.create()
        api.create()
        response = api.client.post("/v1/videos", json={"prompt": "one too many"})
        error = openai_error(response, 429)
        assert error["code"] == "queue_full" and int(response.headers["retry-after"]) >= 1
        legacy = api.client.post("/video/submit", json={"prompt": "one too many"})
        assert problem(legacy, 429)["code"] == "queue_full" and legacy.headers["retry-after"]
        # The other model's queue is separate.
        image = data_url(png_bytes((9, 9, 9)))
        assert api.client.post("/video/submit", json={"prompt": "p", "image_url": image}).status_code == 202
        assert api.client.post("/video/submit", json={"prompt": "p", "image_url": image}).status_code == 202
        # Full, it refuses an image before decoding it: a costly decode was done first, then the 429.
        timed = {"prompt": "p", "model": "tiny-i2v", "image_url": data_url(_many_scan_jpeg(150), "image/jpeg")}
        assert problem(api.client.post("/video/submit", json=timed), 429)["code"] == "queue_full"


def test_range_requests(api: Api) -> None:
    video_id = api.create()["id"]
    api.complete(video_id)
    data = api.media[0].read_bytes()
    size = len(data)
    url = f"/v1/videos/{video_id}/content"

    part = api.client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{size}" and part.headers["content-length"] == "90"
    assert part.headers["accept-ranges"] == "bytes"

    suffix = api.client.get(url, headers={"Range": "bytes=-500"})
    assert suffix.status_code == 206 and suffix.content == data[-500:]
    assert suffix.headers["content-range"] == f"bytes {size - 500}-{size - 1}/{size}"

    open_ended = api.client.get(url, headers={"Range": "bytes=100-"})
    assert open_ended.status_code == 206 and open_ended.content == data[100:]

    past_end = api.client.get(url, headers={"Range": f"bytes={size - 3}-{size + 1000}"})
    assert past_end.status_code == 206 and past_end.content == data[-3:]

    unsatisfiable = api.client.get(url, headers={"Range": f"bytes={size}-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == f"bytes */{size}"

    ignored = api.client.get(url, headers={"Range": "bytes=0-1,5-6"})  # multi-range: whole file instead
    assert ignored.status_code == 200 and ignored.content == data

    # Resuming a download: the part comes only if the client's copy is this one (If-Range), else the whole file.
    etag = part.headers["etag"]
    assert etag.startswith('"') and api.client.get(url).headers["etag"] == etag
    resumed = api.client.get(url, headers={"Range": "bytes=10-19", "If-Range": etag})
    assert resumed.status_code == 206 and resumed.content == data[10:20]
    stale = api.client.get(url, headers={"Range": "bytes=10-19", "If-Range": '"another-copy"'})
    assert stale.status_code == 200 and stale.content == data
    dated = api.client.get(url, headers={"Range": "bytes=10-19", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert dated.status_code == 200 and dated.content == data
    cached = api.client.get(url, headers={"If-None-Match": f'"x", {etag}'})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
    assert api.client.get(url, headers={"If-None-Match": "*"}).status_code == 304
    thumbnail = api.client.get(url, params={"variant": "thumbnail"})
    assert thumbnail.headers["etag"] != etag
    # Positions longer than Python's 4300-digit int() limit were a 500 (and a dropped connection).
    huge = "9" * 5000
    assert api.client.get(url, headers={"Range": f"bytes={huge}-"}).status_code == 416
    whole = api.client.get(url, headers={"Range": f"bytes=-{huge}"})
    assert whole.status_code == 206 and whole.content == data
    rest = api.client.get(url, headers={"Range": f"bytes=0{'0' * 30}5-{huge}"})
    assert rest.status_code == 206 and rest.content == data[5:]


def test_content_before_completion_is_404(api: Api) -> None:
    video_id = api.create()["id"]
    error = openai_error(api.client.get(f"/v1/videos/{video_id}/content"), 404)
    assert "queued" in error["message"]
    assert openai_error(api.client.get("/v1/videos/video_missing/content"), 404)["code"] == "not_found"
    api.complete(video_id)
    bad_variant = api.client.get(f"/v1/videos/{video_id}/content", params={"variant": "gif"})
    assert openai_error(bad_variant, 400)["param"] == "variant"


def test_storage_redirect_uses_the_presigned_url(tmp_path: Path, media: tuple[Path, Path]) -> None:
    class PresigningStorage(LocalStorage):
        def presigned_url(
            self,
            key: str,
            expires: int = 3600,
            method: str = "GET",
            filename: str | None = None,
            disposition: str = "inline",
        ) -> str | None:
            return f"https://bucket.example/{key}?sig={method}" + ("&save" if disposition == "attachment" else "")

    storage = PresigningStorage(tmp_path / "signed")
    with make_api(tmp_path, media, storage=storage, storage_redirect=True) as api:
        video_id = api.create()["id"]
        api.complete(video_id)
        response = api.client.get(f"/v1/videos/{video_id}/content", follow_redirects=False)
        assert response.status_code == 302
        assert response.headers["location"] == f"https://bucket.example/{video_id}/video.mp4?sig=GET"
        # SigV4 signs the method: a HEAD gets a URL of its own.
        head = api.client.head(f"/v1/videos/{video_id}/content", follow_redirects=False)
        assert head.status_code == 302
        assert head.headers["location"] == f"https://bucket.example/{video_id}/video.mp4?sig=HEAD"
        # A link that saves the file asks the bucket to send it as an attachment: a browser ignores `download`
        # on another origin, and the web page's "Download MP4" showed the video in place of the page.
        saved = api.client.get(f"/v1/videos/{video_id}/content?disposition=attachment", follow_redirects=False)
        assert saved.headers["location"].endswith("&save")
    with make_api(tmp_path / "local", media) as api:
        video_id = api.create()["id"]
        api.complete(video_id)
        saved = api.client.get(f"/v1/videos/{video_id}/content?disposition=attachment")
        assert saved.headers["content-disposition"] == f'attachment; filename="{video_id}.mp4"'
        shown = api.client.get(f"/v1/videos/{video_id}/content")
        assert shown.headers["content-disposition"] == f'inline; filename="{video_id}.mp4"'
        bad = openai_error(api.client.get(f"/v1/videos/{video_id}/content?disposition=save"), 400)
        assert bad["param"] == "disposition"


# ---- status words on every surface --------------------------------------------------------------------------

STATUS_WORDS = {
    # state: (OpenAI, /video, /api/v1 and /status)
    "queued": ("queued", "InQueue", "queued"),
    "in_progress": ("in_progress", "InProgress", "processing"),
    "completed": ("completed", "Succeed", "completed"),
    "failed": ("failed", "Failed", "failed"),
    "cancelled": ("failed", "Cancelled", "cancelled"),
}


def test_status_words_on_every_surface(api: Api) -> None:
    # Created in the order the worker claims them: best priority first, then oldest.
    ids = {state: api.create()["id"] for state in ("completed", "failed", "in_progress", "queued", "cancelled")}
    api.complete(ids["completed"])
    api.fail(ids["failed"])
    api.run(ids["in_progress"])
    api.client.post(f"/v1/videos/{ids['cancelled']}/cancel")

    for state, (openai_word, video_word, task_word) in STATUS_WORDS.items():
        job_id = ids[state]
        video = api.client.get(f"/v1/videos/{job_id}").json()
        assert video["status"] == openai_word, state
        legacy = api.client.post("/video/status", json={"requestId": job_id}).json()
        assert legacy["status"] == video_word, state
        for path in (f"/api/v1/status/{job_id}", f"/status/{job_id}"):
            assert api.client.get(path).json()["status"] == task_word, (state, path)

    cancelled = api.client.get(f"/v1/videos/{ids['cancelled']}").json()
    assert cancelled["error"]["code"] == "cancelled"
    failed = api.client.get(f"/v1/videos/{ids['failed']}").json()
    assert failed["error"] == {"code": "generation_failed", "message": "CUDA out of memory"}
    legacy_failed = api.client.post("/video/status", json={"requestId": ids["failed"]}).json()
    assert legacy_failed["reason"] == "CUDA out of memory" and legacy_failed["results"] is None
    task_failed = api.client.get(f"/api/v1/status/{ids['failed']}").json()
    assert task_failed["error"]["code"] == "generation_failed" and task_failed["result_url"] is None


def test_queue_positions_and_priority_overtaking(api: Api) -> None:
    first, second, third = (api.create()["id"] for _ in range(3))
    positions = [api.client.get(f"/v1/videos/{i}").json()["queue_position"] for i in (first, second, third)]
    assert positions == [1, 2, 3]

    # 5.0 is the integer 5, for priority as for every integer field.
    urgent = api.client.post("/api/v1/generate", json={"prompt": "urgent", "priority": 5.0, "resolution": "64*64"})
    assert urgent.status_code == 202
    urgent_id = urgent.json()["task_id"]
    assert api.client.post("/video/status", json={"requestId": urgent_id}).json()["queue_position"] == 1
    assert api.client.get(f"/api/v1/status/{urgent_id}").json()["queue_position"] == 1
    positions = [api.client.get(f"/v1/videos/{i}").json()["queue_position"] for i in (first, second, third)]
    assert positions == [2, 3, 4]
    # The worker agrees: the urgent job is claimed first.
    api.claim("tiny-t2v", urgent_id)
    assert api.client.get(f"/v1/videos/{first}").json()["queue_position"] == 1


def test_list_pagination(api: Api) -> None:
    ids = [api.create()["id"] for _ in range(5)]
    page = api.client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [v["id"] for v in page["data"]] == ids[::-1][:2]
    # An empty cursor (`?after=`) is the first page.
    assert api.client.get("/v1/videos", params={"limit": 2, "after": ""}).json()["data"] == page["data"]
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = api.client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in page["data"]] == [ids[2], ids[1]] and page["has_more"] is True
    page = api.client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in page["data"]] == [ids[0]] and page["has_more"] is False
    ascending = api.client.get("/v1/videos", params={"order": "asc", "limit": 10}).json()
    assert [v["id"] for v in ascending["data"]] == ids and ascending["has_more"] is False
    assert ascending["data"][2]["queue_position"] == 3
    empty = api.client.get("/v1/videos", params={"after": ids[0]}).json()
    assert empty["data"] == [] and empty["first_id"] is None and empty["last_id"] is None


def test_cancel_and_delete_running_and_queued_jobs(api: Api) -> None:
    queued = api.create()["id"]
    cancelled = api.client.post(f"/v1/videos/{queued}/cancel").json()
    assert cancelled["status"] == "failed" and cancelled["error"]["code"] == "cancelled"

    running = api.create()["id"]
    api.run(running)
    api.storage.put_file(key_for(running, THUMBNAIL), api.media[1], "image/webp")  # a partial upload
    deleted = api.client.delete(f"/v1/videos/{running}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert api.storage.stat(key_for(running, THUMBNAIL)) is None
    # Deleted means gone, running or not: its worker finds the record missing at its next step and stops.
    assert openai_error(api.client.get(f"/v1/videos/{running}"), 404)["code"] == "not_found"
    assert running not in [v["id"] for v in api.client.get("/v1/videos").json()["data"]]
    assert api.store.set_progress(running, WORKER, 0.6) is False

    legacy_queued = api.client.post("/video/submit", json={"prompt": "p"}).json()["requestId"]
    answer = api.client.post("/video/cancel", json={"requestId": legacy_queued}).json()
    assert answer["status"] == "Cancelled" and answer["reason"]
    assert openai_error(api.client.post("/v1/videos/video_nope/cancel"), 404)["code"] == "not_found"
    # The two queued jobs cancelled here ended here: /metrics counts them (a running one, its worker counts).
    metrics = api.client.get("/metrics").text
    assert 'wanserve_jobs_finished_total{model="tiny-t2v",status="cancelled"} 2.0' in metrics


def test_a_job_deleted_while_a_list_reads_it_does_not_fail_the_list(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another client deletes a queued job between the list's read of the jobs and of their queue places:
    the list answered 404 for that job. It shows what it read, without a place."""
    from wanserve.errors import JobNotFound

    first, second = api.create()["id"], api.create()["id"]
    place = api.store.queue_position

    def deleted_meanwhile(job_id: str) -> int | None:
        if job_id == first:
            raise JobNotFound(job_id)
        return place(job_id)

    monkeypatch.setattr(api.store, "queue_position", deleted_meanwhile)
    listed = api.client.get("/v1/videos")
    assert listed.status_code == 200, listed.text
    places = {v["id"]: v["queue_position"] for v in listed.json()["data"]}
    assert places == {first: None, second: 2}
    legacy = api.client.post("/video/status", json={"requestId": first})
    assert legacy.status_code == 200 and legacy.json()["queue_position"] is None


def test_racing_cancels_of_a_queued_job_count_it_once(api: Api) -> None:
    ids = [api.create()["id"] for _ in range(3)]
    start = threading.Barrier(12)
    answers: list[int] = []

    def cancel(job_id: str) -> None:
        start.wait(10)
        answers.append(api.client.post(f"/v1/videos/{job_id}/cancel").status_code)

    threads = [threading.Thread(target=cancel, args=(job_id,)) for job_id in ids for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [200] * 12
    metrics = api.client.get("/metrics").text
    assert 'wanserve_jobs_finished_total{model="tiny-t2v",status="cancelled"} 3.0' in metrics


# ---- legacy surfaces ----------------------------------------------------------------------------------------


def test_video_submit_status_and_download(api: Api) -> None:
    response = api.client.post(
        "/video/submit", json={"prompt": "a boat", "size": "64x48", "num_frames": 5, "seed": 3, "priority": 1}
    )
    assert response.status_code == 202  # as the system the route comes from answered
    request_id = response.json()["requestId"]
    assert set(response.json()) == {"requestId"}
    status = api.client.post("/video/status", json={"requestId": request_id}).json()
    assert status == {
        "requestId": request_id,
        "status": "InQueue",
        "reason": None,
        "results": None,
        "queue_position": 1,
        "progress": 0.0,
        "created_at": status["created_at"],
        "updated_at": status["updated_at"],
    }
    api.complete(request_id)
    status = api.client.post("/video/status", json={"requestId": request_id}).json()
    assert status["status"] == "Succeed" and status["progress"] == 1.0 and status["queue_position"] is None
    # A path, as the replaced system's was (`/videos/<id>.mp4`): its clients join it to the server's address,
    # which an absolute URL turned into `http://hosthttp://host/…`.
    url = status["results"]["video_url"]
    assert url == f"/v1/videos/{request_id}/content"
    assert api.client.get(url).content == api.media[0].read_bytes()
    # The replaced system's own file path, for links kept from it and clients that build it: the same file,
    # with ranges; anything else under /videos/ is a 404 that says what is there.
    old_path = api.client.get(f"/videos/{request_id}.mp4")
    assert old_path.status_code == 200 and old_path.content == api.media[0].read_bytes()
    assert old_path.headers["content-type"] == "video/mp4"
    ranged = api.client.get(f"/videos/{request_id}.mp4", headers={"Range": "bytes=0-3"})
    assert ranged.status_code == 206 and ranged.content == api.media[0].read_bytes()[:4]
    assert api.client.head(f"/videos/{request_id}.mp4").status_code == 200
    assert "/videos/<requestId>.mp4" in problem(api.client.get(f"/videos/{request_id}.webm"), 404)["detail"]
    assert problem(api.client.get("/videos/video_nothing.mp4"), 404)["code"] == "not_found"
    job = api.store.get(request_id)
    assert job.source == "video" and job.priority == 1 and job.request["width"] == 64 and job.request["height"] == 48


def test_video_surface_errors_are_problem_json(api: Api) -> None:
    assert problem(api.client.post("/video/status", json={}), 400)["field"] == "requestId"
    assert problem(api.client.post("/video/status", json={"requestId": "video_x"}), 404)["code"] == "not_found"
    # A misspelt or extra field is refused, not ignored: a cancel must not "succeed" on a body it half read.
    queued = api.client.post("/video/submit", json={"prompt": "p"}).json()["requestId"]
    for route, body in (
        ("/video/status", {"requestid": queued}),
        ("/video/status", {"requestId": queued, "force": True}),
        ("/video/cancel", {"requestId": queued, "ulysses_size": 4}),
    ):
        answer = problem(api.client.post(route, json=body), 400)
        assert answer["field"] == next(k for k in body if k != "requestId") and answer["code"] == "unknown_parameter"
    assert api.store.get(queued).status.value == "queued"
    body = problem(api.client.post("/video/submit", json={"prompt": "p", "model": "tiny-i2v"}), 400)
    assert body["field"] == "image_url"
    for layout in ("sp_size", "dit_fsdp", "vae_parallel"):
        body = problem(api.client.post("/video/submit", json={"prompt": "p", layout: 4}), 400)
        assert body["field"] == layout and "fixed at start" in body["detail"]
    body = problem(api.client.post("/video/submit", json={"prompt": "p", "image_url": "http://x/y.png"}), 400)
    # These routes take no file: the refusal pointed to uploads, which they refuse.
    assert body["field"] == "image_url" and "data: URLs" in body["detail"] and "upload" not in body["detail"]
    # `image_size` is spelt 1280*720 in their examples, and so in its error.
    body = problem(api.client.post("/video/submit", json={"prompt": "p", "image_size": "-64*64"}), 400)
    assert body["field"] == "image_size" and "WIDTH*HEIGHT" in body["detail"]


def test_the_video_surface_answers_as_its_own_clients_read_it(api: Api) -> None:
    """The /video routes' clients (the replaced system's own examples) read `error` and `message` from an
    error, send its step-cache and sampler fields, and call `sample_shift` the flow shift."""
    answer = problem(api.client.post("/video/submit", json={"prompt": "p", "image_url": "invalid-url"}), 400)
    assert answer["error"] == answer["code"] == "invalid_value" and answer["message"] == answer["detail"]
    assert answer["field"] == "image_url" and "image_url" in answer["message"]
    # Their example request, less its parallel layout (refused by name, test above).
    theirs = {
        "prompt": "a cat",
        "image_size": "64*48",
        "num_frames": 5,
        "guidance_scale": 3.0,
        "infer_steps": 3,
        "seed": 42,
        "negative_prompt": "blurry",
        "use_attentioncache": False,
        "start_step": 12,
        "attentioncache_interval": 4,
        "end_step": 37,
        "sample_solver": "UniPC",
        "sample_shift": 5.5,
    }
    response = api.client.post("/video/submit", json=theirs)
    assert response.status_code == 202, response.text
    taken = response.json()["requestId"]
    request = api.store.get(taken).request
    assert (request["flow_shift"], request["num_inference_steps"], request["width"]) == (5.5, 3, 64)
    for change, field, words in (
        ({"use_attentioncache": True}, "use_attentioncache", "preset"),
        # Their fields' types: "false" (a string) was told to use preset, 0 and "abc" were taken.
        ({"use_attentioncache": "false"}, "use_attentioncache", "must be true or false, got 'false'"),
        ({"use_attentioncache": 0}, "use_attentioncache", "must be true or false"),
        ({"start_step": "abc"}, "start_step", "whole number"),
        ({"end_step": [1]}, "end_step", "whole number"),
        ({"attentioncache_interval": -1}, "attentioncache_interval", "0 or more"),
        ({"sample_solver": "dpm++"}, "sample_solver", "must be unipc"),
        ({"sample_shift": 0}, "sample_shift", "greater than 0"),
        ({"flow_shift": 5.0}, "sample_shift", "send one of the two"),
    ):
        refused = problem(api.client.post("/video/submit", json={**theirs, **change}), 400)
        assert refused["field"] == field and words in refused["detail"], refused
    # A key with no name before a bracket was named "" (an error naming no field).
    assert problem(api.client.post("/video/submit", json={"prompt": "p", "[": 1}), 400)["field"] == "["
    # An id that names no job, or is not a string, is named as the field it came in.
    for route in ("/video/status", "/video/cancel"):
        missing = problem(api.client.post(route, json={"requestId": "video_nope"}), 404)
        assert missing["field"] == "requestId" and missing["error"] == "not_found"
        assert "must be a string" in problem(api.client.post(route, json={"requestId": 5}), 400)["detail"]
        # These routes take JSON; a form says so instead of quoting the JSON parser.
        form = problem(api.client.post(route, data={"requestId": "x"}), 400)
        assert form["field"] == "body" and "Content-Type: application/json" in form["detail"]
    # Their cancel answered Cancelled at once: a running job's says the cancel was taken.
    api.run(taken)
    cancelled = api.client.post("/video/cancel", json={"requestId": taken}).json()
    assert cancelled["status"] == "InProgress" and "cancel requested" in cancelled["reason"]


def test_api_v1_generate_and_status(api: Api) -> None:
    image = data_url(png_bytes((50, 90, 130)))
    response = api.client.post(
        "/api/v1/generate",
        json={"prompt": "a bird", "resolution": "64*64", "task_type": "i2v", "image_url": image, "priority": 2},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    task_id = body["task_id"]
    assert body == {
        "task_id": task_id,
        "status": "queued",
        "status_url": f"/api/v1/status/{task_id}",  # a path, as the replaced system's
    }
    assert api.store.get(task_id).model == "tiny-i2v"  # chosen by task_type
    status = api.client.get(f"/api/v1/status/{task_id}").json()
    assert status["status"] == "queued" and status["progress"] == 0 and status["result_url"] is None
    assert status["created_at"].endswith("Z") and "T" in status["created_at"]
    api.run(task_id, model="tiny-i2v", progress=0.37)
    assert api.client.get(f"/api/v1/status/{task_id}").json()["progress"] == 37
    assert api.client.get(f"/api/v1/status/{task_id}").json()["cancel_requested"] is False
    # A cancel asked for elsewhere (these routes have none) shows until the job stops.
    api.client.post(f"/v1/videos/{task_id}/cancel")
    assert api.client.get(f"/api/v1/status/{task_id}").json()["cancel_requested"] is True
    api.store.fail(task_id, WORKER, "timeout", "took too long", TTL)
    failed = api.client.get(f"/api/v1/status/{task_id}").json()
    assert failed["cancel_requested"] is False
    assert failed["status"] == "failed" and failed["error"] == {"code": "timeout", "message": "took too long"}


def test_the_replaced_systems_own_examples_are_taken(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """Their guides' requests: `image_size` and `infer_steps` (their names for the size and the steps), Wan's
    task names as task_type (`ti2v-5B`), a balancer's health check at /api/v1/health. Each was a 400 or 404."""
    with make_api(tmp_path, media, model=["tiny-t2v", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"]) as api:
        for path in ("/video/submit", "/submit"):
            body = {"prompt": "a cat", "image_size": "64*48", "num_frames": 5, "infer_steps": 3, "model": "tiny-t2v"}
            response = api.client.post(path, json=body)
            assert response.status_code == 202, response.text
            job_id = response.json().get("requestId") or response.json()["task_id"]
            request = api.store.get(job_id).request
            assert (request["width"], request["height"], request["num_inference_steps"]) == (64, 48, 3)
            # Errors name the field as sent; the older and the newer name together is one too many.
            bad = problem(api.client.post(path, json={**body, "image_size": "65*48"}), 400)
            assert bad["field"] == "image_size"
            assert problem(api.client.post(path, json={**body, "infer_steps": 0}), 400)["field"] == "infer_steps"
            both = {**body, "num_inference_steps": 3}
            assert problem(api.client.post(path, json=both), 400)["field"] == "infer_steps"
        both = {"prompt": "p", "image_size": "64*48", "resolution": "64*48"}
        assert "send one of the two" in problem(api.client.post("/api/v1/generate", json=both), 400)["detail"]
        # Wan's task names pick the model they name, in any case, as do t2v, i2v and ti2v.
        for task_type, model in (("ti2v-5B", "wan2.2-ti2v-5b"), ("t2v-1.3b", "wan2.1-t2v-1.3b"), (" T2V ", "tiny-t2v")):
            response = api.client.post("/api/v1/generate", json={"prompt": "a cat", "task_type": task_type})
            assert response.status_code == 202, response.text
            assert api.store.get(response.json()["task_id"]).model == model
        unserved = problem(api.client.post("/api/v1/generate", json={"prompt": "p", "task_type": "t2v-A14B"}), 400)
        assert unserved["field"] == "task_type" and "wan2.2-t2v-a14b, which is not served here" in unserved["detail"]
        other = {"prompt": "p", "task_type": "ti2v-5B", "model": "tiny-t2v"}
        assert "but model names tiny-t2v" in problem(api.client.post("/api/v1/generate", json=other), 400)["detail"]
        unknown = problem(api.client.post("/api/v1/generate", json={"prompt": "p", "task_type": "flf2v-14B"}), 400)
        assert unknown["field"] == "task_type" and "ti2v-5B" in unknown["detail"]
        for method in ("GET", "HEAD"):
            assert api.client.request(method, "/api/v1/health").status_code == 200
        assert api.client.get("/api/v1/health").json()["status"] == "healthy"  # their body said "healthy"


def test_links_follow_the_public_url_behind_a_proxy(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """Behind a proxy that serves the API under a path, the legacy routes' paths carry it and the absolute
    links are built from WANSERVE_PUBLIC_URL, not from the Host header the client sent."""
    with make_api(tmp_path, media, public_url="https://videos.example.com/wan/") as api:
        spoofed = {"Host": "evil.example"}
        created = api.client.post("/api/v1/generate", json={"prompt": "p"}, headers=spoofed).json()
        task_id = created["task_id"]
        assert created["status_url"] == f"/wan/api/v1/status/{task_id}"
        api.complete(task_id)
        done = api.client.get(f"/api/v1/status/{task_id}", headers=spoofed).json()
        assert done["result_url"] == f"https://videos.example.com/wan/v1/videos/{task_id}/content"
        video = api.client.post("/video/status", json={"requestId": task_id}, headers=spoofed).json()
        assert video["results"]["video_url"] == f"/wan/v1/videos/{task_id}/content"


def test_submit_and_status_at_the_root(api: Api) -> None:
    response = api.client.post("/submit", json={"prompt": "p", "task_type": "t2v", "resolution": "64*64"})
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    assert response.json()["status_url"] == f"/status/{task_id}"
    api.complete(task_id)
    status = api.client.get(f"/status/{task_id}").json()
    assert set(status) == {
        "task_id",
        "status",
        "progress",
        "queue_position",
        "result_url",
        "error",
        "cancel_requested",
        "created_at",
        "updated_at",
    }
    assert status["status"] == "completed" and status["progress"] == 100
    assert status["result_url"] == f"http://testserver/v1/videos/{task_id}/content"
    assert api.store.get(task_id).source == "submit"
    missing = problem(api.client.get("/status/video_nope"), 404)
    assert missing["code"] == "not_found" and missing["field"] == "task_id"


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({"task_type": "i2v", "model": "tiny-t2v"}, "task_type", "does not do i2v"),
        ({"task_type": "i2v"}, "image_url", "needs an input image"),
        ({"task_type": "t2v", "image_url": "IMAGE"}, "image_url", "takes no input image"),
        ({"task_type": "ti2v"}, "task_type", "no model served here does ti2v; served: tiny-t2v (t2v), tiny-i2v (i2v)"),
        ({"task_type": "v2v"}, "task_type", "must be one of"),
        ({"task_type": ["t2v"]}, "task_type", "must be one of"),
        ({"task_type": {}}, "task_type", "must be one of"),
        ({"resolution": "big"}, "resolution", "must look like WIDTH*HEIGHT (for example 1280*704)"),
        ({"resolution": "64*63"}, "resolution", "multiple of 16"),
        ({"resolution": "256*512"}, "resolution", "larger than tiny-t2v supports"),
        ({"width": 512, "height": 256}, "width", "larger than tiny-t2v supports"),
        ({"num_frames": 10}, "num_frames", "4k+1"),
        ({"resolution": "6_4*6_4"}, "resolution", "must look like WIDTH*HEIGHT"),
        ({"tp_size": 2}, "tp_size", "parallel layout is server configuration"),
        ({"steps": 4}, "steps", "not a known field"),
        ({"model": "wan2.2-ti2v-5b"}, "model", "not served"),
    ],
)
def test_api_v1_validation(api: Api, body: dict[str, Any], field: str, needle: str) -> None:
    if body.get("image_url") == "IMAGE":
        body = {**body, "image_url": data_url(png_bytes((1, 1, 1)))}
    for path in ("/api/v1/generate", "/submit"):
        answer = problem(api.client.post(path, json={"prompt": "p", **body}), 400)
        assert answer["field"] == field and needle in answer["detail"], answer


# ---- operations ---------------------------------------------------------------------------------------------


def test_health_ready_and_models(tmp_path: Path, media: tuple[Path, Path]) -> None:
    state: dict[str, Any] = {"ready": False, "models": {"tiny-t2v": "loading", "tiny-i2v": "ready"}}
    with make_api(tmp_path, media, readiness=lambda: state) as api:
        health = api.client.get("/health").json()  # the replaced systems' body: their uptime checks look for it
        assert health["status"] == "healthy" and set(health) == {"status", "timestamp", "uptime"}, health
        assert abs(health["timestamp"] - time.time()) < 60 and health["uptime"] >= 0
        not_ready = api.client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] == "not_ready" and "tiny-t2v" in not_ready.json()["reasons"][0]
        assert api.client.head("/health").status_code == 200 and api.client.head("/ready").status_code == 503
        state.update(ready=True, models={"tiny-t2v": "ready", "tiny-i2v": "ready"})
        ready = api.client.get("/ready")
        assert ready.status_code == 200 and ready.json()["store"] == "ok" and ready.json()["reasons"] == []

        running = api.create()["id"]
        api.run(running)
        api.create()
        models = api.client.get("/v1/models").json()
        assert models["object"] == "list"
        t2v, i2v = models["data"]
        assert t2v["id"] == "tiny-t2v" and t2v["object"] == "model" and t2v["owned_by"] == "wanserve"
        assert t2v["tasks"] == ["t2v"] and i2v["tasks"] == ["i2v"]
        assert t2v["limits"] == {
            "max_frames": 33,
            "max_pixels": 256 * 256,
            "max_side": 512,
            "size_multiple": 16,
            "frame_stride": 4,
        }
        assert {"width": 64, "height": 64, "num_frames": 9, "fps": 8}.items() <= t2v["defaults"].items()
        assert t2v["defaults"]["num_inference_steps"] == 4 and t2v["defaults"]["guidance_scale"] == 5.0
        assert t2v["queue_depth"] == 1 and t2v["running"] == 1 and i2v["queue_depth"] == 0
        assert t2v["demand"] == 2 and i2v["demand"] == 0
        assert isinstance(t2v["aliases"], list)
        # One model, as OpenAI's models.retrieve asks for it (what KEDA reads to size a model's workers).
        assert api.client.get("/v1/models/tiny-t2v").json() == t2v
        missing = api.client.get("/v1/models/wan2.1-t2v-14b")
        error = openai_error(missing, 404)
        assert error["code"] == "model_not_found" and error["param"] == "model" and "tiny-t2v" in error["message"]
        assert openai_error(api.client.get("/v1/models/"), 404)["code"] == "model_not_found"


def test_one_model_by_its_repo_id_or_alias(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """A served model may be named by its Hugging Face repo id, slash included, or a catalog alias."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    settings = Settings(data_dir=tmp_path, model=["wan2.2-ti2v-5b"])
    app = create_app(settings, store, LocalStorage(tmp_path / "videos"), {"wan2.2-ti2v-5b": _spec("wan2.2-ti2v-5b")})
    try:
        with TestClient(app) as client:
            for name in ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "ti2v-5B", "wan2.2-ti2v-5b"):
                answer = client.get(f"/v1/models/{name}")
                assert answer.status_code == 200 and answer.json()["id"] == "wan2.2-ti2v-5b", name
    finally:
        store.close()


def test_ready_without_readiness_callback_checks_the_store(api: Api) -> None:
    assert api.client.get("/ready").status_code == 200
    api.store.close()
    api.store.path.unlink()
    api.store.path.mkdir()  # the database is gone and cannot be recreated: the store is unreachable
    # (close() dropped this thread's connection; the ping opens a new one, which fails)
    response = api.client.get("/ready")
    assert response.status_code == 503 and response.json()["store"] == "unreachable"


def test_an_api_replica_stays_ready_while_only_the_result_storage_is_down(
    tmp_path: Path, media: tuple[Path, Path]
) -> None:
    """Every replica reported not-ready over one bucket's blip and left the Service together, though submits,
    status reads and cancels did not need the bucket: clients met the balancer's bare 503 for all of them."""
    from wanserve.roles import api_replica_readiness

    (tmp_path / "not-a-folder").write_text("")
    unusable = LocalStorage(tmp_path / "not-a-folder" / "videos")  # can never be made: "unreachable"
    with make_api(tmp_path, media, readiness=api_replica_readiness, storage=unusable) as api:
        response = api.client.get("/ready")
        assert response.status_code == 200, response.text
        assert response.json()["storage"] == "unreachable" and response.json()["store"] == "ok"
        assert api.client.post("/v1/videos", json={"prompt": "p"}).status_code == 200
        api.store.close()
        api.store.path.unlink()
        api.store.path.mkdir()  # and without the store, it can do nothing: not ready
        assert api.client.get("/ready").status_code == 503
    with make_api(tmp_path / "serve", media, storage=unusable) as api:  # a worker's process needs both
        assert api.client.get("/ready").status_code == 503


def test_ready_says_no_when_the_disk_under_the_store_and_storage_is_full(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk still answers reads and lets an empty file be made, so /ready said "ready" while every
    submit failed. The free space is what tells; here the disk is "full" by raising the bar above it."""
    import wanserve.disk

    assert api.client.get("/ready").status_code == 200
    monkeypatch.setattr(wanserve.disk, "MIN_FREE_BYTES", 1 << 62)
    response = api.client.get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["store"] == body["storage"] == "unreachable"
    assert "job store unreachable, slow (no answer within 2 s) or full" in body["reasons"]


def test_a_full_storage_disk_is_said_to_be_full_not_unreachable(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client retrying after "cannot be reached" looks for a network fault: the answer says the disk is full,
    and names no server path. Nor is an empty folder left for a job that was never made (one per refusal)."""
    import errno

    def full(*_args: object) -> None:  # the disk fills as the image is copied in
        raise OSError(errno.ENOSPC, "No space left on device", str(api.storage.root / "x"))

    monkeypatch.setattr("wanserve.storage.local.shutil.copyfileobj", full)
    response = api.client.post(
        "/v1/videos",
        data={"prompt": "p", "model": "tiny-i2v"},
        files={"input_reference": ("a.png", png_bytes((1, 2, 3)))},
    )
    error = openai_error(response, 503)
    assert error["code"] == "storage_unavailable"
    assert error["message"] == "the result storage cannot be written: No space left on device; try again shortly"
    assert not api.storage.root.exists() or list(api.storage.root.iterdir()) == []


def test_health_answers_while_every_worker_thread_waits_on_the_store(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a store outage each request holds a pool thread through the client's retries; with the pool full,
    /health (a liveness probe) waited behind them, and orchestrators restarted every replica."""
    video_id = api.create()["id"]
    outage_over = threading.Event()
    get = api.store.get

    def waiting_on_the_store(job_id: str) -> Any:
        outage_over.wait(60)
        return get(job_id)

    monkeypatch.setattr(api.store, "get", waiting_on_the_store)
    waiting = [
        threading.Thread(target=api.client.get, args=(f"/v1/videos/{video_id}",), daemon=True) for _ in range(48)
    ]
    for thread in waiting:
        thread.start()
    time.sleep(1.0)  # let them take every thread of the pool (40)
    answered: list[int] = []
    probe = threading.Thread(target=lambda: answered.append(api.client.get("/health").status_code), daemon=True)
    probe.start()
    probe.join(20)
    during_the_outage = list(answered)
    outage_over.set()
    for thread in waiting:
        thread.join(30)
    assert during_the_outage == [200]


def test_metrics_lists_every_metric(api: Api) -> None:
    video_id = api.create()["id"]
    api.client.get(f"/v1/videos/{video_id}")
    api.metrics.job_claimed("tiny-t2v", 1.5)
    api.metrics.job_finished("tiny-t2v", "completed", 12.0)
    api.metrics.denoise_step("tiny-t2v", 0.2)
    text = api.client.get("/metrics").text
    for name in (
        "wanserve_jobs_submitted_total",
        "wanserve_jobs_finished_total",
        "wanserve_queue_depth",
        "wanserve_jobs_running",
        "wanserve_job_queue_wait_seconds",
        "wanserve_job_duration_seconds",
        "wanserve_denoise_step_seconds",
        "wanserve_http_request_duration_seconds",
    ):
        assert name in text, name
    assert 'wanserve_jobs_submitted_total{model="tiny-t2v"} 1.0' in text
    assert 'wanserve_queue_depth{model="tiny-t2v"} 1.0' in text
    # Labelled by route template, not by the raw path with its id.
    assert 'route="/v1/videos/{video_id}"' in text and video_id not in text
    # The page's files and the API description are routes too; "unmatched" is only what no route takes.
    for path in ("/static/app.js", "/openapi.json", "/no/such/path"):
        api.client.get(path)
    text = api.client.get("/metrics").text
    assert 'route="/static/{path}",status="200"' in text and 'route="/openapi.json",status="200"' in text
    assert 'route="unmatched",status="200"' not in text and 'route="unmatched",status="404"' in text
    # A cross-site refusal comes before routing: it is labelled by the route it was for all the same.
    refused = api.client.post("/v1/videos", json={"prompt": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403
    text = api.client.get("/metrics").text
    assert 'method="POST",route="/v1/videos",status="403"' in text and 'route="unmatched",status="403"' not in text
    # Nor by any method a client invents: each would be a new series for good.
    for verb in ("FROB", "XYZZY"):
        api.client.request(verb, "/v1/videos")
    text = api.client.get("/metrics").text
    assert "FROB" not in text and 'method="other"' in text


def test_metrics_without_a_given_metrics_object(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model=["tiny-t2v"])
    store = SQLiteJobStore(tmp_path / "jobs.db")
    app = create_app(settings, store, LocalStorage(tmp_path / "v"), {"tiny-t2v": _spec("tiny-t2v")})
    with TestClient(app) as client:
        # Every series exists at zero before the first job: a series born at 1 hides that job from increase().
        fresh = client.get("/metrics").text
        for status in ("completed", "failed", "cancelled"):
            assert f'wanserve_jobs_finished_total{{model="tiny-t2v",status="{status}"}} 0.0' in fresh, status
        assert 'wanserve_jobs_submitted_total{model="tiny-t2v"} 0.0' in fresh
        client.post("/v1/videos", json={"prompt": "p"})
        assert 'wanserve_queue_depth{model="tiny-t2v"} 1.0' in client.get("/metrics").text
    store.close()


def test_unknown_routes_use_the_surface_envelope(api: Api) -> None:
    assert openai_error(api.client.get("/v1/nothing"), 404)
    assert problem(api.client.get("/nothing"), 404)
    assert problem(api.client.put("/health"), 405)


def test_seconds_map_to_the_nearest_valid_frame_count() -> None:
    wan = _spec("wan2.1-t2v-1.3b")
    assert seconds_to_frames("4", 16, wan) == 65
    assert seconds_to_frames("5", 16, wan) == 81
    assert seconds_to_frames(8, 16, wan) == 129
    assert seconds_to_frames("12", 16, wan) == 161  # capped by the model's 161 frames
    assert seconds_to_frames("12", 8, _spec("tiny-t2v")) == 33
    assert seconds_to_frames("0.01", 8, _spec("tiny-t2v")) == 1


def test_seconds_are_counted_at_the_fps_asked_for_even_as_a_float(api: Api) -> None:
    """`fps: 16.0` is taken as 16 fps, so `seconds` must be too: it was counted at the model's default (8 on the
    tiny model), a clip of half the length asked for."""
    as_int = api.create(seconds="2", fps=16)
    as_float = api.create(seconds="2", fps=16.0)
    assert as_int["num_frames"] == as_float["num_frames"] == 33 and as_float["fps"] == 16


def test_openapi_describes_the_body_each_route_accepts(api: Api) -> None:
    """/docs shows every field a route takes and no other: the schemas are checked against the routes' own
    field lists, which are what the server enforces."""
    from wanserve.api import legacy, openai_videos

    paths = api.client.get("/openapi.json").json()["paths"]

    def fields(path: str, content: str = "application/json") -> set[str]:
        return set(paths[path]["post"]["requestBody"]["content"][content]["schema"]["properties"])

    openai_fields = openai_videos.ALLOWED_FIELDS | openai_videos.IGNORED_FIELDS
    assert fields("/v1/videos") == fields("/v1/videos", "multipart/form-data") == openai_fields
    assert fields("/video/submit") == legacy.VIDEO_FIELDS
    assert fields("/api/v1/generate") == fields("/submit") == legacy.TASK_FIELDS
    assert fields("/video/status") == fields("/video/cancel") == {"requestId"}
    form = paths["/v1/videos"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["input_reference"]["format"] == "binary"
    for create in ("/v1/videos", "/video/submit", "/api/v1/generate", "/submit"):
        headers = [p["name"] for p in paths[create]["post"].get("parameters", []) if p["in"] == "header"]
        assert headers == ["Idempotency-Key"], create
    assert "parameters" not in paths["/video/status"]["post"]


def test_api_imports_no_torch() -> None:
    code = "import sys, wanserve.api.app, wanserve.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_with_api_keys_set_every_job_route_asks_for_one(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """Without keys anyone who reaches the port reads, cancels and deletes everyone's jobs; with
    WANSERVE_API_KEY each job route wants one of the keys (two: a new one rolls out before the old goes)."""
    openai = pytest.importorskip("openai")
    # A secret made from a file ends in a newline: it is no part of the key (it stopped the server, "not
    # printable ASCII").
    with make_api(tmp_path, media, api_key="old-key, new-key\n") as api:
        refused = api.client.post("/v1/videos", json={"prompt": "p"})
        error = openai_error(refused, 401)
        assert error["code"] == "invalid_api_key" and refused.headers["www-authenticate"] == "Bearer"
        wrong = api.client.get("/v1/videos", headers={"Authorization": "Bearer nope"})
        assert openai_error(wrong, 401)["code"] == "invalid_api_key"
        assert problem(api.client.post("/video/submit", json={"prompt": "p"}), 401)["code"] == "invalid_api_key"
        assert problem(api.client.get("/api/v1/status/video_x"), 401)["code"] == "invalid_api_key"
        assert api.client.get("/v1/models").status_code == 401
        assert api.store.list()[0] == []  # nothing queued by the refused requests
        # Probes and scrapers carry no keys.
        for path in ("/health", "/ready", "/metrics"):
            assert api.client.get(path).status_code in (200, 503), path
        # The OpenAI SDK's api_key, and X-API-Key for the other clients.
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="new-key", http_client=api.client)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            video = client.videos.create(prompt="a lighthouse", model="tiny-t2v")
        assert client.videos.retrieve(video.id).id == video.id
        legacy = api.client.post("/video/status", json={"requestId": video.id}, headers={"X-API-Key": "old-key"})
        assert legacy.status_code == 200
        # /docs can send one: the OpenAPI declares both ways.
        schemes = api.client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    # Set but empty (an empty secret) would mean "no key asked for": refused instead.
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="holds no key"):
        Settings(api_key=" , ")


def test_an_image_the_storage_cannot_take_is_a_503_and_queues_nothing(tmp_path: Path, media: tuple[Path, Path]) -> None:
    (tmp_path / "videos").write_text("not a folder")  # a storage that cannot take a file: a full disk, say
    with make_api(tmp_path, media) as api:
        answer = api.client.post(
            "/v1/videos", data={"prompt": "p", "model": "tiny-i2v"}, files={"input_reference": png_bytes((1, 2, 3))}
        )
        assert openai_error(answer, 503)["code"] == "storage_unavailable" and answer.headers["retry-after"] == "5"
        assert api.store.list()[0] == []


def test_a_drain_is_not_taken_from_a_web_page_nor_without_a_key(tmp_path: Path, tiny_cache: Path) -> None:
    """The worker ops port's POST /drain stops a GPU worker (a model load to undo). A page on the cluster
    network could send it as a simple cross-site POST; with keys set, a caller on another host needs one. The
    pod's own preStop hook, on loopback, does not."""
    from wanserve.jobs import open_store
    from wanserve.roles import ops_app
    from wanserve.storage import open_storage
    from wanserve.worker import Worker

    settings = Settings(data_dir=tmp_path, api_key="k", cache_dir=tiny_cache)
    store = open_store(settings.store_url)
    worker = Worker("tiny-t2v", settings, store, open_storage(settings.storage_url), engine=object())  # type: ignore[arg-type]
    app = ops_app(worker, Metrics(), store)
    try:
        with TestClient(app, client=("10.0.0.9", 40000)) as remote:
            # Shaped as every error off /v1 is (docs/api.md): problem+json with a code.
            cross_site = remote.post("/drain", headers={"Origin": "http://evil.example"})
            assert problem(cross_site, 403)["code"] == "cross_site_request"
            keyless = remote.post("/drain")
            assert problem(keyless, 401)["code"] == "invalid_api_key"
            assert keyless.headers["www-authenticate"] == "Bearer" and not worker.draining
            assert remote.get("/health").status_code == 200  # probes need no key
            assert problem(remote.get("/nope"), 404)["code"] == "not_found"
            assert problem(remote.get("/drain"), 405)["code"] == "method_not_allowed"
            # Only its four routes: its schema was a 500 with two tracebacks logged per request (a port scanner
            # filled the log), as /docs is a 404.
            for path in ("/openapi.json", "/docs", "/redoc"):
                assert problem(remote.get(path), 404)["code"] == "not_found", path
        with TestClient(app, client=("127.0.0.1", 40000)) as local:
            assert local.post("/drain", headers={"Origin": "http://evil.example"}).status_code == 403
            # What a browser marks as another site's, as the API refuses it: a loopback caller needs no key.
            assert local.post("/drain", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
            assert not worker.draining
            assert local.post("/drain").status_code == 200 and worker.draining
    finally:
        store.close()


def test_a_workers_ready_body_agrees_with_its_status(tmp_path: Path, tiny_cache: Path) -> None:
    """With its store unreachable a loaded worker answered 503 with `"ready": true` in the body."""
    from wanserve.jobs import open_store
    from wanserve.roles import ops_app
    from wanserve.storage import open_storage
    from wanserve.worker import Worker

    settings = Settings(data_dir=tmp_path, cache_dir=tiny_cache)
    store = open_store(settings.store_url)
    worker = Worker("tiny-t2v", settings, store, open_storage(settings.storage_url), engine=object())  # type: ignore[arg-type]
    worker.loaded.set()
    try:
        with TestClient(ops_app(worker, Metrics(), store)) as client:
            ready = client.get("/ready")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            assert ready.json()["status"] == "ready" and ready.json()["reasons"] == [], ready.text
            store.path.unlink()
            store.path.mkdir()  # the database is gone and cannot be made again: the store is unreachable
            store.close()
            refused = client.get("/ready")
            assert refused.status_code == 503 and refused.json()["store"] == "unreachable"
            assert refused.json()["ready"] is False
            # The API's body: a status and reasons (a worker's had neither).
            assert refused.json()["status"] == "not_ready"
            assert refused.json()["reasons"] == ["job store unreachable, slow (no answer within 2 s) or full"], (
                refused.text
            )
    finally:
        store.close()


# ---- the official OpenAI SDK, unchanged ---------------------------------------------------------------------


def test_answers_are_not_sniffed_and_job_states_not_cached(api: Api) -> None:
    video_id = api.create()["id"]
    for path in ("/v1/videos", f"/v1/videos/{video_id}", "/v1/videos/video_missing"):
        answer = api.client.get(path)
        assert answer.headers["cache-control"] == "no-store" and answer.headers["x-content-type-options"] == "nosniff"
    api.complete(video_id)
    content = api.client.get(f"/v1/videos/{video_id}/content")
    assert content.status_code == 200 and content.headers["x-content-type-options"] == "nosniff"
    assert content.headers.get("cache-control") != "no-store"  # a finished video may be cached


def test_official_openai_sdk(api: Api) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api.client, max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the Videos API deprecated

        video = client.videos.create(prompt="a lighthouse", model="tiny-t2v", seconds="4", size="64x64")
        assert video.status == "queued" and video.size == "64x64" and video.model == "tiny-t2v"
        assert video.seconds == "4.12"  # 4 s at 8 fps → 33 frames
        extra = client.videos.create(
            prompt="with extras", extra_body={"num_inference_steps": 2, "seed": 5, "guidance_scale": 4.0}
        )
        assert api.store.get(extra.id).request["seed"] == 5
        image = client.videos.create(
            prompt="from an image", model="tiny-i2v", input_reference=("ref.png", io.BytesIO(png_bytes((5, 5, 5))))
        )
        assert image.model == "tiny-i2v"

        api.complete(video.id)
        fetched = client.videos.retrieve(video.id)
        assert fetched.status == "completed" and fetched.progress == 100
        listed = client.videos.list(limit=2)
        assert [v.id for v in listed.data] == [image.id, extra.id] and listed.has_more
        every = [v.id for v in client.videos.list(limit=2)]  # auto-pagination follows last_id
        assert every == [image.id, extra.id, video.id]

        content = client.videos.download_content(video.id)
        assert content.content == api.media[0].read_bytes()

        failing = client.videos.create(prompt="doomed")
        with pytest.raises(openai.BadRequestError) as raised:
            client.videos.create(prompt="bad", extra_body={"num_frames": 10})
        assert raised.value.body["param"] == "num_frames"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve("video_missing")

        # create_and_poll follows openai-poll-after-ms until a worker (here a thread) finishes the job.
        def worker() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                job = api.store.claim("tiny-t2v", WORKER, 30.0)
                if job is not None and job.request["prompt"] == "polled":
                    api.store.complete(job.id, WORKER, {"seed": 1, "timings": {}}, TTL)
                    return
                if job is not None:
                    api.store.fail(job.id, WORKER, "generation_failed", "skipped", TTL)
                time.sleep(0.02)

        thread = threading.Thread(target=worker)
        thread.start()
        polled = client.videos.create_and_poll(prompt="polled", poll_interval_ms=20)
        thread.join()
        assert polled.status == "completed"
        failed = client.videos.retrieve(failing.id)
        assert failed.status == "failed" and failed.error is not None and failed.error.code == "generation_failed"

        gone = client.videos.delete(video.id)
        assert gone.deleted and gone.object == "video.deleted" and gone.id == video.id
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(video.id)


def test_the_sdk_types_hold_for_models_images_without_a_name_and_the_spritesheet(api: Api) -> None:
    """What the SDK's own types allow: a model's `created` (an int it reads as a timestamp), an image tuple with
    an empty or no filename (read as text and refused as "not UTF-8"), and the spritesheet variant (a missing
    feature, not a malformed request)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api.client, max_retries=0)
    strict = openai.OpenAI(
        base_url="http://testserver/v1",
        api_key="x",
        http_client=api.client,
        max_retries=0,
        _strict_response_validation=True,
    )
    before = int(time.time()) - 5
    for listed in (client.models.list().data, strict.models.list().data):
        assert listed and all(isinstance(m.created, int) and before <= m.created <= time.time() for m in listed)
    assert client.models.retrieve("tiny-t2v").created == listed[0].created
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the Videos API deprecated
        image = png_bytes((9, 9, 9))
        for upload in (("", image, "image/png"), (None, image), (None, image, "application/octet-stream")):
            video = client.videos.create(prompt="from an image", model="tiny-i2v", input_reference=upload)
            assert stored_image(api, video.id) is not None, upload
        # A text part under the name is still text: refused as before, not taken as an image.
        refused = api.client.post(
            "/v1/videos", files={"prompt": (None, "a"), "input_reference": (None, "not an image", "text/plain")}
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input_reference", refused.text
        video = client.videos.create(prompt="a lighthouse", model="tiny-t2v")
        api.complete(video.id)
        with pytest.raises(openai.BadRequestError) as raised:
            client.videos.download_content(video.id, variant="spritesheet")
        assert raised.value.code == "unsupported_operation" and "video, thumbnail" in raised.value.message
        assert raised.value.param == "variant"


def test_a_request_may_ask_for_the_presets_its_workers_can_serve(tmp_path: Path, media: tuple[Path, Path]) -> None:
    """Only the step cache changes per request: exact and fast workers serve either, a fastest worker (FP8
    weights) only fastest, and where ranks hold shards of one video there is no step cache to turn on."""
    with make_api(tmp_path / "exact", media) as api:
        t2v = api.client.get("/v1/models").json()["data"][0]
        assert t2v["presets"] == {"served": "exact", "per_request": ["exact", "fast"]}
        draft = api.create(preset="fast")
        assert draft["preset"] == "fast" and api.store.get(draft["id"]).request["preset"] == "fast"
        assert api.create()["preset"] is None  # the workers' own
        refused = api.client.post("/api/v1/generate", json={"prompt": "p", "preset": "fastest"})
        assert problem(refused, 400)["field"] == "preset"
        assert len(api.store.list()[0]) == 2

    with make_api(tmp_path / "fastest", media, preset="fastest") as api:
        t2v = api.client.get("/v1/models").json()["data"][0]
        assert t2v["presets"] == {"served": "fastest", "per_request": ["fastest"]}
        error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "preset": "exact"}), 400)
        assert error["param"] == "preset" and "FP8 weights" in error["message"]
        assert api.create(preset="fastest")["preset"] == "fastest"

    with make_api(tmp_path / "sharded", media, ulysses=2) as api:
        t2v = api.client.get("/v1/models").json()["data"][0]
        assert t2v["presets"]["per_request"] == ["exact"]
        error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "preset": "fast"}), 400)
        assert error["param"] == "preset" and "step cache is off" in error["message"]

    # Only some models run on sharding groups: the layout settings would speak for all of them (a request for
    # a one-GPU model refused, or, left out, a request for the group's accepted and then failed by it).
    with make_api(tmp_path / "one-sharded", media, sharded_model=["tiny-i2v"]) as api:
        t2v, i2v = api.client.get("/v1/models").json()["data"]
        assert t2v["presets"]["per_request"] == ["exact", "fast"] and i2v["presets"]["per_request"] == ["exact"]
        assert api.create(preset="fast")["preset"] == "fast"
        image = {"image_url": data_url(png_bytes((10, 20, 30)))}
        body = {"prompt": "p", "model": "tiny-i2v", "preset": "fast", "input_reference": image}
        error = openai_error(api.client.post("/v1/videos", json=body), 400)
        assert error["param"] == "preset" and "step cache is off" in error["message"]


def _listed(api: Api) -> int:
    return len(api.client.get("/v1/videos", params={"limit": 100}).json()["data"])


def test_an_image_given_twice_is_refused_whatever_the_order(api: Api) -> None:
    """Two image sources in one request: one was dropped without a word, or the answer depended on the order
    of the fields (image_url then file_id queued; file_id then image_url was a 400)."""
    image = data_url(png_bytes((20, 120, 220)))
    refusals: list[tuple[Any, ...]] = [
        # (form files, form text, JSON body, the error's param)
        ({"input_reference": ("x.png", png_bytes((1, 2, 3)))}, {"input_reference": image}, None, "input_reference"),
        (None, [("input_reference[image_url]", image), ("input_reference[file_id]", "file-1")], None, None),
        (None, [("input_reference[file_id]", "file-1"), ("input_reference[image_url]", image)], None, None),
        (None, [("input_reference[image_url]", image), ("input_reference[detail]", "high")], None, None),
        (None, [("input_reference[detail]", "high"), ("input_reference[image_url]", image)], None, None),
        (None, None, {"input_reference": {"image_url": image, "detail": "high"}}, "input_reference.detail"),
        (None, None, {"input_reference": image, "input_reference[image_url]": image}, "input_reference"),
        ({"input_reference[image_url]": ("x.png", png_bytes((1, 2, 3)))}, None, None, "input_reference.image_url"),
    ]
    before = _listed(api)
    answers = []
    for files, text, body, param in refusals:
        base = {"prompt": "p", "model": "tiny-i2v"}
        if body is not None:
            response = api.client.post("/v1/videos", json={**base, **body})
        else:
            form = {**base, **(text if isinstance(text, dict) else dict(text or []))}  # in the order given
            response = api.client.post("/v1/videos", data=form, files=files or {"input_reference": ("", b"")})
        error = openai_error(response, 400)
        answers.append(error["param"])
        if param is not None:
            assert error["param"] == param, (files, text, body, error)
    assert answers[1] == answers[2] == "input_reference.file_id"  # the same answer in either order
    assert answers[3] == answers[4] == "input_reference.detail"
    assert _listed(api) == before


def test_form_and_json_numbers_are_ascii_digits_and_json_numbers_are_numbers(api: Api) -> None:
    """int() and float() read `1_0` and Arabic-Indic or full-width digits, which the size field already
    refused; and JSON's priority took strings where every other integer field refuses them."""
    before = _listed(api)
    for field, value in [("seed", "1_0"), ("width", "٦٤"), ("guidance_scale", "1_0"), ("num_frames", "９")]:
        error = openai_error(api.client.post("/v1/videos", data={"prompt": "p", field: value}), 400)
        assert error["param"] == field and "must be" in error["message"], (field, error)
    error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "seconds": "٤"}), 400)
    assert error["param"] == "seconds"
    for surface, body in [("/v1/videos", {}), ("/video/submit", {}), ("/api/v1/generate", {"resolution": "64*64"})]:
        refused = api.client.post(surface, json={"prompt": "p", "priority": "5", **body})
        assert refused.status_code == 400 and "priority" in refused.text, (surface, refused.text)
    # Numbers past a float's range, or past Python's 4300-digit int() limit, were a 500 (OverflowError).
    past_float, past_int = int("9" * 400), "9" * 5000
    for surface, extra in [("/v1/videos", {}), ("/video/submit", {}), ("/api/v1/generate", {"resolution": "64*64"})]:
        for field, value in [("guidance_scale", past_float), ("flow_shift", past_float), ("seed", past_float)]:
            refused = api.client.post(surface, json={"prompt": "p", field: value, **extra})
            assert refused.status_code == 400 and field in refused.text, (surface, field, refused.text)
    for body in [{"seconds": past_float}, {"seconds": 4, "fps": past_float}]:
        error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", **body}), 400)
        assert error["param"] in body, (body, error)
    for field in ["priority", "seed", "num_frames"]:
        error = openai_error(api.client.post("/v1/videos", data={"prompt": "p", field: past_int}), 400)
        assert error["param"] == field and "4300 digits" in error["message"], error
    error = openai_error(
        api.client.post("/v1/videos", data={"prompt": "p", "seconds": "4", "fps": str(past_float)}), 400
    )
    assert error["param"] == "fps", error
    assert _listed(api) == before
    taken = api.client.post(
        "/v1/videos", data={"prompt": "p", "priority": " 5 ", "seed": "+7", "guidance_scale": "2.5e0"}
    )
    assert taken.status_code == 200 and taken.json()["seed"] == 7, taken.text  # a form's strings, read as numbers
    # A whole number written 9.0, taken in JSON, was a 400 in a form (the SDK sends extra_body floats so).
    written = api.client.post("/v1/videos", data={"prompt": "p", "num_frames": "9.0", "fps": "16.00"})
    assert written.status_code == 200 and (written.json()["num_frames"], written.json()["fps"]) == (9, 16), written.text
    error = openai_error(api.client.post("/v1/videos", data={"prompt": "p", "num_frames": "9.5"}), 400)
    assert error["param"] == "num_frames" and "must be an integer" in error["message"]
    # True is 1 to Python: it was told its range, not that it is no number of seconds.
    error = openai_error(api.client.post("/v1/videos", json={"prompt": "p", "seconds": True}), 400)
    assert error["param"] == "seconds" and 'a number of seconds such as "4", got True' in error["message"]


def test_a_field_given_twice_or_text_that_is_not_utf8_is_refused(api: Api) -> None:
    """The last of two values won silently, and a form's bytes that are not UTF-8 became U+FFFD in the prompt
    (the job then made a video of another prompt than the one sent). JSON sent with curl's default `-d` type
    was read as one field named after the whole text, and answered 'prompt: must be a non-empty string'."""
    before = _listed(api)
    twice = api.client.post("/v1/videos", data={"prompt": ["a", "b"]}, files={"input_reference": ("", b"")})
    assert openai_error(twice, 400)["param"] == "prompt"
    twice_json = b'{"prompt": "a", "seed": 1, "seed": 2}'
    error = openai_error(
        api.client.post("/v1/videos", content=twice_json, headers={"content-type": "application/json"}), 400
    )
    assert error["param"] == "seed" and "more than once" in error["message"]
    # Named by their whole path: the inner key alone named no field of the route.
    for body, param in [
        (b'{"prompt": "a", "input_reference": {"image_url": "x", "image_url": "y"}}', "input_reference.image_url"),
        (b'{"prompt": "a", "extra": [{"k": 1, "k": 2}]}', "extra.k"),
    ]:
        error = openai_error(
            api.client.post("/v1/videos", content=body, headers={"content-type": "application/json"}), 400
        )
        assert error["param"] == param and "more than once" in error["message"], error
    form = {"content-type": "application/x-www-form-urlencoded"}
    latin1 = api.client.post("/v1/videos", content=b"prompt=caf%E9&seed=1", headers=form)
    assert openai_error(latin1, 400)["param"] == "prompt"
    curl_d = api.client.post("/v1/videos", content=b'{"prompt": "a cat", "seed": 3}', headers=form)
    error = openai_error(curl_d, 400)
    assert error["param"] == "body" and "Content-Type: application/json" in error["message"]
    misspelt_empty = api.client.post("/v1/videos", content=b"prompt=a&num_frame=", headers=form)
    assert openai_error(misspelt_empty, 400)["code"] == "unknown_parameter"
    assert _listed(api) == before
    ok = api.client.post("/v1/videos", content=b"prompt=caf%C3%A9&seed=", headers=form)
    assert ok.status_code == 200 and ok.json()["prompt"] == "café", ok.text  # UTF-8; an input left empty
    plus = api.client.post("/v1/videos", content=b"prompt=a+red%2Bfox&model=tiny-t2v", headers=form)
    assert plus.status_code == 200 and plus.json()["prompt"] == "a red+fox", plus.text
    # Millions of `&` (empty fields, which Starlette's field limit did not count) held the event loop for 25 s,
    # every other request with it: refused before any parsing.
    flood = openai_error(api.client.post("/v1/videos", content=b"prompt=p" + b"&" * 2_000_000, headers=form), 400)
    assert flood["param"] == "body" and "more than 200 fields" in flood["message"]
    assert _listed(api) == before + 2
    # A multipart form's text parts too: Starlette read them as Latin-1 ("cafÃ©" for a UTF-8 client's bytes
    # sent in another encoding), a prompt the client never wrote.
    boundary = "wanserve-boundary"
    parts = [
        (b'Content-Disposition: form-data; name="prompt"', "café".encode("latin-1")),
        (b'Content-Disposition: form-data; name="seed"', b"1"),
    ]
    body = b"".join(f"--{boundary}\r\n".encode() + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    body += f"--{boundary}--\r\n".encode()
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    error = openai_error(api.client.post("/v1/videos", content=body, headers=multipart), 400)
    assert error["param"] == "prompt" and "not UTF-8" in error["message"]
    assert _listed(api) == before + 2
    utf8 = api.client.post("/v1/videos", data={"prompt": "café"}, files={"input_reference": ("", b"")})
    assert utf8.status_code == 200 and utf8.json()["prompt"] == "café", utf8.text


def test_refusals_name_the_header_or_parameter_at_fault(api: Api) -> None:
    missing = openai_error(api.client.get("/v1/videos", params={"after": "nope"}), 404)
    assert missing["param"] == "after" and "nope" in missing["message"]
    gzipped = api.client.post(
        "/v1/videos",
        content=b"\x1f\x8b\x08\x00" + b"\x00" * 16,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    error = openai_error(gzipped, 415)
    assert error["param"] == "content-encoding" and "uncompressed" in error["message"]
    # A HEAD is served where GET is, on routes of their own: a 405 names both.
    job_id = api.create()["id"]
    for path in (f"/v1/videos/{job_id}/content", "/health"):
        refused = api.client.post(path)
        assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD", (path, refused.headers)
    # And every method of the path's other routes: Allow named only the first route's (`GET` for a video).
    for method, path, allow in (
        ("PUT", f"/v1/videos/{job_id}", "DELETE, GET"),
        ("PATCH", "/v1/videos", "GET, POST"),
        ("DELETE", "/v1/videos", "GET, POST"),
        ("GET", f"/v1/videos/{job_id}/cancel", "POST"),
    ):
        refused = api.client.request(method, path)
        assert refused.status_code == 405 and refused.headers["allow"] == allow, (method, path, refused.headers)


def test_a_misnamed_part_or_parameter_and_an_invisible_prompt_are_refused_by_name(api: Api) -> None:
    """Each of these was taken, or refused without naming the field: a prompt sent as a file beside the image
    (`curl -F prompt=@prompt.txt`) was "body: Too many files"; `?limt=5` answered the default page and
    `?limit=1&limit=2` the last value; a prompt of zero-width spaces made a video of nothing; a 405 said only
    "Method Not Allowed"; a 5,000-character id came back whole in the 404."""
    image = png_bytes((10, 200, 10))
    before = _listed(api)
    for files, param in [
        (
            {"prompt": ("prompt.txt", b"a fox", "text/plain"), "input_reference": ("a.png", image, "image/png")},
            "prompt",
        ),
        ({"input_reference": ("a.png", image, "image/png"), "seed": ("seed.txt", b"3", "text/plain")}, "seed"),
    ]:
        error = openai_error(api.client.post("/v1/videos", data={"model": "tiny-i2v"}, files=files), 400)
        assert error["param"] == param and "only input_reference may be a file" in error["message"], error
    two_images = [
        ("input_reference", ("a.png", image, "image/png")),
        ("input_reference", ("b.png", image, "image/png")),
    ]
    error = openai_error(api.client.post("/v1/videos", data={"prompt": "p"}, files=two_images), 400)
    assert error["param"] == "input_reference" and "more than once" in error["message"], error
    for prompt in ("  \u200b\u200d ", "\ufeff", "a\x00fox"):
        error = openai_error(api.client.post("/v1/videos", json={"prompt": prompt}), 400)
        assert error["param"] == "prompt", error
    negative = openai_error(api.client.post("/v1/videos", json={"prompt": "a", "negative_prompt": "x\x07"}), 400)
    assert negative["param"] == "negative_prompt" and "U+0007" in negative["message"]
    assert _listed(api) == before
    kept = api.client.post("/v1/videos", json={"prompt": "a fox\n\tin snow \u200b"})
    assert kept.status_code == 200 and kept.json()["prompt"] == "a fox\n\tin snow \u200b", kept.text
    job_id = kept.json()["id"]

    for path, params, param in [
        ("/v1/videos", [("limt", "5")], "limt"),
        ("/v1/videos", [("limit", "1"), ("limit", "2")], "limit"),
        (f"/v1/videos/{job_id}/content", [("variant", "thumbnail"), ("variant", "video")], "variant"),
        (f"/v1/videos/{job_id}", [("expand", "1")], "expand"),
    ]:
        error = openai_error(api.client.get(path, params=params), 400)
        assert error["param"] == param, (path, params, error)
    unknown = openai_error(api.client.get("/v1/videos", params={"oder": "asc"}), 400)
    assert unknown["code"] == "unknown_parameter" and "after, limit, order" in unknown["message"]
    assert api.client.get("/v1/videos", params={"limit": 1, "order": "asc", "after": ""}).status_code == 200

    refused = problem(api.client.put("/health"), 405)
    assert "PUT is not allowed" in refused["detail"] and "GET, HEAD" in refused["detail"], refused
    long_id = "a" * 5000
    missing = openai_error(api.client.get(f"/v1/videos/{long_id}"), 404)
    assert len(missing["message"]) < 300 and missing["message"].startswith("no job with id 'aaa"), missing


def test_a_side_given_for_an_image_keeps_its_shape_or_is_refused(api: Api) -> None:
    """A 2:1 photo with `height=512` came out a 128x512 video (1:4), of which the crop kept a sliver: the open
    side was shrunk to fit the model. Now the frame keeps the image's shape, or the side given is refused."""
    wide = png_bytes((200, 40, 90), size=(200, 100))

    def create(**sides: str) -> httpx.Response:
        form = {"prompt": "p", "model": "tiny-i2v", **sides}
        return api.client.post("/v1/videos", data=form, files={"input_reference": ("w.png", wide)})

    error = openai_error(create(height="512"), 400)
    assert error["param"] == "height" and "give a smaller height" in error["message"], error
    assert create(height="64").json()["size"] == "128x64"
    # At the least height there is, "give a smaller height" could not be followed.
    thin = png_bytes((200, 40, 90), size=(4000, 100))
    form = {"prompt": "p", "model": "tiny-i2v", "height": "16"}
    error = openai_error(api.client.post("/v1/videos", data=form, files={"input_reference": ("t.png", thin)}), 400)
    assert error["param"] == "height" and "give both width and height" in error["message"], error
    assert "smaller" not in error["message"]
    assert create(width="512", height="512").status_code == 400  # both sides: the model's pixel limit says so
