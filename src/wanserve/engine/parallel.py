"""Multi-GPU layouts for the engine: process groups, the device mesh, and what each rank runs.

Everything is built from `Settings` (`ulysses`, `ring`, `cfg_parallel`, `fsdp`, `collective_timeout`) and
the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

- sequence parallelism (Ulysses, ring, or both) is diffusers' context parallelism, applied to every
  transformer of the pipeline (both experts of A14B);
- CFG parallelism runs the conditional and the unconditional pass on two halves of the group
  (`Engine.predict_noise` asks `cfg_rank` which pass is its own and exchanges the results with `exchange_cfg`);
- FSDP shards the transformer(s) and the text encoder over all ranks, on top of the other layouts.

The mesh is ("replica", "cfg", "ring", "ulysses"), Ulysses innermost so that its all-to-alls stay between
neighbouring ranks (the same node, NVLink). "replica" is larger than 1 only for FSDP alone, where every rank
runs the whole computation on its own shard of the weights.

Rank agreement: ranks must never take different decisions, or the next collective hangs. `broadcast_object`
hands rank 0's request to everyone, `agree` turns one rank's cancel into everyone's, and a `Watchdog` ends a
process whose peer died instead of letting it wait forever. `GroupLeader` and `follow` are the loop a worker
group runs: rank 0 claims jobs and leads, the other ranks follow.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from wanserve.config import Settings, world_size_from_env
from wanserve.engine.device import LayoutError, check_layout
from wanserve.errors import Cancelled

if TYPE_CHECKING:
    from concurrent.futures import Future

    from wanserve.engine.engine import CancelCheck, Engine, GenerationResult, ProgressCallback
    from wanserve.request import GenerationRequest

log = logging.getLogger(__name__)

MESH_DIMS = ("replica", "cfg", "ring", "ulysses")
WATCHDOG_EXIT_CODE = 3


# ---- watchdog ----------------------------------------------------------------------------------------------


class Watchdog:
    """Ends the process when a guarded stretch (a step, a collective) outlives the timeout or a collective fails.

    gloo and NCCL time out on their own, but a NCCL hang inside a kernel, or an exception swallowed on
    the way out, can still leave a rank waiting forever; and a rank that carries on after a failed
    collective is out of step with its peers for good. A supervisor (torchrun, Kubernetes) can only restart a
    group whose processes exit, so this exits, loudly.
    """

    def __init__(self, timeout: float, rank: int) -> None:
        self.timeout = timeout
        self.rank = rank
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._what = ""
        self._depth = 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Arm for the duration of the block; nested guards run under the outermost deadline."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._deadline = time.monotonic() + self.timeout
                self._what = what
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="wanserve-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        except Exception as exc:
            if _is_collective_failure(exc):
                self.broken(what, exc)
            raise
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._deadline = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 10)
        while True:
            time.sleep(poll)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if expired:
                self.end(what, None)

    def broken(self, what: str, exc: BaseException) -> NoReturn:
        """A collective of `what` raised: this rank is out of step with its peers for good, so it ends."""
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
        self.end(what, None if timed_out else f"collective failed ({first_line})")

    def end(self, what: str, failure: str | None) -> NoReturn:
        """Log one FATAL line naming `what` was under way, and exit `WATCHDOG_EXIT_CODE` at once."""
        problem = failure or f"collective timed out after {self.timeout:g} s"
        log.critical(
            "FATAL: %s on rank %d (a peer rank probably died); exiting so the group can be restarted [during %s]",
            problem,
            self.rank,
            what,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WATCHDOG_EXIT_CODE)


def _is_collective_failure(exc: BaseException) -> bool:
    """gloo raises plain RuntimeErrors that name it; NCCL and the stores raise `DistError`s."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text.lower() or "NCCL" in text)


# ---- the group ---------------------------------------------------------------------------------------------


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # dims MESH_DIMS
    ulysses: int
    ring: int
    cfg: int
    fsdp: bool
    watchdog: Watchdog
    fsdp_mesh: DeviceMesh | None = None
    cp_configs: list[Any] = field(default_factory=list)  # one diffusers ContextParallelConfig per transformer
    attention_backend: str | None = None  # what sequence parallelism set (a preset's attention choice yields to it)

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def cfg_rank(self) -> int:
        """0 on the ranks that run the conditional pass, 1 on those that run the unconditional one."""
        return self.mesh.get_local_rank("cfg")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self.watchdog.guard(what)


