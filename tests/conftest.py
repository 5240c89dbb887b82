"""Shared fixtures. The engine fixtures live in engine_fixtures.py (loaded by `-p engine_fixtures`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# ---- a real redis-server (never mocked) -------------------------------------------------------------------


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server path. A missing binary fails the run: CI must not pass by skipping Redis tests."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the Redis job store tests need a real server "
            "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)",
            pytrace=False,
        )
    return path


def start_redis(port: int, dir: Path, appendonly: bool) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:`port` with its files in `dir`, and return once it answers PING.
    With `appendonly`, every write is fsynced to the AOF before it is acknowledged (so it survives kill -9)."""
    import redis

    dir.mkdir(parents=True, exist_ok=True)
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(dir), "--save", ""]
    args += ["--appendonly", "yes" if appendonly else "no", "--logfile", "redis.log"]
    if appendonly:
        args += ["--appendfsync", "always"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    try:
        while True:
            if process.poll() is not None:
                log = dir / "redis.log"
                detail = (
                    log.read_text() if log.exists() else (process.stderr.read() if process.stderr else b"").decode()
                )
                raise RuntimeError(f"redis-server exited with {process.returncode}:\n{detail[-2000:]}")
            try:
                if client.ping():
                    return process
            except redis.exceptions.RedisError:  # not listening yet, or still loading the AOF
                pass
            if time.monotonic() > deadline:
                stop_redis(process)
                raise RuntimeError(f"redis-server on port {port} did not answer PING within 15 s")
            time.sleep(0.02)
    finally:
        client.close()


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server for the whole run (no persistence); yields its URL."""
    port = free_tcp_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"), appendonly=False)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(process)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session server's URL, emptied first so each test starts from nothing."""
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server


# ---- what a worker uploads -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real 9-frame 64x64 H.264 MP4 and a WebP thumbnail, like the worker uploads."""
    import av
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    video = folder / "clip.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(9):
            pixels = np.full((64, 64, 3), i * 25, dtype=np.uint8)
            pixels[:, : 7 * i + 1, 0] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    thumbnail = folder / "thumb.webp"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(thumbnail, format="WEBP")
    assert video.stat().st_size > 1000
    return video, thumbnail
