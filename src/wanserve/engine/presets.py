"""Acceleration presets, applied once when an engine loads: `exact`, `fast` and `fastest`.

- `exact`: diffusers' bf16 numerics, only faster. On CUDA: the fastest *exact* attention kernel that passes a
  probe on this GPU (cuDNN SDPA, FlashAttention 3/2, PyTorch flash), fused QKV projections, and regional
  compilation of the repeated transformer block, warmed up before the engine reports ready. On the CPU
  nothing changes numerically (fused projections give bit-identical float32 results there).
- `fast`: `exact` plus First Block Cache at a conservative threshold (0.05). When the first block's residual
  barely changed since the previous step, the other blocks are skipped and their previous residual reused.
  Lossy: the output is close to, not equal to, `exact`.
- `fastest`: `fast` with a bolder threshold (0.10), FP8 matmuls in the transformer blocks (torchao, Ada/Hopper)
  and 8-bit attention (SageAttention). Lossy.

Every feature is guarded. When one cannot be used (CPU, a package not installed, an older GPU, a kernel that
fails its probe, a compile that fails at warm-up) it is skipped, the reason is logged and recorded in
`PresetInfo.skipped`, and the worker starts anyway. `wanserve bench` reports the `PresetInfo` of every run.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wanserve.request import PRESET_NAMES  # torch-free: the API checks a request's preset with it too

if TYPE_CHECKING:
    from wanserve.engine.engine import Engine

log = logging.getLogger(__name__)


# Exact attention kernels, all tried on CUDA; the fastest one that matches `native` on this GPU wins.
EXACT_ATTENTION = ("_native_cudnn", "_flash_3", "flash", "_native_flash")
# 8-bit attention for `fastest` (INT8 QK, FP8/FP16 PV): lossy, hence never part of `exact`.
INT8_ATTENTION = ("sage",)
TEXT_TOKENS = 512  # Wan pads every prompt to 512 T5 tokens
IMAGE_TOKENS = 257  # Wan 2.1 I2V: CLIP ViT-H/14, 256 patches + CLS


@dataclass(frozen=True)
class PresetSpec:
    name: str
    lossy: bool
    cache_threshold: float | None  # First Block Cache threshold; None: no step caching
    fp8: bool
    int8_attention: bool


PRESETS: dict[str, PresetSpec] = {
    "exact": PresetSpec("exact", lossy=False, cache_threshold=None, fp8=False, int8_attention=False),
    "fast": PresetSpec("fast", lossy=True, cache_threshold=0.05, fp8=False, int8_attention=False),
    "fastest": PresetSpec("fastest", lossy=True, cache_threshold=0.10, fp8=True, int8_attention=True),
}


@dataclass
class StepCacheStats:
    """How much transformer work the step cache saved in one request."""

    forwards: int  # transformer calls (a CFG step makes two, or one when batched)
    skipped_forwards: int  # calls whose blocks after the first were served from the cache
    skipped_fraction: float  # skipped_forwards / forwards
    skipped_steps: float  # the same saving in denoising steps: skipped_fraction * steps


@dataclass
class PresetInfo:
    """What a preset actually did on this machine: the bench prints it, the logs say it once at load."""

    preset: str
    device: str = "cpu"
    lossy: bool = False
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> why it was not applied
    attention_backend: str | None = None  # None: diffusers' default (native SDPA)
    cache_threshold: float | None = None
    compiled: bool = False
    fp8: bool = False
    cfg_batch: bool = False
    # Whether a request may turn the step cache on or off here (see `use`), and its threshold right now.
    cache_possible: bool = False
    active_threshold: float | None = None
    apply_seconds: float = 0.0
    warmup_seconds: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    transformers: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def unapplied(cls) -> PresetInfo:
        """An engine that no preset touched (built directly rather than through `Engine.load`)."""
        return cls(preset="none")

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "device": self.device,
            "lossy": self.lossy,
            "applied": list(self.applied),
            "skipped": dict(self.skipped),
            "attention_backend": self.attention_backend,
            "cache_threshold": self.cache_threshold,
            "compiled": self.compiled,
            "fp8": self.fp8,
            "cfg_batch": self.cfg_batch,
            "apply_seconds": round(self.apply_seconds, 4),
            "warmup_seconds": None if self.warmup_seconds is None else round(self.warmup_seconds, 4),
            "details": self.details,
        }

    def add(self, entry: str) -> None:
        if entry not in self.applied:
            self.applied.append(entry)

    def skip(self, feature: str, reason: str) -> None:
        self.skipped[feature] = reason
        self.applied = [a for a in self.applied if a.split(":")[0] != feature]

    @property
    def serving(self) -> str | None:
        """The preset this engine was loaded with; None for an engine no preset touched."""
        return self.preset if self.preset in PRESETS else None

    def use(self, preset: str | None) -> str | None:
        """Put the step cache in the state a request's `preset` asks for (None: this engine's own) and return
        the preset that serves it. `resolve` has already checked that this engine may serve it; only the
        step cache changes, and the next request puts it back the way it wants."""
        if self.serving is None:
            return None
        name = preset or self.serving
        wanted = PRESETS[name].cache_threshold if self.cache_possible else None
        if wanted != self.active_threshold:
            for transformer in self.transformers:
                _disable_step_cache(transformer)
            self.active_threshold = None
            if wanted is not None:
                _install_step_cache(self.transformers, wanted)
                self.active_threshold = wanted
        return name

    def in_use(self) -> list[str]:
        """What serves the request `use` was last called for: what the load applied, with the step cache as that
        request's preset set it. A `fastest` worker whose GPU took no FP8 still serves `fastest`: this says so."""
        entries = [entry for entry in self.applied if not entry.startswith("step_cache")]
        if self.active_threshold is not None:
            entries.append(f"step_cache:first_block_cache(threshold={self.active_threshold:g})")
        return entries

    def begin_request(self) -> None:
        """Forget the previous request: cached residuals must never leak into another request's video."""
        for transformer in self.transformers:
            if getattr(transformer, "is_cache_enabled", False):
                transformer._reset_stateful_cache()
            for counter in _counters(transformer):
                counter.calls = 0

    def step_cache_stats(self, steps: int) -> StepCacheStats:
        forwards = skipped = 0
        for transformer in self.transformers:
            counters = _counters(transformer)
            if len(counters) == 2:
                head, tail = counters
                forwards += head.calls
                skipped += max(head.calls - tail.calls, 0)
        fraction = skipped / forwards if forwards else 0.0
        return StepCacheStats(forwards, skipped, round(fraction, 4), round(fraction * steps, 3))


