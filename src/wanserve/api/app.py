"""The HTTP API: every surface over one store and one storage. Torch-free, so API replicas start in a
second and never touch a GPU.

Typed errors are raised where a problem is found and turned into an answer here, once: OpenAI's error
envelope under `/v1/`, RFC 9457 problem details everywhere else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wanserve.catalog import ModelSpec
from wanserve.config import Settings
from wanserve.errors import (
    InvalidRequest,
    JobNotFound,
    NotSupported,
    QueueFull,
    StorageUnavailable,
    StoreUnavailable,
    told_at_once,
)
from wanserve.jobs.model import JobStore
from wanserve.metrics import Metrics
from wanserve.storage.base import Storage

from . import events, legacy, openai_videos, ops, page, submit
from .auth import Unauthorized, require_key
from .web import JSON_ANSWER_HEADERS, BodyLimitMiddleware, SafeHeadersMiddleware, body_limit

log = logging.getLogger(__name__)

_OPENAI_TYPES: Mapping[int, str] = MappingProxyType(
    {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
)
_VALIDATION_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": field, "code": code}}
        return JSONResponse(body, status_code=status, headers=dict(headers or {}))
    problem: dict[str, Any] = {
        "type": f"urn:wanserve:problem:{code}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": message,
        "code": code,
    }
    if field is not None:
        problem["field"] = field
    if request.url.path.startswith("/video/"):
        # The system these routes come from answered {"error", "message"}, and its clients read those two.
        problem["error"], problem["message"] = code, message
    return JSONResponse(problem, status_code=status, headers=dict(headers or {}), media_type="application/problem+json")


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] in _VALIDATION_LOCATIONS and len(parts) > 1:
        parts = parts[1:]
    return ".".join(str(p) for p in parts)


def _allowed_methods(request: Request, allow: str) -> str:
    """Starlette's 405 names the methods of the first route whose path matched; the path may have others,
    on routes of their own (GET and DELETE of `/v1/videos/{id}`, the HEAD twins kept out of the OpenAPI
    description). RFC 9110 wants them all."""
    methods = {m.strip() for m in allow.split(",") if m.strip()}
    path = request.url.path
    for pattern, served in getattr(request.app.state, "route_methods", ()):
        if pattern.match(path):
            methods |= served
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InvalidRequest)
        status = getattr(exc, "status_code", 400)
        code = getattr(exc, "code", "invalid_value")
        return error_response(request, status, code, str(exc), field=exc.field)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = list(exc.errors())
        field = _field_path(errors[0]["loc"]) if errors else None
        message = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return error_response(request, 422, "invalid_value", message, field=field)

    async def not_supported(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, NotSupported)
        return error_response(request, 400, "unsupported_operation", str(exc), field=exc.field)

    async def job_not_found(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobNotFound)
        return error_response(request, 404, "not_found", str(exc), field=exc.field)

    async def queue_full(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueFull)
        headers = {"Retry-After": str(max(int(exc.retry_after), 1))}
        return error_response(request, 429, "queue_full", str(exc), headers=headers)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = HTTPStatus(exc.status_code).name.lower()
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers or {})
        path, bare = request.url.path, request.url.path.rstrip("/")
        if exc.status_code == 404 and detail == "Not Found" and bare and bare != path and _routed(request, bare):
            detail = f"no route {path}: without the trailing slash, {bare}"
        if exc.status_code == 405 and "Allow" in headers:
            headers["Allow"] = _allowed_methods(request, headers["Allow"])
            if detail == "Method Not Allowed":  # said in the body too: a client shows the message, not the headers
                detail = f"{request.method} is not allowed here: this route takes {headers['Allow']}"
        return error_response(request, exc.status_code, code, detail, headers=headers)

    async def backend_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        code = "store_unavailable" if isinstance(exc, StoreUnavailable) else "storage_unavailable"
        message = f"{getattr(exc, 'public', code)}; {getattr(exc, 'advice', 'try again shortly')}"
        return error_response(request, 503, code, message, headers={"Retry-After": "5"})

    async def unauthorized(request: Request, exc: Exception) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"}
        return error_response(request, 401, "invalid_api_key", str(exc), headers=headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        # Starlette answers this one outside every middleware: SafeHeadersMiddleware's headers are set here.
        return error_response(request, 500, "internal_error", "internal server error", headers=JSON_ANSWER_HEADERS)

    app.add_exception_handler(InvalidRequest, invalid_request)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(JobNotFound, job_not_found)
    app.add_exception_handler(NotSupported, not_supported)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(StoreUnavailable, backend_unavailable)
    app.add_exception_handler(StorageUnavailable, backend_unavailable)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(Exception, unexpected)


# Methods labelled by name in the metrics; the HTTP parser takes any token, which would grow a series per verb.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMetricsMiddleware:
    """Times each request into `wanserve_http_request_duration_seconds`, labelled by the route template
    (`/v1/videos/{video_id}`), never the raw path, so ids do not explode the label set; event streams aside."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        stream = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, stream
            if message["type"] == "http.response.start":
                status = message["status"]
                stream = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"]
                )
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # An event stream lasts as long as its job: its duration says nothing of the API's speed.
            if not stream:
                method = scope["method"] if scope["method"] in _METHODS else "other"
                template = _route_label(scope)
                self.metrics.http_request(method, template, status, time.perf_counter() - started)


