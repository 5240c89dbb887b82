"""OpenAI's Videos API (`/v1/videos`), shaped so the official `openai` SDK works against it unchanged.

The SDK always posts multipart (even without a file), sending `extra_body` values as strings and flattening
`input_reference: {"image_url": ...}` into a form field `input_reference[image_url]` (3.x takes that dict only
in `extra_body`). Plain JSON bodies are accepted too. Wan's own parameters ride along under vLLM-Omni's names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_to_bytes

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from wanserve.catalog import ModelSpec
from wanserve.config import Settings
from wanserve.errors import InvalidRequest, JobNotFound, NotSupported, StoreUnavailable
from wanserve.jobs.model import Job, JobStatus, JobStore
from wanserve.metrics import Metrics
from wanserve.request import MAX_FPS, GenerationRequest, parse_size
from wanserve.storage.base import CONTENT_TYPES, THUMBNAIL, VIDEO, Storage, key_for

from . import events, status_words
from .schemas import VideoCreate, idempotent, json_or_form_body
from .submit import (
    EXTENSION_FIELDS,
    REPLAYED,
    UnknownField,
    base_name,
    cancel,
    check_fields,
    current,
    decode_data_url,
    form_float,
    form_int,
    generation_values,
    idempotency_key,
    image_too_large,
    in_change_thread,
    in_create_thread,
    optional_str,
    reject_parallel_layout,
    served_spec,
    size_field_names,
    submit,
)
from .web import body_limit, content_response, known_query, read_json_object

OPENAI_FIELDS = frozenset({"prompt", "model", "seconds", "size", "input_reference"})
GENERATION_SETTINGS = (
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "boundary_ratio",
    "flow_shift",
)
ALLOWED_FIELDS = OPENAI_FIELDS | EXTENSION_FIELDS | {"priority"}
# OpenAI parameters that do not apply to a self-hosted model; accepted and dropped so stock clients work.
IGNORED_FIELDS = frozenset({"user"})
MAX_SECONDS = 600.0

# How soon the SDK's create_and_poll should ask again: waiting jobs change slowly, running ones report often.
POLL_AFTER_MS: Mapping[JobStatus, int] = MappingProxyType({JobStatus.QUEUED: 1000, JobStatus.IN_PROGRESS: 500})

VARIANTS: Mapping[str, str] = MappingProxyType({"video": VIDEO, "thumbnail": THUMBNAIL})
# Far more than a create has (about 30 names): a form past it is refused before it is parsed.
MAX_FORM_FIELDS = 200


def seconds_to_frames(seconds: object, fps: int, spec: ModelSpec) -> int:
    """The nearest valid frame count (stride·k + 1) to `seconds` of video at `fps`, capped by the model."""
    try:
        if isinstance(seconds, bool):  # a number to Python (True is 1), not to a client
            raise TypeError
        # OpenAI sends a string ("4"); ASCII digits, as every number a form carries.
        value = float(form_float("seconds", seconds)) if isinstance(seconds, str) else float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, InvalidRequest):
        raise InvalidRequest("seconds", f'must be a number of seconds such as "4", got {seconds!r}') from None
    if not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise InvalidRequest("seconds", f"must be more than 0 and at most {MAX_SECONDS:g}, got {seconds!r}")
    stride = spec.temporal_stride
    k = max(round((value * fps - 1) / stride), 0)
    longest = (spec.frame_limit - 1) // stride
    return min(k, longest) * stride + 1


def format_seconds(value: float) -> str:
    return f"{round(value, 2):g}"


def video_object(job: Job, queue_position: int | None) -> dict[str, Any]:
    request, result = job.request, job.result or {}
    width = result.get("width", request.get("width"))
    height = result.get("height", request.get("height"))
    num_frames = result.get("num_frames", request.get("num_frames"))
    fps = result.get("fps", request.get("fps"))
    seconds = result.get("seconds")
    if seconds is None and num_frames and fps:
        seconds = num_frames / fps
    progress = 100 if job.status == JobStatus.COMPLETED else min(max(int(job.progress * 100), 0), 99)
    return {
        "id": job.id,
        "object": "video",
        "created_at": int(job.created_at),
        "completed_at": int(job.completed_at) if job.completed_at is not None else None,
        "expires_at": int(job.expires_at) if job.expires_at is not None else None,
        "status": status_words.OPENAI[job.status],
        "progress": progress,
        "model": job.model,
        "seconds": format_seconds(seconds) if seconds is not None else "0",
        "size": f"{width}x{height}",
        "prompt": request.get("prompt"),
        "error": status_words.job_error(job),
        "remixed_from_video_id": None,
        "queue_position": queue_position,
        "seed": result.get("seed", request.get("seed")),
        "num_frames": num_frames,
        "fps": fps,
        # The settings it runs with, the model's defaults resolved at submit: with the seed, what makes the video
        # again (a client that left them out could not tell them from the answer).
        **{name: request.get(name) for name in GENERATION_SETTINGS},
        "stage": job.stage,
        # A running job's cancel takes effect at its next step: until then it shows, so a client (the page's
        # Cancel button) can tell a cancel under way from one not taken.
        "cancel_requested": job.cancel_requested and not job.status.finished,
        "timings": result.get("timings"),
        # What served it once done; before, what the request asked for (null: the workers' own preset).
        "preset": result.get("preset", request.get("preset")),
        "accelerations": result.get("accelerations"),
        "step_cache": result.get("step_cache"),
    }


def poll_headers(job: Job) -> dict[str, str]:
    after = POLL_AFTER_MS.get(job.status)
    return {"openai-poll-after-ms": str(after)} if after is not None else {}


def _within_upload_limit(data: bytes, settings: Settings, size: int | None = None) -> bytes:
    """`size`: the whole file's, where known (`data` stops one byte past the limit)."""
    if len(data) > settings.max_upload_bytes:
        raise image_too_large("input_reference", settings.max_upload_bytes, size or len(data))
    return data


