"""The routes of the systems wanserve replaces, kept so their clients work unchanged. Each is a thin
adapter: parse its field names into a `GenerationRequest`, call `submit`, and describe jobs in its words.

- `/video/submit`, `/video/status`, `/video/cancel`: requestId style, statuses InQueue … Succeed.
- `/api/v1/generate`, `/api/v1/status/{task_id}`: task_id style, `resolution: "1280*704"`, `task_type`.
- `/submit`, `/status/{task_id}`: the same as /api/v1, at the root.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from wanserve.catalog import ModelSpec
from wanserve.config import Settings
from wanserve.errors import InvalidRequest, JobNotFound
from wanserve.jobs.model import Job, JobStatus, JobStore
from wanserve.metrics import Metrics
from wanserve.request import GenerationRequest, parse_size
from wanserve.storage.base import Storage

from . import status_words
from .openai_videos import video_content
from .schemas import RequestId, TaskGenerate, VideoSubmit, idempotent, json_body
from .submit import (
    EXTENSION_FIELDS,
    REPLAYED,
    Submitted,
    cancel,
    check_fields,
    current,
    decode_data_url,
    generation_values,
    idempotency_key,
    in_change_thread,
    in_create_thread,
    optional_str,
    reject_parallel_layout,
    served_spec,
    size_field_names,
    submit,
)
from .web import public_base, read_json_object

# `image_size`, `infer_steps` and `sample_shift`: what the replaced systems' own examples name the size, the
# steps and the flow shift (Wan's `--sample_shift`).
OLDER_NAMES = frozenset({"image_size", "infer_steps", "sample_shift"})
# Their per-step cache knobs: the step cache here is a preset's (`fast`, `fastest`), tuned and measured. With
# `use_attentioncache` false (or absent) they ask for nothing and are taken; a cache asked for is refused by name.
STEP_CACHE_FIELDS = frozenset({"use_attentioncache", "start_step", "end_step", "attentioncache_interval"})
# Their sampler choice: Wan's diffusers repos, and so every model here, sample with UniPC.
SOLVER_FIELD = "sample_solver"
_THEIR_FIELDS = OLDER_NAMES | STEP_CACHE_FIELDS | {SOLVER_FIELD}
VIDEO_FIELDS = EXTENSION_FIELDS | _THEIR_FIELDS | {"prompt", "model", "image_url", "size", "priority"}
TASK_FIELDS = EXTENSION_FIELDS | _THEIR_FIELDS | {"prompt", "model", "image_url", "resolution", "task_type", "priority"}

# What each task_type asks of the model, and whether it needs (True), forbids (False) or allows (None) an image.
TASK_TYPES: Mapping[str, tuple[frozenset[str], bool | None]] = MappingProxyType(
    {
        "t2v": (frozenset({"t2v"}), False),
        "i2v": (frozenset({"i2v"}), True),
        "ti2v": (frozenset({"t2v", "i2v"}), None),
    }
)


# Wan's own task names (its generate.py's `--task`, which the replaced systems passed on as `task_type`,
# `ti2v-5B`), lower-cased: the kind of task, and the catalog models that are that task.
WAN_TASKS: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType(
    {
        "t2v-a14b": ("t2v", ("wan2.2-t2v-a14b",)),
        "i2v-a14b": ("i2v", ("wan2.2-i2v-a14b",)),
        "ti2v-5b": ("ti2v", ("wan2.2-ti2v-5b",)),
        "t2v-14b": ("t2v", ("wan2.1-t2v-14b",)),
        "t2v-1.3b": ("t2v", ("wan2.1-t2v-1.3b",)),
        "i2v-14b": ("i2v", ("wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p")),
    }
)


def iso_utc(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def content_url(base: str, job: Job) -> str | None:
    return f"{base}/v1/videos/{job.id}/content" if job.status == JobStatus.COMPLETED else None


def base_path(base: str) -> str:
    """The path part of the public base (`/wan` behind a proxy that serves us there, else empty)."""
    return urlsplit(base).path.rstrip("/")


def video_status(job: Job, queue_position: int | None, base: str) -> dict[str, Any]:
    """`video_url` is a path, as the replaced system gave: its clients join it to the server's address. It
    names the content route (`/v1/videos/<id>/content`); the replaced system's `/videos/<id>.mp4` serves the
    same file, for links kept from it."""
    error = status_words.job_error(job)
    url = content_url(base_path(base), job)
    reason = error["message"] if error else None
    if reason is None and job.cancel_requested and not job.status.finished:
        # Their cancel answered Cancelled at once; a running job here stops at its next step.
        reason = "cancel requested: the job stops at its next denoising step"
    return {
        "requestId": job.id,
        "status": status_words.VIDEO[job.status],
        "reason": reason,
        "results": {"video_url": url} if url else None,
        "queue_position": queue_position,
        "progress": 1.0 if job.status == JobStatus.COMPLETED else round(job.progress, 4),
        "created_at": int(job.created_at),
        "updated_at": int(job.updated_at),
    }


def task_status(job: Job, queue_position: int | None, base: str) -> dict[str, Any]:
    return {
        "task_id": job.id,
        "status": status_words.API_V1[job.status],
        "progress": 100 if job.status == JobStatus.COMPLETED else min(max(int(job.progress * 100), 0), 99),
        "queue_position": queue_position,
        "result_url": content_url(base, job),
        "error": status_words.job_error(job),
        # Asked for on another route (these have no cancel): the job stops at its next step.
        "cancel_requested": job.cancel_requested and not job.status.finished,
        "created_at": iso_utc(job.created_at),
        "updated_at": iso_utc(job.updated_at),
    }


def _request(body: Mapping[str, Any], size_field: str, max_bytes: int) -> GenerationRequest:
    values = generation_values(body, from_form=False)
    size = optional_str(size_field, body.get(size_field))
    if size is not None:
        width, height = parse_size(size, size_field)
        values.setdefault("width", width)
        values.setdefault("height", height)
    image_url = body.get("image_url")
    image = decode_data_url(image_url, "image_url", max_bytes, uploads=False) if image_url is not None else None
    return GenerationRequest(prompt=body.get("prompt"), image=image, **values)


def _task_type(body: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...] | None]:
    """The kind of task `task_type` asks for, and the models it names when it is one of Wan's task names."""
    task_type = body.get("task_type")
    if task_type is None:
        return None, None
    name = task_type.strip().lower() if isinstance(task_type, str) else None
    if name in TASK_TYPES:
        return name, None
    if name in WAN_TASKS:
        return WAN_TASKS[name]
    wan_names = ", ".join(("t2v-A14B", "i2v-A14B", "ti2v-5B", "t2v-14B", "t2v-1.3B", "i2v-14B"))
    raise InvalidRequest(
        "task_type", f"must be one of {', '.join(TASK_TYPES)}, or one of Wan's ({wan_names}); got {task_type!r}"
    )