def init_group(settings: Settings) -> ParallelContext:
    """Join the torchrun group (once per process) and build the mesh for `settings`' layout."""
    world_size = world_size_from_env()
    check_layout(settings, world_size)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = settings.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        # One GPU per process: `cuda` or `cuda:N` in the settings would put every rank on the same GPU.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=settings.collective_timeout),
            device_id=device if use_cuda else None,
        )
        atexit.register(_destroy_group)
    shape = (world_size // settings.world_layout, settings.cfg_parallel, settings.ring, settings.ulysses)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)
    fsdp_mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("fsdp",)) if settings.fsdp else None
    ctx = ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        mesh=mesh,
        ulysses=settings.ulysses,
        ring=settings.ring,
        cfg=settings.cfg_parallel,
        fsdp=settings.fsdp,
        watchdog=Watchdog(settings.collective_timeout, rank),
        fsdp_mesh=fsdp_mesh,
    )
    log.info(
        "rank %d/%d on %s: mesh %s = %s%s",
        rank,
        world_size,
        device,
        dict(zip(MESH_DIMS, shape, strict=True)),
        mesh.get_coordinate(),
        ", FSDP over all ranks" if settings.fsdp else "",
    )
    return ctx


def _destroy_group() -> None:
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


# ---- agreement between ranks -------------------------------------------------------------------------------


