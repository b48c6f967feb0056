"""llmem's C API (llmem._core._C_API, docs/capi.md) driven from a Cython extension compiled here.

The extension (tests/python/capi_ext/capi_driver.pyx) takes the handle of a memory built in Python
and drives it without the GIL. Checked: a continuous-batching loop run by it takes the same
decisions as the Python API on random workloads, for every memory kind; a toy transformer whose
bookkeeping goes through the C API still decodes exactly as forward_full; the lock is the one
Python's memory.lock is; modification counters reach the other side (stale contexts); errors are
return codes; the header, the .pxd and the CMake package are found from the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import types

import numpy as np
import pytest

import llmem
from llmem import (Batch, BatchError, HybridISWAMemory, HybridMemory, KVCache, KVCacheISWA, LlmemError,
                   RecurrentMemory, Rope, StaleContextError, StateError, Status, SWAType)
from llmem.toy import ToyTransformer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "capi_ext"))
import build_driver  # noqa: E402
import memory_zoo  # noqa: E402

sys.path.pop(0)

ROPE = Rope(n_rot=4)
N_SEQ = 8


@pytest.fixture(scope="session")
def drv(tmp_path_factory):
    return build_driver.build(str(tmp_path_factory.mktemp("capi_driver")))


# -- memories of every kind, large enough for a small server --------------------------------------

def kv():
    return KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=96, n_seq_max=N_SEQ, rope=ROPE)


def kv_streams():
    return KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=24, n_seq_max=N_SEQ, unified=False,
                   dtype_k=np.float32, dtype_v=np.float32, v_trans=False, rope=ROPE)


def kv_iswa():
    return KVCacheISWA(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=96, n_seq_max=N_SEQ, n_swa=4,
                       swa_type=SWAType.STANDARD, is_swa_layer=[True, False], n_ubatch=8, rope=ROPE)


def recurrent():
    return RecurrentMemory(n_layer=2, n_embd_r=4, n_embd_s=6, mem_size=N_SEQ, n_seq_max=N_SEQ, n_rs_seq=2)


def hybrid():
    attn = KVCache(n_layer=2, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=96, n_seq_max=N_SEQ,
                   layer_filter=lambda il: il == 0, rope=ROPE)
    recr = RecurrentMemory(n_layer=2, n_embd_r=[0, 4], n_embd_s=[0, 6], mem_size=N_SEQ, n_seq_max=N_SEQ,
                           n_rs_seq=1, layer_filter=[False, True])
    return HybridMemory(attn=attn, recr=recr, is_recurrent_layer=[False, True])


def hybrid_iswa():
    attn = KVCacheISWA(n_layer=3, n_embd_k_gqa=8, n_embd_v_gqa=8, kv_size=96, n_seq_max=N_SEQ, n_swa=4,
                       swa_type=SWAType.STANDARD, is_swa_layer=[True, False, False], n_ubatch=8,
                       layer_filter=lambda il: il < 2, rope=ROPE)
    recr = RecurrentMemory(n_layer=3, n_embd_r=[0, 0, 4], n_embd_s=[0, 0, 6], mem_size=N_SEQ, n_seq_max=N_SEQ,
                           layer_filter=[False, False, True])
    return HybridISWAMemory(attn=attn, recr=recr, is_recurrent_layer=[False, False, True])


MEMORIES = {"kv": kv, "kv_streams": kv_streams, "kv_iswa": kv_iswa, "recurrent": recurrent, "hybrid": hybrid,
            "hybrid_iswa": hybrid_iswa}
KINDS = {"kv": 1, "kv_streams": 1, "kv_iswa": 2, "recurrent": 3, "hybrid": 4, "hybrid_iswa": 5}


# -- the same workload through the Python API ------------------------------------------------------

def error_code(exc: BaseException) -> int:
    """The C API's return code for the exception the Python API raised."""
    if isinstance(exc, BatchError):
        return -2
    if isinstance(exc, StateError):
        return -3
    if isinstance(exc, StaleContextError):
        return -4
    if isinstance(exc, (ValueError, TypeError)):
        return -1
    if isinstance(exc, LlmemError):
        return -6
    raise exc


