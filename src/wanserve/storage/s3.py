"""Results in an S3 bucket (AWS, MinIO, Ceph, R2...): `<prefix>/<job_id>/video.mp4`. Credentials and region come
from the standard AWS environment and config files; the endpoint from `endpoint_url`, else the env vars below."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from wanserve.errors import BadSetting, StorageUnavailable, unavailable_on
from wanserve.storage.base import ENDPOINT_ENV_VARS, ObjectInfo

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# Answers that say the storage cannot serve now, or is set up wrong: not that this one request was wrong.
_UNAVAILABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
}


_BODILESS_REFUSALS = {"301", "400", "401", "403"}


def _cannot_serve(exc: BaseException) -> bool:
    """A 5xx (an S3 down, or a proxy in front of it: 502, 503), throttling, or credentials or a bucket that do
    not work: the API answers 503 storage_unavailable and the worker waits, instead of a 500."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__  # boto3 wraps the upload's own answer: judge that (a 4xx refuses this one object)
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = str(exc.response.get("Error", {}).get("Code"))
        # A per-object 403 (InvalidObjectState) is not. A HEAD's answer has no body, so its code is the bare
        # status: every HEAD (each download starts with one) is answered so while S3 refuses the credentials
        # (403), an expired token (400) or the region (301), which must read as the outage it is, not a 500.
        return status >= 500 or code in _UNAVAILABLE_CODES or code in _BODILESS_REFUSALS
    return True  # BotoCoreError (connection, timeout), and an upload that gave up without an answer


# Seconds a read (HEAD, GET, each chunk of a body) may wait for S3 to answer; two tries.
READ_TIMEOUT_S = 5


def endpoint_from_env() -> str | None:
    return next((os.environ[name] for name in ENDPOINT_ENV_VARS if os.environ.get(name)), None)


def _check_endpoint(endpoint: str) -> None:
    """botocore's "Invalid endpoint: x" names no variable, and was blamed on --storage: say which one is wrong."""
    name = next((n for n in ENDPOINT_ENV_VARS if os.environ.get(n) == endpoint), "the S3 endpoint")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise BadSetting(f"{name}: {endpoint!r} is not a URL ({exc})", "") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSetting(f"{name}: must be an http:// or https:// URL, such as http://minio:9000; got {endpoint!r}", "")


