"""How long ``bpmem fit`` takes at a 1B shape, against one ``bpmem estimate`` of the same model
(the target: all strategies together in at most 8 estimates' time). The model is Llama 3.2
1B's shape (``bpmem.models.llama:make_llama_1b``: 16 layers, width 2048, 2048 tokens,
vocabulary 128,256), bfloat16 autocast, fused AdamW, a 40 GiB budget on the CPU; the answer
of each strategy is checked against the estimate at B and B + 1. Nothing is asserted on time:
the ratio is in the benchmark's extra_info and printed.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_fit_speed.py -s --benchmark-columns=min
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

LLAMA_1B = ["--model", "bpmem.models.llama:make_llama_1b", "--input", "int64[B,2048]<128256", "--target",
            "int64[B,2048]<128256", "--blocks", "layers", "--amp", "bfloat16", "--optimizer", "adamw",
            "--weight-decay", "0.01", "--optimizer-impl", "fused"]


def _bpmem(*argv: str) -> tuple[dict, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "bpmem", *argv, "--json"], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout), time.monotonic() - start


def test_fit_at_the_1b_shape_costs_a_few_estimates(benchmark) -> None:
    answer, fit_seconds = benchmark.pedantic(_bpmem, args=("fit", *LLAMA_1B, "--memory", "40GiB"), rounds=1,
                                             warmup_rounds=0)
    _, estimate_seconds = _bpmem("estimate", *LLAMA_1B, "--batch-size", str(answer["max_batch_size"]))
    benchmark.extra_info.update(fit_seconds=round(fit_seconds, 1), estimate_seconds=round(estimate_seconds, 1),
                                ratio=round(fit_seconds / estimate_seconds, 2))
    print(f"\nfit {fit_seconds:.1f} s, one estimate {estimate_seconds:.1f} s: {fit_seconds / estimate_seconds:.1f}x")
    plain = answer["strategies"][0]
    for batch, peak in ((plain["max_batch_size"], plain["peak_bytes"]),
                        (plain["max_batch_size"] + 1, plain["next_peak_bytes"])):
        estimated, _ = _bpmem("estimate", *LLAMA_1B, "--batch-size", str(batch))
        assert estimated["peak_bytes"] == peak
    assert plain["peak_bytes"] <= answer["memory_bytes"] < plain["next_peak_bytes"]
