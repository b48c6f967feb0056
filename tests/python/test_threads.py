"""Issue 8, threads: the contract of docs/threading.md.

Eight threads drive one shared memory, each on its own sequence ids, for thousands of operations:
decodes (planned under the lock, or planned without it and applied under it, which may find the
plan stale), sequence removal, copies and shifts, K-shift updates, position queries and sequence
state round trips. Every operation that changes the memory is appended to a log while the
memory's lock is held, so the log is the order in which they took effect; replaying it serially
on a fresh memory must give the same results and the same final state bytes, cell metadata and
buffers. Between its logged operations each thread also reads its own positions without the lock
(per-call atomicity: nobody else touches its sequences, so the answer is known).

CI runs a few hundred operations per thread; LLMEM_THREAD_OPS=5000 runs a longer profile.
"""

import os
import random
import threading

import numpy as np
import pytest

from llmem import (Batch, HybridMemory, KVCache, LlmemError, RecurrentMemory, Rope, StaleContextError, Status)
from memory_zoo import snapshot, write_rows

N_THREADS = 8
OPS_PER_THREAD = int(os.environ.get("LLMEM_THREAD_OPS", "250"))
N_SEQ = 2 * N_THREADS  # thread t owns sequences 2t and 2t + 1


def kv_cache():
    return KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=256, n_seq_max=N_SEQ, rope=Rope(n_rot=4))


def recurrent():
    return RecurrentMemory(n_layer=2, n_embd_r=4, n_embd_s=6, mem_size=N_SEQ, n_seq_max=N_SEQ)


def hybrid():
    attn = KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=256, n_seq_max=N_SEQ,
                   layer_filter=lambda il: il == 0, rope=Rope(n_rot=4))
    recr = RecurrentMemory(n_layer=2, n_embd_r=[0, 4], n_embd_s=[0, 6], mem_size=N_SEQ, n_seq_max=N_SEQ,
                           layer_filter=[False, True])
    return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=[False, True])


FACTORIES = {"kv": kv_cache, "recurrent": recurrent, "hybrid": hybrid}


def decode_batch(seq_id, n_tokens):
    return Batch(token=np.ones(n_tokens, np.int32), seq_id=np.full(n_tokens, seq_id, np.int32))


def apply_all(mem, ctx, salt):
    """Apply every micro-batch of a planned context and write its rows; the decode's result."""
    if ctx.status != Status.SUCCESS:
        return ("status", int(ctx.status))
    n = 0
    for ubatch in ctx:
        write_rows(mem, ctx, ubatch, salt)
        n += 1
    return ("applied", n)


def run(mem, op):
    """Perform one logged operation; its result (or the llmem error it raised) for the replay."""
    kind, *args = op
    try:
        if kind == "decode":
            seq_id, n_tokens, salt = args
            return apply_all(mem, mem.init_batch(decode_batch(seq_id, n_tokens), 4), salt)
        if kind == "seq_rm":
            return mem.seq_rm(*args)
        if kind == "seq_cp":
            src, dst = args
            mem.seq_rm(dst, -1, -1)
            return mem.seq_cp(src, dst, -1, -1)
        if kind == "seq_add":
            return mem.seq_add(*args)
        if kind == "update":
            ctx = mem.init_update()
            return ctx.apply() if ctx.status == Status.SUCCESS else int(ctx.status)
        if kind == "pos_max":
            return mem.seq_pos_max(*args)
        if kind == "save_restore":
            src, dst = args
            blob = mem.state_write(src)
            mem.state_read(blob, dst)
            return len(blob)
    except (LlmemError, ValueError) as exc:
        return ("error", type(exc).__name__)
    raise AssertionError(f"unknown operation {kind}")