def agree(ctx: ParallelContext, flag: bool) -> bool:
    """True on every rank if it is True on any rank (an all-reduce MAX), so all take the same branch."""
    with ctx.guard("agree"):
        value = torch.tensor([int(flag)], dtype=torch.int32, device=ctx.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


# The slowest rank's load (a cold download of 14B weights on another node) may end this long after the
# fastest's; past it, a rank still loading is taken for hung.
LOAD_WAIT_S = 3600.0
_LOADS = itertools.count()


def wait_until_loaded(ctx: ParallelContext, timeout: float = LOAD_WAIT_S) -> None:
    """Return once every rank has loaded its model. Not a collective: those time out after `collective_timeout`,
    so a rank that loaded slower than the others by more than that (another node's cold cache) ended the group
    at start, blaming a dead peer, and rank 0 said /ready meanwhile. The c10d store counts the ranks instead,
    with a deadline of its own."""
    what = "waiting for the other ranks to load the model"
    # Every rank loads its models in the same order; torchrun keeps one store across the restarts of a group.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = f"wanserve/loaded/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}/{next(_LOADS)}"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add(key, 1)
        started = time.monotonic()
        next_note = started + 30.0
        while (loaded := store.add(key, 0)) < ctx.world_size:
            now = time.monotonic()
            if now - started > timeout:
                ctx.watchdog.end(
                    what, f"{ctx.world_size - loaded} of {ctx.world_size} ranks not loaded after {timeout:g} s"
                )
            if now >= next_note:
                log.info(
                    "rank %d: loaded; %d of %d ranks still loading", ctx.rank, ctx.world_size - loaded, ctx.world_size
                )
                next_note = now + 30.0
            time.sleep(0.1)
    except Exception as exc:  # the store's host (torchrun's agent on the first node) went away
        ctx.watchdog.broken(what, exc)


def broadcast_object(ctx: ParallelContext, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the others' argument is ignored). Not guarded: followers wait here
    while the leader is idle, so the leader must broadcast at least every `collective_timeout` seconds."""
    box = [obj if ctx.is_leader else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def exchange_cfg(ctx: ParallelContext, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) predictions on every rank, each computed by its own half of the group."""
    parts = [torch.empty_like(mine) for _ in range(ctx.cfg)]
    dist.all_gather(parts, mine.contiguous(), group=ctx.mesh.get_group("cfg"))
    return parts[0], parts[1]


# ---- layouts -----------------------------------------------------------------------------------------------


def apply_layout(engine: Engine, ctx: ParallelContext) -> None:
    """Turn on the context's layout: sequence parallelism on every transformer, then FSDP."""
    if ctx.sequence_degree > 1:
        if dist.get_backend() == "gloo":
            _install_gloo_uneven_gather()
        for transformer in engine.transformers:
            _check_heads(transformer.config.num_attention_heads, ctx)
            ctx.cp_configs.append(_enable_context_parallel(transformer, ctx, engine.dtype))
    if ctx.fsdp:
        _apply_fsdp(engine, ctx)


def _check_heads(heads: int, ctx: ParallelContext) -> None:
    if heads % ctx.ulysses == 0:
        return
    if ctx.ring == 1:
        # ulysses_anything pads the heads of the last rank, which only works while the padding is smaller
        # than a rank's share (diffusers asserts it).
        pad = ctx.ulysses - heads % ctx.ulysses
        if pad < (heads + pad) // ctx.ulysses:
            return
    raise LayoutError(
        f"{ctx.ulysses} splits attention heads, and this model's {heads} heads do not divide by it: choose a "
        "ulysses degree that divides the head count and put the rest of the ranks in ring",
        "ulysses",
    )


def _enable_context_parallel(transformer: Any, ctx: ParallelContext, dtype: torch.dtype) -> Any:
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    backend = _attention_backend(ctx, dtype)
    transformer.set_attention_backend(backend)
    ctx.attention_backend = backend
    cp = ContextParallelConfig(ulysses_degree=ctx.ulysses, ring_degree=ctx.ring, mesh=ctx.mesh)

    # diffusers picks the device as `rank % torch.accelerator.device_count()`, which divides by zero on a
    # CPU host and ignores LOCAL_RANK across nodes; resolve the config with this rank's device instead.
    def resolve(config: Any) -> Any:
        parallel = ParallelConfig(context_parallel_config=config)
        parallel.setup(ctx.rank, ctx.world_size, ctx.device, mesh=ctx.mesh)
        transformer._parallel_config = parallel
        return parallel

    transformer._resolve_parallel_config = resolve  # shadows the method for this one call
    try:
        transformer.enable_parallelism(config=cp)
    finally:
        del transformer._resolve_parallel_config
    return cp


def _attention_backend(ctx: ParallelContext, dtype: torch.dtype) -> str:
    """An attention backend that supports context parallelism on this device.

    Ring attention merges partial results by their log-sum-exp, which diffusers' `native` backend does not
    return. On CUDA in bf16/fp16 the cuDNN backend does; elsewhere (CPU, fp32) `native` gets an LSE-capable
    kernel (see `_install_native_lse`). Ulysses alone needs no LSE and stays on `native`.
    """
    if ctx.ring == 1:
        return "native"
    if ctx.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return "_native_cudnn"
    _install_native_lse()
    return "native"


_native_forward_op: Callable[..., Any] | None = None


def _install_native_lse() -> None:
    """Let diffusers' native forward op return the log-sum-exp that its ring attention asks for."""
    global _native_forward_op
    from diffusers.models import attention_dispatch

    if _native_forward_op is not None:
        return
    _native_forward_op = attention_dispatch._native_attention_forward_op
    attention_dispatch._native_attention_forward_op = _native_forward_op_with_lse


def _native_forward_op_with_lse(
    ctx: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any = None,
) -> Any:
    assert _native_forward_op is not None
    if not return_lse:
        return _native_forward_op(
            ctx,
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            False,
            _save_ctx,
            _parallel_config,
        )
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise NotImplementedError("ring attention on the native backend supports plain attention only")
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, H, S, D)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    else:
        # Inference-only fallback for fp32 on GPUs (no fused kernel returns the LSE in fp32 everywhere).
        scores = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        lse = torch.logsumexp(scores, dim=-1)
        out = (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)
    return out.permute(0, 2, 1, 3), lse.permute(0, 2, 1)  # model layout: (B, S, H, D), (B, S, H)


_uneven_gather: Callable[..., torch.Tensor] | None = None


def _install_gloo_uneven_gather() -> None:
    """Let diffusers' "anything" modes gather uneven shards over gloo (CPU), whose all_gather needs equal sizes.

    NCCL gathers uneven tensors natively; over gloo each shard is padded to the largest, gathered and trimmed.
    """
    global _uneven_gather
    from diffusers.hooks import context_parallel as hooks

    if _uneven_gather is not None:
        return
    _uneven_gather = hooks._all_gather_anything

    def gather(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        assert _uneven_gather is not None
        if dist.get_backend(group) != "gloo":
            return _uneven_gather(tensor, dim, group)
        from diffusers.models._modeling_parallel import gather_size_by_comm

        sizes = gather_size_by_comm(tensor.shape[dim], group)
        shape = list(tensor.shape)
        shape[dim] = max(sizes) - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim).contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes, strict=True)], dim=dim)

    hooks._all_gather_anything = gather


