"""The words of ``report.md``: every figure in it is read from results.csv."""

from __future__ import annotations

from typing import Any

from bpmem.strategies import registry
from bpmem.strategies.base import DEVICES
from bpmem.units import format_bytes

SEED = {"input_dim": 784, "hidden_dim": 256, "output_dim": 10, "depth": 1}


def _b(value: Any) -> str:
    """Bytes as 'N B (x MiB)'; '—' when missing."""
    import pandas as pd

    if value is None or pd.isna(value):  # None, NaN, and pandas' NA of an Int64 column
        return "—"
    return f"{int(value):,} B ({format_bytes(int(value))})"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pick_seed(frame: Any) -> Any:
    """The seed network's plain training rows (or the smallest model's), batch nearest 64."""
    plain = frame[(frame.strategy == registry.PLAIN) & (frame.status == "ok")]
    seed = plain
    for key, value in SEED.items():
        seed = seed[seed[key] == value]
    if not len(seed):
        seed = plain[plain.depth == plain.depth.min()] if len(plain) else plain
    if not len(seed):
        return None, None
    batch = min(seed.batch_size.unique(), key=lambda b: (abs(b - 64), b))
    seed = seed[seed.batch_size == batch]
    train = seed[seed["mode"] == "train"]
    return (train.iloc[0] if len(train) else None), seed


def environment_section(frame: Any) -> str:
    first = frame.iloc[0]
    rows = [[key, str(first[key]) or "—"] for key in ("run_id", "timestamp", "bpmem_version", "torch_version",
                                                      "python_version", "device_name", "cuda_version", "git_commit",
                                                      "hostname") if key in frame]
    devices = ", ".join(sorted(frame.device.unique()))
    return "## Environment\n\n" + _table(["", ""], rows + [["devices", devices], ["rows", len(frame)]])


def status_section(frame: Any) -> str:
    counts = frame.status.value_counts().to_dict()
    text = "## Status\n\n" + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ".\n"
    failed = frame[frame.status != "ok"]
    if len(failed):
        rows = [[r.cell_id, r.rank, r.status, (r.error or "")[:160].replace("|", "/")] for r in failed.itertuples()]
        text += "\nRows without a measurement:\n\n" + _table(["cell", "rank", "status", "why"], rows)
    return text


# what exercise 5 says of a step whose overhead the report does not state
UNSTATED_STEP = {"within noise": "a step whose extra time is within noise",
                 "contended": "a step timed while other work held the cores (contended: no time stated)",
                 "not paired": "a step not timed in pairs with the plain one (no time stated)"}


def _verdict(row: Any) -> Any:
    """What the report may say about a row's time overhead (``bpmem.measurement.timing_pairs.judge``)."""
    from bpmem.measurement.timing_pairs import judge

    return judge(row.time_overhead, row.time_overhead_low, row.time_overhead_high, row.time_contended)


def _time_text(stated: list[float], unstated: dict[str, int]) -> str:
    """A strategy's time overhead over its cells: the median of the stated ones, with how many
    cells were within noise, contended or not paired; no number where none was stated."""
    counts = [f"{n} {kind}" for kind, n in unstated.items() if n]
    if stated:
        return (f"{stated[len(stated) // 2]:+,.0%} (median of {len(stated)} cell{'s' * (len(stated) > 1)}"
                + "".join(f"; {count}" for count in counts) + ")")
    total = sum(unstated.values())
    if not total:
        return "—"
    kind = max(unstated, key=lambda k: unstated[k])  # the commonest reason leads
    rest = [f"; {n} {other}" for other, n in unstated.items() if n and other != kind]
    return f"{kind} ({unstated[kind]} of {total} cells" + "".join(rest) + ")"


