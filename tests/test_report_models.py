"""The report's section on user models, and the GPT example's layer against Korthikanti et al. 2022:
the term-by-term derivation, made from shapes, equals what the saved-tensor probe measured."""

from __future__ import annotations

import inspect
import shutil
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

from bpmem.measurement.cell import measure
from bpmem.models import gpt
from bpmem.report import models as report_models
from bpmem.report.build import load
from bpmem.report.models import (
    _b,
    gpt_comparison,
    gpt_layer_shape,
    gpt_workload,
    korthikanti_bytes,
    layer_terms,
    measured_layer_bytes,
    models_section,
)
from bpmem.report.text import _b as report_bytes
from bpmem.report.text import write_markdown
from bpmem.spec import StepSpec

FIXTURES = Path(__file__).parent / "fixtures"
KWARGS = '{"layers": 2, "context": 64}'
DEFAULTS = {name: p.default for name, p in inspect.signature(gpt.make_gpt).parameters.items()}


@pytest.mark.parametrize(("batch", "context"), [(2, 64), (4, 64), (3, 32)])
def test_the_derived_terms_add_up_to_what_one_block_saved(batch: int, context: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpt, "CONTEXT", context)  # the data function's T; the kwargs' context only sizes positions
    shape = gpt_layer_shape(batch, KWARGS)
    h, a = DEFAULTS["width"], DEFAULTS["heads"]
    assert (shape.s, shape.b, shape.h, shape.a, shape.ffn, shape.element) == (context, batch, h, a, 4 * h, 4)
    measured = measure(gpt_workload(KWARGS), StepSpec(batch_size=batch), fake=False).per_layer
    derived = sum(term.kept_bytes for term in layer_terms(shape))
    assert measured_layer_bytes(measured) == derived
    assert measured_layer_bytes(measured, "blocks.1.") == derived  # every block keeps the same
    # in closed form, fp32: the 16·sbh activations, 2·2 LayerNorm statistics of (b, s), the (b, a, s) logsumexp
    s, b = context, batch
    assert derived == 4 * (16 * s * b * h + 4 * s * b + a * s * b)


def test_the_fake_step_measures_the_same_layer() -> None:
    comparison = gpt_comparison(2, KWARGS, fake=True)
    assert comparison.measured == comparison.derived


@pytest.mark.parametrize(("s", "b", "h", "a"), [(64, 2, 128, 4), (2048, 1, 12288, 96), (32, 3, 64, 2)])
def test_the_published_formula_and_its_terms(s: int, b: int, h: int, a: int) -> None:
    assert korthikanti_bytes(s, b, h, a) == s * b * h * (34 + Fraction(5 * a * s, h))
    # 4-byte activations, the masks (2sbh + as²b of the 34sbh + 5as²b) still one byte
    assert korthikanti_bytes(s, b, h, a, 4) == s * b * h * (66 + Fraction(9 * a * s, h))
    shape = report_models.LayerShape(s=s, b=b, h=h, a=a, ffn=4 * h, element=4, accumulate=4)
    terms = layer_terms(shape)
    assert sum(t.paper_16 for t in terms) == korthikanti_bytes(s, b, h, a, 2)
    assert sum(t.paper_32 for t in terms) == korthikanti_bytes(s, b, h, a, 4)


@pytest.fixture(scope="module")
def gpt_frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    folder = tmp_path_factory.mktemp("gpt-report")
    shutil.copy(FIXTURES / "user_model_results.csv", folder / "results.csv")
    return load(folder)


@pytest.fixture(scope="module")
def section(gpt_frame: pd.DataFrame) -> str:
    return models_section(gpt_frame)


def test_the_table_reads_every_row_from_the_csv(gpt_frame: pd.DataFrame, section: str) -> None:
    assert section.startswith("## Your own models")
    assert all(_b(n) == report_bytes(n) for n in (0, 1023, 1_052_672, pd.NA))  # the rest of the report's units
    for model in gpt_frame.model.unique():
        assert f"### {model}" in section
    for _, row in gpt_frame.iterrows():
        same = all(row[f"predicted_{n}_bytes"] == row[f"{n}_bytes"] for n in report_models.COMPARED)
        line = (f"| {row.batch_size} | {row.label} | {row['mode']} | {_b(row.saved_activation_bytes)} | "
                f"{_b(row.peak_bytes)} | {'yes' if same else 'no'}")
        assert line in section


def test_the_comparison_is_rendered_for_the_gpt_example(gpt_frame: pd.DataFrame, section: str) -> None:
    rows = gpt_frame[gpt_frame.model_source == report_models.GPT_FACTORY]
    batch, kwargs = int(rows.batch_size.min()), rows.model_kwargs.iloc[0]
    shape = gpt_layer_shape(batch, kwargs)
    terms = layer_terms(shape)
    assert f"B={batch}) against Korthikanti et al. 2022" in section
    assert f"s={shape.s}, b={shape.b}, h={shape.h}, a={shape.a}" in section
    for published in (korthikanti_bytes(shape.s, shape.b, shape.h, shape.a, n) for n in (2, 4)):
        assert _b(published) in section
    assert f"bpmem measured {_b(sum(t.kept_bytes for t in terms))} saved under `blocks.0.`" in section
    assert "equal to the byte" in section
    for term in terms:
        assert f"| {term.paper} | {_b(term.paper_16)} | {_b(term.paper_32)} | {term.kept} | {_b(term.kept_bytes)} |" \
            in section


def test_a_differing_prediction_and_a_failed_row_are_said(gpt_frame: pd.DataFrame,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    frame = gpt_frame.copy()
    frame.loc[frame.index[0], "predicted_peak_bytes"] = frame.peak_bytes.iloc[0] + 8
    frame.loc[frame.index[1], "status"] = "oom"

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(report_models, "gpt_comparison", broken)
    text = models_section(frame)
    assert "| no: peak +8 B |" in text
    assert "1 more rows have no measurement" in text
    assert "Not drawn: the step could not run here (RuntimeError: no kernel here)" in text


def test_the_report_has_the_section_only_for_user_models(gpt_frame: pd.DataFrame, section: str,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_models, "gpt_comparison", lambda *a, **k: pytest.fail("the MLP has no GPT layer"))
    shutil.copy(FIXTURES / "results.csv", tmp_path / "results.csv")
    mlp = load(tmp_path)
    assert models_section(mlp) == ""
    assert "## Your own models" not in write_markdown(mlp, {})
    monkeypatch.setattr(report_models, "models_section", lambda frame: section)
    text = write_markdown(gpt_frame, {})
    assert section in text and text.index("## Your own models") < text.index("## Plots")
