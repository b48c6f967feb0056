"""Model-based test of KVCacheISWA: random histories of decodes, sequence operations, updates and
state round-trips run on llmem.KVCacheISWA and on two independent reference caches
(reference/ref_kv.py) composed as spec §9 describes (a base cache without window, a swa cache
with it, llama.cpp's order of split attempts, operations forwarded to both, positions from the
swa cache). After every step both cell tables, heads, shifts, used counts and positions agree."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import llmem
from llmem import Batch, KVCacheISWA, Rope, StateError, SWAType

from hypothesis_profiles import model_settings
from kv_sequence_rules import draw_decode_batch, sequence_operation_rules
from reference.ref_batch import RefBatchAllocator
from reference.ref_kv import RefKV

PARTIAL_ONLY = 1


def swa_cache_size(kv_size, n_swa, n_seq_max, unified, n_ubatch, swa_full):
    """Spec §9: the swa cache's size."""
    if swa_full:
        return kv_size
    size = min(kv_size, n_swa * (n_seq_max if unified else 1) + n_ubatch)
    return (size + 255) // 256 * 256


class RefISWA:
    """Two reference caches driven as llama_kv_cache_iswa drives its pair."""

    def __init__(self, kv_size, size_swa, n_seq_max, unified, n_swa, swa_type):
        self.base = RefKV(kv_size, n_seq_max, unified, 0, SWAType.NONE)
        self.swa = RefKV(size_swa, n_seq_max, unified, n_swa, swa_type)
        self.n_seq_max = n_seq_max
        self.unified = unified

    def parts(self):
        return (self.base, self.swa)

    def seq_pos_min(self, seq):
        return self.swa.seq_pos_min(seq)

    def seq_pos_max(self, seq):
        return self.swa.seq_pos_max(seq)

    def prepare_both(self, ubatches):
        """Slots in both caches for these ubatches, or None (nothing changes either way)."""
        slots_base = self.base.prepare(ubatches)
        if slots_base is None:
            return None
        slots_swa = self.swa.prepare(ubatches)
        if slots_swa is None:
            return None
        return slots_base, slots_swa


def equal_split(toks, n_seq_max, n_ubatch, sequential, memory):
    """The equal split of the reference batch allocator, as lists of (ids, pos) tokens."""
    balloc = RefBatchAllocator(n_seq_max)
    balloc.init(token=[0] * len(toks), pos=[p for _, p in toks],
                seq_id=[list(reversed(g)) for g, _ in toks], memory=memory)
    out = []
    while True:
        ub = balloc.split_equal(n_ubatch, sequential)
        if ub.empty:
            break
        out.append([(tuple(reversed(ids)), p) for ids, p in zip(ub.seq_id, ub.pos)])
    if balloc.n_used != balloc.n_tokens:
        return None
    return out


