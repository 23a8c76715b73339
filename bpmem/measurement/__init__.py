"""Measuring one cell: the real training or inference step, run under the probes.

- ``step``: the step itself (forward, loss, backward, optimizer) as one callable per strategy;
- ``cell``: one (model, strategy, batch) cell measured into a ``MeasuredCell``, and
  ``measure`` (the Python entry point for an MLP step);
- ``api``: ``bpmem.measure``, a context manager around any block of the user's own code;
- ``memory_trace``: the allocator's timeline of one step, for the report's memory plot;
- ``timing``, ``timing_pairs``: wall and CPU time, paired with the plain step's repeats;
- ``fake_kernels``: the same step on fake tensors (``bpmem estimate --model``), with storages
  sized as the device's own kernels size them;
- ``precision``: mixed precision (autocast and gradient scaling) as the step runs it.
"""
