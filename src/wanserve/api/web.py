"""HTTP plumbing shared by the surfaces: bounded body reading, links handed to clients, and byte-range
downloads straight from `Storage`."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanserve.config import Settings
from wanserve.errors import InvalidRequest
from wanserve.storage.base import Storage

from .submit import PayloadTooLarge, UnknownField, byte_size

# Room for the JSON or multipart framing around an image at the upload limit, and base64's 4/3 growth.
_FRAMING_BYTES = 256 * 1024


def body_limit(settings: Settings) -> int:
    return settings.max_upload_bytes * 4 // 3 + _FRAMING_BYTES


def _too_large(limit: int, image_limit: int | None = None, declared: int | None = None) -> PayloadTooLarge:
    """`declared`: the body's Content-Length, where it was sent (else it is known to be past `limit` only)."""
    size = byte_size(declared) if declared is not None else f"more than {byte_size(limit)}"
    if image_limit is not None:  # a form's bulk is its file: say so, with the limit that applies to it
        return PayloadTooLarge(
            "input_reference", f"the form is {size}; an input image may be at most {byte_size(image_limit)}"
        )
    return PayloadTooLarge("body", f"the request body is {size}; at most {byte_size(limit)} is taken")


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route's endpoint and its dependencies take (FastAPI's `Dependant` tree)."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def known_query(request: Request) -> None:
    """A router dependency: refuse a query parameter the matched route does not take, or one given twice, as a
    body's fields are. `?limt=5` answered the default page of 20, and `?limit=1&limit=2` the last one."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = sorted(_query_names(dependant))
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name not in known:
            takes = f"known parameters: {', '.join(known)}" if known else "this route takes no query parameters"
            raise UnknownField(name, f"is not a known query parameter ({takes})")
        if name in seen:
            raise InvalidRequest(name, "is given more than once; give it once")
        seen.add(name)


class UnsupportedEncoding(InvalidRequest):
    status_code = 415
    code = "unsupported_media_type"


class BodyLimitMiddleware:
    """Caps request bodies while they stream in, chunked ones included, before anything is spooled; and
    refuses a compressed body, which every parser would read as garbage (a JSON error about byte 0x8b).

    The error is raised from `receive`, that is inside the endpoint reading the body, so the app's
    exception handlers answer it in the surface's envelope like any other error.
    """

    def __init__(self, app: ASGIApp, limit: int, image_limit: int | None = None) -> None:
        self.app = app
        self.limit = limit
        self.image_limit = image_limit  # a multipart body too large is its image: the error names it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip()
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        image_limit = self.image_limit if multipart else None
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit, image_limit, int(declared))
            message = await receive()
            if message["type"] == "http.request" and message.get("body") and encoding.lower() not in ("", "identity"):
                raise UnsupportedEncoding("content-encoding", f"{encoding!r} is not taken: send the body uncompressed")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, image_limit)
            return message

        await self.app(scope, limited_receive, send)


# What SafeHeadersMiddleware gives a JSON answer; the 500 handler, which Starlette runs outside every
# middleware, sets the same.
JSON_ANSWER_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


class SafeHeadersMiddleware:
    """`X-Content-Type-Options: nosniff` on every answer, and `Cache-Control: no-store` on JSON ones: a job's
    status changes from one second to the next, and a shared cache must not hand one client's answer (with
    links built for its Host) to another."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                json_answer = b"json" in dict(headers).get(b"content-type", b"")
                for name, value in JSON_ANSWER_HEADERS.items():
                    if name == "x-content-type-options" or (json_answer and name.encode() not in names):
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# More values than any request has (prompts of commas included): a body of millions of empty arrays would
# take seconds and hundreds of MB to parse, for nothing.
MAX_JSON_VALUES = 200_000


