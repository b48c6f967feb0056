"""The Memory / MemoryContext protocol, exercised through a small Python memory that keeps one
position range per sequence (enough to drive the allocator and the context loop)."""

import os

import pytest

import llmem
from llmem import Batch, BatchAllocator, LlmemError, Memory, MemoryContext, Status


class ListContext(MemoryContext):
    __slots__ = ("_memory", "_ubatches", "_i", "_status", "applied")

    def __init__(self, memory, ubatches, status=Status.SUCCESS):
        self._memory, self._ubatches, self._i, self._status = memory, ubatches, 0, status
        self.applied = []

    @property
    def status(self):
        return self._status

    def next(self):
        self._i += 1
        return self._i < len(self._ubatches)

    def apply(self):
        if not self._ubatches:
            return True
        ub = self._ubatches[self._i]
        for p, ids in zip(ub.pos.tolist(), ub.seq_id_list):
            for s in ids:
                lo, hi = self._memory.ranges.get(s, (p, p))
                self._memory.ranges[s] = (min(lo, p), max(hi, p))
        self.applied.append(self._i)
        return True

    @property
    def ubatch(self):
        return self._ubatches[self._i] if self._ubatches else None


class RangeMemory(Memory):
    """Positions only: what a memory must provide to take part in batch validation."""

    def __init__(self, n_seq_max=4):
        self.ranges = {}
        self._n_seq_max = n_seq_max

    def init_batch(self, balloc_or_batch, n_ubatch, embd_all=False):
        balloc = self._allocator_for(balloc_or_batch)
        balloc.split_reset()
        ubs = []
        while ub := balloc.split_simple(n_ubatch):
            ubs.append(ub)
        return ListContext(self, ubs)

    def init_full(self):
        return ListContext(self, [])

    def init_update(self, optimize=False):
        return ListContext(self, [], Status.NO_UPDATE)

    def clear(self, data=True):
        self.ranges.clear()

    def seq_rm(self, seq_id, p0=-1, p1=-1):
        self.ranges.pop(seq_id, None)
        return True

    def seq_cp(self, seq_id_src, seq_id_dst, p0=-1, p1=-1):
        if seq_id_src in self.ranges:
            self.ranges[seq_id_dst] = self.ranges[seq_id_src]

    def seq_keep(self, seq_id):
        self.ranges = {s: r for s, r in self.ranges.items() if s == seq_id}

    def seq_add(self, seq_id, p0, p1, shift):
        lo, hi = self.ranges[seq_id]
        self.ranges[seq_id] = (lo + shift, hi + shift)

    def seq_div(self, seq_id, p0, p1, d):
        lo, hi = self.ranges[seq_id]
        self.ranges[seq_id] = (lo // d, hi // d)

    def seq_pos_min(self, seq_id):
        return self.ranges.get(seq_id, (-1, -1))[0]

    def seq_pos_max(self, seq_id):
        return self.ranges.get(seq_id, (-1, -1))[1]

    def get_can_shift(self):
        return True

    def memory_breakdown(self):
        return {}

    size = property(lambda self: 0)
    used = property(lambda self: len(self.ranges))
    head = property(lambda self: 0)
    n_seq_max = property(lambda self: self._n_seq_max)

    def cells(self):
        return dict(self.ranges)

    def state_write(self, seq_id=-1, flags=0):
        items = sorted(self.ranges.items()) if seq_id < 0 else [(seq_id, self.ranges[seq_id])]
        return ";".join(f"{s}:{lo}:{hi}" for s, (lo, hi) in items).encode()

    def state_read(self, data, seq_id=-1, flags=0):
        parsed = {}
        for part in filter(None, data.decode().split(";")):
            s, lo, hi = map(int, part.split(":"))
            parsed[s if seq_id < 0 else seq_id] = (lo, hi)
        if seq_id < 0:
            self.ranges = parsed
        else:
            self.ranges.update(parsed)


def test_the_interface_is_abstract():
    with pytest.raises(TypeError):
        Memory()
    with pytest.raises(TypeError):
        MemoryContext()

    class Partial(Memory):
        def clear(self, data=True):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()


def test_every_documented_method_is_part_of_the_interface():
    expected = {"init_batch", "init_full", "init_update", "clear", "seq_rm", "seq_cp", "seq_keep",
                "seq_add", "seq_div", "seq_pos_min", "seq_pos_max", "get_can_shift", "memory_breakdown",
                "state_write", "state_read", "size", "used", "head", "n_seq_max", "cells"}
    assert expected == set(Memory.__abstractmethods__)
    assert {"status", "next", "apply", "ubatch"} == set(MemoryContext.__abstractmethods__)
    assert callable(Memory.save) and callable(Memory.load)


def test_batch_context_loop_applies_each_ubatch_once():
    mem = RangeMemory()
    ctx = mem.init_batch(Batch(token=[1, 2, 3, 4, 5]), n_ubatch=2)
    seen = [ub.pos.tolist() for ub in ctx]
    assert seen == [[0, 1], [2, 3], [4]]
    assert ctx.applied == [0, 1, 2]
    assert mem.seq_pos_max(0) == 4
    # positions continue from what the memory holds
    ctx = mem.init_batch(Batch(token=[7]), n_ubatch=8)
    assert [ub.pos.tolist() for ub in ctx] == [[5]]


def test_llama_cpp_style_loop():
    mem = RangeMemory()
    ctx = mem.init_batch(Batch(token=[1, 2, 3]), n_ubatch=1)
    positions = []
    ctx.apply()
    positions.append(ctx.ubatch.pos[0])
    while ctx.next():
        ctx.apply()
        positions.append(ctx.ubatch.pos[0])
    assert positions == [0, 1, 2]


def test_failed_and_empty_contexts():
    mem = RangeMemory()
    with pytest.raises(LlmemError, match="FAILED_PREPARE"):
        list(ListContext(mem, [], Status.FAILED_PREPARE))
    assert list(mem.init_update()) == []
    full = mem.init_full()
    assert list(full) == [] and full.status == Status.SUCCESS


def test_allocator_argument_forms():
    mem = RangeMemory(n_seq_max=3)
    balloc = BatchAllocator(3)
    balloc.init(Batch(token=[1, 2], seq_id=[2, 2]), memory=mem)
    assert [ub.seq_id_unq.tolist() for ub in mem.init_batch(balloc, 4)] == [[2]]
    with pytest.raises(TypeError, match="balloc_or_batch"):
        mem.init_batch([1, 2, 3], 4)
    with pytest.raises(llmem.BatchError, match="seq_id"):
        mem.init_batch(Batch(token=[1], seq_id=[3]), 4)


def test_save_and_load_round_trip(tmp_path):
    mem = RangeMemory()
    list(mem.init_batch(Batch(token=[1, 2, 3], seq_id=[0, 1, 1]), 8))
    path = tmp_path / "state.bin"
    mem.save(path)
    other = RangeMemory()
    other.load(path)
    assert other.ranges == mem.ranges == {0: (0, 0), 1: (0, 1)}
    mem.save(str(tmp_path / "one.bin"), seq_id=1)
    fresh = RangeMemory()
    fresh.load(tmp_path / "one.bin", seq_id=3)
    assert fresh.ranges == {3: (0, 1)}


def test_save_is_atomic(tmp_path):
    class Exploding(RangeMemory):
        def state_write(self, seq_id=-1, flags=0):
            return memoryview(b"partial")  # fine

    path = tmp_path / "state.bin"
    path.write_bytes(b"old")
    mem = RangeMemory()
    mem.state_write = lambda seq_id=-1, flags=0: 12345  # not bytes: the write into the temp file fails
    with pytest.raises(TypeError):
        mem.save(path)
    assert path.read_bytes() == b"old"
    Exploding().save(path)
    assert path.read_bytes() == b"partial"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    assert not any(name.startswith(".llmem-") for name in os.listdir(tmp_path))
