"""results.csv: the one table every run writes and every later step reads.

- ``table``: the columns, how each is written and read back (also what pandas writes);
- ``merge``: the shards of one sweep (``--shard K/N``) put back together;
- ``check``: a new run against a baseline, with per-figure tolerances (exit 1 on a regression);
- ``predicted_check``: a run against its own predictions.

Importing this package never imports torch: ``bpmem check`` runs where torch is absent.
"""

from bpmem.results.table import ResultsFileError, read_results

__all__ = ["ResultsFileError", "read_results"]