def log_slot(mem, ctx, log: list) -> None:
    for sub, _cache in memory_zoo.kv_parts(mem, ctx):
        rows = sub.k_idxs()
        log += [sub.n_kv, len(rows), *rows.tolist()]
    for sub, _recr in memory_zoo.recurrent_parts(mem, ctx):
        copies = sub.s_copy_all()
        log += [sub.head, sub.n_rs, sub.rs_z, *copies.tolist()]


def n_ubatches(ctx) -> int:
    while not hasattr(ctx, "n_ubatches"):
        ctx = ctx.base if hasattr(ctx, "base") else ctx._ctx
    return ctx.n_ubatches


def run_python(mem, ops: np.ndarray) -> list:
    """run_workload of capi_driver.pyx, through the Python API: the same log."""
    log: list = []
    attn = mem.mem_attn if isinstance(mem, (HybridMemory, HybridISWAMemory)) else mem
    recr = mem.mem_recr if isinstance(mem, (HybridMemory, HybridISWAMemory)) else mem
    n_rs_seq = recr.n_rs_seq if isinstance(recr, RecurrentMemory) else 0
    for op, seq, a, b in ops.tolist():
        if op in (0, 1):
            if op == 0:
                batch = Batch(token=[(seq * 7 + j) % 50 for j in range(a)], seq_id=[seq] * a)
                n_ub = b
            else:
                seqs = [j for j in range(31) if a & (1 << j)]
                batch = Batch(token=[s + 1 for s in seqs], seq_id=seqs, output=[True] * len(seqs))
                n_ub = max(len(seqs), n_rs_seq + 2)  # decode_step's n_ubatch 0
            try:
                ctx = mem.init_batch(batch, n_ub)
            except Exception as exc:  # noqa: BLE001 - mapped to the C return code
                log += [error_code(exc), -1]
                continue
            log += [0, int(ctx.status)]
            if ctx.status != Status.SUCCESS:
                continue
            if op == 1:
                log.append(n_ubatches(ctx))
            while True:
                try:
                    ctx.apply()
                    log_slot(mem, ctx, log)
                except Exception as exc:  # noqa: BLE001
                    log.append(error_code(exc))
                    break
                if not ctx.next():
                    break
        elif op == 2:
            try:
                log += [0, int(bool(mem.seq_rm(seq, a, b)))]
            except Exception as exc:  # noqa: BLE001
                log += [error_code(exc), -1]
        elif op == 3:
            try:
                mem.seq_cp(seq, a)
                log.append(0)
            except Exception as exc:  # noqa: BLE001
                log.append(error_code(exc))
        elif op == 4:
            try:
                log += [0, mem.seq_pos_min(seq), mem.seq_pos_max(seq)]
            except Exception as exc:  # noqa: BLE001
                log += [error_code(exc), -2, -2]
        elif op == 5:
            try:
                mem.seq_add(seq, a, -1, b)
                if not isinstance(attn, RecurrentMemory):
                    update = attn.init_update()
                    if update.status == Status.SUCCESS:
                        update.apply()
                log.append(0)
            except Exception as exc:  # noqa: BLE001
                log.append(error_code(exc))
        elif op == 6:
            try:
                mem.seq_keep(seq)
                log.append(0)
            except Exception as exc:  # noqa: BLE001
                log.append(error_code(exc))
    return log


