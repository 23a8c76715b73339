"""bpmem: measured answers to where training memory goes, for PyTorch MLPs.

Start with ``bpmem estimate --help`` and ``bpmem measure --help``; the Python entry points
are :func:`bpmem.predict.estimate.estimate` (predict an MLP step), :func:`bpmem.measurement.cell.measure`
(measure one) and ``bpmem.measure`` (``bpmem.measurement.api``: measure any block of your own code).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "measure"]


def __getattr__(name: str):  # noqa: ANN202 - lazy, so that `import bpmem` never imports torch
    if name == "measure":
        from bpmem.measurement.api import measure

        return measure
    raise AttributeError(f"module 'bpmem' has no attribute {name!r}")
