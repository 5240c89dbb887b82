"""`wanserve bench`: plain diffusers and every wanserve preset, timed in the same process on the same weights.

Per run it measures
- one transformer forward (or one CFG step: two forwards) for unmodified diffusers eager and for each preset:
  median of N after warm-up (CUDA events on a GPU, perf_counter on the CPU), achieved TFLOP/s from an
  analytic FLOP count, the share of a measured matmul ceiling, peak GPU memory;
- a whole request (text encoding, N steps with CFG, VAE decoding, MP4) through `WanPipeline.__call__` and
  through the `Engine` under each preset, with the skipped-step fraction and the PSNR of the decoded frames
  against `exact` for the lossy presets;
- cold start (process start to engine ready, weights from local disk), warm-up, and serving efficiency: busy
  time over wall time across K back-to-back jobs through the real `Worker`.

Presets are applied to the same modules one after the other (exact, then fast, then fastest: each adds to the
previous), after every diffusers measurement, so the baseline always runs the untouched model.
Results go to `benchmarks/results/<device>-<date>.json`, one entry per run name, merged with earlier runs of
the same day and device.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from wanserve.engine.presets import IMAGE_TOKENS, PRESET_NAMES, TEXT_TOKENS

log = logging.getLogger(__name__)

SCHEMA = 1

# WanTransformer3DModel configs of the released checkpoints (their transformer/config.json).
_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
T2V_1_3B = dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16)
T2V_14B = dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16)
I2V_14B = dict(T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
TI2V_5B = dict(_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)

# AutoencoderKLWan: the Wan 2.1 VAE is diffusers' default config; the Wan 2.2 (TI2V-5B) one is patchified.
VAE_21: dict[str, Any] = {}
VAE_22: dict[str, Any] = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
# google/umt5-xxl, the text encoder of every Wan model.
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclass(frozen=True)
class Shape:
    name: str
    model: str  # catalog name: request defaults, and the spec the engine serves
    transformer: dict[str, Any]
    width: int
    height: int
    num_frames: int
    unit: Literal["forward", "cfg_step"]  # what one timed call is
    vae: dict[str, Any] = field(default_factory=dict)
    vae_stride: int = 8
    expand_timesteps: bool = False  # Wan 2.2 TI2V: one timestep per token
    request: bool = False  # whole-request timing by default (random weights need a random T5 and VAE too)
    projection_steps: int | None = None  # project a whole request from one CFG step
    published_diffusers_ms: float | None = None  # the baseline, 1x H100, bf16
    targets: dict[str, float] = field(default_factory=dict)
    tiny: bool = False


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "1.3b-480p",
            "wan2.1-t2v-1.3b",
            T2V_1_3B,
            832,
            480,
            81,
            "forward",
            vae=VAE_21,
            request=True,
            published_diffusers_ms=623.0,
            targets={"forward_speedup_exact": 1.3, "request_speedup_exact": 1.25, "serving_busy_fraction": 0.97},
        ),
        Shape(
            "5b-720p",
            "wan2.2-ti2v-5b",
            TI2V_5B,
            1280,
            704,
            121,
            "forward",
            vae=VAE_22,
            vae_stride=16,
            expand_timesteps=True,
            request=True,
            published_diffusers_ms=1078.0,
            targets={"forward_speedup_exact": 1.3},
        ),
        Shape(
            "14b-720p-8layers",
            "wan2.1-t2v-14b",
            dict(T2V_14B, num_layers=8),
            1280,
            720,
            81,
            "forward",
            published_diffusers_ms=2489.0,
            targets={"forward_speedup_exact": 1.3},
        ),
        Shape(
            "14b-i2v-480p",
            "wan2.1-i2v-14b-480p",
            I2V_14B,
            832,
            480,
            81,
            "cfg_step",
            vae=VAE_21,
            targets={"step_seconds_exact": 5.2, "step_seconds_fastest": 2.6},
        ),
        Shape(
            "a14b-720p",
            "wan2.2-t2v-a14b",
            T2V_14B,
            1280,
            720,
            81,
            "cfg_step",
            vae=VAE_21,
            projection_steps=40,
            targets={"projected_seconds_exact": 833.0, "projected_seconds_fastest": 400.0},
        ),
        Shape("tiny", "tiny-t2v", {}, 64, 64, 9, "forward", request=True, tiny=True),
    )
}

# Published per-step figures for Wan2.1-I2V-14B 480p 81 frames, 40 steps, one H100 (from the issue).
PUBLISHED = {
    "wan2.1-i2v-14b-480p_s_per_step_1xH100": {
        "diffusers": 9.77,
        "xDiT": 8.93,
        "FastVideo": 7.35,
        "SGLang": 6.13,
        "LightX2V": 5.18,
    },
    "wan2.2-t2v-a14b-720p_official_seconds": 1041.5,
}


@dataclass
class BenchOptions:
    shape: str = "1.3b-480p"
    checkpoint: Path | None = None
    presets: tuple[str, ...] = PRESET_NAMES
    steps: int | None = None  # denoising steps of the timed requests; default: 20 tiny, else the model's
    repeats: int = 5
    cpu_tiny: bool = False
    out: Path = Path("benchmarks/results")
    jobs: int | None = None  # K back-to-back jobs for the serving figure (default 3; tiny 2); 0 skips it
    layers: int | None = None  # override num_layers of a random-weight transformer
    cfg_batch: bool = False
    text_encoder_cpu: bool = False  # the engine's memory settings, as on a 24 GB card
    vae_tiling: bool = False
    request: bool | None = None  # None: the shape's default
    cold_start: bool | None = None  # None: when weights are on disk already (tiny, --checkpoint)
    device: str = "auto"
    cache_dir: Path | None = None
    time_budget: float | None = None  # seconds after which no new phase starts (a device session's limit)


# ---- entry point ---------------------------------------------------------------------------------------------


def run_bench(options: BenchOptions) -> tuple[Path, dict[str, Any]]:
    """Run one benchmark and merge it into the day's results file; returns that file and this run's report."""
    from wanserve.config import Settings
    from wanserve.engine.engine import pick_device

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
    jobs = options.jobs if options.jobs is not None else (2 if shape.tiny else 3)
    want_request = shape.request if options.request is None else options.request

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "run": _run_name(shape, options),
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
            "weights": "tiny" if shape.tiny else ("checkpoint" if options.checkpoint else "random"),
            "dtype": str(dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
        },
        "published": PUBLISHED if not shape.tiny else None,
    }
    environment = describe_environment(device)
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
        _compare_frames(requests, frames)
        report["request"] = requests or {"skipped": no_request}
        report["serving"] = serving or {"skipped": "no whole-request pipeline in this run, or --jobs 0"}
        if shape.unit == "cfg_step":
            vae_seconds = report.get("vae_decode", {}).get("seconds")
            report["per_step"] = per_step_projection(shape, options, forward, vae_seconds)
        report["targets"] = _targets(shape, report)

    no_request = ""
    with tempfile.TemporaryDirectory(prefix="wanserve-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        pipe, spec, model_ref, transformer = run.phase(
            "build", lambda: _build(shape, options, settings, device, dtype, want_request), required=True
        )
        no_request = _why_no_request(shape, want_request, pipe)
        run.derive = derive
        want_cold = options.cold_start if options.cold_start is not None else (model_ref is not None)
        if want_cold and model_ref is None and pipe is not None:  # saved before any preset rewrites the modules
            saved = run.phase("save_weights", lambda: _save_pipeline(pipe, scratch / "weights"))
            model_ref = str(saved) if saved is not None else None
        config = transformer.config
        report["shape"] = _describe_shape(shape, config)
        inputs = _forward_inputs(shape, config, device, dtype)
        flops = unit_flops(shape, config, inputs.tokens)
        report["shape"]["tokens"] = inputs.tokens
        report["shape"]["flops_per_unit"] = flops
        ceiling = report["matmul_ceiling"]["tflops"]

        request = None
        if want_request and pipe is not None and spec is not None:
            request = _bench_request(shape, spec, pipe, steps)

        def timed_unit() -> dict[str, Any]:
            return time_unit(
                transformer, inputs, shape.unit, options.repeats, device, flops, ceiling, options.cfg_batch
            )

        log.info("timing diffusers eager (%s)", shape.unit)
        baseline = run.phase(
            "diffusers_forward",
            lambda: time_unit(transformer, inputs, shape.unit, options.repeats, device, flops, ceiling),
        )
        if baseline is not None:
            forward["diffusers"] = baseline
        if request is not None:
            log.info("whole request through WanPipeline.__call__")
            measured = run.phase("diffusers_request", lambda: plain_pipeline_request(pipe, request, device, scratch))
            if measured is not None:
                requests["diffusers"], frames["diffusers"] = measured
        if shape.projection_steps:  # before the presets: the projection needs it more than a later preset
            decode = run.phase("vae_decode", lambda: measure_vae_decode(shape, device, options.vae_tiling))
            if decode is not None:
                report["vae_decode"] = decode

        engine = None
        if pipe is not None and spec is not None:
            from wanserve.engine.engine import Engine

            engine = Engine(spec, pipe, settings, device)
        for preset in presets:
            log.info("preset %s", preset)
            warm = _unit_call(transformer, inputs, shape.unit, options.cfg_batch)
            info = run.phase(f"{preset}_apply", lambda: _apply(preset, engine, transformer, device, warm))  # noqa: B023
            if info is None:
                continue
            entry = run.phase(f"{preset}_forward", timed_unit)
            if entry is not None:
                baseline_ms = forward.get("diffusers", {}).get("ms")
                entry["speedup_vs_diffusers"] = _ratio(baseline_ms, entry["ms"])
                entry["preset"] = info.to_dict()
                forward[preset] = entry
                if info.active_threshold is not None:
                    args = (transformer, inputs, shape.unit, options.repeats, device, info, options.cfg_batch)
                    cached = run.phase(f"{preset}_cached_step", functools.partial(time_cached_unit, *args))
                    if cached is not None:
                        entry["cached"] = cached
            if request is None or engine is None:
                continue
            measured = run.phase(f"{preset}_request", lambda: engine_request(engine, request, device, scratch))
            if measured is None:
                continue
            result, frames[preset] = measured
            result["speedup_vs_diffusers"] = _ratio(requests.get("diffusers", {}).get("seconds"), result["seconds"])
            requests[preset] = result
            if not serving and "serving" not in run.phases and jobs > 0:
                serving.update(run.phase("serving", lambda: measure_serving(engine, request, jobs, scratch)) or {})

        # The fresh process needs the device to itself: free this one's models first.
        engine = pipe = transformer = inputs = None  # the phases' closures hold these names, so no `del`
        _free(device)
        if not want_cold:
            report["cold_start"] = {
                "skipped": "random weights are not on disk; pass --checkpoint DIR, or --cold-start to save them first"
            }
        elif model_ref is None:
            report["cold_start"] = {"skipped": "no pipeline to load (forward-only shape)"}
        else:
            cold = run.phase("cold_start", lambda: measure_cold_start(model_ref, presets[0], settings_kwargs, scratch))
            report["cold_start"] = cold or {"skipped": "see errors or skipped_phases"}
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
        self.phases: dict[str, float] = report.setdefault("phase_seconds", {})  # to plan device time
        self.errors: dict[str, str] = report.setdefault("errors", {})
        self.skipped: dict[str, str] = report.setdefault("skipped_phases", {})
        self.derive: Callable[[], None] = lambda: None

    def phase(self, name: str, fn: Callable[[], Any], *, required: bool = False) -> Any:
        """fn's result, or None when it was skipped for the budget or failed (and not `required`)."""
        elapsed = time.perf_counter() - self.started
        if not required and self.budget is not None and elapsed >= self.budget:
            self.skipped[name] = f"time budget spent ({elapsed:.0f} s of {self.budget:g} s)"
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
    return name


