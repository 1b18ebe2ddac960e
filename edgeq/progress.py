"""One progress line on stderr, redrawn in place: label, bar, count, ETA (drawn only on a terminal).

The one progress bar of edgeq: conversion and quantization (per tensor, weighted by elements),
calibration and perplexity (per window) all draw through it."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float, label: str = "", enabled: bool = True, stream=None):
        self.total = max(float(total), 1.0)
        self.done = 0.0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def update(self, done: float | None = None, *, advance: float = 0.0, detail: str = "") -> None:
        """Set (done=) or advance (advance=) the work done, then redraw."""
        self.done = float(done) if done is not None else self.done + advance
        if not self.tty:
            return
        frac = min(self.done / self.total, 1.0)
        el = self.elapsed()
        eta = el / frac - el if frac > 0 else 0.0
        bar = "█" * int(frac * 24) + "░" * (24 - int(frac * 24))
        line = f"\r{self.label}{bar} {frac * 100:5.1f}% ETA {eta:5.1f}s  {detail}"
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 160 + "\r")
            self.stream.flush()

    def finish(self, message: str = "") -> None:
        """Clear the line and print `message` (when enabled)."""
        self.clear()
        if self.enabled and message:
            print(message, file=self.stream)
