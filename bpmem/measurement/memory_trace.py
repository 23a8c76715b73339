"""Memory traces that PyTorch's own viewer opens: the snapshot format of
``torch.cuda.memory._snapshot()``, pickled.

    bpmem measure --trace step.pickle ...           # one step
    bpmem run --config C --trace ...                # every measured step: <out>/traces/<cell_id>.pickle
    python -m torch.cuda._memory_viz trace_plot step.pickle -o step.html   # open step.html in a browser
    python -m torch.cuda._memory_viz stats step.pickle                     # a text summary

(or drag the file onto https://pytorch.org/memory_viz). On CUDA the snapshot is the caching
allocator's own (``torch.cuda.memory._record_memory_history``): every block it handed out,
rounded as it rounds them. On the CPU there is no such recorder, so bpmem writes one from the
live probe's allocation log: each storage an aten op made, in order, with its exact size, the
op that made it and its category and phase as the frame. Addresses there are made up (a bump
allocator that never reuses one); the sizes and the order are the measurement. The running
total of that trace peaks at exactly the row's ``peak_bytes``.

bpmem only writes these files, never reads one: a pickle runs code when loaded, so load only
files you trust (PyTorch's tool loads them with ``pickle``).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bpmem.analytic.ledger import Allocation

BASE_ADDRESS = 1 << 32  # made-up addresses start here, so none is 0


def snapshot_from_allocations(allocations: Iterable[Allocation]) -> dict[str, Any]:
    """A one-device snapshot of an allocation log: ``device_traces[0]`` holds an ``alloc``
    per storage made and a ``free_requested``/``free_completed`` pair per storage freed;
    ``segments`` holds one segment spanning every address handed out, with the storages
    still alive at the end as active blocks and the rest as inactive gaps (what ``stats``
    reads)."""
    trace: list[dict[str, Any]] = []
    live: dict[Any, dict[str, Any]] = {}
    next_address = BASE_ADDRESS
    for entry in allocations:
        if entry.action == "alloc":
            frame = {"filename": f"bpmem {entry.category}", "line": 0, "name": f"{entry.op} ({entry.phase})"}
            event = {"action": "alloc", "addr": next_address, "size": entry.nbytes, "stream": 0,
                     "frames": [frame], "category": entry.category}
            live[entry.key] = event
            trace.append(event)
            next_address += max(entry.nbytes, 1)  # an empty storage still gets an address of its own
        else:
            made = live.pop(entry.key)
            for action in ("free_requested", "free_completed"):
                trace.append({"action": action, "addr": made["addr"], "size": made["size"], "stream": 0,
                              "frames": made["frames"]})
    return {"segments": [_segment(live.values(), next_address)], "device_traces": [trace]}


def _segment(still_live: Iterable[dict[str, Any]], end: int) -> dict[str, Any]:
    """The one made-up segment: live blocks in address order, gaps between them inactive."""
    blocks: list[dict[str, Any]] = []
    cursor = BASE_ADDRESS
    for event in sorted(still_live, key=lambda e: e["addr"]):
        if event["addr"] > cursor:
            blocks.append({"address": cursor, "size": event["addr"] - cursor, "requested_size": 0,
                           "state": "inactive", "frames": []})
        size = max(event["size"], 1)
        blocks.append({"address": event["addr"], "size": size, "requested_size": event["size"],
                       "state": "active_allocated", "frames": event["frames"]})
        cursor = event["addr"] + size
    if end > cursor:
        blocks.append({"address": cursor, "size": end - cursor, "requested_size": 0, "state": "inactive",
                       "frames": []})
    total = end - BASE_ADDRESS
    allocated = sum(b["size"] for b in blocks if b["state"] == "active_allocated")
    return {"device": 0, "address": BASE_ADDRESS, "total_size": total, "allocated_size": allocated,
            "active_size": allocated, "requested_size": allocated, "stream": 0, "segment_type": "large",
            "segment_pool_id": (0, 0), "is_expandable": False, "frames": [], "blocks": blocks}


def peak_of_trace(snapshot: dict[str, Any], device: int = 0) -> int:
    """The most bytes allocated at once over ``device_traces[device]``, counting the blocks
    alive before the trace began (those freed in it without having been allocated in it)."""
    events = snapshot["device_traces"][device]
    made = {e["addr"] for e in events if e["action"] == "alloc"}
    total = sum(e["size"] for e in events if e["action"] == "free_completed" and e["addr"] not in made)
    peak = total
    for event in events:
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_completed":
            total -= event["size"]
        peak = max(peak, total)
    return peak


def write_snapshot(path: str | Path, snapshot: dict[str, Any]) -> Path:
    """Pickle ``snapshot`` to ``path`` (its folder made if missing), written aside and renamed
    into place, so a file there is always whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        pickle.dump(snapshot, handle, protocol=4)
    partial.replace(path)
    return path
