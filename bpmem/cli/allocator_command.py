"""``bpmem allocator replay SNAPSHOT.pickle``: a recorded CUDA snapshot through the allocator model."""

from __future__ import annotations

import argparse
from pathlib import Path

from bpmem.cli.options import fail, print_json
from bpmem.units import format_bytes, parse_bytes


def add_allocator_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    allocator = sub.add_parser("allocator", help="PyTorch's CUDA caching allocator, modelled (no GPU needed)",
                               description="Commands on the model of PyTorch's CUDA caching allocator "
                                           "(bpmem/cuda_allocator: pools, 512 B rounding, 2 and 20 MiB segments, "
                                           "best fit with splitting and merging, the retry on a failed cudaMalloc, "
                                           "expandable segments), which runs anywhere, torch-free.")
    commands = allocator.add_subparsers(dest="allocator_command", metavar="COMMAND")
    commands.required = True
    rep = commands.add_parser(
        "replay", help="replay a recorded snapshot: reserved and allocated peaks, segments",
        description="Replay the events of a snapshot (torch.cuda.memory._record_memory_history, then "
                    "torch.cuda.memory._dump_snapshot or a pickled _snapshot()) through the model: from an empty "
                    "allocator where the recording began with the process, else from the state the snapshot "
                    "implies at its first event. Prints the most reserved and allocated, the segments at the end "
                    "and the fragmentation at the allocated peak, beside the recording's own. Exit 0 when the "
                    "replay ends with the recording's segments and blocks, 1 when it does not, 2 for bad input.")
    rep.add_argument("snapshot", type=Path, metavar="SNAPSHOT.pickle")
    rep.add_argument("--alloc-conf", metavar="CONF", default=None,
                     help="replay under these PYTORCH_CUDA_ALLOC_CONF settings (default: the recording's own), "
                          "e.g. expandable_segments:True or max_split_size_mb:128,roundup_power2_divisions:4")
    rep.add_argument("--device-memory", metavar="SIZE", default=None,
                     help="what the allocator may reserve (e.g. 80GiB): report the first request it cannot serve")
    rep.add_argument("--json", action="store_true", help="max_reserved_bytes, max_allocated_bytes, segment_sizes "
                                                         "and the recording's figures as JSON")
    rep.set_defaults(func=cmd_allocator_replay)


def cmd_allocator_replay(args: argparse.Namespace) -> int:
    from bpmem.cuda_allocator.config import AllocatorConfig
    from bpmem.cuda_allocator.replay import load_snapshot, replay

    try:
        snapshot = load_snapshot(args.snapshot)
        config = None if args.alloc_conf is None else AllocatorConfig.parse(args.alloc_conf)
    except ValueError as error:
        flag = "--alloc-conf" if str(error).startswith("alloc-conf") else "SNAPSHOT"
        return fail(args.prog, f"argument {flag}: {error}")
    try:
        limit = None if args.device_memory is None else parse_bytes(args.device_memory)
    except ValueError:
        return fail(args.prog, f"argument --device-memory: {args.device_memory!r} is not a size; allowed: bytes "
                                "or a size with a unit, e.g. 80GiB")
    result = replay(snapshot, config, limit_bytes=limit)
    agrees = not result.differences
    if args.json:
        print_json({"max_reserved_bytes": result.max_reserved_bytes,
                    "max_allocated_bytes": result.max_allocated_bytes,
                    "segment_sizes": list(result.segment_sizes),
                    "fragmentation_at_peak": result.fragmentation_at_peak, "events": result.events,
                    "from_empty": result.from_empty, "first_failure": result.first_failure,
                    "recorded": result.recorded, "agrees": agrees, "differences": list(result.differences)})
        return 0 if agrees else 1
    recorded = result.recorded
    start = "an empty allocator" if result.from_empty else "the state the snapshot implies at its first event"
    print(f"bpmem allocator replay: {args.snapshot} ({result.events} events, from {start})")
    for name, mine, theirs in (("max reserved", result.max_reserved_bytes, recorded["max_reserved_bytes"]),
                               ("max allocated", result.max_allocated_bytes, recorded["max_allocated_bytes"])):
        print(f"  {name:<14} {format_bytes(mine):>12} ({mine:,} B)   recorded {format_bytes(theirs)} ({theirs:,} B)")
    sizes = ", ".join(format_bytes(size) for size in result.segment_sizes)
    print(f"  segments at the end: {len(result.segment_sizes)} ({sizes})")
    print(f"  fragmentation at the allocated peak: {result.fragmentation_at_peak:.1%} of reserved unallocated")
    if result.first_failure:
        failure = result.first_failure
        print(f"  first request that fails in {args.device_memory}: event {failure['event']}, "
              f"{failure['requested_bytes']:,} B, with {failure['reserved_bytes']:,} B reserved")
    print("  agrees with the recording: segments, blocks and addresses at the end" if agrees
          else f"  differs from the recording: {'; '.join(result.differences)}")
    return 0 if agrees else 1