class ToldAtOnceMiddleware:
    """The store calls an HTTP request makes (in its threads too: they copy its context) are told at once while
    another finds out whether a down store answers again (`errors.told_at_once`): a client polling through an
    outage gets its 503 now, not after the store client's retries."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # the lifespan's tasks, and what they start, are no client's
            await self.app(scope, receive, send)
            return
        token = told_at_once.set(True)
        try:
            await self.app(scope, receive, send)
        finally:
            told_at_once.reset(token)


# What a browser says of a request another site's page made it send (Sec-Fetch-Site, in every browser since
# 2023). Such a page can send a form or a "simple" POST without asking (no CORS preflight): with no API key
# set, it would queue jobs on the user's GPU. The server's own page sends `same-origin`; curl and the SDKs none.
_OTHER_SITES = frozenset({b"cross-site", b"same-site"})
_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class CrossSiteMiddleware:
    """Refuses (403) a request that changes something when the browser says another site's page sent it: by
    Sec-Fetch-Site, or, where the browser sends none (plain http to a host name or a LAN address: browsers send
    fetch metadata only to https and localhost), by an `Origin` that is not this server's own. A browser sends
    `Origin` with every POST, the server's own page's included; curl and the SDKs send neither."""

    def __init__(self, app: ASGIApp, public_url: str | None = None) -> None:
        self.app = app
        self.public = _host_port(public_url) if public_url else None

    def _own_origin(self, origin: bytes, headers: dict[bytes, bytes]) -> bool:
        text = origin.decode("latin-1").strip()
        if text.lower() == "null":  # a sandboxed frame, a data: URL, a redirect across sites
            return False
        mine = _host_port(text)
        if mine is None:
            return False
        # The Host the browser used, or a proxy's note of it; a page cannot set X-Forwarded-Host on a request it
        # sends without a CORS preflight, which this server never grants.
        scheme = text.partition(":")[0].lower()
        for value in (headers.get(b"host"), headers.get(b"x-forwarded-host")):
            if value and _host_port(f"{scheme}://{value.decode('latin-1').split(',')[0].strip()}") == mine:
                return True
        return mine == self.public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _CHANGES:
            headers = dict(scope.get("headers") or [])
            site = headers.get(b"sec-fetch-site", b"").strip().lower()
            origin = headers.get(b"origin")
            if site in _OTHER_SITES or (not site and origin is not None and not self._own_origin(origin, headers)):
                # Refused before routing: the metrics label it by the route it was for, not as "unmatched".
                route = _route_of(scope["app"].router.routes, scope)
                if route is not None:
                    scope["route"] = route
                response = error_response(
                    Request(scope),
                    403,
                    "cross_site_request",
                    "a page of another site sent this request through the browser: refused, so that no web page "
                    "can queue, cancel or delete videos here; call the API from a program, or from this server's "
                    "own page",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_of(routes: Any, scope: Scope) -> Any:
    """The route that takes this request, looked up before routing. FastAPI nests the routes of an included
    router (prefix "") in one route of its own, which matches for them all and names no template."""
    for route in routes:
        if route.matches(scope)[0] != Match.FULL:
            continue
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        return _route_of(inner, scope) if inner is not None else route
    return None


def _routed(request: Request, path: str) -> bool:
    """Whether a route of the app takes `path` (for any method)."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