def _task_model(
    task_type: str, models: tuple[str, ...], model: object, specs: Mapping[str, ModelSpec], needs: frozenset[str]
) -> ModelSpec:
    """The served model a Wan task name (`ti2v-5B`) asks for; a `model` given beside it must be that model. A
    local copy of the model, served by its folder, is it too (its aliases name the catalog model)."""

    def is_it(spec: ModelSpec) -> bool:
        return spec.name in models or any(alias in models for alias in spec.aliases)

    if model not in (None, ""):
        spec = served_spec(specs, model, needs)
        if not is_it(spec):
            raise InvalidRequest("task_type", f"{task_type!r} is {' or '.join(models)}, but model names {spec.name}")
        return spec
    for name in models:  # in the order of WAN_TASKS: i2v-14B prefers the 480p model, as before
        for spec in specs.values():
            if name == spec.name or name in spec.aliases:
                return spec
    raise InvalidRequest(
        "task_type", f"{task_type!r} is {' or '.join(models)}, which is not served here; served: {', '.join(specs)}"
    )


def _older_names(body: Mapping[str, Any], size_field: str) -> tuple[dict[str, Any], str, dict[str, str]]:
    """`body` with `infer_steps` read as `num_inference_steps` and `sample_shift` as `flow_shift`; the field
    the size came in (`image_size` or the route's own); and how errors name the fields that came under the
    older names. Their step-cache and sampler fields are answered here, by name."""
    _their_knobs(body)
    pairs = (("image_size", size_field), ("infer_steps", "num_inference_steps"), ("sample_shift", "flow_shift"))
    given = {name for pair in pairs for name in pair if body.get(name) is not None}
    for older, newer in pairs:
        if {older, newer} <= given:
            raise InvalidRequest(older, f"gives what {newer} gives; send one of the two")
    renamed: dict[str, str] = {}
    body = {k: v for k, v in body.items() if k not in STEP_CACHE_FIELDS and k != SOLVER_FIELD}
    for older, newer in pairs[1:]:
        if older in given:
            body[newer] = body[older]
            renamed[newer] = older
    return body, "image_size" if "image_size" in given else size_field, renamed


