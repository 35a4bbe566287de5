#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one go: region encoder, `hipt embed` end to end with
# each reader (and GPU utilisation), and region reads including nvJPEG decode.
#
# Usage (from the repository root, on a CUDA machine where `import hipt` works):
#     bash benchmarks/run_gpu.sh [OUTDIR]
# Each benchmark's output is also written to OUTDIR (default gpu-results/), one file each.
# Every benchmark has its own time limit (seconds), so one slow part cannot starve the others:
#     LIMIT_ENCODER=120 LIMIT_EMBED=200 LIMIT_READER=150
# SMOKE=1 DEVICE=cpu runs tiny versions of the same commands, to check the script itself.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*"
    local start
    start=$(date +%s)
    timeout "$limit" "$py" "$@" 2>&1 | tee "$out/$name.txt"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    echo "CPUs: $(nproc)"
    "$py" - <<'EOF'
import importlib
for name in ["torch", "torchvision", "timm", "numpy", "imagecodecs", "openslide", "h5py", "tifffile"]:
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report and go on: the benchmarks say what they lack
        print(name, "MISSING:", exc)
EOF
} 2>&1 | tee "$out/machine.txt"

if [ "${SMOKE:-0}" = 1 ]; then
    enc=(--smoke --regions 1 --batch 1 --patch-batch 256)
    emb=(--depth 1,1 --regions 2 --slide-regions 1 --original-regions 1 --workers 1 --batch-regions 1)
    rdr=(--size 8192 --tiles 256 --regions 2 --processes 1)
else
    enc=(--regions 32 --batch 8 --patch-batch 2048)
    emb=(--regions 128 --slide-regions 16 --original-regions 4 --workers 15 --batch-regions 8)
    rdr=(--size 16384 --tiles 256 512 --regions 16 --processes 1 16)
fi

run region_encoder "${LIMIT_ENCODER:-120}" benchmarks/bench_region_encoder.py --device "$device" "${enc[@]}"
run embed "${LIMIT_EMBED:-200}" benchmarks/bench_embed.py --device "$device" "${emb[@]}" \
    --readers fast openslide --workdir "$work/embed"
run reader "${LIMIT_READER:-150}" benchmarks/bench_reader.py --device "$device" "${rdr[@]}" \
    --workdir "$work/reader"