# ---- applying a preset -------------------------------------------------------------------------------------


def apply_preset(engine: Engine, preset: str, *, warm_up: bool = True, compile: bool | None = None) -> PresetInfo:
    """Apply `preset` to the engine's transformer(s), warm compiled code up, and return what was done.

    Presets build on each other (exact < fast < fastest), so calling this again with a later preset on the
    same engine adds the difference; `wanserve bench` relies on that to compare presets on one set of weights.
    `compile` forces regional compilation on (tests on the CPU) or off; None takes the engine's `compile`
    setting, whose default means "on CUDA only".
    """
    started = time.perf_counter()
    settings = engine.settings
    if compile is None:
        compile = {"on": True, "off": False}.get(getattr(settings, "compile", "auto"))
    info = configure_transformers(
        engine.transformers,
        preset,
        engine.device,
        parallel=getattr(engine, "parallel", None),
        cpu_offload=bool(getattr(settings, "cpu_offload", False)),
        compile=compile,
    )
    info.cfg_batch = bool(getattr(settings, "cfg_batch", False))
    engine.preset_info = info  # the warm-up below runs through engine.denoise, which reads it
    if info.compiled and getattr(settings, "cache_dir", None) is not None:
        use_compile_cache(Path(settings.cache_dir) / "compile")  # torch.compile compiles at the first call
    if info.compiled and warm_up:
        _warm_up_or_fall_back(engine, info)
    info.apply_seconds = time.perf_counter() - started
    _log_summary(info)
    return info


