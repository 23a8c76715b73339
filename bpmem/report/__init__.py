"""From results.csv to the report: tables, prose and plots (reads rows, never measures).

- ``build``: writes report.md and the figures for one results folder;
- ``text``: the tables and sentences; ``explain``: why a number is what it is;
- ``models``: the per-model section (own models, zoo models);
- ``plots`` and ``plot_data``: the figures and the series they draw;
- ``graph``: the autograd graph of the MLP (``bpmem graph``).
"""
