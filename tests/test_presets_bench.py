"""Presets (exact, fast, fastest) and `wanserve bench`, on the CPU with the tiny models. No timing assertions:
the CPU numbers only prove that the harness and every preset path still run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch

from wanserve import bench
from wanserve.bench import (
    SHAPES,
    T2V_1_3B,
    BenchOptions,
    measure_vae_decode,
    per_step_projection,
    psnr,
    transformer_flops,
)
from wanserve.bench import models as bench_models
from wanserve.bench import run as bench_run
from wanserve.bench.projection import check_targets
from wanserve.catalog import lookup
from wanserve.config import Settings
from wanserve.engine import presets
from wanserve.engine.engine import Engine
from wanserve.engine.presets import apply_preset
from wanserve.errors import InvalidRequest
from wanserve.progress import ProgressEvent
from wanserve.request import GenerationRequest, resolve

from engine_fixtures import diffusers_latents
from videos import decode_mp4, png_bytes

RED = png_bytes((220, 30, 30))
STEPS = 20  # enough steps for First Block Cache to find steps to skip on the tiny model


@pytest.fixture(autouse=True)
def _own_compile_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that compiles keeps its kernels, and the variables that point at them, to itself."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


@pytest.fixture(scope="module")
def preset_engines(tiny_cache: Path) -> dict[str, Engine]:
    return {p: Engine.load("tiny-t2v", Settings(cache_dir=tiny_cache, preset=p)) for p in presets.PRESET_NAMES}


def fox(seed: int = 3, steps: int = STEPS) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox in the snow", width=128, height=64, num_frames=13, num_inference_steps=steps, seed=seed
    )


@pytest.mark.parametrize("preset", presets.PRESET_NAMES)
def test_each_preset_writes_a_valid_video(preset_engines: dict[str, Engine], preset: str, tmp_path: Path) -> None:
    engine = preset_engines[preset]
    result = engine.generate(fox(), tmp_path / f"{preset}.mp4")

    video = decode_mp4(result.video_path)
    assert video.frames.shape == (13, 64, 128, 3)
    assert (video.width, video.height) == (128, 64)
    info = engine.preset_info
    assert info.preset == preset and info.lossy == (preset != "exact")
    if preset == "exact":
        assert result.skipped_fraction == 0.0 and result.skipped_steps == 0.0
    else:
        assert 0.0 < result.skipped_fraction <= 1.0
        assert result.skipped_steps == pytest.approx(result.skipped_fraction * STEPS, abs=1e-2)
        assert any(a.startswith("step_cache:") for a in info.applied)


def test_a_request_switches_the_step_cache_where_its_preset_allows(
    preset_engines: dict[str, Engine], tmp_path: Path
) -> None:
    """A request's `preset` changes only the step cache: an exact engine serves a `fast` request exactly as a
    fast engine does, a fast engine serves an `exact` one exactly as an exact engine does, and the next
    request gets the engine's own preset back."""
    exact, fast, fastest = (preset_engines[p] for p in presets.PRESET_NAMES)
    plain = exact.generate(fox(), tmp_path / "plain.mp4")
    assert plain.preset == "exact" and plain.skipped_fraction == 0.0

    drafted = exact.generate(dataclasses.replace(fox(), preset="fast"), tmp_path / "drafted.mp4")
    on_fast = fast.generate(fox(), tmp_path / "on-fast.mp4")
    assert drafted.preset == on_fast.preset == "fast" and drafted.skipped_fraction > 0.0
    assert drafted.video_path.read_bytes() == on_fast.video_path.read_bytes()

    again = exact.generate(fox(), tmp_path / "again.mp4")
    exact_on_fast = fast.generate(dataclasses.replace(fox(), preset="exact"), tmp_path / "exact-on-fast.mp4")
    assert again.skipped_fraction == exact_on_fast.skipped_fraction == 0.0 and exact_on_fast.preset == "exact"
    assert again.video_path.read_bytes() == exact_on_fast.video_path.read_bytes() == plain.video_path.read_bytes()

    with pytest.raises(InvalidRequest) as refused:
        fastest.generate(dataclasses.replace(fox(), preset="exact"), tmp_path / "refused.mp4")
    assert refused.value.field == "preset" and "FP8 weights" in str(refused.value)
    assert not (tmp_path / "refused.mp4").exists()


@pytest.mark.parametrize("cfg_batch", [False, True])
@pytest.mark.parametrize("name", ["tiny-t2v", "tiny-i2v", "tiny-t2v-moe"])
def test_exact_stays_within_tolerance_of_diffusers(tiny_cache: Path, name: str, cfg_batch: bool) -> None:
    """`exact` on the CPU (fused QKV projections, optionally CFG as a batch of 2) against WanPipeline itself."""
    engine = Engine.load(name, Settings(cache_dir=tiny_cache, preset="exact", cfg_batch=cfg_batch))
    assert "fused_qkv" in engine.preset_info.applied
    image = RED if name == "tiny-i2v" else None
    pipe = engine.i2v_pipe if image is not None else engine.pipe
    shift = pipe.scheduler.config.flow_shift
    req = resolve(
        GenerationRequest(prompt="a lighthouse", image=image, num_inference_steps=3, seed=9, flow_shift=shift),
        engine.spec,
    )
    ours, _, _ = engine.denoise(engine.prepare(req), req, lambda _e: None)

    reference = diffusers_latents(pipe, req, image)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_lossy_presets_stay_close_to_exact(preset_engines: dict[str, Engine], tmp_path: Path) -> None:
    frames = {
        p: decode_mp4(preset_engines[p].generate(fox(seed=5), tmp_path / f"{p}.mp4").video_path).frames
        for p in presets.PRESET_NAMES
    }
    for lossy in ("fast", "fastest"):
        value = psnr(frames[lossy], frames["exact"])
        assert value is not None and math.isfinite(value) and value > 0, (lossy, value)


