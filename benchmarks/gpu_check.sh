#!/usr/bin/env bash
# One GPU check of bpmem on a lent machine (one H100/H200, torch with CUDA already installed,
# no internet: nothing is installed here). Run from anywhere; it works in the repo root:
#
#     bash benchmarks/gpu_check.sh                 # writes to $OUT, else reports/gpu-check
#     OUT=/tmp/gc bash benchmarks/gpu_check.sh --device cpu --quick   # smoke test without a GPU
#
# Extra arguments go to benchmarks/gpu_check.py (see its --help). Prints nvidia-smi and the
# torch/CUDA versions, then the check; everything is also logged to $OUT/gpu_check.log.
# Exit status: gpu_check.py's (1: a saved-bytes mismatch or a crash; OOMs are only recorded).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir="${OUT:-reports/gpu-check}"
mkdir -p "$out_dir"
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif command -v python3 >/dev/null 2>&1; then py=python3
else py=python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) ${HOSTNAME:-?} $(git rev-parse --short HEAD 2>/dev/null || echo no-commit)"
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || echo "(nvidia-smi failed)"
    else
        echo "(no nvidia-smi)"
    fi
    echo "== versions"
    "$py" -c 'import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))'
    echo "== gpu_check"
    # the script keeps to its own --budget-s (360 s by default); this is the backstop
    timeout --signal=INT --kill-after=20 450 "$py" benchmarks/gpu_check.py --out "$out_dir" "$@"
    # model-parallel needs one process that sees two GPUs; the lent machines have one, so
    # this part only runs on a larger node. Each stage's bytes are checked against the
    # prediction for separate devices.
    gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
    if [[ "$gpus" -ge 2 ]]; then
        echo "== model-parallel over cuda:0 and cuda:1"
        timeout 120 "$py" -m bpmem measure --strategy model-parallel --world-size 2 --depth 7 \
            --hidden-dim 4096 --batch-size 256 --device cuda --json > "$out_dir/model_parallel.json" \
            && timeout 120 "$py" -m bpmem estimate --strategy model-parallel --world-size 2 --depth 7 \
            --hidden-dim 4096 --batch-size 256 --json > "$out_dir/model_parallel_predicted.json" \
            || echo "(model-parallel failed)"
    else
        echo "== model-parallel skipped: $gpus GPU(s) visible, 2 needed"
    fi
} 2>&1 | tee "$out_dir/gpu_check.log"
