"""Cold start: a fresh process, from exec to engine ready, with weights from local disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_COLD_CHILD = """
import json, sys, time
started = time.perf_counter()
from wanserve.config import Settings
from wanserve.engine.engine import Engine
imported = time.perf_counter()
engine = Engine.load(sys.argv[1], Settings(**json.loads(sys.argv[2])))
ready = time.perf_counter()
print("WANSERVE_READY " + json.dumps({
    "import_seconds": imported - started,
    "load_seconds": ready - imported,
    "warmup_seconds": engine.preset_info.warmup_seconds,
    "preset_apply_seconds": engine.preset_info.apply_seconds,
}), flush=True)
"""


def measure_cold_start(
    model_ref: str, preset: str, settings_kwargs: dict[str, Any], scratch: Path, kept_cache: bool = False
) -> dict[str, Any]:
    """A fresh process from exec to engine ready (weights from local disk, preset applied and warmed up): with
    empty inductor and Triton caches, so compilation is paid in full as on a freshly provisioned host; or, with
    `kept_cache`, with the kernels an earlier call left there, as a worker restarted with its cache folder on a
    volume finds them (`WANSERVE_CACHE_DIR`, see docs/operations.md). The weights were just written, so they
    come from the page cache, not the disk. A start that never becomes ready fails the call."""
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in settings_kwargs.items()}
    kwargs["preset"] = preset
    cold = scratch / "cold"
    cold.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cold / "inductor"), TRITON_CACHE_DIR=str(cold / "triton"))
    start = _start_engine(model_ref, kwargs, env, cold / ("second.log" if kept_cache else "first.log"))
    if "error" in start:  # the phase fails, so the run says so (errors, exit status 1)
        raise RuntimeError(f"the fresh process never became ready: {start['error']}")
    if kept_cache:
        return {**start, "inductor_cache": "the kernels the first start compiled"}
    return {**start, "preset": preset, "inductor_cache": "empty (fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR)"}


def _start_engine(model_ref: str, kwargs: dict[str, Any], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    # stderr goes to a file: a pipe nobody reads while stdout is read would block a chatty child (compile logs).
    with log_path.open("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", _COLD_CHILD, model_ref, json.dumps(kwargs)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        child: dict[str, Any] | None = None
        ready_at = None
        try:
            for line in process.stdout:
                if line.startswith("WANSERVE_READY "):
                    ready_at = time.perf_counter()
                    child = json.loads(line.removeprefix("WANSERVE_READY "))
            process.wait(timeout=600)
        finally:
            # A run stopped meanwhile (a time limit's SIGTERM) or a child that hangs must not leave it behind,
            # holding device memory and writing into a scratch folder that is being removed.
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr.seek(0)
        last = stderr.read().strip().splitlines()[-1:]
    if child is None or ready_at is None:
        return {"error": f"exit {process.returncode}: {last}"}
    return {
        "seconds_to_ready": round(ready_at - started, 3),
        **{k: None if v is None else round(float(v), 3) for k, v in child.items()},
    }
