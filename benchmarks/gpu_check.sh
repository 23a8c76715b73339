#!/usr/bin/env bash
# The GPU check of bpmem, on a lent machine (one H100/H200, torch with CUDA already installed,
# no internet: nothing is installed here), in under 8 minutes, with bpmem's own commands only:
#
#   0. the corpus (benchmarks/record_corpus.py): each small cell in a process of its own, its
#      CUDA allocator history recorded from the start, and its CPU-path predictions beside it;
#   1. the environment: nvidia-smi, Python, torch, CUDA;
#   2. `bpmem run` of benchmarks/configs/gpu_seed.toml (the seed network, every single-device
#      strategy), benchmarks/configs/gpu_steps.toml (bfloat16 autocast with the foreach Adam
#      and weight decay, against float32), benchmarks/configs/models.toml on the GPU (your own
#      model: the GPT and the ResNet, B = 4 and 64), benchmarks/configs/gpu_compile.toml
#      (compile-budget, one cell) and benchmarks/configs/gpu.toml (batches x4 until the GPU
#      runs out of memory);
#   3. `bpmem check --predicted` on each: saved activations, parameters, gradients and optimizer
#      state must equal their predictions to the byte, and no row may be an error; the peak
#      and the CUDA allocator's peak are shown beside the prediction, never failed on;
#   4. `bpmem measure --trace` of one step, and PyTorch's memory viewer (stats, trace_plot)
#      on the file it wrote;
#   5. `bpmem run` of benchmarks/configs/split.toml on the CPU, and its check: the distributed
#      CPU cells (torchrun, gloo) still run on a machine with a GPU;
#   6. model-parallel over cuda:0 and cuda:1, where two GPUs are visible;
#   7. `bpmem report` of each run folder, and $OUT/summary.md: the steps, every check table
#      and every report.
#
#     bash benchmarks/gpu_check.sh                       # writes to $OUT, else reports/gpu-check
#     DEVICE=cpu QUICK=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh   # dry run on a CPU, about a minute
#
# Environment: OUT (the output folder), DEVICE (cuda, the default, or cpu), QUICK=1 (run
# benchmarks/configs/gpu_dry_run.toml instead of the two GPU configs; on DEVICE, so
# DEVICE=cuda QUICK=1 is a one-minute smoke test of a GPU), BUDGET_S (the whole script's
# wall-clock budget, 470 s by default; every step gets a `timeout` out of what is left),
# PYTHON (the interpreter), SPLIT_CONFIG (step 5's config, benchmarks/configs/split.toml by
# default; the test suite passes a smaller one, since it runs split.toml itself elsewhere).
# Everything printed also goes to $OUT/gpu_check.log.
#
# Each run folder ($OUT/gpu-seed, $OUT/gpu-steps, $OUT/gpu-models, $OUT/gpu-compile, $OUT/gpu,
# $OUT/split, or $OUT/gpu-dry-run) holds one
# results.csv, its check table (check.txt) and its report (report.md, plots/). A run cut
# short by its timeout keeps the rows it finished, and they are still checked.
#
# Exit status: 0 every step finished and every check passed; 1 a check failed (a figure off
# its prediction, an error row), a step failed or ran out of time; 2 bad usage. OOM rows are
# expected (gpu.toml looks for the limit) and only recorded.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir="${OUT:-reports/gpu-check}"
device="${DEVICE:-cuda}"
quick="${QUICK:-0}"
split_config="${SPLIT_CONFIG:-benchmarks/configs/split.toml}"
budget_s="${BUDGET_S:-470}"
if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
elif command -v python3 >/dev/null 2>&1; then py=python3
else py=python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ "$device" != "cuda" && "$device" != "cpu" ]]; then
    echo "gpu_check.sh: DEVICE=$device is not allowed; allowed: cuda, cpu" >&2
    exit 2
fi
if [[ "$device" == "cpu" && "$quick" != "1" ]]; then
    echo "gpu_check.sh: DEVICE=cpu needs QUICK=1 (gpu_seed.toml and gpu.toml are sized for a GPU); allowed:" \
         "DEVICE=cpu QUICK=1, or DEVICE=cuda" >&2
    exit 2
fi
if ! [[ "$budget_s" =~ ^[0-9]+$ ]] || (( budget_s < 60 )); then
    echo "gpu_check.sh: BUDGET_S=$budget_s is not allowed; allowed: whole seconds >= 60" >&2
    exit 2
fi
if [[ ! -f "$split_config" ]]; then
    echo "gpu_check.sh: SPLIT_CONFIG=$split_config is not a file; allowed: a bpmem sweep config (.toml)" >&2
    exit 2
fi
mkdir -p "$out_dir" || exit 2

# The rules of every check: what bpmem claims exact on any device.
rules=(--fail saved:0% --fail params:0% --fail grads:0% --fail optimizer:0%)
deadline=$((SECONDS + budget_s))
failures=0
steps=()  # "name|exit status|seconds" for the summary

