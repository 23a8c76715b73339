"""The report's "why" for each strategy: one sentence of cause per strategy, with its numbers,
at the MLP cell where the strategies differ most.

The measured bytes come from the row; the cause from the strategy (``StrategyConfig.why``)
and the arithmetic (``bpmem.predict.estimate``, torch-free): what the plain step keeps term by term.
The arithmetic's retained bytes equal the measured ones to the byte on the CPU, so the
sentence's numbers and the row's agree.
"""

from __future__ import annotations

import json
from typing import Any

from bpmem.report.plot_data import pick_cell_where_strategies_differ
from bpmem.strategies import registry
from bpmem.units import format_bytes


def _spec_and_step(row: Any) -> tuple[Any, Any]:
    from bpmem.spec import MLPSpec
    from bpmem.strategies.registry import make_step

    spec = MLPSpec(input_dim=int(row.input_dim), hidden_dim=int(row.hidden_dim), output_dim=int(row.output_dim),
                   depth=int(row.depth), bias=bool(row.bias), activation=str(row.activation), loss=str(row.loss),
                   dtype=str(row.dtype), l2=float(row.l2))
    params = json.loads(row.strategy_params) if isinstance(row.strategy_params, str) and row.strategy_params else {}
    from bpmem.strategies.registry import parameters

    params = {k: v for k, v in params.items() if k in parameters(row.strategy)}
    step = make_step(str(row.strategy), batch_size=int(row.batch_size), optimizer=str(row.optimizer), mode="train",
                     weight_decay=float(row.weight_decay), **params)
    return spec, step


def explanations_section(frame: Any) -> str:
    """## Why each strategy saves what it saves: one sentence per strategy, at one cell."""
    mlp = frame[(frame.model_source.isin(["", "mlp"])) & (frame.world_size == 1) & (frame.amp == "none")]
    cell = pick_cell_where_strategies_differ(mlp)
    if cell is None:
        return ""
    from bpmem.predict.estimate import estimate

    rows = mlp[(mlp.model == cell.model) & (mlp.batch_size == cell.batch_size) & (mlp.device == cell.device)
               & (mlp["mode"] == "train") & (mlp.status == "ok")]
    plain_rows = rows[rows.strategy == registry.PLAIN]
    if plain_rows.empty:
        return ""
    plain_row = next(plain_rows.itertuples())
    spec, plain_step = _spec_and_step(plain_row)
    plain_terms = {term.name: term.bytes for term in estimate(spec, plain_step).terms}
    plain = int(plain_row.saved_activation_bytes)
    lines = [f"## Why each strategy saves what it saves\n\nAt {cell.title()}: the plain step keeps "
             f"{format_bytes(plain)} ({plain:,} B) of activations for backward and peaks at "
             f"{format_bytes(int(plain_row.peak_bytes))}.\n"]
    for row in rows[rows.strategy != registry.PLAIN].sort_values("label").itertuples():
        kept = int(row.saved_activation_bytes)
        change = "the same" if kept == plain else (f"{format_bytes(plain - kept)} less" if kept < plain
                                                   else f"{format_bytes(kept - plain)} more")
        spec_row, step_row = _spec_and_step(row)
        recompute = (f"; it recomputes {int(row.recompute_flops):,} FLOPs" if row.recompute_flops == row.recompute_flops
                     and int(row.recompute_flops) > 0 else "")
        lines.append(f"- **{row.label}** keeps {format_bytes(kept)} ({kept:,} B), {change}: "
                     f"{step_row.strategy.why(spec_row, plain_terms, kept, plain)}; its peak is "
                     f"{format_bytes(int(row.peak_bytes))}{recompute}.")
    return "\n".join(lines) + "\n"
