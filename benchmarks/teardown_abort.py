"""Reproduce, without bpmem's measuring code, the SIGABRT that gloo ranks could hit at exit
(bpmem.sweep.teardown).

    python benchmarks/teardown_abort.py --runs 20          # counts per variant
    python benchmarks/teardown_abort.py --rank-body plain  # one rank's body (torchrun runs it)

Variants of one rank's body: two gloo ranks, a DDP-wrapped two-Linear model, three SGD
steps, a barrier, ``destroy_process_group()``.
- ``plain``: the model and optimizer live until the interpreter exits (aborts now and then,
  more often on a loaded machine: run two busy loops beside it);
- ``release``: both are deleted and garbage collected before the barrier (bpmem's fix);
- ``nostash``: as plain, but autograd may not stash its ``contextvars`` context in
  thread-local state during backward, which shows that context is the Python object the
  gloo worker thread frees at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys


def rank_body(variant: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    # the only bpmem import, and it wraps two torch internals: the repro stays free of bpmem's code
    from bpmem.torch_private import context_stash_disabled

    # every backward runs inside the block, so none of them stashes a context
    with context_stash_disabled() if variant == "nostash" else contextlib.nullcontext():
        dist.init_process_group("gloo")
        model = DistributedDataParallel(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(16, 64)).sum().backward()
            optimizer.step()
        if variant == "release":
            del model, optimizer
            gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="torchrun jobs per variant")
    parser.add_argument("--variants", nargs="+", default=["plain", "release", "nostash"])
    parser.add_argument("--rank-body", choices=("plain", "release", "nostash"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_body:
        rank_body(args.rank_body)
        return 0
    for variant in args.variants:
        aborted = 0
        for _ in range(args.runs):
            job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node=2", os.path.abspath(__file__), "--rank-body", variant],
                                 capture_output=True, text=True)
            aborted += job.returncode != 0 and "terminate called" in job.stdout + job.stderr
        print(f"{variant}: {aborted}/{args.runs} jobs aborted at teardown", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
