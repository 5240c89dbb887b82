"""Turning a request into a queued job: the one path every HTTP surface takes, so that validation, defaults,
seed drawing and queue limits are the same whichever API a client speaks.

Surfaces parse their own field names into a `GenerationRequest` with the helpers here, then call `submit`.
Everything is checked before the job is stored, so a job in the queue is always runnable.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

import anyio.to_thread
from starlette.requests import Request

from wanserve.catalog import ModelSpec, lookup
from wanserve.config import Settings
from wanserve.errors import InvalidRequest, JobNotFound, QueueFull, StoreUnavailable
from wanserve.inputs import store_request
from wanserve.jobs import QUEUE_FULL_RETRY_AFTER
from wanserve.jobs.model import Job, JobStatus, JobStore, new_job_id
from wanserve.metrics import Metrics
from wanserve.request import GenerationRequest, resolve
from wanserve.storage.base import Storage, put_bytes

log = logging.getLogger(__name__)

MIN_PRIORITY = -1000
MAX_PRIORITY = 1000

# Generation parameters every surface accepts under these names (vLLM-Omni's), besides its own fields.
INT_FIELDS = ("width", "height", "num_frames", "fps", "num_inference_steps", "seed")
FLOAT_FIELDS = ("guidance_scale", "guidance_scale_2", "boundary_ratio", "flow_shift")
EXTENSION_FIELDS = frozenset({"negative_prompt", "preset", *INT_FIELDS, *FLOAT_FIELDS})

# The multi-GPU layout is fixed when the workers start (their process groups are built then); a request that
# names one is refused rather than silently ignored, so nobody believes they changed it.
PARALLEL_FIELDS = frozenset(
    {
        "ulysses",
        "ulysses_size",
        "ulysses_degree",
        "ring",
        "ring_size",
        "ring_degree",
        "cfg_parallel",
        "cfg_parallel_size",
        "cfg_degree",
        "sp_size",
        "sp_degree",
        "tp_size",
        "tp_degree",
        "pp_size",
        "dp_size",
        "parallel",
        "parallel_config",
        "parallelism",
        "sequence_parallel_size",
        "tensor_parallel_size",
        "usp",
        "fsdp",
        "world_size",
        "num_gpus",
        # Wan generate.py's flags, as the replaced systems took them per request.
        "vae_parallel",
        "dit_fsdp",
        "t5_fsdp",
        "t5_cpu",
        "cfg_size",
    }
)


class UnknownField(InvalidRequest):
    code = "unknown_parameter"


class ModelNotServed(InvalidRequest):
    code = "model_not_found"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "payload_too_large"


def byte_size(count: int) -> str:
    """A size as a person reads it (`20 MiB`, `26.9 MiB`, `512 bytes`); where rounding hides the exact number,
    it follows, so that a limit is never read as more than it is."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            if count % scale == 0:
                return f"{count // scale} {unit}"
            return f"{count / scale:.1f} {unit} ({count:,} bytes)"
    return f"{count} bytes"


def image_too_large(field: str, limit: int, size: int) -> PayloadTooLarge:
    """One wording wherever an input image is found too large: its size, and the limit."""
    return PayloadTooLarge(field, f"the image is {byte_size(size)}; an input image may be at most {byte_size(limit)}")


class IdempotencyKeyReused(InvalidRequest):
    # 422 as draft-ietf-httpapi-idempotency-key-header asks for a key sent again with another payload.
    status_code = 422
    code = "idempotency_key_reused"


IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
_IDEMPOTENCY_KEY_TEXT = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what fits a header and a store key as is