def summary_section(frame: Any) -> str:
    """Per strategy: how much less it retains than the plain step of the same cell (median
    over every cell that has both), and how much longer its step takes: the median of the
    paired overheads over the cells that state one (``bpmem.measurement.timing_pairs.judge``)."""
    train = frame[(frame["mode"] == "train") & (frame.status == "ok")]
    keys = ["model", "batch_size", "device", "optimizer", "dtype", "activation", "loss"]
    plain = train[train.strategy == registry.PLAIN].set_index(keys)
    rows = []
    for label, group in train.groupby("label", sort=True):
        ratios: list[float] = []
        overheads: list[float] = []
        unstated = {"within noise": 0, "contended": 0, "not paired": 0}
        for row in group.itertuples():
            key = tuple(getattr(row, k) for k in keys)
            if key in plain.index:
                base = plain.loc[key]
                base = base.iloc[0] if hasattr(base, "iloc") and getattr(base, "ndim", 1) > 1 else base
                if row.saved_activation_bytes:
                    ratios.append(base.saved_activation_bytes / row.saved_activation_bytes)
            if row.strategy == registry.PLAIN:
                continue  # a paired overhead needs no plain row: it was timed against its own twin
            verdict = _verdict(row)
            if verdict.kind == "stated":
                overheads.append(verdict.overhead)
            else:
                unstated[verdict.kind] += 1
        if not ratios:
            continue
        ratios.sort()
        overheads.sort()
        time_text = "(the reference)" if label == registry.PLAIN else _time_text(overheads, unstated)
        rows.append([label, len(ratios), f"{ratios[len(ratios) // 2]:.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f})",
                     time_text])
    return ("## Summary per strategy\n\nMemory saved is the plain step's retained activations over the strategy's, "
            "in the same cell (per rank for split strategies). Time overhead: each cell times the strategy's step "
            "in pairs with the plain step of the same model, batch and optimizer, in one process (plain, strategy, "
            "plain, ...), and takes the median of the per-pair ratios, minus one, with its 95% interval from order "
            "statistics. A cell states it only when that interval excludes zero and its steps did not wait for "
            "cores; the table gives the median over those cells. The others are counted: within noise (the "
            "interval includes zero, or too few pairs for one), contended (another process held the cores: more "
            "than a quarter of its timed steps got under half their wall time in CPU time, or other processes "
            "kept more than a quarter of a core busy beyond the cores this one left free), not paired (split "
            "strategies, files written before pairing).\n\n"
            + _table(["strategy", "cells", "memory saved (x)", "time overhead"], rows))


def seed_section(frame: Any) -> str:
    train, seed = _pick_seed(frame)
    if train is None:
        return "## The seed's worked example\n\nNo plain training row in this run."
    inference = seed[seed["mode"] == "inference"]
    inference_peak = inference.peak_bytes.iloc[0] if len(inference) else train.inference_peak_bytes
    rows = [
        ["params", _b(train.params_bytes), _b(train.predicted_params_bytes)],
        ["grads", _b(train.grads_bytes), _b(train.predicted_grads_bytes)],
        ["optimizer", _b(train.optimizer_bytes), _b(train.predicted_optimizer_bytes)],
        ["saved activations", _b(train.saved_activation_bytes), _b(train.predicted_saved_activation_bytes)],
        ["training peak", _b(train.peak_bytes), _b(train.predicted_peak_bytes)],
        ["inference peak", _b(inference_peak), _b(train.predicted_inference_peak_bytes)],
    ]
    ratio = train.peak_bytes / inference_peak
    shape = f"{train['input_dim']}-{train['hidden_dim']}-{train['output_dim']}"
    setting = f"{train['activation']}, {train['loss']}, {train['dtype']}, {train['optimizer']}, B={train['batch_size']}"
    return (f"## The seed's worked example\n\n{train['model']} ({shape}), {setting}:\n\n"
            + _table(["term", "measured", "predicted"], rows)
            + f"\n\nTraining needs **{ratio:.2f}x** the memory of inference.")


