"""One `wanserve bench` run: phases in order, each timed, saved after it, and allowed to fail alone."""

from __future__ import annotations

import datetime as dt
import functools
import gc
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wanserve.bench.cold_start import measure_cold_start
from wanserve.bench.forward import forward_inputs, matmul_ceiling, time_cached_unit, time_unit, unit_call, unit_flops
from wanserve.bench.models import build_models, save_pipeline
from wanserve.bench.options import BenchOptions
from wanserve.bench.projection import check_targets, measure_vae_decode, per_step_projection, ratio
from wanserve.bench.report import SCHEMA, describe_environment, read_results, results_path, write_report
from wanserve.bench.requests import (
    bench_request,
    compare_frames,
    engine_request,
    plain_pipeline_request,
    projected_seconds,
    why_no_request,
)
from wanserve.bench.serving import measure_serving
from wanserve.bench.shapes import PUBLISHED, SHAPES, Shape, describe_shape
from wanserve.engine.presets import PRESET_NAMES

log = logging.getLogger(__name__)


def run_bench(options: BenchOptions) -> tuple[Path, dict[str, Any]]:
    """Run one benchmark and merge it into the day's results file; returns that file and this run's report."""
    from wanserve.config import Settings
    from wanserve.engine.device import pick_device

    if options.cpu_tiny:
        # Tiny tensors gain nothing from intra-op threads, and on a shared CI runner OpenMP threads spinning
        # against other processes turn a 10 ms forward into a 1 s outlier.
        torch.set_num_threads(1)
    shape = SHAPES["tiny" if options.cpu_tiny else options.shape]
    device = torch.device("cpu") if options.cpu_tiny else pick_device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    presets = _ordered(options.presets)
    settings_kwargs: dict[str, Any] = {
        "device": str(device),
        "cfg_batch": options.cfg_batch,
        "text_encoder_cpu": options.text_encoder_cpu,
        "vae_tiling": options.vae_tiling,
    }
    if options.cache_dir is not None:
        settings_kwargs["cache_dir"] = options.cache_dir
    settings = Settings(**settings_kwargs)
    steps = options.steps or (20 if shape.tiny else None)
    jobs = options.jobs if options.jobs is not None else _default_jobs(shape)
    want_request = shape.request if options.request is None else options.request

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "run": _run_name(shape, options),
        "run_id": uuid.uuid4().hex[:12],  # tells this run's saves from another run's of the same name
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "options": {
            "shape": shape.name,
            "checkpoint": str(options.checkpoint) if options.checkpoint else None,
            "presets": list(presets),
            "steps": steps,
            "repeats": options.repeats,
            "jobs": jobs,
            "layers": options.layers,
            "cfg_batch": options.cfg_batch,
            "text_encoder_cpu": options.text_encoder_cpu,
            "vae_tiling": options.vae_tiling,
            "baseline": options.baseline,
            "weights": "tiny" if shape.tiny else ("checkpoint" if options.checkpoint else "random"),
            "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
        },
        "published": PUBLISHED if not shape.tiny else None,
    }
    environment = describe_environment(device)
    read_results(results_path(environment, options.out))  # one that is not a results file: refused, before any work
    run = _Run(report, environment, options.out, options.time_budget, device)
    report["matmul_ceiling"] = matmul_ceiling(device)
    log.info("matmul ceiling: %.2f TFLOP/s", report["matmul_ceiling"]["tflops"])

    forward: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    frames: dict[str, np.ndarray] = {}
    serving: dict[str, Any] = {}
    report["forward"] = forward

    def derive() -> None:
        """The figures computed from the measured ones: refreshed before every save, so a partial file is whole."""
        compare_frames(requests, frames)
        report["request"] = requests or {"skipped": no_request}
        report["serving"] = serving or {"skipped": _why_no_serving(jobs, requests, no_request)}
        if shape.unit == "cfg_step":
            vae_seconds = report.get("vae_decode", {}).get("seconds")
            layers = int(report["shape"]["num_layers"])  # what ran: a checkpoint's own, or --layers
            report["per_step"] = per_step_projection(shape, layers, forward, vae_seconds)
        report["targets"] = check_targets(shape, report)

    no_request = ""
    with tempfile.TemporaryDirectory(prefix="wanserve-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        pipe, spec, model_ref, transformer = run.phase(
            "build", lambda: build_models(shape, options, settings, device, dtype, want_request), required=True
        )
        no_request = why_no_request(shape, want_request, pipe, options.request)
        config = transformer.config
        report["shape"] = describe_shape(shape, config)  # before any save: derive() reads it
        run.derive = derive
        want_cold = options.cold_start if options.cold_start is not None else (model_ref is not None)
        if want_cold and model_ref is None and pipe is not None:  # saved before any preset rewrites the modules
            saved = run.phase("save_weights", lambda: save_pipeline(pipe, scratch / "weights"))
            model_ref = str(saved) if saved is not None else None
        inputs = forward_inputs(shape, config, device, dtype)
        flops = unit_flops(shape, config, inputs.tokens)
        report["shape"]["tokens"] = inputs.tokens
        report["shape"]["flops_per_unit"] = flops
        ceiling = report["matmul_ceiling"]["tflops"]

        request = None
        if want_request and pipe is not None and spec is not None:
            request = bench_request(shape, spec, pipe, steps)

        def timed_unit() -> dict[str, Any]:
            return time_unit(
                transformer, inputs, shape.unit, options.repeats, device, flops, ceiling, options.cfg_batch
            )

        if not options.baseline:
            run.skipped["diffusers_forward"] = run.skipped["diffusers_request"] = "turned off (--no-baseline)"
        else:
            log.info("timing diffusers eager (%s)", shape.unit)
            baseline = run.phase(
                "diffusers_forward",
                lambda: time_unit(transformer, inputs, shape.unit, options.repeats, device, flops, ceiling),
            )
            if baseline is not None:
                forward["diffusers"] = baseline
            if request is not None:
                log.info("whole request through WanPipeline.__call__")
                measured = run.phase(
                    "diffusers_request", lambda: plain_pipeline_request(pipe, request, device, scratch)
                )
                if measured is not None:
                    requests["diffusers"], frames["diffusers"] = measured

        if shape.projection_steps:
            # Before the presets, whose compiles may spend the budget: the projection needs the decode too (a few
            # percent of a 720p video), and it does not depend on a preset.
            decode = run.phase("vae_decode", lambda: measure_vae_decode(shape, device, options.vae_tiling))
            if decode is not None:
                report["vae_decode"] = decode

        engine = None
        if pipe is not None and spec is not None:
            from wanserve.engine.engine import Engine

            engine = Engine(spec, pipe, settings, device)
        for preset in presets:
            log.info("preset %s", preset)
            warm = unit_call(transformer, inputs, shape.unit, options.cfg_batch)
            # A compile begun near the budget's end would run past it: the last preset's apply and timed forward
            # say what this one's may take.
            earlier = [p for p in presets[: presets.index(preset)] if f"{p}_apply" in run.phases]
            expect = (
                sum(run.phases.get(f"{earlier[-1]}_{what}", 0.0) for what in ("apply", "forward")) if earlier else None
            )
            info = run.phase(
                f"{preset}_apply",
                lambda: _apply(preset, engine, transformer, device, warm),  # noqa: B023
                expect=expect,
            )
            if info is None:
                continue
            entry = run.phase(f"{preset}_forward", timed_unit, finishes=True)
            if entry is not None:
                baseline_ms = forward.get("diffusers", {}).get("ms")
                entry["speedup_vs_diffusers"] = ratio(baseline_ms, entry["ms"])
                entry["preset"] = info.to_dict()
                forward[preset] = entry
                if info.active_threshold is not None:
                    args = (transformer, inputs, shape.unit, options.repeats, device, info, options.cfg_batch)
                    cached = run.phase(
                        f"{preset}_cached_step", functools.partial(time_cached_unit, *args), finishes=True
                    )
                    if cached is not None:
                        entry["cached"] = cached
            if request is None or engine is None:
                continue
            measured = run.phase(f"{preset}_request", lambda: engine_request(engine, request, device, scratch))
            if measured is None:
                continue
            result, frames[preset] = measured
            result["speedup_vs_diffusers"] = ratio(requests.get("diffusers", {}).get("seconds"), result["seconds"])
            full = int(spec.num_inference_steps)
            if result.get("steps") and result["steps"] < full and "diffusers" in requests:
                mine, theirs = projected_seconds(result, full), projected_seconds(requests["diffusers"], full)
                result[f"projected_{full}_step_speedup_vs_diffusers"] = ratio(theirs, mine)
            requests[preset] = result
            if not serving and "serving" not in run.phases and jobs > 0:
                # Two phases, the figure the target judges first: a run stopped in the second keeps the first.
                served = run.phase("serving", lambda: measure_serving(engine, request, jobs, scratch))
                if served:
                    serving.update(served, preset=preset)  # the first preset whose request ran
                if served and served["via"].startswith("Worker"):
                    alone = run.phase(
                        "serving_sequential", lambda: measure_serving(engine, request, jobs, scratch, overlap=False)
                    )
                    if alone:
                        serving["sequential"] = alone
                        serving["overlap_wall_speedup"] = ratio(alone["wall_seconds"], served["wall_seconds"])

        # The fresh process needs the device to itself: free this one's models first.
        # (warm, info and args hold the transformer too)
        engine = pipe = transformer = inputs = warm = info = args = None  # the phases' closures hold these names
        _free(device)
        if options.cold_start is False:
            report["cold_start"] = {"skipped": "turned off (--no-cold-start)"}
        elif not want_cold:
            report["cold_start"] = {
                "skipped": "random weights are not on disk; pass --checkpoint DIR, or --cold-start to save them first"
            }
        elif model_ref is None:
            report["cold_start"] = {"skipped": "no pipeline to load (forward-only shape)"}
        else:
            # Two phases: the empty-cache start is saved before the second, kept-cache one begins.
            first = functools.partial(measure_cold_start, model_ref, presets[0], settings_kwargs, scratch)
            cold = run.phase("cold_start", first)
            report["cold_start"] = cold or {"skipped": "see errors or skipped_phases"}
            if cold:
                cold["warm_cache"] = {"skipped": "see errors or skipped_phases"}
                warm_cache = run.phase("cold_start_warm_cache", functools.partial(first, kept_cache=True))
                if warm_cache:
                    cold["warm_cache"] = warm_cache
    path = run.save(complete=True)
    log.info("wrote %s", path)
    return path, report