def _their_knobs(body: Mapping[str, Any]) -> None:
    """Their attention cache and sampler: taken where they ask for nothing other than what is done here (no
    cache asked for, so its step fields mean nothing; UniPC), else refused with what to send instead."""
    use_cache = body.get("use_attentioncache")
    if use_cache is not None and not isinstance(use_cache, bool):
        raise InvalidRequest("use_attentioncache", f"must be true or false, got {use_cache!r}")
    for name in sorted(STEP_CACHE_FIELDS - {"use_attentioncache"}):
        value = body.get(name)
        # Unused here (no cache asked for), but checked as their server did: a client's slip is not hidden.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidRequest(name, f"must be a whole number of steps, 0 or more, got {value!r}")
    if use_cache:
        raise InvalidRequest(
            "use_attentioncache",
            "the step cache is chosen with preset (fast or fastest, where the server allows it per request: "
            "GET /v1/models), not with per-step fields",
        )
    solver = body.get(SOLVER_FIELD)
    if solver is not None and not (isinstance(solver, str) and solver.strip().lower() == "unipc"):
        raise InvalidRequest(SOLVER_FIELD, f"must be unipc, the sampler every model here uses; got {solver!r}")


def _check_task(
    task_type: str | None, spec: ModelSpec, has_image: bool, served: Mapping[str, ModelSpec] | None = None
) -> None:
    """`served`: every served model, when the request named none (the refusal then speaks of them all, not
    of the model picked for want of one that fits)."""
    if task_type is None:
        return
    tasks, image_rule = TASK_TYPES[task_type]
    if not tasks <= spec.tasks:
        if served is not None:
            listed = ", ".join(f"{s.name} ({s.task_label})" for s in served.values())
            raise InvalidRequest("task_type", f"no model served here does {task_type}; served: {listed}")
        raise InvalidRequest(
            "task_type", f"{spec.name} does not do {task_type} (its tasks: {spec.task_label}); choose another model"
        )
    if image_rule is True and not has_image:
        raise InvalidRequest("image_url", f"task_type {task_type} needs an input image (a data: URL)")
    if image_rule is False and has_image:
        raise InvalidRequest("image_url", f"task_type {task_type} takes no input image; use i2v or ti2v")


