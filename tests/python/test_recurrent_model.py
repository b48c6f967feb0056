"""Model-based test: random operation sequences on RecurrentMemory and on the slow pure-Python
reference written from the spec (tests/python/reference/ref_recurrent.py), comparing every
observable after every step: return values, statuses, s_copy rows, head / n / rs_z, used, the
cell snapshot, pending rollbacks, positions and state-block metadata."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import llmem
from llmem import BatchError, LlmemError, RecurrentMemory, StateError, Status
from hypothesis_profiles import model_settings
from reference.ref_recurrent import RefRecurrent

POS = st.integers(-1, 12)


def parse_meta(blob: bytes, whole: bool) -> list[tuple[int, tuple[int, ...]]]:
    """The cell list at the front of a recurrent state block."""
    (count,), off = struct.unpack_from("<I", blob, 0), 4
    cells = []
    for _ in range(count):
        pos, n_ids = struct.unpack_from("<iI", blob, off)
        off += 8
        ids = struct.unpack_from(f"<{n_ids}i", blob, off)
        off += 4 * n_ids
        cells.append((pos, tuple(ids)))
    assert whole or all(not ids for _, ids in cells)
    return cells


def ubatch_sets(ub) -> list[tuple[list[int], int, int]]:
    """A micro-batch as the reference takes it: per set (ids in entry order, T, last position)."""
    t = ub.n_seq_tokens
    ids = ub.seq_id_list
    pos = ub.pos
    return [(list(ids[s * t]), t, int(pos[s * t + t - 1])) for s in range(ub.n_seqs)]


class RecurrentMachine(RuleBasedStateMachine):
    @initialize(size=st.integers(1, 6), n_seq_max=st.integers(1, 6), n_rs_seq=st.integers(0, 2),
                compat=st.sampled_from(["b11312", "b11549"]))
    def setup(self, size, n_seq_max, n_rs_seq, compat):
        self.mem = RecurrentMemory(1, 1, 2, mem_size=size, n_seq_max=n_seq_max, n_rs_seq=n_rs_seq, compat=compat)
        self.ref = RefRecurrent(size, n_seq_max, n_rs_seq, compat=compat)
        self.n_seq_max = n_seq_max

    def seq_ids(self):
        return st.integers(-2, self.n_seq_max + 1)

    # -- decoding ---------------------------------------------------------------------------------

    def _positions(self, entries):
        """Positions continuing each sequence (an entry with several ids takes the largest)."""
        next_pos = {s: self.ref.seq_pos_max(s) + 1 for s in range(self.n_seq_max)}
        pos = []
        for ids in entries:
            p = max(next_pos[s] for s in ids)
            pos.append(p)
            for s in ids:
                next_pos[s] = p + 1
        return pos

    def _decode(self, data, entries):
        keep_tail = self.ref.n_rs_seq + 1 if self.ref.n_rs_seq else 0
        n_ubatch = data.draw(st.integers(keep_tail + 1, 8), label="n_ubatch")
        embd_all = data.draw(st.booleans(), label="embd_all")
        read_copies = data.draw(st.sampled_from([True, True, True, False]), label="read_copies")
        pos = self._positions(entries)
        batch = llmem.Batch(token=np.zeros(len(entries), np.int32), pos=np.array(pos, np.int32), seq_id=entries)
        balloc = llmem.BatchAllocator(self.n_seq_max)
        try:
            balloc.init(batch, self.mem)
        except BatchError:
            return
        ctx = self.mem.init_batch(balloc, n_ubatch, embd_all)

        # the ubatches of the split llama.cpp's recurrent memory uses (spec 4.7), for the reference
        balloc.split_reset()
        ubs = []
        while True:
            ub = balloc.split_seq(n_ubatch) if embd_all else balloc.split_equal(n_ubatch, True, keep_tail)
            if ub.n_tokens == 0:
                break
            ubs.append(ubatch_sets(ub))
        ok = balloc.n_used == balloc.n_tokens and self.ref.prepare(ubs)
        assert ctx.status == (Status.SUCCESS if ok else Status.FAILED_PREPARE)
        assert (self.mem.n, self.mem.rs_z) == (self.ref.n, self.ref.rs_z)  # dry-run leftovers
        if not ok:
            return
        assert ctx.n_ubatches == len(ubs)
        for i, sets in enumerate(ubs):
            assert ctx.apply() is True
            assert self.ref.find_slot(sets)
            assert ubatch_sets(ctx.ubatch) == sets
            assert (ctx.head, ctx.n_rs, ctx.rs_z) == (self.ref.head, self.ref.n, self.ref.rs_z)
            if read_copies:
                expected = [self.ref.s_copy(k) for k in range(self.ref.n)]
                assert ctx.s_copy_all().tolist() == expected
            assert ctx.next() is (i + 1 < len(ubs))

    @rule(data=st.data())
    def decode_random(self, data):
        """Any mix of entries, some carrying two sequences (often refused by the allocator)."""
        ids = st.integers(0, self.n_seq_max - 1)
        entries = data.draw(st.lists(
            st.lists(ids, min_size=1, max_size=2, unique=True) | ids.map(lambda s: [s]),
            min_size=1, max_size=7), label="entries")
        self._decode(data, entries)

    @rule(data=st.data())
    def decode_parallel(self, data):
        """Consecutive sequences decoded together, round robin: multi-set micro-batches."""
        first = data.draw(st.integers(0, self.n_seq_max - 1), label="first")
        count = data.draw(st.integers(1, self.n_seq_max - first), label="count")
        n_tokens = data.draw(st.lists(st.integers(1, 4), min_size=count, max_size=count), label="n_tokens")
        entries = [[first + k] for t in range(max(n_tokens)) for k in range(count) if t < n_tokens[k]]
        self._decode(data, entries)

    @rule(data=st.data())
    def decode_coupled(self, data):
        """Tokens shared by two sequences at the same position (needs embd_all to be placed)."""
        if self.n_seq_max < 2:
            return
        a, b = data.draw(st.lists(st.integers(0, self.n_seq_max - 1), min_size=2, max_size=2, unique=True),
                         label="pair")
        n = data.draw(st.integers(1, 3), label="n")
        self._decode(data, [[a, b]] * n)

    @rule(data=st.data())
    def rollback(self, data):
        """A cut into the end of a sequence, often within reach of the snapshots."""
        seq = data.draw(st.integers(0, self.n_seq_max - 1), label="seq")
        last = self.ref.seq_pos_max(seq)
        back = data.draw(st.integers(1, self.ref.n_rs_seq + 1), label="back")
        p1 = data.draw(st.sampled_from([-1, last + 1, last + 5]), label="p1")
        p0 = last - back + 1
        assert self.mem.seq_rm(seq, p0, p1) == self.ref.seq_rm(seq, p0, p1)

    # -- sequence operations ----------------------------------------------------------------------

    @rule(data=st.data(), p0=POS, p1=POS)
    def seq_rm(self, data, p0, p1):
        seq = data.draw(self.seq_ids(), label="seq")
        assert self.mem.seq_rm(seq, p0, p1) == self.ref.seq_rm(seq, p0, p1)

    @rule(data=st.data(), p0=POS, p1=POS)
    def seq_cp(self, data, p0, p1):
        src, dst = data.draw(self.seq_ids(), label="src"), data.draw(self.seq_ids(), label="dst")
        last = self.mem.seq_pos_max(src)
        if last >= 0 and not (p0 < 0 and p1 < 0) and not max(p0, 0) <= last < (p1 if p1 >= 0 else 2**31):
            # deviation R16: a range leaving out the source's last position is refused
            with pytest.raises(ValueError, match="wrong state"):
                self.mem.seq_cp(src, dst, p0, p1)
            return
        self.mem.seq_cp(src, dst, p0, p1)
        self.ref.seq_cp(src, dst, p0, p1)

    @rule(data=st.data())
    def seq_keep(self, data):
        seq = data.draw(self.seq_ids(), label="seq")
        self.mem.seq_keep(seq)
        self.ref.seq_keep(seq)

    @rule(data=st.data(), p0=POS, p1=POS, shift=st.integers(-6, 6))
    def seq_add(self, data, p0, p1, shift):
        seq = data.draw(self.seq_ids(), label="seq")
        self.mem.seq_add(seq, p0, p1, shift)
        self.ref.seq_add(seq, p0, p1, shift)

    @rule(data=st.data(), p0=POS, p1=POS, d=st.integers(-3, 3))
    def seq_div(self, data, p0, p1, d):
        seq = data.draw(self.seq_ids(), label="seq")
        if d == 0:
            try:
                self.mem.seq_div(seq, p0, p1, d)
            except ValueError:
                return
            raise AssertionError("seq_div by 0 did not raise")
        self.mem.seq_div(seq, p0, p1, d)
        self.ref.seq_div(seq, p0, p1, d)

    @rule(data_too=st.booleans())
    def clear(self, data_too):
        self.mem.clear(data_too)
        self.ref.clear()

    # -- state bytes ------------------------------------------------------------------------------

    @rule()
    def whole_round_trip(self):
        if self.ref.state_write_refused(-1):
            try:
                self.mem.state_write(-1)
            except LlmemError:
                return
            raise AssertionError("state_write(-1) should have been refused")
        blob = self.mem.state_write(-1)
        cells = parse_meta(blob, whole=True)
        assert cells == self.ref.state_write_meta(-1)
        ok = self.ref.state_read_meta(-1, cells)
        try:
            self.mem.state_read(blob, -1)
        except StateError:
            assert not ok
        else:
            assert ok

    @rule(data=st.data())
    def sequence_round_trip(self, data):
        src = data.draw(st.integers(0, self.n_seq_max - 1), label="src")
        dst = data.draw(st.integers(0, self.n_seq_max - 1), label="dst")
        blob = self.mem.state_write(src)
        cells = parse_meta(blob, whole=False)
        assert cells == self.ref.state_write_meta(src)
        ok = self.ref.state_read_meta(dst, cells)
        try:
            self.mem.state_read(blob, dst)
        except StateError:
            assert not ok
        else:
            assert ok

    # -- observables ------------------------------------------------------------------------------

    @invariant()
    def same_observables(self):
        if not hasattr(self, "mem"):
            return
        c = self.mem.cells()
        r = self.ref.snapshot()
        for k in ("pos", "src", "src0", "tail"):
            assert c[k].tolist() == r[k], k
        assert c["seq_ids"] == r["seq_ids"]
        assert (self.mem.used, self.mem.head) == (self.ref.used, self.ref.head)
        assert self.mem.rs_idx().tolist() == self.ref.rs_idx
        for s in range(-1, self.n_seq_max + 1):
            assert self.mem.seq_pos_min(s) == self.ref.seq_pos_min(s)
            assert self.mem.seq_pos_max(s) == self.ref.seq_pos_max(s)


RecurrentMachine.TestCase.settings = model_settings(
    200, stateful_step_count=40, suppress_health_check=[HealthCheck.filter_too_much])
TestRecurrentModel = RecurrentMachine.TestCase
