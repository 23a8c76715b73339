"""``python -m bpmem.worker``: one distributed cell, run by every rank under ``torchrun``.

    torchrun --nproc-per-node 2 -m bpmem.worker --cell '{"spec": {"depth": 3}, "step":
        {"strategy": "pipeline-1f1b", "batch_size": 64, "microbatches": 4}}' --out rows.json

``--nnodes``, ``--node-rank`` and the rendezvous flags are torchrun's own and pass straight
through, so the same line runs across nodes. Each rank measures its own memory; rank 0
gathers every rank's figures and writes them, one row per rank, to ``--out`` (JSON).
A rank that fails writes its message to ``--out`` + ``.rank<N>.err`` before exiting, so
the launcher can say which rank died and why.

How a rank ends (``bpmem.sweep.teardown``): after the last cell every distributed object is
released and collected, then a final barrier, then each rank writes ``--out`` +
``.rank<N>.done``, then the process group is destroyed. The launcher trusts those files,
not the exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bpmem.figures import MeasuredRank
from bpmem.measurement.cell import optimizer_state_tensors
from bpmem.measurement.step import _unlabelled, make_optimizer
from bpmem.measurement.timing import time_summary
from bpmem.models.workload import Workload
from bpmem.probes import SavedTensorProbe, distinct_storage_bytes
from bpmem.spec import MLPSpec, StepSpec
from bpmem.strategies import rank_runtime as strategies
from bpmem.strategies.placement import RANKS, Machine, Placement, place
from bpmem.sweep.launch import cell_device, cell_from_json
from bpmem.sweep.teardown import mark_done, release, sigterm_held


def job_placement(devices: list[str], local_world: int, machine: Machine) -> Placement:
    """Where this node's ranks run (``bpmem.strategies.placement.place``): every cell of one torchrun job
    shares one process group, so they must name one device; the machine only decides whether
    the cell fits, never where it goes. ValueError with the reason when it cannot run here."""
    kinds = sorted(set(devices))
    if len(kinds) != 1:
        raise ValueError(f"device: one torchrun job runs cells of one device, these name {', '.join(kinds)}; "
                         "allowed: the same device in every cell")
    placement = place(kinds[0], local_world, RANKS, machine)
    if not placement.runs:
        raise ValueError(f"world_size: {placement.skipped}")
    return placement


PEAK_STEPS = 5  # steady-state steps watched for the peak; the least is the rank's


def run_rank(spec: MLPSpec | Workload, step: StepSpec, repeats: int, warmup: int,
             device: torch.device) -> MeasuredRank:
    rank = dist.get_rank()
    setup = step.strategy.setup_rank(spec, step, rank, device)
    holder = nn.ModuleList(setup.modules)
    optimizer = make_optimizer(step, holder)

    # 1. equivalence, on the initial weights: this rank's gradients against one device's
    optimizer.zero_grad(set_to_none=True)
    setup.run(_unlabelled)
    reference = strategies.reference_gradients(spec, step, device)
    owned = step.strategy.owned_parameters(spec, rank)
    got = strategies.full_tensors([p.grad for p in setup.params])  # DTensor shards gathered whole
    error = strategies.max_relative_error(got, [reference[i] for i in owned])
    del got
    del reference
    optimizer.step()  # also the warm-up: optimizer state now exists

    _inject_fault(rank, "step")

    # 2. saved activations, and the most that are in flight at once (FSDP's all-gathered
    # parameters are parameters, not activations: excluded like the sharded ones)
    optimizer.zero_grad(set_to_none=True)
    transient = setup.transient_params()
    saved = SavedTensorProbe(holder, exclude=transient)
    with saved:
        setup.run(_unlabelled)
    optimizer.step()

    # 3. the live peak of a whole step: the least of a few steady-state steps. Under gloo a
    # collective's thread lets go of its tensors a moment after wait() returns, sometimes only
    # after this thread's next allocation, which then counts them (FSDP's all-gather buffer,
    # a 4 B all-reduced scalar): scheduling noise, which the least peak leaves out, as the
    # dry run of the rank does (bpmem.predict.rank_dry_run)
    live = min((strategies.live_step(setup, optimizer, transient) for _ in range(PEAK_STEPS)),
               key=lambda probe: probe.peak_bytes)

    # 4. time: every rank starts together, the slowest defines the step
    for _ in range(warmup):
        _plain_step(setup, optimizer)
    times = []
    for _ in range(repeats):
        strategies.barrier()
        start = time.perf_counter()
        _plain_step(setup, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        strategies.barrier()
        times.append(time.perf_counter() - start)
    buckets = setup.buffer_bytes()
    return MeasuredRank(
        rank=rank, device=str(device), params_bytes=distinct_storage_bytes(setup.params),
        grads_bytes=distinct_storage_bytes(p.grad for p in setup.params),
        optimizer_bytes=distinct_storage_bytes(optimizer_state_tensors(optimizer)),
        saved_activation_bytes=saved.peak_retained_bytes, saved_hook_bytes=saved.saved_activation_bytes,
        # DDP's buckets are alive all along, so they add to the peak wherever it falls
        peak_bytes=live.peak_bytes + buckets, peak_phase=live.peak_phase,
        peak_by_category={**live.peak_by_category, "buckets": buckets},
        gathered_peak_bytes=live.resizable_peak_bytes, **time_summary(times), equivalence_max_rel_err=error,
        threads=torch.get_num_threads(),
    )


def _inject_fault(rank: int, where: str) -> None:
    """Test hook, ``BPMEM_FAULT=KIND:RANK``. Mid-step (``where="step"``): ``kill`` SIGKILLs
    the rank, ``hang`` stalls it, ``raise`` raises RuntimeError. After the rank recorded its
    work (``where="exit"``): ``abort-at-exit`` aborts it as torch's teardown once did,
    ``hang-at-exit`` stalls it."""
    kind, _, target = os.environ.get("BPMEM_FAULT", "").partition(":")
    if not target or int(target) != rank or kind.endswith("-at-exit") != (where == "exit"):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind in ("hang", "hang-at-exit"):
        time.sleep(10**6)
    elif kind == "raise":
        raise RuntimeError("injected fault (BPMEM_FAULT)")
    elif kind == "abort-at-exit":
        print("terminate called without an active exception (injected: BPMEM_FAULT)", file=sys.stderr, flush=True)
        os.abort()


def _plain_step(setup: strategies.RankSetup, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    setup.run(_unlabelled)
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpmem.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", required=True,
                        help='JSON: {"spec": {MLPSpec fields, or your own model\'s: factory, kwargs_json, data, '
                             'inputs, target, loss, blocks_path}, "step": {StepSpec fields, the strategy by name with '
                             'its parameters beside it}, "device": "cpu" (the default: gloo) or "cuda[:K]" (rank r '
                             'on cuda:K+LOCAL_RANK, NCCL)}, or a list of them on one device '
                             "(run one after another in the same process group)")
    parser.add_argument("--out", required=True, type=Path, help="rank 0 writes every rank's row here (JSON)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="collective timeout (a hung rank fails)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        cells = json.loads(args.cell)
        cells = cells if isinstance(cells, list) else [cells]
        plan = [cell_from_json(cell) for cell in cells]  # the MLP, or your own model rebuilt from its fields
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for spec, step in plan:
            if step.world_size != world:
                raise ValueError(f"world_size: the cell asks for {step.world_size} ranks and torchrun started "
                                 f"{world}; allowed: {world}")
            step.strategy.check(spec, step)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        placement = job_placement([cell_device(cell) for cell in cells], local_world, Machine.here())
        device = torch.device(placement.devices[int(os.environ.get("LOCAL_RANK", rank))])
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
        dist.init_process_group(placement.backend, timeout=timedelta(seconds=args.timeout_s))
        everything: list[Any] = []
        for index, (spec, step) in enumerate(plan):
            # run_rank's own names die with its frame; release() collects the cycles left
            measured = run_rank(spec, step, args.repeats, args.warmup, device)
            row = {**measured.to_dict(drop_none=False), "cell_index": index, "world_size": world}
            del measured
            release()
            rows: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(row, rows, dst=0)
            everything.extend(rows or [])
        if rank == 0:  # complete or absent: written aside, then renamed into place
            partial = args.out.with_name(args.out.name + ".partial")
            partial.write_text(json.dumps(everything, indent=1))
            partial.replace(args.out)
        leftover = release()
        with sigterm_held():
            dist.barrier()
            mark_done(args.out, rank, leftover)
        dist.destroy_process_group()
        _inject_fault(rank, "exit")
        return 0
    except Exception as error:  # noqa: BLE001 - the launcher reports it as the cell's error
        message = f"rank {rank}: {type(error).__name__}: {error}".splitlines()[0]
        Path(f"{args.out}.rank{rank}.err").write_text(message + "\n" + traceback.format_exc())
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