def random_workload(seed: int, n_ops: int = 160) -> np.ndarray:
    """A server's life: prompts arrive (sometimes larger than the room left), active sequences
    decode together, requests finish or are cut back (rollback, retries), prefixes are shared,
    positions queried and shifted; now and then an id out of range or an empty sequence."""
    rng = np.random.default_rng(seed)
    active: set = set()
    ops = []
    for _ in range(n_ops):
        r = rng.random()
        free = [s for s in range(N_SEQ) if s not in active]
        if r < 0.2 and free:
            seq = int(rng.choice(free))
            ops.append((0, seq, int(rng.integers(1, 20)), int(rng.choice([3, 8, 512]))))
            active.add(seq)
        elif r < 0.6 and active:
            chosen = [s for s in sorted(active) if rng.random() < 0.8] or [min(active)]
            ops.append((1, 0, sum(1 << s for s in chosen), 0))
        elif r < 0.72 and active:
            seq = int(rng.choice(sorted(active)))
            if rng.random() < 0.5:
                ops.append((2, seq, -1, -1))
                active.discard(seq)
            else:
                ops.append((2, seq, int(rng.integers(0, 30)), -1))
        elif r < 0.78:
            ops.append((3, int(rng.integers(0, N_SEQ)), int(rng.integers(0, N_SEQ)), 0))
        elif r < 0.9:
            ops.append((4, int(rng.integers(-1, N_SEQ + 1)), 0, 0))
        elif r < 0.95 and active:
            ops.append((5, int(rng.choice(sorted(active))), int(rng.integers(0, 10)), int(rng.integers(-3, 4))))
        elif r < 0.97:
            ops.append((6, int(rng.integers(0, N_SEQ)), 0, 0))
            active = set()
        else:
            ops.append((2, int(rng.integers(N_SEQ, 300)), -1, -1))
    return np.array(ops, dtype=np.int32).reshape(-1, 4)


@pytest.mark.parametrize("name", list(MEMORIES))
@pytest.mark.parametrize("seed", range(4))
def test_continuous_batching_loop_decides_as_python(drv, name, seed):
    ops = random_workload(seed * 31 + len(name))
    py_mem, c_mem = MEMORIES[name](), MEMORIES[name]()
    expected = run_python(py_mem, ops)
    handle = drv.Memory(c_mem)
    assert handle.info()["kind"] == KINDS[name]
    got = drv.run_workload(handle, ops).tolist()
    assert got == expected
    # the memories ended alike: every cell, and llama.cpp's state bytes read through either API
    assert handle.state_write() == py_mem.state_write() == c_mem.state_write()
    assert repr(c_mem.cells()) == repr(py_mem.cells())
    for seq in range(N_SEQ):
        assert handle.seq_pos_max(seq) == py_mem.seq_pos_max(seq)
        assert handle.seq_pos_min(seq) == py_mem.seq_pos_min(seq)


@pytest.mark.parametrize("name", list(MEMORIES))
def test_state_bytes_and_sequence_ops_match_python(drv, name):
    mem = MEMORIES[name]()
    handle = drv.Memory(mem)
    for seq, n in ((0, 5), (1, 3), (2, 7)):
        status, ctx = handle.init_batch(np.arange(n) + 1, [seq] * n, n_ubatch=512)
        assert status == 0
        while True:
            ctx.apply()
            if not ctx.next():
                break
        ctx.free()
    for seq in (-1, 0, 1, 2):
        for flags in (0, 1):
            size = handle.state_size(seq, flags)
            assert size == mem.state_size(seq, flags)
            blob = handle.state_write(seq, flags)
            assert blob == mem.state_write(seq, flags)
    blob = handle.state_write(1)
    handle.seq_rm(1)
    assert mem.seq_pos_max(1) == -1
    handle.state_read(blob, 3)
    assert mem.seq_pos_max(3) == 2
    assert mem.state_write(3) == handle.state_write(3)
    twin = MEMORIES[name]()
    twin.state_read(mem.state_write())
    handle.seq_cp(0, 4)
    twin.seq_cp(0, 4)
    handle.seq_keep(0)
    twin.seq_keep(0)
    assert [mem.seq_pos_max(s) for s in range(N_SEQ)] == [twin.seq_pos_max(s) for s in range(N_SEQ)]
    assert mem.seq_pos_max(0) == 4
    assert mem.state_write() == twin.state_write()
    handle.clear()
    assert mem.seq_pos_max(0) == -1


