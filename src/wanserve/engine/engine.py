"""The engine: load a Wan pipeline once, then turn requests into MP4s with real progress and cancel.

The denoising loop is ours (not `pipeline.__call__`) so that every step can report its time, check for
cancellation, renew a lease and run CFG batched or split across ranks. It reproduces the diffusers loop
operation for operation; `tests/test_engine.py` checks it against `WanPipeline` itself, and
`tests/test_parallel.py` checks every multi-process layout (`engine/parallel.py`) against one process.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch

from wanserve.catalog import ModelSpec
from wanserve.config import Settings, world_size_from_env
from wanserve.engine.device import pick_device, pick_dtype
from wanserve.engine.loading import LOAD_LOCK, load_pipeline, locate
from wanserve.engine.parallel import (
    ParallelContext,
    agree,
    apply_layout,
    broadcast_object,
    exchange_cfg,
    fit_sequence,
    init_group,
    wait_until_loaded,
)
from wanserve.engine.presets import PresetInfo, apply_preset
from wanserve.engine.video import check_output_path, thumbnail_path_for, write_mp4, write_thumbnail
from wanserve.errors import Cancelled, InvalidRequest
from wanserve.progress import ProgressEvent
from wanserve.request import GenerationRequest, cover_crop, decode_image, resolve

log = logging.getLogger(__name__)

ProgressCallback = Callable[[ProgressEvent], None]
CancelCheck = Callable[[], bool]


@dataclass
class GenerationResult:
    video_path: Path
    thumbnail_path: Path
    request: GenerationRequest  # resolved: every default filled in, seed included
    seed: int
    width: int
    height: int
    num_frames: int
    fps: int
    timings: dict[str, float]  # seconds per stage: encode_prompt, denoise, vae_decode, video_encode, total
    step_seconds: list[float] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)  # which transformer ran each step
    # Step cache (presets fast/fastest): share of transformer calls served from the cache, and that saving
    # expressed in denoising steps. Both 0 under `exact`.
    skipped_fraction: float = 0.0
    skipped_steps: float = 0.0
    preset: str | None = None  # the preset that served it: the engine's own, or one the request asked for
    accelerations: list[str] = field(default_factory=list)  # what of it this machine applied (PresetInfo.in_use)


@dataclass
class Conditioning:
    """Everything the denoising loop needs that depends on the request but not on the step."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    image_embeds: torch.Tensor | None  # CLIP embeddings (Wan 2.1 i2v)
    latents: torch.Tensor
    condition: torch.Tensor | None = None  # Wan 2.1 i2v: mask + image latents, concatenated on channels
    first_frame_mask: torch.Tensor | None = None  # Wan 2.2 ti2v: 0 where the image latent is kept
    expand_timesteps: bool = False


def _resolved(result: GenerationResult) -> Future[GenerationResult]:
    future: Future[GenerationResult] = Future()
    future.set_result(result)
    return future


def noise_seed(seed: int) -> int:
    """The seed given to torch's CPU generator, whose Mersenne Twister keeps only the low 32 bits: below 2**32 it
    is the seed itself (the same noise as diffusers' `torch.Generator("cpu").manual_seed(seed)`); above, a hash
    folds all 64 bits in, so that seeds 5 and 2**32 + 5 do not give the same video."""
    if seed < 2**32:
        return seed
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")


