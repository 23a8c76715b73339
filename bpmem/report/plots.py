"""The report's plots, each answering one question named in its title, with the cell it shows
(model, batch, device, and why that cell). The numbers come from ``bpmem.report.plot_data``; this
module only draws them (matplotlib's Agg backend, PNG and SVG into ``DIR/plots/``).

(a) ``memory_vs_batch``: how retained activations and the training peak grow with the batch;
(b) ``breakdown``: what fills memory at the training peak, beside the inference peak;
(c) ``checkpoint_pareto``: what each checkpointing strategy saves and costs in time;
(d) ``split_memory`` / ``pareto_all``: splitting against a smaller minibatch, per device;
(e) ``timeline``: live memory through one step, phases shaded, strategies aligned by phase;
(f) ``predicted_vs_measured``: how far each prediction is from its measurement.

Byte axes tick at multiples of powers of two, labelled in IEC units.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bpmem.report.plot_data import (
    CATEGORY_NAMES,
    PHASE_WIDTHS,
    breakdown,
    pick_cell_where_strategies_differ,
    power_of_two_ticks,
    timeline_layout,
)
from bpmem.strategies import registry
from bpmem.units import format_bytes

FIGURE_SIZE = (9.0, 5.5)
PHASE_COLOURS = {"zero_grad": "0.92", "forward": "#e8f0fb", "backward": "#fbeee6", "optimizer_step": "#eaf6ea"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _iec(value: float, _: Any = None) -> str:
    return format_bytes(value) if value > 0 else "0"


def bytes_axis(axis: Any, which: str = "y") -> None:
    """IEC labels; on a linear axis, ticks at multiples of a power of two."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

    target = axis.yaxis if which == "y" else axis.xaxis
    scale = axis.get_yscale() if which == "y" else axis.get_xscale()
    if scale == "linear":
        low, high = axis.get_ylim() if which == "y" else axis.get_xlim()
        target.set_major_locator(FixedLocator(power_of_two_ticks(max(low, 0.0), high)))
    elif scale == "log" and any(len(line.get_xdata()) for line in axis.lines):  # an empty one has no range
        target.set_major_locator(LogLocator(base=2, numticks=12))
    target.set_major_formatter(FuncFormatter(_iec))


def legend(axis: Any, **kwargs: Any) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(**kwargs)
    else:
        axis.text(0.5, 0.5, "no rows of this kind in this run", transform=axis.transAxes, ha="center")


def save(fig: Any, plots: Path, name: str) -> list[str]:
    fig.tight_layout()
    paths = []
    for suffix in ("png", "svg"):
        fig.savefig(plots / f"{name}.{suffix}", dpi=110)
        paths.append(f"plots/{name}.{suffix}")
    pyplot().close(fig)
    return paths


MARKERS = "osD^v<>pPX*h"


def plot_memory_vs_batch(frame: Any, plots: Path) -> list[str]:
    """(a) Per model: retained activations (left) and the training peak (right) against the
    batch, measured as lines, predicted as open black markers drawn over them."""
    plt = pyplot()
    train = frame[(frame["mode"] == "train") & (frame.status == "ok") & (frame.world_size == 1)]
    models = sorted(train.model.unique()) or [""]
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.6 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        part = train[train.model == model]
        device = ", ".join(sorted(part.device.unique()))
        for axis, column, what, question in (
                (row_axes[0], "saved_activation_bytes", "retained activations", "How do retained activations grow"),
                (row_axes[1], "peak_bytes", "training peak", "How does the training peak grow")):
            for index, (label, group) in enumerate(part.groupby("label", sort=True)):
                group = group.sort_values("batch_size")
                colour, marker = f"C{index % 10}", MARKERS[index % len(MARKERS)]
                axis.plot(group.batch_size, group[column].astype(float), "-", marker=marker, color=colour,
                          markersize=4, linewidth=1.2, alpha=0.8, label=label)
                axis.plot(group.batch_size, group[f"predicted_{column}"].astype(float), linestyle="none",
                          marker="o", markersize=9, markerfacecolor="none", markeredgecolor="k",
                          markeredgewidth=0.7, zorder=5, label="_nolegend_")
            axis.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="k",
                      label="predicted (open circles)")
            if len(part):  # an empty log axis cannot be drawn
                axis.set_xscale("log", base=2)
                axis.set_yscale("log", base=2)
            bytes_axis(axis)
            axis.set_xlabel("batch size (rows)")
            axis.set_ylabel(f"{what} (bytes, IEC)")
            axis.set_title(f"{question} with the batch?\n{model} on {device}", fontsize=10)
            axis.grid(True, which="both", alpha=0.3)
        legend(row_axes[1], fontsize=7)
    return save(fig, plots, "memory_vs_batch")