def test_decode_step_writes_cells_in_input_order(drv):
    mem = kv()
    handle = drv.Memory(mem)
    for seq, n in ((3, 4), (1, 2), (5, 6)):
        handle.init_batch(np.arange(n), [seq] * n)[1].apply()
    info, rows, pos, ctx = handle.decode_step([5, 1, 3], [7, 8, 9])
    assert info["status"] == 0 and info["n_ubatches"] == 1
    assert pos.tolist() == [6, 2, 4]
    ub = ctx.ubatch()
    slot, k_idxs = ctx.kv_slot(0)
    assert rows[ub["batch_idx"]].tolist() == k_idxs.tolist()
    assert info["n_kv"] == slot["n_kv"]
    mask = ctx.kq_mask()
    assert mask.shape == (3, info["n_kv"])
    cells = mem.cells()  # a Python call: the C context is stale from here on
    for seq, row, p in zip([5, 1, 3], rows.tolist(), pos.tolist()):
        assert cells["pos"][0][row] == p and cells["seqs"][0][row] == (seq,)
    with pytest.raises(drv.CapiError):
        ctx.kq_mask()
    ctx.free()
    # a full cache: FAILED_PREPARE, nothing changed
    small = KVCache(n_layer=1, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=4, n_seq_max=4)
    h = drv.Memory(small)
    h.init_batch(np.arange(4), [0] * 4)[1].apply()
    before = small.state_write()
    info, *_ = h.decode_step([0, 1])
    assert info["status"] == 2
    assert small.state_write() == before
    with pytest.raises(drv.CapiError) as e:
        h.decode_step([1, 1])
    assert e.value.rc == -1 and "twice" in e.value.message


def test_recurrent_states_through_the_c_api(drv):
    mem = recurrent()
    handle = drv.Memory(mem)
    info, _rows, pos, ctx = handle.decode_step([0, 1])
    assert info["status"] == 0 and pos.tolist() == [0, 0]
    slot, copies = ctx.rs_slot()
    assert slot["n_seqs"] == 2 and len(copies) == slot["n_rs"]
    states = np.empty((2, 6), np.float32)
    ctx.rs_gather(1, 0, states)
    new = np.arange(12, dtype=np.float32).reshape(2, 6)
    ctx.rs_store(1, 0, new)
    ctx.rs_gather(0, 0, np.empty((2, 4), np.float32))
    ctx.rs_store(0, 0, np.ones((2, 4), np.float32))
    ctx.free()
    cell = mem.cells()["tail"][1]
    np.testing.assert_array_equal(mem.s(0)[cell], new[1])
    r, rb, s, sb = handle.layer_rs(0)
    assert (s, sb) == (mem.s(0).ctypes.data, mem.s(0).nbytes)
    with pytest.raises(drv.CapiError) as e:
        handle.layer_rs(5)
    assert e.value.rc == -1


def test_p_states_through_the_c_api(drv):
    # kind 2: the third per-layer array (RecurrentMemory(n_embd_p=...)), where a layer has one
    mem = RecurrentMemory(n_layer=2, n_embd_r=4, n_embd_s=6, mem_size=N_SEQ, n_seq_max=N_SEQ, n_embd_p=[3, 0])
    handle = drv.Memory(mem)
    info, _rows, _pos, ctx = handle.decode_step([0, 1])
    assert info["status"] == 0
    ctx.rs_gather(2, 0, np.empty((2, 3), np.float32))
    new = np.arange(6, dtype=np.float32).reshape(2, 3)
    ctx.rs_store(2, 0, new)
    for kind, il in ((2, 1), (3, 0)):  # layer 1 has no P; kind 3 does not exist
        with pytest.raises(drv.CapiError) as e:
            ctx.rs_gather(kind, il, np.empty((2, 3), np.float32))
        assert e.value.rc == -1
    ctx.free()
    np.testing.assert_array_equal(mem.p(0)[mem.cells()["tail"][1]], new[1])


def test_layer_buffers_are_the_python_arrays(drv):
    mem = kv_iswa()
    handle = drv.Memory(mem)
    for il, cache in ((0, mem.swa), (1, mem.base)):
        part, k, kb, v, vb = handle.layer_kv(il)
        assert part == (1 if cache is mem.swa else 0)
        assert (k, kb, v, vb) == (mem.k(il).ctypes.data, mem.k(il).nbytes, mem.v(il).ctypes.data, mem.v(il).nbytes)


# -- the lock and the modification counters -------------------------------------------------------