def test_step_cache_never_leaks_across_requests(preset_engines: dict[str, Engine], tmp_path: Path) -> None:
    """A cached residual from one request must not be reused by the next: A, B, A gives A twice."""
    engine = preset_engines["fast"]
    first = engine.generate(fox(seed=1), tmp_path / "a1.mp4")
    engine.generate(GenerationRequest(prompt="waves at dusk", num_inference_steps=STEPS, seed=2), tmp_path / "b.mp4")
    again = engine.generate(fox(seed=1), tmp_path / "a2.mp4")
    assert np.array_equal(decode_mp4(first.video_path).frames, decode_mp4(again.video_path).frames)
    assert first.skipped_fraction == again.skipped_fraction


def test_unavailable_features_are_skipped_with_a_reason(preset_engines: dict[str, Engine]) -> None:
    info = preset_engines["fastest"].preset_info.to_dict()
    for feature in ("attention", "int8_attention", "fp8", "compile"):
        assert info["skipped"][feature], feature  # CPU: each one says why
    assert "fused_qkv" in info["applied"]
    assert info["cache_threshold"] == presets.PRESETS["fastest"].cache_threshold
    json.dumps(info)  # the bench writes it as is


def test_warm_up_failure_drops_compilation_and_serves(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled graph that fails at warm-up must cost the speed-up, never the worker."""
    engine = Engine.load("tiny-t2v", Settings(cache_dir=tiny_cache, preset="exact"))
    monkeypatch.setattr(presets.torch, "compile", lambda fn, **_kwargs: fn)  # no real compile: we test the ladder
    real_warm_up = presets.warm_up
    calls: list[int] = []

    def flaky_warm_up(engine: Engine, steps: int = 2) -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor exploded")
        return real_warm_up(engine, steps)

    monkeypatch.setattr(presets, "warm_up", flaky_warm_up)
    info = apply_preset(engine, "fast", compile=True)
    assert len(calls) == 2
    assert not info.compiled and "inductor exploded" in info.skipped["compile"]
    assert info.cache_threshold is not None and info.warmup_seconds is not None
    assert all("_wanserve_compiled_forward" not in b.__dict__ for b in engine.pipe.transformer.blocks)
    result = engine.generate(fox(), tmp_path / "served.mp4")
    assert result.skipped_fraction > 0


@pytest.mark.parametrize(
    "failure", [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: an illegal memory access")]
)
def test_a_warm_up_out_of_memory_blames_no_feature(failure: Exception) -> None:
    """Out of memory (a 720p warm-up) or a sticky CUDA error was blamed on the attention backend, which was
    dropped and recorded as the cause, then on compilation, with two retries that could only fail again."""
    info = presets.PresetInfo(preset="fast", device="cuda", attention_backend="_native_cudnn", compiled=True)
    calls: list[int] = []

    def run() -> None:
        calls.append(1)
        raise failure

    with pytest.raises(type(failure)):
        presets.warm_up_with_fallback([], info, run)
    assert calls == [1] and info.attention_backend == "_native_cudnn" and info.compiled and info.skipped == {}


def test_regional_compile_composes_with_the_step_cache(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled blocks with First Block Cache hooks on top (the CUDA `fast` path), forced on the CPU.

    Dynamo traces each block with fullgraph=True, so a hook inside the compiled region would fail here; the
    "eager" backend skips inductor's C++ code generation, which the GPU benchmark exercises instead."""
    real_compile = torch.compile
    monkeypatch.setattr(presets.torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="eager", **kwargs))
    torch._dynamo.reset()
    engine = Engine.load("tiny-t2v", Settings(cache_dir=tiny_cache, preset="exact"))
    info = apply_preset(engine, "fast", compile=True)
    assert info.compiled and info.warmup_seconds is not None
    result = engine.generate(fox(), tmp_path / "compiled.mp4")
    assert decode_mp4(result.video_path).frames.shape == (13, 64, 128, 3)
    assert result.skipped_fraction > 0

    # A request's preset turns the cache off and the next one back on around the same compiled code.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    exact = engine.generate(dataclasses.replace(fox(), preset="exact"), tmp_path / "exact.mp4")
    again = engine.generate(fox(), tmp_path / "again.mp4")
    assert exact.skipped_fraction == 0.0 and again.skipped_fraction == result.skipped_fraction
    assert again.video_path.read_bytes() == result.video_path.read_bytes()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing was compiled again


