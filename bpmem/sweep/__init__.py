"""Running a sweep: a config's cells, each in its own process, into results.csv.

- ``config``: the TOML config (``default_sweep.toml`` is the default one) and its checks;
- ``run``: the sweep loop, its rows and its progress;
- ``cell``: one cell predicted and measured in a fresh process;
- ``split``: cells that need several ranks, launched under torchrun;
- ``launch``, ``worker``, ``teardown``: the torchrun launcher, the per-rank worker
  (``python -m bpmem.worker``) and how a rank ends cleanly;
- ``progress``: the progress lines; ``environment``: the metadata every result carries.
"""
