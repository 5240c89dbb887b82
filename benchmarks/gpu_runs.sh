#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, for the device tool (one run call per step, wheels carried in .whl/):
#
#     bash benchmarks/gpu_runs.sh STEP            # on the GPU machine, from the repo root
#     bash benchmarks/gpu_runs.sh STEP --dry-run  # anywhere: print what STEP runs, with each run's time slice,
#                                                 # each run taking its whole slice
#
# A device session has about 15 minutes in all, machine start included, so step 1 holds what the targets
# need most and fits one call: give it timeout_s 590. BUDGET (default 480 s, counted from the end of the wheel
# install and import checks) is shared by the step's runs: each run gets a slice, or what is left if less; it
# starts no new phase after its slice less SLACK (45 s: a compile begun just before, and its timed forward, still
# end inside the slice), and is stopped at the slice's end plus 10 s (SIGTERM: it saves what it has). A run that
# would start with under 30 s left is skipped. Worst case: about 60 s of install and checks + 480 + 10 + 20 s of
# kill grace = 570 s. Every run rewrites its results file after each phase, straight into $OUT, so whatever
# finished before a timeout or a crash comes back. Each run is its own process: a sticky CUDA error in one costs
# only that run.
#   1  1.3B 480p forward + 4-step request vs diffusers (projected to 50 steps), serving (overlap off/on); 5B
#      1280x704x121 forward; A14B 720p CFG step with the 40-step projection and its VAE decode (two forwards of
#      the 14B 720p transformer: its ratio stands for that forward's); 14B I2V 480p CFG step (8 layers, scaled)
#   2  what step 1 leaves: lossy presets on 1.3B, beside exact (PSNR against exact); 5B on a 24 GB budget (text
#      encoder on the CPU, VAE tiling; presets only: peak memory is the figure); one 14B expert with all 40
#      layers on one card
#   3  cold start from local disk, with empty and with kept compile caches; the 14B 720p forward on its own
#   4  the full 50-step 1.3B request against diffusers (step 1 projects it from 4 steps)
# Each step's slices add up to at most BUDGET, so no run is planned only for when others finish early; what a
# run leaves of its slice goes to the next.
set -uo pipefail

step=${1:?usage: bash benchmarks/gpu_runs.sh 1|2|3|4 [--dry-run]}
dry=${2:-}
out=${OUT:-/tmp/wanserve-gpu-out}
budget=${BUDGET:-480}
slack=${SLACK:-45}
mkdir -p "$out"
log="$out/step$step.log"

if [ -z "$dry" ]; then
    # The tree arrives without .git: the commit measured is in .whl/COMMIT ("<sha> <dirty 0|1>", written with
    # the wheels), for each run's JSON.
    if [ -f .whl/COMMIT ]; then
        read -r BENCH_GIT_COMMIT BENCH_GIT_DIRTY <.whl/COMMIT
        export BENCH_GIT_COMMIT BENCH_GIT_DIRTY
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.csv" 2>&1
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: see docs/performance.md" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$log" 2>&1 || { echo "wheel install failed: see $log" >&2; exit 2; }
    # Fail in seconds, not after the first model is built, when a carried wheel does not fit this image.
    PYTHONPATH=/tmp/site:$PWD/src python3 -c "
