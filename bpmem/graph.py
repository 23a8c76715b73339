"""``bpmem graph``: the computational graph of the MLP as a plain SVG (no Graphviz).

Boxes are variables, circles are operators, arrows are the forward data flow (left to
right, and up to the objective J). A box drawn red and dashed is a tensor autograd keeps
for backward; its label gives the bytes at the chosen batch size, from the same rules the
estimate uses (and the tests check against the probes). With ``--bias`` the graph is the
seed's exercise 2: a bias enters each pre-activation, adds parameters, and is saved by
nothing (its gradient is dJ/dz summed over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from bpmem.analytic.rules import label_row_bytes
from bpmem.spec import MLPSpec
from bpmem.units import format_bytes

BOX_W, BOX_H, STEP_X = 92, 34, 118


@dataclass
class _Svg:
    parts: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0

    def box(self, x: float, y: float, label: str, note: str = "", saved: bool = False, param: bool = False) -> None:
        colour = "#c0392b" if saved else ("#2c3e50" if not param else "#7f8c8d")
        dash = ' stroke-dasharray="5,3"' if saved else ""
        fill = "#fdecea" if saved else ("#ecf0f1" if param else "#ffffff")
        self.parts.append(f'<rect x="{x - BOX_W / 2}" y="{y - BOX_H / 2}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                          f'fill="{fill}" stroke="{colour}" stroke-width="1.5"{dash}/>')
        self.text(x, y - 2, label, 13, bold=True)
        if note:
            self.text(x, y + 12, note, 9, colour=colour)
        self._grow(x + BOX_W, y + BOX_H)

    def op(self, x: float, y: float, label: str) -> None:
        self.parts.append(f'<circle cx="{x}" cy="{y}" r="16" fill="#fef9e7" stroke="#b7950b" stroke-width="1.5"/>')
        self.text(x, y + 4, label, 11)

    def text(self, x: float, y: float, text: str, size: int, bold: bool = False, colour: str = "#2c3e50") -> None:
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="middle" fill="{colour}"'
                          f' font-family="sans-serif"{weight}>{escape(text)}</text>')

    def arrow(self, x1: float, y1: float, x2: float, y2: float) -> None:
        self.parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#555" stroke-width="1.2" '
                          'marker-end="url(#arrow)"/>')

    def _grow(self, x: float, y: float) -> None:
        self.width, self.height = max(self.width, int(x) + 20), max(self.height, int(y) + 20)

    def render(self, title: str, note: str = "") -> str:
        self.width = max(self.width, 8 * len(note) // 1, 7 * len(title))
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height + 46}" '
                f'viewBox="0 0 {self.width} {self.height + 46}">'
                '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
                'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>'
                '<rect width="100%" height="100%" fill="white"/>')
        caption = "".join(
            f'<text x="12" y="{self.height + 18 + 16 * i}" font-size="11" font-family="sans-serif" fill="#2c3e50">'
            f'{escape(line)}</text>' for i, line in enumerate(t for t in (title, note) if t))
        return head + "".join(self.parts) + caption + "</svg>\n"


def graph_svg(spec: MLPSpec, batch_size: int) -> str:
    """The SVG text for ``spec`` at ``batch_size`` rows."""
    svg, s, b = _Svg(), spec.itemsize, batch_size
    base_y, weight_y, top_y = 170, 80, 30
    dims = spec.layer_dims()
    x = 60.0
    gelu = spec.activation == "gelu"
    svg.box(x, base_y, "X", f"saved {format_bytes(b * spec.input_dim * s)}", saved=True)
    previous = x
    total_saved = b * spec.input_dim * s
    for index, (fan_in, fan_out) in enumerate(dims):
        last = index == len(dims) - 1
        op_x = previous + STEP_X * 0.6
        svg.op(op_x, base_y, "mm")
        svg.arrow(previous + BOX_W / 2, base_y, op_x - 16, base_y)
        svg.box(op_x, weight_y, f"W{index + 1}", f"{fan_out}x{fan_in}: {format_bytes(fan_in * fan_out * s)}",
                param=True)
        svg.arrow(op_x, weight_y + BOX_H / 2, op_x, base_y - 16)
        node_x = op_x + STEP_X * 0.6
        source_x = op_x + 16  # where the arrow into the pre-activation starts
        if spec.bias:
            plus_x = node_x
            svg.op(plus_x, base_y, "+b")
            svg.arrow(op_x + 16, base_y, plus_x - 16, base_y)
            svg.box(plus_x, top_y, f"b{index + 1}", f"{fan_out}: {format_bytes(fan_out * s)}", param=True)
            svg.arrow(plus_x, top_y + BOX_H / 2, plus_x, base_y - 16)
            node_x, source_x = plus_x + STEP_X * 0.6, plus_x + 16
        name = "o" if last else f"z{index + 1}"
        saved_z = (gelu and not last) or (last and spec.loss == "mse")
        note = f"saved {format_bytes(b * fan_out * s)}" if saved_z else f"{b}x{fan_out}"
        total_saved += b * fan_out * s if saved_z else 0
        svg.box(node_x, base_y, name, note, saved=saved_z)
        svg.arrow(source_x, base_y, node_x - BOX_W / 2, base_y)
        previous = node_x
        if not last:
            act_x = node_x + STEP_X * 0.6
            svg.op(act_x, base_y, spec.activation[:4])
            svg.arrow(node_x + BOX_W / 2, base_y, act_x - 16, base_y)
            h_x = act_x + STEP_X * 0.6
            svg.box(h_x, base_y, f"h{index + 1}", f"saved {format_bytes(b * fan_out * s)}", saved=True)
            total_saved += b * fan_out * s
            svg.arrow(act_x + 16, base_y, h_x - BOX_W / 2, base_y)
            previous = h_x
    q = spec.output_dim
    loss_x = previous + STEP_X * 0.7
    svg.op(loss_x, base_y, "l")
    svg.arrow(previous + BOX_W / 2, base_y, loss_x - 16, base_y)
    label_bytes = b * label_row_bytes(spec)
    svg.box(loss_x, base_y + 75, "y", f"saved {format_bytes(label_bytes)}", saved=True)
    svg.arrow(loss_x, base_y + 75 - BOX_H / 2, loss_x, base_y + 16)
    total_saved += label_bytes
    l_x = loss_x + STEP_X * 0.7
    internals = (b * q * s + s) if spec.loss == "cross_entropy" else 0
    svg.box(l_x, base_y, "L", f"saved {format_bytes(internals)}" if internals else spec.loss, saved=bool(internals))
    total_saved += internals
    svg.arrow(loss_x + 16, base_y, l_x - BOX_W / 2, base_y)
    s_op = l_x - STEP_X * 0.2
    svg.op(s_op, top_y + 10, "|W|²")
    svg.text(s_op - 40, top_y + 14, "all W", 10)
    svg.box(s_op + STEP_X, top_y + 10, "s", f"lambda={spec.l2:g}")
    svg.arrow(s_op + 16, top_y + 10, s_op + STEP_X - BOX_W / 2, top_y + 10)
    j_x = l_x + STEP_X * 1.1
    svg.op(j_x - STEP_X * 0.45, base_y, "+")
    svg.arrow(l_x + BOX_W / 2, base_y, j_x - STEP_X * 0.45 - 16, base_y)
    svg.arrow(s_op + STEP_X, top_y + 10 + BOX_H / 2, j_x - STEP_X * 0.45, base_y - 16)
    svg.box(j_x + 20, base_y, "J", "objective")
    svg.arrow(j_x - STEP_X * 0.45 + 16, base_y, j_x + 20 - BOX_W / 2, base_y)
    title = (f"{spec.input_dim}-{spec.hidden_dim}x{spec.depth}-{spec.output_dim}, "
             f"{'bias' if spec.bias else 'no bias'}, {spec.activation}, {spec.loss}, {spec.dtype}, B={b}. "
             f"Red dashed: saved for backward, {total_saved:,} B in all.")
    note = ("L saves the log-softmax output and total_weight (cross-entropy); s = lambda/2 sum |W|² saves only "
            "the weights, which are parameters.")
    return svg.render(title, note)


def write_graph(spec: MLPSpec, batch_size: int, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(graph_svg(spec, batch_size))
    return path
