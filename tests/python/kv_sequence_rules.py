"""The sequence-operation rules the KV state machines share (plain and iSWA caches): each rule
calls the machine's ``_both(name, *args)``, which runs the operation on llmem and on the
reference and compares what they answer."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import rule

from llmem import Batch

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


def draw_decode_batch(data, ref, same_place):
    """One decode batch for a KV state machine: in a unified cache 1-3 runs of tokens, each for
    one sequence or for two that ``same_place(t, s)`` says sit at the same positions; with a
    stream per sequence, one run. Returns the tokens as [(ids, pos)], n_ubatch and the Batch
    (a token's ids in attach order: the last one is the primary id)."""
    n_seq = ref.n_seq_max
    runs = []
    if ref.unified:
        n_runs = data.draw(st.integers(1, 3))
        taken = set()
        for _ in range(n_runs):
            free = [s for s in range(n_seq) if s not in taken]
            if not free:
                break
            s = data.draw(st.sampled_from(free))
            group = [s]
            # couple a second sequence only when the memory says they are at the same place
            mates = [t for t in free if t != s and same_place(t, s)]
            if mates and data.draw(st.booleans()):
                group.append(data.draw(st.sampled_from(mates)))
            taken.update(group)
            runs.append((tuple(group), data.draw(st.integers(1, 6))))
    else:
        runs.append(((data.draw(st.integers(0, n_seq - 1)),), data.draw(st.integers(1, 9))))
    toks = []
    for group, count in runs:
        start = ref.seq_pos_max(group[0]) + 1
        if start == 0:
            start = data.draw(st.integers(0, 3))
        toks += [(group, start + k) for k in range(count)]
    n_ubatch = data.draw(st.integers(1, 8))
    batch = Batch(token=np.arange(len(toks), dtype=np.int32),
                  pos=np.array([p for _, p in toks], dtype=np.int32),
                  seq_id=[list(reversed(g)) for g, _ in toks])
    return toks, n_ubatch, batch
