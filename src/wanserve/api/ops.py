"""Operations routes: liveness, readiness, the model list and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wanserve.catalog import ModelSpec
from wanserve.config import Settings
from wanserve.jobs.model import JobStore
from wanserve.metrics import Metrics
from wanserve.request import request_presets
from wanserve.storage.base import Storage

from .submit import ModelNotServed, served_spec

log = logging.getLogger(__name__)

Readiness = Callable[[], Mapping[str, Any]]


class NoSuchModel(ModelNotServed):
    """A model route names a model that is not served: a 404, as OpenAI answers `models.retrieve`."""

    status_code = 404


def model_defaults(spec: ModelSpec) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "width": spec.width,
        "height": spec.height,
        "num_frames": spec.num_frames,
        "fps": spec.fps,
        "seconds": spec.seconds,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "flow_shift": spec.flow_shift,
    }
    if spec.two_experts:
        defaults["guidance_scale_2"] = spec.guidance_scale_2
        defaults["boundary_ratio"] = spec.boundary_ratio
    return defaults


def model_entry(spec: ModelSpec, store: JobStore, settings: Settings, created: int) -> dict[str, Any]:
    aliases = list(spec.aliases) + ([spec.repo_id] if spec.repo_id else [])
    return {
        "id": spec.name,
        "object": "model",
        "created": created,
        "owned_by": "wanserve",
        "description": spec.description,
        "tasks": sorted(spec.tasks),
        "defaults": model_defaults(spec),
        "limits": {
            "max_frames": spec.frame_limit,
            "max_pixels": spec.max_pixels,
            "max_side": spec.max_side,
            "size_multiple": spec.spatial_multiple,
            "frame_stride": spec.temporal_stride,
        },
        "sizes": [f"{w}x{h}" for w, h in spec.sizes],
        "presets": {
            "served": settings.preset,
            "per_request": list(request_presets(settings.preset, settings.step_cache_for(spec))),
        },
        **load(spec, store),
        "aliases": aliases,
    }


def load(spec: ModelSpec, store: JobStore) -> dict[str, int]:
    """The jobs a model has waiting and running. `demand`, the jobs waiting plus the workers busy, is the
    number of workers that would leave none waiting: what an autoscaler sizes a model's workers by
    (deploy/kubernetes/autoscaling.yaml). Not jobs running: a worker that stores one video while it makes the
    next holds two, and counted twice it would start a second GPU pod for nothing."""
    counts = store.counts(spec.name)
    return {"queue_depth": counts.queued, "running": counts.running, "demand": counts.demand}


def answers(name: str, check: Callable[[], bool]) -> bool:
    """Whether a backend's ping says yes; one that raises is a no (logged), never a 500 from a probe."""
    try:
        return bool(check())
    except Exception:
        log.warning("%s ping failed", name, exc_info=True)
        return False


def readiness_answer(
    state: Mapping[str, Any], store_ok: bool, storage_ok: bool | None, needs_storage: bool = True, **more: Any
) -> JSONResponse:
    """`/ready`'s answer, the API's and a standalone worker's alike: `status` and the `reasons` for a "no",
    beside the models' states and the store's (and the storage's, where it is asked)."""
    reasons: list[str] = []
    if "error" in state:
        reasons.append(f"readiness check failed: {state['error']}")
    elif state.get("stuck"):
        stuck = state["stuck"]
        reasons.append(f"stuck: {'; '.join(stuck.values()) if isinstance(stuck, Mapping) else stuck}")
    elif state.get("draining"):
        reasons.append(f"draining (shutting down): {', '.join(state['draining'])}")
    elif not state.get("ready", False):
        waiting = {m: s for m, s in (state.get("models") or {}).items() if s != "ready"}
        reasons.append(f"models not ready: {waiting}" if waiting else "models not ready")
    if not store_ok:
        reasons.append("job store unreachable, slow (no answer within 2 s) or full")
    if storage_ok is False and needs_storage:
        reasons.append("result storage unreachable, slow (no answer within 2 s) or full")
    body: dict[str, Any] = {
        "status": "ready" if not reasons else "not_ready",
        "ready": not reasons,
        "models": state.get("models", {}),
        "store": "ok" if store_ok else "unreachable",
    }
    if storage_ok is not None:
        body["storage"] = "ok" if storage_ok else "unreachable"
    body.update(reasons=reasons, **more)
    return JSONResponse(body, status_code=200 if not reasons else 503)