async def _read_upload(upload: UploadFile, settings: Settings) -> bytes:
    return _within_upload_limit(await upload.read(settings.max_upload_bytes + 1), settings, upload.size)


async def read_create_body(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes | None, bool]:
    """(fields, uploaded image bytes, whether the values came from a form and are strings). A form's inputs
    left empty (an HTML form sends them as "") come as None: absent, as a JSON null, but still checked by
    name, so that a misspelt one is refused whatever its value."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await read_json_object(request), None, False
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    unnamed_image: bytes | None = None
    not_utf8: list[str] = []
    try:
        if content_type.startswith("multipart/form-data"):
            parser = _TextPartsChecked(
                request.headers,
                request.stream(),
                # Counted by the parser itself, which names the field: Starlette's own count says only "Too
                # many files" (curl users send a long prompt as `-F prompt=@file`).
                max_files=MAX_FORM_FIELDS,
                max_fields=MAX_FORM_FIELDS,
                max_part_size=body_limit(settings),
            )
            parser.not_utf8 = not_utf8
            form = await parser.parse()
            unnamed_image = parser.unnamed_image
        else:
            # Off the event loop: a body of millions of `&` (empty fields, which Starlette's field limit does
            # not count) took 25 s to split and decode there, and /health waited with every other request.
            form = await run_in_threadpool(read_urlencoded, await request.body())
    except _FieldRefused as exc:
        raise exc.error from None
    except MultiPartException as exc:
        raise InvalidRequest("body", f"is not a valid form: {exc.message}") from None
    except HTTPException as exc:  # starlette's word for a malformed form (no boundary, too many parts)
        raise InvalidRequest("body", f"is not a valid form: {exc.detail}") from None
    try:
        if not_utf8:
            raise InvalidRequest(nested_name(not_utf8[0]), "is not UTF-8 text (send the form's text as UTF-8)")
        for key, value in form.multi_items():
            if key in fields:  # read by nobody: which of the two did the client mean?
                raise InvalidRequest(nested_name(key), "is given more than once; give it once")
            if isinstance(value, UploadFile):  # input_reference: the parser refused a file under any other name
                data = await _read_upload(value, settings)
                if data:
                    upload = data
                elif value.filename:  # (a browser form with no file chosen sends an empty part with no name)
                    raise InvalidRequest("input_reference", f"the uploaded file {value.filename!r} is empty")
                fields[key] = None
            elif key == "input_reference" and unnamed_image is not None:
                upload = _within_upload_limit(unnamed_image, settings) or None
                fields[key] = None
            else:
                fields[key] = value if value != "" or key == "prompt" else None
    finally:
        await form.close()
    return fields, upload, True


class _FieldRefused(MultiPartException):
    """A part refused while the form is read, carrying the error that names its field: raised as Starlette's
    own exception so that its parser closes the files it has opened."""

    def __init__(self, error: InvalidRequest) -> None:
        super().__init__(str(error))
        self.error = error


class _TextPartsChecked(MultiPartParser):
    """Starlette's multipart parser, noting the text parts that are not UTF-8, which it would read as Latin-1:
    a prompt changed behind the client's back (a urlencoded form's are checked by `check_urlencoded`). A file
    is refused as soon as its headers are read unless it is the one input_reference."""

    not_utf8: list[str]
    has_file = False
    # An image sent with no filename (the SDK's `("", data, "image/png")` and `(None, data)` tuples), which
    # Starlette reads as text like every part without one: an input_reference part is the upload when its
    # Content-Type is not text, or, with none given, when its bytes are not text (an image's never are).
    unnamed_image: bytes | None = None

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = getattr(self, "_current_part", None)
        if part is None or part.file is None:
            return
        key = part.field_name
        if key != "input_reference":
            what = "an image URL (data:…), not a file" if base_name(key) == "input_reference" else "text"
            raise _FieldRefused(InvalidRequest(nested_name(key), f"must be {what}: only input_reference may be a file"))
        if self.has_file:
            raise _FieldRefused(InvalidRequest(key, "is given more than once; give it once"))
        self.has_file = True

    def on_part_end(self) -> None:
        part = getattr(self, "_current_part", None)
        if part is not None and part.file is None:
            data = bytes(part.data)
            content_type = dict(part.item_headers).get(b"content-type", b"").split(b";")[0].strip().lower()
            try:
                data.decode("utf-8")
                utf8 = True
            except UnicodeDecodeError:
                utf8 = False
            text = content_type.startswith(b"text/") or (not content_type and utf8)
            if part.field_name == "input_reference" and not text:
                self.unnamed_image = data
                part.data = bytearray()  # not decoded as text: kept as the upload instead
            elif not utf8:
                self.not_utf8.append(part.field_name)
        super().on_part_end()


def nested_name(key: str) -> str:
    """`input_reference[image_url]` -> `input_reference.image_url`, as errors name a nested field."""
    return key.replace("[", ".").replace("]", "")


def read_urlencoded(raw: bytes) -> FormData:
    """A urlencoded form's fields, checked as `check_urlencoded` says, at most MAX_FORM_FIELDS of them (empty
    ones counted: each is work to split)."""
    if raw.count(b"&") >= MAX_FORM_FIELDS:
        raise InvalidRequest("body", f"is not a valid form: it holds more than {MAX_FORM_FIELDS} fields")
    check_urlencoded(raw)
    return FormData(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def check_urlencoded(raw: bytes) -> None:
    """What Starlette's form parser would let through changed: JSON sent with curl's default `-d` content
    type (read as one field named after the whole text), and text that is not UTF-8 (read with U+FFFD in
    place of each bad byte: a prompt changed behind the client's back)."""
    if raw.lstrip()[:1] in (b"{", b"["):
        raise InvalidRequest(
            "body",
            "looks like JSON but was sent as a form (Content-Type: application/x-www-form-urlencoded, what "
            "`curl -d` sends): send it with Content-Type: application/json",
        )
    for pair in raw.split(b"&"):
        name, _, value = pair.partition(b"=")
        for part in (name, value):
            try:
                unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                field = unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "replace")
                raise InvalidRequest(nested_name(field) or "body", "is not UTF-8 text (percent-encode UTF-8)") from None


