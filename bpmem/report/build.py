"""``bpmem report DIR``: plots and a Markdown report from ``DIR/results.csv`` alone.

Every number in ``report.md`` is read from the CSV (or ``timelines.csv`` beside it), so
re-running the report on the same files gives the same text. Plots use matplotlib's Agg
backend and are written as PNG and SVG into ``DIR/plots/``:

``bpmem.report.plots`` draws them (each answers one question, named in its title, at a cell
it names); ``bpmem.report.plot_data`` computes the numbers behind them; ``bpmem.report.text``
writes the Markdown.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bpmem.strategies import registry


def _model_label(row: Any) -> str:
    if row.model not in ("", "mlp"):  # your own model: its factory's name and arguments
        return row.model.rsplit(":", 1)[-1] + (f" {row.model_kwargs}" if row.model_kwargs else "")
    # what tells one series from another: the step's optimizer, a dtype or autocast other than float32's
    extra = [row.optimizer] + ([row.dtype] if row.dtype != "float32" else []) + (
        [f"amp {row.amp}"] if row.amp not in ("none", "") else [])
    return f"depth {row.depth}, h={row.hidden_dim}" + (", bias" if row.bias else "") + ", " + ", ".join(extra)


def _strategy_label(row: Any) -> str:
    params = row.strategy_params if isinstance(row.strategy_params, str) else ""
    return registry.label(row.strategy, json.loads(params) if params else {})


def load(directory: Path):
    from bpmem.results.table import COLUMNS, MEASURED_COLUMNS, read_results

    # every column the report reads; files written before these columns existed were the MLP's,
    # with no weight decay and the CPU's for-loop optimizer
    later = {"model": "mlp", "model_kwargs": "", "weight_decay": 0.0, "optimizer_impl": "for-loop", "amp": "none",
             "threads": None, "time_noisy": False, "peak_by_category": "",
             # before pairing (bpmem.measurement.timing_pairs): no CPU time, no contention judged, no paired overhead
             "step_cpu_time_median_s": None, "time_contended": None, "time_overhead": None,
             "time_overhead_low": None, "time_overhead_high": None, "time_pairs": None,
             # before the allocator's view (bpmem.measurement.allocator_step): no allocator figures
             "allocator_peak_bytes": None, "predicted_allocator_peak_bytes": None, "scratch_bytes": None}
    required = tuple(c for c in COLUMNS if c not in later)
    frame = read_results(directory / "results.csv", required, MEASURED_COLUMNS)
    for column, default in later.items():
        if column not in frame:
            frame[column] = default
    if frame.empty:
        from bpmem.results.table import ResultsFileError

        raise ResultsFileError(f"{directory / 'results.csv'}: has a header but no rows; allowed: a results.csv "
                               "with at least one row")
    frame["label"] = [_strategy_label(r) for r in frame.itertuples()]
    frame["model_source"] = frame["model"]  # the factory, before the label replaces it (report_models reads it)
    frame["model"] = [_model_label(r) for r in frame.itertuples()]
    return frame


def load_timeline(directory: Path):
    """``DIR/timelines.csv`` as a frame, or None where the run kept no timeline."""
    import pandas as pd

    path = directory / "timelines.csv"
    if not path.exists():
        return None
    from bpmem.results.table import TIMELINE_COLUMNS, ResultsFileError

    try:
        timeline = pd.read_csv(path, dtype={"strategy_params": str}).fillna({"strategy_params": ""})
        timeline["live_bytes"] = pd.to_numeric(timeline["live_bytes"])
        return timeline[list(TIMELINE_COLUMNS)]
    except (ValueError, KeyError, pd.errors.ParserError) as error:
        raise ResultsFileError(f"{path}: not a timelines.csv ({str(error).splitlines()[0][:120]}); "
                               f"allowed: the columns {', '.join(TIMELINE_COLUMNS)}") from None


def make_plots(directory: Path, frame: Any) -> dict[str, list[str]]:
    plots = directory / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    from bpmem.report import plots as draw

    return {
        "memory_vs_batch": draw.plot_memory_vs_batch(frame, plots),
        "breakdown": draw.plot_breakdown(frame, plots),
        "checkpoint_pareto": draw.plot_checkpoint_pareto(frame, plots),
        "split": draw.plot_split(frame, plots),
        "timeline": draw.plot_timeline(load_timeline(directory), frame, plots),
        "predicted_vs_measured": draw.plot_predicted_vs_measured(frame, plots),
    }


def report(directory: str | Path) -> Path:
    """Draw the plots and write ``DIR/report.md``; returns the report's path."""
    from bpmem.report.text import write_markdown

    directory = Path(directory)
    frame = load(directory)
    plots = make_plots(directory, frame)
    path = directory / "report.md"
    path.write_text(write_markdown(frame, plots))
    return path
