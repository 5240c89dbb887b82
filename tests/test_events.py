"""`GET /v1/videos/{id}/events`: a job's status as server-sent events, read as a client reads them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_api import WORKER, Api, make_api
from wanserve.errors import StoreUnavailable
from wanserve.jobs.model import JobStatus
from wanserve.jobs.sqlite import SQLiteJobStore


class EventReader:
    """Parses an event stream the way an EventSource does: `field: value` lines, a blank line ends an event."""

    def __init__(self, response: httpx.Response) -> None:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        self.response = response
        self.lines = response.iter_lines()
        self.comments: list[str] = []
        self.retry: int | None = None

    def next(self) -> dict[str, Any] | None:
        """The next event with data, as {"event", "id", "data"}; None when the server ended the stream."""
        event: dict[str, Any] = {"event": "message", "id": None, "data": None}
        for line in self.lines:
            if line == "":
                if event["data"] is not None:
                    return event
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                event["data"] = json.loads(value)
            elif name == "retry":
                self.retry = int(value)
            else:
                event[name] = value
        return None


@pytest.fixture
def videos(tmp_path: Path, media: tuple[Path, Path]) -> Iterator[Api]:
    with make_api(tmp_path, media) as made:
        yield made


def stream(videos: Api, job_id: str) -> Any:
    return videos.client.stream("GET", f"/v1/videos/{job_id}/events")


def test_events_follow_a_job_from_the_queue_to_its_video_and_end(videos: Api) -> None:
    first = videos.create()["id"]
    second = videos.create()["id"]
    with stream(videos, second) as response:
        reader = EventReader(response)
        assert response.headers["cache-control"] == "no-store"  # the events carry the prompt
        queued = reader.next()
        assert queued is not None and reader.retry == 2000
        assert queued["data"]["status"] == "queued" and queued["data"]["queue_position"] == 2
        assert queued["data"] == videos.client.get(f"/v1/videos/{second}").json()

        videos.claim("tiny-t2v", first)  # the job ahead starts: this one moves up
        moved = reader.next()
        assert moved is not None and moved["data"]["queue_position"] == 1

        videos.claim("tiny-t2v", second)
        started = reader.next()
        assert started is not None and started["data"]["status"] == "in_progress"
        for fraction in (0.25, 0.5):
            assert videos.store.set_progress(second, WORKER, fraction, "denoise")
            step = reader.next()
            assert step is not None and step["data"]["progress"] == int(fraction * 100)
            assert step["data"]["stage"] == "denoise"

        videos.finish(second)
        done = reader.next()
        assert done is not None and done["data"]["status"] == "completed" and done["data"]["progress"] == 100
        assert reader.next() is None  # the server ends the stream after a final status
        # No ids but the last's: a reconnection starts with the current state, whatever the client saw before,
        # unless it saw the final one (below, a 204).
        assert all(e["id"] is None for e in (queued, moved, started)) and done["id"] == "final"
    # Streams stay out of the latency histogram: they last as long as their jobs.
    samples = videos.metrics.registry.get_sample_value(
        "wanserve_http_request_duration_seconds_count",
        {"method": "GET", "route": "/v1/videos/{video_id}/events", "status": "200"},
    )
    assert samples is None


def test_a_stream_opened_on_a_finished_job_sends_it_once_and_ends(videos: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = videos.create()["id"]
    videos.fail(job_id)
    real_get, reads = SQLiteJobStore.get, []

    def counted_get(self: SQLiteJobStore, wanted: str) -> Any:
        reads.append(wanted)
        return real_get(self, wanted)

    monkeypatch.setattr(SQLiteJobStore, "get", counted_get)
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        event = reader.next()
        assert event is not None
        assert event["data"]["status"] == "failed"
        assert event["data"]["error"] == {"code": "generation_failed", "message": "CUDA out of memory"}
        assert event["id"] == "final"
        assert reader.next() is None
    assert len(reads) == 1  # the read that answers 404 for an unknown id is also the stream's first
    # An EventSource not closed reconnects with the id it saw last: told 204, it stops. It was sent the same
    # last state every 2 s for as long as the tab stayed open.
    again = videos.client.get(f"/v1/videos/{job_id}/events", headers={"Last-Event-ID": "final"})
    assert again.status_code == 204 and again.content == b""
    videos.client.delete(f"/v1/videos/{job_id}")
    gone = videos.client.get(f"/v1/videos/{job_id}/events", headers={"Last-Event-ID": "final"})
    assert gone.status_code == 204
    # An id never known is a 404 with it too (it was a 204: a typo, or the wrong server, stopped in silence).
    unknown = videos.client.get("/v1/videos/video_never/events", headers={"Last-Event-ID": "final"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    # Any other id is ignored, as before: the current state first.
    queued = videos.create()["id"]
    with videos.client.stream("GET", f"/v1/videos/{queued}/events", headers={"Last-Event-ID": "7"}) as response:
        first = EventReader(response).next()
        assert first is not None and first["data"]["status"] == "queued" and first["id"] is None


def test_a_cancel_ends_the_stream_with_the_cancelled_video(videos: Api) -> None:
    job_id = videos.create()["id"]
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        assert (first := reader.next()) is not None and first["data"]["status"] == "queued"
        assert videos.client.post(f"/v1/videos/{job_id}/cancel").status_code == 200
        last = reader.next()
        # OpenAI's statuses have no "cancelled": a failure whose code says so.
        assert last is not None and last["data"]["status"] == "failed"
        assert last["data"]["error"]["code"] == "cancelled"
        assert reader.next() is None


def test_an_unknown_video_is_a_404_in_the_openai_envelope(videos: Api) -> None:
    response = videos.client.get("/v1/videos/video_missing/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_a_video_deleted_mid_stream_ends_it_with_an_error_event(videos: Api) -> None:
    job_id = videos.create()["id"]
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        assert reader.next() is not None
        assert videos.client.delete(f"/v1/videos/{job_id}").status_code == 200
        gone = reader.next()
        # Not `error`, which an EventSource also fires for a dropped connection.
        assert gone is not None and gone["event"] == "gone"
        assert gone["data"]["error"]["code"] == "not_found" and job_id in gone["data"]["error"]["message"]
        assert reader.next() is None


def test_a_store_outage_mid_stream_is_waited_out_without_hammering_it(
    videos: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wanserve.api import events

    job_id = videos.create()["id"]
    real_get = SQLiteJobStore.get
    down = threading.Event()
    refused: list[float] = []

    def flaky_get(self: SQLiteJobStore, wanted: str) -> Any:
        if down.is_set():
            refused.append(time.monotonic())
            raise StoreUnavailable("the job store is not answering")
        return real_get(self, wanted)

    monkeypatch.setattr(SQLiteJobStore, "get", flaky_get)
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        assert reader.next() is not None
        down.set()
        videos.claim("tiny-t2v", job_id)  # claim does not go through get
        time.sleep(events.POLL_INTERVAL_S[JobStatus.QUEUED] + 2)
        down.clear()
        started = reader.next()
        assert started is not None and started["data"]["status"] == "in_progress"
    # After a refusal the stream waits as long as a 503 tells a poller to (Retry-After: 5), not half a second.
    assert len(refused) == 1, refused


def test_a_stream_opened_during_a_store_outage_waits_it_out(videos: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a 503: an EventSource answered anything but 200 gives up for good, and its tab stopped following
    the job, at the moment reconnects come in a crowd (a Redis restart, an API replica's)."""
    job_id = videos.create()["id"]
    real_get = SQLiteJobStore.get
    down = threading.Event()
    down.set()

    def flaky_get(self: SQLiteJobStore, wanted: str) -> Any:
        if down.is_set():
            down.clear()  # back for the stream's next read
            raise StoreUnavailable("the job store is not answering")
        return real_get(self, wanted)

    monkeypatch.setattr(SQLiteJobStore, "get", flaky_get)
    with stream(videos, job_id) as response:
        reader = EventReader(response)  # 200, a stream
        first = reader.next()
        assert first is not None and first["data"]["id"] == job_id and first["data"]["status"] == "queued"
    # An unknown id, read while the store answers, is still a 404 before any stream.
    assert videos.client.get("/v1/videos/video_nope/events").status_code == 404


