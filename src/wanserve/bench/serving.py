"""Serving efficiency: busy time over wall time across back-to-back jobs through the real `Worker`."""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def measure_serving(engine: Any, req: Any, jobs: int, scratch: Path, overlap: bool = True) -> dict[str, Any]:
    """Busy time over wall time across `jobs` back-to-back jobs through the real Worker, with `overlap_jobs`
    (the default: the next prompt encoded ahead, the previous MP4 written and stored on another thread) or
    without it; or, when the worker cannot be used here, back-to-back `Engine.generate`."""
    root = scratch / ("serving-overlapped" if overlap else "serving-sequential")
    if not overlap:  # the comparison's other half: a Worker that failed here has failed the first half already
        return _serve_through_worker(engine, req, jobs, root, overlap=False)
    try:
        return _serve_through_worker(engine, req, jobs, root, overlap=True)
    except Exception as exc:
        log.warning("serving through the Worker failed (%s); timing Engine.generate back to back", exc)
        result = _serve_back_to_back(engine, req, jobs, scratch)
        result["via"] = f"Engine.generate x {jobs} (Worker unusable: {type(exc).__name__}: {exc})"[:500]
        return result


# A job's stages up to its decoded frames; after them come MP4 encoding, upload and completion.
_FRAME_STAGES = ("encode_prompt", "denoise", "vae_decode")


def _busy_stages(engine: Any) -> tuple[str, ...]:
    """The stages that keep the accelerator busy: prompt encoding only when the text encoder runs there."""
    on_device = getattr(engine, "text_device", engine.device) == engine.device
    return _FRAME_STAGES if on_device else _FRAME_STAGES[1:]


def _job_request(req: Any, i: int) -> Any:
    # A queue of distinct prompts, as users send: each job's prompt really has to be encoded.
    return replace(req, prompt=f"{req.prompt}, take {i + 1}", seed=req.seed + i)


def _serve_through_worker(engine: Any, req: Any, jobs: int, root: Path, overlap: bool) -> dict[str, Any]:
    from wanserve.jobs.model import Job, new_job_id
    from wanserve.jobs.sqlite import SQLiteJobStore
    from wanserve.storage.local import LocalStorage
    from wanserve.worker import Worker

    root.mkdir(parents=True, exist_ok=True)
    store = SQLiteJobStore(root / "jobs.db")
    storage = LocalStorage(root / "videos")
    settings = engine.settings.model_copy(update={"poll_interval": 0.01, "data_dir": root, "overlap_jobs": overlap})
    model = engine.spec.name
    engine.clear_prompt_cache()  # neither run may find the other's prompts encoded
    # All jobs are queued before the worker starts, so nothing but the worker itself separates them.
    ids = [
        store.enqueue(Job(id=new_job_id(), model=model, request=_job_request(req, i).to_dict())).id for i in range(jobs)
    ]
    worker = Worker(model, settings, store, storage, engine=engine)
    sampler = _UtilizationSampler(engine.device)
    thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
    sampler.start()
    thread.start()
    finished = False
    try:
        deadline = time.monotonic() + 3600
        while not all(store.get(i).status.finished for i in ids):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the worker stopped before finishing the jobs")
            time.sleep(0.02)
        finished = True
    finally:
        worker.drain(0)
        # Stopped early (a time limit's SIGTERM, whose SIGKILL follows 20 s later): the phase's save must not
        # wait on a job mid-step.
        thread.join(60 if finished else 5)
        sampler.stop()
    done = [store.get(i) for i in ids]
    store.close()
    failed = [f"{j.status}: {j.error_message}" for j in done if j.status != "completed"]
    if failed:
        raise RuntimeError("; ".join(failed))
    first = min(j.started_at or 0.0 for j in done)
    last = max(j.completed_at or 0.0 for j in done)
    stages = _busy_stages(engine)
    busy = sum(_stage_seconds(j, stages) for j in done)
    via = f"Worker (SQLite store, local storage, overlap_jobs={str(overlap).lower()})"
    result = _serving_result(via, jobs, busy, last - first, sampler, done, stages)
    # Idle time from one job's decoded frames to the next job's claim (with overlap_jobs the next job is claimed
    # before the previous one completes, so completions would give negative gaps).
    ordered = sorted(done, key=lambda j: j.started_at or 0.0)
    result["gaps_between_jobs_seconds"] = [
        round((b.started_at or 0.0) - _frames_ready_at(a), 4) for a, b in itertools.pairwise(ordered)
    ]
    result["encode_prompt_seconds"] = [round(_stage_seconds(j, ("encode_prompt",)), 4) for j in ordered]
    # The last job's MP4 and upload come after the queue's GPU work is over: with K jobs they are 1/K of the
    # tail, not idle time between jobs. Busy over first start -> last frames decoded leaves them out.
    span = _frames_ready_at(ordered[-1]) - first
    result["busy_fraction_to_last_frames"] = round(busy / span, 4) if span > 0 else None
    return result


def _frames_ready_at(job: Any) -> float:
    """When a job's frames were decoded: its start plus its encode, denoise and decode stages."""
    return (job.started_at or 0.0) + _stage_seconds(job, _FRAME_STAGES)


def _stage_seconds(job: Any, stages: tuple[str, ...]) -> float:
    """Seconds a finished job spent in `stages`, from the timings its worker stored."""
    timings = (job.result or {}).get("timings", {})
    return sum(float(timings.get(k, 0.0)) for k in stages)


def _serve_back_to_back(engine: Any, req: Any, jobs: int, scratch: Path) -> dict[str, Any]:
    sampler = _UtilizationSampler(engine.device)
    stages = _busy_stages(engine)
    sampler.start()
    busy = 0.0
    started = time.perf_counter()
    for i in range(jobs):
        result = engine.generate(_job_request(req, i), scratch / f"serve-{i}.mp4")
        busy += sum(result.timings.get(k, 0.0) for k in stages)
    wall = time.perf_counter() - started
    sampler.stop()
    return _serving_result("Engine.generate", jobs, busy, wall, sampler, [], stages)


def _serving_result(
    via: str,
    jobs: int,
    busy: float,
    wall: float,
    sampler: _UtilizationSampler,
    done: list[Any],
    stages: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "via": via,
        "jobs": jobs,
        "busy_seconds": round(busy, 4),
        "wall_seconds": round(wall, 4),
        "busy_fraction": round(busy / wall, 4) if wall > 0 else None,
        "busy_definition": (
            f"sum of {' + '.join(stages)} (each synchronised) over first start to last completion; "
            "busy_fraction_to_last_frames (the 97% target's figure): over first start to the last frames decoded"
        ),
        "nvml_mean_utilization_percent": sampler.mean(),
        "nvml": sampler.note,
        "job_seconds": [round(_stage_seconds(j, ("total",)), 4) for j in done],
    }


class _UtilizationSampler:
    """NVML's GPU utilisation sampled every 50 ms, when pynvml is importable; a second opinion on busy time."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self.note = "not sampled: CPU run" if device.type != "cuda" else ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._device = device

    def start(self) -> None:
        if self._device.type != "cuda":
            return
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._device.index or 0)
        except Exception as exc:
            self.note = f"not sampled: pynvml unavailable ({type(exc).__name__})"
            return

        def loop() -> None:
            while not self._stop.wait(0.05):
                with contextlib.suppress(Exception):
                    self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self.note = "pynvml utilization.gpu, 50 ms samples"
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)

    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 2) if self.samples else None
