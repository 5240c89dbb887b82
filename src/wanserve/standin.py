"""A stand-in engine that sleeps per denoising step and writes a small real MP4.

For the control-plane benchmark and throughput tests ONLY (1,000 jobs through 4 workers): it exercises
the queue, leases, progress, cancel, storage and the API at real speed without a model. Never served
to users: it is reachable only through `python -m wanserve.standin`, not through the `wanserve` command.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from wanserve.catalog import ModelSpec, resolve_spec
from wanserve.engine.video import thumbnail_path_for, write_mp4, write_thumbnail
from wanserve.errors import Cancelled
from wanserve.progress import ProgressEvent
from wanserve.request import GenerationRequest, resolve


class StandInResult:
    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


class StandInEngine:
    def __init__(self, spec: ModelSpec, step_seconds: float = 0.01, frames: int = 5, size: int = 32) -> None:
        self.spec = spec
        self.step_seconds = step_seconds
        # One small clip, encoded once: the stand-in measures the control plane, not video encoding.
        self._frames = np.random.default_rng(0).integers(0, 255, (frames, size, size, 3), dtype=np.uint8)

    def generate(
        self,
        request: GenerationRequest,
        out_path: Path | str,
        on_progress: Any,
        should_cancel: Any,
        *,
        write_async: bool = False,
    ) -> Any:
        result = self._generate(request, out_path, on_progress, should_cancel)
        if not write_async:
            return result
        future: Future[Any] = Future()
        future.set_result(result)
        return future

    def _generate(self, request: GenerationRequest, out_path: Path | str, on_progress: Any, should_cancel: Any) -> Any:
        req = resolve(request, self.spec)
        assert req.num_inference_steps is not None and req.seed is not None and req.fps
        started = time.perf_counter()
        total = req.num_inference_steps
        for step in range(total):
            if should_cancel is not None and should_cancel():
                raise Cancelled(step, total)
            time.sleep(self.step_seconds)
            if on_progress is not None:
                on_progress(
                    ProgressEvent.at(
                        "denoise", (step + 1) / total, step=step + 1, total_steps=total, step_seconds=self.step_seconds
                    )
                )
        out = Path(out_path)
        write_mp4(self._frames, out, fps=req.fps)
        thumb = write_thumbnail(self._frames, thumbnail_path_for(out))
        total_s = time.perf_counter() - started
        return StandInResult(
            video_path=out,
            thumbnail_path=thumb,
            seed=req.seed,
            width=req.width,
            height=req.height,
            num_frames=len(self._frames),
            fps=req.fps,
            timings={"denoise": round(total_s, 4), "total": round(total_s, 4)},
            preset=req.preset,
            skipped_fraction=0.0,  # no step cache: every "step" runs
            skipped_steps=0.0,
            accelerations=[],  # no model, nothing to speed up
        )


def main(argv: list[str]) -> None:
    """`python -m wanserve.standin MODEL STEP_SECONDS`: a worker process (same settings/env as `wanserve worker`)."""
    import logging

    from wanserve.config import Settings
    from wanserve.roles import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, step_seconds = argv[0], float(argv[1])
    settings = Settings(model=[model])
    run_worker(settings, engine=StandInEngine(resolve_spec(model), step_seconds))


if __name__ == "__main__":
    main(sys.argv[1:])