def fit_sequence(ctx: ParallelContext, transformers: list[Any], tokens: int) -> str:
    """Set the sequence split for a request of `tokens` tokens; returns the mode ("even", "anything", "unsplit").

    Equal shards are the fast path. Ulysses alone and ring alone switch to diffusers' "anything" modes
    (uneven shards, heads padded) when the tokens do not divide. Ulysses × ring has no such mode, and padding
    tokens would change attention, so such a request runs unsplit on every rank: slower, but the same video.
    Every rank computes the same mode from the same request, so they stay in step.
    """
    if not ctx.cp_configs:
        return "even"
    heads = transformers[0].config.num_attention_heads
    divides = tokens % ctx.sequence_degree == 0 and heads % ctx.ulysses == 0
    mode = "even" if divides else "unsplit" if ctx.ulysses > 1 and ctx.ring > 1 else "anything"
    if mode == "unsplit":
        log.warning(
            "%d tokens do not divide ulysses × ring = %d: this request runs unsplit", tokens, ctx.sequence_degree
        )
    flag = "ulysses_anything" if ctx.ring == 1 else "ring_anything"
    for transformer, cp in zip(transformers, ctx.cp_configs, strict=True):
        if ctx.ulysses == 1 or ctx.ring == 1:
            setattr(cp, flag, mode == "anything")  # read by diffusers' split hooks and attention on every call
        _set_split(transformer, cp, split=mode != "unsplit")
    return mode


def _set_split(transformer: Any, cp: Any, split: bool) -> None:
    from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel

    is_split = getattr(transformer, "_wanserve_split", True)
    if split == is_split:
        return
    if split:
        apply_context_parallel(transformer, cp, transformer._cp_plan)
        _set_processor_config(transformer, transformer._parallel_config)
    else:
        remove_context_parallel(transformer, transformer._cp_plan)
        _set_processor_config(transformer, None)
    transformer._wanserve_split = split


def _set_processor_config(transformer: Any, config: Any) -> None:
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config


def _apply_fsdp(engine: Engine, ctx: ParallelContext) -> None:
    """Shard each block, then the rest of the model: only one block's weights are whole at a time."""
    from torch.distributed.fsdp import fully_shard

    assert ctx.fsdp_mesh is not None
    # Explicit True: FSDP keeps a root's weights whole after forward by default, for a backward we never run.
    shard = {"mesh": ctx.fsdp_mesh, "reshard_after_forward": True}
    for transformer in engine.transformers:
        for block in transformer.blocks:
            fully_shard(block, **shard)
        fully_shard(transformer, **shard)
    encoder = engine.pipe.text_encoder
    if engine.text_device != ctx.device:
        log.info("text encoder kept whole on %s (text_encoder_cpu); FSDP shards the transformers", engine.text_device)
        return
    for block in getattr(getattr(encoder, "encoder", None), "block", []):
        fully_shard(block, **shard)
    fully_shard(encoder, **shard)


# ---- a worker group: rank 0 leads, the others follow ---------------------------------------------------------


class GroupLeader:
    """Rank 0's handle on the group, with the `generate` of an `Engine` (what `Worker` needs).

    Followers wait in `broadcast_object`, which times out after `collective_timeout`: a leader with no job
    must call `idle()` more often than that (the worker's poll loop is the place).
    """

    def __init__(self, engine: Engine) -> None:
        assert engine.parallel is not None and engine.parallel.is_leader
        self.engine = engine
        self.ctx = engine.parallel
        self.spec = engine.spec

    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        *,
        write_async: bool = False,
    ) -> GenerationResult | Future[GenerationResult]:
        req = self.engine.resolve(request)  # an invalid request never reaches the followers
        self._tell("generate", req)
        if write_async:
            return self.engine.generate(req, out_path, on_progress, should_cancel, write_async=True)
        return self.engine.generate(req, out_path, on_progress, should_cancel)

    def idle(self) -> None:
        self._tell("idle", None)

    def stop(self) -> None:
        self._tell("stop", None)

    def _tell(self, kind: str, request: Any) -> None:
        """Guarded, and any failure ends the group: a beat that found a follower dead or stopped was logged and
        the group went on idling, /ready 200, until it claimed a job and stranded it; gloo's "Application
        timeout caused pair closure" names no backend, so every error of these broadcasts counts."""
        what = f"telling the followers: {kind}"
        with self.ctx.guard(what):
            try:
                broadcast_object(self.ctx, (kind, request))
            except Exception as exc:
                self.ctx.watchdog.broken(what, exc)


def follow(engine: Engine) -> None:
    """The loop of every rank but 0: run each request the leader broadcasts, until it says stop."""
    ctx = engine.parallel
    assert ctx is not None and not ctx.is_leader
    scratch = Path(os.devnull)  # followers write no file
    while True:
        try:
            kind, request = broadcast_object(ctx, None)
        except Exception as exc:  # rank 0 died or hung between jobs: the same FATAL line and code as mid-job
            ctx.watchdog.broken("waiting for rank 0's next word", exc)
        if kind == "stop":
            return
        if kind == "generate":
            try:
                engine.generate(request, scratch)
            except Cancelled as exc:  # the leader saw the same agreed cancel at the same step
                log.info("rank %d: %s", ctx.rank, exc)