class _Run:
    """The bookkeeping of one bench run. Each phase is timed, and the report is saved after it, so a run cut
    short (a device session's time limit, a crash) keeps what it measured. A phase that raises is recorded in
    `errors` and the run goes on to the next one: on a GPU nobody has tried yet, one failing kernel must not
    cost the other figures. Phases that would start after `budget` seconds are skipped and listed."""

    def __init__(
        self, report: dict[str, Any], environment: dict[str, Any], out: Path, budget: float | None, device: Any
    ) -> None:
        self.report, self.environment, self.out, self.budget, self.device = report, environment, out, budget, device
        self.started = time.perf_counter()
        # The budget counts from when the caller's clock started (gpu_runs.sh's hard stop is timed from the
        # process's start, before the imports and CUDA start-up this run spent already), else from now.
        clock = os.environ.get("BENCH_CLOCK_START", "")
        self.budget_origin = float(clock) if clock.replace(".", "", 1).isdigit() else time.time()
        # When the caller kills the run (seconds from the same origin): a phase `expect`ed to end past it is
        # skipped, not begun and cut short (a 14B fp8 recompile may outlast the budget's slack).
        stop = os.environ.get("BENCH_STOP_AFTER", "")
        self.stop_after = float(stop) if stop.replace(".", "", 1).isdigit() else None
        self.phases: dict[str, float] = report.setdefault("phase_seconds", {})  # to plan device time
        self.errors: dict[str, str] = report.setdefault("errors", {})
        self.skipped: dict[str, str] = report.setdefault("skipped_phases", {})
        self.derive: Callable[[], None] = lambda: None

    def phase(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        required: bool = False,
        finishes: bool = False,
        expect: float | None = None,
    ) -> Any:
        """fn's result, or None when it was skipped for the budget or failed (and not `required`). A phase that
        `finishes` what an earlier phase paid for (a preset's timed forward after its compile) is never skipped;
        one `expect`ed to take that many seconds is skipped when it would end past the caller's hard stop."""
        elapsed = time.time() - self.budget_origin
        why = None
        if self.budget is not None and elapsed >= self.budget:
            why = f"time budget spent ({elapsed:.0f} s of {self.budget:g} s)"
        elif self.stop_after is not None and expect is not None and elapsed + expect > self.stop_after:
            why = (
                f"it would take about {expect:.0f} s: past the run's stop at {self.stop_after:g} s, at {elapsed:.0f} s"
            )
        if not (required or finishes) and why is not None:
            self.skipped[name] = why
            log.warning("bench: skipping %s: %s", name, self.skipped[name])
            self.save()
            return None
        started = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"[:1000]
            log.exception("bench: %s failed", name)
            _free(self.device)
            if required:
                raise
            return None
        except BaseException as exc:  # Ctrl-C, SystemExit: say where the run stopped, then stop
            self.errors[name] = f"interrupted: {type(exc).__name__}"
            raise
        finally:
            self.phases[name] = round(time.perf_counter() - started, 3)
            self.save()

    def save(self, complete: bool = False) -> Path:
        self.derive()
        self.report["complete"] = complete
        self.report["bench_seconds"] = round(time.perf_counter() - self.started, 2)
        return write_report(self.report, self.environment, self.out)


