"""Strategies on models of several inputs: a TransformerEncoder fed (tokens, padding mask), and
a recommender of five inputs whose flat EmbeddingBag indices do not hold the batch in
dimension 0. Before, checkpoint-selective failed on both with exit 3 (a tuple has no shape:
the meta batch assumed one input whose dimension 0 is the batch)."""

from __future__ import annotations

import pytest

from bpmem.figures import PREDICTED_FIGURES
from bpmem.measurement.cell import measure
from bpmem.models.mlp import meta_batch
from bpmem.models.user_model import UserModel
from bpmem.strategies.registry import make_step

FIXTURES = "tests.fixtures.user_models"
# in eval mode the padded encoder takes PyTorch's nested-tensor fast path, which the dry run
# runs dense and says so (NESTED_CAVEAT, tests/test_inference_mode.py): the train figures here
TRAIN_FIGURES = tuple(name for name in PREDICTED_FIGURES if name != "inference_peak_bytes")
ENCODER = UserModel(f"{FIXTURES}:padded_encoder", data=f"{FIXTURES}:padded_tokens", loss="mse")
RECOMMENDER = UserModel(f"{FIXTURES}:recommender", data=f"{FIXTURES}:recommender_batch", loss="mse")


def test_the_meta_batch_finds_which_dimensions_grow_with_the_batch() -> None:
    (tags, offsets, users, items, dense), target = meta_batch(RECOMMENDER, 7)
    assert tags.shape == (21,) and offsets.shape == (7,) and dense.shape == (7, 8) and target.shape == (7,)
    assert tags.device.type == "meta"


@pytest.mark.slow  # a real and a fake step of each
@pytest.mark.parametrize("workload", [ENCODER, RECOMMENDER], ids=["padding-mask", "embedding-bag"])
def test_selective_checkpointing_is_exact(workload: UserModel) -> None:
    step = make_step("checkpoint-selective", batch_size=4, optimizer="adam")
    real, fake = measure(workload, step), measure(workload, step, fake=True)
    assert {n: getattr(fake, n) for n in TRAIN_FIGURES} == {n: getattr(real, n) for n in TRAIN_FIGURES}
    assert fake.recompute_flops == real.recompute_flops
    if workload is RECOMMENDER:
        assert fake.inference_peak_bytes == real.inference_peak_bytes


@pytest.mark.slow
def test_microbatches_of_a_padding_mask_input_are_exact() -> None:
    step = make_step("microbatch", batch_size=4, optimizer="adam", microbatches=2)
    real, fake = measure(ENCODER, step), measure(ENCODER, step, fake=True)
    assert {n: getattr(fake, n) for n in TRAIN_FIGURES} == {n: getattr(real, n) for n in TRAIN_FIGURES}


def test_microbatches_refuse_an_input_whose_dimension_0_is_not_the_batch() -> None:
    step = make_step("microbatch", batch_size=4, optimizer="adam", microbatches=2)
    with pytest.raises(ValueError, match=r"^strategy: microbatch cuts every input and the target along dimension 0, "
                                         r"and one of shape \(12,\) does not hold the batch's 4 rows there"):
        measure(RECOMMENDER, step, fake=True)
