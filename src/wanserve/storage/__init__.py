"""Result storage: the `Storage` protocol and its backends, chosen by URL with `open_storage`."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from wanserve.storage.base import CONTENT_TYPES, THUMBNAIL, VIDEO, ObjectInfo, Storage, key_for

__all__ = [
    "CONTENT_TYPES",
    "THUMBNAIL",
    "VIDEO",
    "ObjectInfo",
    "Storage",
    "check_storage_url",
    "key_for",
    "local_folder_problem",
    "local_storage_path",
    "open_storage",
]

_SCHEMES = "file:///absolute/dir, file://relative/dir, a plain directory path, or s3://bucket[/prefix]"
# What botocore takes as a bucket name (S3 itself is stricter; S3-compatible stores vary).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def check_storage_url(url: str) -> str:
    """The backend `url` names ("file" or "s3"), or ValueError saying what a storage URL looks like."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not url.partition(":")[2].removeprefix("//"):
            raise ValueError(f"storage URL {url!r} names no directory; expected {_SCHEMES}")
        return "file"
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket; expected {_SCHEMES}")
        # A `#` or `?` cut the prefix short without a word (s3://videos/run#2 stored under `run`, beside another
        # deployment's files, which its prune then listed), and a bucket of `user@host:port` was no bucket.
        if "?" in url or "#" in url:
            raise ValueError(f"storage URL {url!r} holds a ? or #, which an S3 prefix cannot; expected {_SCHEMES}")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(
                f"storage URL {url!r} names the bucket {parts.netloc!r}, which is no bucket name (letters, digits, "
                f"., - and _; the endpoint goes in WANSERVE_S3_ENDPOINT_URL); expected {_SCHEMES}"
            )
        return "s3"
    if not scheme and url:
        return "file"
    raise ValueError(f"unsupported storage URL {url!r}; expected {_SCHEMES}")


def open_storage(url: str) -> Storage:
    """The storage for `url`. The S3 endpoint (MinIO and others) comes from WANSERVE_S3_ENDPOINT_URL or
    AWS_ENDPOINT_URL, credentials from the standard AWS environment."""
    if check_storage_url(url) == "s3":
        parts = urlsplit(url)
        # Imported here so that local deployments never pay for importing boto3.
        from wanserve.storage.s3 import S3Storage

        # `a//b` is `a/b`: keys with empty parts are other objects than the same keys without.
        return S3Storage(parts.netloc, prefix="/".join(part for part in parts.path.split("/") if part))
    from wanserve.storage.local import LocalStorage

    folder = local_storage_path(url)
    assert folder is not None
    return LocalStorage(folder)


def local_storage_path(url: str) -> Path | None:
    """The folder a file storage URL names; None for S3. Everything after `file://` is the path, taken
    literally (not percent-decoded): Settings builds these URLs from raw paths, and `file://data/videos` is a
    relative directory, not a host."""
    if check_storage_url(url) != "file":
        return None
    return Path(url.partition(":")[2].removeprefix("//") if urlsplit(url).scheme else url)


def local_folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot hold results, without creating it: None when it is, or can be made, a folder this
    process may write in."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only filesystem"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} may not be written by this user"
    try:  # what the checks above cannot tell, as root above all: /proc, a FUSE mount that refuses writes
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} cannot hold files: {exc.strerror or exc}"
    return None