def _free(device: Any) -> None:
    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def _ordered(presets: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [p for p in presets if p not in PRESET_NAMES]
    if unknown or not presets:
        raise ValueError(f"unknown or no preset(s) {', '.join(unknown)}; presets are {', '.join(PRESET_NAMES)}")
    # Each preset adds to the previous one on the same modules, so they run in this order.
    return tuple(p for p in PRESET_NAMES if p in presets)


def _why_no_serving(jobs: int, requests: dict[str, Any], no_request: str) -> str:
    if jobs == 0:
        return "turned off (--jobs 0)"
    if not requests and no_request:
        return f"no whole request in this run: {no_request}"
    return "not measured: see skipped_phases and errors"


def _default_jobs(shape: Shape) -> int:
    return 2 if shape.tiny else 3


def _run_name(shape: Shape, options: BenchOptions) -> str:
    """The run's key in the day's results file: the shape plus every option that changes what is measured, so
    that runs of one shape with other presets or steps sit side by side instead of replacing each other."""
    name = shape.name
    if options.layers:
        name += f"-{options.layers}layers"
    if options.checkpoint:
        name += "-checkpoint"
    if _ordered(options.presets) != PRESET_NAMES:
        name += "-" + "-".join(_ordered(options.presets))
    if options.steps:
        name += f"-{options.steps}steps"
    if options.cfg_batch:
        name += "-cfg-batch"
    if options.text_encoder_cpu:
        name += "-text-encoder-cpu"
    if options.vae_tiling:
        name += "-vae-tiling"
    if options.jobs is not None and options.jobs != _default_jobs(shape):
        name += f"-{options.jobs}jobs"
    if options.request is not None:
        name += "-request" if options.request else "-no-request"
    if options.cold_start is not None:
        name += "-cold-start" if options.cold_start else "-no-cold-start"
    if not options.baseline:
        name += "-no-baseline"
    return name


def _apply(preset: str, engine: Any, transformer: Any, device: torch.device, warm: Callable[[], None]) -> Any:
    """Apply a preset through the engine (warm-up included) or, for a bare transformer, with one timed-unit
    call as the warm-up, falling back the same way when compiled code fails there."""
    from wanserve.engine.presets import apply_preset, configure_transformers, warm_up_with_fallback

    if engine is not None:
        return apply_preset(engine, preset)
    started = time.perf_counter()
    info = configure_transformers([transformer], preset, device)
    if info.compiled:
        info.warmup_seconds = warm_up_with_fallback([transformer], info, warm)
    info.apply_seconds = time.perf_counter() - started
    return info