def test_a_quiet_stream_sends_keep_alive_comments(videos: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanserve.api import events

    monkeypatch.setattr(events, "HEARTBEAT_S", 0.3)
    job_id = videos.create()["id"]
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        assert reader.next() is not None
        time.sleep(events.POLL_INTERVAL_S[JobStatus.QUEUED] * 2.5)  # two reads that find nothing new
        videos.claim("tiny-t2v", job_id)
        assert reader.next() is not None
        assert "keep-alive" in reader.comments


def test_a_stream_beats_while_its_read_waits_on_a_store_that_does_not_answer(
    videos: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keep-alive went out only between reads: a read held by a store that does not answer (about 9 s a
    try for Redis, and a turn to wait behind other streams' reads) left a stream silent for a minute and more,
    which proxies cut (nginx, cloud balancers: 60 s)."""
    from wanserve.api import events

    monkeypatch.setattr(events, "HEARTBEAT_S", 0.3)
    job_id = videos.create()["id"]
    real_get = SQLiteJobStore.get
    hung, release = threading.Event(), threading.Event()

    def hanging_get(self: SQLiteJobStore, wanted: str) -> Any:
        if hung.is_set():
            release.wait(30)
        return real_get(self, wanted)

    monkeypatch.setattr(SQLiteJobStore, "get", hanging_get)
    arrived: list[tuple[float, str]] = []
    with stream(videos, job_id) as response:
        assert response.status_code == 200

        def read_lines() -> None:
            try:
                for line in response.iter_lines():
                    arrived.append((time.monotonic(), line))
            except Exception:  # the test closes the stream under it once it has seen what it waits for
                pass

        threading.Thread(target=read_lines, daemon=True).start()
        wait_for_line = time.monotonic() + 10
        while not any(line.startswith("data:") for _, line in arrived) and time.monotonic() < wait_for_line:
            time.sleep(0.05)
        hung.set()
        time.sleep(events.POLL_INTERVAL_S[JobStatus.QUEUED] + 0.2)  # the next read is out, and hangs
        held_from = time.monotonic()
        time.sleep(2.0)
        held_to = time.monotonic()
        hung.clear()
        release.set()
        videos.claim("tiny-t2v", job_id)
        deadline = time.monotonic() + 10
        while not any('"in_progress"' in line for _, line in arrived) and time.monotonic() < deadline:
            time.sleep(0.05)
    beats = [at for at, line in arrived if line.startswith(": keep-alive") and held_from <= at <= held_to]
    assert len(beats) >= 3, arrived


def test_a_stopping_server_ends_its_streams(videos: Api) -> None:
    job_id = videos.create()["id"]
    with stream(videos, job_id) as response:
        reader = EventReader(response)
        assert reader.next() is not None
        started = time.monotonic()
        videos.client.app.state.closing.set()  # what uvicorn's shutdown does first (roles._uvicorn)
        assert reader.next() is None
        assert time.monotonic() - started < 5


def test_events_need_the_api_key_like_every_v1_route(tmp_path: Path, media: tuple[Path, Path]) -> None:
    with make_api(tmp_path, media, api_key="sk-test") as keyed:
        created = keyed.client.post("/v1/videos", json={"prompt": "fox"}, headers={"Authorization": "Bearer sk-test"})
        job_id = created.json()["id"]
        refused = keyed.client.get(f"/v1/videos/{job_id}/events")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        keyed.store.request_cancel(job_id, 60)
        with keyed.client.stream(
            "GET", f"/v1/videos/{job_id}/events", headers={"Authorization": "Bearer sk-test"}
        ) as response:
            event = EventReader(response).next()
            assert event is not None and event["data"]["error"]["code"] == "cancelled"


def test_a_real_server_streams_a_generation_and_its_shutdown_ends_open_streams(
    tmp_path: Path, tiny_cache: Path
) -> None:
    """Through uvicorn and every middleware, as a browser meets it: events arrive while the tiny model denoises
    (nothing buffers them), and SIGTERM ends an open stream at once instead of after the connection timeout."""
    from wanserve.roles import SHUTDOWN_CONNECTIONS_S

    from service import Process, base_env, free_port, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A grace that outlasts the job on a loaded machine (its 200 steps took 20 s past the SIGTERM on a shared
    # 2-core run, and the job was handed back, not finished): the stream must carry it to its end.
    env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"), WANSERVE_SHUTDOWN_GRACE="180")
    serve = Process(["serve", "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_ready(url, serve)
        # Seconds of denoising on the CPU (60 steps of 17 frames took under a second on a fast run): long enough
        # for several polls to see it move.
        slow = {"width": 128, "height": 128, "num_frames": 33, "num_inference_steps": 200}
        job = httpx.post(f"{url}/v1/videos", json={"prompt": "a fox", **slow}).json()
        with httpx.stream("GET", f"{url}/v1/videos/{job['id']}/events", timeout=60) as response:
            reader = EventReader(response)
            seen = []
            while (event := reader.next()) is not None:
                seen.append(event["data"])
                if seen[-1]["status"] == "in_progress" and sum(e["status"] == "in_progress" for e in seen) == 1:
                    # Stopped mid-job, `serve` finishes the job (within WANSERVE_SHUTDOWN_GRACE) before it stops:
                    # the stream carries it to its end, not to the last poll before the port closed.
                    assert serve.proc is not None
                    serve.proc.send_signal(15)
        assert seen[-1]["status"] == "completed", (seen[-1], serve.log())
        running = [e["progress"] for e in seen if e["status"] == "in_progress"]
        assert len(running) >= 2 and running == sorted(running), seen  # progress as it happened
        assert serve.proc.wait(60) == 0, serve.log()
    finally:
        serve.stop()

    api_only = Process(["api", "--port", str(port)], env, tmp_path / "api_only.log")
    try:
        wait_ready(url, api_only)  # no worker: the job stays queued and its stream stays open
        job = httpx.post(f"{url}/v1/videos", json={"prompt": "a fox"}).json()
        with httpx.stream("GET", f"{url}/v1/videos/{job['id']}/events", timeout=60) as response:
            reader = EventReader(response)
            assert (first := reader.next()) is not None and first["data"]["status"] == "queued"
            stopping = time.monotonic()
            assert api_only.proc is not None
            api_only.proc.send_signal(15)
            assert reader.next() is None  # the server ended the stream
        assert api_only.proc.wait(30) == 0, api_only.log()
        assert time.monotonic() - stopping < SHUTDOWN_CONNECTIONS_S, "shutdown waited for the open stream"
    finally:
        api_only.stop()


def test_streams_waiting_out_a_redis_outage_leave_the_api_its_threads(tmp_path: Path, tiny_cache: Path) -> None:
    """During a store outage every stream's read waits for the store, and more streams than the API's 40
    pool threads held all of them: /ready, cancels and downloads went unanswered until the store came back.
    Streams now read on a few threads of their own, and every one of them carries on after the outage."""
    import contextlib
    import signal

    from conftest import free_tcp_port, start_redis, stop_redis
    from service import Process, base_env, free_port, wait_ready

    redis_port, port = free_tcp_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    redis = start_redis(redis_port, tmp_path / "redis", appendonly=False)
    env = base_env(
        tiny_cache,
        WANSERVE_DATA_DIR=str(tmp_path / "data"),
        WANSERVE_STORE=f"redis://127.0.0.1:{redis_port}/0",
    )
    api = Process(["api", "--port", str(port)], env, tmp_path / "api.log")
    paused = False
    try:
        wait_ready(url, api)
        job_id = httpx.post(f"{url}/v1/videos", json={"prompt": "a fox"}).json()["id"]
        with (
            httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=None)) as client,
            contextlib.ExitStack() as streams,
        ):
            readers = []
            for _ in range(50):
                response = streams.enter_context(client.stream("GET", f"/v1/videos/{job_id}/events"))
                readers.append(EventReader(response))
                assert (first := readers[-1].next()) is not None and first["data"]["status"] == "queued"

            redis.send_signal(signal.SIGSTOP)  # a store that does not answer: each read waits (socket timeout)
            paused = True
            time.sleep(2)  # every stream's next read (each second while queued) is now waiting
            ready = httpx.get(f"{url}/ready", timeout=15)  # the store's probe gives up after 2 s
            assert ready.status_code == 503 and ready.json()["store"] == "unreachable", ready.text

            redis.send_signal(signal.SIGCONT)
            paused = False
            assert client.post(f"/v1/videos/{job_id}/cancel").status_code == 200
            for reader in readers:
                last = None
                while (event := reader.next()) is not None:
                    last = event["data"]
                assert last is not None and last["error"]["code"] == "cancelled", last
    finally:
        if paused:
            redis.send_signal(signal.SIGCONT)
        api.stop()
        stop_redis(redis)
