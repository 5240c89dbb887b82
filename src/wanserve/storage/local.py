"""Results as files under one directory: `<root>/<job_id>/video.mp4`. Good for one machine, or for API
replicas and workers that share a filesystem."""

from __future__ import annotations

import contextlib
import errno
import mimetypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from wanserve.disk import has_room
from wanserve.errors import StorageUnavailable
from wanserve.storage.base import CONTENT_TYPES, ObjectInfo

_COPY_CHUNK = 1 << 20
_DELETE_TRIES = 5


class LocalStorage:
    def __init__(self, root: Path) -> None:
        # Absolute now, so a later chdir in the process cannot move where results go.
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        """The file for `key`. Keys come from job ids, so guard against ones that would reach outside root."""
        pure = PurePosixPath(key)
        # `.` parts are normalised away, so `.` alone (which would be the root itself) shows as no parts.
        if not pure.parts or pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"storage key {key!r} must be a non-empty relative path without '..' parts")
        return self.root.joinpath(*pure.parts)

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        # content_type is not stored: stat derives it from the name, and result names are fixed (base.py).
        target = self._path(key)
        try:
            _write_atomically(target, Path(path))
        except OSError as exc:  # a full disk, a folder gone read-only or missing: it cannot take files now
            raise _unavailable(f"write {key}", "written", exc) from exc

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectInfo(size=size, content_type=_content_type(path.name))

    def open_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        # Opened here rather than in the generator so a missing file raises FileNotFoundError at the call,
        # before a response has started, as S3Storage does.
        file = self._path(key).open("rb")
        file.seek(start)
        return _read_span(file, end - start + 1, chunk_size)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        # A file written meanwhile (a worker storing the video the DELETE races: its temp file, then the
        # rename) makes rmtree's last rmdir fail "Directory not empty", a 500: removed again, it goes too.
        for attempt in range(_DELETE_TRIES):
            try:
                # Only a directory has anything "under" it; a file named like the prefix is not a job's files.
                if path.is_dir():
                    shutil.rmtree(path)
                return
            except FileNotFoundError:  # already gone, or removed concurrently
                return
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY or attempt == _DELETE_TRIES - 1:
                    raise _unavailable(f"remove {prefix}", "emptied", exc) from exc

    def job_folders(self) -> Iterator[tuple[str, float]]:
        try:
            folders = [entry for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:  # nothing stored yet
            return
        for folder in folders:
            try:
                times = [folder.stat(follow_symlinks=False).st_mtime]
            except FileNotFoundError:
                continue  # removed meanwhile: expiry, a DELETE, another prune
            for parent, _dirs, files in os.walk(folder.path):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                        times.append(os.stat(os.path.join(parent, name), follow_symlinks=False).st_mtime)
            yield folder.name, max(times)

    def presigned_url(
        self,
        key: str,
        expires: int = 3600,
        method: str = "GET",
        filename: str | None = None,
        disposition: str = "inline",
    ) -> str | None:
        return None

    def ping(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError:
            return False
        return has_room(self.root)  # a full disk still lets an empty file be made


def _unavailable(what: str, done: str, exc: OSError) -> StorageUnavailable:
    unavailable = StorageUnavailable(f"the result storage cannot {what}: {exc}")
    # Clients are told why (the disk is full), not where (a server path).
    unavailable.public = f"the result storage cannot be {done}: {exc.strerror or type(exc).__name__}"
    return unavailable


def _content_type(name: str) -> str:
    return CONTENT_TYPES.get(name) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _read_span(file: BinaryIO, remaining: int, chunk_size: int) -> Iterator[bytes]:
    with file:
        while remaining > 0:
            chunk = file.read(min(chunk_size, remaining))
            if not chunk:  # the file is shorter than asked (end past EOF)
                return
            remaining -= len(chunk)
            yield chunk


def _write_atomically(target: Path, source: Path) -> None:
    """Copy to a temp name in the target's folder, then rename over it: the rename is atomic, so a reader (or
    a re-run overwriting the key) never sees half a file."""
    made = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as dst, source.open("rb") as src:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
            dst.flush()
            os.fsync(dst.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; readers may run as another user
        os.replace(tmp, target)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _remove_if_empty(target.parent, made)
        raise


def _remove_if_empty(folder: Path, made: bool) -> None:
    """The folder a failed write made, removed again: a submit refused on a full disk left an empty job folder
    for an id no job has."""
    if made:
        with contextlib.suppress(OSError):  # not empty (another file came), or gone
            folder.rmdir()