def reference_image(fields: Mapping[str, Any], upload: bytes | None, max_bytes: int) -> bytes | None:
    """The input image from an upload, `input_reference: {"image_url": data URL}` (JSON) or its flattened
    multipart form `input_reference[image_url]`."""
    flattened = {k: v for k, v in fields.items() if base_name(k) == "input_reference" and k != "input_reference"}
    reference = fields.get("input_reference")
    given = [k for k, v in flattened.items() if v is not None]
    if (upload is not None or reference is not None) and given:
        raise InvalidRequest("input_reference", "give the image once: as an upload or as image_url, not both")
    if upload is not None:
        return upload
    if isinstance(reference, Mapping):
        if not reference:
            raise InvalidRequest("input_reference", 'must hold the image: {"image_url": "data:…"}')
        flattened = {f"input_reference[{k}]": v for k, v in reference.items()}
    elif reference is not None:
        return decode_data_url(reference, "input_reference", max_bytes)
    # Every sub-field judged before any is used: the answer must not depend on the order they came in.
    for key in flattened:
        if key == "input_reference[file_id]":
            raise InvalidRequest(
                "input_reference.file_id", "file ids are not supported here; upload the image or send a data: URL"
            )
        if key != "input_reference[image_url]":
            raise UnknownField(nested_name(key), "is not a known field of input_reference (use image_url)")
    image_url = flattened.get("input_reference[image_url]")
    return None if image_url is None else decode_data_url(image_url, "input_reference.image_url", max_bytes)


