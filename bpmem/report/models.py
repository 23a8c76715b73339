"""The report's section on your own models, and the GPT example's layer against the published estimate.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.1) count what one transformer layer keeps for backward as ``s*b*h*(34 + 5*a*s/h)``
bytes: 16-bit activations, 1-byte dropout masks, dropout after the softmax, the attention
projection and the MLP, and the (a, s, s) score and softmax matrices materialised. The GPT
example (``bpmem/models/gpt.py``) keeps fp32 activations, has no dropout, and on the CPU runs
causal ``scaled_dot_product_attention`` through a flash kernel that keeps q, k, v, its output
and a log-sum-exp, never an s x s matrix. ``layer_terms`` sets the two side by side, term by
term, each GPT entry derived from the shapes and from what each op saves for backward
(PyTorch's derivatives.yaml): a linear keeps its input, layer_norm its input, mean and rstd,
gelu its input, the flash kernel q, k, v, out and logsumexp, a residual add nothing.
``gpt_comparison`` measures one step and sums what ``blocks.0`` saved beside them.

Every figure of the section's tables is read from results.csv; the comparison alone comes from
a step run when the report is drawn, on fake tensors (no data, no memory) with the CPU's kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

GPT_FACTORY = "bpmem.models.gpt:make_gpt"
GPT_DATA = "bpmem.models.gpt:make_batch"
# the figures results.csv holds both measured and predicted, in the order the match column names them
COMPARED = ("saved_activation", "peak", "inference_peak", "params", "grads", "optimizer")


@dataclass(frozen=True)
class LayerShape:
    """One GPT layer's sizes: s sequence, b batch, h width, a heads, ffn the MLP's hidden width,
    ``element`` the activations' bytes, ``accumulate`` the bytes of the fp32 (or wider)
    statistics that layer_norm and the flash kernel keep."""

    s: int
    b: int
    h: int
    a: int
    ffn: int
    element: int
    accumulate: int


@dataclass(frozen=True)
class Term:
    """One line of the comparison: the paper's term, its bytes with 16-bit and with 4-byte
    activations (masks stay one byte), and what the GPT example keeps in its place."""

    paper: str
    paper_16: int
    paper_32: int
    kept: str
    kept_bytes: int


@dataclass(frozen=True)
class Comparison:
    shape: LayerShape
    terms: list[Term]
    measured: int  # what bpmem's saved-tensor probe attributed to blocks.0, one step

    @property
    def derived(self) -> int:
        return sum(term.kept_bytes for term in self.terms)

    @property
    def published_16(self) -> int:
        return korthikanti_bytes(self.shape.s, self.shape.b, self.shape.h, self.shape.a, 2)

    @property
    def published_32(self) -> int:
        return korthikanti_bytes(self.shape.s, self.shape.b, self.shape.h, self.shape.a, 4)


def korthikanti_bytes(s: int, b: int, h: int, a: int, activation_bytes: int = 2) -> int:
    """The paper's bytes per layer. Of its ``34*s*b*h + 5*a*s*s*b`` at 16 bits, ``2*s*b*h +
    a*s*s*b`` are one-byte dropout masks and the rest 16 activations of (s, b, h) and two of
    (a, s, s, b) at two bytes; ``activation_bytes`` sets the latter's width."""
    sbh, scores = s * b * h, a * s * s * b
    return (16 * sbh + 2 * scores) * activation_bytes + (2 * sbh + scores)


def gpt_workload(model_kwargs: str = "{}") -> Any:
    from bpmem.models.user_model import UserModel

    return UserModel(GPT_FACTORY, kwargs_json=model_kwargs or "{}", data=GPT_DATA, blocks_path="blocks")


def gpt_layer_shape(batch_size: int, model_kwargs: str = "{}") -> LayerShape:
    """The sizes of the GPT example's first block, read off the model (built on the meta
    device: no memory) and a batch from its data function (which sets s, not the kwargs)."""
    import torch

    from bpmem.models.user_model import load_callable

    workload = gpt_workload(model_kwargs)
    with torch.device("meta"):
        model = load_callable(GPT_FACTORY, "--model")(**json.loads(model_kwargs or "{}"))
    block = model.blocks[0]
    tokens, _ = workload.make_batch(batch_size, "cpu")
    dtype = block.ln1.weight.dtype
    element = torch.empty((), dtype=dtype, device="meta").element_size()
    return LayerShape(s=tokens.shape[1], b=tokens.shape[0], h=block.ln1.normalized_shape[0], a=block.attn.heads,
                      ffn=block.mlp[0].out_features, element=element, accumulate=max(element, 4))