def configure_transformers(
    transformers: Sequence[Any],
    preset: str,
    device: torch.device,
    *,
    parallel: Any = None,
    cpu_offload: bool = False,
    compile: bool | None = None,
) -> PresetInfo:
    """The module-level part of a preset (no warm-up): usable on a bare transformer, as the bench does."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {', '.join(PRESET_NAMES)}")
    spec = PRESETS[preset]
    info = PresetInfo(preset=preset, device=str(device), lossy=spec.lossy, transformers=list(transformers))
    cuda = device.type == "cuda"
    layout = _layout_reason(parallel)

    # Step-cache hooks and call counters wrap the block forwards; take them off while the blocks change
    # underneath, then put them back on top (cache outermost, so skipped blocks are never entered).
    for transformer in transformers:
        _disable_step_cache(transformer)

    _choose_attention(transformers, spec, device, info, layout)
    if layout:
        info.skip("fused_qkv", layout)
    elif cpu_offload:
        info.skip("fused_qkv", "cpu_offload moves weights module by module; fused copies would not be offloaded")
    else:
        _fuse_qkv(transformers, info)
    if spec.fp8:
        _apply_fp8(transformers, device, info, layout or ("cpu_offload is on" if cpu_offload else None))
    else:
        info.skip("fp8", f"not part of the {preset} preset (lossy; fastest only)")
    want_compile = cuda if compile is None else compile
    if not want_compile:
        _uncompile_blocks(transformers)
        info.skip("compile", "turned off" if compile is False else "CPU: regional compilation is applied on CUDA only")
    elif layout:
        info.skip("compile", layout)
    elif cpu_offload:
        info.skip("compile", "cpu_offload moves weights during the forward, which compiled graphs do not expect")
    else:
        _compile_blocks(transformers, info)
    sharded = parallel is not None and (getattr(parallel, "sequence_degree", 1) > 1 or getattr(parallel, "fsdp", False))
    info.cache_possible = not sharded and all(_cacheable(t) for t in transformers)
    if spec.cache_threshold is None:
        info.skip("step_cache", f"not part of the {preset} preset (lossy; fast and fastest only)")
    elif sharded:
        info.skip("step_cache", "ranks would take different skip decisions on their own shards and deadlock")
    else:
        _enable_step_cache(transformers, spec.cache_threshold, info)
    return info


def _layout_reason(parallel: Any) -> str | None:
    if parallel is None:
        return None
    return "multi-GPU layout: engine/parallel.py owns the attention backend, sharding and compilation"


# ---- attention -----------------------------------------------------------------------------------------------


def _choose_attention(
    transformers: Sequence[Any], spec: PresetSpec, device: torch.device, info: PresetInfo, layout: str | None
) -> None:
    if device.type != "cuda":
        info.skip("attention", "CPU: plain diffusers' native SDPA is kept (the other backends need CUDA)")
        if spec.int8_attention:
            info.skip("int8_attention", "CPU: SageAttention needs a CUDA GPU")
        return
    if layout:
        info.skip("attention", layout)
        if spec.int8_attention:
            info.skip("int8_attention", layout)
        return
    config = transformers[0].config
    heads, head_dim = int(config.num_attention_heads), int(config.attention_head_dim)
    dtype = transformers[0].dtype

    cases = _probe_cases(config)

    def probe(names: Sequence[str], tolerance: float) -> dict[str, float | str]:
        return {name: _probe_attention(name, device, dtype, heads, head_dim, tolerance, cases) for name in names}

    results = probe(("native", *EXACT_ATTENTION), 2e-2)
    info.details["attention_probe"] = results
    usable = {k: v for k, v in results.items() if isinstance(v, float)}
    best = min(usable, key=usable.__getitem__) if usable else "native"
    if spec.int8_attention:
        int8 = probe(INT8_ATTENTION, 0.1)
        info.details["int8_attention_probe"] = int8
        fast = {k: v for k, v in int8.items() if isinstance(v, float)}
        name = min(fast, key=fast.__getitem__) if fast else None
        if name is None:
            info.skip("int8_attention", _describe(int8))
        elif best in usable and fast[name] >= usable[best]:  # lossy and no faster: keep the exact kernel
            info.skip("int8_attention", f"{name} is no faster than {best} on this GPU: " + _describe(int8 | usable))
        elif _set_attention_backend(transformers, name, info):
            info.attention_backend = name
            info.add(f"int8_attention:{name}")
            info.skip("attention", f"{name} (8-bit) replaces the exact backend in this preset")
            return
    if best == "native":
        _reset_attention(transformers)
        info.skip("attention", "no exact backend beat native SDPA on this GPU: " + _describe(results))
        return
    if _set_attention_backend(transformers, best, info):
        info.attention_backend = best
        info.add(f"attention:{best}")


def _describe(results: dict[str, float | str]) -> str:
    return ", ".join(f"{k}={v:.3f} ms" if isinstance(v, float) else f"{k}: {v}" for k, v in results.items())


def _set_attention_backend(transformers: Sequence[Any], name: str, info: PresetInfo) -> bool:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also makes `name` the process-wide default; restore it so that other models served
    # by this process (and the bench's plain-diffusers baseline) keep theirs.
    previous = _AttentionBackendRegistry._active_backend
    try:
        for transformer in transformers:
            transformer.set_attention_backend(name)
    except Exception as exc:  # a backend that probed fine but refuses this model
        for transformer in transformers:
            transformer.reset_attention_backend()
        feature = "int8_attention" if name in INT8_ATTENTION else "attention"
        info.skip(feature, f"{name}: {type(exc).__name__}: {exc}")
        return False
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    return True


def _probe_cases(config: Any) -> list[tuple[int, int, int]]:
    """(batch, queries, keys) of the attention calls a Wan forward makes, at probe size: self-attention, the
    cross-attention over 512 text tokens (and 257 image tokens for Wan 2.1 I2V), and CFG as a batch of 2.
    A kernel must handle all of them: one that fails on a shape only the real model uses would otherwise
    surface at warm-up and cost a recompile without it."""
    cases = [(1, 4096, 4096), (1, 4096, TEXT_TOKENS), (2, 4096, 4096), (2, 4096, TEXT_TOKENS)]
    if getattr(config, "image_dim", None):
        cases.append((1, 4096, IMAGE_TOKENS))
    return cases


def _probe_attention(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    head_dim: int,
    tolerance: float,
    cases: Sequence[tuple[int, int, int]],
) -> float | str:
    """Milliseconds of backend `name` over `cases` at this model's head layout, or why it cannot be used."""
    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
            dispatch_attention_fn,
        )

        backend = AttentionBackendName(name)
        _check_attention_backend_requirements(backend)
        generator = torch.Generator(device=device).manual_seed(0)
        total = 0.0
        for batch, queries, keys in cases:
            q = torch.randn((batch, queries, heads, head_dim), device=device, dtype=dtype, generator=generator)
            k, v = (
                torch.randn((batch, keys, heads, head_dim), device=device, dtype=dtype, generator=generator)
                for _ in range(2)
            )
            with torch.no_grad():
                reference = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
                out = dispatch_attention_fn(q, k, v, backend=backend)
                error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max())
                if not error <= tolerance:
                    return (
                        f"differs from native SDPA by {error:.3g} (tolerance {tolerance:g}) at batch {batch}, "
                        f"{queries} queries x {keys} keys"
                    )
                times = []
                for _ in range(5):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    dispatch_attention_fn(q, k, v, backend=backend)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
            total += statistics.median(times[1:])
        return round(total, 4)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first_line}"[:300]