def _host_port(url: str) -> str | None:
    """`host:port` of an http(s) URL, the scheme's default port written out, lower case; None for no such URL."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:  # a port that is no number
        return None
    return f"{parts.hostname.lower()}:{port}" if parts.hostname else None


def _route_label(scope: Scope) -> str:
    """The route template of a routed request; "unmatched" only for a path no route takes (a 404). FastAPI's
    own routes name their template; the static files' mount and FastAPI's documentation routes (fixed paths)
    set no `route`, but an `endpoint`."""
    template = getattr(scope.get("route"), "path", None)
    if template:
        return str(template)
    if "endpoint" not in scope:
        return "unmatched"
    path = str(scope.get("path", ""))
    return "/static/{path}" if path.startswith("/static/") else path


def create_app(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    specs: dict[str, ModelSpec],
    metrics: Metrics | None = None,
    readiness: Callable[[], dict] | None = None,
) -> FastAPI:
    if not specs:
        raise ValueError("create_app needs at least one served model")
    if metrics is None:
        # Callers that pass their own Metrics have already pointed it at the store (see roles.py).
        metrics = Metrics(list(specs))
        metrics.watch_store(store, list(specs))

    app = FastAPI(
        title="wanserve",
        version="0.1.0",
        description="Wan video generation: durable jobs over HTTP.",
        # Starlette's redirect of `/v1/videos/` was built from the Host header the client sent (a 307, body
        # kept, to any host); the 404 names the path without the slash instead.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.storage = storage
    app.state.specs = specs
    app.state.metrics = metrics
    # Set when the server stops, so that open event streams end instead of holding its shutdown.
    app.state.closing = threading.Event()
    app.state.stream_reads = anyio.CapacityLimiter(events.STREAM_READ_THREADS)
    app.state.creates = anyio.CapacityLimiter(submit.CREATE_THREADS)
    app.state.changes = anyio.CapacityLimiter(submit.CHANGE_THREADS)

    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=body_limit(settings), image_limit=settings.max_upload_bytes)
    app.add_middleware(CrossSiteMiddleware, public_url=settings.public_url)
    app.add_middleware(SafeHeadersMiddleware)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_middleware(ToldAtOnceMiddleware)
    keyed = [Depends(require_key(settings))] if settings.api_keys else []
    routers = [
        (openai_videos.router(settings, store, storage, specs, metrics), keyed),
        (legacy.router(settings, store, storage, specs, metrics), keyed),
        (ops.router(settings, store, storage, specs, metrics, readiness, keyed), []),
    ]
    for router, dependencies in routers:
        app.include_router(router, dependencies=dependencies)
    if settings.web:
        page.install(app, settings)
    # Every route's path and methods, for the 405 answer's Allow header (see _allowed_methods): included
    # routers' routes are not listed one by one in `app.routes`.
    routes = [*(route for router, _ in routers for route in router.routes), *app.router.routes]
    app.state.route_methods = tuple(
        (route.path_regex, frozenset(route.methods or ())) for route in routes if isinstance(route, Route)
    )
    return app
