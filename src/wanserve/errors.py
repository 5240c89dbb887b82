"""Typed errors, raised where a problem is detected and turned into an HTTP answer once, at the API edge."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")


class WanserveError(Exception):
    """Base of every error wanserve raises on purpose."""


class NotSupported(WanserveError):
    """An operation of an API wanserve speaks that it does not offer (the OpenAI SDK's `videos.remix`, say):
    a 400 that says so, rather than a 404 that reads as "your video is gone" or a 405. `field`: the parameter
    that asks for it, where one does (`variant=spritesheet`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


class InvalidRequest(WanserveError, ValueError):
    """A request field breaks a rule. `field` and `rule` are shown to the user, clipped: a rule quotes the
    value it refused, and a 27 MB value (or field name) must not come back as a 27 MB error."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = _clipped(field, 200)
        self.rule = _clipped(rule, 2000)
        super().__init__(f"{self.field}: {self.rule}")


class BadSetting(WanserveError, ValueError):
    """A setting that cannot work here. `setting` is its `Settings` key, so the command line can name the flag
    or the `WANSERVE_<KEY>` variable it came from; `rule` says why."""

    setting: str = ""

    def __init__(self, rule: str, setting: str | None = None) -> None:
        if setting is not None:
            self.setting = setting
        self.rule = rule
        super().__init__(f"{self.setting}: {rule}" if self.setting else rule)


class ModelNotFound(BadSetting, LookupError):
    """The model name is not a catalog name, alias, local directory or repo id."""

    setting = "model"


class ModelUnavailable(WanserveError, RuntimeError):
    """The model is known but its weights cannot be had (no network, no local copy)."""


class DeviceUnavailable(BadSetting, RuntimeError):
    """The configured device (`WANSERVE_DEVICE`, `--device`) does not exist on this machine."""

    setting = "device"


class Cancelled(WanserveError):
    """Generation stopped because cancellation was requested."""

    def __init__(self, step: int, total: int) -> None:
        self.step = step
        self.total = total
        super().__init__(f"cancelled before denoising step {step + 1}/{total}")


class JobNotFound(WanserveError, LookupError):
    """No such job. `field` names the request field that named it, when not the path (`after` of a list)."""

    def __init__(self, job_id: str, field: str | None = None, deleted: bool = False) -> None:
        self.job_id = job_id
        self.field = field
        # The store remembers a deleted job's id for a while (CURSOR_TTL_S): a download that comes after its
        # results expired is told so, not that the id was never known.
        self.deleted = deleted
        shown = _clipped(job_id, 100)  # an id is a few dozen characters: a 5,000-character one is not echoed
        what = (
            f"job {shown!r} no longer exists: it was deleted, or its results expired (WANSERVE_RESULT_TTL)"
            if deleted
            else f"no job with id {shown!r}"
        )
        super().__init__(f"{field}: {what}" if field else what)


class QueueFull(WanserveError):
    def __init__(self, model: str, limit: int, retry_after: int) -> None:
        self.model = model
        self.limit = limit
        self.retry_after = retry_after
        jobs = "1 job" if limit == 1 else f"{limit} jobs"
        super().__init__(f"the queue for {model} is full ({jobs} waiting); retry in {retry_after} s")


class StoreUnavailable(WanserveError, ConnectionError):
    """The job store cannot be reached (Redis down or restarting), after the backend's own retries. `public` is
    what an HTTP client is told: the full message, with addresses and keys, goes to the log."""

    public = "the job store cannot be reached"
    advice = "try again shortly"  # what a client should do: a create that may have been queued says otherwise
    # The store answered, and did nothing: "full" (Redis at maxmemory: deletes still go) or "read_only" (a
    # replica: nothing goes); "unasked" where nothing was sent (see `one_asks`); None where it may not have
    # answered (its answer lost: a change may have been made).
    refused: str | None = None


class StorageUnavailable(WanserveError, ConnectionError):
    """The result storage cannot be reached (an S3 endpoint down), after the backend's own retries."""

    public = "the result storage cannot be reached"


def public_reason(exc: BaseException) -> str:
    """What a job's client may read of a storage or disk error: neither the endpoint, the bucket nor a server
    path (boto3's upload errors name all three; the worker's log has the whole error). Unreachable: the
    backend's `public` text; a disk error: its errno text; an S3 refusal: its code; else the error's type."""
    public = getattr(exc, "public", None)
    if public:
        return str(public)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    for error in (exc, exc.__context__):
        code = getattr(error, "response", {}).get("Error", {}).get("Code") if error is not None else None
        if code:
            return f"{type(exc).__name__}: {code}"
    return type(exc).__name__


# Set for the calls an HTTP request makes (the API's middleware): during an outage they are told at once (see
# `one_asks`). A worker's calls ask as they always did: its end writes ride the client's retries into Redis's
# return, where a "not asked" would have left a finished video to be made again.
told_at_once: ContextVar[bool] = ContextVar("told_at_once", default=False)


class _Down:
    """A backend's last known outage, for `one_asks`: while it lasts, one request's call at a time asks the
    backend (its retries and timeouts take seconds) and the other requests' calls are told at once."""

    def __init__(self) -> None:
        self.error: WanserveError | None = None
        self.asking = threading.Lock()
        self.inside = threading.local()  # a public method called by another is part of that call

    @staticmethod
    def told(error: type[WanserveError], last: WanserveError) -> WanserveError:
        public = getattr(last, "public", str(last))
        unavailable = error(f"{public} (not asked: another call is finding out whether it answers again)")
        unavailable.public = public
        unavailable.refused = "unasked"
        return unavailable


def unavailable_on(
    causes: tuple[type[BaseException], ...],
    error: type[WanserveError],
    what: str,
    when: Callable[[BaseException], bool] = lambda _exc: True,
    state: Callable[[BaseException], str] = lambda _exc: "cannot be reached",
    refused: Callable[[BaseException], str | None] = lambda _exc: None,
    one_asks: bool = False,
    ungated: tuple[str, ...] = (),
) -> Callable[[type[T]], type[T]]:
    """Class decorator: every public method of a backend raises `error` when one of its client library's
    connection errors (`causes`, narrowed by `when`) gets through, so callers (the API's 503, a worker that waits
    it out) need not know which backend they hold. Other errors pass as they are: retrying cannot mend them.
    `state` words what is wrong for clients ("cannot be reached", "cannot be written: the disk is full");
    `refused` tells a backend that answered and did nothing ("full", "read_only") from one whose answer was lost
    (None).

    `one_asks`: once a call finds the backend not answering (None above), and until a call gets an answer, the
    calls HTTP requests make (`told_at_once`) ask it one at a time; the others raise `error` at once, `refused`
    "unasked". Each had waited out the client's retries (seconds), holding a thread: 200 clients polling through
    an outage held every thread the API has, and waited 45 s for their 503s. Other calls (a worker's) ask as
    before. `ungated`: methods that answer by other means (a probe's own client), never refused."""

    def translated(exc: BaseException) -> WanserveError:
        public = f"{what} {state(exc)}"
        unavailable = error(public if str(exc) in public else f"{public}: {exc}")
        unavailable.public = public  # for clients: no internal address or key
        unavailable.refused = refused(exc)
        return unavailable

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):  # its errors come while it is iterated, not at the call

            @functools.wraps(method)
            def iterate(*args: Any, **kwargs: Any) -> Any:
                try:
                    yield from method(*args, **kwargs)
                except causes as exc:
                    if not when(exc):
                        raise
                    raise translated(exc) from exc

            return iterate

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except causes as exc:
                if not when(exc):
                    raise
                raise translated(exc) from exc

        return call

    def gate(call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(call)
        def gated(backend: Any, *args: Any, **kwargs: Any) -> Any:
            down: _Down | None = vars(backend).get("_down")
            if down is None:
                down = vars(backend).setdefault("_down", _Down())
            if getattr(down.inside, "call", False):
                return call(backend, *args, **kwargs)
            last = down.error  # read once: the one asking may clear it meanwhile
            asking = last is not None and told_at_once.get()
            if asking and not down.asking.acquire(blocking=False):
                assert last is not None
                raise down.told(error, last)
            down.inside.call = True
            try:
                answer = call(backend, *args, **kwargs)
            except error as exc:
                down.error = exc if getattr(exc, "refused", None) is None else None  # refused: it answered
                raise
            except WanserveError:  # an answer of another kind (not found, a full queue): it answers
                down.error = None
                raise
            finally:
                down.inside.call = False
                if asking:
                    down.asking.release()
            down.error = None
            return answer

        return gated

    def decorate(cls: type[T]) -> type[T]:
        for name, member in list(vars(cls).items()):
            if callable(member) and not name.startswith("_"):
                wrapped = wrap(member)
                gates = one_asks and name not in ungated and not inspect.isgeneratorfunction(member)
                setattr(cls, name, gate(wrapped) if gates else wrapped)
        return cls

    return decorate


class LeaseLost(WanserveError):
    """The worker no longer holds the job: it was reaped, cancelled or handed to another worker."""


class ParallelGroupError(WanserveError, RuntimeError):
    """A rank of a multi-GPU group failed or a collective timed out: the whole group must stop."""
