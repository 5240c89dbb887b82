"""One transformer forward or CFG step: its inputs, its analytic FLOP count, the matmul ceiling, and timing."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from wanserve.bench.memory import peaks, start_window
from wanserve.bench.shapes import Shape
from wanserve.engine.presets import IMAGE_TOKENS, TEXT_TOKENS


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
    times = [timed_ms(lambda: torch.mm(a, b), device) for _ in range(12)][2:]
    seconds = statistics.median(times) / 1000
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / seconds / 1e12, 4)}


# ---- one transformer call ----------------------------------------------------------------------------------


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


def forward_inputs(shape: Shape, config: Any, device: torch.device, dtype: torch.dtype) -> ForwardInputs:
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


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
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


def unit_call(
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
    call = unit_call(transformer, inputs, unit, cfg_batch)
    window = start_window(device)
    first = timed_ms(call, device)  # includes compilation when the preset compiles
    timed_ms(call, device)
    times = [timed_ms(call, device) for _ in range(max(repeats, 1))]
    ms = statistics.median(times)
    tflops = flops / (ms / 1000) / 1e12
    return {
        "ms": round(ms, 3),
        "ms_all": [round(t, 3) for t in times],
        "first_call_ms": round(first, 3),
        "tflops": round(tflops, 4),
        "percent_of_ceiling": round(100 * tflops / ceiling_tflops, 2) if ceiling_tflops else None,
        **peaks(device, window),
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
    prime = unit_call(transformer, inputs, unit, cfg_batch)
    cached = unit_call(transformer, inputs, unit, cfg_batch, reset=False)
    info.begin_request()
    timed_ms(prime, device)  # computes in full and fills the cache
    before = info.step_cache_stats(1)
    timed_ms(cached, device)
    times = [timed_ms(cached, device) for _ in range(max(repeats, 1))]
    after = info.step_cache_stats(1)
    calls = after.forwards - before.forwards
    hits = (after.skipped_forwards - before.skipped_forwards) / calls if calls else 0.0
    return {
        "ms": round(statistics.median(times), 3),
        "ms_all": [round(t, 3) for t in times],
        "hit_fraction": round(hits, 4),
    }