# ---- fused projections ---------------------------------------------------------------------------------------


def _fuse_qkv(transformers: Sequence[Any], info: PresetInfo) -> None:
    attentions = [m for t in transformers for m in t.modules() if hasattr(m, "fuse_projections")]
    if not attentions:
        info.skip("fused_qkv", "this transformer has no fusable attention projections")
        return
    try:
        for attn in attentions:
            if not getattr(attn, "fused_projections", False):
                with torch.no_grad():
                    _fuse_sharing_storage(attn)
    except Exception as exc:
        info.skip("fused_qkv", f"{type(exc).__name__}: {exc}")
        return
    info.add("fused_qkv")


def _fuse_sharing_storage(attn: Any) -> None:
    """`fuse_projections`, then make the separate projections views into the fused weight.

    diffusers keeps both copies, which would add 6 GB per 14B expert; as views they cost nothing, and the
    separate modules stay in place for anything that reads them (state_dict, LoRA tooling).
    """
    attn.fuse_projections()
    groups = [("to_qkv", ("to_q", "to_k", "to_v")) if not attn.is_cross_attention else ("to_kv", ("to_k", "to_v"))]
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        groups.append(("to_added_kv", ("add_k_proj", "add_v_proj")))
    for fused_name, part_names in groups:
        fused = getattr(attn, fused_name)
        offset = 0
        for part_name in part_names:
            part = getattr(attn, part_name)
            rows = part.out_features
            part.weight = torch.nn.Parameter(fused.weight.data[offset : offset + rows], requires_grad=False)
            if part.bias is not None:
                part.bias = torch.nn.Parameter(fused.bias.data[offset : offset + rows], requires_grad=False)
            offset += rows