def exercises_section(frame: Any) -> str:
    train, _ = _pick_seed(frame)
    parts = ["## The seed's exercises, answered by this run"]
    if train is not None:
        b, d, h, q = train.batch_size, train.input_dim, train.hidden_dim, train.output_dim
        parts.append(
            f"**1. Gradients of a batched input.** With X of shape ({b}, {d}): dJ/dW1 is ({h}, {d}) and dJ/dW2 is "
            f"({q}, {h}), the shapes of the weights, because the batch is summed over in dJ/do^T h; dJ/do is "
            f"({b}, {q}), dJ/dh and dJ/dz are ({b}, {h}).")
    ok = frame[(frame.status == "ok") & (frame["mode"] == "train") & (frame.strategy == registry.PLAIN)]
    with_bias, without = ok[ok.bias], ok[~ok.bias]
    if len(with_bias) and len(without):
        a, z = with_bias.iloc[0], without[(without.depth == with_bias.iloc[0].depth)]
        if len(z):
            z = z.iloc[0]
            parts.append(f"**2. A bias.** z = W x + b, dJ/db = dJ/dz summed over the batch. Measured: the bias adds "
                         f"{_b(a.params_bytes - z.params_bytes)} of parameters at depth {a.depth}, and the same "
                         "again in gradients; it saves no activation.")
    else:
        parts.append("**2. A bias.** z = W x + b and dJ/db = dJ/dz summed over the batch. This run has no bias "
                     "rows to measure it (`--bias`); it adds (out) parameters per layer and saves no activation.")
    if train is not None:
        parts.append(f"**3. The memory footprint.** See the worked example above: {_b(train.peak_bytes)} to train, "
                     f"of which {_b(train.saved_activation_bytes)} are activations kept for backward. "
                     "The breakdown plot shows how it grows with the batch." + _two_ways_to_regularise(ok))
    hvp = frame[(frame["mode"] == "hvp") & (frame.status == "ok")]
    if len(hvp) and len(ok):
        row = hvp.iloc[(hvp.batch_size - 64).abs().argsort().iloc[0]]
        base = ok[(ok.model == row.model) & (ok.batch_size == row.batch_size)]
        if len(base):
            base = base.iloc[0]
            parts.append(f"**4. Second derivatives.** The first backward, run with create_graph=True, becomes a "
                         f"graph itself; it keeps everything the forward saved plus the upstream gradients the "
                         f"second backward differentiates. For {row.model} at B={row.batch_size}: "
                         f"{_b(row.saved_activation_bytes)} retained against {_b(base.saved_activation_bytes)} "
                         f"for one backward ({row.saved_activation_bytes / base.saved_activation_bytes:.2f}x); "
                         f"peak {_b(row.peak_bytes)} against {_b(base.peak_bytes)}. Worth it for Hessian-vector "
                         "products; never for the full Hessian.")
    else:
        parts.append("**4. Second derivatives.** This run has no `hvp` rows (add `modes = [\"hvp\"]`).")
    parts.append(_exercise_five(frame))
    return "\n\n".join(parts)


def _two_ways_to_regularise(ok: Any) -> str:
    """The l2 term in the loss against weight decay in the optimizer, on rows that differ in
    nothing else (``benchmarks/configs/steps.toml`` has them); empty where the run has none."""
    if "weight_decay" not in ok or "l2" not in ok:
        return ""
    same = ["model", "model_kwargs", "depth", "input_dim", "hidden_dim", "output_dim", "batch_size", "optimizer",
            "optimizer_impl", "amp", "dtype", "activation", "loss", "bias"]
    same = [c for c in same if c in ok]
    in_loss = ok[(ok.l2 > 0) & (ok.weight_decay == 0)]
    in_optimizer = ok[(ok.l2 == 0) & (ok.weight_decay > 0)]
    pairs = in_loss.merge(in_optimizer, on=same, suffixes=("_loss", "_opt"))
    if pairs.empty:
        return ""
    row = pairs.iloc[0]
    gap = row.peak_bytes_loss - row.peak_bytes_opt
    return (f" Regularising costs memory where the term is built: on {row.model}, "
            f"B={row.batch_size}, {row.optimizer} ({row.optimizer_impl}), the l2 term in the loss "
            f"(lambda = {row.l2_loss:g}) peaks at {_b(row.peak_bytes_loss)}, weight decay in the optimizer "
            f"({row.weight_decay_opt:g}) at {_b(row.peak_bytes_opt)}: {_b(abs(gap))} "
            f"{'more' if gap > 0 else 'less'} for the term, whose backward makes W^1, 2W and a second "
            "gradient of each weight, where the optimizer adds at most one gradient-sized copy.")


