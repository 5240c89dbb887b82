"""One contract for every storage backend. The S3 backend runs against a real S3-compatible server process
(moto in server mode on loopback), never an in-process mock, so requests go through HTTP as they do in production."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from wanserve.storage import CONTENT_TYPES, THUMBNAIL, VIDEO, Storage, key_for, open_storage
from wanserve.storage.local import LocalStorage
from wanserve.storage.s3 import ENDPOINT_ENV_VARS, S3Storage

from conftest import free_tcp_port

# 10,244 bytes where every offset has a distinct-enough value to catch off-by-one ranges.
DATA = bytes(range(256)) * 40 + b"tail"


# ---- a real S3-compatible server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server as a subprocess on 127.0.0.1, with one bucket, for the whole run."""
    port = free_tcp_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}:\n{log.read_text()[-2000:]}")
            try:
                httpx.get(endpoint, timeout=0.5)  # any HTTP answer means it is listening
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on port {port} did not answer within 30 s") from None
                time.sleep(0.05)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket="wanserve-test")
        yield S3Server(endpoint=endpoint, bucket="wanserve-test")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials through the standard env vars, isolated from the developer's own AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", *ENDPOINT_ENV_VARS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "videos")
    # Looked up lazily so that `-k local` never starts the server.
    server: S3Server = request.getfixturevalue("s3_server")
    request.getfixturevalue("s3_env")
    # Every test gets its own prefix in the shared bucket, so tests cannot see each other's objects.
    return S3Storage(server.bucket, prefix=f"t-{uuid.uuid4().hex}", endpoint_url=server.endpoint)


def write(tmp_path: Path, data: bytes, name: str = "src.bin") -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}-{name}"
    path.write_bytes(data)
    return path