import importlib.util, torch, diffusers, transformers, av, pydantic_settings
from diffusers import WanPipeline
from wanserve.bench import run_bench
print('preflight: torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'av', av.__version__, 'triton', importlib.util.find_spec('triton') is not None)
try:
    import torchao
    print('preflight: torchao', torchao.__version__)
except Exception as exc:
    print('preflight: torchao unusable, fastest will skip fp8:', type(exc).__name__, exc)
" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "preflight imports failed: see $log" >&2; exit 2; }
    # The CLI (typer, click, rich from the image, not carried) parses before any model is built.
    PYTHONPATH=/tmp/site:$PWD/src python3 -m wanserve bench --help >/dev/null 2>>"$log" \
        || { echo "wanserve bench --help failed: see $log" >&2; exit 2; }
    # Earlier results of the same day, so that this step's runs merge into the same file.
    # Only today's (any other date is a file of its own, and $OUT returns at most 8 files).
    for f in benchmarks/results/*-"$(date +%F)".json; do
        [ -e "$f" ] || continue
        case $(basename "$f") in cpu-* | control-plane-*) ;; *) cp "$f" "$out/" ;; esac
    done
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
started=$(date +%s)

status=0
clock=0   # the dry run's: each run takes its whole slice
planned=0 # the slices of the runs before this one: what they did not use goes to this one
bench() { # SLICE_SECONDS BENCH_ARGS...
    local slice=$1 left at
    shift
    if [ -n "$dry" ]; then
        at=$clock
    else
        at=$(($(date +%s) - started))
    fi
    left=$((budget - at))
    planned=$((planned + slice))
    if [ "$left" -lt 30 ]; then
        echo "- skipped (${left} s of the step's ${budget} s left): wanserve bench $*" | tee -a "$log"
        return 0
    fi
    slice=$((planned - at)) # its own slice, plus what earlier runs left of theirs
    [ "$slice" -gt "$left" ] && slice=$left
    local phases=$((slice - slack))
    [ "$phases" -lt 15 ] && phases=15
    echo "+ [$at s, stop at +$((slice + 10)) s] wanserve bench --time-budget $phases $*" | tee -a "$log"
    if [ -n "$dry" ]; then
        clock=$((clock + slice))
        return 0
    fi
    # A hard stop per run: SIGTERM makes the run record where it stopped and save (SIGINT may be ignored by a
    # non-interactive parent, and Python keeps it so); a hang costs this run only.
    # The run's budget counts from here, as the hard stop does, not from after its imports and CUDA start-up.
    BENCH_CLOCK_START=$(date +%s.%N) BENCH_STOP_AFTER=$((slice + 10)) timeout --signal=TERM --kill-after=20 $((slice + 10)) \
        python3 -m wanserve bench --out "$out" --time-budget "$phases" "$@" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

case $step in
    1)
        # 4 steps: the request's ratio is projected to the model's 50, and serving (the last phase) gets its turn.
        bench 140 --shape 1.3b-480p --presets exact --steps 4 --jobs 2 --repeats 3
        bench 80 --shape 5b-720p --no-request --presets exact --repeats 3
        # Two targets (exact and fastest projections) and, as two forwards of the 14B transformer at 75,600
        # tokens, the 14B 720p forward ratio (forward_speedup_exact): no separate 14b-720p-8layers run.
        bench 150 --shape a14b-720p --layers 8 --presets exact,fastest --repeats 2
        bench 110 --shape 14b-i2v-480p --layers 8 --presets exact,fastest --repeats 2
        ;;
    2)
        # exact too: the lossy presets' PSNR is against exact's frames (without it, against diffusers').
        bench 170 --shape 1.3b-480p --presets exact,fast,fastest --steps 10 --jobs 0 --repeats 3
        # The 24 GB question is the presets' peak memory: no diffusers baseline (its untiled decodes and
        # GPU-resident text encoder answer another question, and would spend the slice).
        bench 110 --shape 5b-720p --presets exact --text-encoder-cpu --vae-tiling --steps 2 --jobs 0 --repeats 3 \
            --no-baseline
        # All 40 layers: exact only, one repeat (about 10 s a CFG step for diffusers); fastest is step 1's.
        bench 120 --shape 14b-i2v-480p --presets exact --repeats 1
        ;;
    3)
        # Cold start is the run's last phase, after saving the weights and one exact compile: most of the step.
        bench 300 --shape 1.3b-480p --presets exact --steps 2 --jobs 0 --repeats 1 --cold-start
        # The 14B 720p forward on its own (step 1 takes its ratio from the A14B step's two forwards).
        bench 150 --shape 14b-720p-8layers --presets exact --repeats 3
        ;;
    4)
        # 100 diffusers forwards (about 62 s) and a compile before exact's own 50 steps: a step of its own.
        bench 300 --shape 1.3b-480p --presets exact --jobs 0 --repeats 3
        ;;
    *) echo "unknown step $step (1, 2, 3 or 4)" >&2; exit 2 ;;
esac
echo "step $step done in $(($(date +%s) - started)) s, status $status" | tee -a "$log"
exit $status