def idempotency_key(headers: Any) -> str | None:
    """The request's `Idempotency-Key` (Stripe's and the IETF draft's header), or None when it sends none.
    `headers` is Starlette's `Headers`; a quoted value (the draft's structured-field string) is unquoted."""
    values = headers.getlist(IDEMPOTENCY_HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(IDEMPOTENCY_HEADER, "was sent more than once; send one key per request")
    key = values[0].strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key:
        raise InvalidRequest(IDEMPOTENCY_HEADER, "is empty; send a unique key per request, such as a UUID")
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        rule = f"must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters, got {len(key)}"
        raise InvalidRequest(IDEMPOTENCY_HEADER, rule)
    if not _IDEMPOTENCY_KEY_TEXT.fullmatch(key):
        raise InvalidRequest(IDEMPOTENCY_HEADER, "must be visible ASCII characters (no spaces), such as a UUID")
    return key


def request_fingerprint(request: GenerationRequest, model: str, priority: int, source: str) -> str:
    """What makes two creates the same one: the client's own values (before defaults and a drawn seed), the
    image by its digest."""
    # A number's type is not the request: 5 and 5.0, or a form's "5", run the same video.
    values = {
        name: int(value) if isinstance(value, float) and value.is_integer() else value
        for name, value in request.to_dict().items()
    }
    if request.image is not None:
        values["image"] = hashlib.sha256(bytes(request.image)).hexdigest()
    text = json.dumps({"model": model, "priority": priority, "source": source, **values}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# On an answer that is an Idempotency-Key's earlier job: a client (or its log) can tell a replay from a create.
REPLAYED = {"Idempotent-Replayed": "true"}


class Submitted(NamedTuple):
    job: Job
    replayed: bool  # an Idempotency-Key's earlier job, nothing new queued


def base_name(key: str) -> str:
    """`input_reference[image_url]` -> `input_reference`: how nested fields arrive in a multipart form."""
    return key.split("[", 1)[0]


def reject_parallel_layout(keys: Iterable[str]) -> None:
    for key in keys:
        if base_name(key).lower() in PARALLEL_FIELDS:
            raise InvalidRequest(base_name(key), "parallel layout is server configuration, fixed at start")


def check_fields(
    keys: Iterable[str], allowed: Iterable[str], ignored: Iterable[str] = (), nested: Iterable[str] = ()
) -> None:
    """Refuse the first field this surface does not know, so a typo (`num_frame`) is not silently dropped.
    Only the `nested` fields may arrive flattened (`input_reference[image_url]`): `num_frames[]` would
    otherwise pass as a known field and then be read by nobody."""
    allowed_set, ignored_set, nested_set = set(allowed), set(ignored), set(nested)
    for key in keys:
        name = base_name(key)
        if name not in allowed_set and name not in ignored_set:
            known = ", ".join(sorted(allowed_set | ignored_set))
            # (`[` or `[x]` alone has no name before its bracket: the key as sent, not an empty one.)
            raise UnknownField(name or key, f"is not a known field (known fields: {known})")
        if key != name and name not in nested_set:
            raise UnknownField(key, f"is not a known field: {name} takes a single value, sent as {name!r}")


def size_field_names(body: Mapping[str, Any], size_field: str) -> dict[str, str]:
    """How errors about the frame size name it on a surface that takes it as one field (`size: "832x480"`,
    `resolution: "832*480"`): the rules name `width`, `height` or `size`, which this client may not have sent."""
    if body.get(size_field) is None:
        return {"size": "width"}  # the size came as width and height, or as the model's default
    names = {"size": size_field}
    for axis in ("width", "height"):
        if body.get(axis) is None:  # an explicit width/height wins over the size field, and keeps its name
            names[axis] = size_field
    return names


# ASCII digits only, as `parse_size` takes them: int() and float() also read `1_0` and Arabic-Indic or
# full-width digits, which no client means as a number.
# A whole number, also written `9.0`, as JSON's 9.0 is taken (the OpenAI SDK sends extra_body floats so).
_INTEGER_TEXT = re.compile(r"\s*([+-]?\d+)(\.0*)?\s*", re.ASCII)
_NUMBER_TEXT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", re.ASCII)


def form_int(field: str, value: object) -> object:
    """Multipart values are strings; JSON values are left for `resolve` to judge, so the rules live there."""
    if not isinstance(value, str):
        return value
    match = _INTEGER_TEXT.fullmatch(value)
    if match is None:
        raise InvalidRequest(field, f"must be an integer, got {value!r}")
    try:
        return int(match[1])
    except ValueError:  # past Python's 4300-digit conversion limit: far past every field's range anyway
        raise InvalidRequest(field, f"must be an integer of at most 4300 digits, got {len(value.strip())}") from None


def form_float(field: str, value: object) -> object:
    if not isinstance(value, str):
        return value
    if not _NUMBER_TEXT.fullmatch(value):
        raise InvalidRequest(field, f"must be a finite number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):  # 1e999
        raise InvalidRequest(field, f"must be a finite number, got {value!r}")
    return number


def generation_values(body: Mapping[str, Any], from_form: bool) -> dict[str, Any]:
    """The extension fields present in `body` (nulls count as absent), as `GenerationRequest` keywords."""
    values: dict[str, Any] = {}
    for name in EXTENSION_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if from_form and name in INT_FIELDS:
            value = form_int(name, value)
        elif from_form and name in FLOAT_FIELDS:
            value = form_float(name, value)
        values[name] = value
    return values


def parse_priority(value: object) -> int:
    """A JSON number (a form's string is converted by its surface first, as for every integer field)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():  # 5.0, as every other integer field takes it
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest("priority", f"must be an integer, got {value!r}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidRequest("priority", f"must be between {MIN_PRIORITY} and {MAX_PRIORITY}, got {value}")
    return value


def optional_str(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string, got {value!r}")
    return value


def decode_data_url(value: object, field: str, max_bytes: int, uploads: bool = True) -> bytes:
    """The image inside a base64 `data:` URL. Remote URLs are refused: the API never reaches out to the
    network on a client's behalf (no SSRF, no hanging on slow hosts). `uploads`: whether the route also
    takes the image as a file, so that the refusal points only to what the route takes."""
    if not isinstance(value, str):
        raise InvalidRequest(field, "must be a data: URL string (data:image/png;base64,...)")
    text = value.strip()
    lowered = text[:16].lower()
    if lowered.startswith(("http://", "https://")):
        accepted = "data: URLs (data:image/png;base64,...)" + (" or file uploads" if uploads else "")
        raise InvalidRequest(field, f"only {accepted} are accepted; this server does not fetch http(s) URLs")
    if not lowered.startswith("data:"):
        raise InvalidRequest(field, "must be a data: URL (data:image/png;base64,...)")
    header, sep, payload = text[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise InvalidRequest(field, "must be a base64 data URL (data:image/png;base64,...)")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 2:  # refuse before decoding a huge string
        raise image_too_large(field, max_bytes, len(payload) // 4 * 3)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "the data: URL does not hold valid base64") from None
    if len(data) > max_bytes:
        raise image_too_large(field, max_bytes, len(data))
    if not data:
        raise InvalidRequest(field, "the data: URL holds no image")
    return data


def served_spec(specs: Mapping[str, ModelSpec], model: object, needs: frozenset[str] = frozenset()) -> ModelSpec:
    """The served spec a request names, by served name or by any catalog name/alias of a served model.

    Without a name, the first served model that can do the `needs` tasks (so an image goes to an
    image-to-video model when one is served), else the first served model, whose rules then explain the refusal.
    """
    if not specs:
        raise RuntimeError("no models are served")
    if model is None or model == "":
        for spec in specs.values():
            if needs <= spec.tasks:
                return spec
        return next(iter(specs.values()))
    if not isinstance(model, str):
        raise InvalidRequest("model", f"must be a string, got {model!r}")
    if model in specs:
        return specs[model]
    known = lookup(model)
    if known is not None and known.name in specs:
        return specs[known.name]
    # A served name, or an alias of a served model (a local copy of a catalog model answers to its name).
    wanted = model.strip().lower()
    for spec in specs.values():
        if wanted in {name.lower() for name in (spec.name, *spec.aliases)}:
            return spec
    raise ModelNotServed("model", f"{model!r} is not served here; served models: {', '.join(specs)}")


# Creates run on threads of their own: each may wait its turn to decode an image (two at a time, per process),
# and on Starlette's pool, which every route shares, forty such waits held every status read, cancel and
# delete behind them (a flood of image creates stalled status polls for 20 s). Here they wait on the event loop.
CREATE_THREADS = 8
T = TypeVar("T")


async def in_create_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=request.app.state.creates)


# Cancels and deletes, on threads of their own too: each waits out a store that refuses writes (up to 30 s on
# SQLite's write lock), and 45 of them held every thread of the shared pool, so that status reads, which SQLite
# answers during the lock, waited as long behind them.
CHANGE_THREADS = 8


async def in_change_thread(request: Request, fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=request.app.state.changes)


def submit(
    store: JobStore,
    storage: Storage,
    specs: Mapping[str, ModelSpec],
    settings: Settings,
    metrics: Metrics | None,
    request: GenerationRequest,
    model: str | None,
    priority: int,
    source: str,
    field_names: Mapping[str, str] | None = None,
    key: str | None = None,
) -> Submitted:
    """Validate `request` for its model, fill defaults, draw the seed, and enqueue it.

    `field_names` renames request fields in errors to what the surface calls them (the image is
    `input_reference` on /v1/videos, `image_url` elsewhere), so the client is told about its own field.
    With an idempotency `key`, the job an earlier create under that key made is the answer, if it was the
    same request; another request under a used key is refused.
    """
    spec = served_spec(specs, model, frozenset({"i2v"}) if request.image is not None else frozenset({"t2v"}))
    priority = parse_priority(priority)
    fingerprint = None if key is None else request_fingerprint(request, spec.name, priority, source)
    limit = settings.queue_limit
    full = request.image is not None and limit is not None and store.queue_depth(spec.name) >= limit
    if full and (key is None or not store.keyed(key)):
        # Refused before the image is decoded (up to seconds of CPU, on a pool every route shares) and stored (up
        # to 20 MiB, removed again); enqueue checks again, atomically. A create under a key whose job exists goes
        # on: it is the retry of one queued already, which a full queue must not refuse (a fresh key per
        # request made every create of a flood decode its image, only to be refused).
        raise QueueFull(spec.name, limit, QUEUE_FULL_RETRY_AFTER)
    try:
        resolved = resolve(request, spec, serving=settings.preset, step_cache=settings.step_cache_for(spec))
    except InvalidRequest as exc:
        if field_names and exc.field in field_names:
            raise InvalidRequest(field_names[exc.field], exc.rule) from None
        raise
    job_id = new_job_id()
    record = store_request(resolved, job_id, storage)  # an input image goes to the storage first
    new = Job(
        id=job_id,
        model=spec.name,
        request=record,
        priority=priority,
        source=source,
        idempotency_key=key,
        fingerprint=fingerprint,
    )
    try:
        job = store.enqueue(new, max_queued=settings.queue_limit)
    except StoreUnavailable as exc:
        if exc.refused:  # it answered, and queued nothing (full, a replica), or was not asked
            if "image_key" in record:
                _remove_input(storage, job_id)
            raise
        # The store may have queued it all the same (a reply lost to a timeout): its image stays, or the job would
        # fail for want of it. Not queued after all, the image is an orphan that `wanserve prune` finds. The client
        # is told so: "try again" alone made a second job of a create sent without a key.
        exc.advice = (
            "send it again with the same Idempotency-Key, which queues it once"
            if key is not None
            else "it may have been queued all the same: list the videos before sending it again "
            "(an Idempotency-Key makes a create safe to send again)"
        )
        raise
    except BaseException:
        if "image_key" in record:  # not queued (full, refused): its image is no one's
            _remove_input(storage, job_id)
        raise
    if job.id != job_id:  # the key's earlier job
        if "image_key" in record:
            _remove_input(storage, job_id)
        if job.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                IDEMPOTENCY_HEADER,
                f"{key!r} was used for another request (it created {job.id}); send a new key for a new request",
            )
        _restore_input(store, storage, job, resolved)
        return Submitted(job, replayed=True)
    if metrics is not None:
        metrics.job_submitted(spec.name)
    return Submitted(job, replayed=False)


def _restore_input(store: JobStore, storage: Storage, job: Job, resolved: GenerationRequest) -> None:
    """A replayed job still waiting for its input image gets it from the retry, which carries the same one: the
    first try's may have been removed when the store failed to answer it (by a release before this one)."""
    if resolved.image is None or "image_key" not in job.request or job.status.finished:
        return
    key = job.request["image_key"]
    if storage.stat(key) is not None:
        return
    put_bytes(storage, key, bytes(resolved.image))
    # A delete or cancel that went through since the job was read has removed its files already, and nothing
    # would remove this one (the record is gone, or ended): read again, and take it back out if so.
    try:
        now = store.get(job.id)
    except JobNotFound:
        now = None
    if now is None or now.status.finished or now.cancel_requested:
        _remove_input(storage, job.id)
        return
    log.warning("job %s: its input image was missing; the retry of its create put it back", job.id)


def queue_position(store: JobStore, job: Job) -> int | None:
    """The place of a job just read, if it is waiting; None if it is not, or is gone since it was read (a
    delete racing a list or a status call: the answer shows what was read, not a 404 for someone else's
    delete)."""
    if job.status != JobStatus.QUEUED:
        return None
    try:
        return store.queue_position(job.id)
    except JobNotFound:
        return None


def current(store: JobStore, job: Job) -> tuple[Job, int | None]:
    """The job as it is now, with its place if it waits: one read as queued that a worker claimed (or a client
    cancelled) before its place was asked is read again, so it never shows as "queued" with no place."""
    place = queue_position(store, job)
    if job.status == JobStatus.QUEUED and place is None:
        try:
            job = store.get(job.id)
        except JobNotFound:  # deleted meanwhile: what was read is the answer
            return job, None
        place = queue_position(store, job)  # handed back meanwhile: queued again, with a place
    return job, place


def cancel(
    store: JobStore,
    storage: Storage,
    settings: Settings,
    metrics: Metrics | None,
    job_id: str,
    remove_input: bool = True,
) -> Job:
    """Ask for a job's cancel (every surface's cancel and delete). A queued job ends here, so it is counted
    here, and its input image, the only file it has, goes now rather than when the job expires (submitting and
    cancelling over and over must not fill the storage), unless the caller removes the job's files itself
    (`remove_input=False`: delete); a running one is counted by the worker that stops it."""
    job, ended = store.request_cancel(job_id, settings.result_ttl)
    if ended:
        if metrics is not None:
            metrics.job_ended_unrun(job.model, "cancelled")
        if remove_input and "image_key" in job.request:
            _remove_input_soon(storage, job.id)
    return job


# Input images being removed after a cancel, at most: a storage that hangs holds each removal for its
# retries (a minute and more for S3), which a client's cancel should not wait for, nor pile up threads for.
_REMOVALS = threading.BoundedSemaphore(4)


def _remove_input_soon(storage: Storage, job_id: str) -> None:
    """Remove a cancelled job's input image on a thread of its own, the answer to the cancel not waiting for
    it; when too many removals are under way already, leave it to the job's expiry."""
    if not _REMOVALS.acquire(blocking=False):
        log.warning("job %s: its input image is removed when the job expires (the storage is slow to answer)", job_id)
        return

    def remove() -> None:
        try:
            _remove_input(storage, job_id)
        finally:
            _REMOVALS.release()

    threading.Thread(target=remove, name=f"remove-input-{job_id}", daemon=True).start()


def _remove_input(storage: Storage, job_id: str) -> None:
    """Best effort: what is left goes with the job's other files when it expires."""
    try:
        storage.delete_prefix(job_id)
    except Exception as exc:
        log.warning("job %s: its input image could not be removed now (it goes when the job expires): %s", job_id, exc)