def router(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    specs: Mapping[str, ModelSpec],
    metrics: Metrics | None,
) -> APIRouter:
    api = APIRouter(tags=["legacy"])
    image_names = {"image": "image_url"}

    def submit_video(body: dict[str, Any], key: str | None) -> Submitted:
        reject_parallel_layout(body)
        check_fields(body, VIDEO_FIELDS)
        body, size_field, renamed = _older_names(body, "size")
        request = _request(body, size_field, settings.max_upload_bytes)
        # submit checks model and priority, whatever JSON type they arrived as.
        names = {**image_names, **size_field_names(body, size_field), **renamed}
        model, priority = body.get("model"), body.get("priority")
        return submit(store, storage, specs, settings, metrics, request, model, priority, "video", names, key)

    def submit_task(body: dict[str, Any], source: str, key: str | None) -> Submitted:
        reject_parallel_layout(body)
        check_fields(body, TASK_FIELDS)
        body, size_field, renamed = _older_names(body, "resolution")
        request = _request(body, size_field, settings.max_upload_bytes)
        task_type, task_models = _task_type(body)
        needs = TASK_TYPES[task_type][0] if task_type is not None else frozenset()
        if not needs:
            needs = frozenset({"i2v"}) if request.image is not None else frozenset({"t2v"})
        if task_models is not None:
            spec = _task_model(str(body["task_type"]), task_models, body.get("model"), specs, needs)
        else:
            spec = served_spec(specs, body.get("model"), needs)
        unnamed = body.get("model") in (None, "") and task_models is None
        _check_task(task_type, spec, request.image is not None, specs if unnamed else None)
        names = {**image_names, **size_field_names(body, size_field), **renamed}
        priority = body.get("priority")
        return submit(store, storage, specs, settings, metrics, request, spec.name, priority, source, names, key)

    def request_id(body: Mapping[str, Any]) -> str:
        check_fields(body, ("requestId",))  # `requestid` or `id` must not pass as a request without one
        value = body.get("requestId")
        if value is None or value == "":
            raise InvalidRequest("requestId", "is required (the id /video/submit returned)")
        if not isinstance(value, str):
            raise InvalidRequest("requestId", f"must be a string (the id /video/submit returned), got {value!r}")
        return value

    def job_named(body: Mapping[str, Any]) -> Job:
        job_id = request_id(body)
        try:
            return store.get(job_id)
        except JobNotFound as exc:
            raise JobNotFound(job_id, "requestId", exc.deleted) from None

    def cancel_named(body: Mapping[str, Any]) -> Job:
        job_id = request_id(body)
        try:
            return cancel(store, storage, settings, metrics, job_id)
        except JobNotFound as exc:
            raise JobNotFound(job_id, "requestId", exc.deleted) from None

    @api.post("/video/submit", status_code=202, openapi_extra=idempotent(json_body(VideoSubmit)))
    async def video_submit(request: Request) -> JSONResponse:
        key = idempotency_key(request.headers)
        body = await read_json_object(request)
        job, replayed = await in_create_thread(request, submit_video, body, key)
        # 202, as the system this route comes from answered: taken, not done.
        return JSONResponse({"requestId": job.id}, status_code=202, headers=REPLAYED if replayed else None)

    @api.post("/video/status", openapi_extra=json_body(RequestId))
    async def video_status_route(request: Request) -> dict[str, Any]:
        body = await read_json_object(request)
        job, place = await run_in_threadpool(lambda: current(store, job_named(body)))
        return video_status(job, place, public_base(request, settings))

    @api.post("/video/cancel", openapi_extra=json_body(RequestId))
    async def video_cancel(request: Request) -> dict[str, Any]:
        body = await read_json_object(request)
        job, place = await in_change_thread(request, lambda: current(store, cancel_named(body)))
        return video_status(job, place, public_base(request, settings))

    def video_file(request: Request, filename: str) -> Response:
        # The replaced system served its videos as files at `/videos/<id>.mp4`: links stored from it, clients
        # that build the path themselves, and proxy rules written for it still find the video.
        if not filename.endswith(".mp4"):
            raise HTTPException(404, f"no file /videos/{filename}: the videos here are /videos/<requestId>.mp4")
        return video_content(request, store, storage, settings, filename.removesuffix(".mp4"))

    api.add_api_route("/videos/{filename}", video_file, methods=["GET"], response_class=Response)
    api.add_api_route("/videos/{filename}", video_file, methods=["HEAD"], include_in_schema=False, name="head_file")

    def task_routes(prefix: str, source: str) -> None:
        async def generate(request: Request) -> JSONResponse:
            key = idempotency_key(request.headers)
            body = await read_json_object(request)
            job, replayed = await in_create_thread(request, submit_task, body, source, key)
            # A path, as the replaced system gave: its clients join it to the address they called.
            status_url = f"{base_path(public_base(request, settings))}{prefix}/status/{job.id}"
            return JSONResponse(
                {"task_id": job.id, "status": status_words.API_V1[job.status], "status_url": status_url},
                status_code=202,
                headers=REPLAYED if replayed else None,
            )

        def status(request: Request, task_id: str) -> dict[str, Any]:
            try:
                job = store.get(task_id)
            except JobNotFound as exc:
                raise JobNotFound(task_id, "task_id", exc.deleted) from None
            return task_status(*current(store, job), public_base(request, settings))

        path = f"{prefix}/generate" if prefix else "/submit"
        api.add_api_route(
            path,
            generate,
            methods=["POST"],
            status_code=202,
            name=f"{source}_generate",
            openapi_extra=idempotent(json_body(TaskGenerate)),
        )
        api.add_api_route(f"{prefix}/status/{{task_id}}", status, methods=["GET"], name=f"{source}_status")

    task_routes("/api/v1", "api_v1")
    task_routes("", "submit")
    return api