def test_write_async_returns_a_future_with_the_same_video(preset_engines: dict[str, Engine], tmp_path: Path) -> None:
    engine = preset_engines["exact"]
    events: list[ProgressEvent] = []
    sync = engine.generate(fox(seed=8, steps=2), tmp_path / "sync.mp4")
    first = engine.generate(fox(seed=8, steps=2), tmp_path / "async1.mp4", events.append, write_async=True)
    second = engine.generate(fox(seed=9, steps=2), tmp_path / "async2.mp4", write_async=True)
    assert isinstance(first, Future) and isinstance(second, Future)
    one, two = first.result(timeout=60), second.result(timeout=60)
    assert np.array_equal(decode_mp4(one.video_path).frames, decode_mp4(sync.video_path).frames)
    assert one.thumbnail_path.exists() and two.video_path.exists()
    assert events[-1].stage == "done" and "video_encode" in one.timings


def test_flop_count_matches_the_real_module() -> None:
    """The analytic count's linear part equals 2 x tokens x the block weights the video tokens go through."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**T2V_1_3B)
    tokens, text = 32760, 512
    video_params = text_params = 0
    for name, module in model.blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                text_params += module.weight.numel()
            else:
                video_params += module.weight.numel()
    d, layers = 1536, 30
    blocks = 2 * tokens * video_params + 2 * text * text_params + layers * (4 * tokens**2 * d + 4 * tokens * text * d)
    total = transformer_flops(model.config, tokens)
    assert blocks <= total <= blocks * 1.01  # the rest (embeddings, head) is well under 1 %


def test_bench_cpu_tiny_writes_the_results_file(tiny_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [sys.executable, "-m", "wanserve", "bench", "--cpu-tiny", "--out", str(out), "--repeats", "2"]
    command += ["--jobs", "2", "--cache-dir", str(tiny_cache)]
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=dict(os.environ, WANSERVE_CACHE_DIR=str(tiny_cache))
    )
    assert run.returncode == 0, run.stderr[-3000:]
    files = list(out.glob("cpu-*.json"))
    assert len(files) == 1 and run.stdout.strip().endswith(files[0].name)
    document = json.loads(files[0].read_text())

    assert "environment" not in document  # each run's own: runs of one day may come from other sessions
    report = document["runs"]["tiny"]
    for key in ("date", "python", "torch", "diffusers", "device_name", "driver", "git_commit"):
        assert key in report["environment"], key
    assert report["matmul_ceiling"]["tflops"] > 0
    assert set(report["forward"]) == {"diffusers", "exact", "fast", "fastest"}
    for entry in report["forward"].values():
        assert entry["ms"] > 0 and entry["tflops"] > 0 and entry["percent_of_ceiling"] > 0
    assert report["forward"]["exact"]["preset"]["applied"]
    assert set(report["request"]) == {"diffusers", "exact", "fast", "fastest"}
    assert report["request"]["exact"]["identical_to_diffusers"] is True  # exact on the CPU changes nothing
    for lossy in ("fast", "fastest"):
        assert report["request"][lossy]["skipped_fraction"] > 0
        assert math.isfinite(report["request"][lossy]["psnr_vs_exact_db"])
    serving = report["serving"]
    assert serving["jobs"] == 2 and 0 < serving["busy_fraction"] <= 1 and serving["via"].startswith("Worker")
    assert serving["preset"] == "exact"  # the first preset whose request ran
    assert "overlap_jobs=true" in serving["via"] and "overlap_jobs=false" in serving["sequential"]["via"]
    assert 0 < serving["sequential"]["busy_fraction"] <= 1 and serving["overlap_wall_speedup"] > 0
    assert len(serving["gaps_between_jobs_seconds"]) == len(serving["sequential"]["gaps_between_jobs_seconds"]) == 1
    # The console says it too, as docs/performance.md has it (it printed the forward table alone).
    said = " ".join(run.stderr.split())
    for label in ("overlap on", "overlap off"):
        assert f"serving ({label}, 2 jobs via Worker" in said and "to the last frames" in said, said[-3000:]
    assert "serving: overlap's wall-time speed-up over one job after another" in said
    assert report["cold_start"]["seconds_to_ready"] > 0 and report["cold_start"]["warm_cache"]["seconds_to_ready"] > 0


def test_a14b_projection_adds_a_measured_vae_decode() -> None:
    """The 40-step A14B projection is steps x the measured CFG step (scaled to all layers) plus a real decode of
    the shape's latents; here the decode runs at 64x64 on the CPU, where the real VAE is cheap."""
    shape = dataclasses.replace(SHAPES["a14b-720p"], width=64, height=64, num_frames=9)
    decode = measure_vae_decode(shape, torch.device("cpu"))
    assert decode["latents"] == [1, 16, 3, 8, 8] and decode["seconds"] > 0
    forward = {"exact": {"ms": 1000.0}}
    projection = per_step_projection(shape, 8, forward, decode["seconds"])
    row = projection["exact"]
    assert row["seconds_per_step"] == 5.0  # 8 of 40 layers, scaled linearly
    assert row["projected_total_seconds"] == pytest.approx(40 * 5.0 + decode["seconds"], abs=0.06)
    assert "projected" in projection["projection"] and "VAE decode" in projection["projection"]