def read(storage: Storage, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> bytes:
    chunks = list(storage.open_range(key, start, end, chunk_size))
    assert all(0 < len(chunk) <= chunk_size for chunk in chunks)
    return b"".join(chunks)


# ---- the contract ---------------------------------------------------------------------------------------------


def test_put_then_stat_reports_size_and_content_type(storage: Storage, tmp_path: Path) -> None:
    assert isinstance(storage, Storage)
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    storage.put_file(key_for("job1", THUMBNAIL), write(tmp_path, b"RIFFwebp"), CONTENT_TYPES[THUMBNAIL])

    video = storage.stat(key_for("job1", VIDEO))
    thumbnail = storage.stat(key_for("job1", THUMBNAIL))
    assert video is not None and (video.size, video.content_type) == (len(DATA), "video/mp4")
    assert thumbnail is not None and (thumbnail.size, thumbnail.content_type) == (8, "image/webp")
    assert storage.ping()


def test_a_rerun_overwrites_the_same_key(storage: Storage, tmp_path: Path) -> None:
    key = key_for("job1", VIDEO)
    storage.put_file(key, write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    storage.put_file(key, write(tmp_path, b"shorter"), CONTENT_TYPES[VIDEO])

    info = storage.stat(key)
    assert info is not None and info.size == 7
    assert read(storage, key, 0, 6) == b"shorter"


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, len(DATA) - 1), (0, 0), (1000, 5999), (len(DATA) - 1, len(DATA) - 1)],
    ids=["full", "first-byte", "middle", "last-byte"],
)
def test_open_range_yields_exactly_the_requested_bytes(storage: Storage, tmp_path: Path, start: int, end: int) -> None:
    key = key_for("job1", VIDEO)
    storage.put_file(key, write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    # A small chunk size so that every span but the single bytes arrives in several chunks.
    assert read(storage, key, start, end, chunk_size=1000) == DATA[start : end + 1]


def test_open_range_of_a_missing_key_raises_file_not_found_at_the_call(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError):
        storage.open_range(key_for("nojob", VIDEO), 0, 9)


def test_stat_of_a_missing_key_is_none(storage: Storage, tmp_path: Path) -> None:
    assert storage.stat(key_for("nojob", VIDEO)) is None
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    assert storage.stat(key_for("job1", THUMBNAIL)) is None


def test_delete_prefix_removes_one_jobs_files_and_leaves_the_others(storage: Storage, tmp_path: Path) -> None:
    # "job1" is a string prefix of "job10": deleting the one must not touch the other.
    for job in ("job1", "job10", "job2"):
        storage.put_file(key_for(job, VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
        storage.put_file(key_for(job, THUMBNAIL), write(tmp_path, b"thumb"), CONTENT_TYPES[THUMBNAIL])

    storage.delete_prefix("job1")

    assert storage.stat(key_for("job1", VIDEO)) is None
    assert storage.stat(key_for("job1", THUMBNAIL)) is None
    for job in ("job10", "job2"):
        assert storage.stat(key_for(job, VIDEO)) is not None
        assert storage.stat(key_for(job, THUMBNAIL)) is not None
    storage.delete_prefix("job1")  # already gone: not an error
    storage.delete_prefix("never-existed")


def test_a_delete_racing_a_file_being_stored_removes_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE while the worker stores the video: its file landed in the folder between rmtree emptying it
    and removing it, and the DELETE was a 500 ("Directory not empty")."""
    import os

    storage = LocalStorage(tmp_path / "videos")
    source = tmp_path / "clip.mp4"
    source.write_bytes(b"x" * 100)
    storage.put_file("video_race/video.mp4", source, "video/mp4")
    real_rmdir = os.rmdir
    landed: list[str] = []

    def rmdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith("video_race") and not landed:  # the worker's rename lands just now
            landed.append(str(path))
            storage.put_file("video_race/thumbnail.webp", source, "image/webp")
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    storage.delete_prefix("video_race")
    assert landed and not (tmp_path / "videos" / "video_race").exists()


def test_delete_prefix_refuses_an_empty_prefix(storage: Storage, tmp_path: Path) -> None:
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    for prefix in ("", "/"):
        with pytest.raises(ValueError):
            storage.delete_prefix(prefix)
    assert storage.stat(key_for("job1", VIDEO)) is not None


def test_job_folders_name_each_jobs_folder_once_with_its_newest_write(storage: Storage, tmp_path: Path) -> None:
    """What `wanserve prune` walks: one entry per job, whichever backend, and no object outside a folder."""
    assert list(storage.job_folders()) == []  # nothing stored yet (no root folder, an empty prefix)
    before = time.time()
    for job in ("job1", "job10", "job2"):
        storage.put_file(key_for(job, VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
        storage.put_file(key_for(job, THUMBNAIL), write(tmp_path, b"thumb"), CONTENT_TYPES[THUMBNAIL])
    storage.put_file("loose.txt", write(tmp_path, b"not a job's"), "text/plain")
    folders = dict(storage.job_folders())
    assert sorted(folders) == ["job1", "job10", "job2"]
    assert all(before - 5 <= written <= time.time() + 5 for written in folders.values()), folders


def test_job_folders_walk_on_past_folders_deleted_while_walking(storage: Storage, tmp_path: Path) -> None:
    """Expiry, a DELETE or a second prune remove folders while `wanserve prune` walks: it stopped with
    FileNotFoundError part-way (exit 1)."""
    for job in ("job1", "job2", "job3"):
        storage.put_file(key_for(job, VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    walk = storage.job_folders()
    first, _ = next(walk)
    rest = {"job1", "job2", "job3"} - {first}
    for job in rest:
        storage.delete_prefix(job)
    # (A bucket's listing may still name them, from a page read before: deleting them again is harmless.)
    assert {name for name, _written in walk} <= rest


# ---- S3 only ---------------------------------------------------------------------------------------------------


def test_s3_presigned_url_downloads_the_bytes(s3_server: S3Server, s3_env: None, tmp_path: Path) -> None:
    storage = S3Storage(s3_server.bucket, prefix="presign", endpoint_url=s3_server.endpoint)
    key = key_for("job1", VIDEO)
    storage.put_file(key, write(tmp_path, DATA), CONTENT_TYPES[VIDEO])

    url = storage.presigned_url(key, expires=60)
    assert url is not None
    # Path-style: the bucket is in the path, not the host name, as MinIO needs.
    assert url.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/presign/job1/video.mp4?")
    response = httpx.get(url)  # no credentials: the signature in the URL is the authorisation
    assert response.status_code == 200
    assert response.content == DATA
    assert response.headers["content-type"] == "video/mp4"
    saved = storage.presigned_url(key, expires=60, filename="job1.mp4", disposition="attachment")
    assert saved is not None
    assert httpx.get(saved).headers["content-disposition"] == 'attachment; filename="job1.mp4"'


def test_s3_ping_is_false_for_a_missing_bucket(s3_server: S3Server, s3_env: None) -> None:
    assert not S3Storage("no-such-bucket", endpoint_url=s3_server.endpoint).ping()


# ---- local only ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "job/../../x", "/etc/passwd", "", "."])
def test_local_rejects_keys_outside_the_root(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "videos")
    source = write(tmp_path, DATA)
    with pytest.raises(ValueError):
        storage.put_file(key, source, CONTENT_TYPES[VIDEO])
    with pytest.raises(ValueError):
        storage.stat(key)
    with pytest.raises(ValueError):
        storage.delete_prefix(key)
    assert not (tmp_path / "x").exists()
    assert source.exists()


def test_local_put_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "videos")
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    assert [p.name for p in (tmp_path / "videos" / "job1").iterdir()] == [VIDEO]


def test_local_has_no_presigned_url_and_pings_only_a_writable_root(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "videos")
    assert storage.presigned_url(key_for("job1", VIDEO)) is None
    assert storage.ping()  # creates the root if needed
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")
    assert not LocalStorage(blocked).ping()


# ---- open_storage ---------------------------------------------------------------------------------------------


def test_open_storage_file_urls_and_plain_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        f"file://{tmp_path}/abs": tmp_path / "abs",
        "file://relative/dir": tmp_path / "relative" / "dir",
        str(tmp_path / "plain"): tmp_path / "plain",
        "plain-relative": tmp_path / "plain-relative",
    }
    for url, root in cases.items():
        storage = open_storage(url)
        assert isinstance(storage, LocalStorage), url
        assert storage.root == root, url


def test_open_storage_s3_url_uses_the_endpoint_from_env(
    s3_server: S3Server, s3_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANSERVE_S3_ENDPOINT_URL", s3_server.endpoint)
    storage = open_storage(f"s3://{s3_server.bucket}/deploy/results/")
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.endpoint_url) == (
        s3_server.bucket,
        "deploy/results",
        s3_server.endpoint,
    )
    assert storage.ping()
    storage.put_file(key_for("job1", VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    assert read(storage, key_for("job1", VIDEO), 0, len(DATA) - 1) == DATA

    bare = open_storage("s3://other-bucket")
    assert isinstance(bare, S3Storage) and (bare.bucket, bare.prefix) == ("other-bucket", "")

    # The generic AWS variable works too (for tools that already set it), when wanserve's own is unset.
    monkeypatch.delenv("WANSERVE_S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    fallback = open_storage(f"s3://{s3_server.bucket}")
    assert isinstance(fallback, S3Storage) and fallback.endpoint_url == s3_server.endpoint
    assert fallback.ping()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/dir",
        "redis://localhost:6379/0",
        "s3://",
        "s3:///prefix",
        "file://",
        "",
        # A `#` or `?` cut the prefix short without a word (beside another deployment's files, which its prune
        # then listed as orphans); an endpoint or a user in the bucket's place was a bucket of that name.
        "s3://videos/run#2",
        "s3://videos/x?y=1",
        "s3://user@videos/p",
        "s3://minio:9000/p",
    ],
)
def test_open_storage_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError) as error:
        open_storage(url)
    message = str(error.value)
    assert repr(url) in message
    assert "file://" in message and "s3://" in message


def test_an_s3_prefix_with_empty_parts_is_the_same_prefix() -> None:
    assert open_storage("s3://videos//a//b//").prefix == "a/b"  # type: ignore[attr-defined]


def _completed_job(tmp_path: Path, **settings: Any) -> tuple[Any, Any]:
    """A job completed as a worker completes one (its video under the usual key), on an SQLite store in
    `tmp_path`, and a function that opens the API over that store and a given storage."""
    from fastapi.testclient import TestClient

    from wanserve.api.app import create_app
    from wanserve.catalog import lookup
    from wanserve.config import Settings
    from wanserve.jobs import Job, open_store

    config = Settings(data_dir=tmp_path, **settings)
    store = open_store(config.store_url)
    job = store.enqueue(Job(id="video_" + uuid.uuid4().hex, model="tiny-t2v", request={"prompt": "p"}))
    assert store.claim("tiny-t2v", "w1", 30.0) is not None
    assert store.complete(job.id, "w1", {"video_key": key_for(job.id, VIDEO)}, 60.0)
    spec = lookup("tiny-t2v")
    assert spec is not None
    return job, lambda storage: TestClient(create_app(config, store, storage, {"tiny-t2v": spec}))


def test_an_unreachable_s3_answers_503_and_delete_keeps_the_record(s3_env: None, tmp_path: Path) -> None:
    """The storage endpoint is down: downloads and DELETE say so with a 503 naming the storage, and a DELETE
    that could not remove the files keeps the record, so that a retry finds the job and removes them."""
    job, api = _completed_job(tmp_path)
    down = S3Storage("wanserve-test", endpoint_url=f"http://127.0.0.1:{free_tcp_port()}")  # nothing listens there
    with api(down) as client:
        for response in (client.get(f"/v1/videos/{job.id}/content"), client.delete(f"/v1/videos/{job.id}")):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "storage_unavailable"
            assert "result storage (S3) cannot be reached" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "5"
        assert client.get(f"/v1/videos/{job.id}").json()["status"] == "completed"


def test_s3_redirected_downloads_agree_with_head_and_name_the_file(
    s3_server: S3Server, s3_env: None, tmp_path: Path
) -> None:
    """With WANSERVE_STORAGE_REDIRECT, GET and HEAD both go to the bucket (HEAD answered here gave another ETag
    than the bucket's, so a conditional GET never matched), the file keeps the job's name, and a missing object or
    a bucket that is down is this API's JSON 404 or 503, not S3's XML or a redirect to nowhere."""
    job, api = _completed_job(tmp_path, storage_redirect=True)
    storage = S3Storage(s3_server.bucket, prefix=f"t-{uuid.uuid4().hex}", endpoint_url=s3_server.endpoint)
    storage.put_file(key_for(job.id, VIDEO), write(tmp_path, DATA), CONTENT_TYPES[VIDEO])
    path = f"/v1/videos/{job.id}/content"
    with api(storage) as client:
        redirect = client.get(path, follow_redirects=False)
        assert redirect.status_code == 302 and redirect.headers["location"].startswith(s3_server.endpoint)
        got = httpx.get(redirect.headers["location"])
        assert got.content == DATA
        assert got.headers["content-disposition"] == f'inline; filename="{job.id}.mp4"'
        head = client.head(path, follow_redirects=False)
        assert head.status_code == 302
        headed = httpx.head(head.headers["location"])
        assert headed.status_code == 200 and headed.headers["etag"] == got.headers["etag"]
        fresh = httpx.get(redirect.headers["location"], headers={"If-None-Match": headed.headers["etag"]})
        assert fresh.status_code == 304

        storage.delete_prefix(job.id)
        gone = client.get(path, follow_redirects=False)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"

    down = S3Storage("wanserve-test", endpoint_url=f"http://127.0.0.1:{free_tcp_port()}")  # nothing listens there
    with api(down) as client:
        for method in ("GET", "HEAD"):
            answer = client.request(method, path, follow_redirects=False)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "5", method


def test_doctor_tells_a_missing_bucket_from_an_endpoint_that_does_not_answer(
    s3_server: S3Server, s3_env: None, tmp_path: Path
) -> None:
    """All three used to read "does not answer … check the bucket, the endpoint and the credentials"."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    def doctor(call: tuple[str, str, bool]) -> str:
        storage, endpoint, keys = call
        env = dict(os.environ, WANSERVE_S3_ENDPOINT_URL=endpoint, WANSERVE_DATA_DIR=str(tmp_path))
        if not keys:
            del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        command = [sys.executable, "-m", "wanserve", "doctor", "--storage", storage]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        return " ".join(done.stdout.split())  # the report is on stdout

    bucket = f"s3://{s3_server.bucket}/p"
    calls = [
        (bucket, s3_server.endpoint, True),
        ("s3://no-such-bucket/p", s3_server.endpoint, True),
        (bucket, f"http://127.0.0.1:{free_tcp_port()}", True),
        (bucket, s3_server.endpoint, False),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:  # each is mostly an interpreter's start
        found, missing, dead, keyless = pool.map(doctor, calls)
    assert f"OK storage: {bucket} answers" in found
    assert "FIX storage: s3://no-such-bucket/p at" in missing and "the bucket does not exist: create it" in missing
    assert "FIX storage:" in dead and "does not answer" in dead and "WANSERVE_S3_ENDPOINT_URL" in dead
    assert "FIX storage:" in keyless and "no AWS credentials found: set AWS_ACCESS_KEY_ID" in keyless


def test_a_download_from_an_s3_that_stops_answering_is_a_503_in_seconds(s3_env: None, tmp_path: Path) -> None:
    """An endpoint that takes connections and never answers (a hung MinIO, a stopped process): a download's
    HEAD waited 3 tries x 30 s, two minutes before its 503, with a request thread held all along. Reads now
    give up after two tries of a few seconds."""
    import contextlib
    import socket
    import threading
    import time

    from wanserve.storage.s3 import READ_TIMEOUT_S

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    held: list[socket.socket] = []

    def take() -> None:
        with contextlib.suppress(OSError):  # closed at the end
            while True:
                held.append(silent.accept()[0])

    threading.Thread(target=take, daemon=True).start()
    try:
        job, api = _completed_job(tmp_path)
        hung = S3Storage("wanserve-test", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        with api(hung) as client:
            started = time.monotonic()
            response = client.get(f"/v1/videos/{job.id}/content")
            waited = time.monotonic() - started
            assert response.status_code == 503 and response.json()["error"]["code"] == "storage_unavailable"
            assert waited < 4 * READ_TIMEOUT_S + 5, f"{waited:.0f} s before the 503"  # (two minutes before)
            # A delete lists and deletes the job's files first: as quick a 503 (it waited the uploads' 90 s,
            # past a 60 s balancer, with a request thread held), and the job is kept for the retry.
            started = time.monotonic()
            deleted = client.delete(f"/v1/videos/{job.id}")
            waited = time.monotonic() - started
            assert deleted.status_code == 503 and deleted.json()["error"]["code"] == "storage_unavailable"
            assert waited < 4 * READ_TIMEOUT_S + 5, f"{waited:.0f} s before the delete's 503"
            assert client.get(f"/v1/videos/{job.id}").status_code == 200
    finally:
        silent.close()
        for connection in held:
            connection.close()


class _AlwaysBusy:
    """An S3 endpoint behind a proxy that answers every request 503 (an ingress whose MinIO is down, AWS
    SlowDown), or another error, on 127.0.0.1: a real HTTP server, answering as S3 does."""

    def __init__(self, status: int = 503, code: str = "ServiceUnavailable") -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _busy(self) -> None:
                body = f"<Error><Code>{code}</Code><Message>no</Message></Error>".encode()
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _busy

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_s3_answering_5xx_or_without_its_bucket_is_unavailable_not_an_error(
    s3_server: S3Server, s3_env: None, tmp_path: Path
) -> None:
    """A 503 from the endpoint used to surface as a 500, and a missing bucket as "the video expired"; both are
    the storage being unavailable (the API's 503, a worker's wait), and the client is not told internal URLs."""

    from wanserve.errors import StorageUnavailable

    no_bucket = S3Storage("no-such-bucket", endpoint_url=s3_server.endpoint)
    with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
        no_bucket.stat("video_x/video.mp4")
    busy = _AlwaysBusy()
    try:
        proxied = S3Storage("wanserve-test", endpoint_url=busy.endpoint)
        with pytest.raises(StorageUnavailable, match="503"):
            proxied.stat("video_x/video.mp4")
        with pytest.raises(StorageUnavailable):
            proxied.put_file("video_x/video.mp4", write(tmp_path, b"frames"), "video/mp4")

        job, api = _completed_job(tmp_path)
        for storage in (proxied, no_bucket):
            with api(storage) as client:
                response = client.get(f"/v1/videos/{job.id}/content")
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "storage_unavailable" and "127.0.0.1" not in error["message"], error
    finally:
        busy.close()


@pytest.mark.parametrize(("status", "code"), [(403, "InvalidAccessKeyId"), (400, "ExpiredToken")])
def test_s3_refusing_the_credentials_makes_downloads_wait_not_fail(
    s3_env: None, tmp_path: Path, status: int, code: str
) -> None:
    """Revoked keys or an expired token: S3 answers a HEAD (which every download starts with) with no body, so
    botocore's code is the bare status ("403"), which no named code matched: the download was a 500 with a
    traceback, where docs/operations.md promises a 503 storage_unavailable."""
    from wanserve.errors import StorageUnavailable

    refusing = _AlwaysBusy(status, code)
    try:
        storage = S3Storage("wanserve-test", endpoint_url=refusing.endpoint)
        with pytest.raises(StorageUnavailable):
            storage.stat("video_x/video.mp4")
        job, api = _completed_job(tmp_path)
        with api(storage) as client:
            for method in ("GET", "HEAD"):
                response = client.request(method, f"/v1/videos/{job.id}/content")
                assert response.status_code == 503 and response.headers["retry-after"] == "5", response.text
            assert client.get(f"/v1/videos/{job.id}/content").json()["error"]["code"] == "storage_unavailable"
    finally:
        refusing.close()


def test_s3_refusing_one_object_is_not_an_outage(s3_env: None, tmp_path: Path) -> None:
    """A 4xx for one upload (EntityTooLarge from S3, or a 413 from a proxy) refuses that object: the worker
    fails the job at once (`storage_failed`) instead of waiting out a minute of retries."""
    from botocore.exceptions import ClientError

    from wanserve.errors import StorageUnavailable, public_reason

    refusing = _AlwaysBusy(400, "EntityTooLarge")
    try:
        storage = S3Storage("wanserve-test", endpoint_url=refusing.endpoint)
        with pytest.raises(Exception) as error:
            storage.put_file("video_x/video.mp4", write(tmp_path, b"frames"), "video/mp4")
        assert not isinstance(error.value, StorageUnavailable)
        assert isinstance(error.value.__context__, ClientError) or isinstance(error.value, ClientError)
        # boto3's message names the scratch file, the endpoint's bucket and the key: a job's client reads only
        # the refusal's code.
        assert refusing.endpoint.split("//")[1] not in public_reason(error.value)
        assert public_reason(error.value).endswith(": EntityTooLarge")
    finally:
        refusing.close()


def test_s3_tries_each_call_as_often_as_documented(s3_env: None, tmp_path: Path) -> None:
    """docs/operations.md: an upload three tries, a download's read two, a health check one. botocore's
    `max_attempts` counts the retries after the first request, so each call made one try more than that (an
    upload to a hung bucket took 4 x 30 s, a health check twice its two seconds)."""
    from wanserve.errors import StorageUnavailable

    storage = S3Storage("videos", endpoint_url=f"http://127.0.0.1:{free_tcp_port()}")  # nothing listens there
    sent: list[str] = []

    def count(**kwargs: Any) -> None:
        sent.append(kwargs["event_name"])

    for client in {id(c): c for c in (storage.client, storage._reader, storage._probe)}.values():
        client.meta.events.register("before-send.s3", count)
    source = tmp_path / "v.mp4"
    source.write_bytes(b"x" * 100)
    for call, tries in [
        (lambda: storage.put_file("a/v.mp4", source, "video/mp4"), 3),
        (lambda: storage.stat("a/v.mp4"), 2),
        (storage.ping, 1),
    ]:
        sent.clear()
        try:
            call()
        except StorageUnavailable:
            pass
        assert len(sent) == tries, sent


def test_an_s3_endpoint_that_is_no_url_is_named(tmp_path: Path) -> None:
    """botocore's "Invalid endpoint: notaurl" was reported as a wrong --storage, which was right."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANSERVE_")}
    env.update(WANSERVE_S3_ENDPOINT_URL="notaurl", WANSERVE_CACHE_DIR=str(tmp_path), AWS_ACCESS_KEY_ID="x")
    env.update(AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1")
    said = "WANSERVE_S3_ENDPOINT_URL: must be an http:// or https:// URL"
    api = [sys.executable, "-m", "wanserve", "api", "--storage", "s3://videos/x", "--port", str(free_tcp_port())]
    done = subprocess.run(api, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and said in done.stderr and "--storage" not in done.stderr, done.stderr[-2000:]
    doctor = [sys.executable, "-m", "wanserve", "doctor", "--storage", "s3://videos/x"]
    done = subprocess.run(
        doctor, capture_output=True, text=True, env={**env, "COLUMNS": "300"}, timeout=120, cwd=tmp_path
    )
    shown = done.stdout + done.stderr
    assert said in shown and "does not answer" not in shown, shown[-2000:]


def test_a_server_on_a_bucket_that_does_not_exist_is_refused_at_start(s3_server: S3Server, tmp_path: Path) -> None:
    """Every job ran in full, then failed to store its video a minute later ("cannot be reached"), while the
    log said only that the server started. The bucket's absence is a wrong setting, named as set; an endpoint
    that does not answer is an outage the server waits out, as before."""
    import os
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANSERVE_")}
    env.update(WANSERVE_S3_ENDPOINT_URL=s3_server.endpoint, WANSERVE_CACHE_DIR=str(tmp_path))
    env.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1")
    port = str(free_tcp_port())
    api = [sys.executable, "-m", "wanserve", "api", "--storage", "s3://no-such-bucket/x", "--port", port]
    done = subprocess.run(api, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--storage: s3://no-such-bucket/x: the bucket does not exist: create it" in said, said[-2000:]
    # Nothing answers at the endpoint: started all the same, saying so.
    env["WANSERVE_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_tcp_port()}"
    log = tmp_path / "api.log"
    with open(log, "w") as out:
        started = subprocess.Popen(
            [*api[:-4], "--storage", f"s3://{s3_server.bucket}/x", "--port", port], stderr=out, env=env, cwd=tmp_path
        )
    try:
        wait = time.monotonic() + 60
        while time.monotonic() < wait and "does not answer now" not in log.read_text():
            time.sleep(0.2)
        assert started.poll() is None and "jobs wait for it" in log.read_text(), log.read_text()[-2000:]
    finally:
        started.send_signal(signal.SIGTERM)
        started.wait(30)
