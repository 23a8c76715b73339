"""The sweep's one status line on stderr: cells done, the current cell, elapsed time, ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from bpmem.sweep.config import Cell


class Progress:
    """One status line on stderr: cells done, the current cell, elapsed time and the ETA."""

    def __init__(self, total: int, quiet: bool, stream: TextIO | None = None) -> None:
        self.total, self.quiet, self.done = total, quiet, 0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.tty = self.stream.isatty()

    def show(self, label: str, final: bool = False) -> None:
        """Redraw the line in a terminal; elsewhere (CI logs) print a line per finished cell."""
        if self.quiet or not (self.tty or final):
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        text = (f"[{bar}] {self.done}/{self.total} {_clock(elapsed)} elapsed, ETA {_clock(eta)}  {label}")
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self, label: str) -> None:
        self.done += 1
        self.show(label, final=True)

    def close(self) -> None:
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no cell done yet
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def cell_label(cell: Cell) -> str:
    s, t = cell.spec, cell.step
    model = f"depth={s.depth} h={s.hidden_dim}" if hasattr(s, "depth") else s.factory.rsplit(":", 1)[-1]
    return f"{model} B={t.batch_size} {t.mode} {t.strategy.name} {cell.device}"