# ---- models --------------------------------------------------------------------------------------------------


def _build(
    shape: Shape, options: BenchOptions, settings: Any, device: torch.device, dtype: torch.dtype, request: bool
) -> tuple[Any, Any, str | None, Any]:
    """(pipeline or None, spec or None, what a fresh process would load or None, the transformer to time)."""
    from wanserve.catalog import resolve_spec
    from wanserve.engine.loading import load_pipeline, locate

    if shape.tiny or options.checkpoint is not None:
        model_ref = shape.model if shape.tiny else str(options.checkpoint)
        spec, path = locate(model_ref, settings)
        pipe = load_pipeline(path, dtype=dtype, vae_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        return pipe, spec, model_ref, pipe.transformer
    kwargs = dict(shape.transformer)
    if options.layers:
        kwargs["num_layers"] = options.layers
    if not request:
        return None, None, None, build_random_transformer(kwargs, device, dtype)
    spec = resolve_spec(shape.model)
    pipe = build_random_pipeline(shape, kwargs, spec, device, dtype)
    return pipe, spec, None, pipe.transformer


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_transformer(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A WanTransformer3DModel with random weights, laid out as `from_pretrained(..., torch_dtype=dtype)` would."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    # Initialised directly in `dtype` on the device: a float32 init of 14B parameters would need 56 GB first.
    with _default_dtype(dtype), torch.device(device):
        model = WanTransformer3DModel(**kwargs)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_random_pipeline(
    shape: Shape, transformer_kwargs: dict[str, Any], spec: Any, device: torch.device, dtype: torch.dtype
) -> Any:
    """The whole pipeline at the real sizes with random weights: UMT5-XXL, the model's VAE, the transformer
    (both experts for A14B) and, for Wan 2.1 I2V, a CLIP ViT-H/14 image encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from wanserve.engine.tiny import _tokenizer

    transformer = build_random_transformer(transformer_kwargs, device, dtype)
    with _default_dtype(dtype), torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval().requires_grad_(False)
    with torch.device(device):
        vae = AutoencoderKLWan(**shape.vae).eval().requires_grad_(False)  # float32, as Engine.load keeps it
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec.flow_shift
    )
    # A byte-level tokenizer (no download): prompts are padded to 512 tokens either way, so the cost is the same.
    common: dict[str, Any] = dict(
        tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    if transformer_kwargs.get("image_dim"):
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        vision = CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=1024,
            hidden_act="gelu",
        )
        with torch.device(device):
            image_encoder = CLIPVisionModel(vision).eval().requires_grad_(False)
        processor = CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})
        pipe = WanImageToVideoPipeline(**common, image_encoder=image_encoder, image_processor=processor)
    elif spec.two_experts:
        pipe = WanPipeline(
            **common,
            transformer_2=build_random_transformer(transformer_kwargs, device, dtype),
            boundary_ratio=spec.boundary_ratio,
        )
    else:
        pipe = WanPipeline(**common, expand_timesteps=shape.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_pipeline(pipe: Any, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _describe_shape(shape: Shape, config: Any) -> dict[str, Any]:
    return {
        "name": shape.name,
        "model": shape.model,
        "width": shape.width,
        "height": shape.height,
        "num_frames": shape.num_frames,
        "unit": shape.unit,
        "num_layers": int(config.num_layers),
        "hidden": int(config.num_attention_heads * config.attention_head_dim),
        "heads": int(config.num_attention_heads),
        "ffn_dim": int(config.ffn_dim),
        "in_channels": int(config.in_channels),
        "published_diffusers_ms": shape.published_diffusers_ms,
    }


# ---- FLOPs and the matmul ceiling ------------------------------------------------------------------------------


def transformer_flops(config: Any, tokens: int, text_len: int = TEXT_TOKENS, per_token_timestep: bool = False) -> float:
    """FLOPs of one forward: linear layers 2 x params x rows, attention 4 x queries x keys x hidden."""
    d = int(config.num_attention_heads * config.attention_head_dim)
    ffn, layers = int(config.ffn_dim), int(config.num_layers)
    patch = math.prod(config.patch_size)
    image = IMAGE_TOKENS if config.image_dim else 0
    per_layer = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * ffn)  # self-attn QKVO, cross-attn Q and O, FFN
    per_layer += 2 * text_len * 2 * d * d  # cross-attn K and V over the text
    per_layer += 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self- and cross-attention scores and values
    if image:
        per_layer += 2 * image * 2 * d * d + 4 * tokens * image * d  # image K/V and attention (I2V)
    flops = layers * per_layer
    flops += 2 * tokens * (config.in_channels * patch * d + d * config.out_channels * patch)  # patchify, head
    flops += 2 * text_len * (config.text_dim * d + d * d)  # text projection
    time_rows = tokens if per_token_timestep else 1
    flops += 2 * time_rows * (config.freq_dim * d + d * d + d * 6 * d)  # timestep MLP and modulation
    if image:
        flops += 2 * image * (config.image_dim * config.image_dim + config.image_dim * d)
    return float(flops)


def unit_flops(shape: Shape, config: Any, tokens: int) -> float:
    forward = transformer_flops(config, tokens, per_token_timestep=shape.expand_timesteps)
    return forward * (2 if shape.unit == "cfg_step" else 1)


def matmul_ceiling(device: torch.device) -> dict[str, Any]:
    """A large matmul's throughput: what "percent of ceiling" is measured against (bf16 GPU, float32 CPU)."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = [_timed(lambda: torch.mm(a, b), device) for _ in range(12)][2:]
    seconds = statistics.median(times) / 1000
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / seconds / 1e12, 4)}


