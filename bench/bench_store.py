"""llmem.store against raw Redis, and a restored prefix against recomputing it, in one run.

1. A sequence's state through ``RedisStore.put_sequence`` / ``get_sequence`` (state bytes written
   with the header, the envelope, the checks on read, the state read into the memory) against
   raw redis-py ``SET`` / ``GET`` of the same bytes (what a hand-written connector moves at
   least), timed alternately call by call so both see the same phases of the host.
2. Restoring a prefix from Redis into a toy model's memory against recomputing it with the model
   (``decode`` of the prompt), alternately too.

The bench starts its own ``redis-server`` (Debian's, on a unix socket, no persistence) and says
why it skips when there is none.

    python -m bench --only store        or        python bench/bench_store.py [--full]
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_min_us, print_table  # noqa: E402

import llmem  # noqa: E402


def _alternate(a: Callable[[], object], b: Callable[[], object], reps: int,
               after_a: Callable[[], object] = lambda: None,
               after_b: Callable[[], object] = lambda: None) -> tuple[List[int], List[int]]:
    import time

    clock = time.perf_counter_ns
    ta: List[int] = []
    tb: List[int] = []
    a(); after_a(); b(); after_b()  # warm up
    for _ in range(reps):
        t0 = clock(); a(); ta.append(clock() - t0); after_a()
        t0 = clock(); b(); tb.append(clock() - t0); after_b()
    return ta, tb


def _fmt(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def _kv_with_sequence(n_layer: int, n_embd: int, n_tokens: int) -> llmem.KVCache:
    cache = llmem.KVCache(n_layer=n_layer, n_embd_k_gqa=n_embd, n_embd_v_gqa=n_embd, kv_size=2 * n_tokens,
                          n_seq_max=2, dtype_k="f16", dtype_v="f16")
    rng = np.random.default_rng(0)
    batch = llmem.Batch(token=np.zeros(n_tokens, np.int32), seq_id=np.zeros(n_tokens, np.int32))
    ctx = cache.init_batch(batch, n_tokens)
    for ub in ctx:
        for il in range(n_layer):  # incompressible rows, as real K/V are
            ctx.cpy_k(il, rng.standard_normal((ub.n_tokens, n_embd)).astype(np.float16))
            ctx.cpy_v(il, rng.standard_normal((ub.n_tokens, n_embd)).astype(np.float16))
    return cache


def bench_put_get(store: "llmem.RedisStore", quick: bool) -> list:
    client = store.client
    sizes = [(8, 512, 256), (16, 1024, 512)] if quick else [(8, 512, 256), (16, 1024, 512), (32, 1024, 2048)]
    reps = 15 if quick else 40
    rows = []
    for n_layer, n_embd, n_tokens in sizes:
        cache = _kv_with_sequence(n_layer, n_embd, n_tokens)
        raw = cache.state_write(0, llmem.STATE_HEADER)
        mib = len(raw) / 2**20
        t_put, t_set = _alternate(lambda: store.put_sequence(cache, 0, "bench:seq"),
                                  lambda: client.set("bench:raw", raw), reps)
        t_get, t_rawget = _alternate(lambda: store.get_sequence(cache, 1, "bench:seq"),
                                     lambda: client.get("bench:raw"), reps,
                                     after_a=lambda: cache.seq_rm(1, -1, -1))
        buf = bytearray(len(raw))
        t_write, t_read = _alternate(lambda: cache.state_write_into(buf, 0, llmem.STATE_HEADER),
                                     lambda: cache.state_read(raw, 1, llmem.STATE_HEADER), reps,
                                     after_b=lambda: cache.seq_rm(1, -1, -1))
        (p, _), (s, _), (g, _), (rg, _), (w, _), (r, _) = (
            median_min_us(t) for t in (t_put, t_set, t_get, t_rawget, t_write, t_read))
        rows.append([f"KV {n_layer} layers x {n_embd} f16, {n_tokens} tokens", f"{mib:.1f} MiB",
                     _fmt(p), _fmt(s), _fmt(w), f"{p / s:.2f}", _fmt(g), _fmt(rg), _fmt(r), f"{g / rg:.2f}"])
        client.delete("bench:seq", "bench:raw")
    print_table("State store on Redis (unix socket): put_sequence / get_sequence against raw SET / GET of the "
                "same bytes (medians, alternating calls)",
                ["sequence", "bytes", "put_sequence", "raw SET", "(state_write_into)", "put / SET", "get_sequence",
                 "raw GET", "(state_read)", "get / GET"], rows)
    return rows


def bench_restore_vs_recompute(store: "llmem.RedisStore", quick: bool) -> list:
    from llmem.toy import ToyHybrid, ToyTransformer

    reps = 5 if quick else 15
    rows = []
    for name, model in (("toy transformer", ToyTransformer(seed=1)), ("toy hybrid", ToyHybrid(seed=4))):
        for n_prompt in ((128, 512) if quick else (128, 512, 2048)):
            memory = model.new_memory(2 * n_prompt, 2)
            tokens = (np.arange(n_prompt) * 7 % model.config.n_vocab).astype(np.int32)
            batch = llmem.Batch(token=tokens, seq_id=np.zeros(n_prompt, np.int32),
                                output=np.arange(n_prompt) == n_prompt - 1)
            model.decode(batch, memory, 512)
            assert store.put_sequence(memory, 0, "bench:prefix")
            state_kib = memory.state_size(0, llmem.STATE_HEADER) / 1024
            memory.seq_rm(0, -1, -1)

            def recompute() -> None:
                model.decode(batch, memory, 512)

            def restore() -> None:
                assert store.get_sequence(memory, 0, "bench:prefix") == n_prompt

            t_restore, t_recompute = _alternate(restore, recompute, reps,
                                                after_a=lambda: memory.seq_rm(0, -1, -1),
                                                after_b=lambda: memory.seq_rm(0, -1, -1))
            (r, _), (c, _) = median_min_us(t_restore), median_min_us(t_recompute)
            rows.append([name, n_prompt, f"{state_kib:.0f} KiB",
                         _fmt(r), _fmt(c), f"{c / r:.1f}x"])
            store.delete("bench:prefix")
    print_table("A prefix restored from Redis (get_sequence) against recomputing it with the model (decode)",
                ["model", "prompt tokens", "state", "restore", "recompute", "recompute / restore"], rows)
    return rows


def run(quick: bool = True) -> None:
    try:
        import redis  # noqa: F401
    except ImportError:
        print("\nState store: skipped (the redis client is missing: pip install 'llmem[redis]')")
        return
    from redis_server import RedisServer, find_redis_server

    if find_redis_server() is None:
        print("\nState store: skipped (no redis-server on PATH: apt-get install redis-server)")
        return
    server = RedisServer(maxmemory="2gb")
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        print(f"\nState store: skipped (redis-server did not start: {exc})")
        return
    try:
        store = llmem.RedisStore(unix_socket_path=server.socket, socket_timeout=10)
        bench_put_get(store, quick)
        bench_restore_vs_recompute(store, quick)
        store.close()
    finally:
        server.close()


if __name__ == "__main__":
    run(quick="--full" not in sys.argv)
