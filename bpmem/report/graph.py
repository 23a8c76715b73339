"""``bpmem graph``: the computational graph of the MLP as a plain SVG (no Graphviz), for the
chosen mode and strategy.

Boxes are tensors, circles are operators, arrows are the forward data flow. The chain folds
into rows of ``UNITS_PER_ROW`` layers, so a depth-64 model stays readable. Each tensor is
drawn by what backward does with it:

- red, dashed: kept for backward (its bytes at the batch size are in the label);
- grey, dotted: recomputed in backward (inside a checkpointed segment, or dropped by a
  selective policy), so not kept;
- white: made and freed in forward; grey fill: a parameter.

A checkpointed segment is shaded. With ``--mode hvp`` a second lane shows the backward graph
that ``create_graph=True`` keeps for the second differentiation. The caption's total is the
estimate's, which the tests hold equal to the probes on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from bpmem.analytic.rules import label_row_bytes
from bpmem.spec import MLPSpec, StepSpec
from bpmem.units import format_bytes

BOX_W, BOX_H, STEP_X, ROW_H, UNITS_PER_ROW = 112, 38, 128, 190, 4
UNIT_PITCH = STEP_X * 2.7 + BOX_W / 2 + 40  # one layer: mm, z, activation, h, and a gap
KEPT, RECOMPUTED, TRANSIENT = "kept", "recomputed", "transient"
STYLE = {KEPT: ("#c0392b", "#fdecea", ' stroke-dasharray="5,3"'), RECOMPUTED: ("#7f8c8d", "#f4f6f6",
                                                                               ' stroke-dasharray="2,3"'),
         TRANSIENT: ("#2c3e50", "#ffffff", "")}


@dataclass
class _Svg:
    parts: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0

    def box(self, x: float, y: float, label: str, note: str, state: str = TRANSIENT, param: bool = False) -> None:
        colour, fill, dash = STYLE[state]
        fill = "#ecf0f1" if param else fill
        self.parts.append(f'<rect x="{x - BOX_W / 2}" y="{y - BOX_H / 2}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                          f'fill="{fill}" stroke="{colour}" stroke-width="1.5"{dash}/>')
        self.text(x, y - 4, label, 12, bold=True)
        self.text(x, y + 11, note, 9, colour=colour)  # notes are kept short enough for the box
        self._grow(x + BOX_W, y + BOX_H)

    def op(self, x: float, y: float, label: str) -> None:
        self.parts.append(f'<circle cx="{x}" cy="{y}" r="16" fill="#fef9e7" stroke="#b7950b" stroke-width="1.5"/>')
        self.text(x, y + 4, label, 10)

    def fold(self, x1: float, y1: float, y_mid: float, x2: float, y2: float) -> None:
        """An edge from the end of one row to the start of the next: down, left, down, right."""
        self.parts.append(f'<polyline points="{x1},{y1} {x1},{y_mid} {x2},{y_mid} {x2},{y2} {x2 + 22},{y2}" '
                          'fill="none" stroke="#555" stroke-width="1.2" marker-end="url(#arrow)"/>')

    def shade(self, x0: float, y0: float, x1: float, y1: float, label: str) -> None:
        self.parts.insert(0, f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" rx="8" fill="#eef3fb" '
                             'stroke="#9db4d6" stroke-dasharray="6,4"/>')
        self.text((x0 + x1) / 2, y0 + 12, label, 9, colour="#34568b")

    def text(self, x: float, y: float, text: str, size: int, bold: bool = False, colour: str = "#2c3e50",
             anchor: str = "middle") -> None:
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}" fill="{colour}"'
                          f' font-family="sans-serif"{weight}>{escape(text)}</text>')

    def arrow(self, x1: float, y1: float, x2: float, y2: float) -> None:
        self.parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" stroke-width="1.2" '
                          'marker-end="url(#arrow)"/>')

    def _grow(self, x: float, y: float) -> None:
        self.width, self.height = max(self.width, int(x) + 20), max(self.height, int(y) + 20)

    def render(self, lines: list[str]) -> str:
        self.width = max(self.width, 640)
        height = self.height + 20 + 16 * len(lines)
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{height}" '
                f'viewBox="0 0 {self.width} {height}">'
                '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>'
                '<rect width="100%" height="100%" fill="white"/>')
        caption = "".join(f'<text x="12" y="{self.height + 18 + 16 * i}" font-size="11" font-family="sans-serif" '
                          f'fill="#2c3e50">{escape(line)}</text>' for i, line in enumerate(lines))
        return head + "".join(self.parts) + caption + "</svg>\n"


def tensor_states(spec: MLPSpec, step: StepSpec) -> dict[str, str]:
    """What backward does with each tensor of the chain (X, z1.., h1.., o) under the step's
    mode and strategy: ``kept``, ``recomputed`` or ``transient``."""
    depth, gelu = spec.depth, spec.activation == "gelu"
    states = {"X": KEPT, "o": KEPT if spec.loss == "mse" else TRANSIENT}
    for i in range(1, depth + 1):
        states[f"z{i}"] = KEPT if gelu else TRANSIENT  # GELU keeps its input; relu/tanh/sigmoid their output
        states[f"h{i}"] = KEPT  # the activation's output, and the next matmul's input
    if step.mode == "inference":
        return {name: TRANSIENT for name in states}
    plan = getattr(step.strategy, "plan", None)
    policy = getattr(step.strategy, "policy", None)  # a selective checkpoint's
    if plan is not None:
        for segment in plan(spec, step.batch_size):
            if not segment.checkpointed:
                continue
            for unit in range(segment.start, segment.end):  # its input stays, what it makes is remade
                states[f"z{unit + 1}" if unit < depth else "o"] = RECOMPUTED
                if unit < depth and unit + 1 < segment.end:
                    states[f"h{unit + 1}"] = RECOMPUTED
    elif policy is not None:
        for i in range(1, depth + 1):
            if policy == "save-matmuls":
                states[f"z{i}"], states[f"h{i}"] = KEPT, RECOMPUTED
            else:
                states[f"z{i}"] = RECOMPUTED if not gelu else KEPT
    return states


def segments_of(spec: MLPSpec, step: StepSpec) -> list[tuple[int, int]]:
    """(first unit, end unit) of every checkpointed segment of the step's plan."""
    plan = getattr(step.strategy, "plan", None)
    if plan is None or step.mode != "train":
        return []
    return [(s.start, s.end) for s in plan(spec, step.batch_size) if s.checkpointed]