def layer_terms(shape: LayerShape) -> list[Term]:
    """The paper's terms, in its order, each beside what the GPT example keeps for it."""
    s, b, h, a, p, q = shape.s, shape.b, shape.h, shape.a, shape.element, shape.accumulate

    def kept(*dims: int, size: int = p) -> int:
        return math.prod(dims) * size

    def paper(name: str, activations: int, masks: int, what: str, nbytes: int) -> Term:
        return Term(name, activations * 2 + masks, activations * 4 + masks, what, nbytes)

    sbh, scores = s * b * h, a * s * s * b
    return [
        paper("LayerNorm 1: its input (2sbh)", sbh, 0, "ln1's input x, (b, s, h)", kept(b, s, h)),
        paper("QKV linear: its input (2sbh)", sbh, 0, "qkv's input, ln1's output, (b, s, h)", kept(b, s, h)),
        paper("QKᵀ: Q and K (4sbh)", 2 * sbh, 0, "q and k, kept by the flash kernel: two thirds of qkv's "
              "output (b, s, 3h), whose views they are", kept(b, s, 2 * h)),
        paper("softmax output (2as²b)", scores, 0, "nothing: the flash kernel never makes the (a, s, s) "
              "matrix", 0),
        paper("softmax dropout mask (as²b)", 0, scores, "nothing: no dropout", 0),
        paper("attention over V: dropped-out softmax (2as²b)", scores, 0, "nothing: no dropout, no (a, s, s) "
              "matrix", 0),
        paper("attention over V: V (2sbh)", sbh, 0, "v, kept by the flash kernel: the last third of qkv's "
              "output", kept(b, s, h)),
        paper("output projection: its input (2sbh)", sbh, 0, "the flash kernel's output, (b, a, s, h/a), kept "
              "by the kernel; proj's input is a view of it, so proj adds nothing", kept(b, a, s, h // a)),
        paper("output projection: dropout mask (sbh)", 0, sbh, "nothing: no dropout", 0),
        paper("LayerNorm 2: its input (2sbh)", sbh, 0, "ln2's input, the residual sum, (b, s, h)", kept(b, s, h)),
        paper("MLP first linear: its input (2sbh)", sbh, 0, "mlp.0's input, ln2's output, (b, s, h)",
              kept(b, s, h)),
        paper("GELU: its input (8sbh)", 4 * sbh, 0, f"GELU's input, mlp.0's output, (b, s, {shape.ffn})",
              kept(b, s, shape.ffn)),
        paper("MLP second linear: its input (8sbh)", 4 * sbh, 0, f"mlp.2's input, GELU's output, "
              f"(b, s, {shape.ffn})", kept(b, s, shape.ffn)),
        paper("MLP dropout mask (sbh)", 0, sbh, "nothing: no dropout", 0),
        paper("not counted: LayerNorm statistics", 0, 0, "ln1's and ln2's mean and rstd, (b, s, 1) each",
              4 * kept(b, s, 1, size=q)),
        paper("not counted: the softmax's normaliser", 0, 0, "the flash kernel's logsumexp, (b, a, s), fp32",
              kept(b, a, s, size=q)),
        paper("residual adds (nothing)", 0, 0, "nothing: an add's backward needs no tensor", 0),
    ]


def measured_layer_bytes(per_layer: list[dict[str, Any]], prefix: str = "blocks.0.") -> int:
    """What the saved-tensor probe attributed to the modules under ``prefix``."""
    return sum(entry["saved_bytes"] for entry in per_layer if entry["name"].startswith(prefix))


def gpt_comparison(batch_size: int, model_kwargs: str = "{}", fake: bool = True) -> Comparison:
    """Measure one plain training step of the GPT example (on fake tensors by default) and set
    blocks.0's saved bytes beside the paper's terms at the same s, b, h, a."""
    from bpmem.measurement.cell import measure
    from bpmem.spec import StepSpec

    shape = gpt_layer_shape(batch_size, model_kwargs)
    measured = measure(gpt_workload(model_kwargs), StepSpec(batch_size=batch_size), fake=fake)
    return Comparison(shape, layer_terms(shape), measured_layer_bytes(measured.per_layer))


# -- the report's words (report_text imports this module, so its helpers are not imported back) -----

def _b(value: Any) -> str:
    """Bytes as 'N B (x MiB)', as the rest of the report writes them; '—' when missing."""
    import pandas as pd

    from bpmem.units import format_bytes

    if value is None or pd.isna(value):
        return "—"
    return f"{int(value):,} B ({format_bytes(int(value))})"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _sources(frame: Any) -> Any:
    """The factory of each row (``report.load`` relabels ``model``, keeping it in ``model_source``)."""
    return frame["model_source"] if "model_source" in frame else frame["model"]


def _match(row: Any) -> str:
    import pandas as pd

    differences, compared = [], 0
    for name in COMPARED:
        measured, predicted = row.get(f"{name}_bytes"), row.get(f"predicted_{name}_bytes")
        if measured is None or predicted is None or pd.isna(measured) or pd.isna(predicted):
            continue
        compared += 1
        if int(predicted) != int(measured):
            differences.append(f"{name} {int(predicted) - int(measured):+,} B")
    if not compared:
        return "—"
    return "yes" if not differences else "no: " + ", ".join(differences)


def models_table(rows: Any) -> str:
    ok = rows[rows.status == "ok"].sort_values(["batch_size", "label", "mode"], kind="stable")
    lines = [[int(r["batch_size"]), r["label"], r["mode"], _b(r["saved_activation_bytes"]), _b(r["peak_bytes"]),
              _match(r)] for _, r in ok.iterrows()]
    text = _table(["batch size", "strategy", "mode", "saved activations", "peak", "predicted = measured"], lines)
    failed = len(rows) - len(ok)
    return text + (f"\n\n{failed} more rows have no measurement; the status section lists them." if failed else "")


def comparison_text(comparison: Comparison) -> str:
    c, shape = comparison, comparison.shape
    sbh_bytes = shape.s * shape.b * shape.h * shape.element
    elements = sum(t.kept_bytes for t in c.terms if not t.paper.startswith("not counted")) / sbh_bytes
    rows = [[t.paper, _b(t.paper_16), _b(t.paper_32), t.kept, _b(t.kept_bytes)] for t in c.terms]
    rows.append(["**one layer**", _b(c.published_16), _b(c.published_32), "**derived from the shapes**",
                 _b(c.derived)])
    agree = ("equal to the byte" if c.derived == c.measured
             else f"which differs from the derivation by {c.measured - c.derived:+,} B")
    return (f"At s={shape.s}, b={shape.b}, h={shape.h}, a={shape.a} (MLP width {shape.ffn}), the paper's "
            f"`s·b·h·(34 + 5·a·s/h)` gives {_b(c.published_16)} per layer with 16-bit activations, and "
            f"{_b(c.published_32)} with 4-byte activations and one-byte masks (`s·b·h·(66 + 9·a·s/h)`). "
            f"bpmem measured {_b(c.measured)} saved under `blocks.0.` in one training step (fake tensors, "
            f"the CPU's kernels, run when this report was drawn), {agree}.\n\n"
            + _table(["the paper's term", "paper, 16-bit", "paper, 4-byte activations", "the GPT example keeps",
                     "bytes"], rows)
            + f"\n\nThe example keeps {elements:g}·sbh activation elements at {shape.element} bytes each, where "
              "the paper keeps 16·sbh at 2 (plus its s² terms): the flash kernel's q, k, v and output stand where "
              "the paper has Q, K, V and the projection's input. What the example does not keep is every s² term "
              "(the kernel recomputes the scores in backward) and every dropout mask; what it adds are the "
              "LayerNorms' mean and rstd and the kernel's logsumexp, each linear in s. So the paper's estimate "
              "grows with s², and the example's only with s.")


def models_section(frame: Any) -> str:
    """Markdown for the rows of user models; "" when the run has none."""
    sources = _sources(frame)
    user = frame[~sources.isin(["", "mlp"])]
    if not len(user):
        return ""
    parts = ["## Your own models\n\nPer model, every measured row: saved activations and peak as measured, and "
             "whether each figure the step on fake tensors predicted (" + ", ".join(COMPARED)
             + ") equals the measurement to the byte."]
    for model, rows in user.groupby("model", sort=True):
        parts.append(f"### {model}\n\n" + models_table(rows))
    gpt = user[(_sources(user) == GPT_FACTORY) & (user.status == "ok")]
    for kwargs, rows in gpt.groupby("model_kwargs", sort=True):
        batch = int(rows.batch_size.min())
        title = f"### One GPT layer ({rows.model.iloc[0]}, B={batch}) against Korthikanti et al. 2022"
        try:
            parts.append(f"{title}\n\n" + comparison_text(gpt_comparison(batch, kwargs)))
        except Exception as error:  # noqa: BLE001 - the report still stands without the comparison
            parts.append(f"{title}\n\nNot drawn: the step could not run here ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:160] if str(error) else ''}).")
    return "\n\n".join(parts)
