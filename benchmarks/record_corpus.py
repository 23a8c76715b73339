"""Record a corpus of CUDA allocator snapshots, one process per cell, for CPU CI to replay.

    python benchmarks/record_corpus.py OUT_DIR              # every cell: a child process each
    python benchmarks/record_corpus.py OUT_DIR --only NAME  # one cell

Each child turns on ``torch.cuda.memory._record_memory_history`` before its first CUDA
allocation (no stack frames, at most ``MAX_ENTRIES`` events), measures the cell as ``bpmem
measure`` does, and writes ``OUT_DIR/NAME.pickle`` (the snapshot) and ``OUT_DIR/NAME.json``:
the GPU, driver, torch and CUDA versions, the bpmem command line of the cell, its measured
figures, and ``max_memory_reserved`` and ``max_memory_allocated`` since the probes last reset
them (the whole process's peaks are in the snapshot's events). Then, in a process with CUDA
hidden (``CUDA_VISIBLE_DEVICES=""``), it makes the same cells' predictions on the CPU path
(``predicted_cuda_allocated_bytes``, ``predicted_cuda_reserved_bytes``) into
``OUT_DIR/predictions.json``, so they are measured against the device directly. Without
CUDA it writes the predictions alone.

The cells are small (seconds each): the seed MLP in float32, in bfloat16 autocast with the
fused and the foreach AdamW, the GPT, ResNet and Llama-style examples (``bpmem/models``), and
two Hugging Face models built from configs with no weights (``--hf gpt2``, ``--hf llama``;
transformers must be installed), each plain and checkpointed, at two batch sizes. The CPU
path's predictions run in a process of their own beside the recording, so that a time limit
that stops the recording early still leaves every prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MAX_ENTRIES = 200_000
GPT = ["--model", "bpmem.models.gpt:make_gpt", "--data", "bpmem.models.gpt:make_batch", "--blocks", "blocks"]
RESNET = ["--model", "bpmem.models.resnet:make_resnet", "--data", "bpmem.models.resnet:make_batch"]
LLAMA = ["--model", "bpmem.models.llama:make_llama", "--data", "bpmem.models.llama:make_batch", "--blocks", "layers"]
ADAMW = ["--optimizer", "adamw", "--weight-decay", "0.01"]
HF_GPT2 = ["--hf", "gpt2", "--hf-config", json.dumps({"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 8000,
                                                      "n_positions": 256}), "--seq-len", "128"]
HF_LLAMA = ["--hf", "llama", "--hf-config", json.dumps({"num_hidden_layers": 4, "hidden_size": 256,
                                                        "intermediate_size": 688, "num_attention_heads": 8,
                                                        "num_key_value_heads": 4, "vocab_size": 8000}),
            "--seq-len", "128"]
CELLS: dict[str, list[str]] = {}
for batch in (64, 1024):
    CELLS[f"mlp-f32-B{batch}"] = ["--depth", "4", "--batch-size", str(batch), "--optimizer", "adam"]
    CELLS[f"mlp-f32-sqrt-B{batch}"] = ["--depth", "4", "--batch-size", str(batch), "--strategy", "checkpoint-sqrt"]
    for impl in ("fused", "foreach"):
        CELLS[f"mlp-bf16-{impl}-B{batch}"] = ["--depth", "4", "--batch-size", str(batch), "--amp", "bfloat16",
                                             *ADAMW, "--optimizer-impl", impl]
for batch in (4, 32):
    CELLS[f"gpt-B{batch}"] = [*GPT, "--batch-size", str(batch), "--optimizer", "adam"]
    CELLS[f"gpt-layer-B{batch}"] = [*GPT, "--batch-size", str(batch), "--optimizer", "adam",
                                    "--strategy", "checkpoint-layer"]
    CELLS[f"resnet-B{batch}"] = [*RESNET, "--batch-size", str(batch), "--optimizer", "adam"]
    CELLS[f"resnet-sqrt-B{batch}"] = [*RESNET, "--batch-size", str(batch), "--optimizer", "adam",
                                      "--strategy", "checkpoint-sqrt"]
    CELLS[f"llama-bf16-B{batch}"] = [*LLAMA, "--batch-size", str(batch), "--amp", "bfloat16", *ADAMW]
    CELLS[f"llama-bf16-layer-B{batch}"] = [*LLAMA, "--batch-size", str(batch), "--amp", "bfloat16", *ADAMW,
                                           "--strategy", "checkpoint-layer"]
for batch in (4, 16):  # the Hugging Face models last: their cells import transformers too
    for name, flags in (("hf-gpt2", HF_GPT2), ("hf-llama", HF_LLAMA)):
        CELLS[f"{name}-B{batch}"] = [*flags, "--batch-size", str(batch), *ADAMW]
        CELLS[f"{name}-layer-B{batch}"] = [*flags, "--batch-size", str(batch), *ADAMW, "--strategy", "checkpoint-layer"]


def _specs(argv: list[str]):  # noqa: ANN202 - (model spec, StepSpec) from a bpmem command line
    from bpmem.cli import build_parser
    from bpmem.cli.options import specs_from_args

    return specs_from_args(build_parser().parse_args(["measure", *argv]))


def record(name: str, out: Path) -> None:
    """In this fresh process: record the cell's whole CUDA history, measure it, write the files."""
    import pickle

    import torch

    from bpmem.measurement.cell import measure
    from bpmem.torch_private import cuda_history

    spec, step = _specs(CELLS[name])
    snapshot: dict = {}
    with cuda_history("cuda:0", snapshot, max_entries=MAX_ENTRIES, frames=False):  # before any CUDA allocation
        measured = measure(spec, step, device="cuda:0")
    (out / f"{name}.pickle").write_bytes(pickle.dumps(snapshot))
    properties = torch.cuda.get_device_properties(0)
    meta = {"cell": name, "command": ["bpmem", "measure", *CELLS[name], "--device", "cuda"],
            "gpu": properties.name, "total_memory_bytes": properties.total_memory,
            "driver": _driver(), "torch": torch.__version__, "cuda": torch.version.cuda,
            # since the probes' last reset_peak_memory_stats: the whole process's are in the events
            "max_reserved_bytes_since_reset": torch.cuda.max_memory_reserved(0),
            "max_allocated_bytes_since_reset": torch.cuda.max_memory_allocated(0),
            "measured": {k: v for k, v in measured.to_dict().items() if k.endswith("_bytes")}}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def predict(names: list[str], out: Path) -> None:
    """The CPU path's predictions of each cell (run with CUDA hidden)."""
    from bpmem.predict.cuda_reserved import predict_cuda_allocator
    from bpmem.predict.dry_run import predicted_cuda_allocated

    predictions = {}
    for name in names:
        spec, step = _specs(CELLS[name])
        start = time.monotonic()
        model = predict_cuda_allocator(spec, step, "cuda")
        predictions[name] = {"predicted_cuda_allocated_bytes": predicted_cuda_allocated(spec, step, "cuda"),
                             "predicted_cuda_reserved_bytes": model.reserved_bytes,
                             "predicted_process_allocated_bytes": model.allocated_bytes,
                             "seconds": round(time.monotonic() - start, 2)}
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1, sort_keys=True))


def _driver() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "child":
        record(argv[1], Path(argv[2]))
        return 0
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(argv[0])
    names = [argv[argv.index("--only") + 1]] if "--only" in argv else list(CELLS)
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        print(f"record_corpus.py: --only {unknown[0]} is not a cell; allowed: {', '.join(CELLS)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    import torch

    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    code = ("import sys; sys.argv = sys.argv[:1]; from pathlib import Path; import runpy; "
            f"m = runpy.run_path({__file__!r}); m['predict']({names!r}, Path({str(out)!r}))")
    predicting = subprocess.Popen([sys.executable, "-c", code], env=hidden)  # on the CPU, beside the GPU's cells
    failed = 0
    if torch.cuda.is_available():
        for name in names:
            done = subprocess.run([sys.executable, __file__, "child", name, str(out)], timeout=120)
            failed += done.returncode != 0
            print(f"corpus {name}: exit {done.returncode}", flush=True)
    failed += predicting.wait(timeout=600) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