def test_lossy_targets_say_what_share_of_skipped_steps_meets_them() -> None:
    """Random weights cannot say how often the step cache will skip on a real checkpoint; the results file says
    instead which share of skipped steps would meet each lossy target, from the measured full and skipped step."""
    i2v, a14b = SHAPES["14b-i2v-480p"], SHAPES["a14b-720p"]
    forward = {"fastest": {"ms": 1000.0, "cached": {"ms": 200.0}}}  # 8 of 40 layers: 5 s a full step
    per_step = per_step_projection(i2v, 8, forward)
    # The full step is scaled from 8 to 40 layers; the skipped one (first block, embeddings, head) is not.
    assert per_step["fastest"] == {"seconds_per_step": 5.0, "cached_seconds_per_step": 0.2}
    target = check_targets(i2v, {"forward": forward, "per_step": per_step})["step_seconds_fastest"]
    assert target == {"goal": 2.6, "measured": 5.0, "met": False, "met_at_skipped_fraction": 0.5}  # 2.4 s of 4.8
    (line,) = bench.target_lines({"targets": {"step_seconds_fastest": target}})  # what `wanserve bench` prints
    assert line == (
        "step_seconds_fastest: goal 2.6, measured 5.000: missed with every step computed; "
        "met if the step cache skips 50% of the steps"
    )

    per_step = per_step_projection(a14b, 8, forward, vae_seconds=40.0)  # 40 x 5 + 40 = 240 s
    target = check_targets(a14b, {"forward": forward, "per_step": per_step})["projected_seconds_fastest"]
    assert target["met"] is True and target["met_at_skipped_fraction"] == 0.0

    slow = {"fastest": {"ms": 1000.0, "cached": {"ms": 2700.0}}}  # a skipped step slower than the goal itself
    per_step = per_step_projection(i2v, 8, slow)
    target = check_targets(i2v, {"forward": slow, "per_step": per_step})["step_seconds_fastest"]
    assert target["met"] is False and target["met_at_skipped_fraction"] is None


def test_targets_are_judged_on_the_figures_they_are_for_and_say_which() -> None:
    """A request timed at 4 steps (to fit a GPU session) was judged on its 4-step ratio, which the fixed decode and
    MP4 pull towards 1, though its projection to the model's 50 steps was in the same file; the busy target was
    judged on a figure the docs did not name."""
    from wanserve.bench.requests import projected_seconds

    request = {
        "diffusers": {"speedup_vs_diffusers": None},
        "exact": {"speedup_vs_diffusers": 1.1, "projected_50_step_speedup_vs_diffusers": 1.3},
    }
    serving = {"busy_fraction": 0.93, "busy_fraction_to_last_frames": 0.98}
    targets = check_targets(SHAPES["1.3b-480p"], {"forward": {}, "request": request, "serving": serving})
    assert targets["request_speedup_exact"] == {"projected": True, "goal": 1.25, "measured": 1.3, "met": True}
    busy = targets["serving_busy_fraction"]
    assert busy["measured"] == 0.98 and busy["figure"] == "busy_fraction_to_last_frames"
    lines = bench.target_lines({"targets": targets})
    assert "request_speedup_exact: goal 1.25, measured 1.300: met (projected to the model's steps)" in lines
    assert any("(busy_fraction_to_last_frames; over the whole run 0.930)" in line for line in lines), lines
    # A seconds target depends on the card: it is judged too as the speed-up over diffusers it asks for.
    per_step = {"diffusers": {"seconds_per_step": 10.0}, "exact": {"seconds_per_step": 5.5}}
    report = {"forward": {}, "per_step": per_step}
    step = check_targets(SHAPES["14b-i2v-480p"], report)["step_seconds_exact"]
    assert step["met"] is False and step["as_ratio"]["goal"] == round(9.77 / 5.2, 3)
    assert step["as_ratio"]["measured"] == round(10.0 / 5.5, 4) and step["as_ratio"]["met"] is False
    per_step = {"diffusers": {"projected_total_seconds": 1500.0}, "exact": {"projected_total_seconds": 1000.0}}
    total = check_targets(SHAPES["a14b-720p"], {"forward": {}, "per_step": per_step})["projected_seconds_exact"]
    assert total["met"] is False and total["as_ratio"] == {
        "goal": 1.25,
        "measured": 1.5,
        "met": True,
        "basis": "1041.5 s (the official Wan2.2 code, 1x H100) / 833 s, "
        "measured as diffusers in this run / this preset",
    }
    line = bench.target_lines({"targets": {"projected_seconds_exact": total}})[0]
    assert "; as a speed-up over diffusers in this run: goal 1.25, measured 1.500: met" in line, line
    # Projected at the mean step: with a step cache half skipped, the median was a skipped step's cost.
    entry = {"seconds": 10.0, "steps": 4, "timings": {"denoise": 4.0}, "step_seconds_median": 0.2}
    assert projected_seconds(entry, 50) == 10.0 + 46 * 1.0


def _tiny_options(tiny_cache: Path, out: Path, **kwargs: object) -> BenchOptions:
    given: dict[str, object] = {"cold_start": False, **kwargs}
    return BenchOptions(cpu_tiny=True, cache_dir=tiny_cache, out=out, repeats=1, **given)  # type: ignore[arg-type]