# ---- FP8 -----------------------------------------------------------------------------------------------------


def _apply_fp8(transformers: Sequence[Any], device: torch.device, info: PresetInfo, blocked: str | None) -> None:
    if any(getattr(t, "_wanserve_fp8", False) for t in transformers):
        info.fp8 = True
        info.add("fp8:torchao")
        return
    if device.type != "cuda":
        info.skip("fp8", "CPU: FP8 matmuls need a CUDA GPU with compute capability 8.9+ (Ada, Hopper)")
        return
    if blocked:
        info.skip("fp8", blocked)
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        info.skip("fp8", f"compute capability {capability[0]}.{capability[1]} has no FP8 tensor cores (needs 8.9+)")
        return
    if importlib.util.find_spec("torchao") is None:
        info.skip("fp8", "torchao is not installed (pip install torchao)")
        return
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        # set_inductor_config=False: torchao's default turns on coordinate-descent autotuning for every later
        # compile in the process (other models served here, the other presets of a bench run), which multiplies
        # compile time at worker start; the settings it would change stay inductor's own.
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
        for transformer in transformers:
            # First, so that quantization neither converts nor keeps alive the bf16 views of the fused weight.
            _drop_unused_projections(transformer)
            quantize_(transformer, config, filter_fn=_fp8_filter)
            transformer._wanserve_fp8 = True
    except Exception as exc:
        info.skip("fp8", f"torchao: {type(exc).__name__}: {exc}")
        return
    info.fp8 = True
    info.add("fp8:torchao")


def _fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    # Only the blocks' big matmuls: embeddings and the output head stay bf16 (tiny cost, most sensitive),
    # and so do the image K/V projections, whose separate views must keep sharing one bf16 weight.
    if not isinstance(module, torch.nn.Linear) or not fqn.startswith("blocks."):
        return False
    if fqn.endswith(("add_k_proj", "add_v_proj", "to_added_kv")):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _drop_unused_projections(transformer: Any) -> None:
    """The separate projections a fused attention never calls. Once FP8 replaces the fused weight, their bf16
    views would be all that keeps the old storage alive, so they go."""
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        names = ("to_q", "to_k", "to_v") if not module.is_cross_attention else ("to_k", "to_v")
        for name in names:
            setattr(module, name, None)


# ---- regional compilation ------------------------------------------------------------------------------------