def _exercise_five(frame: Any) -> str:
    ok = frame[(frame.status == "ok") & (frame["mode"] == "train")]
    split = ok[ok.world_size > 1]
    micro = ok[ok.strategy.isin(registry.names(accumulates=True))]
    text = ("**5. Too big for one GPU.** Splitting the graph over devices shares out the parameters, gradients "
            "and optimizer state as well as the activations, but pays in communication and a pipeline bubble; "
            "a smaller minibatch (gradient accumulation) shrinks only the activations, costs more steps, "
            "and needs no second device.")
    if len(split):
        model, batch = split.model.iloc[0], split.batch_size.iloc[0]
        rows = []
        for row in ok[(ok.model == model) & (ok.batch_size == batch)].itertuples():
            bubble = f"{row.bubble_fraction:.2f}" if row.bubble_fraction == row.bubble_fraction else "—"
            rows.append([row.label, row.rank, _b(row.peak_bytes), _b(row.saved_activation_bytes),
                         f"{row.step_time_median_s * 1000:.1f} ms", bubble])
        text += (f" Measured for {model}, global B={batch}:\n\n"
                 + _table(["strategy", "rank", "peak per device", "retained", "step time", "bubble"], rows))
        shared = split[split.strategy.isin(registry.names(DEVICES)) & (split.device == "cpu")]
        if len(shared):
            text += ("\n\nOn the CPU, `model-parallel` puts every stage on the one CPU device: its rows give what "
                     "each device would hold (parameters, gradients, optimizer state, retained activations), "
                     "and the peak is the one device's, on rank 0's row; the step is the plain one, so its time "
                     "differs from `none` by noise only.")
    elif len(micro):
        row = micro.iloc[(micro.batch_size - 64).abs().argsort().iloc[0]]
        base = ok[(ok.strategy == registry.PLAIN) & (ok.model == row.model) & (ok.batch_size == row.batch_size)]
        if len(base):
            base = base.iloc[0]
            verdict = _verdict(row)
            cost = (f"a step {1 + verdict.overhead:.2f}x as long (timed in pairs with the plain step)"
                    if verdict.kind == "stated" else UNSTATED_STEP[verdict.kind])
            text += (f" Here, {row.label} at B={row.batch_size} ({row.model}) retains "
                     f"{_b(row.saved_activation_bytes)} against {_b(base.saved_activation_bytes)}, with {cost}. "
                     "This run has no split rows: `bpmem run --config benchmarks/configs/split.toml` measures them.")
    return text


def plots_section(plots: dict[str, list[str]]) -> str:
    captions = {
        "memory_vs_batch": "(a) How retained activations and the training peak grow with the batch: measured "
                           "lines, predictions as open circles.",
        "breakdown": "(b) What fills memory at the training peak (bars stack to the row's peak_bytes), beside the "
                     "inference peak.",
        "checkpoint_pareto": "(c) What each checkpointing strategy saves and costs in time, at the cell where they "
                             "differ most; bars are the IQR, hollow points have noisy or contended times.",
        "split": "(d) Splitting against a smaller minibatch per device, and every strategy's memory per device "
                 "against time.",
        "timeline": "(e) Live memory through one training step, phases shaded and aligned across strategies.",
        "predicted_vs_measured": "(f) The relative error of every prediction (0 = exact to the byte), the "
                                 "allocator's peak among them (its kernels' scratch calibrated by real steps).",
    }
    lines = ["## Plots"]
    for key, paths in plots.items():
        lines.append(captions[key])
        lines += [f"![{key}]({path})" for path in paths if path.endswith(".png")]
    return "\n\n".join(lines)


def write_markdown(frame: Any, plots: dict[str, list[str]]) -> str:
    title = f"# bpmem report: {frame.run_id.iloc[0]}\n\nData: [results.csv](results.csv)."
    from bpmem.report.explain import explanations_section
    from bpmem.report.models import models_section

    sections = [title, environment_section(frame), status_section(frame), summary_section(frame),
                explanations_section(frame), seed_section(frame), exercises_section(frame), models_section(frame),
                plots_section(plots)]
    return "\n\n".join(section for section in sections if section) + "\n"
