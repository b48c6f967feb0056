"""Timing helpers shared by the benchmarks: best-of-repeats per-call time, printed as a table."""

from __future__ import annotations

import gc
import time
from typing import Callable, Iterable, Sequence


def per_call_us(fn: Callable[[], object], *, number: int = 0, repeat: int = 7, budget_s: float = 0.25) -> float:
    """Microseconds per call of ``fn``: the best of ``repeat`` runs of ``number`` calls.

    With ``number = 0`` the count is chosen so that one run takes about ``budget_s / repeat``.
    The minimum is reported because on a shared machine noise only ever adds time.
    """
    fn()  # warm up (first-call allocations, caches)
    if number <= 0:
        number, elapsed = 1, 0.0
        while True:
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s / repeat / 4 or number >= 1 << 22:
                break
            number *= 2
        number = max(1, int(number * (budget_s / repeat) / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / number * 1e6


def print_table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def median_min_us(samples_ns: Sequence[int]) -> tuple[float, float]:
    """(median, minimum) of per-call samples in nanoseconds, as microseconds."""
    ordered = sorted(samples_ns)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return median / 1e3, ordered[0] / 1e3


def sample_ns(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None,
              after: Callable[[], object] | None = None) -> list[int]:
    """Wall time of ``reps`` single calls of ``fn``; ``before``/``after`` run untimed around each
    (to set up and undo a call that changes the memory)."""
    clock = time.perf_counter_ns
    out = []
    # a collection of the reference's million Python cells inside a timed call would cost
    # milliseconds (timeit disables the collector for the same reason)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            if before is not None:
                before()
            t0 = clock()
            fn()
            out.append(clock() - t0)
            if after is not None:
                after()
    finally:
        if gc_was_on:
            gc.enable()
    return out


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, so logs stay clean)."""

    def __init__(self, total: int, enabled: bool | None = None) -> None:
        import sys

        self.total = max(1, total)
        self.done = 0
        self.stream = sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        """Announce the task about to run (the bar counts the tasks already finished)."""
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // self.total
        elapsed = time.perf_counter() - self.t0
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        self.stream.write(line[:120].ljust(120))
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


def host_probe_ms() -> float:
    """Milliseconds of a fixed piece of interpreter work (the best of five). The development
    host is shared: for tens of seconds at a time every instruction takes up to twice as long,
    and a probe taken before each task tells which of its rows ran in such a phase."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        acc = 0
        for i in range(20000):
            acc += i & 7
        best = min(best, time.perf_counter() - t0)
    return best * 1e3