def use_compile_cache(folder: Path) -> None:
    """Keep inductor's and Triton's compiled kernels in `folder`, so that the next process to compile the same
    blocks (a restarted worker, a new pod with the folder on a volume) loads them instead of compiling.
    Set before the first compilation of the process; where the user set either variable, theirs wins.

    Importing diffusers already makes inductor write its default (/tmp/torchinductor_<user>) into the
    environment, so a variable that holds exactly that default counts as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.runtime_utils import default_cache_dir

        default: str | None = default_cache_dir()
    except (ImportError, AttributeError):
        default = None
    if current is None or current == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


def _repeated_blocks(transformer: Any) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    return [m for m in transformer.modules() if type(m).__name__ in names]


def _compile_blocks(transformers: Sequence[Any], info: PresetInfo) -> None:
    """Regional compilation: each repeated block's forward is compiled; identical blocks share one graph.

    diffusers' `compile_repeated_blocks` compiles the whole module call, hooks included, so a step-cache hook
    (which calls `.item()` and branches) breaks `fullgraph=True`. Compiling the forward itself keeps the cache
    hooks outside the compiled region: the same speed, and they compose.
    """
    if importlib.util.find_spec("triton") is None and any(p.is_cuda for t in transformers for p in t.parameters()):
        info.skip("compile", "triton is not installed, so inductor cannot generate GPU kernels")
        return
    blocks = [b for t in transformers for b in _repeated_blocks(t)]
    if not blocks:
        info.skip("compile", "this transformer declares no repeated blocks")
        return
    for block in blocks:
        if "_wanserve_compiled_forward" not in block.__dict__:
            compiled = torch.compile(block.forward, fullgraph=True)
            block._wanserve_compiled_forward = compiled
            block.forward = compiled
    info.compiled = True
    info.add("compile:regional(fullgraph)")


def _uncompile_blocks(transformers: Sequence[Any]) -> None:
    for transformer in transformers:
        _disable_step_cache(transformer)
        for block in _repeated_blocks(transformer):
            if "_wanserve_compiled_forward" in block.__dict__:
                del block._wanserve_compiled_forward
                block.__dict__.pop("forward", None)


# ---- step cache (First Block Cache) -------------------------------------------------------------------------


class _CallCounter:
    """Wraps a block's forward and counts the calls that really ran it: a cache hook that skips the block
    never calls what it wraps."""

    def __init__(self, inner: Callable[..., Any]) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def _counters(transformer: Any) -> list[_CallCounter]:
    blocks = getattr(transformer, "blocks", None)
    if not blocks:
        return []
    found = [b.__dict__.get("_wanserve_counter") for b in (blocks[0], blocks[-1])]
    return [c for c in found if c is not None]


def _cacheable(transformer: Any) -> bool:
    blocks = getattr(transformer, "blocks", None)
    return blocks is not None and len(blocks) >= 2 and hasattr(transformer, "enable_cache")


def _enable_step_cache(transformers: Sequence[Any], threshold: float, info: PresetInfo) -> None:
    if not all(_cacheable(t) for t in transformers):
        info.skip("step_cache", "First Block Cache needs a transformer with at least two blocks")
        return
    try:
        _install_step_cache(transformers, threshold)
    except Exception as exc:
        info.cache_possible = False
        info.skip("step_cache", f"{type(exc).__name__}: {exc}")
        return
    info.cache_threshold = info.active_threshold = threshold
    info.add(f"step_cache:first_block_cache(threshold={threshold:g})")


def _install_step_cache(transformers: Sequence[Any], threshold: float) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    try:
        for transformer in transformers:
            # Counters go on first, so the cache hooks wrap them: the tail counter then only sees real runs.
            for block in (transformer.blocks[0], transformer.blocks[-1]):
                counter = _CallCounter(block.forward)
                block._wanserve_counter = counter
                block.forward = counter
            transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    except Exception:
        for transformer in transformers:
            _disable_step_cache(transformer)
        raise


def _disable_step_cache(transformer: Any) -> None:
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()
    for block in getattr(transformer, "blocks", None) or ():
        counter = block.__dict__.get("_wanserve_counter")
        if counter is None:
            continue
        del block._wanserve_counter
        if "_wanserve_compiled_forward" in block.__dict__:
            block.forward = block._wanserve_compiled_forward
        else:
            block.__dict__.pop("forward", None)


# ---- warm-up -------------------------------------------------------------------------------------------------


def warm_up(engine: Engine, steps: int = 2) -> float:
    """One short request at the model's default size, so compilation happens before the first job."""
    from wanserve.request import GenerationRequest, resolve

    spec = engine.spec
    image = _gray_png(spec.width, spec.height) if spec.tasks == {"i2v"} else None
    request = resolve(GenerationRequest(prompt="warm-up", image=image, num_inference_steps=steps, seed=0), spec)
    started = time.perf_counter()
    cond = engine.prepare(request)
    engine.denoise(cond, request, lambda _event: None)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    engine.free_memory()
    return time.perf_counter() - started


