"""Check bpmem's predictions against a real GPU: one script, a few minutes, CSV + markdown out.

For each configuration (the seed network 784-256-10 at B=64, and a 4096-wide, 4-deep MLP at
B = 256 ... 16384; float32 and bfloat16; SGD and Adam) it runs ``measure(spec, step, device)``
and ``estimate(spec, step)`` and compares:

- saved activation bytes, predicted vs SavedTensorProbe: these must be equal on any device,
  since autograd saves the same tensors; a difference makes the script exit 1;
- peak bytes, predicted vs LiveTensorProbe: the replay mirrors PyTorch's CPU kernels and the
  CPU optimizers' single-tensor loop, so CUDA kernels (and CUDA's default foreach optimizers)
  may differ; the difference is reported, never failed on;
- the CUDA allocator's peaks (``cuda_max_allocated_bytes``, ``cuda_max_reserved_bytes``) as a
  ratio of the predicted peak;
- the time of one training step: the median of ``--steps`` steps, each between two
  ``torch.cuda.synchronize()`` calls, on a fresh model past a few warm-up steps.

An out-of-memory error is recorded for its configuration and the run goes on. Any other
exception is recorded too, and makes the exit status 1. Configurations left when the
``--budget-s`` time budget is spent are recorded as skipped. Files written to ``--out``
(rewritten after every configuration, so a killed run still leaves what it did):
``results.csv`` (exact bytes), ``results.json`` (the same plus per-layer and per-category
figures) and ``report.md`` (IEC units).

Run from the repository root: ``PYTHONPATH=. python benchmarks/gpu_check.py --out DIR``.
Without a GPU, ``--device cpu --quick`` exercises every code path on small configurations
(on CPU the LiveTensorProbe peak should equal the prediction to the byte).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script without PYTHONPATH=.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpmem.estimate import estimate  # noqa: E402
from bpmem.measure_cell import measure  # noqa: E402
from bpmem.model import build, make_batch  # noqa: E402
from bpmem.spec import MLPSpec, StepSpec  # noqa: E402
from bpmem.step import make_optimizer, train_step  # noqa: E402
from bpmem.units import format_bytes  # noqa: E402

SEED_SPEC = MLPSpec()  # 784 -> 256 -> 10
DTYPES = ("float32", "bfloat16")
OPTIMIZERS = ("sgd", "adam")
WARMUP_STEPS = 3

CSV_FIELDS = (
    "name", "input_dim", "hidden_dim", "output_dim", "depth", "batch_size", "dtype", "optimizer",
    "status", "error",
    "predicted_saved_activation_bytes", "measured_saved_activation_bytes", "saved_match",
    "predicted_peak_bytes", "live_peak_bytes", "live_minus_predicted_bytes", "live_over_predicted",
    "predicted_peak_phase", "live_peak_phase",
    "predicted_inference_peak_bytes", "measured_inference_peak_bytes",
    "predicted_params_bytes", "measured_params_bytes",
    "predicted_grads_bytes", "measured_grads_bytes",
    "predicted_optimizer_bytes", "measured_optimizer_bytes",
    "cuda_allocated_before_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes",
    "cuda_allocated_over_predicted", "cuda_reserved_over_predicted",
    "loss", "measure_s", "step_median_ms", "step_min_ms", "steps_timed",
)


@dataclass(frozen=True)
class Config:
    name: str
    spec: MLPSpec
    step: StepSpec


def configs(quick: bool) -> list[Config]:
    """Small to large, so that a run cut short by the budget has done the cheap ones."""
    if quick:
        wide, batches = MLPSpec(input_dim=256, hidden_dim=256, output_dim=10, depth=2), (32, 128)
    else:
        wide = MLPSpec(input_dim=4096, hidden_dim=4096, output_dim=10, depth=4)
        batches = (256, 1024, 4096, 16384)
    out: list[Config] = []
    for dtype in DTYPES:
        for opt in OPTIMIZERS:
            out.append(Config(f"seed-784-256-10/B64/{dtype}/{opt}", SEED_SPEC.replace(dtype=dtype),
                              StepSpec(batch_size=64, optimizer=opt)))
    for batch in batches:
        for dtype in DTYPES:
            for opt in OPTIMIZERS:
                name = f"w{wide.hidden_dim}-d{wide.depth}/B{batch}/{dtype}/{opt}"
                out.append(Config(name, wide.replace(dtype=dtype), StepSpec(batch_size=batch, optimizer=opt)))
    return out


def iec(nbytes: float | int | None) -> str:
    """bpmem's IEC formatting (1536 -> '1.5 KiB'), with '-' for a figure that was not taken."""
    return "-" if nbytes is None else format_bytes(nbytes)


