"""Random walks of decodes and sequence operations: after every step, every output obtained so far
still equals ``forward_full`` over its sequence's history.

The walk only takes steps whose result a cache-free model can reproduce, which leaves out four
things llama.cpp's memories do by design (and llmem with them): ``seq_add`` moves a cell for every
sequence sharing it; a recurrent rollback on a cell shared after ``seq_cp`` is applied only for the
smallest sequence id; a recurrent rollback reaches back at most as many tokens as the last batch
gave the sequence (older snapshot planes are stale, spec §5.13 (b)); and a
sliding-window cache forgets positions that have left the window, so a tail removal there is only
exact while ``seq_pos_min`` shows the window intact (otherwise the walk re-decodes the sequence,
as llama.cpp's server does).
"""

import numpy as np
import pytest

from llmem.toy import make_model
from toy_session import Session, random_tokens

N_SEQ = 4
MODELS = {arch: make_model(arch, seed=9) for arch in ("transformer", "iswa", "recurrent", "hybrid")}


def _new_memory(arch, n_rs_seq, options):
    model = MODELS[arch]
    if arch in ("recurrent", "hybrid"):
        return model.new_memory(n_ctx=256, n_seq_max=N_SEQ, n_rs_seq=n_rs_seq, **options)
    if arch == "iswa":
        return model.new_memory(256, N_SEQ, swa_full=True, n_ubatch=8, **options)
    return model.new_memory(256, N_SEQ, **options)


def _walk(arch, seed, options, n_ops=30):
    rng = np.random.default_rng(seed)
    model = MODELS[arch]
    recurrent = arch in ("recurrent", "hybrid")
    n_rs_seq = int(rng.integers(0, 3)) if recurrent else 0
    s = Session(model, _new_memory(arch, n_rs_seq, options))
    v = model.config.n_vocab
    fed_last = {}          # tokens each sequence got in the last batch (rollback snapshots)
    sharing = {}           # sequences whose cells are shared after seq_cp
    rolled_back = set()    # rollbacks not yet consumed by a decode
    n_compared = 0
    for _ in range(n_ops):
        live = [q for q in range(N_SEQ) if s.tokens.get(q)]
        empty = [q for q in range(N_SEQ) if not s.tokens.get(q)]
        r = rng.random()
        if r < 0.5 or not live:
            seqs = rng.choice(N_SEQ, size=int(rng.integers(1, N_SEQ + 1)), replace=False)
            per = {int(q): random_tokens(rng, int(rng.integers(1, 7)), v) for q in seqs}
            n_ubatch = int(rng.integers(1, 9)) + (n_rs_seq + 1 if n_rs_seq else 0)
            s.feed(per, n_ubatch=n_ubatch, outputs="all" if rng.random() < 0.5 else "last")
            fed_last = {q: len(t) for q, t in per.items()}
            rolled_back -= set(per)
        elif r < 0.6 and empty and not rolled_back:
            src, dst = int(rng.choice(live)), int(rng.choice(empty))
            group = sharing.get(src, set()) | {src}
            sharing[dst] = set(group)
            for q in group:
                sharing.setdefault(q, set()).add(dst)
            s.seq_cp(src, dst)
            fed_last = {}
        elif r < 0.7:
            q = int(rng.choice(live))
            s.seq_rm_all(q)
            for others in sharing.values():
                others.discard(q)
            sharing[q] = set()
            fed_last.pop(q, None)
        elif r < 0.8:
            q = int(rng.choice(live))
            if recurrent:
                # right after a batch that fed the sequence, which may also have moved its cell
                # in a later micro-batch (the snapshot planes move along: deviation R15)
                if n_rs_seq and q in fed_last:
                    back = int(rng.integers(1, min(n_rs_seq, fed_last[q]) + 1))
                    if back < len(s.tokens[q]):
                        assert s.seq_rm_tail(q, s.pos[q][-1] - back + 1)
                        rolled_back.add(q)
                        fed_last = {}
            else:
                p0 = int(rng.integers(0, s.pos[q][-1] + 1))
                if arch == "iswa" and _window_lost(s, q, p0):
                    s.seq_rm_all(q)
                else:
                    s.seq_rm_tail(q, p0)
        elif r < 0.9:
            q = int(rng.choice(live))
            if arch != "recurrent" and not sharing.get(q):
                s.shift(q, int(rng.integers(1, 20)))
                fed_last = {}
        else:
            fresh = _new_memory(arch, n_rs_seq, options)
            fresh.state_read(s.memory.state_write(-1), -1)
            s.memory = fresh
            fed_last = {}
        if any(s.outputs.values()):
            n_compared += s.check()
    assert n_compared > 0


def _window_lost(s, q, p0):
    """Whether removing positions >= p0 leaves the window cache without the positions the next
    token must see (llama.cpp's server then re-processes the prompt)."""
    memory, n_swa = s.memory, s.model.config.n_swa
    kept = [p for p in s.pos[q] if p < p0]
    if not kept:
        return False
    memory.swa.seq_rm(q, p0, -1)  # what seq_rm will do to the window cache anyway
    pos_min = memory.swa.seq_pos_min(q)
    return not 0 <= pos_min <= max(kept[0], p0 - n_swa + 1)


CASES = [(arch, options) for arch in MODELS for options in
         ([{}, {"unified": False}] if arch != "recurrent" else [{}])]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("arch, options", CASES,
                         ids=[f"{a}{'-streams' if o else ''}" for a, o in CASES])
def test_random_walk_stays_exact(arch, options, seed):
    _walk(arch, seed, options)
