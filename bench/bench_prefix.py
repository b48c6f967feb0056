"""PrefixCache and recurrent checkpoints, against a pure-Python radix tree of SGLang's kind and
numpy.copyto, measured in the same run.

1. Index: 10k cached prefixes (100 system prompts x 100 user turns, one system prompt extended to
   a 4k-token document) on a KVCache; ``admit`` of a prompt with a 4k-token hit (the index walk
   and one ``seq_cp`` per node: K/V cells shared, not copied), ``release``, ``match`` (the walk
   alone), eviction of 1k prefixes. The baseline is a radix tree written the way SGLang's
   ``RadixCache`` is (children keyed by first token, per-token Python key match, heap eviction)
   doing the same lookups and evictions on the same prefixes (its index only: no memory work).
2. Checkpoints at real row sizes (Granite-4.0-H-Tiny-like Mamba-2 layers, LFM2-like conv layers):
   ``checkpoint_save`` / ``checkpoint_restore`` against ``numpy.copyto`` of the same bytes.

    python -m bench --only prefix        or        python bench/bench_prefix.py [--full]
"""

from __future__ import annotations

import heapq
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import per_call_us, print_table  # noqa: E402

import llmem  # noqa: E402


# -- the baseline: a radix tree as SGLang writes it ------------------------------------------------

class _SGNode:
    __slots__ = ("children", "parent", "key", "last_access_time", "lock_ref")

    def __init__(self):
        self.children = {}
        self.parent = None
        self.key = []
        self.last_access_time = time.monotonic()
        self.lock_ref = 0


def _key_match(key0, key1):
    i = 0
    for k0, k1 in zip(key0, key1):
        if k0 != k1:
            break
        i += 1
    return i


