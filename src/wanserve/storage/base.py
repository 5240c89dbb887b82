"""Where results live. Keys are `<job_id>/video.mp4` and `<job_id>/thumbnail.webp`, so a re-run of a job
overwrites its files instead of adding new ones; `<job_id>/input` holds an image-to-video request's input image
until the job expires. Backends are chosen by URL (`file:///dir`, `s3://bucket/prefix`)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

VIDEO = "video.mp4"
THUMBNAIL = "thumbnail.webp"
INPUT = "input"
# Where S3 storage finds its endpoint, first set wins. boto3 reads the AWS_* ones itself, but the value also
# switches on path-style addressing.
ENDPOINT_ENV_VARS = ("WANSERVE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CONTENT_TYPES = {VIDEO: "video/mp4", THUMBNAIL: "image/webp"}


def key_for(job_id: str, name: str) -> str:
    return f"{job_id}/{name}"


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    content_type: str


@runtime_checkable
class Storage(Protocol):
    def put_file(self, key: str, path: Path, content_type: str) -> None: ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def open_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Bytes start..end inclusive, in chunks."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `<prefix>/` (a job's files)."""
        ...

    def job_folders(self) -> Iterator[tuple[str, float]]:
        """Each folder at the top (`<job_id>/…`) with when its newest file was written (epoch seconds)."""
        ...

    def presigned_url(
        self,
        key: str,
        expires: int = 3600,
        method: str = "GET",
        filename: str | None = None,
        disposition: str = "inline",
    ) -> str | None:
        """A URL the client can fetch directly with `method` (GET or HEAD; a signature holds for one method),
        whose answer names the file `filename`, to be shown (`inline`) or saved (`attachment`); None when the
        backend has none (local files)."""
        ...

    def ping(self) -> bool: ...


def put_bytes(storage: Storage, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    """Store `data` under `key` through the backend's one upload path (`put_file`)."""
    with tempfile.NamedTemporaryFile(prefix="wanserve-upload-") as file:
        file.write(data)
        file.flush()
        storage.put_file(key, Path(file.name), content_type)


def read_bytes(storage: Storage, key: str) -> bytes | None:
    """The whole object under `key`, or None if there is none."""
    info = storage.stat(key)
    if info is None:
        return None
    try:
        return b"".join(storage.open_range(key, 0, info.size - 1)) if info.size else b""
    except FileNotFoundError:  # removed between the two calls
        return None
