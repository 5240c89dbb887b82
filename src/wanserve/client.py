"""A small client of a running wanserve's `/v1/videos` routes, for `wanserve submit`. Torch-free: it runs on
any machine that can reach the API."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from wanserve.config import url_shown
from wanserve.errors import WanserveError

# Between two status calls when the server gives no `openai-poll-after-ms`.
DEFAULT_POLL_S = 1.0


class ApiError(WanserveError):
    """The server answered with an error (OpenAI's envelope): `param` names the request field at fault."""

    def __init__(
        self, status: int, message: str, code: str | None, param: str | None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


class Unreachable(WanserveError):
    """No answer from the server (refused, timed out, a proxy's non-JSON error page). `delivered`: the request
    may have reached it all the same (the connection was made), so a create may have been taken."""

    def __init__(self, message: str, delivered: bool = False) -> None:
        super().__init__(message)
        self.delivered = delivered


class NotAnApi(WanserveError):
    """Something answers at the URL, but not as a wanserve API does (`--url` names another server)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Client:
    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.key = key or None
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.url = url_shown(url.rstrip("/"))  # what messages name

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            delivered = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            raise Unreachable(f"{self.url} does not answer: {type(exc).__name__}: {exc}", delivered) from None
        if not response.is_success:
            raise self._failure(response)
        return response

    def _failure(self, response: httpx.Response) -> Exception:
        status = response.status_code
        try:
            error = response.json()["error"]
            message, code, param = str(error["message"]), error.get("code"), error.get("param")
        except (ValueError, KeyError, TypeError):
            if status >= 500:  # a proxy's page while the service restarts
                return Unreachable(f"{self.url} answered {status} {response.reason_phrase}", delivered=True)
            if response.is_redirect:  # http:// to https://, or another host: a wanserve answers where it is asked
                where = url_shown(response.headers.get("location", "nowhere"))
                return NotAnApi(
                    f"{self.url} redirects {response.request.method} {response.request.url.path} to {where} "
                    f"({status} {response.reason_phrase}): give the address it redirects to"
                )
            if status in (404, 405):  # no such route: a URL with a path, another server, not a refused request
                kind = response.headers.get("content-type", "no content type").split(";")[0]
                return NotAnApi(
                    f"{self.url} is not a wanserve API: {response.request.method} {response.request.url.path} "
                    f"answered {status} with {kind} (give the server's root, such as http://host:8088)"
                )
            message, code, param = f"{status} {response.reason_phrase}", None, None
        return ApiError(status, message, code, param, response.headers.get("retry-after"))

    def _video(self, response: httpx.Response) -> dict[str, Any]:
        """The video object a 2xx answer holds; anything else is some other server at that address (a catch-all
        page, a login proxy), said as such rather than a decoding error."""
        try:
            video = response.json()
        except ValueError:
            video = None
        if not isinstance(video, dict) or not isinstance(video.get("id"), str) or "status" not in video:
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise NotAnApi(
                f"{self.url} is not a wanserve API: {response.request.method} {response.request.url.path} "
                f"answered {response.status_code} with {kind}, not a video object"
            )
        return video

    def is_wanserve(self) -> bool:
        """Whether a wanserve answers here (its /health), asked with a short wait."""
        try:
            response = self.http.get("/health", timeout=5)
            return isinstance(response.json().get("status"), str)
        except (httpx.HTTPError, ValueError, AttributeError):
            return False

    def create(
        self, fields: Mapping[str, Any], image: tuple[str, bytes] | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Create a video: JSON, or a form with the image as `input_reference` (values as strings, as a form has).
        Sent again with the same idempotency `key`, it answers with the video the first call made."""
        headers = {"Idempotency-Key": key} if key else None
        try:
            if image is None:
                return self._video(self._call("POST", "/v1/videos", json=dict(fields), headers=headers))
            form = {name: str(value) for name, value in fields.items()}
            files = {"input_reference": image}
            return self._video(self._call("POST", "/v1/videos", data=form, files=files, headers=headers))
        except ApiError as exc:
            if exc.status not in (404, 405):
                raise
            # A create names no job: a JSON "no such route" is a URL with a path too many (`/v1/videos`, `/v1/v1`).
            raise NotAnApi(
                f"{self.url} has no route POST /v1/videos ({exc.status}: {exc.message}): give the server's root, "
                "such as http://host:8088"
            ) from None

    def retrieve(self, video_id: str) -> tuple[dict[str, Any], float]:
        """The video object, and how long to wait before asking again."""
        response = self._call("GET", f"/v1/videos/{video_id}")
        after = response.headers.get("openai-poll-after-ms")
        return self._video(response), int(after) / 1000 if after and after.isdigit() else DEFAULT_POLL_S

    def cancel(self, video_id: str) -> dict[str, Any]:
        return self._video(self._call("POST", f"/v1/videos/{video_id}/cancel"))

    def download(self, video_id: str, out: Path, variant: str = "video") -> None:
        """The MP4 (or the `thumbnail`) into `out`, whole or not at all: written beside it, then renamed."""
        path = f"/v1/videos/{video_id}/content?variant={variant}"
        try:
            with self.http.stream("GET", path, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    if response.history:  # the bucket's answer, not this server's: no API, no --url at fault
                        where = url_shown(str(response.url.copy_with(query=None)))
                        raise ApiError(
                            response.status_code,
                            f"{where} answered {response.status_code} {response.reason_phrase}",
                            None,
                            None,
                        )
                    raise self._failure(response)
                fd, part = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as file:
                        for chunk in response.iter_bytes():
                            file.write(chunk)
                    os.chmod(part, 0o666 & ~_umask())  # as any file the user makes (mkstemp's is 0600)
                    os.replace(part, out)
                except BaseException:
                    Path(part).unlink(missing_ok=True)
                    raise
        except httpx.HTTPError as exc:
            raise Unreachable(f"{self.url} stopped answering during the download: {exc}") from None
