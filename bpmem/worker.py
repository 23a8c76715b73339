"""``python -m bpmem.worker``: the per-rank worker of a distributed cell, under torchrun.

The public name of ``bpmem.sweep.worker`` (where its code and flags are documented), kept at
the top so that ``torchrun ... -m bpmem.worker`` is short and stable.
"""

import sys

from bpmem.sweep.worker import main

if __name__ == "__main__":
    sys.exit(main())
