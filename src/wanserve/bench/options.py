"""What one `wanserve bench` run is asked to measure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wanserve.request import PRESET_NAMES


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
    baseline: bool = True  # plain diffusers timed too; off for a run about the presets' memory alone
    cold_start: bool | None = None  # None: when weights are on disk already (tiny, --checkpoint)
    device: str = "auto"
    cache_dir: Path | None = None
    time_budget: float | None = None  # seconds after which no new phase starts (a device session's limit)