# ---- one transformer call --------------------------------------------------------------------------------------


@dataclass
class ForwardInputs:
    tokens: int
    cond: dict[str, Any]
    uncond: dict[str, Any]

    def batched(self) -> dict[str, Any]:
        """Both CFG passes as one batch of 2, as the engine runs them with cfg_batch."""
        both: dict[str, Any] = {}
        for key, value in self.cond.items():
            other = self.uncond[key]
            both[key] = None if value is None else torch.cat([value, other])
        return both


def _forward_inputs(shape: Shape, config: Any, device: torch.device, dtype: torch.dtype) -> ForwardInputs:
    p_t, p_h, p_w = config.patch_size
    frames = (shape.num_frames - 1) // 4 + 1
    height, width = shape.height // shape.vae_stride, shape.width // shape.vae_stride
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    generator = torch.Generator("cpu").manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device, dtype)

    hidden = randn(1, int(config.in_channels), frames, height, width)
    if shape.expand_timesteps:
        timestep = torch.full((1, tokens), 500.0, device=device)
    else:
        timestep = torch.tensor([500.0], device=device)
    image = randn(1, IMAGE_TOKENS, int(config.image_dim)) if config.image_dim else None
    common = {"hidden_states": hidden, "timestep": timestep, "encoder_hidden_states_image": image}
    cond = dict(common, encoder_hidden_states=randn(1, TEXT_TOKENS, int(config.text_dim)))
    uncond = dict(common, encoder_hidden_states=randn(1, TEXT_TOKENS, int(config.text_dim)))
    return ForwardInputs(tokens, cond, uncond)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of fn: CUDA events on a GPU (the GPU's time, not the launch's), perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def _unit_call(
    transformer: Any, inputs: ForwardInputs, unit: str, cfg_batch: bool, reset: bool = True
) -> Callable[[], None]:
    """One forward, or one CFG step (two forwards, or one batch of 2 with cfg_batch), from a reset step cache
    unless `reset` is False."""
    both = inputs.batched() if cfg_batch and unit == "cfg_step" else None

    @torch.no_grad()
    def call() -> None:
        if reset and getattr(transformer, "is_cache_enabled", False):
            transformer._reset_stateful_cache()
        if both is not None:
            with transformer.cache_context("cond_uncond"):
                transformer(**both, return_dict=False)
            return
        with transformer.cache_context("cond"):
            transformer(**inputs.cond, return_dict=False)
        if unit == "cfg_step":
            with transformer.cache_context("uncond"):
                transformer(**inputs.uncond, return_dict=False)

    return call