def test_lock_is_memory_lock(drv):
    mem = hybrid()
    handle = drv.Memory(mem)
    assert type(mem.lock).__name__ == "MemoryLock"
    assert mem.lock is mem.mem_attn.lock is mem.mem_recr.lock
    # re-entrant across the two sides on one thread
    with mem.lock:
        handle.lock()
        with mem.lock:
            assert handle.seq_pos_max(0) == -1
        handle.unlock()
        assert mem.lock._is_owned()
    assert not mem.lock.locked()
    with pytest.raises(drv.CapiError) as e:
        handle.unlock()
    assert e.value.rc == -9
    with pytest.raises(RuntimeError):
        mem.lock.release()


def test_lock_excludes_the_other_side(drv):
    mem = kv()
    handle = drv.Memory(mem)
    order = []
    held = threading.Event()
    done = threading.Event()

    def python_holder():
        with mem.lock:
            held.set()
            done.wait(5)
            order.append("python released")

    t = threading.Thread(target=python_holder)
    t.start()
    held.wait(5)
    assert not handle.try_lock()
    done.set()
    handle.lock()  # waits (without the GIL) for the Python holder
    order.append("c took it")
    assert handle.try_lock()
    handle.unlock()
    handle.unlock()
    t.join()
    assert order == ["python released", "c took it"]
    # and a Python acquire waits for a C holder
    handle.lock()
    assert mem.lock.acquire(blocking=False) is False or mem.lock._is_owned()
    got = []
    t = threading.Thread(target=lambda: got.append(mem.lock.acquire(timeout=0.05)))
    t.start()
    t.join()
    assert got == [False]
    handle.unlock()
    assert mem.lock.acquire(timeout=1)
    mem.lock.release()


