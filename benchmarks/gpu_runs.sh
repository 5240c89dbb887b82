#!/usr/bin/env bash
# The GPU measurements of docs/performance.md, one step per call of the device tool (each under 10 minutes):
#
#     bash benchmarks/gpu_runs.sh STEP            # on the GPU machine, from the repo root, wheels carried in .whl/
#     bash benchmarks/gpu_runs.sh STEP --dry-run  # anywhere: print what STEP runs
#
# Each step merges its runs into benchmarks/results/<gpu>-<date>.json and copies that file, its log and the
# GPU's name and driver to $OUT. Copy the JSON back into benchmarks/results/ before the next step, so the steps
# of one day merge into one file. Steps, most important first:
#   1  1.3B 480p: forward and 20-step request vs diffusers, serving overlap off/on   (about 9 min)
#   2  14B 720p (8 of 40 layers) and 5B 1280x704x121 forwards                      (about 6 min)
#   3  14B I2V 480p and A14B 720p CFG steps (8 layers, scaled) and projections      (about 7 min)
#   4  5B with the text encoder on the CPU and VAE tiling: 24 GB memory, serving    (about 6 min)
#   5  14B I2V 480p, all 40 layers: one 14B expert on one card, no offload          (about 6 min)
#   6  1.3B 480p full 50-step request, exact only                                   (about 4 min)
set -uo pipefail

step=${1:?usage: bash benchmarks/gpu_runs.sh 1|2|3|4|5|6 [--dry-run]}
dry=${2:-}
out=${OUT:-/tmp/wanserve-gpu-out}
mkdir -p "$out"

if [ -z "$dry" ]; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: see docs/performance.md" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

status=0
bench() {
    echo "+ wanserve bench $*" | tee -a "$out/step$step.log"
    [ -n "$dry" ] && return 0
    python3 -m wanserve bench --out benchmarks/results "$@" 2>&1 | tee -a "$out/step$step.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

case $step in
    1) bench --shape 1.3b-480p --steps 20 --jobs 2 ;;
    2) bench --shape 14b-720p-8layers
       bench --shape 5b-720p --no-request ;;
    3) bench --shape 14b-i2v-480p --layers 8 --repeats 3
       bench --shape a14b-720p --layers 8 --repeats 3 ;;
    4) bench --shape 5b-720p --presets exact --text-encoder-cpu --vae-tiling --steps 10 --jobs 3 --repeats 3 ;;
    5) bench --shape 14b-i2v-480p --presets exact,fastest --repeats 3 ;;
    6) bench --shape 1.3b-480p --presets exact --jobs 0 ;;
    *) echo "unknown step $step (1-6)" >&2; exit 2 ;;
esac

if [ -z "$dry" ]; then
    cp benchmarks/results/*.json "$out/" 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.csv" 2>&1
fi
exit $status