def time_unit(
    transformer: Any,
    inputs: ForwardInputs,
    unit: str,
    repeats: int,
    device: torch.device,
    flops: float,
    ceiling_tflops: float,
    cfg_batch: bool = False,
) -> dict[str, Any]:
    """Median time of one forward (or CFG step). Under a step cache the cache is reset before every call,
    so each timed call is a full computation; what caching saves shows in the per-request figures."""
    call = _unit_call(transformer, inputs, unit, cfg_batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first = _timed(call, device)  # includes compilation when the preset compiles
    _timed(call, device)
    times = [_timed(call, device) for _ in range(max(repeats, 1))]
    ms = statistics.median(times)
    tflops = flops / (ms / 1000) / 1e12
    return {
        "ms": round(ms, 3),
        "ms_all": [round(t, 3) for t in times],
        "first_call_ms": round(first, 3),
        "tflops": round(tflops, 4),
        "percent_of_ceiling": round(100 * tflops / ceiling_tflops, 2) if ceiling_tflops else None,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
    }


def time_cached_unit(
    transformer: Any,
    inputs: ForwardInputs,
    unit: str,
    repeats: int,
    device: torch.device,
    info: Any,
    cfg_batch: bool = False,
) -> dict[str, Any]:
    """Median time of the same unit when the step cache serves every block after the first: what a step the
    cache skips costs. The inputs repeat, so the first block's residual changes by 0 and every pass is a hit;
    `hit_fraction` (from the blocks' call counters) says whether it really was. Unlike the full unit, this cost
    does not grow with the number of layers: only the first block, the embeddings and the head run."""
    prime = _unit_call(transformer, inputs, unit, cfg_batch)
    cached = _unit_call(transformer, inputs, unit, cfg_batch, reset=False)
    info.begin_request()
    _timed(prime, device)  # computes in full and fills the cache
    before = info.step_cache_stats(1)
    _timed(cached, device)
    times = [_timed(cached, device) for _ in range(max(repeats, 1))]
    after = info.step_cache_stats(1)
    calls = after.forwards - before.forwards
    hits = (after.skipped_forwards - before.skipped_forwards) / calls if calls else 0.0
    return {
        "ms": round(statistics.median(times), 3),
        "ms_all": [round(t, 3) for t in times],
        "hit_fraction": round(hits, 4),
    }


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


# ---- whole requests ----------------------------------------------------------------------------------------------


def _bench_request(shape: Shape, spec: Any, pipe: Any, steps: int | None) -> Any:
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
            generator=torch.Generator("cpu").manual_seed(req.seed),
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
        call(2)  # warm-up: kernels, cuDNN heuristics, the allocator
    _sync(device)
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
    return {
        "seconds": round(total, 4),
        "pipeline_seconds": round(decoded - started, 4),
        "video_encode_seconds": round(total - (decoded - started), 4),
        "step_seconds_median": round(float(np.median(steps[1:])), 4) if len(steps) > 1 else None,
        "steps": req.num_inference_steps,
        "peak_memory_gb": _peak_gb(device),
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
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
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
        "peak_memory_gb": _peak_gb(device),
    }, captured[-1]


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 videos; None when they are identical (infinite)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare videos of shapes {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 3)


def _compare_frames(requests: dict[str, Any], frames: dict[str, np.ndarray]) -> None:
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


def _why_no_request(shape: Shape, wanted: bool, pipe: Any) -> str:
    if not wanted:
        return f"{shape.name} is timed per {shape.unit} only (pass --request to build the whole pipeline)"
    return "no pipeline"


# ---- serving efficiency ------------------------------------------------------------------------------------------


def measure_serving(engine: Any, req: Any, jobs: int, scratch: Path) -> dict[str, Any]:
    """Busy time over wall time across `jobs` back-to-back jobs through the real Worker, with `overlap_jobs`
    (the default: the next prompt encoded ahead, the previous MP4 written and stored on another thread) and
    without it, on the same engine; or, when the worker cannot be used here, back-to-back `Engine.generate`."""
    try:
        sequential = _serve_through_worker(engine, req, jobs, scratch / "serving-sequential", overlap=False)
        overlapped = _serve_through_worker(engine, req, jobs, scratch / "serving-overlapped", overlap=True)
    except Exception as exc:
        log.warning("serving through the Worker failed (%s); timing Engine.generate back to back", exc)
        result = _serve_back_to_back(engine, req, jobs, scratch)
        result["via"] = f"Engine.generate x {jobs} (Worker unusable: {type(exc).__name__}: {exc})"[:500]
        return result
    return {
        **overlapped,
        "sequential": sequential,
        "overlap_wall_speedup": _ratio(sequential["wall_seconds"], overlapped["wall_seconds"]),
    }


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
    try:
        deadline = time.monotonic() + 3600
        while not all(store.get(i).status.finished for i in ids):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the worker stopped before finishing the jobs")
            time.sleep(0.02)
    finally:
        worker.drain(0)
        thread.join(60)
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
        "busy_definition": f"sum of {' + '.join(stages)} (each synchronised) over first start to last completion",
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


# ---- cold start --------------------------------------------------------------------------------------------------

_COLD_CHILD = """
import json, sys, time
started = time.perf_counter()
from wanserve.config import Settings
from wanserve.engine.engine import Engine
imported = time.perf_counter()
engine = Engine.load(sys.argv[1], Settings(**json.loads(sys.argv[2])))
ready = time.perf_counter()
print("WANSERVE_READY " + json.dumps({
    "import_seconds": imported - started,
    "load_seconds": ready - imported,
    "warmup_seconds": engine.preset_info.warmup_seconds,
    "preset_apply_seconds": engine.preset_info.apply_seconds,
}), flush=True)
"""


def measure_cold_start(model_ref: str, preset: str, settings_kwargs: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """A fresh process from exec to engine ready (weights from local disk, preset applied and warmed up), first
    with empty inductor and Triton caches, so compilation is paid in full as on a freshly provisioned host,
    then once more with the kernels the first start left there, as a worker restarted with its cache folder on
    a volume finds them (`WANSERVE_CACHE_DIR`, see docs/operations.md)."""
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in settings_kwargs.items()}
    kwargs["preset"] = preset
    cold = scratch / "cold"
    cold.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cold / "inductor"), TRITON_CACHE_DIR=str(cold / "triton"))
    first = _start_engine(model_ref, kwargs, env, cold / "first.log")
    if "error" in first:
        return first
    warm = _start_engine(model_ref, kwargs, env, cold / "second.log")
    return {
        **first,
        "preset": preset,
        "inductor_cache": "empty (fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR)",
        "warm_cache": {**warm, "inductor_cache": "the kernels the first start compiled"},
    }


