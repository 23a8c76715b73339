"""How a rank ends: SIGTERM held around the final barrier and the marker, even with threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import os, signal, threading, time
from bpmem.sweep.teardown import sigterm_held
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()  # as gloo's and OpenMP's
with sigterm_held():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)
    print("marker written", flush=True)
print("never: the held SIGTERM ends the process here")
"""


def test_a_sigterm_during_the_final_barrier_waits_for_the_marker() -> None:
    """A signal mask holds SIGTERM for one thread only; another thread took it and the rank
    died before its marker. The held signal is delivered after the block, not lost."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60)
    assert done.stdout == "marker written\n"
    assert done.returncode == -15  # SIGTERM, after the block
