"""The Llama-style example (``bpmem/models/llama.py``): its parts do what Llama's do, its 1B
shape has Llama 3.2 1B's parameter count, and the estimate equals the CPU measurement."""

from __future__ import annotations

import pytest
import torch

from bpmem.figures import PREDICTED_FIGURES
from bpmem.measurement.cell import measure
from bpmem.models.llama import apply_rope, make_llama, make_llama_1b, rope_tables
from bpmem.models.user_model import UserModel
from bpmem.strategies.registry import make_step

LLAMA = UserModel("bpmem.models.llama:make_llama", kwargs_json='{"layers": 2}', data="bpmem.models.llama:make_batch",
                  blocks_path="layers")


def test_the_1b_shape_has_llama_3_2_1b_parameters() -> None:
    with torch.device("meta"):
        model = make_llama_1b()
    # embedding 128,256 x 2048 (tied with the head) + 16 layers of 60,821,504 + the final norm's 2048
    assert sum(p.numel() for p in model.parameters()) == 128_256 * 2048 + 16 * 60_821_504 + 2048 == 1_235_814_400


def test_rope_rotates_pairs_and_keeps_their_length() -> None:
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope_tables(5, 8)
    rotated = apply_rope(x, cos, sin)
    pairs = lambda t: t.unflatten(-1, (4, 2)).norm(dim=-1)  # noqa: E731 - each (even, odd) pair's length
    assert torch.allclose(pairs(rotated), pairs(x), atol=1e-5)
    assert torch.equal(rotated[:, :, 0], x[:, :, 0])  # position 0 turns by no angle


def test_grouped_query_attention_shares_each_key_head() -> None:
    model = make_llama(width=64, heads=8, kv_heads=2, layers=1)
    attention = model.layers[0].attn
    assert attention.kv.out_features == 2 * 2 * 8  # k and v, 2 heads of width 8: a quarter of the query's
    assert model(torch.randint(0, 256, (2, 7))).shape == (2, 7, 256)


@pytest.mark.slow  # two real and two fake steps of a small decoder: several seconds
@pytest.mark.parametrize("strategy,mode", [("none", "train"), ("none", "inference"), ("checkpoint-layer", "train")])
def test_the_estimate_equals_the_measurement(strategy: str, mode: str) -> None:
    step = make_step(strategy, batch_size=3, mode=mode, optimizer="adamw")
    real, fake = measure(LLAMA, step), measure(LLAMA, step, fake=True)
    assert {n: getattr(fake, n) for n in PREDICTED_FIGURES} == {n: getattr(real, n) for n in PREDICTED_FIGURES}
    assert fake.recompute_flops == real.recompute_flops and fake.caveats == []
