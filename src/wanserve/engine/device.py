"""Where a model can run here: the device and the multi-GPU layout, checked before anything heavy loads.

Every command checks these settings before it loads a model or opens a port, and a wrong one must be named in
about a second: the checks (`check_device`, `check_layout`) import torch only where a CUDA device is named
(torch and the engine behind it take seconds to import), and nothing here imports diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wanserve.config import Settings
from wanserve.errors import BadSetting, DeviceUnavailable

if TYPE_CHECKING:
    import torch


class LayoutError(BadSetting):
    """The layout settings do not fit the process group or the model: a wrong setting (exit 2 on the command
    line, named as the user set it)."""


def pick_device(setting: str) -> torch.device:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"{setting} was asked for, but torch {torch.__version__} sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceUnavailable(f"{setting} was asked for, but this machine has {count} CUDA device(s)")
    return device


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def check_device(setting: str) -> None:
    """Raise `DeviceUnavailable` for a CUDA device this machine lacks. `auto` and `cpu` always run somewhere, so
    they are taken without importing torch."""
    if setting not in ("auto", "cpu"):
        pick_device(setting)


def check_layout(settings: Settings, world_size: int) -> None:
    """Raise a `LayoutError` naming the settings when the layout needs another number of processes, or
    another setting rules it out."""
    layout = settings.world_layout
    if settings.cpu_offload and (layout > 1 or world_size > 1):
        raise LayoutError(
            "moves whole models in and out of one GPU: it cannot be combined with a multi-GPU layout", "cpu_offload"
        )
    if world_size == layout or (settings.fsdp and layout == 1 and world_size > 1):
        return
    if layout == 1:  # launched under torchrun with no layout: no setting of the user's is at fault
        raise LayoutError(
            f"WORLD_SIZE is {world_size} (torchrun), but the layout asks for one process: set ulysses, ring and "
            f"cfg_parallel so that their product is {world_size}, or fsdp to shard the weights over the ranks",
            "",
        )
    # Named after the first layout setting that asks for more than one process.
    named = next(key for key in ("ulysses", "ring", "cfg_parallel") if getattr(settings, key) > 1)
    raise LayoutError(
        f"the layout needs ulysses × ring × cfg_parallel = {settings.ulysses} × {settings.ring} × "
        f"{settings.cfg_parallel} = {layout} processes, but WORLD_SIZE is {world_size}. Launch `wanserve "
        f"worker` or `wanserve generate` with `torchrun --nproc-per-node {layout}`, or change the layout "
        "(ulysses, ring, cfg_parallel)",
        named,
    )