def graph_svg(spec: MLPSpec, step: StepSpec) -> str:
    """The SVG text for ``spec`` under ``step`` (its batch size, mode and strategy)."""
    from bpmem.predict.estimate import estimate

    svg, s, b, depth = _Svg(), spec.itemsize, step.batch_size, spec.depth
    states = tensor_states(spec, step)
    dims = spec.layer_dims()
    positions: dict[int, tuple[float, float, float]] = {}  # unit -> (x of its mm, row y, x of its output)

    def place(unit: int) -> tuple[float, float]:
        row, column = divmod(unit, UNITS_PER_ROW)
        return 80 + column * UNIT_PITCH, 150 + row * ROW_H

    svg.box(60, 150, "X", _kept_note("X", states, b * spec.input_dim * s), states["X"])
    previous_x, previous_y = 60.0, 150.0
    for unit, (fan_in, fan_out) in enumerate(dims):
        x0, y = place(unit)
        mm_x = x0 + STEP_X * 0.55
        if y != previous_y:  # a new row: the edge folds down under the row above, then back to its start
            svg.fold(previous_x, previous_y + BOX_H / 2, previous_y + 50, mm_x - 40, y)
        else:
            svg.arrow(previous_x + BOX_W / 2, y, mm_x - 16, y)
        svg.op(mm_x, y, "mm" if not spec.bias else "mm+b")
        svg.box(mm_x, y - 70, f"W{unit + 1}" + (f", b{unit + 1}" if spec.bias else ""),
                f"{fan_out}x{fan_in}, {format_bytes(fan_in * fan_out * s)}", param=True)
        svg.arrow(mm_x, y - 70 + BOX_H / 2, mm_x, y - 16)
        last = unit == depth
        name = "o" if last else f"z{unit + 1}"
        z_x = mm_x + STEP_X * 0.75
        svg.box(z_x, y, name, _kept_note(name, states, b * fan_out * s), states[name])
        svg.arrow(mm_x + 16, y, z_x - BOX_W / 2, y)
        previous_x = z_x
        if not last:
            act_x = z_x + STEP_X * 0.7
            svg.op(act_x, y, spec.activation[:4])
            svg.arrow(z_x + BOX_W / 2, y, act_x - 16, y)
            h_x = act_x + STEP_X * 0.7
            svg.box(h_x, y, f"h{unit + 1}", _kept_note(f"h{unit + 1}", states, b * fan_out * s), states[f"h{unit + 1}"])
            svg.arrow(act_x + 16, y, h_x - BOX_W / 2, y)
            previous_x = h_x
        positions[unit] = (x0, y, previous_x)
        previous_y = y
    for number, (start, end) in enumerate(segments_of(spec, step), 1):
        for row_start in range(start, end):  # one shaded box per row the segment spans
            if row_start != start and row_start % UNITS_PER_ROW:
                continue
            row_end = min(end, (row_start // UNITS_PER_ROW + 1) * UNITS_PER_ROW)
            x0, y, _ = positions[row_start]
            svg.shade(x0 + 20, y - 105, positions[row_end - 1][2] + BOX_W / 2 + 6, y + 32,
                      f"segment {number}: recomputed in backward")
    loss_x, loss_y = previous_x + STEP_X * 0.8, previous_y
    svg.op(loss_x, loss_y, "loss")
    svg.arrow(previous_x + BOX_W / 2, loss_y, loss_x - 16, loss_y)
    training = step.mode != "inference"
    svg.box(loss_x, loss_y + 62, "y", f"kept {format_bytes(b * label_row_bytes(spec))}" if training else "labels",
            KEPT if training else TRANSIENT)
    svg.arrow(loss_x, loss_y + 62 - BOX_H / 2, loss_x, loss_y + 16)
    svg.box(loss_x + STEP_X, loss_y, "J", f"+ {spec.l2:g}/2 sum |W|^2" if spec.l2 else "the objective")
    svg.arrow(loss_x + 16, loss_y, loss_x + STEP_X - BOX_W / 2, loss_y)
    if step.mode == "hvp":
        _hvp_lane(svg, spec, step, loss_y + 130)
    est = estimate(spec, step)
    kept = est.saved_activation_bytes
    lines = [f"{spec.input_dim}-{spec.hidden_dim}x{depth}-{spec.output_dim}, {'bias, ' if spec.bias else ''}"
             f"{spec.activation}, {spec.loss}, {spec.dtype}, B={b}, --mode {step.mode}, --strategy "
             f"{step.strategy.name}.",
             f"Red dashed: kept for backward, {kept:,} B in all ({format_bytes(kept)}); grey dotted: recomputed in "
             "backward; white: freed in forward." if training else "Inference: nothing is kept for backward.",
             "The loss keeps the log-softmax output, the labels and total_weight (cross-entropy), or o and y (MSE)."]
    if est.recompute_flops:
        lines.append(f"Recomputation: {est.recompute_flops:,} matmul FLOPs more than the plain step.")
    return svg.render(lines)


def _kept_note(name: str, states: dict[str, str], nbytes: int) -> str:
    state = states.get(name, TRANSIENT)
    return {KEPT: f"kept {format_bytes(nbytes)}", RECOMPUTED: "recomputed"}.get(state, format_bytes(nbytes))


def _hvp_lane(svg: _Svg, spec: MLPSpec, step: StepSpec, y: float) -> None:
    """The backward graph that create_graph=True keeps: one gradient per layer, right to left."""
    svg.text(12, y - 40, "backward, kept for the second derivative (create_graph=True): each layer's gradient "
             "dJ/dz, right to left", 11, bold=True, anchor="start")
    s, b = spec.itemsize, step.batch_size
    dims = spec.layer_dims()
    for index, (unit, (_fan_in, fan_out)) in enumerate(reversed(list(enumerate(dims)))):
        row, column = divmod(index, UNITS_PER_ROW * 2)
        x, lane_y = 80 + column * STEP_X * 1.25, y + row * 90
        svg.box(x, lane_y, f"dJ/dz{unit + 1}" if unit < spec.depth else "dJ/do",
                f"kept {format_bytes(b * fan_out * s)}", KEPT)
        if column:
            svg.arrow(x - STEP_X * 1.25 + BOX_W / 2, lane_y, x - BOX_W / 2, lane_y)


def default_path(spec: MLPSpec, step: StepSpec) -> Path:
    """Where ``bpmem graph`` writes without ``--out``: reports/graphs/, named by the drawing."""
    name = f"mlp-d{spec.depth}-h{spec.hidden_dim}-{spec.activation}-{step.mode}-{step.strategy.name}-B{step.batch_size}"
    return Path("reports") / "graphs" / f"{name}.svg"


def write_graph(spec: MLPSpec, step: StepSpec, out: str | Path | None = None) -> Path:
    path = Path(out) if out is not None else default_path(spec, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(graph_svg(spec, step))
    return path
