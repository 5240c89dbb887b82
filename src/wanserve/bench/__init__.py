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

Modules: `shapes` (what is measured), `options`, `run` (the phases in order), `models`, `forward`, `requests`,
`serving`, `cold_start`, `projection` (per-step figures and targets) and `report` (the results file).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562): `wanserve bench` checks its options against `shapes` first, and a wrong
# option is answered before torch and the engine (seconds) are imported.
_EXPORTS = {
    "transformer_flops": "forward",
    "BenchOptions": "options",
    "measure_vae_decode": "projection",
    "per_step_projection": "projection",
    "summary_rows": "report",
    "target_lines": "report",
    "serving_lines": "report",
    "psnr": "requests",
    "run_bench": "run",
    "SHAPES": "shapes",
    "T2V_1_3B": "shapes",
    "Shape": "shapes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