class SGLangStyleRadixTree:
    """SGLang's RadixCache (page size 1), index only: match_prefix, insert, evict."""

    def __init__(self):
        self.root = _SGNode()
        self.root.lock_ref = 1

    def match_prefix(self, key):
        node, value = self.root, 0
        while key and key[0] in node.children:
            child = node.children[key[0]]
            child.last_access_time = time.monotonic()
            n = _key_match(child.key, key)
            value += n
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return value

    def insert(self, key):
        node = self.root
        while key:
            child = node.children.get(key[0])
            if child is None:
                new = _SGNode()
                new.parent, new.key = node, list(key)
                node.children[key[0]] = new
                return
            n = _key_match(child.key, key)
            if n < len(child.key):
                upper = _SGNode()
                upper.parent, upper.key = node, child.key[:n]
                upper.children = {child.key[n]: child}
                node.children[key[0]] = upper
                child.parent, child.key = upper, child.key[n:]
                child = upper
            node, key = child, key[n:]

    def _leaves(self):
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            if not n.children and n is not self.root:
                out.append(n)
            stack.extend(n.children.values())
        return out

    def evict(self, num_tokens):
        leaves = self._leaves()
        heap = [(n.last_access_time, id(n), n) for n in leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, x = heapq.heappop(heap)
            if x.lock_ref > 0:
                continue
            freed += len(x.key)
            del x.parent.children[x.key[0]]
            if not x.parent.children and x.parent is not self.root and x.parent.lock_ref == 0:
                heapq.heappush(heap, (x.parent.last_access_time, id(x.parent), x.parent))
        return freed


# -- the workload ------------------------------------------------------------------------------------

N_SYSTEM, N_USERS, SYS_LEN, USER_LEN, DOC_LEN = 100, 100, 256, 32, 4096


def _prefixes(rng):
    systems = [rng.integers(0, 32000, SYS_LEN, dtype=np.int32) for _ in range(N_SYSTEM)]
    systems[0] = np.concatenate([systems[0], rng.integers(0, 32000, DOC_LEN - SYS_LEN, dtype=np.int32)])
    return [np.concatenate([systems[i], rng.integers(0, 32000, USER_LEN, dtype=np.int32)])
            for i in range(N_SYSTEM) for _ in range(N_USERS)]


def _fill(cache, memory, prefixes):
    """Serve each prefix once (the cells placed by init_batch/apply; no K/V computed)."""
    for p in prefixes:
        seq, hit = cache.admit(p)
        rest = p[hit:]
        batch = llmem.Batch(token=rest, seq_id=np.full(len(rest), seq, np.int32))
        ctx = cache.init_batch(batch, 4096)
        for _ in ctx:
            pass
        cache.commit(seq, rest)
        cache.release(seq)


def bench_index(quick: bool):
    rng = np.random.default_rng(0)
    prefixes = _prefixes(rng)
    n_cells = SYS_LEN * N_SYSTEM + DOC_LEN + USER_LEN * len(prefixes) + 8192
    n_holders = 2 * len(prefixes) + 512
    memory = llmem.KVCache(1, 8, 8, n_cells, n_seq_max=n_holders + 8, dtype_k=np.float16, dtype_v=np.float16)
    cache = llmem.PrefixCache(memory, n_requests=8)
    t0 = time.perf_counter()
    _fill(cache, memory, prefixes)
    fill_s = time.perf_counter() - t0
    tree = SGLangStyleRadixTree()
    for p in prefixes:
        tree.insert(p.tolist())

    prompt = np.concatenate([prefixes[0][:DOC_LEN], rng.integers(0, 32000, 64, dtype=np.int32)])
    prompt_list = prompt.tolist()
    assert cache.match(prompt) == DOC_LEN and tree.match_prefix(prompt_list) == DOC_LEN
    repeat = 5 if quick else 15

    def admit_release():
        seq, hit = cache.admit(prompt)
        cache.release(seq)

    t_pair = per_call_us(admit_release, repeat=repeat)
    # each alone: the best mean over short loops, the other call outside the timed part
    best_admit = best_release = float("inf")
    clock = time.perf_counter
    for _ in range(repeat):
        ta = tr = 0.0
        for _ in range(50):
            t0 = clock()
            seq, _ = cache.admit(prompt)
            t1 = clock()
            cache.release(seq)
            t2 = clock()
            ta += t1 - t0
            tr += t2 - t1
        best_admit, best_release = min(best_admit, ta / 50 * 1e6), min(best_release, tr / 50 * 1e6)
    t_admit, t_release = best_admit, best_release
    t_match = per_call_us(lambda: cache.match(prompt), repeat=repeat)
    t_sg = per_call_us(lambda: tree.match_prefix(prompt_list), repeat=repeat)

    # eviction of 1k prefixes (their 32-token leaves), three times from 10k, 9k, 8k
    ev, ev_sg = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        freed = cache.evict(1000 * USER_LEN)
        ev.append((time.perf_counter() - t0) * 1e6)
        assert freed >= 1000 * USER_LEN
        t0 = time.perf_counter()
        tree.evict(1000 * USER_LEN)
        ev_sg.append((time.perf_counter() - t0) * 1e6)
    cache.check()
    rows = [
        ["admit (4k-token hit) + release", f"{t_pair:.1f} us", "-", "-"],
        ["admit, 4k-token hit among 10k prefixes", f"{t_admit:.1f} us", f"{t_sg:.1f} us", f"{t_sg / t_admit:.1f}x"],
        ["release (the 4k cells unshared)", f"{t_release:.1f} us", "-", "-"],
        ["match (index walk only), 4k tokens", f"{t_match:.1f} us", f"{t_sg:.1f} us", f"{t_sg / t_match:.1f}x"],
        ["evict 1k prefixes (of 10k, 9k, 8k)", f"{min(ev) / 1e3:.2f} ms", f"{min(ev_sg) / 1e3:.2f} ms",
         f"{min(ev_sg) / min(ev):.1f}x"],
    ]
    print_table(f"PrefixCache on a KVCache: {len(prefixes)} prefixes, {cache.stats()['nodes']} nodes after "
                f"evictions (filled in {fill_s:.1f} s through admit/init_batch/commit/release)",
                ["operation", "llmem", "SGLang-style Python radix tree", "speedup"], rows)
    return rows


# -- checkpoints ---------------------------------------------------------------------------------------

def _ckpt_row(name, n_layer, n_embd_r, n_embd_s, quick):
    mem = llmem.RecurrentMemory(n_layer, n_embd_r, n_embd_s, mem_size=2, n_seq_max=2)
    for il in range(n_layer):
        mem.r(il)[:] = 1.0
        mem.s(il)[:] = 2.0
    batch = llmem.Batch(token=np.zeros(1, np.int32), seq_id=np.zeros(1, np.int32))
    for _ in mem.init_batch(batch, 1):
        pass
    mem.set_checkpoint_limits(max_count=4, max_bytes=1 << 40)
    nbytes = mem.checkpoint_stats()["checkpoint_bytes"]
    repeat = 5 if quick else 15

    def save_drop():
        mem.checkpoint_drop(mem.checkpoint_save(0))

    t_save = per_call_us(save_drop, repeat=repeat)
    ck = mem.checkpoint_save(0)

    def restore():
        mem.checkpoint_restore(ck, 1)
        mem.seq_rm(1, -1, -1)

    t_restore = per_call_us(restore, repeat=repeat)
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    t_copy = per_call_us(lambda: np.copyto(dst, src), repeat=repeat)
    # the same rows copied layer by layer with numpy (what a Python checkpoint would do)
    outs = [np.empty_like(mem.r(il)[0]) for il in range(n_layer)] + [np.empty_like(mem.s(il)[0]) for il in range(n_layer)]
    rows_in = [mem.r(il)[0] for il in range(n_layer)] + [mem.s(il)[0] for il in range(n_layer)]

    def numpy_rows():
        for o, i in zip(outs, rows_in):
            np.copyto(o, i)

    t_rows = per_call_us(numpy_rows, repeat=repeat)
    gbs = lambda us: nbytes / us / 1e3  # noqa: E731
    return [name, f"{nbytes / 2**20:.2f} MiB", f"{t_save:.1f} us ({gbs(t_save):.1f} GB/s)",
            f"{t_restore:.1f} us ({gbs(t_restore):.1f} GB/s)", f"{t_copy:.1f} us ({gbs(t_copy):.1f} GB/s)",
            f"{t_rows:.1f} us", f"{t_copy / t_save:.2f}"]


def bench_checkpoints(quick: bool):
    n_mamba = 4 if quick else 36
    rows = [
        _ckpt_row(f"Mamba-2 rows (Granite-4.0-H-Tiny-like), {n_mamba} layers", n_mamba, 3 * (3072 + 256), 3072 * 128,
                  quick),
        _ckpt_row("conv rows (LFM2-1.2B-like), 10 layers", 10, 2 * 2048, 0, quick),
        _ckpt_row("small rows (toy), 3 layers", 3, 3 * 96, 32 * 16, quick),
    ]
    print_table("Recurrent checkpoints: save (+drop) and restore (+seq_rm) of one sequence's rows",
                ["rows", "bytes", "checkpoint_save", "checkpoint_restore", "numpy.copyto same bytes",
                 "numpy per-row copies", "copyto / save"], rows)
    return rows


def run(quick: bool = True) -> None:
    bench_index(quick)
    bench_checkpoints(quick)


if __name__ == "__main__":
    run(quick="--full" not in sys.argv)