def _start_engine(model_ref: str, kwargs: dict[str, Any], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    # stderr goes to a file: a pipe nobody reads while stdout is read would block a chatty child (compile logs).
    with log_path.open("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", _COLD_CHILD, model_ref, json.dumps(kwargs)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        child: dict[str, Any] | None = None
        ready_at = None
        for line in process.stdout:
            if line.startswith("WANSERVE_READY "):
                ready_at = time.perf_counter()
                child = json.loads(line.removeprefix("WANSERVE_READY "))
        process.wait(timeout=600)
        stderr.seek(0)
        last = stderr.read().strip().splitlines()[-1:]
    if child is None or ready_at is None:
        return {"error": f"exit {process.returncode}: {last}"}
    return {
        "seconds_to_ready": round(ready_at - started, 3),
        **{k: None if v is None else round(float(v), 3) for k, v in child.items()},
    }


# ---- per-step projections and targets ----------------------------------------------------------------------------


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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        ms = _timed(lambda: vae.decode(latents, return_dict=False), device)
    return {"seconds": round(ms / 1000, 3), "latents": list(size), "tiling": tiling, "peak_memory_gb": _peak_gb(device)}


def per_step_projection(
    shape: Shape, options: BenchOptions, forward: dict[str, Any], vae_seconds: float | None = None
) -> dict[str, Any]:
    full_layers = int(shape.transformer["num_layers"])
    layers = options.layers or full_layers
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


def _targets(shape: Shape, report: dict[str, Any]) -> dict[str, Any]:
    forward, request, per_step = report["forward"], report.get("request", {}), report.get("per_step", {})
    out: dict[str, Any] = {}
    for key, goal in shape.targets.items():
        kind, _, preset = key.rpartition("_")
        value: float | None = None
        if key == "serving_busy_fraction":
            value = report.get("serving", {}).get("busy_fraction")
        elif kind == "forward_speedup" and preset in forward:
            value = forward[preset].get("speedup_vs_diffusers")
        elif kind == "request_speedup" and preset in request:
            value = request[preset].get("speedup_vs_diffusers")
        elif kind == "step_seconds" and preset in per_step:
            value = per_step[preset]["seconds_per_step"]
        elif kind == "projected_seconds" and preset in per_step:
            row = per_step[preset]
            value = row.get("projected_total_seconds", row.get("projected_denoise_seconds"))
        at_least = "speedup" in kind or key == "serving_busy_fraction"
        met = None if value is None else (value >= goal if at_least else value <= goal)
        out[key] = {"goal": goal, "measured": value, "met": met}
        row = per_step.get(preset, {}) if kind in ("step_seconds", "projected_seconds") else {}
        if value is not None and "cached_seconds_per_step" in row:
            # The goal as a share of skipped steps: random weights cannot say what share the cache will skip
            # on a real checkpoint, but they do fix what a full and a skipped step cost.
            steps = 1 if kind == "step_seconds" else shape.projection_steps or 1
            saved_if_all_skipped = steps * (row["seconds_per_step"] - row["cached_seconds_per_step"])
            out[key]["met_at_skipped_fraction"] = _fraction_needed(value - goal, saved_if_all_skipped)
    if shape.published_diffusers_ms and "diffusers" in forward:
        out["diffusers_vs_published"] = _ratio(shape.published_diffusers_ms, forward["diffusers"]["ms"])
    return out


def _fraction_needed(excess: float, saved_if_all_skipped: float) -> float | None:
    """The share of steps the cache must skip to remove `excess` seconds; None if skipping every one would not."""
    if excess <= 0:
        return 0.0
    if saved_if_all_skipped <= excess:
        return None
    return round(excess / saved_if_all_skipped, 3)


def _ratio(baseline: float | None, value: float | None) -> float | None:
    if not baseline or not value:
        return None
    return round(baseline / value, 4)


# ---- environment and the results file ----------------------------------------------------------------------------


def describe_environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torchao": _version("torchao"),
        "sageattention": _version("sageattention"),
        "flash_attn": _version("flash_attn"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device_type": device.type,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
        )
    else:
        env.update(device_name=env["cpu"], driver=None)
    return env


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    """Read-only git queries (the commit the numbers belong to); None outside a checkout."""
    if shutil.which("git") is None:
        return None
    # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh the index of a checkout others are working in.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_slug(environment: dict[str, Any]) -> str:
    name = str(environment.get("device_name") or "unknown")
    if environment.get("device_type") == "cpu":
        name = "cpu-" + re.sub(r"@.*$", "", name)
    name = re.sub(r"\((r|tm)\)|\bcpu\b(?!-)|processor", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "unknown"


def write_report(report: dict[str, Any], environment: dict[str, Any], out_dir: Path) -> Path:
    """Merge this run into `<out_dir>/<device>-<date>.json` (one file per device per day, runs by name)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{device_slug(environment)}-{environment['date']}.json"
    document: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(ValueError):
            document = json.loads(path.read_text())
    document["schema"] = SCHEMA
    document["environment"] = environment
    document.setdefault("runs", {})[report["run"]] = report
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(document), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows for the console table: config, ms per unit, ms of a step-cache hit, TFLOP/s, % of ceiling, speedup,
    request s, skipped, PSNR."""
    rows = []
    for name, entry in report["forward"].items():
        req = report.get("request", {}).get(name, {}) if isinstance(report.get("request"), dict) else {}
        psnr_value = req.get("psnr_vs_exact_db", req.get("psnr_vs_diffusers_db"))
        rows.append(
            (
                name,
                f"{entry['ms']:.2f}",
                f"{entry['cached']['ms']:.2f}" if "cached" in entry else "-",
                f"{entry['tflops']:.3f}",
                f"{entry['percent_of_ceiling']:.1f}" if entry.get("percent_of_ceiling") is not None else "-",
                f"{entry['speedup_vs_diffusers']:.3f}x" if entry.get("speedup_vs_diffusers") else "-",
                f"{req['seconds']:.2f}" if "seconds" in req else "-",
                f"{req['skipped_fraction']:.2f}" if "skipped_fraction" in req else "-",
                "identical" if req and psnr_value is None and name != "diffusers" else _fmt(psnr_value),
            )
        )
    return rows


def target_lines(report: dict[str, Any]) -> list[str]:
    """One line per target of the issue: goal, measured value, verdict."""
    lines = []
    for key, target in report.get("targets", {}).items():
        if not isinstance(target, dict):
            continue
        verdict = {True: "met", False: "missed", None: "not measured"}[target["met"]]
        line = f"{key}: goal {target['goal']:g}, measured {_fmt(target['measured'], 3)}: {verdict}"
        if target["met"] is False and "met_at_skipped_fraction" in target:
            share = target["met_at_skipped_fraction"]
            line += " with every step computed; " + (
                f"met if the step cache skips {share:.0%} of the steps"
                if share is not None
                else "not met even if the step cache skipped every step"
            )
        lines.append(line)
    return lines


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
