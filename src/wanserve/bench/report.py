"""The results file (`benchmarks/results/<device>-<date>.json`), the environment it records, and the console
summary."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

SCHEMA = 2  # 2: each run carries its own environment

log = logging.getLogger(__name__)


def describe_environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torchao": _version("torchao"),
        "sageattention": _version("sageattention"),
        "flash_attn": _version("flash_attn"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device_type": device.type,
        **_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_driver(),
        )
    else:
        env.update(device_name=env["cpu"], driver=None)
    return env


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _commit() -> dict[str, Any]:
    """The commit the numbers belong to: from git, or, on a machine handed the tree without .git (the device
    tool's), what benchmarks/gpu_runs.sh read from .whl/COMMIT; unknown (None) otherwise, never "clean"."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        return {"git_commit": commit, "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    dirty = {"1": True, "0": False}.get(os.environ.get("BENCH_GIT_DIRTY", ""))
    return {"git_commit": os.environ.get("BENCH_GIT_COMMIT") or None, "git_dirty": dirty}


def _git(*args: str) -> str | None:
    """Read-only git queries (the commit the numbers belong to); None outside a checkout."""
    if shutil.which("git") is None:
        return None
    # GIT_OPTIONAL_LOCKS=0: `git status` must not refresh the index of a checkout others are working in.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent, env=env
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def device_slug(environment: dict[str, Any]) -> str:
    name = str(environment.get("device_name") or "unknown")
    if environment.get("device_type") == "cpu":
        name = "cpu-" + re.sub(r"@.*$", "", name)
    name = re.sub(r"\((r|tm)\)|\bcpu\b(?!-)|processor", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "unknown"


class ResultsFileError(ValueError):
    """The day's results file is there but is not one: it is refused, never overwritten with this run alone."""


def results_path(environment: dict[str, Any], out_dir: Path) -> Path:
    return out_dir / f"{device_slug(environment)}-{environment['date']}.json"


def read_results(path: Path) -> dict[str, Any]:
    """The results file at `path`, or an empty one when there is none yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ResultsFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ResultsFileError(f"{path} is not JSON ({exc}): move it away, or pick another --out") from None
    if not isinstance(document, dict) or not isinstance(document.get("runs"), dict) or "schema" not in document:
        raise ResultsFileError(f"{path} is not a wanserve bench results file: move it away, or pick another --out")
    # Schema 1 kept one environment for the whole file, its last run's: each run now carries its own.
    legacy = document.pop("environment", None)
    for run in document.get("runs", {}).values():
        if isinstance(run, dict) and isinstance(legacy, dict):
            run.setdefault("environment", legacy)
    return document


def write_report(report: dict[str, Any], environment: dict[str, Any], out_dir: Path) -> Path:
    """Merge this run into `<out_dir>/<device>-<date>.json` (one file per device per day, runs by name), with
    the environment it ran in: runs of one day may come from other commits, sessions and package versions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(environment, out_dir)
    document = read_results(path)
    document["schema"] = SCHEMA
    runs = document.setdefault("runs", {})
    report["environment"] = environment
    key = _key(runs, report)
    if key not in runs and key != report["run"]:
        log.warning("bench: %s keeps the earlier whole run %r; this one is saved as %r", path, report["run"], key)
    for stale in [k for k, run in runs.items() if k != key and _same_run(run, report)]:
        del runs[stale]  # this run's earlier saves, under the other key
    runs[key] = report
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_finite(document), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def _whole(run: Any) -> bool:
    """Finished, with no phase failed or skipped: a run that measured everything it was asked to."""
    return (
        isinstance(run, dict)
        and run.get("complete") is True
        and not run.get("errors")
        and not run.get("skipped_phases")
    )


def _same_run(run: Any, report: dict[str, Any]) -> bool:
    return isinstance(run, dict) and run.get("run_id") is not None and run.get("run_id") == report.get("run_id")


def _key(runs: dict[str, Any], report: dict[str, Any]) -> str:
    """The run's name; but a run cut short, or with a phase failed or skipped, never replaces a whole run of the
    same name (a rerun stopped by a time limit would lose the figures the first one had): it sits beside it,
    as `<name>@<started_at>-<id>`, until it finishes whole itself."""
    name = report["run"]
    earlier = runs.get(name)
    if earlier is None or _same_run(earlier, report) or not _whole(earlier) or _whole(report):
        return name
    # The run's id too: two runs may start within one second (a tiny run cut short takes less).
    return f"{name}@{report.get('started_at')}-{str(report.get('run_id'))[:6]}"


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows for the console table: config, ms per unit, ms of a step-cache hit, TFLOP/s, % of ceiling, speedup,
    request s, skipped, PSNR."""
    rows = []
    for name, entry in report["forward"].items():
        req = report.get("request", {}).get(name, {}) if isinstance(report.get("request"), dict) else {}
        # Against exact where exact ran; else against diffusers, said so (a run without exact has no other).
        psnr_value, against = req.get("psnr_vs_exact_db"), ""
        identical = req.get("identical_to_exact", req.get("identical_to_diffusers"))
        if psnr_value is None and req.get("psnr_vs_diffusers_db") is not None:
            psnr_value, against = req["psnr_vs_diffusers_db"], " vs diffusers"
        rows.append(
            (
                name,
                f"{entry['ms']:.2f}",
                f"{entry['cached']['ms']:.2f}" if "cached" in entry else "-",
                f"{entry['tflops']:.3f}",
                f"{entry['percent_of_ceiling']:.1f}" if entry.get("percent_of_ceiling") is not None else "-",
                f"{entry['speedup_vs_diffusers']:.3f}x" if entry.get("speedup_vs_diffusers") else "-",
                f"{req['seconds']:.2f}" if "seconds" in req else "-",
                f"{req['skipped_fraction']:.2f}" if "skipped_fraction" in req else "-",
                "identical" if identical and psnr_value is None else _fmt(psnr_value) + against,
            )
        )
    return rows


def target_lines(report: dict[str, Any]) -> list[str]:
    """One line per target of the issue: goal, measured value, verdict."""
    lines = []
    for key, target in report.get("targets", {}).items():
        if not isinstance(target, dict):
            continue
        verdict = {True: "met", False: "missed", None: "not measured"}[target["met"]]
        line = f"{key}: goal {target['goal']:g}, measured {_fmt(target['measured'], 3)}: {verdict}"
        if target.get("projected"):
            line += " (projected to the model's steps)"
        if target.get("figure"):
            line += f" ({target['figure']}; over the whole run {_fmt(target.get('busy_fraction'), 3)})"
        if as_ratio := target.get("as_ratio"):
            ratio_verdict = {True: "met", False: "missed", None: "not measured"}[as_ratio["met"]]
            line += (
                f"; as a speed-up over diffusers in this run: goal {as_ratio['goal']:g}, "
                f"measured {_fmt(as_ratio['measured'], 3)}: {ratio_verdict}"
            )
        if target["met"] is False and "met_at_skipped_fraction" in target:
            share = target["met_at_skipped_fraction"]
            line += " with every step computed; " + (
                f"met if the step cache skips {share:.0%} of the steps"
                if share is not None
                else "not met even if the step cache skipped every step"
            )
        lines.append(line)
    return lines


def serving_lines(report: dict[str, Any]) -> list[str]:
    """The serving phases in a line each, as the JSON has them: busy share of the accelerator (to the last
    frames, the 97 % target's figure, and to the last completion), the gaps between jobs, and what overlap
    saved over the same jobs run one after another."""
    serving = report.get("serving")
    if not isinstance(serving, dict) or "busy_fraction" not in serving:
        return []
    lines = []
    for label, phase in (("overlap on", serving), ("overlap off", serving.get("sequential"))):
        if not isinstance(phase, dict):
            continue
        gaps = phase.get("gaps_between_jobs_seconds") or []
        line = (
            f"serving ({label}, {phase.get('jobs')} jobs via {phase.get('via')}): busy "
            f"{_fmt(phase.get('busy_fraction_to_last_frames'), 3)} to the last frames, "
            f"{_fmt(phase.get('busy_fraction'), 3)} to the last completion"
        )
        if gaps:
            line += f"; gaps between jobs {', '.join(f'{gap:.3f}' for gap in gaps)} s"
        lines.append(line)
    if serving.get("overlap_wall_speedup") is not None:
        lines.append(
            f"serving: overlap's wall-time speed-up over one job after another {serving['overlap_wall_speedup']:.3f}"
        )
    return lines


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