# run_step NAME CAP RESERVE COMMAND...: run COMMAND under `timeout`, at most CAP seconds and
# never into the last RESERVE seconds of the budget (kept for the steps after it). SIGINT
# first, so `bpmem run` keeps its finished rows; SIGKILL 10 s later. Its own lines go to fd 3
# (the log), whatever the command's output is redirected to. Returns the command's status
# (1 when skipped); the caller decides whether that is a failure.
run_step() {
    local name=$1 cap=$2 reserve=$3 limit status start
    shift 3
    limit=$((deadline - SECONDS - reserve - 10))
    ((limit > cap)) && limit=$cap
    if ((limit < 5)); then
        echo "== $name: skipped, the time budget is spent" >&3
        steps+=("$name|skipped (no time left)|0")
        return 1
    fi
    echo "== $name (timeout ${limit} s): $*" >&3
    start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    status=$?
    ((status == 124 || status == 130 || status == 137)) && echo "== $name: stopped by its ${limit} s timeout" >&3
    steps+=("$name|$status|$((SECONDS - start))")
    return "$status"
}

# sweep NAME CONFIG CAP RESERVE: bpmem run into $out_dir/NAME, then bpmem check --predicted.
sweep() {
    local name=$1 config=$2 cap=$3 reserve=$4 folder="$out_dir/$1"
    run_step "run $name" "$cap" "$reserve" "$py" -m bpmem run --config "$config" --out "$folder" --overwrite \
        --quiet --no-report || failures=$((failures + 1))
    if [[ -f "$folder/results.csv" ]]; then
        run_step "check $name" 60 $((reserve - 30)) "$py" -m bpmem check --predicted "$folder" "${rules[@]}" \
            --strict > "$folder/check.txt" 2>&1 || failures=$((failures + 1))
        cat "$folder/check.txt"
    fi
}

main() {
    exec 3>&1
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) ${HOSTNAME:-?} $(git rev-parse --short HEAD 2>/dev/null || echo no-commit)"
    echo "== DEVICE=$device QUICK=$quick BUDGET_S=$budget_s OUT=$out_dir PYTHON=$py"
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 30 nvidia-smi || echo "(nvidia-smi failed)"
    else
        echo "(no nvidia-smi)"
    fi
    echo "== versions"
    timeout 60 "$py" -c 'import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"capability {p.major}.{p.minor}")' \
        || echo "(torch failed to import)"
    timeout 30 "$py" -m bpmem --version || echo "(bpmem failed to import)"

    # Order: what matters most first; gpu.toml's search for the OOM takes what is left. Each
    # step's reserve keeps time for the steps after it. On an H200 (2026-11-29) the steps took
    # seed 21 s, steps 27 s, split about 150 s (9 torchrun cells of ~17 s: importing a CUDA
    # build of torch in each rank), trace 19 s, own models 60 s, compile 16 s, gpu.toml 110 s
    # and the reports 33 s: about 440 s of the 470 s budget.
    # 0. the corpus first: one process per cell, each recording the caching allocator's whole
    # history (benchmarks/record_corpus.py), and the same cells predicted with CUDA hidden; the
    # snapshots are CPU CI's ground truth for the allocator model and the CUDA dry run. At most
    # 240 s; the steps after it take what is left, each under its own cap.
    local corpus=()
    [[ "$quick" == "1" ]] && corpus=(--only mlp-f32-B64)
    run_step "record corpus" 240 250 "$py" benchmarks/record_corpus.py "$out_dir/corpus" "${corpus[@]}" \
        || failures=$((failures + 1))

    local names=()
    if [[ "$quick" == "1" ]]; then
        local config=benchmarks/configs/gpu_dry_run.toml
        if [[ "$device" == "cuda" ]]; then  # the same tiny cells on the GPU
            mkdir -p "$out_dir/configs"
            sed 's/^devices = \["cpu"\]/devices = ["cuda"]/' "$config" > "$out_dir/configs/gpu_dry_run.toml"
            config="$out_dir/configs/gpu_dry_run.toml"
        fi
        sweep gpu-dry-run "$config" 120 220
        names+=(gpu-dry-run)
    else
        sweep gpu-seed benchmarks/configs/gpu_seed.toml 60 380
        sweep gpu-steps benchmarks/configs/gpu_steps.toml 45 340
        names+=(gpu-seed gpu-steps)
    fi
    # distributed cells on the CPU (split.toml's devices are cpu) still run on this machine
    sweep split "$split_config" 170 170
    names+=(split)

    # one step's memory trace in PyTorch's snapshot format (on CUDA the caching allocator's
    # own history), opened by PyTorch's own viewer
    local trace_dir="$out_dir/trace"
    mkdir -p "$trace_dir"
    run_step "measure --trace" 40 120 "$py" -m bpmem measure --depth 4 --batch-size 4096 --optimizer adam \
        --optimizer-impl foreach --device "$device" --trace "$trace_dir/step.pickle" --json \
        > "$trace_dir/measure.json" || failures=$((failures + 1))
    run_step "memory_viz stats" 15 110 "$py" -m torch.cuda._memory_viz stats "$trace_dir/step.pickle" \
        > "$trace_dir/stats.txt" 2>&1 || failures=$((failures + 1))
    run_step "memory_viz trace_plot" 15 100 "$py" -m torch.cuda._memory_viz trace_plot "$trace_dir/step.pickle" \
        -o "$trace_dir/step.html" || failures=$((failures + 1))

    if [[ "$quick" != "1" ]]; then
        # your own models (the GPT and the ResNet of models.toml) on the GPU
        mkdir -p "$out_dir/configs"
        sed 's/^devices = \["cpu"\]/devices = ["cuda"]/; s/^batch_sizes = .*/batch_sizes = [4, 64]/' \
            benchmarks/configs/models.toml > "$out_dir/configs/gpu_models.toml"
        sweep gpu-models "$out_dir/configs/gpu_models.toml" 70 70
        sweep gpu-compile benchmarks/configs/gpu_compile.toml 40 40
        sweep gpu benchmarks/configs/gpu.toml 120 35
        names+=(gpu-models gpu-compile gpu)
    fi

    # model-parallel needs one process that sees two GPUs; the lent machines have one, so
    # this part only runs on a larger node. Each stage's bytes against the prediction for
    # separate devices.
    local gpus=0
    if [[ "$device" == "cuda" ]]; then
        gpus=$(timeout 30 "$py" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    fi
    if [[ "$device" == "cuda" && "$gpus" -ge 2 ]]; then
        local flags=(--strategy model-parallel --world-size 2 --depth 7 --hidden-dim 4096 --batch-size 256 --json)
        run_step "measure model-parallel" 60 30 "$py" -m bpmem measure "${flags[@]}" --device cuda \
            > "$out_dir/model_parallel.json" || failures=$((failures + 1))
        run_step "estimate model-parallel" 30 30 "$py" -m bpmem estimate "${flags[@]}" \
            > "$out_dir/model_parallel_predicted.json" || failures=$((failures + 1))
    else
        echo "== model-parallel skipped: $gpus GPU(s) visible on DEVICE=$device, 2 needed"
    fi

    for name in "${names[@]}"; do
        [[ -f "$out_dir/$name/results.csv" ]] || continue
        # a report that cannot be drawn is noted in the summary; it does not fail the check
        run_step "report $name" 30 0 "$py" -m bpmem report "$out_dir/$name" > "$out_dir/$name/report.txt" 2>&1
        cat "$out_dir/$name/report.txt"
    done
    write_summary "${names[@]}"
    echo "== wrote $out_dir/summary.md and $out_dir/gpu_check.log in ${SECONDS} s; $failures failure(s)"
    ((failures == 0))
}

