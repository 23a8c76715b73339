"""``python -m bpmem`` is the ``bpmem`` command."""

import sys

from bpmem.cli import run

sys.exit(run())
