"""Probes: four ways to watch one step's memory, behind one small protocol.

Every probe is a context manager. Enter it around the work, then read ``result()``, a
dict of integer byte figures named as in ``bpmem.figures`` (docs/results-csv.md lists them).
Each probe says what it cannot see.

- ``SavedTensorProbe``: what autograd keeps for backward (``saved_tensors_hooks``).
- ``LiveTensorProbe``: every tensor storage an aten op creates, until it dies (a
  ``TorchDispatchMode`` plus ``weakref.finalize``); gives the peak and a timeline.
- ``CudaProbe``: the CUDA caching allocator's own peak counters.
- ``RssProbe``: the process's resident set, sampled by psutil in a thread.

The first two are exact and deterministic on CPU (and work on CUDA and meta alike), which
is why bpmem's predictions are checked against them to the byte.
"""

from __future__ import annotations

from bpmem.probes.allocator import AllocatorTraceProbe, CudaProbe, RssProbe, allocator_block_bytes
from bpmem.probes.common import Probe, distinct_storage_bytes, local_tensor, storage_key
from bpmem.probes.live import LiveTensorProbe, TimelineEvent
from bpmem.probes.saved import SavedTensorProbe

__all__ = [
    "Probe",
    "SavedTensorProbe",
    "LiveTensorProbe",
    "TimelineEvent",
    "AllocatorTraceProbe",
    "CudaProbe",
    "RssProbe",
    "storage_key",
    "local_tensor",
    "distinct_storage_bytes",
    "allocator_block_bytes",
]
