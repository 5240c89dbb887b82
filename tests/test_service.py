"""`wanserve serve` as a real subprocess, driven over HTTP and with the official `openai` SDK."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from service import Process, base_env, free_port, wait_for, wait_ready
from videos import decode_mp4, png_bytes

# Slow enough (about 3 s on a CI core) that a queue forms behind it; still the real tiny engine.
SLOW = {"width": 128, "height": 128, "num_frames": 17, "num_inference_steps": 200}


class Server:
    def __init__(self, tmp: Path, cache: Path, models: list[str], name: str = "serve", **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tmp / "data"
        args = ["serve", "--port", str(self.port), "--data-dir", str(self.data)]
        for model in models:
            args += ["--model", model]
        self.process = Process(args, base_env(cache, **env), tmp / f"{name}.log")
        wait_ready(self.url, self.process)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def restart(self) -> None:
        self.process.start()
        wait_ready(self.url, self.process)

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/videos/{job_id}").json()

    def submit(self, priority: int = 0, **fields: object) -> str:
        body = {"model": "tiny-t2v", "prompt": "a slow fox", "priority": priority, "seed": 1, **fields}
        response = self.http.post("/v1/videos", json=body)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def wait_finished(self, job_id: str, timeout: float = 120) -> dict:
        return wait_for(
            lambda: (job := self.job(job_id))["status"] in ("completed", "failed") and job,
            timeout,
            f"{job_id} to finish",
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("serve"), tiny_cache, ["tiny-t2v", "tiny-i2v"])
    yield srv
    srv.process.stop()


def test_openai_sdk_create_and_poll_then_download(server: Server, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    video = client.videos.create_and_poll(
        model="tiny-t2v",
        prompt="a red fox in the snow",
        size="96x64",  # type: ignore[arg-type]
        poll_interval_ms=100,
        # An exact server serves a `fast` request with the step cache on: the preset comes back with the video.
        extra_body={"num_frames": 13, "fps": 12, "num_inference_steps": 3, "seed": 42, "preset": "fast"},
    )
    assert video.status == "completed" and video.progress == 100
    assert video.size == "96x64" and video.model == "tiny-t2v"
    extra = video.model_extra or {}
    assert extra["seed"] == 42 and extra["num_frames"] == 13 and extra["fps"] == 12 and extra["preset"] == "fast"
    # What the step cache saved, in calls and in steps: the price of `fast`, per video.
    cache = extra["step_cache"]
    assert 0 <= cache["skipped_fraction"] < 1
    # What of `fast` this machine applied: the step cache, on for this request; no FP8 (an exact server's weights).
    applied = extra["accelerations"]
    assert "fused_qkv" in applied and applied[-1].startswith("step_cache:first_block_cache("), extra
    assert not any(entry.startswith("fp8") for entry in applied), extra
    assert cache["skipped_steps"] == pytest.approx(cache["skipped_fraction"] * 3, abs=1e-3)

    out = tmp_path / "sdk.mp4"
    client.videos.download_content(video.id).write_to_file(out)
    decoded = decode_mp4(out)
    assert decoded.frames.shape == (13, 64, 96, 3) and decoded.fps == 12
    thumbnail = client.videos.download_content(video.id, variant="thumbnail")
    assert thumbnail.content[:4] == b"RIFF"

    assert video.id in [v.id for v in client.videos.list(limit=100).data]
    assert client.videos.retrieve(video.id).id == video.id
    deleted = client.videos.delete(video.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_openai_sdk_calls_wanserve_does_not_offer_say_so(server: Server) -> None:
    """Remix, edit, extend and characters are refused as such (400 `unsupported_operation`): not a 404 that reads
    as "your video is gone", nor a 405 from the routes of a video id."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    video_id = server.submit(num_inference_steps=1)
    clip = ("fox.mp4", b"not much of a video", "video/mp4")
    calls: dict[str, Callable[[], object]] = {
        "remixes": lambda: client.videos.remix(video_id, prompt="now at night"),
        "video edits": lambda: client.videos.edit(prompt="at night", video=clip),
        "video extensions": lambda: client.videos.extend(prompt="longer", seconds="8", video=clip),
        "characters": lambda: client.videos.create_character(name="fox", video=clip),
    }
    calls["characters "] = lambda: client.videos.get_character("char_1")
    for what, call in calls.items():
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.code == "unsupported_operation", what
        assert f"{what.strip()} are not supported by wanserve" in refused.value.message
    assert server.wait_finished(video_id)["status"] == "completed"  # the video itself is untouched


def test_openai_sdk_image_to_video_upload(server: Server, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((200, 40, 40)))
    video = client.videos.create_and_poll(
        model="tiny-i2v",
        prompt="the ball rolls",
        input_reference=image,
        poll_interval_ms=100,
        extra_body={"num_inference_steps": 2},
    )
    assert video.status == "completed", video.error


def test_validation_is_checked_at_submit(server: Server) -> None:
    bad = server.http.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x", "num_frames": 10})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "num_frames" and "4k+1" in error["message"]
    no_image = server.http.post("/v1/videos", json={"model": "tiny-i2v", "prompt": "x"})
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "input_reference"
    layout = server.http.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x", "ulysses_size": 4})
    assert layout.status_code == 400 and "server configuration" in layout.json()["error"]["message"]