def plot_breakdown(frame: Any, plots: Path) -> list[str]:
    """(b) The training step's bytes at its peak by category (the bar's height is the row's
    ``peak_bytes``), beside the inference forward's at its peak (hatched)."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    data = breakdown(frame)
    if data is None:
        legend(axis)
        return save(fig, plots, "breakdown")
    width, positions = 0.38, range(len(data.batches))
    colours = {category: f"C{index % 10}" for index, category in enumerate(CATEGORY_NAMES)}
    for offset, stacks, hatch, mode in ((-width / 2, data.train, "", "training"),
                                        (width / 2, data.inference, "//", "inference")):
        bottom = [0.0] * len(data.batches)
        for category, values in stacks.items():
            axis.bar([p + offset for p in positions], values, width, bottom=bottom, hatch=hatch, edgecolor="white",
                     color=colours.get(category, "0.5"), label=f"{CATEGORY_NAMES.get(category, category)} ({mode})")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axis.set_xticks(list(positions), [str(b) for b in data.batches])
    bytes_axis(axis)
    axis.set_xlabel("batch size (rows): training at its peak (left) beside inference at its peak (right, hatched)")
    axis.set_ylabel("live bytes at the peak (IEC)")
    axis.set_title(f"What fills memory at the peak, training against inference?\n{data.cell.model} on "
                   f"{data.cell.device}, the plain step", fontsize=10)
    legend(axis, fontsize=6, ncol=2)
    return save(fig, plots, "breakdown")


def _time_scatter(axis: Any, items: list[tuple[str, float, float, float, bool]]) -> None:
    """One point per (label, bytes, median s, IQR s, noisy) with its IQR as an error bar
    (hollow where the time is noisy), and the Pareto front through the points."""
    points = []
    for index, (label, nbytes, seconds, iqr, noisy) in enumerate(items):
        if any(_missing(v) for v in (nbytes, seconds)):
            continue
        colour = f"C{index % 10}"
        axis.errorbar(float(nbytes), float(seconds), yerr=(0.0 if _missing(iqr) else float(iqr)) / 2, fmt="o",
                      color=colour, markerfacecolor="none" if noisy else colour, capsize=3,
                      label=label + (" (time noisy)" if noisy else ""))
        points.append((float(nbytes), float(seconds)))
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    if front:
        axis.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")


def _finish_time_axes(axis: Any, xlabel: str, ylabel: str, question: str, cell: Any, ncol: int = 1) -> None:
    """Bytes across from zero, seconds up, the question and the cell in the title."""
    axis.set_xlim(left=0)
    bytes_axis(axis, "x")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(f"{question}\n" + (cell.title() if cell else "no cell with two strategies"), fontsize=10)
    legend(axis, fontsize=7 if ncol == 1 else 6, ncol=ncol)
    axis.grid(True, alpha=0.3)


def _missing(value: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def plot_checkpoint_pareto(frame: Any, plots: Path) -> list[str]:
    """(c) Retained bytes against step time for the checkpointing strategies, at the cell
    where they differ most; error bars are the IQR of the repeats."""
    plt = pyplot()
    single = frame[(frame.world_size == 1) & ~frame.strategy.isin(registry.names(accumulates=True))]
    cell = pick_cell_where_strategies_differ(single)
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    if cell is not None:
        part = single[(single.model == cell.model) & (single.batch_size == cell.batch_size)
                      & (single.device == cell.device) & (single["mode"] == "train") & (single.status == "ok")]
        _time_scatter(axis, [(r.label, r.saved_activation_bytes, r.step_time_median_s, r.step_time_iqr_s,
                              r.time_noisy is True or r.time_contended is True) for r in part.itertuples()])
    _finish_time_axes(axis, "retained activations (bytes, IEC)", "step time, median (s); bars: IQR of the repeats",
                      "What does each checkpointing strategy save, and what does it cost in time?", cell)
    return save(fig, plots, "checkpoint_pareto")


def plot_split(frame: Any, plots: Path) -> list[str]:
    """(d) Per-device peak and retained bytes of each split strategy's ranks against plain
    and micro-batching, and every strategy's largest per-device peak against step time."""
    plt = pyplot()
    ok = frame[(frame["mode"] == "train") & (frame.status == "ok")]
    split = ok[(ok.world_size > 1) | ok.strategy.isin([*registry.names(accumulates=True), registry.PLAIN])]
    with_ranks = split[split.strategy.isin(split[split.world_size > 1].strategy.unique()) | (split.world_size == 1)]
    cell = pick_cell_where_strategies_differ(with_ranks[with_ranks.peak_bytes.notna()], "peak_bytes")
    paths: list[str] = []
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    part = split.iloc[0:0]
    if cell is not None:
        part = split[(split.model == cell.model) & (split.batch_size == cell.batch_size)]
    labels = [f"{r.label} r{r.rank}" for r in part.itertuples()]
    positions = list(range(len(part)))
    axis.bar(positions, part.peak_bytes.astype(float), color="C0", label="peak per device")
    axis.bar(positions, part.saved_activation_bytes.astype(float), color="C1", width=0.5,
             label="retained activations")
    axis.set_xticks(positions, labels, rotation=30, ha="right", fontsize=7)
    bytes_axis(axis)
    axis.set_ylabel("bytes per device (IEC)")
    axis.set_xlabel("strategy and rank")
    axis.set_title("Does splitting the model save more per device than a smaller minibatch?\n"
                   + (cell.title() if cell else "no split rows"), fontsize=10)
    legend(axis, fontsize=7)
    paths += save(fig, plots, "split_memory")

    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    cell = pick_cell_where_strategies_differ(ok[ok.peak_bytes.notna()], "peak_bytes")  # among every strategy
    if cell is not None:
        everything = ok[(ok.model == cell.model) & (ok.batch_size == cell.batch_size)]
        per = everything.groupby("label").agg(peak=("peak_bytes", "max"), time=("step_time_median_s", "max"),
                                              iqr=("step_time_iqr_s", "max"), noisy=("time_noisy", "any"),
                                              contended=("time_contended", lambda s: any(v is True for v in s)))
        _time_scatter(axis, [(label, r.peak, r.time, r.iqr, bool(r.noisy) or bool(r.contended))
                             for label, r in per.iterrows()])
    _finish_time_axes(axis, "peak memory per device (bytes, IEC; the largest rank)",
                      "step time, median (s; the slowest rank); bars: IQR",
                      "Which strategy gives the least memory per device for its time?", cell, ncol=2)
    return paths + save(fig, plots, "pareto_all")