class KVISWAModel(sequence_operation_rules(3), RuleBasedStateMachine):
    @initialize(kv_size=st.sampled_from([4, 8, 16]), n_seq_max=st.integers(1, 3), unified=st.booleans(),
                swa=st.sampled_from([(1, 2), (1, 3), (2, 4), (3, 4), (1, 5)]), swa_full=st.booleans(),
                n_ubatch_hint=st.integers(1, 8))
    def setup(self, kv_size, n_seq_max, unified, swa, swa_full, n_ubatch_hint):
        swa_type, n_swa = swa
        size_swa = swa_cache_size(kv_size, n_swa, n_seq_max, unified, n_ubatch_hint, swa_full)
        self.ref = RefISWA(kv_size, size_swa, n_seq_max, unified, n_swa, swa_type)
        self.config = dict(n_layer=2, n_embd_k_gqa=2, n_embd_v_gqa=2, kv_size=kv_size, n_seq_max=n_seq_max,
                           unified=unified, n_swa=n_swa, swa_type=swa_type, swa_full=swa_full,
                           is_swa_layer=[False, True], n_ubatch=n_ubatch_hint, dtype_k=np.float32,
                           dtype_v=np.float32, rope=Rope(2, head_dim=2))
        self.kv = KVCacheISWA(**self.config)
        assert (self.kv.base.size, self.kv.swa.size) == (kv_size, size_swa)

    # -- decode -------------------------------------------------------------------------------

    @rule(data=st.data())
    def decode(self, data):
        ref = self.ref
        toks, n_ubatch, batch = draw_decode_batch(
            data, ref, lambda t, s: all(m.seq_pos_min(t) == m.seq_pos_min(s) and m.seq_pos_max(t) == m.seq_pos_max(s)
                                        for m in (ref, ref.base)))
        ctx = self.kv.init_batch(batch, n_ubatch)
        # spec §9: simple split in both caches (unified only), else the equal split
        plan = None
        if ref.unified:
            ubatches = [toks[i:i + n_ubatch] for i in range(0, len(toks), n_ubatch)]
            slots = ref.prepare_both(ubatches)
            if slots is not None:
                plan = (ubatches, slots)
        if plan is None:
            ubatches = equal_split(toks, ref.n_seq_max, n_ubatch, not ref.unified, ref)
            slots = ref.prepare_both(ubatches) if ubatches is not None else None
            if slots is not None:
                plan = (ubatches, slots)
        if plan is None:
            assert ctx.status == llmem.Status.FAILED_PREPARE
            return
        assert ctx.status == llmem.Status.SUCCESS
        ubatches, (slots_base, slots_swa) = plan
        k = 0
        for ub in ctx:
            assert ub.pos.tolist() == [p for _, p in ubatches[k]]
            assert ctx.base.slot_cells().tolist() == [c for _, cells in slots_base[k] for c in cells]
            assert ctx.swa.slot_cells().tolist() == [c for _, cells in slots_swa[k] for c in cells]
            ref.base.apply_ubatch(slots_base[k], ubatches[k])
            ref.swa.apply_ubatch(slots_swa[k], ubatches[k])
            k += 1
        assert k == len(ubatches)

    # -- sequence operations ------------------------------------------------------------------

    def _both(self, name, *args):
        """Forward to both reference caches (base, then swa); llmem must refuse with ValueError
        and change nothing when either refuses, else return the AND of both."""
        saved = [copy.deepcopy(r) for r in self.ref.parts()] if name == "seq_cp" else None
        try:
            got = [getattr(r, name)(*args) for r in self.ref.parts()]
        except ValueError:
            if saved is not None:
                self.ref.base, self.ref.swa = saved
            before = self.kv.cells()
            with pytest.raises(ValueError):
                getattr(self.kv, name)(*args)
            after = self.kv.cells()
            for part in ("base", "swa"):
                assert np.array_equal(before[part]["pos"], after[part]["pos"])
                assert before[part]["seqs"] == after[part]["seqs"]
            return
        result = getattr(self.kv, name)(*args)
        if name == "seq_rm":
            assert result == (got[0] and got[1])

    @rule()
    def update(self):
        ctx = self.kv.init_update()
        pending = any(r.get_has_shift() for r in self.ref.parts()) \
            or self.kv.base._core.pending_copies or self.kv.swa._core.pending_copies
        assert ctx.status == (llmem.Status.SUCCESS if pending else llmem.Status.NO_UPDATE)
        if ctx.status == llmem.Status.SUCCESS:
            ctx.apply()
        for r in self.ref.parts():
            r.update()

    @rule(data_too=st.booleans())
    def clear(self, data_too):
        self.kv.clear(data_too)
        ref = self.ref  # a cleared cache is a fresh one: empty cells, heads 0, nothing pending
        self.ref = RefISWA(ref.base.size, ref.swa.size, ref.n_seq_max, ref.unified, ref.swa.n_swa,
                           ref.swa.swa_type)

    # -- state ----------------------------------------------------------------------------------

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2), partial=st.booleans(), header=st.booleans())
    def seq_state_round_trip(self, src, dst, partial, header):
        ref = self.ref
        if src >= ref.n_seq_max or dst >= ref.n_seq_max:
            return
        flags = (PARTIAL_ONLY if partial else 0) | (llmem.STATE_HEADER if header else 0)
        blob = self.kv.state_write(src, flags)
        saved = [copy.deepcopy(r) for r in ref.parts()]
        parts = (ref.swa,) if partial else ref.parts()
        positions = [r.seq_state_cells(src) for r in parts]
        ok = all(r.seq_state_restore(p, dst) for r, p in zip(parts, positions))
        if ok:
            self.kv.state_read(blob, dst, flags)
            return
        ref.base, ref.swa = saved  # llmem restores all or nothing (docs/deviations.md)
        before = self.kv.cells()
        with pytest.raises(StateError):
            self.kv.state_read(blob, dst, flags)
        after = self.kv.cells()
        for part in ("base", "swa"):
            assert np.array_equal(before[part]["pos"], after[part]["pos"])
            assert before[part]["seqs"] == after[part]["seqs"]
            assert before[part]["head"] == after[part]["head"]

    @rule()
    def whole_state_into_fresh_cache(self):
        other = KVCacheISWA(**self.config)
        blob = self.kv.state_write(-1)
        other.state_read(blob)
        got = other.cells()
        for part, r in zip(("base", "swa"), self.ref.parts()):
            for s in range(r.n_stream):
                used = [c for c in r.cells[s] if c.pos != -1]
                n = len(used)
                assert got[part]["pos"][s][:n].tolist() == [c.pos for c in used]
                assert (got[part]["pos"][s][n:] == -1).all()
                assert got[part]["seqs"][s][:n] == [tuple(sorted(c.seqs)) for c in used]
                assert got[part]["head"][s] == 0
        assert other.state_write(-1) == blob

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_cells(self):
        if not hasattr(self, "ref"):
            return
        got = self.kv.cells()
        for part, r, cache in zip(("base", "swa"), self.ref.parts(), (self.kv.base, self.kv.swa)):
            exp = r.snapshot()
            assert got[part]["pos"].tolist() == exp["pos"], part
            assert got[part]["seqs"] == exp["seqs"], part
            assert got[part]["shift"].tolist() == exp["shift"], part
            assert got[part]["head"] == exp["head"], part
            assert cache.used == r.used(), part
            assert cache.get_has_shift() == r.get_has_shift(), part
            assert cache._core.check_invariants()
        for s in range(self.ref.n_seq_max):
            assert self.kv.seq_pos_min(s) == self.ref.seq_pos_min(s)
            assert self.kv.seq_pos_max(s) == self.ref.seq_pos_max(s)
        assert self.kv.used == self.ref.base.used()


TestKVISWAModel = KVISWAModel.TestCase
TestKVISWAModel.settings = model_settings(100, stateful_step_count=40)
