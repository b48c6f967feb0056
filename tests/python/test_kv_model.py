"""Model-based test: random histories of decodes, sequence operations, updates and state
round-trips run on llmem.KVCache and on the independent reference (reference/ref_kv.py); after
every step the chosen cells, the cell table, heads, seq_pos_min/max and has_shift must agree."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import llmem
from llmem import Batch, KVCache, Rope, StateError

from hypothesis_profiles import model_settings
from kv_sequence_rules import draw_decode_batch, sequence_operation_rules
from reference.ref_kv import RefKV, is_masked_swa



class KVModel(sequence_operation_rules(4), RuleBasedStateMachine):
    @initialize(size=st.sampled_from([4, 8, 16]), n_seq_max=st.integers(1, 4), unified=st.booleans(),
                swa=st.sampled_from([(0, 0), (1, 2), (1, 3), (2, 4), (3, 4), (1, 5)]))
    def setup(self, size, n_seq_max, unified, swa):
        swa_type, n_swa = swa
        self.ref = RefKV(size, n_seq_max, unified, n_swa, swa_type)
        self.kv = KVCache(1, 2, 2, size, n_seq_max=n_seq_max, unified=unified, n_swa=n_swa,
                          swa_type=swa_type, dtype_k=np.float32, dtype_v=np.float32,
                          rope=Rope(2, head_dim=2))

    # -- decode -------------------------------------------------------------------------------

    @rule(data=st.data())
    def decode(self, data):
        ref = self.ref
        toks, n_ubatch, batch = draw_decode_batch(
            data, ref, lambda t, s: ref.seq_pos_min(t) == ref.seq_pos_min(s) and ref.seq_pos_max(t) == ref.seq_pos_max(s))
        ctx = self.kv.init_batch(batch, n_ubatch)
        ubatches = [toks[i:i + n_ubatch] for i in range(0, len(toks), n_ubatch)]
        slots = ref.prepare(ubatches)
        if slots is None:
            assert ctx.status == llmem.Status.FAILED_PREPARE
            return
        assert ctx.status == llmem.Status.SUCCESS
        k = 0
        for ub in ctx:
            expected = [c for _, cells in slots[k] for c in cells]
            assert ctx.slot_cells().tolist() == expected
            assert ub.pos.tolist() == [p for _, p in ubatches[k]]
            ref.apply_ubatch(slots[k], ubatches[k])
            self._check_masks(ctx, slots[k], ubatches[k])
            k += 1
        assert k == len(ubatches)

    def _check_masks(self, ctx, slot, toks):
        """kq_mask and kq_cells against the reference cells (spec §7.4, no 2-D, no ALiBi)."""
        ref = self.ref
        assert ctx.n_kv == ref.size  # P = 256 > every size used here
        per_group = len(toks) // len(slot)
        for causal in (True, False):
            mask = ctx.kq_mask(causal)
            offs, cells = ctx.kq_cells(causal)
            for t, (seqs, p1) in enumerate(toks):
                stream = slot[t // per_group][0]
                s = seqs[0]
                want = [j for j, c in enumerate(ref.cells[stream])
                        if s in c.seqs and not (causal and c.pos > p1)
                        and not is_masked_swa(ref.n_swa, ref.swa_type, c.pos, p1)]
                assert cells[offs[t]:offs[t + 1]].tolist() == want
                assert np.flatnonzero(mask[t] == 0).tolist() == want
                assert np.isneginf(np.delete(mask[t], want)).all()

    # -- sequence operations ------------------------------------------------------------------

    def _both(self, name, *args):
        """Run on both; both must raise ValueError or both succeed with the same result."""
        try:
            expected = getattr(self.ref, name)(*args)
        except ValueError:
            before = self.kv.cells()
            with pytest.raises(ValueError):
                getattr(self.kv, name)(*args)
            after = self.kv.cells()
            assert np.array_equal(before["pos"], after["pos"]) and before["seqs"] == after["seqs"]
            return
        got = getattr(self.kv, name)(*args)
        assert got == expected

    @rule()
    def update(self):
        ctx = self.kv.init_update()
        expected = llmem.Status.SUCCESS if (self.ref.get_has_shift() or self.kv._core.pending_copies) \
            else llmem.Status.NO_UPDATE
        assert ctx.status == expected
        if ctx.status == llmem.Status.SUCCESS:
            ctx.apply()
        self.ref.update()

    # -- state ----------------------------------------------------------------------------------

    @rule(src=st.integers(0, 3), dst=st.integers(0, 3), header=st.booleans())
    def seq_state_round_trip(self, src, dst, header):
        if src >= self.ref.n_seq_max or dst >= self.ref.n_seq_max:
            return
        flags = llmem.STATE_HEADER if header else 0
        blob = self.kv.state_write(src, flags)
        positions = self.ref.seq_state_cells(src)
        ok = self.ref.seq_state_restore(positions, dst)
        if ok:
            self.kv.state_read(blob, dst, flags)
        else:
            before = self.kv.cells()
            with pytest.raises(StateError):
                self.kv.state_read(blob, dst, flags)
            after = self.kv.cells()
            assert np.array_equal(before["pos"], after["pos"]) and before["seqs"] == after["seqs"]
            assert before["head"] == after["head"]

    @rule()
    def whole_state_into_fresh_cache(self):
        ref = self.ref
        other = KVCache(1, 2, 2, ref.size, n_seq_max=ref.n_seq_max, unified=ref.unified,
                        n_swa=ref.n_swa, swa_type=ref.swa_type, dtype_k=np.float32,
                        dtype_v=np.float32)
        other.state_read(self.kv.state_write(-1))
        got = other.cells()
        for s in range(ref.n_stream):
            used = [c for c in ref.cells[s] if c.pos != -1]
            n = len(used)
            assert got["pos"][s][:n].tolist() == [c.pos for c in used]
            assert (got["pos"][s][n:] == -1).all()
            assert got["seqs"][s][:n] == [tuple(sorted(c.seqs)) for c in used]
            assert got["head"][s] == 0

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def same_cells(self):
        if not hasattr(self, "ref"):
            return
        exp = self.ref.snapshot()
        got = self.kv.cells()
        assert got["pos"].tolist() == exp["pos"]
        assert got["seqs"] == exp["seqs"]
        assert got["shift"].tolist() == exp["shift"]
        assert got["head"] == exp["head"]
        assert self.kv.used == self.ref.used()
        assert self.kv.get_has_shift() == self.ref.get_has_shift()
        for s in range(self.ref.n_seq_max):
            assert self.kv.seq_pos_min(s) == self.ref.seq_pos_min(s)
            assert self.kv.seq_pos_max(s) == self.ref.seq_pos_max(s)
        assert self.kv._core.check_invariants()


TestKVModel = KVModel.TestCase
TestKVModel.settings = model_settings(300, stateful_step_count=40)