def _warm_up_or_fall_back(engine: Engine, info: PresetInfo) -> None:
    info.warmup_seconds = warm_up_with_fallback(engine.transformers, info, lambda: warm_up(engine))


def warm_up_with_fallback(transformers: Sequence[Any], info: PresetInfo, run: Callable[[], Any]) -> float:
    """Call `run` (a warm-up); if compiled code or a kernel it calls fails there, drop that feature from the
    transformers, record why in `info`, and try again. Returns the seconds of the warm-up that succeeded."""
    undo: dict[str, Callable[[], None]] = {}
    if info.compiled:
        undo["compile"] = lambda: _uncompile_blocks(transformers)
    if info.attention_backend is not None:
        undo["attention"] = lambda: _reset_attention(transformers)
    while True:
        started = time.perf_counter()
        try:
            run()
            return time.perf_counter() - started
        except Exception as exc:
            if not undo or _device_failure(exc):
                # Out of memory, or a sticky CUDA error that every later call repeats: no feature is to blame,
                # and dropping one would put a wrong reason in the record and retry for nothing.
                raise
            # Dynamo and inductor errors point at compilation; anything else more likely at the kernel.
            compiler_error = isinstance(exc, _COMPILER_ERRORS)
            feature = "compile" if compiler_error and "compile" in undo else next(reversed(undo))
            log.warning("preset %s: %s failed during warm-up (%s); retrying without it", info.preset, feature, exc)
            undo.pop(feature)()
            if feature == "compile":
                info.compiled = False
            else:
                info.attention_backend = None
            info.skip(feature, f"failed at warm-up: {type(exc).__name__}: {exc}"[:500])
            if info.cache_threshold is not None and feature == "compile":
                # _uncompile_blocks took the cache off with the compiled code; put it back on the plain blocks.
                _enable_step_cache(transformers, info.cache_threshold, info)


# Errors that point at compilation. FailOnRecompileLimitHit (fullgraph=True past the recompile limit) is not a
# TorchDynamoException, but it is the compiler's all the same.
_COMPILER_ERRORS: tuple[type[BaseException], ...] = (
    torch._dynamo.exc.TorchDynamoException,
    getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.TorchDynamoException),
)


def _device_failure(exc: BaseException) -> bool:
    return (
        isinstance(exc, torch.OutOfMemoryError) or type(exc).__name__ == "AcceleratorError" or "CUDA error" in str(exc)
    )


def _reset_attention(transformers: Iterable[Any]) -> None:
    for transformer in transformers:
        transformer.reset_attention_backend()


def _gray_png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def _log_summary(info: PresetInfo) -> None:
    log.info(
        "preset %s on %s: applied %s; skipped %s (%.1f s)",
        info.preset,
        info.device,
        ", ".join(info.applied) or "nothing",
        "; ".join(f"{k} ({v})" for k, v in info.skipped.items()) or "nothing",
        info.apply_seconds,
    )