def test_threads_share_a_memory(drv):
    """A nogil Cython loop and Python threads on one memory: every call atomic, nothing lost."""
    mem = kv()
    handle = drv.Memory(mem)
    errors = []

    def c_worker():
        try:
            for _ in range(200):
                handle.lock()
                try:
                    info, _rows, _pos, _ctx = handle.decode_step([0, 1], keep_context=False)
                    if info["status"] == 0:
                        handle.seq_rm(0, handle.seq_pos_max(0), -1)
                        handle.seq_rm(1, handle.seq_pos_max(1), -1)
                finally:
                    handle.unlock()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def py_worker():
        try:
            for _ in range(200):
                with mem.lock:
                    ctx = mem.init_batch(Batch(token=[1], seq_id=[2]), 4)
                    for _ub in ctx:
                        pass
                    mem.seq_rm(2, mem.seq_pos_max(2), -1)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=c_worker), threading.Thread(target=py_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert mem.used == 0


def test_c_changes_make_python_contexts_stale(drv):
    mem = kv_iswa()
    handle = drv.Memory(mem)
    ctx = mem.init_batch(Batch(token=[1, 2], seq_id=[0, 0]), 8)
    handle.seq_rm(0)  # a change through C
    with pytest.raises(StaleContextError):
        ctx.apply()
    # a C read changes nothing: a plan made after it stays fresh
    ctx = mem.init_batch(Batch(token=[1, 2], seq_id=[0, 0]), 8)
    handle.seq_pos_max(0)
    for _ub in ctx:
        pass
    assert mem.seq_pos_max(0) == 1


def test_python_calls_make_c_contexts_stale(drv):
    mem = hybrid()
    handle = drv.Memory(mem)
    status, ctx = handle.init_batch([1, 2], [0, 0])
    mem.seq_pos_max(0)  # any Python call on the memory: C cannot tell what it did
    with pytest.raises(drv.CapiError) as e:
        ctx.apply()
    assert e.value.rc == -4 and "changed after this context was planned" in e.value.message
    assert mem.seq_pos_max(0) == -1
    ctx.free()
    # holding the lock from the plan to the apply keeps it fresh; C changes of its own do not count
    handle.lock()
    status, ctx = handle.init_batch([1, 2], [0, 0])
    ctx.apply()
    handle.unlock()
    ctx.free()
    assert mem.seq_pos_max(0) == 1
    status, ctx = handle.init_batch([3], [0])
    handle.seq_rm(0, 1, -1)
    with pytest.raises(drv.CapiError) as e:
        ctx.apply()
    assert e.value.rc == -4
    ctx.free()


# -- errors are return codes ----------------------------------------------------------------------

def test_errors_are_return_codes(drv):
    with pytest.raises(drv.CapiError) as e:
        drv.Memory(object())
    assert e.value.rc == -8 and "not an llmem memory" in e.value.message
    mem = kv()
    handle = drv.Memory(mem)
    with pytest.raises(drv.CapiError) as e:
        handle.seq_rm(300)
    assert e.value.rc == -1 and "300" in e.value.message
    with pytest.raises(drv.CapiError) as e:
        handle.init_batch([-5], [0])
    assert e.value.rc == -2 and e.value.message.startswith("BAD_TOKEN")
    with pytest.raises(drv.CapiError) as e:
        handle.init_batch([1], [0], n_ubatch=0)
    assert e.value.rc == -1
    with pytest.raises(drv.CapiError) as e:
        handle.state_read(b"\x01\x02\x03")
    assert e.value.rc == -3
    with pytest.raises(drv.CapiError) as e:
        handle.state_write_into(bytearray(2))
    assert e.value.rc == -5 and "needs" in e.value.message
    with pytest.raises(drv.CapiError) as e:
        handle.state_size(-1, 1 << 31)
    assert e.value.rc == -1
    rec = drv.Memory(recurrent())
    with pytest.raises(drv.CapiError) as e:
        rec.seq_div(0, 0, -1, 0)
    assert e.value.rc == -1
    # a refused K-shift (no rope): LlmemError's code, nothing changed
    norope = KVCache(n_layer=1, n_embd_k_gqa=4, n_embd_v_gqa=4, kv_size=8, n_seq_max=1)
    h = drv.Memory(norope)
    h.init_batch([1, 2], [0, 0])[1].apply()
    h.seq_add(0, 0, -1, 2)
    with pytest.raises(drv.CapiError) as e:
        h.update()
    assert e.value.rc == -6 and "rope" in e.value.message
    assert norope.get_has_shift()


def test_handle_keeps_the_memory_alive(drv):
    import gc
    import weakref

    mem = kv()
    lock_ref = weakref.ref(mem.lock)
    handle = drv.Memory(mem)
    handle.py_memory = None
    del mem
    gc.collect()
    assert lock_ref() is not None
    handle.init_batch([1, 2, 3], [0, 0, 0])[1].apply()
    assert handle.seq_pos_max(0) == 2
    del handle
    gc.collect()
    assert lock_ref() is None  # released with the handle (the lock's registry cycle collected)


# -- a toy model decoding through the C API -------------------------------------------------------

class CapiKVContext:
    """What ToyTransformer._attention_cached reads from a KV context, taken from a C context."""

    def __init__(self, mem: KVCache, ctx) -> None:
        self.cache = mem
        self._ctx = ctx
        self._slot, self._rows = ctx.kv_slot(0)
        self.n_kv = self._slot["n_kv"]

    def k_idxs(self):
        return self._rows

    def cpy_k(self, il, k):
        K = self.cache.k(il)
        K.reshape(-1, K.shape[2])[self._rows] = k

    def cpy_v(self, il, v):
        V = self.cache.v(il)
        V.reshape(-1, V.shape[2])[self._rows] = v

    def get_k(self, il):
        return self.cache.k(il)[self._slot["s0"]:self._slot["s1"] + 1, :self.n_kv]

    def get_v(self, il):
        return self.cache.v(il)[self._slot["s0"]:self._slot["s1"] + 1, :self.n_kv]

    def kq_mask(self):
        return self._ctx.kq_mask(0, True)


def forward_through_capi(model, ctx, mem):
    logits = []
    while True:
        ub = ctx.ubatch()
        view = types.SimpleNamespace(token=ub["token"], pos=ub["pos"], output=ub["output"], n_seqs=ub["n_seqs"],
                                     n_seq_tokens=ub["n_seq_tokens"])
        out = model._forward_ubatch(view, CapiKVContext(mem, ctx), 0)
        logits.append((ub["batch_idx"][ub["output"]], out))
        if not ctx.next():
            break
        ctx.apply()
    return logits


@pytest.mark.parametrize("unified", [True, False])
def test_toy_transformer_cached_decode_through_capi_equals_forward_full(drv, unified):
    model = ToyTransformer(seed=3)
    mem = model.new_memory(n_ctx=64, n_seq_max=3, v_trans=False, unified=unified)
    handle = drv.Memory(mem)
    rng = np.random.default_rng(5)
    vocab = model.config.n_vocab
    history = {s: list(rng.integers(0, vocab, size=int(rng.integers(2, 9)))) for s in range(3)}
    for seq, prompt in history.items():
        status, ctx = handle.init_batch(prompt, [seq] * len(prompt), output=[1] * len(prompt), n_ubatch=4)
        assert status == 0
        ctx.apply()
        outs = forward_through_capi(model, ctx, mem)
        ctx.free()
        got = np.concatenate([o for _i, o in outs])
        np.testing.assert_allclose(got, model.forward_full(prompt), rtol=1e-4, atol=1e-5)
    for step in range(6):
        seqs = [s for s in range(3) if (step + s) % 3 != 0]
        tokens = [int(rng.integers(0, vocab)) for _ in seqs]
        info, rows, pos, ctx = handle.decode_step(seqs, tokens)
        assert info["status"] == 0
        for seq, tok in zip(seqs, tokens):
            history[seq].append(tok)
        outs = forward_through_capi(model, ctx, mem)
        ctx.free()
        idx = np.concatenate([i for i, _o in outs])
        by_input = np.concatenate([o for _i, o in outs])[np.argsort(idx)]
        for i, seq in enumerate(seqs):
            assert pos[i] == len(history[seq]) - 1
            np.testing.assert_allclose(by_input[i], model.forward_full(history[seq])[-1], rtol=1e-4, atol=1e-5)
        if step == 3:
            # a request cut back by two tokens (as a server rejecting a draft) through the C API
            handle.seq_rm(seqs[0], len(history[seqs[0]]) - 2, -1)
            history[seqs[0]] = history[seqs[0]][:-2]


# -- the files a consumer builds against -----------------------------------------------------------

def test_include_pxd_and_cmake_dir_are_installed():
    inc = llmem.get_include()
    assert os.path.isfile(os.path.join(inc, "llmem", "llmem_capi.h"))
    pkg = os.path.dirname(llmem.__file__)
    assert os.path.isfile(os.path.join(pkg, "capi.pxd"))
    assert os.path.isfile(os.path.join(llmem.get_cmake_dir(), "llmemConfig.cmake"))
    assert llmem._core.CAPI_VERSION >= 1


CONSUMER_CMAKE = """
cmake_minimum_required(VERSION 3.18)
project(llmem_consumer LANGUAGES C CXX)
find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)
find_package(llmem CONFIG REQUIRED)
Python_add_library(llmem_consumer MODULE WITH_SOABI consumer.cpp)
target_link_libraries(llmem_consumer PRIVATE llmem::capi)
target_compile_features(llmem_consumer PRIVATE cxx_std_17)
target_compile_options(llmem_consumer PRIVATE -Wall -Wextra -Werror)
add_library(llmem_c_check OBJECT c_check.c)
target_link_libraries(llmem_c_check PRIVATE llmem::capi)
target_compile_options(llmem_c_check PRIVATE -Wall -Wextra -Werror -std=c99 -pedantic)
"""

CONSUMER_C = """
/* the header alone compiles as strict C99 */
#include <llmem/llmem_capi.h>
int llmem_c_check_version(void) { return LLMEM_CAPI_VERSION; }
"""

CONSUMER_CPP = r"""
// A C++ extension module built against the installed llmem: decode steps without the GIL.
#include <Python.h>
#include <llmem/llmem_capi.h>

#include <string>
#include <vector>

static const llmem_capi * api = nullptr;

static PyObject * serve(PyObject *, PyObject * args) {
    PyObject * memory = nullptr;
    int n_steps = 0;
    if (!PyArg_ParseTuple(args, "Oi", &memory, &n_steps)) return nullptr;
    char err[256] = "";
    llmem_memory * mem = nullptr;
    if (api->memory_get(memory, &mem, err, sizeof err) != LLMEM_OK) {
        PyErr_SetString(PyExc_RuntimeError, err);
        return nullptr;
    }
    std::vector<int32_t> seqs = { 0, 1, 2 };
    std::vector<int64_t> rows(seqs.size());
    std::vector<int32_t> pos(seqs.size());
    long sum = 0;
    int rc = LLMEM_OK;
    int32_t last = -1;
    Py_BEGIN_ALLOW_THREADS
    for (int s = 0; s < n_steps && rc == LLMEM_OK; ++s) {
        llmem_step step{};
        rc = api->decode_step(mem, seqs.data(), nullptr, uint32_t(seqs.size()), 0, &step, rows.data(), pos.data(),
                              nullptr, err, sizeof err);
        for (int32_t p : pos) sum += p;
    }
    if (rc == LLMEM_OK) rc = api->seq_pos_max(mem, 2, &last, err, sizeof err);
    Py_END_ALLOW_THREADS
    api->memory_release(mem);
    if (rc != LLMEM_OK) {
        PyErr_SetString(PyExc_RuntimeError, err);
        return nullptr;
    }
    return Py_BuildValue("li", sum, int(last));
}

static PyMethodDef methods[] = { { "serve", serve, METH_VARARGS, nullptr }, { nullptr, nullptr, 0, nullptr } };
static PyModuleDef module = { PyModuleDef_HEAD_INIT, "llmem_consumer", nullptr, -1, methods,
                              nullptr, nullptr, nullptr, nullptr };

PyMODINIT_FUNC PyInit_llmem_consumer(void) {
    api = llmem_capi_import();
    if (api == nullptr) return nullptr;
    return PyModule_Create(&module);
}
"""


def test_cpp_consumer_finds_llmem_with_cmake(tmp_path):
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert cmake, "cmake is needed (pip install cmake: part of the test environment)"
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CONSUMER_CMAKE)
    (src / "consumer.cpp").write_text(CONSUMER_CPP)
    (src / "c_check.c").write_text(CONSUMER_C)
    build = tmp_path / "build"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    configure = [cmake, "-S", str(src), "-B", str(build), f"-Dllmem_DIR={llmem.get_cmake_dir()}",
                 f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja", path=env["PATH"]):
        configure += ["-G", "Ninja"]
    done = subprocess.run(configure, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    built = subprocess.run([cmake, "--build", str(build)], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = [p for p in build.rglob("llmem_consumer*") if p.name.endswith(suffix)]
    assert built
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmem_consumer", built[0])
    consumer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(consumer)
    mem = kv()
    total, last = consumer.serve(mem, 5)
    assert last == 4 and total == 3 * sum(range(5))
    assert [mem.seq_pos_max(s) for s in range(3)] == [4, 4, 4]


def test_lock_is_threadsanitizer_clean(tmp_path):
    """The lock shared by Python and C, built with -fsanitize=thread and hammered by C threads
    without the GIL and threads holding it (capi_ext/lock_tsan.cpp): no race reported, and the
    counts only a mutual exclusion gives."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    assert cxx, "a C++ compiler is needed"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    libdir = sysconfig.get_config_var("LIBDIR")
    assert sysconfig.get_config_var("Py_ENABLE_SHARED"), "the harness embeds a shared libpython"
    exe = tmp_path / "lock_tsan"
    cmd = [cxx, "-std=c++17", "-fsanitize=thread", "-g", "-O1", "-I", os.path.join(root, "csrc", "capi"),
           "-I", sysconfig.get_paths()["include"], os.path.join(os.path.dirname(__file__), "capi_ext", "lock_tsan.cpp"),
           os.path.join(root, "csrc", "capi", "memory_lock.cpp"), "-o", str(exe), f"-L{libdir}",
           f"-lpython{sysconfig.get_config_var('LDVERSION')}", f"-Wl,-rpath,{libdir}", "-ldl", "-lm", "-lpthread"]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    env.pop("LD_PRELOAD", None)
    ran = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert "ThreadSanitizer" not in ran.stderr, ran.stderr[-4000:]
    assert ran.returncode == 0 and ran.stdout.strip().endswith(": ok"), ran.stdout + ran.stderr[-2000:]