def random_op(rng, own):
    seq, other = rng.sample(own, 2)
    r = rng.random()
    if r < 0.35:
        return ("decode", seq, rng.randint(1, 6), rng.choice((0.0, 0.5)))
    if r < 0.47:
        return ("seq_rm", seq, rng.randint(-1, 12), -1)
    if r < 0.55:
        return ("seq_cp", seq, other)
    if r < 0.63:
        return ("seq_add", seq, rng.randint(0, 8), -1, rng.choice((-2, -1, 1, 2, 3)))
    if r < 0.67:
        return ("update",)
    if r < 0.80:
        return ("pos_max", seq)
    return ("save_restore", seq, rng.choice((seq, other)))


def drive(mem, t, log, counters, errors):
    try:
        rng = random.Random(1000 + t)
        own = [2 * t, 2 * t + 1]
        known = [-1, -1]
        for _ in range(OPS_PER_THREAD):
            op = random_op(rng, own)
            if op[0] == "decode" and rng.random() < 0.4:
                # planned without the lock: by the time the lock is taken another thread may have
                # changed the memory, and then the plan must be refused with nothing changed
                ctx = mem.init_batch(decode_batch(op[1], op[2]), 4)
                if ctx.status != Status.SUCCESS:
                    # "no room" was true when planned, but that moment is not in the log
                    counters["unplaced"] += 1
                    continue
                with mem.lock:
                    try:
                        result = apply_all(mem, ctx, op[3])
                    except StaleContextError:
                        counters["stale"] += 1
                        continue
                    log.append((op, result))
                    known = [mem.seq_pos_max(s) for s in own]
            else:
                with mem.lock:
                    log.append((op, run(mem, op)))
                    known = [mem.seq_pos_max(s) for s in own]
            # per-call atomicity without the lock: only this thread changes its sequences
            assert [mem.seq_pos_max(s) for s in own] == known
            counters["ops"] += 1
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_threads_equal_a_serial_replay(kind):
    mem = FACTORIES[kind]()
    log, errors = [], []
    counters = {"ops": 0, "stale": 0, "unplaced": 0}
    threads = [threading.Thread(target=drive, args=(mem, t, log, counters, errors)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    assert counters["ops"] + counters["stale"] + counters["unplaced"] == N_THREADS * OPS_PER_THREAD
    assert len(log) == counters["ops"]
    assert sum(1 for op, _ in log if op[0] == "decode") > N_THREADS * OPS_PER_THREAD // 5

    replay = FACTORIES[kind]()
    for op, result in log:
        assert run(replay, op) == result, op
    assert snapshot(replay) == snapshot(mem)


def test_stale_plan_is_refused_and_changes_nothing():
    mem = kv_cache()
    ctx = mem.init_batch(decode_batch(0, 3), 4)
    other = mem.init_batch(decode_batch(1, 2), 4)
    for ubatch in other:
        write_rows(mem, other, ubatch)
    before = snapshot(mem)
    with pytest.raises(StaleContextError, match="the memory changed after init_batch made it"):
        ctx.apply()
    assert snapshot(mem) == before
    with pytest.raises(StaleContextError):
        ctx.cpy_k(0, np.zeros((3, 8), np.float32))
    assert snapshot(mem) == before


def test_parts_of_a_hybrid_share_one_lock():
    mem = hybrid()
    assert mem.lock is mem.mem_attn.lock is mem.mem_recr.lock
    # re-entrant: a decode under the lock calls methods that take it again
    with mem.lock:
        assert apply_all(mem, mem.init_batch(decode_batch(0, 3), 4), 0.0) == ("applied", 1)
        assert mem.seq_pos_max(0) == 2


def test_lock_blocks_other_threads():
    mem = recurrent()
    started, reads = threading.Event(), []

    def reader():
        started.set()
        reads.append(mem.seq_pos_max(0))

    with mem.lock:
        th = threading.Thread(target=reader)
        th.start()
        started.wait()
        th.join(0.2)
        assert th.is_alive() and reads == []   # waiting for the lock, not racing the decode
        apply_all(mem, mem.init_batch(decode_batch(0, 4), 4), 0.0)
    th.join()
    assert reads == [3]