def ratio(num: float | int | None, den: float | int | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release(device: str) -> None:
    """Drop every cached block so one configuration's reserved peak is not the last one's."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def time_steps(cfg: Config, device: str, steps: int) -> list[float]:
    """Seconds per training step on a fresh model, each step bracketed by synchronize()."""
    model = build(cfg.spec, device, seed=1)
    optimizer = make_optimizer(cfg.step, model)
    x, y = make_batch(cfg.spec, cfg.step.batch_size, device, seed=1)
    for _ in range(WARMUP_STEPS):
        train_step(cfg.spec, model, optimizer, x, y)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(cfg.spec, model, optimizer, x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def base_row(cfg: Config) -> dict[str, Any]:
    spec, step = cfg.spec, cfg.step
    return {"name": cfg.name, "input_dim": spec.input_dim, "hidden_dim": spec.hidden_dim,
            "output_dim": spec.output_dim, "depth": spec.depth, "batch_size": step.batch_size,
            "dtype": spec.dtype, "optimizer": step.optimizer, "status": "", "error": ""}


def run_config(cfg: Config, device: str, steps: int) -> dict[str, Any]:
    """Measure, estimate and time one configuration; never raises (status says what happened)."""
    row = base_row(cfg)
    release(device)
    is_cuda = torch.device(device).type == "cuda"
    stage = "estimate"
    try:
        est = estimate(cfg.spec, cfg.step)
        row.update(predicted_saved_activation_bytes=est.saved_activation_bytes,
                   predicted_peak_bytes=est.peak_bytes, predicted_peak_phase=est.peak_phase,
                   predicted_inference_peak_bytes=est.inference_peak_bytes,
                   predicted_params_bytes=est.params_bytes, predicted_grads_bytes=est.grads_bytes,
                   predicted_optimizer_bytes=est.optimizer_bytes, predicted_per_layer=est.per_layer,
                   predicted_peak_by_category=est.peak_by_category)
        stage = "measure"
        if is_cuda:
            row["cuda_allocated_before_bytes"] = int(torch.cuda.memory_allocated(device))
        start = time.perf_counter()
        got = measure(cfg.spec, cfg.step, device=device)
        row["measure_s"] = round(time.perf_counter() - start, 3)
        row.update(
            measured_saved_activation_bytes=got["saved_activation_bytes"],
            saved_match=got["saved_activation_bytes"] == est.saved_activation_bytes,
            live_peak_bytes=got["peak_bytes"], live_peak_phase=got.get("peak_phase", ""),
            live_minus_predicted_bytes=got["peak_bytes"] - est.peak_bytes,
            live_over_predicted=ratio(got["peak_bytes"], est.peak_bytes),
            measured_inference_peak_bytes=got["inference_peak_bytes"],
            measured_params_bytes=got.get("params_bytes"), measured_grads_bytes=got.get("grads_bytes"),
            measured_optimizer_bytes=got.get("optimizer_bytes"), loss=got.get("loss"),
            measured_per_layer=got.get("per_layer"), live_peak_by_category=got.get("peak_by_category"),
        )
        if "cuda_max_allocated_bytes" in got:
            row.update(
                cuda_max_allocated_bytes=got["cuda_max_allocated_bytes"],
                cuda_max_reserved_bytes=got["cuda_max_reserved_bytes"],
                cuda_allocated_over_predicted=ratio(got["cuda_max_allocated_bytes"], est.peak_bytes),
                cuda_reserved_over_predicted=ratio(got["cuda_max_reserved_bytes"], est.peak_bytes),
            )
        del got
        release(device)
        stage = "timing"
        times = time_steps(cfg, device, steps)
        row.update(step_median_ms=statistics.median(times) * 1e3, step_min_ms=min(times) * 1e3,
                   steps_timed=len(times))
        row["status"] = "ok" if row["saved_match"] else "saved-mismatch"
    except Exception as exc:  # noqa: BLE001 - one configuration's failure must not stop the rest
        row["status"] = "oom" if is_oom(exc) else "error"
        message = str(exc).splitlines()[0] if str(exc) else ""
        row["error"] = f"in {stage}: {type(exc).__name__}: {message}"[:300]
        if row["status"] == "error":
            row["traceback"] = traceback.format_exc()
            print(row["traceback"], file=sys.stderr, flush=True)
    finally:
        release(device)
    return row


def failed(row: dict[str, Any]) -> bool:
    """What makes the exit status 1: a crash, or saved bytes that differ from the prediction."""
    return row["status"] == "error" or row.get("saved_match") is False


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "device": device, "argv": " ".join(sys.argv),
        "num_threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_report(env: dict[str, Any], rows: list[dict[str, Any]], pending: int) -> str:
    lines = ["# bpmem GPU check", ""]
    lines += [f"- {k}: {iec(v) if k.endswith('_bytes') else v}" for k, v in env.items()]
    ok = [r for r in rows if "saved_match" in r]
    skipped = pending + sum(r["status"] == "skipped" for r in rows)
    mism = [r for r in ok if not r["saved_match"]]
    peak_diff = [r for r in ok if r.get("live_minus_predicted_bytes")]
    lines += [
        "", "## Summary", "",
        f"- configurations: {len(rows) + pending - skipped} run, "
        f"{skipped} not run (time budget spent, or the run was cut short)",
        f"- saved activation bytes equal to the prediction: {len(ok) - len(mism)} of {len(ok)} measured",
        f"- LiveTensorProbe peak equal to the predicted peak: {len(ok) - len(peak_diff)} of {len(ok)}",
        f"- out of memory: {sum(r['status'] == 'oom' for r in rows)}; "
        f"errors: {sum(r['status'] == 'error' for r in rows)}",
    ]
    lines += ["", "## Saved activations and peaks", "",
              "| config | status | saved pred | saved meas | peak pred | live peak | live - pred "
              "| pred phase / live phase | cuda alloc | cuda reserved | alloc/pred | reserved/pred |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        phases = f"{r.get('predicted_peak_phase', '-')} / {r.get('live_peak_phase') or '-'}"
        lines.append(
            f"| {r['name']} | {r['status']} | {iec(r.get('predicted_saved_activation_bytes'))} "
            f"| {iec(r.get('measured_saved_activation_bytes'))} | {iec(r.get('predicted_peak_bytes'))} "
            f"| {iec(r.get('live_peak_bytes'))} | {iec(r.get('live_minus_predicted_bytes'))} | {phases} "
            f"| {iec(r.get('cuda_max_allocated_bytes'))} | {iec(r.get('cuda_max_reserved_bytes'))} "
            f"| {_fmt_ratio(r.get('cuda_allocated_over_predicted'))} "
            f"| {_fmt_ratio(r.get('cuda_reserved_over_predicted'))} |")
    lines += ["", "## State and inference peak", "",
              "| config | params pred / meas | grads pred / meas | optimizer pred / meas "
              "| inference peak pred / meas | cuda allocated before |",
              "|---|---|---|---|---|---:|"]
    for r in rows:
        cells = [f"{iec(r.get(f'predicted_{k}_bytes'))} / {iec(r.get(f'measured_{k}_bytes'))}"
                 for k in ("params", "grads", "optimizer", "inference_peak")]
        before = iec(r.get("cuda_allocated_before_bytes"))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {before} |")
    lines += ["", "## Step time", "", "| config | median ms | min ms | steps | measure() s | loss |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        loss = r.get("loss")
        lines.append(f"| {r['name']} | {_fmt_ms(r.get('step_median_ms'))} | {_fmt_ms(r.get('step_min_ms'))} "
                     f"| {r.get('steps_timed', '-')} | {r.get('measure_s', '-')} "
                     f"| {'-' if loss is None else f'{loss:.4g}'} |")
    if mism:
        lines += ["", "## Saved-bytes mismatches (exact bytes)", ""]
        lines += [f"- {r['name']}: predicted {r['predicted_saved_activation_bytes']}, measured "
                  f"{r['measured_saved_activation_bytes']}; per layer predicted {r['predicted_per_layer']}, "
                  f"measured {r['measured_per_layer']}" for r in mism]
    problems = [r for r in rows if r["error"]]
    if problems:
        lines += ["", "## Not measured, or cut short", ""]
        lines += [f"- {r['name']}: {r['status']}: {r['error']}" for r in problems]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, env: dict[str, Any], rows: list[dict[str, Any]], pending: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))
    (out / "report.md").write_text(render_report(env, rows, pending))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/gpu-check"),
                        help="folder for results.csv, results.json, report.md (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="torch device (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small configurations and 3 timed steps: a smoke test, e.g. with --device cpu")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per configuration (default 20; 3 with --quick)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no configuration after this many seconds (default: %(default)s)")
    parser.add_argument("--only", default="", help="run only configurations whose name contains this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (try --device cpu --quick)", file=sys.stderr)
        return 2
    steps = args.steps or (3 if args.quick else 20)
    todo = [c for c in configs(args.quick) if args.only in c.name]
    env = environment(device)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if torch.device(device).type == "cuda":  # context and cuBLAS handles before the first config
        torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
        synchronize(device)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for index, cfg in enumerate(todo):
        if time.perf_counter() - started > args.budget_s:
            for late in todo[index:]:
                rows.append(base_row(late) | {"status": "skipped", "error": "time budget spent"})
            print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - index} configurations skipped",
                  flush=True)
            break
        row = run_config(cfg, device, steps)
        rows.append(row)
        if row.get("saved_match") is False:
            print(f"SAVED MISMATCH {cfg.name}: predicted {row['predicted_saved_activation_bytes']} B,"
                  f" measured {row['measured_saved_activation_bytes']} B", flush=True)
        print(f"[{index + 1}/{len(todo)}] {cfg.name}: {row['status']}"
              f" saved {iec(row.get('measured_saved_activation_bytes'))}"
              f" (pred {iec(row.get('predicted_saved_activation_bytes'))})"
              f" live peak {iec(row.get('live_peak_bytes'))} (pred {iec(row.get('predicted_peak_bytes'))})"
              f" cuda alloc {iec(row.get('cuda_max_allocated_bytes'))}"
              f" reserved {iec(row.get('cuda_max_reserved_bytes'))}"
              f" step {_fmt_ms(row.get('step_median_ms'))} ms {row['error']}", flush=True)
        write_outputs(args.out, env, rows, len(todo) - index - 1)
    write_outputs(args.out, env, rows, 0)
    bad = [r["name"] for r in rows if failed(r)]
    elapsed = time.perf_counter() - started
    print(f"wrote {args.out}/results.csv, results.json, report.md in {elapsed:.1f} s", flush=True)
    if bad:
        print("FAILED (saved-bytes mismatch or error): " + ", ".join(bad), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