def liveness(stuck: str | None, started: float) -> JSONResponse:
    """`/health`'s answer, the API's and a standalone worker's: 503 `stuck` for a worker whose engine call never
    came back (a hung GPU, which only a restart cures), else 200 in the replaced systems' words and fields
    (uptime checks written for them look for "healthy")."""
    if stuck:
        return JSONResponse({"status": "stuck", "stuck": stuck}, status_code=503)
    uptime = round(time.monotonic() - started, 1)
    return JSONResponse({"status": "healthy", "timestamp": round(time.time(), 3), "uptime": uptime})


def router(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    specs: Mapping[str, ModelSpec],
    metrics: Metrics,
    readiness: Readiness | None,
    keyed: Sequence[Any] = (),
) -> APIRouter:
    """`keyed`: the API-key dependency, for the one route here that shows what is served (probes and scrapes
    stay open)."""
    api = APIRouter(tags=["ops"])
    started = time.monotonic()

    @api.get("/health")
    async def health() -> JSONResponse:
        # Liveness: a process that answers is alive, even while its models load; unless one of its workers is
        # stuck in an engine call that never came back (a hung GPU), which only a restart cures. On the event
        # loop, not in the thread pool: when a store outage holds every pool thread in its retries, liveness
        # must still answer, or every replica is restarted on top of the outage.
        try:
            stuck = dict(readiness()).get("stuck") if readiness is not None else None
        except Exception:
            stuck = None  # /ready reports a failing check; liveness stays about the process
        return liveness(stuck, started)

    # Readiness on threads of its own, as scrapes below: a probe queued behind requests that hold the shared
    # pool (downloads from a bucket that hangs, status reads during a store outage) timed out on every replica
    # together, and the Service lost them all, KEDA's polls with them.
    probes = anyio.CapacityLimiter(2)

    @api.get("/ready")
    async def ready() -> JSONResponse:
        return await anyio.to_thread.run_sync(check_ready, limiter=probes)

    def check_ready() -> JSONResponse:
        try:
            state = dict(readiness()) if readiness is not None else {"ready": True, "models": {}}
        except Exception as exc:
            # A readiness probe that cannot tell is a "no", not a crash: the balancer just waits.
            log.warning("readiness check failed", exc_info=True)
            state = {"ready": False, "models": {}, "error": f"{type(exc).__name__}: {exc}"}
        store_ok = answers("store", store.ping)
        storage_ok = answers("storage", storage.ping)
        return readiness_answer(state, store_ok, storage_ok, needs_storage=state.get("needs_storage", True))

    # Load balancers and uptime checks often probe with HEAD; kept out of the schema to avoid twin operations.
    api.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False, name="health_head")
    api.add_api_route("/ready", ready, methods=["HEAD"], include_in_schema=False, name="ready_head")
    # Where the deploy guides of a system wanserve replaces point their balancers' health checks.
    api.add_api_route("/api/v1/health", health, methods=["GET", "HEAD"], include_in_schema=False, name="health_v1")

    # OpenAI's Model object requires `created` (Unix seconds; the SDK types it int): when this API began serving it.
    serving_since = int(time.time())

    @api.get("/v1/models", dependencies=list(keyed))
    def list_models() -> dict[str, Any]:
        entries = [model_entry(spec, store, settings, serving_since) for spec in specs.values()]
        return {"object": "list", "data": entries}

    # `:path`: a served model may be named by its Hugging Face repo id (`Wan-AI/Wan2.2-TI2V-5B-Diffusers`).
    @api.get("/v1/models/{model_id:path}", dependencies=list(keyed))
    def retrieve_model(model_id: str) -> dict[str, Any]:
        if not model_id.strip():  # `/v1/models/`: served_spec would take "" for "the default model"
            raise NoSuchModel("model", "names no model; GET /v1/models lists the served ones")
        try:
            spec = served_spec(specs, model_id)
        except ModelNotServed as exc:
            raise NoSuchModel("model", str(exc).removeprefix("model: ")) from None
        return model_entry(spec, store, settings, serving_since)

    # Scrapes on threads of their own: during a store outage, job requests hold the shared pool for seconds each,
    # and a scrape queued behind them would time out whole, the counters of the outage with it.
    scrapes = anyio.CapacityLimiter(2)

    @api.get("/metrics")
    async def prometheus() -> Response:
        body = await anyio.to_thread.run_sync(generate_latest, metrics.registry, limiter=scrapes)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return api
