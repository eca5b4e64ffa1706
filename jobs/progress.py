"""Progress of a long job, the same in every job: a tqdm bar on a terminal, a plain line every few seconds
in a log (`ray job submit`, a file, CI), nothing when quiet.

    with Progress(total=rows, unit="rows", label="scoring", quiet=cfg.quiet) as progress:
        for batch in batches:
            progress.update(batch.num_rows)

A line reads `scoring: 4096/10000 rows (41%)  812 rows/s  ETA 7s`, and one more comes when the work
ends (unless the last one has its count), so a log always shows the last count.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

EVERY_S = 10.0  # seconds between lines in a log


def format_seconds(seconds: float) -> str:
    """7s, 3m05s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts work done out of `total` (None: unknown, then no percentage or ETA)."""

    def __init__(self, total: int | None, *, unit: str = "rows", label: str = "", quiet: bool = False,
                 every_s: float = EVERY_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.unit, self.label, self.every_s, self.clock = total, unit, label, every_s, clock
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.shown, self.quiet = 0, -1, quiet
        self.start = self.last_line = clock()
        self.bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=f" {unit}", desc=label or None, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and self.clock() - self.last_line >= self.every_s:
            self._line()

    def line(self) -> str:
        """The progress as one line of text."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: " if self.label else ""
        if self.total:
            text += f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text += f"{self.done} {self.unit}"
        text += f"  {rate:.3g} {self.unit}/s"
        if self.total and rate > 0:
            text += f"  ETA {format_seconds(max(self.total - self.done, 0) / rate)}"
        return text

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line, self.shown = self.clock(), self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.quiet and self.shown != self.done:
            self._line()
        self.quiet = True  # closed: nothing more

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