def test_a_failing_phase_is_recorded_and_the_run_goes_on(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One preset's request fails (as an untried kernel might on a new GPU): the error is in the report, and the
    other presets are still measured and compared."""
    real = bench_run.engine_request

    def flaky(engine: Engine, *args: object) -> object:
        if engine.preset_info.preset == "fast":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(engine, *args)

    monkeypatch.setattr(bench_run, "engine_request", flaky)
    path, _ = bench.run_bench(_tiny_options(tiny_cache, tmp_path, jobs=0))

    saved = json.loads(path.read_text())["runs"]["tiny-0jobs-no-cold-start"]
    assert saved["complete"] is True
    assert saved["errors"] == {"fast_request": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert set(saved["forward"]) == {"diffusers", "exact", "fast", "fastest"}
    assert set(saved["request"]) == {"diffusers", "exact", "fastest"}
    assert math.isfinite(saved["request"]["fastest"]["psnr_vs_exact_db"])


def test_a_run_cut_short_keeps_what_it_measured(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed mid-run (here: interrupted in the serving phase), the results file already holds every phase before."""

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "measure_serving", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(_tiny_options(tiny_cache, tmp_path, jobs=2))

    (path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(path.read_text())["runs"]["tiny-no-cold-start"]
    assert saved["complete"] is False
    assert set(saved["forward"]) == {"diffusers", "exact"} and set(saved["request"]) == {"diffusers", "exact"}
    assert saved["request"]["exact"]["identical_to_diffusers"] is True
    assert "exact_request" in saved["phase_seconds"]
    assert saved["errors"] == {"serving": "interrupted: KeyboardInterrupt"}


def test_a_rerun_cut_short_never_replaces_a_whole_run(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The day's file is merged into by run name: a rerun stopped by a device session's time limit replaced the
    whole run before it with its first phases. It now sits beside it until it finishes whole itself; and each
    run keeps the commit and versions it ran with (the file kept only the last run's)."""
    options = _tiny_options(tiny_cache, tmp_path, jobs=0, presets=("exact",))
    monkeypatch.setenv("BENCH_GIT_COMMIT", "aaaa1111")
    path, first = bench.run_bench(options)
    name = first["run"]
    whole = json.loads(path.read_text())["runs"][name]
    assert whole["complete"] is True and "exact" in whole["request"]

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "engine_request", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(options)
    runs = json.loads(path.read_text())["runs"]
    assert runs[name] == whole
    (beside,) = set(runs) - {name}
    assert runs[beside]["complete"] is False
    # Named by its start and its id: a tiny run cut short can start and end within the second another started.
    assert beside == f"{name}@{runs[beside]['started_at']}-{runs[beside]['run_id'][:6]}"
    assert runs[beside]["errors"] == {"exact_request": "interrupted: KeyboardInterrupt"}

    monkeypatch.undo()
    monkeypatch.setenv("BENCH_GIT_COMMIT", "bbbb2222")
    _, third = bench.run_bench(options)  # a whole rerun replaces the whole run; the one cut short stays
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {name, beside} and runs[name]["run_id"] == third["run_id"] != whole["run_id"]
    if whole["environment"]["git_commit"] == "aaaa1111":  # outside a git checkout (the device's tree)
        assert runs[name]["environment"]["git_commit"] == "bbbb2222"
        assert runs[beside]["environment"]["git_commit"] == "bbbb2222"


def test_a_results_file_that_is_not_one_is_refused_not_overwritten(tmp_path: Path) -> None:
    """A damaged day's file was read as empty and overwritten with this run alone: every run in it was lost."""
    from wanserve.bench.report import describe_environment, results_path

    path = results_path(describe_environment(torch.device("cpu")), tmp_path)
    command = [sys.executable, "-m", "wanserve", "bench", "--cpu-tiny", "--out", str(tmp_path), "--jobs", "0"]
    for text, said in [
        ('{"schema": 2, "runs": {"tiny": {"forward": {}', "is not JSON"),
        ('{"hello": 1}', "is not a wanserve bench results file"),  # JSON, but another file: was merged into
    ]:
        path.write_text(text)
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and f"--out: {path} {said}" in run.stdout + run.stderr, run.stderr[-2000:]
        assert path.read_text() == text


def test_wrong_bench_options_exit_2_before_anything_runs(tmp_path: Path) -> None:
    """--layers was ignored with a checkpoint, yet the step was still scaled up by it (5x too slow a step);
    an --out that could not be a folder failed with a traceback after the models were built; a damaged
    checkpoint was blamed on WANSERVE_MODEL, which nobody had set."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["x", "y"]}))
    base = [sys.executable, "-m", "wanserve", "bench", "--no-cold-start"]
    for args, said in [
        (["--out", str(a_file / "sub")], "--out: "),
        (["--checkpoint", str(damaged)], "--checkpoint: "),
        (["--shape", "tiny", "--layers", "2"], "--layers: applies to the random-weight shapes only"),
        (["--checkpoint", str(damaged), "--layers", "8"], "--checkpoint: "),
    ]:
        run = subprocess.run([*base, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 2 and said in run.stdout + run.stderr, (args, run.stdout, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and "WANSERVE_MODEL" not in run.stdout + run.stderr
    assert not list(tmp_path.glob("**/*.json"))[1:], "nothing written but the damaged checkpoint's index"


def test_a_cold_start_that_never_becomes_ready_fails_the_run_and_leaves_no_process(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh process that dies (out of memory, a compile error) was recorded inside cold_start only: no error,
    exit status 0. One still starting when the run was stopped (a time limit's SIGTERM) was left running."""
    from wanserve.bench import cold_start

    monkeypatch.setattr(cold_start, "_COLD_CHILD", "import sys; sys.exit('CUDA out of memory (simulated)')")
    path, report = bench.run_bench(_tiny_options(tiny_cache, tmp_path, jobs=0, presets=("exact",), cold_start=True))
    assert "CUDA out of memory (simulated)" in report["errors"]["cold_start"]
    assert json.loads(path.read_text())["runs"][report["run"]]["errors"] == report["errors"]

    import signal

    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("CHILD_PID_FILE", str(pid_file))
    child = "import os, time; open(os.environ['CHILD_PID_FILE'], 'w').write(str(os.getpid())); time.sleep(600)"
    monkeypatch.setattr(cold_start, "_COLD_CHILD", child)

    def stop(*_args: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 3)
    try:
        with pytest.raises(KeyboardInterrupt):
            cold_start.measure_cold_start("tiny-t2v", "exact", {"cache_dir": tiny_cache}, tmp_path / "scratch")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_time_limits_sigterm_saves_where_the_run_stopped(tiny_cache: Path, tmp_path: Path) -> None:
    """benchmarks/gpu_runs.sh ends an overrunning run with SIGTERM (a parent may ignore SIGINT, and Python then
    keeps it ignored): the run records where it stopped, as for Ctrl-C, instead of dying mid-phase unsaved."""
    import signal
    import time

    command = [sys.executable, "-m", "wanserve", "bench", "--cpu-tiny", "--out", str(tmp_path), "--repeats", "1"]
    command += ["--jobs", "2", "--cache-dir", str(tiny_cache), "--no-cold-start"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("cpu-*.json")) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)  # the first phase has been saved
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr[-3000:]
    (path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(path.read_text())["runs"]["tiny-no-cold-start"]
    assert saved["complete"] is False and saved["phase_seconds"]
    # The phase it stopped in says so (between two phases there is none to name).
    assert all(error.startswith("interrupted: KeyboardInterrupt") for error in saved["errors"].values()), saved


def test_the_budget_counts_from_the_callers_clock_and_a_compile_that_would_outlast_the_stop_is_not_begun(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_runs.sh's hard stop is timed from the process's start, the budget was from after its imports and CUDA
    start-up; and a preset's compile begun just inside the budget ran past the stop (the run killed mid-forward,
    that preset's figures lost). The budget now counts from the caller's clock, and a compile expected (from
    the preset before) to end past the stop is skipped."""
    monkeypatch.setenv("BENCH_CLOCK_START", f"{time.time() - 1000:.3f}")  # the caller started 1000 s ago
    _, report = bench.run_bench(_tiny_options(tiny_cache, tmp_path / "late", jobs=0, time_budget=600.0))
    assert "time budget spent (1000 s of 600 s)" in report["skipped_phases"]["diffusers_forward"]
    assert report["forward"] == {}

    monkeypatch.setenv("BENCH_CLOCK_START", f"{time.time():.3f}")
    monkeypatch.setenv("BENCH_STOP_AFTER", "0.001")  # any phase with a known cost would end past it
    _, report = bench.run_bench(_tiny_options(tiny_cache, tmp_path / "stop", jobs=0, presets=("exact", "fast")))
    assert set(report["forward"]) == {"diffusers", "exact"}  # the first preset's apply has no estimate: it runs
    assert "past the run's stop at 0.001 s" in report["skipped_phases"]["fast_apply"]


def test_no_baseline_times_the_presets_alone(tiny_cache: Path, tmp_path: Path) -> None:
    """The 24 GB run is about the presets' peak memory: diffusers' untiled decodes and GPU-resident text encoder
    spent its slice on another question."""
    _, report = bench.run_bench(_tiny_options(tiny_cache, tmp_path, jobs=0, presets=("exact",), baseline=False))
    assert report["run"] == "tiny-exact-0jobs-no-cold-start-no-baseline"
    assert set(report["forward"]) == {"exact"} and set(report["request"]) == {"exact"}
    assert report["skipped_phases"]["diffusers_forward"] == "turned off (--no-baseline)"
    assert report["forward"]["exact"]["speedup_vs_diffusers"] is None and report["errors"] == {}
    assert report["request"]["exact"]["peak_memory_gb"] is None  # on the CPU; on CUDA, with reserved and added


def test_a_run_stopped_in_the_second_half_of_serving_or_cold_start_keeps_the_first(
    tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each was one phase of two measurements: a stop during the second lost the first too (the 300 s cold-start
    slice is tight, and the overlapped serving figure is the one the busy target judges)."""
    real_serving, real_cold = bench_run.measure_serving, bench_run.measure_cold_start

    def serving(*args: object, overlap: bool = True) -> object:
        if not overlap:
            raise KeyboardInterrupt
        return real_serving(*args, overlap=overlap)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_run, "measure_serving", serving)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(_tiny_options(tiny_cache, tmp_path / "serving", jobs=2, presets=("exact",)))
    (path,) = (tmp_path / "serving").glob("cpu-*.json")
    (saved,) = json.loads(path.read_text())["runs"].values()
    assert 0 < saved["serving"]["busy_fraction"] <= 1 and saved["serving"]["via"].startswith("Worker")
    assert saved["errors"] == {"serving_sequential": "interrupted: KeyboardInterrupt"}

    def cold(*args: object, kept_cache: bool = False) -> object:
        if kept_cache:
            raise KeyboardInterrupt
        return real_cold(*args, kept_cache=kept_cache)  # type: ignore[arg-type]

    monkeypatch.setattr(bench_run, "measure_serving", real_serving)
    monkeypatch.setattr(bench_run, "measure_cold_start", cold)
    options = _tiny_options(tiny_cache, tmp_path / "cold", jobs=0, presets=("exact",), cold_start=True)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(options)
    (path,) = (tmp_path / "cold").glob("cpu-*.json")
    (saved,) = json.loads(path.read_text())["runs"].values()
    assert saved["cold_start"]["seconds_to_ready"] > 0 and saved["cold_start"]["preset"] == "exact"
    assert saved["cold_start"]["warm_cache"] == {"skipped": "see errors or skipped_phases"}
    assert saved["errors"] == {"cold_start_warm_cache": "interrupted: KeyboardInterrupt"}


def test_time_budget_skips_the_phases_it_does_not_cover(tiny_cache: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "wanserve", "bench", "--cpu-tiny", "--out", str(tmp_path), "--repeats", "1"]
    command += ["--jobs", "0", "--cache-dir", str(tiny_cache), "--no-cold-start", "--time-budget", "0.001"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped diffusers_forward: time budget spent" in run.stderr

    (path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(path.read_text())["runs"]["tiny-0jobs-no-cold-start"]
    assert saved["complete"] is True and saved["errors"] == {} and saved["forward"] == {}
    assert {"diffusers_forward", "exact_apply", "fastest_apply"} <= set(saved["skipped_phases"])
    assert "build" in saved["phase_seconds"]
    assert saved["cold_start"] == {"skipped": "turned off (--no-cold-start)"}

    # A run that measures less sits beside the first one instead of replacing it.
    again = subprocess.run([*command, "--no-request"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"tiny-0jobs-no-cold-start", "tiny-0jobs-no-request-no-cold-start"}
    assert runs["tiny-0jobs-no-request-no-cold-start"]["request"] == {"skipped": "turned off (--no-request)"}

    bad = subprocess.run([*command[:-2], "--time-budget", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--time-budget: must be a positive number" in bad.stdout + bad.stderr


def test_a_preset_whose_compile_was_paid_for_is_always_timed(tmp_path: Path) -> None:
    """The budget is checked when a phase starts: a preset's setup (FP8, a fresh compile: a minute on a GPU) may
    start just inside it. Its timed forward must then still run, or the minute bought nothing."""
    report: dict[str, object] = {"run": "budget-test"}
    environment = {"device_type": "cpu", "device_name": "test", "date": "2026-11-30"}
    run = bench_run._Run(report, environment, tmp_path, budget=0.0, device=None)
    assert run.phase("fastest_apply", lambda: "applied") is None  # would start past the budget: skipped
    assert run.phase("fastest_forward", lambda: "timed", finishes=True) == "timed"
    assert run.phase("build", lambda: "built", required=True) == "built"
    assert set(run.skipped) == {"fastest_apply"}


# The random-weight shapes the GPU runs use, shrunk to toy widths and sizes: the same code builds them (UMT5,
# the model's real VAE config, both A14B experts, the I2V image inputs), times them and projects them.
TOY_UMT5 = dict(bench_models.UMT5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=384)
TOY_RUNS = {
    "1.3b-480p": dict(presets=("exact", "fast", "fastest"), steps=4, jobs=2, cold_start=True),
    "5b-720p": dict(presets=("exact",), steps=2, jobs=2, text_encoder_cpu=True, vae_tiling=True),
    "14b-i2v-480p": dict(presets=("exact", "fastest"), layers=2),
    "a14b-720p": dict(presets=("exact", "fastest"), layers=2),
    "14b-720p-8layers": dict(presets=("exact",)),
}


def _toy_shape(shape: bench.Shape) -> bench.Shape:
    transformer = dict(shape.transformer, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32)
    transformer["num_layers"] = min(int(transformer["num_layers"]), 3)  # First Block Cache needs 2 or more
    if "image_dim" in transformer:
        transformer.update(image_dim=32, added_kv_proj_dim=32)
    stride = shape.vae_stride * 2
    return dataclasses.replace(shape, transformer=transformer, width=stride, height=stride, num_frames=5)


@pytest.mark.parametrize("name", list(TOY_RUNS))
def test_gpu_plan_shapes_run_end_to_end_at_toy_sizes(
    name: str, tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.SHAPES, name, _toy_shape(SHAPES[name]))
    monkeypatch.setattr(bench_models, "UMT5_XXL", TOY_UMT5)
    options = BenchOptions(shape=name, device="cpu", repeats=1, out=tmp_path, cache_dir=tiny_cache, **TOY_RUNS[name])  # type: ignore[arg-type]
    path, _ = bench.run_bench(options)

    (report,) = json.loads(path.read_text())["runs"].values()
    assert report["complete"] is True and report["errors"] == {} and report["skipped_phases"] == {}
    assert set(report["forward"]) == {"diffusers", *options.presets}
    for key, target in report["targets"].items():
        if key != "diffusers_vs_published":
            assert target["measured"] is not None, key
    shape = bench.SHAPES[name]
    if shape.request:
        assert set(report["request"]) == {"diffusers", *options.presets}
        assert report["request"]["exact"]["identical_to_diffusers"] is True
        # Timed at fewer steps than the model's: the ratio is also projected to its full step count, from
        # the same stage breakdown as the engine's (diffusers' from its step callbacks).
        full = SHAPES[name].model
        full_steps = lookup(full).num_inference_steps  # type: ignore[union-attr]
        assert report["request"]["exact"][f"projected_{full_steps}_step_speedup_vs_diffusers"] > 0
        assert {"encode_prompt", "denoise", "vae_decode", "video_encode"} <= set(
            report["request"]["diffusers"]["timings"]
        )
        assert report["serving"]["jobs"] == 2 and report["serving"]["sequential"]["jobs"] == 2
        assert 0 < report["serving"]["busy_fraction_to_last_frames"] <= 1
    else:
        assert "skipped" in report["request"] and "skipped" in report["serving"]
    if options.cold_start:  # the random pipeline, saved and loaded back by a fresh process, twice
        assert report["cold_start"]["seconds_to_ready"] > 0 and report["cold_start"]["warm_cache"]["load_seconds"] > 0
    for preset in options.presets:  # a lossy preset also times a step its cache skips, and every pass was a hit
        assert ("cached" in report["forward"][preset]) == (preset != "exact")
        if preset != "exact":
            assert report["forward"][preset]["cached"]["hit_fraction"] == 1.0
    if shape.unit == "cfg_step":
        assert report["per_step"]["measured_layers"] == 2 and report["per_step"]["full_layers"] == 3
        fastest = report["per_step"]["fastest"]
        assert fastest["cached_seconds_per_step"] > 0 and "(1 - s)" in report["per_step"]["cached_step"]
        (goal,) = (t for k, t in report["targets"].items() if k.endswith("_fastest"))
        assert goal["met"] is True and goal["met_at_skipped_fraction"] == 0.0  # toy sizes are far under the goal
    if shape.projection_steps:
        assert report["vae_decode"]["seconds"] > 0
        assert report["per_step"]["exact"]["projected_total_seconds"] > report["vae_decode"]["seconds"]


@pytest.mark.parametrize("step", ["1", "2", "3", "4"])
def test_the_gpu_plan_runs_real_bench_commands(step: str, tmp_path: Path) -> None:
    """benchmarks/gpu_runs.sh is what a GPU session runs unattended: every command it plans must parse as
    `wanserve bench` options, name a real shape and real presets, and have slices that add up to the step's
    default budget (480 s, so that one device call of 590 s holds the install, the step and a stopped run).
    Step 2's added up to 630 s: its last run, the cold start, ran only if the others finished early."""
    import shlex

    import typer

    from wanserve.cli import app

    root = Path(__file__).resolve().parents[1]
    plan = subprocess.run(
        ["bash", "benchmarks/gpu_runs.sh", step, "--dry-run"],
        cwd=root,
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path)),
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    commands = [line.split("wanserve bench ", 1)[1] for line in plan.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) >= (1 if step == "4" else 2)
    bench_command = typer.main.get_command(app).commands["bench"]  # type: ignore[attr-defined]
    for command in commands:
        context = bench_command.make_context("bench", shlex.split(command))  # parses, runs nothing
        params = context.params
        assert params["shape"] in SHAPES
        assert set(params["presets"].split(",")) <= set(presets.PRESET_NAMES)
        assert 0 < params["time_budget"] <= 480
    lines = [line for line in plan.stdout.splitlines() if "stop at +" in line]
    stops = [int(line.split("stop at +", 1)[1].split(" s]")[0]) for line in lines]
    assert len(stops) == len(commands)
    assert sum(stop - 10 for stop in stops) <= 480  # every run planned gets its whole slice
    starts = [int(line.split("+ [", 1)[1].split(" s,")[0]) for line in lines]
    assert starts == [sum(stop - 10 for stop in stops[:i]) for i in range(len(stops))]  # the dry run's clock


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--apis", "0"], "--apis"),  # was a ZeroDivisionError once every server had started
        (["--apis", ","], "--apis"),  # was an empty report, replacing that day's
        (["--duration", "nan"], "--duration"),  # was "no job was accepted", after starting every server
        (["--step-seconds", "-1"], "--step-seconds"),  # every job failed, and the run reported 0 errors
        (["--outage-clients", "-1"], "--outage-clients"),
    ],
)
def test_the_control_plane_benchmark_refuses_wrong_arguments(args: list[str], said: str, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "control_plane.py"), *args, "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"error: {said}: " in run.stderr, run.stderr[-2000:]
    assert not list(tmp_path.iterdir())
