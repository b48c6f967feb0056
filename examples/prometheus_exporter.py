"""Export llmem memory metrics to Prometheus with prometheus_client.

``MemoryCollector`` reads :meth:`llmem.Memory.stats` at every scrape (a few microseconds per
memory), so nothing has to be updated on the decode path. Register it once::

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(MemoryCollector({"main": cache}))
    start_http_server(9400)

Run this file to see the exposition of a small simulated server (``--port N`` serves it).
Needs ``pip install llmem[prometheus]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, Iterator, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import llmem

#: the running totals of MemoryStats, exported as counters (name, help)
COUNTERS = (
    ("tokens_placed", "Tokens of the micro-batches applied"),
    ("plans_failed_no_room", "init_batch calls that found no room (FAILED_PREPARE)"),
    ("state_bytes_written", "Bytes written by state_write / state_write_into / save"),
    ("state_bytes_read", "Bytes restored by state_read / load"),
    ("state_reads_refused", "State restores refused (StateError)"),
    ("k_shifts", "K-shifts applied"),
)


class MemoryCollector(Collector):
    """Prometheus metrics of llmem memories, labelled ``memory`` with the names given."""

    def __init__(self, memories: Mapping[str, llmem.Memory]) -> None:
        self.memories: Dict[str, llmem.Memory] = dict(memories)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cells = GaugeMetricFamily("llmem_cells", "Cells of the memory", labels=["memory"])
        used = GaugeMetricFamily("llmem_cells_used", "Cells in use, per stream",
                                 labels=["memory", "stream"])
        seqs = GaugeMetricFamily("llmem_sequences", "Sequences holding cells", labels=["memory"])
        totals = {name: CounterMetricFamily(f"llmem_{name}", text, labels=["memory"])
                  for name, text in COUNTERS}
        for label, memory in self.memories.items():
            s = memory.stats()
            cells.add_metric([label], s["cells"])
            for stream, n in enumerate(s["cells_used_per_stream"]):
                used.add_metric([label, str(stream)], n)
            seqs.add_metric([label], s["sequences"])
            for name, _ in COUNTERS:
                totals[name].add_metric([label], s[name])  # type: ignore[literal-required]
        yield cells
        yield used
        yield seqs
        yield from totals.values()


def simulate(cache: llmem.KVCache, steps: int = 8) -> None:
    """A prompt per sequence, then one token per sequence per step."""
    rows = np.ones((64, 8), np.float16)
    for step in range(steps):
        n = 4 if step == 0 else 1
        seq_id = np.repeat(np.arange(cache.n_seq_max, dtype=np.int32), n)
        ctx = cache.init_batch(llmem.Batch(token=np.zeros(len(seq_id), np.int32), seq_id=seq_id), 512)
        for ub in ctx:
            ctx.cpy_k(0, rows[:ub.n_tokens])
            ctx.cpy_v(0, rows[:ub.n_tokens])
    cache.state_write(0)


def main() -> None:
    parser = argparse.ArgumentParser(description="Export llmem memory metrics to Prometheus.")
    parser.add_argument("--port", type=int, help="serve the metrics on this port until interrupted")
    args = parser.parse_args()
    cache = llmem.KVCache(n_layer=1, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=256, n_seq_max=4)
    simulate(cache)
    registry = CollectorRegistry()
    registry.register(MemoryCollector({"main": cache}))
    if args.port is None:
        print(generate_latest(registry).decode(), end="")
        return
    start_http_server(args.port, registry=registry)
    while True:  # pragma: no cover - interactive
        time.sleep(3600)


if __name__ == "__main__":
    main()