def build_request(
    fields: Mapping[str, Any], image: bytes | None, from_form: bool, spec: ModelSpec
) -> GenerationRequest:
    values = generation_values(fields, from_form)
    size = optional_str("size", fields.get("size"))
    if size is not None:
        width, height = parse_size(size, "size")
        values.setdefault("width", width)
        values.setdefault("height", height)
    seconds = fields.get("seconds")
    if seconds is not None:
        fps = values.get("fps", spec.fps)
        if isinstance(fps, float) and fps.is_integer():  # 16.0: resolve() takes it as 16, so must seconds
            fps = int(fps)
        # An fps out of range is refused by resolve(); seconds are judged meanwhile at the model's rate.
        fps = fps if isinstance(fps, int) and not isinstance(fps, bool) and 1 <= fps <= MAX_FPS else spec.fps
        frames = seconds_to_frames(seconds, fps, spec)  # checked even when num_frames wins
        values.setdefault("num_frames", frames)
    return GenerationRequest(prompt=fields.get("prompt"), image=image, **values)  # type: ignore[arg-type]


# What the content route answers, for the OpenAPI description (FastAPI would declare a JSON 200).
CONTENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the whole file", "content": {"video/mp4": {}, "image/webp": {}}},
    206: {"description": "the byte range asked for (`Range`)", "content": {"video/mp4": {}, "image/webp": {}}},
    302: {"description": "with WANSERVE_STORAGE_REDIRECT: to a presigned URL of the bucket"},
    304: {"description": "`If-None-Match` names the current ETag"},
    404: {"description": "no such video, not completed, or its file expired"},
    416: {"description": "the `Range` lies outside the file"},
}
EVENT_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "server-sent events: the video object each time it changes, ending after a final status",
        "content": {"text/event-stream": {}},
    },
    404: {"description": "no such video"},
}

UNSUPPORTED = (
    ("/{video_id}/remix", "POST", "remixes"),
    ("/edits", "POST", "video edits"),
    ("/extensions", "POST", "video extensions"),
    ("/characters", "POST", "characters"),
    ("/characters/{character_id}", "GET", "characters"),
)


def _refusal(what: str) -> Callable[[], None]:
    def refuse() -> None:
        raise NotSupported(f"{what} are not supported by wanserve; create a new video (POST /v1/videos) instead")

    return refuse


def video_content(
    request: Request,
    store: JobStore,
    storage: Storage,
    settings: Settings,
    video_id: str,
    variant: str = "video",
    disposition: str = "inline",
) -> Response:
    """A finished job's file (the MP4 or its thumbnail), with ranges and validators: `/v1/videos/{id}/content`,
    and the replaced systems' `/videos/<id>.mp4`."""
    name = VARIANTS.get(variant)
    if name is None:
        if variant == "spritesheet":  # one of the SDK's variants: a feature missing here, not a bad request
            raise NotSupported(
                f"variant: spritesheet is not offered here; the variants are {', '.join(VARIANTS)}", "variant"
            )
        raise InvalidRequest("variant", f"must be one of {', '.join(VARIANTS)}, got {variant!r}")
    # `attachment`: a link that saves the file, also where the answer is a redirect to another origin (a
    # bucket), on which a browser ignores a link's `download` attribute and would show the video instead.
    if disposition not in ("inline", "attachment"):
        raise InvalidRequest("disposition", f"must be inline or attachment, got {disposition!r}")
    job = store.get(video_id)
    if job.status != JobStatus.COMPLETED:
        raise HTTPException(404, f"video {video_id} has no content: its status is {status_words.OPENAI[job.status]}")
    key = (job.result or {}).get(f"{variant}_key") or key_for(job.id, name)
    try:
        filename = f"{job.id}.{name.split('.')[-1]}"
        return content_response(request, storage, settings, key, CONTENT_TYPES[name], filename, disposition)
    except FileNotFoundError:
        raise HTTPException(
            404, f"the {variant} of {video_id} is no longer stored (it expired or was deleted)"
        ) from None