def test_legacy_routes_round_trip(server: Server) -> None:
    http = server.http
    request_id = http.post("/video/submit", json={"prompt": "a cat", "num_inference_steps": 2}).json()["requestId"]
    status = wait_for(
        lambda: (s := http.post("/video/status", json={"requestId": request_id}).json())["status"] == "Succeed" and s,
        60,
        "/video/status Succeed",
    )
    assert status["progress"] == 1.0 and status["reason"] is None
    # As the replaced system's clients read it: a path, joined to the address they called.
    assert decode_mp4_bytes(http.get(status["results"]["video_url"]).content) == 9

    image_url = "data:image/png;base64," + base64.b64encode(png_bytes((0, 90, 200))).decode()
    for submit_path, status_path in (("/api/v1/generate", "/api/v1/status/"), ("/submit", "/status/")):
        body = {
            "prompt": "a dog",
            "resolution": "64*64",
            "task_type": "i2v",
            "image_url": image_url,
            "model": "tiny-i2v",
        }
        created = http.post(submit_path, json=body)
        assert created.status_code == 202, created.text
        task_id = created.json()["task_id"]
        assert created.json()["status"] == "queued" and created.json()["status_url"] == status_path + task_id
        done = wait_for(
            lambda task_id=task_id, status_path=status_path: (
                (s := http.get(status_path + task_id).json())["status"] == "completed" and s
            ),
            60,
            f"{status_path} completed",
        )
        assert done["progress"] == 100 and "T" in done["created_at"]
        assert decode_mp4_bytes(httpx.get(done["result_url"]).content) == 9


def decode_mp4_bytes(data: bytes) -> int:
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_queue_positions_move_and_priority_overtakes(server: Server) -> None:
    running = server.submit(**SLOW)
    wait_for(lambda: server.job(running)["status"] == "in_progress", 30, "first job to start")
    waiting = [server.submit(**SLOW) for _ in range(3)]
    assert [server.job(j)["queue_position"] for j in waiting] == [1, 2, 3]
    assert server.job(running)["queue_position"] is None

    urgent = server.submit(priority=10, num_inference_steps=2)
    assert server.job(urgent)["queue_position"] == 1
    assert [server.job(j)["queue_position"] for j in waiting] == [2, 3, 4]

    server.wait_finished(running)
    wait_for(lambda: server.job(urgent)["status"] != "queued", 30, "the urgent job to be claimed first")
    wait_for(lambda: server.job(waiting[0])["status"] == "in_progress", 60, "the next waiting job")
    assert [server.job(j)["queue_position"] for j in waiting[1:]] == [1, 2]
    for job_id in waiting:
        server.http.post(f"/v1/videos/{job_id}/cancel")
    for job_id in waiting:
        wait_for(lambda job_id=job_id: server.job(job_id)["status"] == "failed", 60, "cancelled")


def test_cancel_running_job_stops_and_leaves_no_file(server: Server) -> None:
    job_id = server.submit(**SLOW)
    wait_for(lambda: (j := server.job(job_id))["stage"] == "denoise" and j["progress"] > 10, 60, "denoising")
    cancelled_at = time.monotonic()
    server.http.post(f"/v1/videos/{job_id}/cancel")
    final = wait_for(lambda: (j := server.job(job_id))["status"] == "failed" and j, 30, "cancelled")
    elapsed = time.monotonic() - cancelled_at
    assert final["error"]["code"] == "cancelled"
    assert final["progress"] < 100
    assert elapsed < 5, f"a 200-step job took {elapsed:.1f} s to stop; one step is ~15 ms"
    assert not (server.data / "videos" / job_id).exists()
    assert server.http.get(f"/v1/videos/{job_id}/content").status_code == 404


def test_ops_endpoints(server: Server) -> None:
    assert server.http.get("/health").status_code == 200
    models = server.http.get("/v1/models").json()["data"]
    assert {m["id"] for m in models} == {"tiny-t2v", "tiny-i2v"}
    metrics = server.http.get("/metrics").text
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
        assert name in metrics
    assert 'wanserve_jobs_finished_total{model="tiny-t2v",status="completed"}' in metrics


def test_a_full_disk_under_the_job_store_is_a_503_and_the_job_goes_on_once_there_is_room(
    tmp_path: Path, tiny_cache: Path
) -> None:
    """SQLite's "database or disk is full" (and its disk I/O errors) in the middle of a job stopped the whole
    `serve` process, API included: now the API answers 503 and the worker waits, as for a Redis outage, and the
    job completes once writes work again. The full disk is this process's file-size limit, lowered to 1 byte
    (every write into a file fails, as on a full disk) and raised again."""
    import resource

    srv = Server(tmp_path, tiny_cache, ["tiny-t2v"], name="full-disk")
    assert srv.process.proc is not None
    pid = srv.process.proc.pid
    try:
        # Long enough (~25 s here) that the "full disk" comes and goes while it denoises: its MP4, written to the
        # same disk at the end, would fail with it (the job then fails generation_failed, as it should).
        job_id = srv.submit(**{**SLOW, "width": 256, "height": 256, "num_frames": 33})
        wait_for(lambda: srv.job(job_id)["progress"] > 5, 60, "the job to be denoising")
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
        try:
            refused = srv.http.post("/v1/videos", json={"prompt": "one more", "num_inference_steps": 1})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert refused.json()["error"]["message"].startswith("the job store (SQLite) cannot be")
            assert refused.headers["retry-after"] == "5"
            time.sleep(2)  # the worker meets the failing writes
            assert srv.http.get("/health").status_code == 200
            assert srv.job(job_id)["status"] == "in_progress"  # reads still work
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        finished = srv.wait_finished(job_id, timeout=300)
        assert finished["status"] == "completed", finished["error"]
        assert srv.wait_finished(srv.submit(num_inference_steps=1))["status"] == "completed"
        assert srv.process.proc.poll() is None, srv.process.log()
    finally:
        srv.process.stop()


# ---- `wanserve submit`: the command-line client of a running server ------------------------------------------


def submit_command(*args: str, signals: str = "INT=SIG_DFL") -> list[str]:
    """`python -m wanserve submit ARGS` with the signals set as `signals` says (`INT=SIG_DFL`: as from a terminal;
    a test run started in the background, `make test &`, ignores SIGINT, and its children inherit that), by a
    Python that sets them and execs submit: never `preexec_fn`, whose code runs in a fork of this process, with
    other tests' threads' locks held, and once hung there for good before the exec."""
    sets = "; ".join(
        f"signal.signal(signal.SIG{name}, signal.{how})" for name, how in (s.split("=") for s in signals.split(","))
    )
    execs = "os.execv(sys.executable, [sys.executable, '-m', 'wanserve', 'submit', *sys.argv[1:]])"
    exec_submit = f"import os, signal, sys; {sets}; {execs}"
    return [sys.executable, "-c", exec_submit, *args]


