"""bpmem: measured answers to where training memory goes, for PyTorch MLPs.

Start with ``bpmem estimate --help`` and ``bpmem measure --help``; the Python entry points
are :func:`bpmem.estimate.estimate` and :func:`bpmem.measure.measure`.
"""

__version__ = "0.1.0"