_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object. Parsed off the event loop: a large body takes long enough to parse that
    every other request, /health included, would wait for it."""
    raw = await request.body()
    try:
        return await run_in_threadpool(parse_json_object, raw)
    except InvalidRequest as exc:
        form = request.headers.get("content-type", "").lower().startswith(_FORM_TYPES)
        # curl -F and -d send forms; a JSON text sent as a form (curl -d '{...}') still parses, and is taken.
        if exc.field == "body" and form:
            raise InvalidRequest(
                "body", "must be a JSON object, sent with Content-Type: application/json; this route takes no form"
            ) from None
        raise


def parse_json_object(raw: bytes) -> dict[str, Any]:
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > MAX_JSON_VALUES:
        raise InvalidRequest("body", f"holds too many values (more than {MAX_JSON_VALUES:,})")
    try:
        data = json.loads(raw or b"null", object_pairs_hook=_mark_repeats)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("body", f"must be a JSON object: {exc}") from None
    except RecursionError:
        raise InvalidRequest("body", "nests arrays or objects too deeply") from None
    except ValueError as exc:  # an integer longer than Python's 4300-digit conversion limit
        raise InvalidRequest("body", f"must be a JSON object: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body", "must be a JSON object")
    _reject_lone_surrogates(data)
    _refuse_repeats(data)
    return data


class _Repeated(dict[str, Any]):
    """An object that gave a key twice. Judged once parsing is done: the hook sees an inner object before the
    key that holds it, and the error must name the whole path (`input_reference.image_url`)."""

    repeated: str


def _mark_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of a key given twice without a word: which did the client mean?
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                marked = _Repeated(data)
                marked.repeated = key
                return marked
            seen.add(key)
    return data


def _refuse_repeats(data: dict[str, Any]) -> None:
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]  # without recursion, as the body may nest deeply
    while stack:
        path, item = stack.pop()
        if isinstance(item, _Repeated):
            raise InvalidRequest(".".join((*path, item.repeated)), "is given more than once; give it once")
        if isinstance(item, dict):
            stack.extend(((*path, key), value) for key, value in item.items())
        elif isinstance(item, list):
            stack.extend((path, value) for value in item)


def _reject_lone_surrogates(data: dict[str, Any]) -> None:
    """JSON may escape half of a UTF-16 pair ("\\ud800"), which no UTF-8 text can hold: such a prompt could be
    queued but never written back out. Checked without recursion, as the body may nest deeply."""
    for field, value in data.items():
        stack: list[Any] = [field, value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    # The name goes back in the error: escaped, or the error itself could not be sent.
                    name = field.encode("utf-8", "backslashreplace").decode("utf-8")
                    raise InvalidRequest(name, "must be valid Unicode text: it holds a lone UTF-16 surrogate") from None
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)


def public_base(request: Request, settings: Settings) -> str:
    """Base of the absolute links given to clients: the configured public URL behind a proxy, else the
    address the client used."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


class RangeNotSatisfiable(Exception):
    pass


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
# Past every file's size; a position longer than this is read as it, never through int() (4300-digit limit).
_FAR = 10**19


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else _FAR


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single `Range: bytes=` header, or None to send the whole file.

    Malformed and multi-range headers are ignored (RFC 9110 §14.2 allows it) rather than refused:
    players retry without Range less gracefully than they accept a 200.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        length = _position(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - length, 0), size - 1
    start = _position(first)
    if last and _position(last) < start:
        return None  # syntactically invalid: ignored, like a malformed header
    if start >= size:
        raise RangeNotSatisfiable
    end = _position(last) if last else size - 1
    return start, min(end, size - 1)


def _etags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


def content_response(
    request: Request,
    storage: Storage,
    settings: Settings,
    key: str,
    content_type: str,
    filename: str,
    disposition: str = "inline",
) -> Response:
    """The stored object, whole or in part, to be shown (`inline`) or saved (`attachment`) as `filename`. Missing
    objects (expired, deleted) raise FileNotFoundError."""
    info = storage.stat(key)
    if info is None:
        raise FileNotFoundError(key)
    if settings.storage_redirect:
        # After the stat: a missing object is this API's 404 and a bucket that is down its 503, not S3's XML or
        # a link to nowhere. HEAD goes to the bucket too, so that it gives the same ETag as the GET.
        url = storage.presigned_url(key, method=request.method, filename=filename, disposition=disposition)
        if url:
            return RedirectResponse(url, status_code=302)
    size = info.size
    # A job's files are written once (a re-run writes the same bytes): key and size identify them.
    etag = '"' + hashlib.sha256(f"{key}\0{size}".encode()).hexdigest()[:32] + '"'
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'{disposition}; filename="{filename}"',
        "ETag": etag,
    }
    if _etags(request.headers.get("if-none-match")) & {etag, "*"}:
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # RFC 9110 §13.1.5: the client's copy is another one, so it gets the whole file
    try:
        span = byte_range(range_header, size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    status = 200
    start, end = 0, size - 1
    if span is not None:
        start, end = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD" or size == 0:
        return Response(status_code=status, headers=headers, media_type=content_type)
    return StreamingResponse(
        storage.open_range(key, start, end), status_code=status, headers=headers, media_type=content_type
    )
