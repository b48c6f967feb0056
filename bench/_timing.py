"""Timing helpers shared by the benchmarks: best-of-repeats per-call time, printed as a table."""

from __future__ import annotations

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
