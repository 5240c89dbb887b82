"""Peak device memory of one measured stretch: what a card must hold for it."""

from __future__ import annotations

from typing import Any

import torch

GIB = 2**30


def start_window(device: torch.device) -> int | None:
    """Begin a stretch whose peak is measured: the allocator's cached blocks are returned first, so the reserved
    peak (what the card must really hold, fragmentation included) is this stretch's own. Returns the bytes
    allocated at its start (the weights, and whatever stays resident, such as a text encoder)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peaks(device: torch.device, start: int | None) -> dict[str, Any]:
    """`peak_memory_gb` (allocated), `peak_reserved_gb` (held by the allocator; the CUDA context, some hundreds of
    MiB, comes on top) and `peak_added_gb` (allocated above the stretch's start: its own working memory, the
    same whatever else stays resident)."""
    if device.type != "cuda":
        return {"peak_memory_gb": None}
    allocated = torch.cuda.max_memory_allocated(device)
    return {
        "peak_memory_gb": round(allocated / GIB, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
        "peak_added_gb": round((allocated - start) / GIB, 3) if start is not None else None,
    }