class Engine:
    """A resident Wan model. Build with `Engine.load(...)`; call `generate` as often as you like."""

    def __init__(
        self,
        spec: ModelSpec,
        pipe: Any,
        settings: Settings,
        device: torch.device,
        parallel: ParallelContext | None = None,
    ) -> None:
        self.spec = spec
        self.pipe = pipe
        self.settings = settings
        self.device = device
        self.parallel = parallel  # the torchrun group this rank belongs to; None in one process
        self.transformers = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
        self.dtype = self.transformers[0].dtype
        self.expand_timesteps = bool(pipe.config.get("expand_timesteps", False))
        self.text_device = device
        self._i2v_pipe: Any = None
        self._apply_memory_settings()
        self.preset_info = PresetInfo.unapplied()  # Engine.load applies settings.preset
        self._writer: ThreadPoolExecutor | None = None  # MP4 encoding for generate(write_async=True)
        # Text embeddings by (text, max_sequence_length). Off in a torchrun group: a rank that hits the cache
        # while another misses would skip the collectives of a sharded text encoder and hang the group.
        self._text_cache: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._text_cache_size = 0 if parallel is not None else settings.prompt_cache_size
        self._text_lock = threading.Lock()  # one encoder, two callers: the request and the worker's prefetch
        # One request at a time: the scheduler, the step cache and the expert switch hold per-request state, so
        # two threads sharing an engine would silently mix their videos. A second caller waits its turn.
        self._run_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str, settings: Settings | None = None) -> Engine:
        settings = settings or Settings()
        parallel = None
        if world_size_from_env() > 1 or settings.world_layout > 1:
            parallel = init_group(settings)  # before any download: raises if the layout does not fit WORLD_SIZE
            device = parallel.device
        else:
            if settings.fsdp:
                log.warning("fsdp needs a torchrun group of several processes; ignored in one process")
            device = pick_device(settings.device)
        with LOAD_LOCK:
            spec, path = locate(model, settings)
            dtype = pick_dtype(settings.dtype, device)
            vae_dtype = torch.float32
            started = time.perf_counter()
            pipe = load_pipeline(path, dtype=dtype, vae_dtype=vae_dtype)
            pipe.set_progress_bar_config(disable=True)
            engine = cls(spec, pipe, settings, device, parallel=parallel)
            if parallel is not None:
                apply_layout(engine, parallel)
            # After the layout, which decides what a preset may still change.
            engine.preset_info = apply_preset(engine, settings.preset)
            if parallel is not None and parallel.attention_backend is not None:
                # The layout's attention serves every video: a job's `accelerations` names it too.
                engine.preset_info.add(f"attention:{parallel.attention_backend}")
        if parallel is not None:
            wait_until_loaded(parallel)  # outside the lock: another model of this process may load meanwhile
        log.info(
            "loaded %s from %s in %.1f s on %s (%s)",
            spec.name,
            path,
            time.perf_counter() - started,
            device,
            dtype,
        )
        return engine

    def _apply_memory_settings(self) -> None:
        settings, pipe = self.settings, self.pipe
        if settings.vae_tiling:
            pipe.vae.enable_tiling()
        if settings.cpu_offload:
            if self.device.type == "cpu":
                log.warning("cpu_offload has no effect when the engine already runs on the CPU")
            else:
                pipe.enable_model_cpu_offload(device=self.device)
                return  # accelerate's hooks now move each module in and out of the GPU
        sharded = self.parallel is not None and self.parallel.fsdp
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                keep_on_cpu = name == "text_encoder" and settings.text_encoder_cpu
                if sharded and not keep_on_cpu and name in ("transformer", "transformer_2", "text_encoder"):
                    continue  # FSDP moves only this rank's shards to the GPU: the whole model may not fit there
                module.to(torch.device("cpu") if keep_on_cpu else self.device)
        if settings.text_encoder_cpu:
            self.text_device = torch.device("cpu")

    @property
    def i2v_pipe(self) -> Any:
        """An image-to-video view over the same modules (Wan 2.2 TI2V ships as one `WanPipeline`)."""
        from diffusers import WanImageToVideoPipeline

        if isinstance(self.pipe, WanImageToVideoPipeline):
            return self.pipe
        if self._i2v_pipe is None:
            components = {
                k: v
                for k, v in self.pipe.components.items()
                if k in WanImageToVideoPipeline._get_signature_keys(WanImageToVideoPipeline)[0]
            }
            self._i2v_pipe = WanImageToVideoPipeline(
                **components,
                boundary_ratio=self.pipe.config.get("boundary_ratio"),
                expand_timesteps=self.expand_timesteps,
            )
        return self._i2v_pipe

    # ---- the request, stage by stage -----------------------------------------------------------------

    @overload
    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        write_async: Literal[False] = False,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        write_async: Literal[True],
    ) -> Future[GenerationResult]: ...

    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        write_async: bool = False,
    ) -> GenerationResult | Future[GenerationResult]:
        """Validate, encode, denoise, decode and write `out_path` (MP4) plus a WebP thumbnail beside it.

        With `write_async=True` the call returns once the frames are decoded, with a future that resolves
        after the MP4 and thumbnail are written on the engine's writer thread, so the caller can start the
        next job's GPU work while this one is encoded. Its "done" event is emitted from that thread.
        """
        req = self.resolve(request)  # every rule is checked before any GPU work
        if not isinstance(out_path, str | os.PathLike):
            raise InvalidRequest("out_path", f"must be a file path, got {type(out_path).__name__}")
        if self.parallel is None or self.parallel.is_leader:  # followers write nothing (os.devnull)
            check_output_path(Path(out_path))
        if self.parallel is not None:
            with self.parallel.guard("broadcast of the request"):
                req = broadcast_object(self.parallel, req)  # rank 0's seed, when the request had none
        with self._run_lock:
            return self._generate(req, out_path, on_progress, should_cancel, write_async)

    def _generate(
        self,
        req: GenerationRequest,
        out_path: Path | str,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        write_async: bool,
    ) -> GenerationResult | Future[GenerationResult]:
        preset = self.preset_info.use(req.preset)
        accelerations = self.preset_info.in_use()
        emit = on_progress or (lambda _event: None)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        try:
            t0 = time.perf_counter()
            emit(ProgressEvent.at("encode_prompt", 0.0))
            cond = self.prepare(req)
            timings["encode_prompt"] = time.perf_counter() - t0
            emit(ProgressEvent.at("encode_prompt", 1.0, seconds=timings["encode_prompt"]))

            t0 = time.perf_counter()
            latents, step_seconds, experts = self.denoise(cond, req, emit, should_cancel)
            timings["denoise"] = time.perf_counter() - t0
            cache = self.preset_info.step_cache_stats(len(step_seconds))
            if self.parallel is not None and not self.parallel.is_leader:
                # Every rank holds the same latents now; rank 0 alone decodes and writes the video.
                result = self._follower_result(req, Path(out_path), timings, started, step_seconds, experts)
                return _resolved(result) if write_async else result

            t0 = time.perf_counter()
            emit(ProgressEvent.at("vae_decode", 0.0))
            frames = self.decode(latents)
            timings["vae_decode"] = time.perf_counter() - t0
            emit(ProgressEvent.at("vae_decode", 1.0, seconds=timings["vae_decode"]))
            del latents, cond
        except BaseException:
            self.free_memory()
            raise

        def write() -> GenerationResult:
            t0 = time.perf_counter()
            emit(ProgressEvent.at("video_encode", 0.0))
            out = Path(out_path)
            assert req.fps is not None and req.seed is not None
            write_mp4(frames, out, fps=req.fps)
            thumb = write_thumbnail(frames, thumbnail_path_for(out))
            timings["video_encode"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - started
            try:
                emit(ProgressEvent.at("done", 1.0, seconds=timings["total"]))
            except BaseException:  # the caller never learns of these files: leave none, as at any other stage
                out.unlink(missing_ok=True)
                thumb.unlink(missing_ok=True)
                raise
            assert req.width and req.height and req.num_frames
            return GenerationResult(
                video_path=out,
                thumbnail_path=thumb,
                request=req,
                seed=req.seed,
                width=req.width,
                height=req.height,
                num_frames=int(frames.shape[0]),
                fps=req.fps,
                timings={k: round(v, 4) for k, v in timings.items()},
                step_seconds=[round(s, 4) for s in step_seconds],
                experts=experts,
                skipped_fraction=cache.skipped_fraction,
                skipped_steps=cache.skipped_steps,
                preset=preset,
                accelerations=accelerations,
            )

        if not write_async:
            return write()
        if self._writer is None:
            # One thread: videos are written in the order they were generated, and at most one encode
            # competes with the next job's CPU work (libx264 is multithreaded on its own).
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanserve-mp4")
        return self._writer.submit(write)

    def _follower_result(
        self,
        req: GenerationRequest,
        out: Path,
        timings: dict[str, float],
        started: float,
        step_seconds: list[float],
        experts: list[int],
    ) -> GenerationResult:
        assert req.width and req.height and req.num_frames and req.fps and req.seed is not None
        timings["total"] = time.perf_counter() - started
        return GenerationResult(
            video_path=out,
            thumbnail_path=thumbnail_path_for(out),
            request=req,
            seed=req.seed,
            width=req.width,
            height=req.height,
            num_frames=req.num_frames,
            fps=req.fps,
            timings={k: round(v, 4) for k, v in timings.items()},
            step_seconds=[round(s, 4) for s in step_seconds],
            experts=experts,
        )

    @torch.no_grad()
    def prepare(self, req: GenerationRequest) -> Conditioning:
        """Text (and image) encoding and the initial noise. `req` must be resolved."""
        assert req.seed is not None and req.width and req.height and req.num_frames
        pipe = self.pipe
        prompt_embeds = self.encode_text(req.prompt)
        # diffusers' encode_prompt encodes a missing negative prompt as "".
        negative_embeds = self.encode_text(req.negative_prompt or "") if self._wants_cfg(req) else None

        # Noise is drawn on the CPU so a seed gives the same video on any device.
        generator = torch.Generator(device="cpu").manual_seed(noise_seed(req.seed))
        if req.image is None:
            from diffusers import WanPipeline

            # Text-only noise is WanPipeline's whatever class the folder loaded: a TI2V checkpoint saved as
            # WanImageToVideoPipeline does text-to-video too, and its own prepare_latents wants an image first.
            latents = WanPipeline.prepare_latents(
                pipe,
                1,
                self.transformers[0].config.out_channels,
                req.height,
                req.width,
                req.num_frames,
                torch.float32,
                self.device,
                generator,
            )
            return Conditioning(prompt_embeds, negative_embeds, None, latents, expand_timesteps=self.expand_timesteps)

        i2v = self.i2v_pipe
        image = cover_crop(decode_image(req.image), req.width, req.height)
        image_embeds = None
        if self.transformers[0].config.image_dim is not None:
            image_embeds = i2v.encode_image(image, self.device).to(self.dtype)
        pixels = i2v.video_processor.preprocess(image, height=req.height, width=req.width)
        outputs = i2v.prepare_latents(
            pixels.to(self.device, dtype=torch.float32),
            1,
            pipe.vae.config.z_dim,
            req.height,
            req.width,
            req.num_frames,
            torch.float32,
            self.device,
            generator,
        )
        if self.expand_timesteps:
            latents, condition, mask = outputs
            return Conditioning(
                prompt_embeds, negative_embeds, image_embeds, latents, condition, mask, expand_timesteps=True
            )
        latents, condition = outputs
        return Conditioning(prompt_embeds, negative_embeds, image_embeds, latents, condition)

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        """UMT5 embeddings of one text, (1, max_sequence_length, dim), on the engine's device and dtype.

        diffusers' `encode_prompt` encodes the prompt and the negative prompt in separate calls of batch 1, so
        encoding them one by one, and keeping them, gives exactly the tensors it gives.
        """
        key = self._text_key(text)
        with self._text_lock:
            cached = self._text_cache.get(key)
            if cached is not None:
                self._text_cache.move_to_end(key)
                return cached
            self._warn_if_cut(text)
            with self._guard("prompt encoding"):
                embeds, _ = self.pipe.encode_prompt(
                    prompt=text,
                    do_classifier_free_guidance=False,
                    num_videos_per_prompt=1,
                    max_sequence_length=self.settings.max_sequence_length,
                    device=self.text_device,
                )
            embeds = embeds.to(self.device, self.dtype)
            if self._text_cache_size > 0:
                self._text_cache[key] = embeds
                while len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
            return embeds

    def _warn_if_cut(self, text: str) -> None:
        """The text encoder reads the first `max_sequence_length` tokens and drops the rest without a word (as
        diffusers does): a long prompt's ending would change nothing, and nobody would know why."""
        limit = self.settings.max_sequence_length
        ids = self.pipe.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if len(ids) > limit:
            log.warning(
                "a prompt of %d tokens: the text encoder reads the first %d (WANSERVE_MAX_SEQUENCE_LENGTH); "
                "the rest, from %r on, changes nothing",
                len(ids),
                limit,
                self.pipe.tokenizer.decode(ids[limit - 1 : limit + 7], skip_special_tokens=True),
            )

    def prefetch(self, request: GenerationRequest) -> int:
        """Encode a request's prompt and negative prompt now, so that its `generate` finds them cached: the
        worker calls this for the next queued job while the current one denoises. Returns how many texts it
        encoded (0: cached already, or the cache is off). Raises InvalidRequest as `generate` would.

        Never with `cpu_offload`: there, running the text encoder moves the transformer off the GPU, which must
        not happen while another thread denoises with it."""
        if self._text_cache_size == 0 or self.settings.cpu_offload:
            return 0
        req = self.resolve(request)
        texts = [req.prompt, *([req.negative_prompt or ""] if self._wants_cfg(req) else [])]
        missing = [t for t in dict.fromkeys(texts) if self._text_key(t) not in self._text_cache]
        for text in missing:
            self.encode_text(text)
        return len(missing)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """`request` checked against this model and this engine's preset, with every default filled in."""
        info = self.preset_info
        return resolve(request, self.spec, serving=info.serving, step_cache=info.cache_possible)

    def _text_key(self, text: str) -> tuple[str, int]:
        return (text, self.settings.max_sequence_length)

    def clear_prompt_cache(self) -> None:
        with self._text_lock:
            self._text_cache.clear()

    @staticmethod
    def _wants_cfg(req: GenerationRequest) -> bool:
        # diffusers' rule, kept so `exact` matches WanPipeline: guidance_scale alone decides, and when it is above
        # 1 both experts are guided, each with its own scale (guidance_scale_2 may then be 1 or below).
        return (req.guidance_scale or 0.0) > 1.0

    def make_scheduler(self, flow_shift: float) -> Any:
        """A fresh scheduler per request: schedulers are stateful, and the shift is a request field."""
        base = self.pipe.scheduler
        key = "flow_shift" if "flow_shift" in base.config else "shift"
        return type(base).from_config(base.config, **{key: flow_shift})

    @torch.no_grad()
    def denoise(
        self,
        cond: Conditioning,
        req: GenerationRequest,
        emit: ProgressCallback,
        should_cancel: CancelCheck | None = None,
    ) -> tuple[torch.Tensor, list[float], list[int]]:
        assert req.num_inference_steps and req.guidance_scale is not None and req.flow_shift is not None
        scheduler = self.make_scheduler(req.flow_shift)
        scheduler.set_timesteps(req.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        total = len(timesteps)
        boundary = None
        if req.boundary_ratio is not None and len(self.transformers) > 1:
            boundary = req.boundary_ratio * scheduler.config.num_train_timesteps

        latents = cond.latents
        self.preset_info.begin_request()  # no cached residual may cross requests
        if self.parallel is not None:
            fit_sequence(self.parallel, self.transformers, self._tokens(latents))
        step_seconds: list[float] = []
        experts: list[int] = []
        for i, t in enumerate(timesteps):
            stop = should_cancel is not None and should_cancel()
            if self.parallel is not None:
                stop = agree(self.parallel, stop)  # one rank's cancel stops every rank at this same step
            if stop:
                raise Cancelled(i, total)
            t0 = time.perf_counter()
            expert = 0 if boundary is None or t >= boundary else 1
            model = self.transformers[expert]
            second = req.guidance_scale_2 if req.guidance_scale_2 is not None else req.guidance_scale
            scale = req.guidance_scale if expert == 0 else second

            if cond.first_frame_mask is not None:
                assert cond.condition is not None
                mask = cond.first_frame_mask
                model_input = ((1 - mask) * cond.condition + mask * latents).to(self.dtype)
                timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
            elif cond.condition is not None:
                model_input = torch.cat([latents, cond.condition], dim=1).to(self.dtype)
                timestep = t.expand(latents.shape[0])
            else:
                model_input = latents.to(self.dtype)
                if cond.expand_timesteps:
                    ones = torch.ones(latents.shape[2:], device=latents.device)
                    timestep = (ones[:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
                else:
                    timestep = t.expand(latents.shape[0])

            with self._guard(f"denoising step {i + 1}/{total}"):
                noise_pred = self.predict_noise(model, model_input, timestep, cond, scale, i, scheduler)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)  # so the step time is the GPU's, not the launch's
            seconds = time.perf_counter() - t0
            step_seconds.append(seconds)
            experts.append(expert)
            emit(
                ProgressEvent.at(
                    "denoise",
                    (i + 1) / total,
                    step=i + 1,
                    total_steps=total,
                    step_seconds=seconds,
                    expert=expert,
                )
            )
        if cond.first_frame_mask is not None:
            assert cond.condition is not None
            latents = (1 - cond.first_frame_mask) * cond.condition + cond.first_frame_mask * latents
        return latents, step_seconds, experts

    def predict_noise(
        self,
        model: Any,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        scale: float,
        step_index: int,
        scheduler: Any,
    ) -> torch.Tensor:
        """One guided prediction: conditional pass, unconditional pass, combine."""
        # Step information lets diffusers' cache hooks (FirstBlockCache, MagCache…) decide what to reuse.
        context = {
            "step_index": step_index,
            "sigma": float(scheduler.sigmas[step_index]),
            "num_inference_steps": len(scheduler.timesteps),
        }
        guided = cond.negative_embeds is not None  # encoded only when the request wants CFG (see _wants_cfg)
        if guided and self.parallel is not None and self.parallel.cfg > 1:
            return self._predict_cfg_parallel(model, model_input, timestep, cond, scale, context)
        if guided and self.settings.cfg_batch:
            return self._predict_cfg_batch(model, model_input, timestep, cond, scale, context)
        noise = _forward(model, "cond", context, model_input, timestep, cond.prompt_embeds, cond.image_embeds)
        if not guided:
            return noise
        assert cond.negative_embeds is not None
        uncond = _forward(model, "uncond", context, model_input, timestep, cond.negative_embeds, cond.image_embeds)
        return uncond + scale * (noise - uncond)

    def _predict_cfg_parallel(
        self,
        model: Any,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        scale: float,
        context: dict[str, Any],
    ) -> torch.Tensor:
        """Each half of the group runs one pass; one all-gather per step hands both to every rank."""
        assert self.parallel is not None and cond.negative_embeds is not None
        conditional = self.parallel.cfg_rank == 0
        embeds = cond.prompt_embeds if conditional else cond.negative_embeds
        mine = _forward(
            model, "cond" if conditional else "uncond", context, model_input, timestep, embeds, cond.image_embeds
        )
        noise, uncond = exchange_cfg(self.parallel, mine)
        return uncond + scale * (noise - uncond)

    def _predict_cfg_batch(
        self,
        model: Any,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        scale: float,
        context: dict[str, Any],
    ) -> torch.Tensor:
        """Both passes as one batch of 2: one launch per layer instead of two, for GPUs with room to spare."""
        assert cond.negative_embeds is not None
        image = cond.image_embeds
        both = _forward(
            model,
            "cond_uncond",
            context,
            torch.cat([model_input, model_input]),
            torch.cat([timestep, timestep]),
            torch.cat([cond.prompt_embeds, cond.negative_embeds]),
            None if image is None else torch.cat([image, image]),
        )
        noise, uncond = both.chunk(2)
        return uncond + scale * (noise - uncond)

    def _tokens(self, latents: torch.Tensor) -> int:
        """Sequence length the transformer sees for these latents (B, C, T, H, W)."""
        p_t, p_h, p_w = self.transformers[0].config.patch_size
        return (latents.shape[2] // p_t) * (latents.shape[3] // p_h) * (latents.shape[4] // p_w)

    def _guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """The watchdog around work that waits on other ranks; nothing in one process."""
        return self.parallel.guard(what) if self.parallel is not None else contextlib.nullcontext()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 frames (T, H, W, 3)."""
        vae = self.pipe.vae
        # Under model CPU offload the VAE's weights wait on the CPU until its hook moves them, and that hook
        # (diffusers' apply_forward_hook) moves the module, not its inputs: the latents go where it runs.
        offloaded = self.settings.cpu_offload and self.device.type != "cpu"
        latents = latents.to(self.device if offloaded else next(vae.parameters()).device, vae.dtype)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # (B, C, T, H, W) in [-1, 1]
        video = (video[0].float() / 2 + 0.5).clamp(0, 1)
        frames = (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()
        return np.ascontiguousarray(frames)

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _forward(
    model: Any,
    name: str,
    context: dict[str, Any],
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    image: torch.Tensor | None,
) -> torch.Tensor:
    """One transformer pass, named for diffusers' cache hooks (FirstBlockCache keeps cond and uncond apart)."""
    with model.cache_context(name, **context):
        return model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_hidden_states_image=image,
            return_dict=False,
        )[0]