def router(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    specs: Mapping[str, ModelSpec],
    metrics: Metrics | None,
) -> APIRouter:
    api = APIRouter(prefix="/v1/videos", tags=["openai"], dependencies=[Depends(known_query)])

    def shown(job: Job) -> tuple[Job, dict[str, Any]]:
        """The job as it is now, and its video object."""
        job, place = current(store, job)
        return job, video_object(job, place)

    def answer(job: Job, status_code: int = 200, replayed: bool = False) -> JSONResponse:
        job, body = shown(job)
        headers = {**poll_headers(job), **(REPLAYED if replayed else {})}
        return JSONResponse(body, status_code=status_code, headers=headers)

    def create(fields: dict[str, Any], upload: bytes | None, from_form: bool, key: str | None) -> JSONResponse:
        reject_parallel_layout(fields)
        check_fields(fields, ALLOWED_FIELDS, IGNORED_FIELDS, nested={"input_reference"})
        image = reference_image(fields, upload, settings.max_upload_bytes)
        spec = served_spec(specs, fields.get("model"), frozenset({"i2v"}) if image else frozenset({"t2v"}))
        request = build_request(fields, image, from_form, spec)
        priority = fields.get("priority")
        job, replayed = submit(
            store,
            storage,
            specs,
            settings,
            metrics,
            request,
            spec.name,
            form_int("priority", priority) if from_form else priority,
            "openai",
            field_names={"image": "input_reference", **size_field_names(fields, "size")},
            key=key,
        )
        return answer(job, replayed=replayed)

    # What the OpenAI SDK can also ask for (`videos.remix`, `edit`, `extend`, `create_character`,
    # `get_character`): declared before the `/{video_id}` routes, which would take "edits" for an id.
    for path, method, what in UNSUPPORTED:
        api.add_api_route(path, _refusal(what), methods=[method], include_in_schema=False)

    @api.post("", openapi_extra=idempotent(json_or_form_body(VideoCreate)))
    async def create_video(request: Request) -> JSONResponse:
        key = idempotency_key(request.headers)
        fields, upload, from_form = await read_create_body(request, settings)
        return await in_create_thread(request, create, fields, upload, from_form, key)

    @api.get("")
    def list_videos(
        after: str | None = None,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        # `after=` (empty, as a form or a URL template leaves it) is the first page, not "no such video".
        try:
            jobs, has_more = store.list(limit=limit, after=after or None, order=order)
        except JobNotFound as exc:  # the id of a video long deleted, or of no video
            raise JobNotFound(exc.job_id, field="after") from None
        data = [shown(j)[1] for j in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }

    @api.get("/{video_id}")
    def retrieve_video(video_id: str) -> JSONResponse:
        return answer(store.get(video_id))

    @api.get("/{video_id}/events", response_class=StreamingResponse, responses=EVENT_STREAM_RESPONSES)
    async def video_events(request: Request, video_id: str) -> Response:
        reads = request.app.state.stream_reads  # the streams' own threads, not the pool other requests need
        ended = request.headers.get("last-event-id") == events.FINAL_ID  # a reconnect after the final event
        job: Job | None
        try:
            # An unknown id is a 404 in the usual envelope, before the stream starts.
            job = await anyio.to_thread.run_sync(store.get, video_id, limiter=reads)
        except JobNotFound as exc:
            if ended and exc.deleted:  # finished, then deleted or expired: nothing more will come either
                return Response(status_code=204)
            raise
        except StoreUnavailable:
            # Opened anyway, to wait the outage out as an open stream does: an EventSource answered 503 gives up
            # for good, and reconnects come in a crowd exactly then (a Redis restart, a replica's).
            job = None
        if ended and job is not None and job.status.finished:
            return Response(status_code=204)  # an EventSource stops reconnecting on a 204
        stream = events.job_events(
            lambda: store.get(video_id),
            shown,
            request.app.state.closing,
            reads,
            first=job,
        )
        return StreamingResponse(stream, media_type="text/event-stream", headers=events.HEADERS)

    @api.post("/{video_id}/cancel")
    async def cancel_video(request: Request, video_id: str) -> JSONResponse:
        return await in_change_thread(request, lambda: answer(cancel(store, storage, settings, metrics, video_id)))

    @api.delete("/{video_id}")
    async def delete_video(request: Request, video_id: str) -> dict[str, Any]:
        return await in_change_thread(request, delete, video_id)

    def delete(video_id: str) -> dict[str, Any]:
        if not store.get(video_id).status.finished:
            cancel(store, storage, settings, metrics, video_id, remove_input=False)  # all its files go next
        # Files first: if the storage fails (503), the record stays and a retry finds it. A running job goes too:
        # its worker sees the record gone at its next step (or before it stores the video) and removes its files.
        storage.delete_prefix(video_id)
        store.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    def download_content(
        request: Request, video_id: str, variant: str = "video", disposition: str = "inline"
    ) -> Response:
        return video_content(request, store, storage, settings, video_id, variant, disposition)

    api.add_api_route(
        "/{video_id}/content",
        download_content,
        methods=["GET"],
        response_class=Response,
        responses=CONTENT_RESPONSES,
    )
    # HEAD lets players learn the size before ranged GETs; kept out of the schema to avoid a twin operation.
    api.add_api_route(
        "/{video_id}/content", download_content, methods=["HEAD"], include_in_schema=False, name="head_content"
    )
    return api
