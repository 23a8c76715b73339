"""``bpmem report DIR``: plots and a Markdown report from ``DIR/results.csv`` alone.

Every number in ``report.md`` is read from the CSV (or ``timelines.csv`` beside it), so
re-running the report on the same files gives the same text. Plots use matplotlib's Agg
backend and are written as PNG and SVG into ``DIR/plots/``:

(a) ``memory_vs_batch``: retained and peak bytes against batch size, log-log, measured
    solid and predicted dashed, one line per strategy;
(b) ``breakdown``: params, grads, optimizer and activations, stacked, training beside inference;
(c) ``checkpoint_pareto``: step time against retained bytes, with the Pareto front;
(d) ``split_memory`` / ``pareto_all``: per-rank memory of the splitting strategies against
    microbatch, and memory per device against step time for every strategy;
(e) ``timeline``: live bytes through one training step, plain and checkpointed;
(f) ``predicted_vs_measured``: every figure, with its relative error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bpmem.strategies import registry
from bpmem.units import format_bytes

FIGURE_SIZE = (8.0, 5.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bytes_axis(axis: Any, which: str = "y") -> None:
    """Label ticks in IEC units (the axis title says so)."""
    from matplotlib.ticker import FuncFormatter

    formatter = FuncFormatter(lambda value, _: format_bytes(value) if value > 0 else "0")
    (axis.yaxis if which == "y" else axis.xaxis).set_major_formatter(formatter)


def _legend(axis: Any, **kwargs: Any) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(**kwargs)
    else:
        axis.text(0.5, 0.5, "no rows of this kind in this run", transform=axis.transAxes, ha="center")


def _save(fig: Any, plots: Path, name: str) -> list[str]:
    fig.tight_layout()
    paths = []
    for suffix in ("png", "svg"):
        fig.savefig(plots / f"{name}.{suffix}", dpi=110)
        paths.append(f"plots/{name}.{suffix}")
    _pyplot().close(fig)
    return paths


def _model_label(row: Any) -> str:
    if row.model not in ("", "mlp"):  # your own model: its factory's name and arguments
        return row.model.rsplit(":", 1)[-1] + (f" {row.model_kwargs}" if row.model_kwargs else "")
    return f"depth {row.depth}, h={row.hidden_dim}" + (", bias" if row.bias else "")


def _strategy_label(row: Any) -> str:
    params = row.strategy_params if isinstance(row.strategy_params, str) else ""
    return registry.label(row.strategy, json.loads(params) if params else {})


def load(directory: Path):
    from bpmem.results import COLUMNS, MEASURED_COLUMNS, read_results

    # every column the report reads; files written before these columns existed were the MLP's,
    # with no weight decay and the CPU's for-loop optimizer
    later = {"model": "mlp", "model_kwargs": "", "weight_decay": 0.0, "optimizer_impl": "for-loop", "amp": "none",
             "threads": None, "time_noisy": False, "peak_by_category": ""}
    required = tuple(c for c in COLUMNS if c not in later)
    frame = read_results(directory / "results.csv", required, MEASURED_COLUMNS)
    for column, default in later.items():
        if column not in frame:
            frame[column] = default
    if frame.empty:
        from bpmem.results import ResultsFileError

        raise ResultsFileError(f"{directory / 'results.csv'}: has a header but no rows; allowed: a results.csv "
                               "with at least one row")
    frame["label"] = [_strategy_label(r) for r in frame.itertuples()]
    frame["model_source"] = frame["model"]  # the factory, before the label replaces it (report_models reads it)
    frame["model"] = [_model_label(r) for r in frame.itertuples()]
    return frame


def plot_memory_vs_batch(frame: Any, plots: Path) -> list[str]:
    plt = _pyplot()
    train = frame[(frame["mode"] == "train") & (frame.status == "ok") & (frame.world_size == 1)]
    models = sorted(train.model.unique())
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=False):
        part = train[train.model == model]
        for index, (label, group) in enumerate(part.groupby("label", sort=True)):
            group = group.sort_values("batch_size")
            colour = f"C{index % 10}"
            axis.plot(group.batch_size, group.saved_activation_bytes, "-o", color=colour, markersize=3, label=label)
            axis.plot(group.batch_size, group.predicted_saved_activation_bytes, "--", color=colour, linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log", base=2)
        _bytes_axis(axis)
        axis.set_xlabel("batch size (rows)")
        axis.set_ylabel("retained activations (bytes, IEC)")
        axis.set_title(f"Retained activations vs batch: {model}\n(solid: measured, dashed: predicted)")
        _legend(axis, fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
    return _save(fig, plots, "memory_vs_batch")


def plot_breakdown(frame: Any, plots: Path) -> list[str]:
    plt = _pyplot()
    plain = frame[(frame.strategy == registry.PLAIN) & (frame.status == "ok")
                  & frame["mode"].isin(["train", "inference"])]
    model = sorted(plain.model.unique())[0] if len(plain) else ""
    plain = plain[plain.model == model]
    batches = sorted(plain.batch_size.unique())
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    width = 0.38
    parts = [("params_bytes", "params"), ("grads_bytes", "grads"), ("optimizer_bytes", "optimizer"),
             ("saved_activation_bytes", "saved activations")]
    for offset, mode in ((-width / 2, "train"), (width / 2, "inference")):
        rows = plain[plain["mode"] == mode].drop_duplicates("batch_size").set_index("batch_size").reindex(batches)
        bottom = [0.0] * len(batches)
        for index, (column, name) in enumerate(parts):
            values = [float(v) if v == v else 0.0 for v in rows[column].fillna(0)]
            if mode == "inference" and column == "saved_activation_bytes":
                values = [float(p - q) if p == p else 0.0 for p, q in zip(rows.peak_bytes.fillna(0),
                                                                         rows.params_bytes.fillna(0), strict=True)]
                name = "inference working set"
            axis.bar([i + offset for i in range(len(batches))], values, width, bottom=bottom, color=f"C{index}",
                     hatch="" if mode == "train" else "//", edgecolor="white",
                     label=f"{name} ({mode})")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_xticks(range(len(batches)), [str(b) for b in batches])
    _bytes_axis(axis)
    axis.set_xlabel("batch size (rows); left bar training, right bar inference (hatched)")
    axis.set_ylabel("bytes (IEC)")
    axis.set_title(f"Where the memory goes: {model}")
    _legend(axis, fontsize=7, ncol=2)
    return _save(fig, plots, "breakdown")


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _missing(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def _scatter_with_front(axis: Any, items: list[tuple[str, Any, Any]]) -> None:
    """One labelled point per (label, bytes, seconds), and the Pareto front through them."""
    points = []
    for index, (label, nbytes, seconds) in enumerate(items):
        if not (_missing(nbytes) or _missing(seconds)):  # skip missing (NaN, NA) figures
            axis.scatter(float(nbytes), float(seconds), color=f"C{index % 10}", label=label)
            points.append((float(nbytes), float(seconds)))
    front = _pareto(points)
    if front:
        axis.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
    _bytes_axis(axis, "x")


def plot_checkpoint_pareto(frame: Any, plots: Path) -> list[str]:
    plt = _pyplot()
    train = frame[(frame["mode"] == "train") & (frame.status == "ok") & (frame.world_size == 1)
                  & ~frame.strategy.isin(registry.names(accumulates=True))]
    deepest = train[train.depth == train.depth.max()] if len(train) else train
    batch = deepest.batch_size.max() if len(deepest) else 0
    part = deepest[deepest.batch_size == batch]
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    _scatter_with_front(axis, [(row.label, row.saved_activation_bytes, row.step_time_median_s)
                               for row in part.itertuples()])
    axis.set_xlabel("retained activations (bytes, IEC)")
    axis.set_ylabel("step time, median (s)")
    model = part.model.iloc[0] if len(part) else ""
    axis.set_title(f"Checkpointing: memory against time ({model}, B={batch})")
    _legend(axis, fontsize=7)
    axis.grid(True, alpha=0.3)
    return _save(fig, plots, "checkpoint_pareto")


def plot_split(frame: Any, plots: Path) -> list[str]:
    plt = _pyplot()
    ok = frame[(frame["mode"] == "train") & (frame.status == "ok")]
    split = ok[(ok.world_size > 1) | ok.strategy.isin([*registry.names(accumulates=True), registry.PLAIN])]
    paths: list[str] = []
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    key = split[split.world_size > 1]
    if len(key):
        model, batch = key.model.iloc[0], key.batch_size.iloc[0]
    elif len(split):
        model, batch = split.model.iloc[0], split.batch_size.max()
    else:
        model, batch = "", 0
    part = split[(split.model == model) & (split.batch_size == batch)]
    labels = [f"{r.label} r{r.rank}" for r in part.itertuples()]
    positions = range(len(part))
    axis.bar(positions, part.peak_bytes.astype(float), color="C0", label="peak per device")
    axis.bar(positions, part.saved_activation_bytes.astype(float), color="C1", label="retained activations")
    axis.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=7)
    _bytes_axis(axis)
    axis.set_ylabel("bytes per device (IEC)")
    axis.set_xlabel("strategy and rank")
    axis.set_title(f"Per-device memory: splitting vs a smaller minibatch ({model}, global B={batch})")
    _legend(axis, fontsize=7)
    paths += _save(fig, plots, "split_memory")

    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    everything = ok[(ok.model == model) & (ok.batch_size == batch)]
    per_device = everything.groupby("label").agg(peak=("peak_bytes", "max"), time=("step_time_median_s", "max"))
    _scatter_with_front(axis, [(label, row.peak, row.time) for label, row in per_device.iterrows()])
    axis.set_xlabel("peak memory per device (bytes, IEC; largest rank)")
    axis.set_ylabel("step time, median (s; slowest rank)")
    axis.set_title(f"Every strategy: memory per device against time ({model}, B={batch})")
    _legend(axis, fontsize=6, ncol=2)
    axis.grid(True, alpha=0.3)
    return paths + _save(fig, plots, "pareto_all")


def plot_timeline(directory: Path, plots: Path) -> list[str]:
    import pandas as pd

    plt = _pyplot()
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    path = directory / "timelines.csv"
    if path.exists():
        from bpmem.results import TIMELINE_COLUMNS, ResultsFileError

        try:
            timeline = pd.read_csv(path, dtype={"strategy_params": str}).fillna({"strategy_params": ""})
            timeline["live_bytes"] = pd.to_numeric(timeline["live_bytes"])
            timeline = timeline[list(TIMELINE_COLUMNS)]
        except (ValueError, KeyError, pd.errors.ParserError) as error:
            raise ResultsFileError(f"{path}: not a timelines.csv ({str(error).splitlines()[0][:120]}); "
                                   f"allowed: the columns {', '.join(TIMELINE_COLUMNS)}") from None
        keep = registry.names(in_timeline_plot=True)
        for index, ((strategy, params), group) in enumerate(timeline.groupby(["strategy", "strategy_params"])):
            if strategy not in keep:
                continue
            label = _strategy_label(_Row(strategy, params))
            axis.plot(range(len(group)), group.live_bytes, color=f"C{index % 10}", linewidth=1, label=label)
    _bytes_axis(axis)
    axis.set_xlabel("event in the step (aten op or free), zero_grad -> forward -> backward -> optimizer")
    axis.set_ylabel("live tensor bytes (IEC)")
    axis.set_title("One training step, live memory: rising through forward, falling through backward")
    _legend(axis, fontsize=7)
    axis.grid(True, alpha=0.3)
    return _save(fig, plots, "timeline")


class _Row:
    def __init__(self, strategy: str, strategy_params: str) -> None:
        self.strategy, self.strategy_params = strategy, strategy_params


def plot_predicted_vs_measured(frame: Any, plots: Path) -> list[str]:
    """(f) How far each prediction is from its measurement, as a relative error, so that 0.01%
    and 50% are both visible (on a log-log plot of the two they sit on the same diagonal)."""
    plt = _pyplot()
    ok = frame[frame.status == "ok"]
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    for index, figure in enumerate(("saved_activation", "peak", "inference_peak", "params", "optimizer")):
        measured, predicted = ok[f"{figure}_bytes"], ok[f"predicted_{figure}_bytes"]
        mask = measured.notna() & predicted.notna() & (measured > 0)
        if mask.any():
            error = (predicted[mask].astype(float) - measured[mask].astype(float)) / measured[mask].astype(float) * 100
            exact = int((error == 0).sum())
            axis.scatter(measured[mask].astype(float), error, s=12, color=f"C{index}", marker="os^vD"[index],
                         label=f"{figure}_bytes: {exact} of {len(error)} exact, worst {error.abs().max():.3g}%")
    axis.axhline(0, color="k", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01%, logarithmic beyond
    _bytes_axis(axis, "x")
    axis.set_xlabel("measured (bytes, IEC)")
    axis.set_ylabel("(predicted - measured) / measured (%)")
    axis.set_title("Prediction error of every ok row (0 = exact to the byte)")
    _legend(axis, fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    return _save(fig, plots, "predicted_vs_measured")


def make_plots(directory: Path, frame: Any) -> dict[str, list[str]]:
    plots = directory / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return {
        "memory_vs_batch": plot_memory_vs_batch(frame, plots),
        "breakdown": plot_breakdown(frame, plots),
        "checkpoint_pareto": plot_checkpoint_pareto(frame, plots),
        "split": plot_split(frame, plots),
        "timeline": plot_timeline(directory, plots),
        "predicted_vs_measured": plot_predicted_vs_measured(frame, plots),
    }


def report(directory: str | Path) -> Path:
    """Draw the plots and write ``DIR/report.md``; returns the report's path."""
    from bpmem.report_text import write_markdown

    directory = Path(directory)
    frame = load(directory)
    plots = make_plots(directory, frame)
    path = directory / "report.md"
    path.write_text(write_markdown(frame, plots))
    return path