def plot_timeline(timeline: Any, frame: Any, plots: Path) -> list[str]:
    """(e) Live bytes through one training step per strategy, each phase on a fixed stretch
    of the x axis (shaded), so the strategies' phases line up. Strategies that run several
    forward and backward passes (micro-batches) get a panel of their own below, shaded by
    their own phases."""
    plt = pyplot()
    curves: dict[int, list[tuple[str, Any, Any]]] = {}  # number of phase runs -> (label, layout, bytes)
    title = "How does live memory rise and fall through one training step?"
    if timeline is not None and len(timeline):
        keep = registry.names(in_timeline_plot=True)
        for cell_id, group in timeline.groupby("cell_id", sort=True):
            if group.strategy.iloc[0] not in keep:
                continue
            layout = timeline_layout(list(group.phase))
            rows = frame[frame.cell_id == cell_id]
            label = rows.label.iloc[0] if len(rows) else group.strategy.iloc[0]
            curves.setdefault(len(layout.spans), []).append((label, layout, group.live_bytes.astype(float)))
        cells = frame[frame.cell_id.isin(timeline.cell_id.unique())]
        if len(cells):
            first = cells.iloc[0]
            title += f"\n{first.model}, B={first.batch_size}, {first.device}"
    panels = sorted(curves) or [0]
    fig, axes = plt.subplots(len(panels), 1, figsize=(FIGURE_SIZE[0], 4.2 * len(panels) + 0.8), squeeze=False)
    styles = ["-", "--", "-.", ":"]
    index = 0
    for axis, runs in zip(axes[:, 0], panels, strict=True):
        spans: list[tuple[str, float, float]] = []
        for label, layout, live in curves.get(runs, []):
            spans = layout.spans
            axis.plot(layout.x, live, styles[index % len(styles)], color=f"C{index % 10}", linewidth=1.3, label=label)
            index += 1
        named: set[str] = set()
        for phase, start, end in spans:
            axis.axvspan(start, end, color=PHASE_COLOURS.get(phase, "0.95"), zorder=0)
            if phase not in named or runs > 4:  # micro-batches: every stretch named
                named.add(phase)
                axis.text((start + end) / 2, 1.0, phase.replace("_", " ").replace("optimizer step", "optimizer"),
                          transform=axis.get_xaxis_transform(), ha="center", va="bottom", fontsize=6)
        axis.set_ylim(bottom=0)
        bytes_axis(axis)
        axis.set_xticks([])
        axis.set_ylabel("live tensor bytes (IEC)")
        legend(axis, fontsize=7)
        axis.grid(True, axis="y", alpha=0.3)
    axes[-1, 0].set_xlabel("the step: each phase stretched to a fixed width (" + ", ".join(
        f"{p.replace('_', ' ')} {w:g}" for p, w in PHASE_WIDTHS.items()) + ")", fontsize=8)
    axes[0, 0].set_title(title, fontsize=10, pad=16)
    return save(fig, plots, "timeline")


