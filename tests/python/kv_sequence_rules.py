"""The sequence-operation rules the KV state machines share (plain and iSWA caches): each rule
calls the machine's ``_both(name, *args)``, which runs the operation on llmem and on the
reference and compares what they answer."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import rule

POS = st.integers(min_value=-1, max_value=24)


def sequence_operation_rules(max_seq: int) -> type:
    """A mixin of seq_rm/seq_cp/seq_keep/seq_add/seq_div rules over ids 0..max_seq (seq_rm also
    tries -2, -1 and max_seq + 1)."""
    seqs = st.integers(0, max_seq)

    class SequenceOperationRules:
        @rule(seq=st.integers(-2, max_seq + 1), p0=POS, p1=POS)
        def seq_rm(self, seq, p0, p1):
            self._both("seq_rm", seq, p0, p1)

        @rule(src=seqs, dst=seqs, p0=st.sampled_from([-1, 0, 2, 100]), p1=st.sampled_from([-1, 3, 100]))
        def seq_cp(self, src, dst, p0, p1):
            self._both("seq_cp", src, dst, p0, p1)

        @rule(seq=seqs)
        def seq_keep(self, seq):
            self._both("seq_keep", seq)

        @rule(seq=seqs, p0=POS, p1=POS, d=st.integers(-6, 6))
        def seq_add(self, seq, p0, p1, d):
            self._both("seq_add", seq, p0, p1, d)

        @rule(seq=seqs, p0=POS, p1=POS, d=st.integers(0, 4))
        def seq_div(self, seq, p0, p1, d):
            self._both("seq_div", seq, p0, p1, d)

    return SequenceOperationRules
