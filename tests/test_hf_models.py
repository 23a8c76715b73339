"""Hugging Face transformers models, raw (no wrapper), built from small configs: a dict of
keyword inputs, a ``ModelOutput`` whose loss or logits bpmem takes, and checkpointing over the
decoder layers bpmem finds itself. The estimate (fake tensors) equals the CPU measurement."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from bpmem.figures import PREDICTED_FIGURES  # noqa: E402 - after the skip
from bpmem.measurement.cell import measure  # noqa: E402
from bpmem.models.user_model import UserModel  # noqa: E402
from bpmem.strategies.registry import make_step  # noqa: E402

HF = "tests.fixtures.hf_models"
MODELS = {
    "gpt2": UserModel(f"{HF}:gpt2", data=f"{HF}:causal_batch", loss="none"),
    "llama": UserModel(f"{HF}:llama", data=f"{HF}:causal_batch", loss="none"),
    "bert": UserModel(f"{HF}:bert", data=f"{HF}:masked_batch", loss="none"),
    "vit": UserModel(f"{HF}:vit", data=f"{HF}:image_batch"),
    "t5": UserModel(f"{HF}:t5", data=f"{HF}:seq2seq_batch", loss="none"),
}


def _exact(workload: UserModel, strategy: str, batch_size: int) -> tuple[object, object]:
    step = make_step(strategy, batch_size=batch_size, optimizer="adamw")
    real, fake = measure(workload, step), measure(workload, step, fake=True)
    assert {n: getattr(fake, n) for n in PREDICTED_FIGURES} == {n: getattr(real, n) for n in PREDICTED_FIGURES}
    assert fake.recompute_flops == real.recompute_flops
    return real, fake


@pytest.mark.slow  # two real and two fake steps of each model: a few seconds each
@pytest.mark.parametrize("name", list(MODELS))
def test_a_raw_model_is_estimated_exactly_at_two_batch_sizes(name: str) -> None:
    peaks = [_exact(MODELS[name], "none", batch_size)[0].peak_bytes for batch_size in (2, 5)]
    assert peaks[0] < peaks[1]


@pytest.mark.slow
@pytest.mark.parametrize("name,strategy", [("llama", "checkpoint-layer"), ("llama", "checkpoint-sqrt"),
                                           ("bert", "checkpoint-layer"), ("gpt2", "checkpoint-layer"),
                                           ("vit", "checkpoint-layer")])
def test_checkpointing_the_layers_bpmem_finds(name: str, strategy: str) -> None:
    plain = measure(MODELS[name], make_step(batch_size=4, optimizer="adamw"))
    real, _ = _exact(MODELS[name], strategy, 4)
    assert real.saved_activation_bytes < plain.saved_activation_bytes
    paths = {"llama": "model.layers", "bert": "bert.encoder.layer", "gpt2": "transformer.h", "vit": "vit.layers"}
    assert real.strategy_params["blocks"] == paths[name]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["checkpoint-selective", "microbatch"])
def test_strategies_on_keyword_inputs_with_a_padding_mask(strategy: str) -> None:
    plain = measure(MODELS["bert"], make_step(batch_size=4, optimizer="adamw"))
    real, _ = _exact(MODELS["bert"], strategy, 4)
    assert real.saved_activation_bytes < plain.saved_activation_bytes


@pytest.mark.slow
def test_a_model_that_checkpoints_itself_is_measured_as_it_is_and_a_chain_strategy_says_so() -> None:
    workload = UserModel(f"{HF}:llama_checkpointed", data=f"{HF}:causal_batch", loss="none")
    with pytest.raises(ValueError, match=r"^strategy: checkpoint-layer on a model that checkpoints its layers "
                                         r"already .*allowed: --strategy none"):
        measure(workload, make_step("checkpoint-layer", batch_size=2, optimizer="adamw"), fake=True)
    own = measure(workload, make_step(batch_size=2, optimizer="adamw"), fake=True)
    plain = measure(MODELS["llama"], make_step(batch_size=2, optimizer="adamw"), fake=True)
    assert own.saved_activation_bytes < plain.saved_activation_bytes  # HF's checkpointing, as it runs


@pytest.mark.slow
def test_a_segment_whose_later_blocks_take_other_arguments_is_refused_in_one_line() -> None:
    t5 = UserModel(f"{HF}:t5_four_layers", data=f"{HF}:seq2seq_batch", loss="none")
    with pytest.raises(ValueError, match=r"^blocks: a later block of a segment takes other arguments than its first "
                                         r".*allowed: checkpoint-layer \(one block per segment\), or "
                                         r"checkpoint-selective$"):
        measure(t5, make_step("checkpoint-sqrt", batch_size=2, optimizer="adamw"), fake=True)


@pytest.mark.slow
def test_a_keyword_flag_beside_the_tensors_is_passed_as_it_is() -> None:
    flagged = UserModel(f"{HF}:gpt2", data=f"{HF}:causal_batch_without_cache", loss="none")
    inputs, target = flagged.make_batch(2)
    assert inputs["use_cache"] is False and target is None
    step = make_step(batch_size=2, optimizer="adamw")
    assert measure(flagged, step, fake=True).peak_bytes == measure(MODELS["gpt2"], step, fake=True).peak_bytes
