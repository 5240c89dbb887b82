"""Whole requests (text encoding, steps with CFG, VAE decoding, MP4) through `WanPipeline` and the `Engine`,
and the PSNR of their decoded frames against each other."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wanserve.bench.memory import peaks, start_window
from wanserve.bench.shapes import Shape


def bench_request(shape: Shape, spec: Any, pipe: Any, steps: int | None) -> Any:
    from wanserve.request import GenerationRequest, resolve

    shift_key = "flow_shift" if "flow_shift" in pipe.scheduler.config else "shift"
    # The pipeline runs with the shift its scheduler holds; the engine is given the same, so frames compare.
    request = GenerationRequest(
        prompt="a red fox running through fresh snow at dawn",
        width=shape.width,
        height=shape.height,
        num_frames=shape.num_frames,
        num_inference_steps=steps,
        seed=1234,
        flow_shift=float(pipe.scheduler.config[shift_key]),
    )
    if spec.tasks == {"i2v"}:
        from wanserve.engine.presets import _gray_png

        request = replace(request, image=_gray_png(shape.width, shape.height))
    return resolve(request, spec)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_pipeline_request(pipe: Any, req: Any, device: torch.device, scratch: Path) -> tuple[dict[str, Any], Any]:
    """`WanPipeline.__call__` end to end, plus the same MP4 and thumbnail writer the engine uses."""
    from wanserve.engine.engine import noise_seed
    from wanserve.engine.video import thumbnail_path_for, write_mp4, write_thumbnail

    step_ends: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        _sync(device)  # the engine synchronises each step too, for honest step times
        step_ends.append(time.perf_counter())
        return kwargs

    def call(steps: int) -> Any:
        kwargs: dict[str, Any] = dict(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            height=req.height,
            width=req.width,
            num_frames=req.num_frames,
            num_inference_steps=steps,
            guidance_scale=req.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(noise_seed(req.seed)),
            output_type="np",
            callback_on_step_end=on_step,
        )
        if req.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = req.guidance_scale_2
        if req.image is not None:
            import io

            from PIL import Image

            kwargs["image"] = Image.open(io.BytesIO(req.image)).convert("RGB")
        return pipe(**kwargs).frames[0]

    with torch.no_grad():
        warm = call(2)  # warm-up: kernels, cuDNN heuristics, the allocator
        # and the process's first MP4 and thumbnail (codec set-up), which the engine's warm-up pays too
        first = np.ascontiguousarray((np.asarray(warm) * 255).round().clip(0, 255).astype(np.uint8))
        write_mp4(first, scratch / "diffusers-warm-up.mp4", fps=req.fps)
        write_thumbnail(first, thumbnail_path_for(scratch / "diffusers-warm-up.mp4"))
    window = start_window(device)
    step_ends.clear()
    started = time.perf_counter()
    video = call(req.num_inference_steps)
    _sync(device)
    decoded = time.perf_counter()
    frames = np.ascontiguousarray((np.asarray(video) * 255).round().clip(0, 255).astype(np.uint8))
    out = scratch / "diffusers.mp4"
    write_mp4(frames, out, fps=req.fps)
    write_thumbnail(frames, thumbnail_path_for(out))
    total = time.perf_counter() - started
    steps = np.diff([started, *step_ends]) if step_ends else np.array([])
    median = float(np.median(steps[1:])) if len(steps) > 1 else None
    stages: dict[str, float] = {}
    if step_ends and median is not None:  # the same stages the engine reports, from the step callbacks
        stages = {
            "encode_prompt": round(step_ends[0] - started - median, 4),  # text encoding + latents, before step 1
            "denoise": round(step_ends[-1] - step_ends[0] + median, 4),
            "vae_decode": round(decoded - step_ends[-1], 4),
        }
    return {
        "seconds": round(total, 4),
        "timings": {**stages, "video_encode": round(total - (decoded - started), 4)},
        "pipeline_seconds": round(decoded - started, 4),
        "video_encode_seconds": round(total - (decoded - started), 4),
        "step_seconds_median": round(median, 4) if median is not None else None,
        "steps": req.num_inference_steps,
        **peaks(device, window),
    }, frames


def engine_request(engine: Any, req: Any, device: torch.device, scratch: Path) -> tuple[dict[str, Any], Any]:
    """`Engine.generate` end to end, keeping the decoded frames for the PSNR comparison."""
    captured: list[np.ndarray] = []
    decode = engine.decode

    def keep(latents: torch.Tensor) -> np.ndarray:
        frames = decode(latents)
        captured.append(frames)
        return frames

    engine.decode = keep  # instance attribute: instrumentation for this bench only
    try:
        engine.generate(replace(req, num_inference_steps=2), scratch / "warm-up.mp4")
        captured.clear()
        engine.clear_prompt_cache()  # WanPipeline encodes the prompts of every call: so does the timed request
        window = start_window(device)
        started = time.perf_counter()
        result = engine.generate(req, scratch / f"{engine.preset_info.preset}.mp4")
        total = time.perf_counter() - started
    finally:
        del engine.decode
    return {
        "seconds": round(total, 4),
        "timings": result.timings,
        "step_seconds_median": round(float(np.median(result.step_seconds)), 4) if result.step_seconds else None,
        "steps": len(result.step_seconds),
        "skipped_fraction": result.skipped_fraction,
        "skipped_steps": result.skipped_steps,
        **peaks(device, window),
    }, captured[-1]


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 videos; None when they are identical (infinite)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare videos of shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 3)


def compare_frames(requests: dict[str, Any], frames: dict[str, np.ndarray]) -> None:
    """PSNR of each preset's frames against diffusers' and exact's, once per pair (the report is saved after
    every phase, and at 81 frames of 832x480 one comparison reads about a GB)."""
    for name, entry in requests.items():
        if name == "diffusers" or name not in frames:
            continue
        if "diffusers" in frames and "psnr_vs_diffusers_db" not in entry:
            entry["psnr_vs_diffusers_db"] = psnr(frames[name], frames["diffusers"])
            entry["identical_to_diffusers"] = entry["psnr_vs_diffusers_db"] is None
        if name != "exact" and "exact" in frames and "psnr_vs_exact_db" not in entry:
            entry["psnr_vs_exact_db"] = psnr(frames[name], frames["exact"])
            entry["identical_to_exact"] = entry["psnr_vs_exact_db"] is None


def why_no_request(shape: Shape, wanted: bool, pipe: Any, asked: bool | None = None) -> str:
    if asked is False:
        return "turned off (--no-request)"
    if not wanted:
        return f"{shape.name} is timed per {shape.unit} only (pass --request to build the whole pipeline)"
    if pipe is not None:
        return "not timed: see skipped_phases and errors"
    return "no pipeline"


def projected_seconds(entry: dict[str, Any], steps: int) -> float | None:
    """A measured request re-projected to `steps` denoising steps: its time outside the denoising loop plus
    `steps` x its mean step. The issue's request target is for the model's default step count, at which
    the fixed VAE decode and MP4 weigh far less than in a short timed request. The mean, not the median: with a
    step cache, steps are full or skipped, and once half are skipped the median prices every step as a skip."""
    measured = entry.get("steps")
    denoise = (entry.get("timings") or {}).get("denoise")
    step = denoise / measured if denoise and measured else entry.get("step_seconds_median")
    if not step or not measured or "seconds" not in entry:
        return None
    return round(entry["seconds"] + (steps - measured) * step, 3)