def _submit(
    server_url: str, cache: Path, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "wanserve", "submit", *args]
    environment = base_env(cache, WANSERVE_URL=server_url, **env)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=cwd)


def test_submit_follows_the_job_and_downloads_the_video(server: Server, tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "clips" / "fox.mp4"
    done = _submit(server.url, tiny_cache, "--prompt", "a fox", "--frames", "5", "--steps", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert decode_mp4(out).frames.shape == (5, 64, 64, 3)
    assert out.with_suffix(".webp").read_bytes()[:4] == b"RIFF"
    assert oct(out.stat().st_mode & 0o777) != "0o600"  # made as any file of the user's, not mkstemp's 0600
    video_id = done.stderr.split(":", 1)[0]
    assert f"{video_id}: tiny-t2v, 64x64, 5 frames, seed" in done.stderr
    assert f"{video_id}: completed in" in done.stderr
    assert server.job(video_id)["status"] == "completed"

    image = tmp_path / "ball.png"
    image.write_bytes(png_bytes((200, 40, 40)))
    cwd = tmp_path / "here"
    cwd.mkdir()
    # The OpenAI SDK's base_url (…/v1) names the same server.
    args = ["--prompt", "it rolls", "--model", "tiny-i2v", "--image", str(image)]
    i2v = _submit(f"{server.url}/v1/", tiny_cache, *args, cwd=cwd)
    assert i2v.returncode == 0, i2v.stderr
    (written,) = cwd.glob("video_*.mp4")  # by default the job's id, in the working directory
    assert i2v.stdout.strip() == written.name and decode_mp4(written).height == 48  # the image's 3:2 shape


def test_submit_names_the_flag_of_a_refused_field(server: Server, tiny_cache: Path, tmp_path: Path) -> None:
    for args, message in (
        (["--frames", "6"], "--frames: must be 4k+1"),
        (["--model", "tiny-i2v"], "--image: tiny-i2v is an image-to-video model"),
        (["--size", "64by64"], "--size: must look like WIDTHxHEIGHT"),
        (["--priority", "5000"], "--priority: must be between -1000 and 1000"),
        (["--out", str(tmp_path)], "--out:"),
    ):
        refused = _submit(server.url, tiny_cache, "--prompt", "x", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in " ".join(refused.stderr.split()), (args, refused.stderr)
    nobody = _submit(f"http://127.0.0.1:{free_port()}", tiny_cache, "--prompt", "x")
    assert nobody.returncode == 1 and "does not answer" in nobody.stderr and "WANSERVE_URL" in nobody.stderr
    assert _submit("ftp://x", tiny_cache, "--prompt", "x").returncode == 2
    for url in ("http://127.0.0.1:notaport", "http://[bad"):
        refused = _submit(url, tiny_cache, "--prompt", "x")  # a traceback, or "does not answer", before
        assert refused.returncode == 2 and "WANSERVE_URL: is not a URL" in refused.stderr, refused.stderr


def test_submit_no_wait_prints_the_id_and_ctrl_c_cancels_the_job(server: Server, tiny_cache: Path) -> None:
    import signal

    queued = _submit(server.url, tiny_cache, "--prompt", "later", "--steps", "1", "--no-wait")
    assert queued.returncode == 0, queued.stderr
    assert server.job(queued.stdout.strip())["id"] == queued.stdout.strip()

    # SIGTERM (`timeout`, a CI job stopped) and SIGHUP (a closed terminal) ended submit silently, the job left
    # running for nobody; they now do what Ctrl-C does.
    for stop in (signal.SIGINT, signal.SIGTERM):
        prompt = f"too slow {stop.name}"
        args = ["--prompt", prompt, "--size", "128x128", "--frames", "17", "--steps", "200"]
        follower = subprocess.Popen(
            submit_command(*args),  # SIGINT as from a terminal, where Ctrl-C reaches submit
            env=base_env(tiny_cache, WANSERVE_URL=server.url),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            running = wait_for(
                lambda p=prompt: next(
                    (v for v in server.http.get("/v1/videos").json()["data"] if v["prompt"] == p), None
                ),
                60,
                "the job to be sent",
            )
            wait_for(lambda r=running: server.job(r["id"])["status"] == "in_progress", 60, "the job to run")
            follower.send_signal(stop)
            _, stderr = follower.communicate(timeout=60)
        finally:
            follower.kill()
        assert follower.returncode == 130, (stop, stderr)
        # A running job stops at its next step: said as under way, not as done.
        assert f"interrupted: {running['id']} is being cancelled (it stops after its current step)" in stderr
        final = server.wait_finished(running["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "cancelled"

    # Under `nohup` (SIGHUP ignored) a logout must not cancel the job: the handler replaced nohup's ignore.
    # Long enough to outlast the second below on a fast machine (128 px, 17 frames: about 3 s); cancelled after.
    args = ["--prompt", "kept", "--size", "256x256", "--frames", "33", "--steps", "200"]
    kept = subprocess.Popen(
        submit_command(*args, signals="INT=SIG_DFL,HUP=SIG_IGN"),
        env=base_env(tiny_cache, WANSERVE_URL=server.url),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listed = lambda: [v for v in server.http.get("/v1/videos").json()["data"] if v["prompt"] == "kept"]  # noqa: E731
        (job,) = wait_for(listed, 60, "the kept job to be sent")
        wait_for(lambda: server.job(job["id"])["status"] == "in_progress", 60, "the kept job to run")
        kept.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert kept.poll() is None and server.job(job["id"])["cancel_requested"] is False
    finally:
        kept.kill()
        kept.communicate(timeout=30)
    server.http.post(f"/v1/videos/{job['id']}/cancel")  # not to hold up the module's other tests


def test_submit_refuses_an_out_that_would_lose_a_file_and_a_url_that_is_no_root(
    server: Server, tiny_cache: Path, tmp_path: Path
) -> None:
    """`--out cat.mp4` wrote its thumbnail over `--image cat.webp`; `--out clips/` wrote a file named `clips`;
    a `--url` naming a route, holding a query or redirecting was "the server refused the job", and a password
    in it was printed in every message."""
    image = tmp_path / "cat.webp"
    image.write_bytes(png_bytes((200, 40, 40)))
    before = image.read_bytes()
    i2v = ["--prompt", "x", "--model", "tiny-i2v", "--image", str(image)]
    over = _submit(server.url, tiny_cache, *i2v, "--out", str(tmp_path / "cat.mp4"))
    said = " ".join(over.stderr.split())
    assert over.returncode == 2 and f"--out: the thumbnail, {image}, would be written over --image {image}" in said
    assert image.read_bytes() == before
    folder = _submit(server.url, tiny_cache, "--prompt", "x", "--out", f"{tmp_path / 'clips'}/")
    assert folder.returncode == 2 and "names a folder: give the MP4's path in it" in folder.stderr, folder.stderr
    assert not (tmp_path / "clips").exists()

    for url, message in (
        (f"{server.url}/v1/videos", f"names an API route, not the server's root: give {server.url}"),
        (f"{server.url}/?x=1", "must hold no query"),
    ):
        refused = _submit(url, tiny_cache, "--prompt", "x")
        assert refused.returncode == 2 and message in " ".join(refused.stderr.split()), (url, refused.stderr)
    elsewhere = _submit(f"{server.url}/v1/video", tiny_cache, "--prompt", "x")  # this API's own 404, typed
    said = " ".join(elsewhere.stderr.split())
    assert elsewhere.returncode == 1 and f"{server.url}/v1/video has no route POST /v1/videos" in said, said
    assert "refused" not in said and "Traceback" not in said

    class Moved(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            _reply(self, 308, headers={"location": f"https://videos.example.com{self.path}"})

        def log_message(self, *args: object) -> None:
            pass

    moved = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Moved)
    threading.Thread(target=moved.serve_forever, daemon=True).start()
    try:
        redirected = _submit(f"http://127.0.0.1:{moved.server_address[1]}", tiny_cache, "--prompt", "x")
    finally:
        moved.shutdown()
    said = " ".join(redirected.stderr.split())
    assert redirected.returncode == 1 and "redirects POST /v1/videos to https://videos.example.com/v1/videos" in said
    assert "refused" not in said and "Traceback" not in said, said

    routed = _submit("https://alice:s3cret@v1.example.com/v1/videos", tiny_cache, "--prompt", "x")
    said = " ".join(routed.stderr.split())
    assert routed.returncode == 2 and "give https://alice:***@v1.example.com," in said and "s3cret" not in said, said
    # `export WANSERVE_URL=` clears it (was "invalid setting"): the default URL, here on a port nobody holds.
    port = free_port()
    cleared = _submit("", tiny_cache, "--prompt", "x", WANSERVE_PORT=str(port))
    assert cleared.returncode == 1 and f"http://127.0.0.1:{port} does not answer" in cleared.stderr, cleared.stderr
    secret = _submit(f"http://me:hunter2@127.0.0.1:{free_port()}", tiny_cache, "--prompt", "x")
    assert secret.returncode == 1 and "http://me:***@127.0.0.1" in secret.stderr, secret.stderr
    assert "hunter2" not in secret.stderr + secret.stdout


def test_submit_waits_for_room_in_a_full_queue(tmp_path: Path, tiny_cache: Path) -> None:
    """A full queue (429) or a store restarting (503) means the job was not taken: submit says so once and
    tries again after Retry-After, where it used to exit 1 and a batch script lost the job."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(tiny_cache, WANSERVE_QUEUE_LIMIT="1")
    api = Process(["api", "--port", str(port), "--data-dir", str(tmp_path / "data")], env, tmp_path / "api.log")
    log = tmp_path / "submit.err"
    # Stopped whatever happens: a failed check left them retrying for ever.
    clients: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = []
    try:
        wait_ready(url, api)  # an API with no worker: what is queued stays queued
        first = _submit(url, tiny_cache, "--prompt", "first", "--no-wait")
        assert first.returncode == 0, first.stderr
        command = [sys.executable, "-m", "wanserve", "submit", "--prompt", "second", "--no-wait"]
        with open(log, "w") as err:
            second = subprocess.Popen(
                command, env=base_env(tiny_cache, WANSERVE_URL=url), stdout=subprocess.PIPE, stderr=err, text=True
            )
        clients.append(second)
        wait_for(lambda: "is full" in log.read_text(), 60, "submit to meet the full queue")
        assert second.poll() is None  # still waiting, not failed
        # Ctrl-C while it waits for room: said, exit 130 (it was a silent 130, the wait being inside an
        # except clause that its sibling `except KeyboardInterrupt` does not cover).
        import signal

        third_log = tmp_path / "third.err"
        with open(third_log, "w") as err:
            third = subprocess.Popen(
                submit_command("--prompt", "third", "--no-wait"),
                env=base_env(tiny_cache, WANSERVE_URL=url),
                stderr=err,
            )
        clients.append(third)
        wait_for(lambda: "is full" in third_log.read_text(), 60, "the third submit to wait")
        third.send_signal(signal.SIGINT)
        assert third.wait(60) == 130
        said = " ".join(third_log.read_text().split())
        # The last answer was a full queue: nothing was queued, which is said (not "if the server took it").
        assert "interrupted while the queue was full: the job was not queued" in said, said
        assert httpx.delete(f"{url}/v1/videos/{first.stdout.strip()}").status_code == 200
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 0, log.read_text()
        assert out.startswith("video_") and log.read_text().count("warning:") == 1
        # The server answered all along: the queue is what changed.
        assert "the queue has room again" in log.read_text() and "answers again" not in log.read_text()
    finally:
        for client in clients:
            client.kill()
        api.stop()


def _reply(
    handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> None:
    """A stub server's whole answer: status, headers, the body and its length."""
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _LosesTheFirstAnswer(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the API that passes the first create on and then drops the connection without its
    answer, as a balancer's timeout or a network fault does: the job is queued, and the client does not know."""

    upstream = ""
    creates: list[str | None] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {name: value for name, value in self.headers.items() if name.lower() not in ("host", "connection")}
        answer = httpx.post(f"{self.upstream}{self.path}", content=body, headers=headers)
        self.creates.append(self.headers.get("idempotency-key"))
        if len(self.creates) == 1:
            self.close_connection = True
            return
        self._pass_on(answer)

    def do_GET(self) -> None:
        self._pass_on(httpx.get(f"{self.upstream}{self.path}"))

    def _pass_on(self, answer: httpx.Response) -> None:
        kept = {
            name: answer.headers[name] for name in ("content-type", "idempotent-replayed") if name in answer.headers
        }
        _reply(self, answer.status_code, answer.content, kept)

    def log_message(self, *args: object) -> None:
        pass


def test_submit_whose_answer_is_lost_sends_again_and_makes_one_job(tmp_path: Path, tiny_cache: Path) -> None:
    """The first create is queued but its answer never arrives; submit used to exit 1 ("does not answer") with
    the job queued anyway, and a script that ran it again made a second. Each try now carries one
    Idempotency-Key, and the second is answered with the job the first made."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = Process(
        ["api", "--port", str(port), "--data-dir", str(tmp_path / "data")], base_env(tiny_cache), tmp_path / "api.log"
    )
    handler = type("Handler", (_LosesTheFirstAnswer,), {"upstream": url, "creates": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        wait_ready(url, api)  # an API with no worker: the job stays queued
        done = _submit(f"http://127.0.0.1:{proxy.server_address[1]}", tiny_cache, "--prompt", "once", "--no-wait")
        assert done.returncode == 0, done.stderr
        assert "still trying" in done.stderr
        keys = handler.creates
        assert len(keys) == 2 and keys[0] == keys[1] and keys[0] and keys[0].startswith("wanserve-submit-")
        listed = httpx.get(f"{url}/v1/videos").json()["data"]
        assert [video["id"] for video in listed] == [done.stdout.strip()]
    finally:
        proxy.shutdown()
        api.stop()


class _HoldsStatusReads(_LosesTheFirstAnswer):
    """A proxy that passes everything on, but, once `hold` is set, keeps each status read waiting (a slow link):
    the job can end on the server while its follower still waits for the answer."""

    hold = threading.Event()
    held = threading.Event()  # a status read is being held now

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {name: value for name, value in self.headers.items() if name.lower() not in ("host", "connection")}
        self._pass_on(httpx.post(f"{self.upstream}{self.path}", content=body, headers=headers))

    def do_GET(self) -> None:
        if self.hold.is_set():
            self.held.set()
            time.sleep(60)
        super().do_GET()


class _NoContentRoute(_LosesTheFirstAnswer):
    """A proxy that routes the API but answers its own HTML 404 for the files (a path rule left out)."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {name: value for name, value in self.headers.items() if name.lower() not in ("host", "connection")}
        self._pass_on(httpx.post(f"{self.upstream}{self.path}", content=body, headers=headers))

    def do_GET(self) -> None:
        if "/content" not in self.path:
            return super().do_GET()
        _reply(self, 404, b"<html><body>404 Not Found</body></html>", {"content-type": "text/html"})


class _OpenAiLike(http.server.BaseHTTPRequestHandler):
    """A server with OpenAI's video object only: no num_frames, seed or size, which wanserve adds."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self._json({"id": "video_abc", "object": "video", "model": "sora-2 [beta]", "status": "queued", "progress": 0})

    def do_GET(self) -> None:
        if self.path.startswith("/v1/videos/video_abc/content"):
            return _reply(self, 200, b"mp4!")
        self._json({"id": "video_abc", "object": "video", "model": "sora-2", "status": "completed", "progress": 100})

    def _json(self, body: dict) -> None:
        _reply(self, 200, json.dumps(body).encode(), {"content-type": "application/json"})

    def log_message(self, *args: object) -> None:
        pass


def test_submit_says_what_failed_where_the_server_is_not_wanserve_alone(
    server: Server, tiny_cache: Path, tmp_path: Path
) -> None:
    """A proxy's HTML 404 for the video, and an OpenAI-like server's video object without wanserve's fields,
    were each a traceback (NotAnApi, KeyError); a model name in brackets was read as rich markup and dropped."""
    handler = type("Handler", (_NoContentRoute,), {"upstream": server.url, "creates": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    openai_like = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAiLike)
    for running in (proxy, openai_like):
        threading.Thread(target=running.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "fox.mp4"
        args = ["--prompt", "a fox", "--frames", "1", "--steps", "1", "--out", str(out)]
        done = _submit(f"http://127.0.0.1:{proxy.server_address[1]}", tiny_cache, *args)
        said = " ".join(done.stderr.split())
        assert done.returncode == 1 and "is done, but its MP4 could not be downloaded" in said, said
        assert "Traceback" not in said and not out.exists()

        elsewhere = _submit(f"http://127.0.0.1:{openai_like.server_address[1]}", tiny_cache, *args)
        assert elsewhere.returncode == 0, elsewhere.stderr
        # The server's model name as it is: rich took `[beta]` for markup, and printed "sora-2 ".
        assert "video_abc: sora-2 [beta]" in elsewhere.stderr and out.read_bytes() == b"mp4!"
    finally:
        proxy.shutdown()
        openai_like.shutdown()


class _FailsTheCreate(http.server.BaseHTTPRequestHandler):
    """In front of nothing: a proxy's 413 page for an upload, a server error on a JSON create."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.headers.get("content-type", "").startswith("multipart/"):
            page, status, kind = b"<html>413 Request Entity Too Large</html>", 413, "text/html"
        else:
            error = {"message": "the store raised", "type": "server_error", "param": None, "code": "internal_error"}
            page, status, kind = json.dumps({"error": error}).encode(), 500, "application/json"
        _reply(self, status, page, {"content-type": kind})

    def log_message(self, *args: object) -> None:
        pass


def test_submit_names_the_image_for_a_proxys_413_and_gives_the_key_when_the_job_may_be_taken(
    tiny_cache: Path, tmp_path: Path
) -> None:
    """A proxy's 413 (nginx: 1 MiB) was "the server refused the job" (exit 1), naming no flag; a 500 on the
    create was "refused" too, though the job may be queued, with no Idempotency-Key to find it by."""
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailsTheCreate)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    image = tmp_path / "big.png"
    image.write_bytes(png_bytes((1, 2, 3)))
    try:
        too_big = _submit(url, tiny_cache, "--prompt", "x", "--image", str(image), "--no-wait")
        said = " ".join(too_big.stderr.split())
        assert too_big.returncode == 2 and "--image: the request was too large for the server or a proxy" in said, said
        failed = _submit(url, tiny_cache, "--prompt", "x", "--no-wait")
        said = " ".join(failed.stderr.split())
        assert failed.returncode == 1 and "the server failed while taking the job: the store raised" in said, said
        assert "sent with Idempotency-Key: wanserve-submit-" in said and "refused" not in said
    finally:
        stub.shutdown()


def test_ctrl_c_after_the_job_completed_says_so_not_cancelled(tmp_path: Path, tiny_cache: Path) -> None:
    """The job completed while submit waited for a status answer, and Ctrl-C came then: submit said "cancelled"
    (the server answers a cancel of a finished job with the job as it is), and the user lost a video they had."""
    import signal

    from wanserve.jobs.sqlite import SQLiteJobStore

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    api = Process(["api", "--port", str(port), "--data-dir", str(data)], base_env(tiny_cache), tmp_path / "api.log")
    handler = type(
        "Handler", (_HoldsStatusReads,), {"upstream": url, "hold": threading.Event(), "held": threading.Event()}
    )
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    store = SQLiteJobStore(data / "jobs.db")
    follower = None
    try:
        wait_ready(url, api)  # an API with no worker: the test plays the worker
        follower = subprocess.Popen(
            submit_command("--prompt", "done meanwhile"),
            env=base_env(tiny_cache, WANSERVE_URL=f"http://127.0.0.1:{proxy.server_address[1]}"),
            stderr=subprocess.PIPE,
            text=True,
        )
        job = wait_for(lambda: store.claim("tiny-t2v", "test-worker", 3600), 60, "the job to be sent")
        handler.hold.set()
        # The follower waits on a status read from here on: only then does the job complete (a read that passed
        # the proxy just before could otherwise find it completed, and the download be what is interrupted).
        wait_for(handler.held.is_set, 60, "the follower's next status read to be held")
        request = job.request
        result = {k: request[k] for k in ("seed", "width", "height", "num_frames", "fps")}
        assert store.complete(job.id, "test-worker", result, 3600)
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=60)
        assert follower.returncode == 130, stderr
        assert f"interrupted: {job.id} had completed already: GET " in stderr, stderr
        assert f"/v1/videos/{job.id}/content" in stderr and "cancelled" not in stderr
        assert store.get(job.id).status.value == "completed"
    finally:
        if follower is not None:
            follower.kill()
        store.close()
        proxy.shutdown()
        api.stop()


def test_an_api_replica_requeues_the_job_of_a_worker_that_died(tmp_path: Path, tiny_cache: Path) -> None:
    """Only workers reaped lost leases: with no worker running (scaled to zero, a torchrun group that died with
    its job), the job read "in_progress" at its last progress for as long as none started."""
    from wanserve.jobs.sqlite import SQLiteJobStore

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    env = base_env(tiny_cache, WANSERVE_LEASE_SECONDS="3")  # the API sweeps every lease / 3
    api = Process(["api", "--port", str(port), "--data-dir", str(data)], env, tmp_path / "api.log")
    store = SQLiteJobStore(data / "jobs.db")
    try:
        wait_ready(url, api)  # no worker: the test's claim plays one that then dies
        job_id = httpx.post(f"{url}/v1/videos", json={"prompt": "orphaned"}).json()["id"]
        assert (claimed := store.claim("tiny-t2v", "dead-worker", 1.0)) is not None and claimed.id == job_id
        assert store.set_progress(job_id, "dead-worker", 0.73, "denoise")
        wait_for(lambda: httpx.get(f"{url}/v1/videos/{job_id}").json()["status"] == "queued", 30, "the requeue")
        video = httpx.get(f"{url}/v1/videos/{job_id}").json()
        assert video["queue_position"] == 1 and video["progress"] == 0, video
        assert f"job {job_id} lost its worker on attempt 1 of 3: now queued" in api.log()
    finally:
        store.close()
        api.stop()


def test_submit_sends_the_key_of_the_environment(tmp_path: Path, tiny_cache: Path) -> None:
    """An API replica with keys (no worker needed to take a job): the key is WANSERVE_API_KEY, as on the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env(tiny_cache, WANSERVE_API_KEY="right")
    api = Process(["api", "--port", str(port), "--data-dir", str(tmp_path / "data")], env, tmp_path / "api.log")
    try:
        wait_ready(url, api)
        refused = _submit(url, tiny_cache, "--prompt", "x", "--no-wait", WANSERVE_API_KEY="wrong")
        assert refused.returncode == 2 and "WANSERVE_API_KEY: the server refused this key" in refused.stderr
        keyless = _submit(url, tiny_cache, "--prompt", "x", "--no-wait")
        assert keyless.returncode == 2 and "the server asks for an API key: set WANSERVE_API_KEY" in keyless.stderr
        taken = _submit(url, tiny_cache, "--prompt", "x", "--no-wait", WANSERVE_API_KEY="right")
        assert taken.returncode == 0, taken.stderr
        assert taken.stdout.startswith("video_")
    finally:
        api.stop()


def test_kill_9_loses_no_acknowledged_job(tmp_path: Path, tiny_cache: Path) -> None:
    srv = Server(tmp_path, tiny_cache, ["tiny-t2v"], name="durable")
    try:
        jobs = [srv.submit(**SLOW) for _ in range(3)]
        wait_for(lambda: srv.job(jobs[0])["status"] == "in_progress", 30, "a job to run")
        assert [srv.job(j)["status"] for j in jobs[1:]] == ["queued", "queued"]
        srv.process.kill9()
        srv.restart()
        for job_id in jobs:
            assert srv.wait_finished(job_id, timeout=120)["status"] == "completed"
        for job_id in jobs:
            assert srv.http.get(f"/v1/videos/{job_id}/content").status_code == 200
    finally:
        srv.process.stop()


def test_sigterm_finishes_the_running_job_within_the_grace(tmp_path: Path, tiny_cache: Path) -> None:
    """SIGTERM drains: the API goes on answering while the job finishes (it closed its port at once, so every
    client polling a status, and /health, got "connection refused" for up to the grace), then stops, and says
    so (the process went quiet for up to the grace). An impatient second signal (Ctrl-C) hands the job back to
    the queue at its next step and exits 0; it used to kill the process mid-job (SIGABRT), leaving the job
    in_progress until its lease ran out, and then did nothing at all."""
    import signal

    srv = Server(tmp_path, tiny_cache, ["tiny-t2v"], name="drain", WANSERVE_SHUTDOWN_GRACE="300")
    try:
        job_id = srv.submit(**{**SLOW, "num_frames": 33})
        wait_for(lambda: srv.job(job_id)["status"] == "in_progress", 30, "the job to run")
        process = srv.process.proc
        assert process is not None
        process.send_signal(signal.SIGTERM)
        # New connections, as a new client's (a kept-alive one is served to its end either way).
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/v1/videos/{job_id}").json()["status"] == "in_progress"
        draining = httpx.get(f"{srv.url}/ready")  # balancers send new work elsewhere
        assert draining.status_code == 503 and draining.json()["reasons"] == ["draining (shutting down): tiny-t2v"]
        assert httpx.get(f"{srv.url}/health").status_code == 200
        said = wait_for(
            lambda: "may finish first" in (text := " ".join(srv.process.log().split())) and text, 10, "the drain line"
        )
        assert "the running job of tiny-t2v may finish first (up to 300 s" in said, said[-2000:]
        assert "stop again (Ctrl-C) to hand it back now" in said
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == 0
        assert "handing the running job of tiny-t2v back to the queue now" in srv.process.log()
        # Why it went back: the second stop, not a grace (of 300 s) that ran out.
        assert f"job {job_id} handed back to the queue (stop asked again)" in srv.process.log(), srv.process.log()
        from wanserve.jobs import open_store

        store = open_store(f"sqlite:///{srv.data.resolve() / 'jobs.db'}")
        handed_back = store.get(job_id)
        store.close()
        assert handed_back.status == "queued" and handed_back.worker_id is None  # not lost, not run twice
        srv.restart()
        assert srv.wait_finished(job_id, timeout=120)["status"] == "completed"
    finally:
        srv.process.stop()


_HELD_OPEN = """
import asyncio, sys, threading
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from wanserve.roles import _uvicorn

async def endless(request):
    async def body():
        while True:
            yield b"x" * 10
            await asyncio.sleep(0.2)
    return StreamingResponse(body())

def drained():  # as serve's drain: over at once, then the HTTP server is told to stop
    threading.Timer(0.3, lambda: setattr(server, "should_exit", True)).start()

server = _uvicorn(Starlette(routes=[Route("/endless", endless)]), "127.0.0.1", int(sys.argv[1]), drained, True)
server.run()
"""


@pytest.mark.parametrize("second_signal", [True, False])
def test_an_open_download_does_not_hold_serve_after_its_drain(tmp_path: Path, second_signal: bool) -> None:
    """After the drain, uvicorn waits for responses still being sent (a stalled download, a player holding an
    MP4): a second Ctrl-C ends that wait, as uvicorn's own does, and without one it ends after a bound."""
    import signal
    import threading

    from wanserve.roles import SHUTDOWN_CONNECTIONS_S

    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", _HELD_OPEN, str(port)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/nothing").status_code == 404, 30, "the server")

        def hold() -> None:
            try:
                with httpx.stream("GET", f"http://127.0.0.1:{port}/endless", timeout=60) as response:
                    for _ in response.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass

        threading.Thread(target=hold, daemon=True).start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        if second_signal:
            time.sleep(1)
            process.send_signal(signal.SIGINT)
            process.wait(5)
        else:
            process.wait(SHUTDOWN_CONNECTIONS_S + 10)
            assert time.monotonic() - started >= SHUTDOWN_CONNECTIONS_S - 1  # it did wait for the download
    finally:
        process.kill()
        process.wait()


def test_sigterm_past_the_grace_hands_the_job_back(tmp_path: Path, tiny_cache: Path) -> None:
    srv = Server(tmp_path, tiny_cache, ["tiny-t2v"], name="handback", WANSERVE_SHUTDOWN_GRACE="0")
    try:
        job_id = srv.submit(**SLOW)
        wait_for(lambda: srv.job(job_id)["progress"] > 0, 30, "the job to run")
        assert srv.process.terminate(timeout=60) == 0
        from wanserve.jobs import open_store

        store = open_store(f"sqlite:///{srv.data.resolve() / 'jobs.db'}")
        handed_back = store.get(job_id)
        store.close()
        assert handed_back.status == "queued" and handed_back.worker_id is None
        srv.restart()
        assert srv.wait_finished(job_id, timeout=120)["status"] == "completed"
    finally:
        srv.process.stop()


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: the SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (signum - 1) & 1)


def test_a_worker_stopped_while_it_starts_exits_0_without_loading(tmp_path: Path, tiny_cache: Path) -> None:
    """KEDA scales a worker down as it comes up: a SIGTERM during start-up (imports and the engine check take
    seconds) ended it with 143 and nothing logged. Now it is a drain: no model load, exit 0."""
    import signal

    port = free_port()
    env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"))
    worker = Process(["worker", "--model", "tiny-t2v", "--ops-port", str(port)], env, tmp_path / "worker.log")
    assert worker.proc is not None
    try:
        # Python catches SIGINT from the start; SIGTERM only once wanserve installs its handler.
        wait_for(lambda: _catches(worker.proc.pid, signal.SIGTERM), 60, "the worker to handle SIGTERM")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")  # still starting: its ops port is not up yet
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0, worker.log()
    finally:
        worker.stop()
    log = worker.log()
    assert "while starting" in log and "stopped" in log
    assert "preset" not in log  # the engine was never loaded (loading logs the preset it applies)


def test_a_worker_handles_sigterm_before_it_imports_torch(tmp_path: Path, tiny_cache: Path) -> None:
    """Importing torch takes seconds on a loaded machine: a SIGTERM then (a pod scaled down as it comes up)
    ended the worker with 143 and nothing logged, as the handler was installed only after that import."""
    spy = (
        "import signal, sys, os\n"
        "real = signal.signal\n"
        "def first(signum, handler):\n"
        "    if signum == signal.SIGTERM:\n"
        "        print('torch imported:', 'torch' in sys.modules, flush=True)\n"
        "        os._exit(0)\n"
        "    return real(signum, handler)\n"
        "signal.signal = first\n"
        "sys.argv = ['wanserve', 'worker', '--model', 'tiny-t2v', '--ops-port', sys.argv[1]]\n"
        "from wanserve.cli import main\n"
        "main()\n"
    )
    env = base_env(tiny_cache, WANSERVE_DATA_DIR=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-c", spy, str(free_port())], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "torch imported: False", (done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("how", ["sigterm", "drain"])
def test_a_worker_stopped_while_it_loads_its_model_exits_at_once(tmp_path: Path, how: str) -> None:
    """A stop during the model load (minutes for a 14B) waited for the load to finish, or for the pod's grace
    period to run out. The worker holds no job then: it stops the load and exits 0; what it was building is
    not left half-written, and the next worker on the same cache loads it. POST /drain (a Spot notice's
    handler) stops it as SIGTERM does: it used to wait out the load."""
    import signal

    port = free_port()
    # A cache without the tiny model: the worker builds it as it loads, which takes seconds.
    env = base_env(tmp_path / "cache", WANSERVE_DATA_DIR=str(tmp_path / "data"))
    args = ["worker", "--model", "tiny-t2v", "--ops-port", str(port)]
    worker = Process(args, env, tmp_path / "worker.log")
    assert worker.proc is not None
    try:
        loading = wait_for(lambda: _ready_state(port) == "loading", 120, "the worker's ops port to say loading")
        assert loading
        # The API's /ready body (a status and the reasons), and a start line as serve's and api's: a worker
        # said neither which model nor which store it had.
        waiting = httpx.get(f"http://127.0.0.1:{port}/ready")
        assert waiting.status_code == 503 and waiting.json()["status"] == "not_ready", waiting.text
        assert waiting.json()["reasons"] == ["models not ready: {'tiny-t2v': 'loading'}"], waiting.text
        said = " ".join(worker.log().split())
        assert "wanserve worker " in said and f": tiny-t2v (store sqlite:///{tmp_path / 'data'}" in said, said
        assert f"ops on http://127.0.0.1:{port}; no API key required" in said, said
        if how == "sigterm":
            worker.proc.send_signal(signal.SIGTERM)
        else:
            drained = httpx.post(f"http://127.0.0.1:{port}/drain")
            assert drained.status_code == 200 and drained.json()["draining"] is True, drained.text
        assert worker.proc.wait(60) == 0, worker.log()
        log = worker.log()
        assert "model load stopped" in log and "loaded tiny-t2v" not in log, log
        assert not list((tmp_path / "cache").glob("tiny/tiny-t2v-*/model_index.json"))  # nothing half-built

        worker = Process(args, env, tmp_path / "worker2.log")
        wait_for(lambda: _ready_state(port) == "ready", 180, "the next worker to load the model")
    finally:
        worker.stop()


def _ready_state(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready").json()["models"]["tiny-t2v"]
    except httpx.HTTPError:
        return None


def test_an_api_replica_deletes_expired_results_while_no_worker_runs(tmp_path: Path, tiny_cache: Path) -> None:
    """Only workers swept expired jobs: with every worker scaled to zero (KEDA), a video outlived its
    WANSERVE_RESULT_TTL, still listed and downloadable, until a worker came up again."""
    from wanserve.jobs.model import Job, new_job_id
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.base import key_for, put_bytes
    from wanserve.storage.local import LocalStorage

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "data"
    api = Process(["api", "--port", str(port), "--data-dir", str(data)], base_env(tiny_cache), tmp_path / "api.log")
    store = None
    try:
        wait_ready(url, api)  # an API with no worker
        # A job a worker finished before it was scaled away, written as the worker writes it.
        store, storage = SQLiteJobStore(data / "jobs.db"), LocalStorage(data / "videos")
        job = store.enqueue(Job(id=new_job_id(), model="tiny-t2v", request={"prompt": "p"}))
        assert store.claim("tiny-t2v", "gone-worker", 30.0) is not None
        put_bytes(storage, key_for(job.id, "video.mp4"), b"mp4 bytes", "video/mp4")
        assert store.complete(job.id, "gone-worker", {"video_key": key_for(job.id, "video.mp4")}, ttl=2.0)
        assert httpx.get(f"{url}/v1/videos/{job.id}").json()["status"] == "completed"
        wait_for(lambda: httpx.get(f"{url}/v1/videos/{job.id}").status_code == 404, 30, "the job to expire")
        assert not (data / "videos" / job.id).exists()  # its files went first
        assert f"job {job.id} expired" in api.log()
    finally:
        if store is not None:
            store.close()
        api.stop()


def test_headers_past_their_limit_are_refused_without_holding_up_others(server: Server) -> None:
    """httptools took headers of any size: one client sending 100 MB of them held the event loop (every
    request, /health included) for 13 s. They are refused once past 16 KiB, and the server goes on answering."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(1024):  # up to 64 MiB, in 64 KiB pieces: the server answers long before
                sock.sendall(b"a" * 65536)
        except OSError:  # answered and closed while more was being sent
            pass
        answer = sock.recv(4096)
    assert answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:200]
    assert server.http.get("/health").status_code == 200
