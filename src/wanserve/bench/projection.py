"""Per-step seconds at full depth, whole-request projections, and the issue's targets checked against them."""

from __future__ import annotations

from typing import Any

import torch

from wanserve.bench.forward import timed_ms
from wanserve.bench.memory import peaks, start_window
from wanserve.bench.shapes import Shape


def measure_vae_decode(shape: Shape, device: torch.device, tiling: bool = False) -> dict[str, Any]:
    """One VAE decode of the shape's latents (random weights, float32 as the engine keeps the VAE): the part of
    a request after the last step, for the whole-request projection."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(**shape.vae).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    frames = (shape.num_frames - 1) // 4 + 1
    size = (1, int(vae.config.z_dim), frames, shape.height // shape.vae_stride, shape.width // shape.vae_stride)
    latents = torch.randn(size, generator=torch.Generator("cpu").manual_seed(0)).to(device)
    with torch.no_grad():
        vae.decode(latents[:, :, :2], return_dict=False)  # kernels and cuDNN's convolution choices, once
        window = start_window(device)
        ms = timed_ms(lambda: vae.decode(latents, return_dict=False), device)
    return {
        "seconds": round(ms / 1000, 3),
        "latents": list(size),
        "tiling": tiling,
        **peaks(device, window),
    }


def per_step_projection(
    shape: Shape, layers: int, forward: dict[str, Any], vae_seconds: float | None = None
) -> dict[str, Any]:
    """Per-step figures of a transformer of `layers` layers (the one timed), scaled to the shape's full depth."""
    full_layers = int(shape.transformer["num_layers"])
    scale = full_layers / layers  # block time dominates; embeddings and head are <1% at these sizes
    result: dict[str, Any] = {"measured_layers": layers, "full_layers": full_layers}
    for name, entry in forward.items():
        step = entry["ms"] / 1000 * scale
        row: dict[str, Any] = {"seconds_per_step": round(step, 3)}
        if "cached" in entry:  # the first block, embeddings and head: the same at any depth, so not scaled
            row["cached_seconds_per_step"] = round(entry["cached"]["ms"] / 1000, 4)
        if shape.projection_steps:
            row["projected_denoise_seconds"] = round(step * shape.projection_steps, 1)
            if vae_seconds is not None:
                row["projected_total_seconds"] = round(step * shape.projection_steps + vae_seconds, 1)
        result[name] = row
    if scale != 1:
        result["note"] = f"scaled linearly from {layers} to {full_layers} layers"
    if any("cached_seconds_per_step" in row for row in result.values() if isinstance(row, dict)):
        result["cached_step"] = (
            "a step whose blocks after the first the step cache serves; seconds_per_step is every block computed."
            " A request that skips a fraction s of its steps averages (1 - s) x seconds_per_step"
            " + s x cached_seconds_per_step"
        )
    if shape.projection_steps:
        decode = "plus the measured VAE decode" if vae_seconds is not None else "VAE decoding not included"
        result["projection"] = (
            f"projected, not measured end to end: {shape.projection_steps} CFG steps x the measured step, {decode}"
            " (text encoding, a few tens of ms on the GPU, and MP4 encoding, overlapped by the worker, left out)"
        )
    return result


def check_targets(shape: Shape, report: dict[str, Any]) -> dict[str, Any]:
    forward, request, per_step = report["forward"], report.get("request", {}), report.get("per_step", {})
    out: dict[str, Any] = {}
    for key, goal in shape.targets.items():
        kind, _, preset = key.rpartition("_")
        value: float | None = None
        projected = False
        if key == "serving_busy_fraction":
            serving = report.get("serving", {})
            value = serving.get("busy_fraction_to_last_frames")
            if value is None:
                value = serving.get("busy_fraction")
        elif kind == "forward_speedup" and preset in forward:
            value = forward[preset].get("speedup_vs_diffusers")
        elif kind == "request_speedup" and preset in request:
            # A request timed at fewer steps than the model's (to fit a GPU session) is judged on its
            # projection to the model's steps, which the target is for; the short ratio leans towards 1.
            entry = request[preset]
            projected_ratio = next((v for k, v in entry.items() if k.endswith("_step_speedup_vs_diffusers")), None)
            projected = projected_ratio is not None
            value = projected_ratio if projected else entry.get("speedup_vs_diffusers")
        elif kind == "step_seconds" and preset in per_step:
            value = per_step[preset]["seconds_per_step"]
        elif kind == "projected_seconds" and preset in per_step:
            row = per_step[preset]
            value = row.get("projected_total_seconds", row.get("projected_denoise_seconds"))
        at_least = "speedup" in kind or key == "serving_busy_fraction"
        met = None if value is None else (value >= goal if at_least else value <= goal)
        out[key] = {"projected": True} if projected else {}
        out[key].update(goal=goal, measured=value, met=met)
        if key == "serving_busy_fraction" and value is not None:
            out[key]["figure"] = "busy_fraction_to_last_frames"
            out[key]["busy_fraction"] = report.get("serving", {}).get("busy_fraction")
        seconds_target = kind in ("step_seconds", "projected_seconds")
        if seconds_target and value is not None and shape.reference_seconds and "diffusers" in per_step:
            out[key]["as_ratio"] = _as_ratio(shape.reference_seconds, goal, per_step["diffusers"], kind, value)
        row = per_step.get(preset, {}) if seconds_target else {}
        if value is not None and "cached_seconds_per_step" in row:
            # The goal as a share of skipped steps: random weights cannot say what share the cache will skip
            # on a real checkpoint, but they do fix what a full and a skipped step cost.
            steps = 1 if kind == "step_seconds" else shape.projection_steps or 1
            saved_if_all_skipped = steps * (row["seconds_per_step"] - row["cached_seconds_per_step"])
            out[key]["met_at_skipped_fraction"] = _fraction_needed(value - goal, saved_if_all_skipped)
    if shape.published_diffusers_ms and "diffusers" in forward:
        out["diffusers_vs_published"] = ratio(shape.published_diffusers_ms, forward["diffusers"]["ms"])
    return out


def _as_ratio(
    reference: tuple[str, float], goal: float, diffusers: dict[str, Any], kind: str, value: float
) -> dict[str, Any]:
    """A seconds goal as the speed-up it asks for over its reference, judged against diffusers in this run: the
    seconds depend on the card (an H200 is faster), the ratio much less."""
    what, seconds = reference
    theirs = diffusers["seconds_per_step"] if kind == "step_seconds" else diffusers.get("projected_total_seconds")
    if theirs is None:
        theirs = diffusers.get("projected_denoise_seconds")
    wanted, measured = round(seconds / goal, 3), ratio(theirs, value)
    return {
        "goal": wanted,
        "measured": measured,
        "met": None if measured is None else measured >= wanted,
        "basis": f"{seconds:g} s ({what}) / {goal:g} s, measured as diffusers in this run / this preset",
    }


def _fraction_needed(excess: float, saved_if_all_skipped: float) -> float | None:
    """The share of steps the cache must skip to remove `excess` seconds; None if skipping every one would not."""
    if excess <= 0:
        return 0.0
    if saved_if_all_skipped <= excess:
        return None
    return round(excess / saved_if_all_skipped, 3)


def ratio(baseline: float | None, value: float | None) -> float | None:
    if not baseline or not value:
        return None
    return round(baseline / value, 4)