# write_summary NAME...: $out_dir/summary.md from the steps, the check tables and the reports
write_summary() {
    local summary="$out_dir/summary.md" name step s_name s_status s_seconds
    {
        echo "# bpmem GPU check"
        echo
        echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), host ${HOSTNAME:-?}, commit $(git rev-parse --short HEAD 2>/dev/null \
            || echo none), DEVICE=$device, QUICK=$quick, ${SECONDS} s of a ${budget_s} s budget;" \
             "$failures failure(s). The whole log: [gpu_check.log](gpu_check.log)."
        echo
        echo "| step | exit status | seconds |"
        echo "| --- | --- | ---: |"
        for step in "${steps[@]}"; do
            IFS='|' read -r s_name s_status s_seconds <<< "$step"
            echo "| $s_name | $s_status | $s_seconds |"
        done
        echo
        echo "## One step's memory trace (trace/step.pickle; open trace/step.html)"
        echo
        echo '```'
        grep -E '"(peak|params|grads|optimizer|cuda_[a-z_]+)_bytes"' "$out_dir/trace/measure.json" 2>/dev/null \
            || echo "(no measure.json)"
        head -4 "$out_dir/trace/stats.txt" 2>/dev/null || echo "(no stats)"
        echo '```'
        for name in "$@"; do
            echo
            echo "## $name: bpmem check --predicted"
            echo
            echo "[results.csv]($name/results.csv); rules: ${rules[*]} --strict (peak and cuda_allocated are shown," \
                 "not judged; ratio = measured / predicted)."
            echo
            echo '```'
            cat "$out_dir/$name/check.txt" 2>/dev/null || echo "(no check: the run wrote no results.csv)"
            echo '```'
        done
        for name in "$@"; do
            echo
            if [[ -f "$out_dir/$name/report.md" ]] && grep -q "^bpmem report: wrote" "$out_dir/$name/report.txt"; then
                sed -e 's/^#/##/' -e "s#](results.csv)#]($name/results.csv)#g" -e "s#](plots/#]($name/plots/#g" \
                    "$out_dir/$name/report.md"
            else
                echo "## $name: no report"
                echo
                echo '```'
                cat "$out_dir/$name/report.txt" 2>/dev/null || echo "(not drawn)"
                echo '```'
            fi
        done
    } > "$summary"
}

main 2>&1 | tee "$out_dir/gpu_check.log"
exit "${PIPESTATUS[0]}"
