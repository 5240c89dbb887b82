"""Progress events the engine emits and the worker, CLI and API relay. Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Stage = Literal["load", "encode_prompt", "denoise", "vae_decode", "video_encode", "done"]

# Share of the whole job each stage stands for, so `progress` moves at the pace a user feels.
_STAGE_SPAN: dict[str, tuple[float, float]] = {
    "load": (0.0, 0.0),
    "encode_prompt": (0.0, 0.04),
    "denoise": (0.04, 0.92),
    "vae_decode": (0.92, 0.98),
    "video_encode": (0.98, 1.0),
    "done": (1.0, 1.0),
}


@dataclass(frozen=True)
class ProgressEvent:
    stage: Stage
    progress: float  # 0..1 over the whole job
    step: int | None = None  # denoising steps completed (1-based), for stage "denoise"
    total_steps: int | None = None
    step_seconds: float | None = None  # measured time of the step just completed
    expert: int | None = None  # 0 = first (high-noise) transformer, 1 = second (low-noise)
    seconds: float | None = None  # duration of the stage, on its closing event

    @classmethod
    def at(cls, stage: Stage, fraction: float = 0.0, **kwargs: Any) -> ProgressEvent:
        start, end = _STAGE_SPAN[stage]
        return cls(stage=stage, progress=round(start + (end - start) * min(max(fraction, 0.0), 1.0), 4), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