def plot_predicted_vs_measured(frame: Any, plots: Path) -> list[str]:
    """(f) How far each prediction is from its measurement, as a relative error, so that 0.01%
    and 50% are both visible (on a log-log plot of the two they sit on the same diagonal)."""
    plt = pyplot()
    ok = frame[frame.status == "ok"]
    fig, axis = plt.subplots(figsize=FIGURE_SIZE)
    figures = ("saved_activation", "peak", "inference_peak", "params", "optimizer", "allocator_peak")
    for index, figure in enumerate(figures):
        if f"{figure}_bytes" not in ok or f"predicted_{figure}_bytes" not in ok:
            continue
        measured, predicted = ok[f"{figure}_bytes"], ok[f"predicted_{figure}_bytes"]
        mask = measured.notna() & predicted.notna() & (measured > 0)
        if mask.any():
            error = (predicted[mask].astype(float) - measured[mask].astype(float)) / measured[mask].astype(float) * 100
            exact = int((error == 0).sum())
            axis.scatter(measured[mask].astype(float), error, s=12, color=f"C{index}", marker="os^vDP"[index],
                         label=f"{figure}_bytes: {exact} of {len(error)} exact, worst {error.abs().max():.3g}%")
    axis.axhline(0, color="k", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_yscale("symlog", linthresh=0.01)  # linear within +-0.01%, logarithmic beyond
    bytes_axis(axis, "x")
    axis.set_xlabel("measured (bytes, IEC)")
    axis.set_ylabel("(predicted - measured) / measured (%)")
    devices = ", ".join(sorted(ok.device.unique())) if len(ok) else ""
    axis.set_title(f"How far is each prediction from its measurement? (every ok row, {devices}; 0 = exact to "
                   "the byte)", fontsize=10)
    legend(axis, fontsize=7)
    axis.grid(True, which="both", alpha=0.3)
    return save(fig, plots, "predicted_vs_measured")