@unavailable_on(
    (BotoCoreError, ClientError, S3UploadFailedError), StorageUnavailable, "the result storage (S3)", when=_cannot_serve
)
class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or endpoint_from_env()
        if self.endpoint_url is not None:
            _check_endpoint(self.endpoint_url)
        self.client = client or self._make_client(region)
        # Reads (a download's HEAD and GET, an input image) answer in well under a second when S3 is up; a
        # client waiting on a download is told 503 in about 10 s of silence, not the 3 x 30 s an upload may
        # need. Each chunk of a long download may take as long again.
        self._reader = client or self._make_client(region, timeout=READ_TIMEOUT_S, attempts=2)
        # Health checks want a quick "no": one try, two seconds.
        self._probe = client or self._make_client(region, timeout=2, attempts=1)

    def _make_client(self, region: str | None, timeout: float = 30, attempts: int = 3) -> Any:
        config = Config(
            # MinIO and most self-hosted servers have no per-bucket DNS names.
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            # MinIO and newer AWS regions accept only SigV4, presigned URLs included.
            signature_version="s3v4",
            # An endpoint that stops answering (a black hole, not a refusal) must fail in seconds, not the
            # minutes of botocore's 60 s read timeout times its retries: downloads, /ready and the expiry
            # sweep would hang as long.
            connect_timeout=min(timeout, 5),
            read_timeout=timeout,
            # total_max_attempts counts the first request; max_attempts counts the retries after it.
            retries={"total_max_attempts": attempts, "mode": "standard"},
        )
        region = region or os.environ.get("AWS_REGION")  # boto3 itself only reads AWS_DEFAULT_REGION
        # A session per storage: boto3's default session is not safe to create clients from across threads.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=region, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path, content_type: str) -> None:
        # S3 replaces objects atomically: readers see the old object or the new one, never a mix.
        self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type})

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self._reader.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            self._missing_or_raise(error)
            return None
        return ObjectInfo(size=head["ContentLength"], content_type=head.get("ContentType", "application/octet-stream"))

    def open_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        if end < start:
            # S3 ignores a malformed Range and would send the whole object.
            return iter(())
        # Requested here rather than in the generator so a missing object raises at the call, before a
        # response has started.
        try:
            response = self._reader.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}")
        except ClientError as error:
            self._missing_or_raise(error)
            raise FileNotFoundError(key) from error
        return _stream(response["Body"], chunk_size)

    def _missing_or_raise(self, error: ClientError) -> None:
        """Return when `error` means the object is missing; a missing bucket answers the same 404, and is the
        storage set up wrong, not a result that expired."""
        if not _is_missing(error):
            raise error
        try:
            self._reader.head_bucket(Bucket=self.bucket)
        except ClientError as bucket_error:
            if _is_missing(bucket_error):
                raise StorageUnavailable(
                    f"the result storage (S3) cannot be reached: bucket {self.bucket!r} does not exist"
                ) from bucket_error
            raise

    def delete_prefix(self, prefix: str) -> None:
        prefix = prefix.strip("/")
        if not prefix:
            raise ValueError("refusing to delete every object: the prefix is empty")
        # The trailing slash keeps job "abc" from taking job "abcd"'s files with it. On the readers' client: a
        # listing and a delete of a few keys answer at once when S3 is up, and a DELETE /v1/videos (a request
        # thread, a client behind a 60 s balancer) was told 503 after the uploads' 3 x 30 s.
        pages = self._reader.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix) + "/"
        )
        for page in pages:
            # A page holds at most 1000 keys, which is also DeleteObjects' limit.
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not objects:
                continue
            result = self._reader.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
            if result.get("Errors"):
                first = result["Errors"][0]
                problem = f"S3 could not delete {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                if str(first.get("Code")) in _UNAVAILABLE_CODES:  # InternalError, SlowDown: try again later
                    raise StorageUnavailable(f"the result storage (S3) cannot be reached: {problem}")
                raise OSError(problem)

    def job_folders(self) -> Iterator[tuple[str, float]]:
        start = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
        # Keys come in order, so a folder's keys come together: one folder at a time is held, not the bucket.
        folder, newest = None, 0.0
        for page in pages:
            for item in page.get("Contents", []):
                name, slash, _rest = item["Key"][len(start) :].partition("/")
                if not slash:
                    continue  # an object at the top, not in a job's folder
                written = item["LastModified"].timestamp()
                if name != folder:
                    if folder is not None:
                        yield folder, newest
                    folder, newest = name, written
                else:
                    newest = max(newest, written)
        if folder is not None:
            yield folder, newest

    def presigned_url(
        self,
        key: str,
        expires: int = 3600,
        method: str = "GET",
        filename: str | None = None,
        disposition: str = "inline",
    ) -> str | None:
        operation = {"GET": "get_object", "HEAD": "head_object"}[method]
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        if filename is not None:  # else a browser saves every video as "video.mp4"
            params["ResponseContentDisposition"] = f'{disposition}; filename="{filename}"'
        return self.client.generate_presigned_url(operation, Params=params, ExpiresIn=expires)

    def ping(self) -> bool:
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError):
            return False
        return True

    def bucket_problem(self) -> str | None:
        """What is wrong with the bucket, said for a person (`wanserve doctor`), or None when it answers. An
        endpoint that does not answer raises, as every call does."""
        try:
            self._probe.head_bucket(Bucket=self.bucket)
        except ClientError as exc:  # the endpoint answered: a HEAD has no body, so the status says it
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if status == "404" or code in _MISSING_CODES:
                return BUCKET_MISSING
            if status == "403":
                return "the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the role)"
            return f"the endpoint answered {status} {code}".strip()
        return None


BUCKET_MISSING = "the bucket does not exist: create it (wanserve does not)"


def _is_missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _MISSING_CODES


def _stream(body: Any, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()  # a client that disconnects mid-download must not leak the pooled connection
