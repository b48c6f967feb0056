"""seq_pos_tok_le (llama_kv_cells::seq_pos_tok_le): the token of a sequence's cell at the largest
position <= p, the highest cell index among cells at that position, LLAMA_TOKEN_NULL (-1) when
there is none. Checked against a brute-force walk of what was decoded."""
from __future__ import annotations

import numpy as np
import pytest

import llmem
from llmem import KVCache


def _decode(cache, tokens, pos, seqs):
    batch = llmem.Batch(token=np.asarray(tokens, np.int32), pos=np.asarray(pos, np.int32),
                        seq_id=np.asarray(seqs, np.int32))
    ctx = cache.init_batch(batch, n_ubatch=len(tokens))
    cells = []
    for _ub in ctx:
        cells.extend(ctx.slot_cells().tolist())
    return cells


def test_token_at_or_before_a_position() -> None:
    cache = KVCache(1, 32, 32, kv_size=16, n_seq_max=2, cell_tokens=True)
    _decode(cache, [10, 11, 12], [0, 1, 2], [0, 0, 0])
    assert [cache.seq_pos_tok_le(0, p) for p in (-1, 0, 1, 2, 7)] == [-1, 10, 11, 12, 12]
    assert cache.seq_pos_tok_le(1, 5) == -1
    # two tokens of one sequence at one position take two cells: the higher cell wins
    cells = _decode(cache, [20, 21], [3, 3], [0, 0])
    assert cache.seq_pos_tok_le(0, 3) == (21 if cells[1] > cells[0] else 20)
    # shifted positions are looked up where they are now
    cache.seq_add(0, 0, -1, 10)
    assert cache.seq_pos_tok_le(0, 10) == 10 and cache.seq_pos_tok_le(0, 9) == -1
    # the tokens travel in the state bytes (cell ext, as llama.cpp's has_cell_ext caches)
    other = KVCache(1, 32, 32, kv_size=16, n_seq_max=2, cell_tokens=True)
    other.state_read(cache.state_write(0), 1)
    assert [other.seq_pos_tok_le(1, p) for p in (9, 10, 12, 13)] == [cache.seq_pos_tok_le(0, p) for p in (9, 10, 12, 13)]
    plain = KVCache(1, 32, 32, kv_size=16)
    with pytest.raises(llmem.LlmemError, match="cell_tokens"):
        plain.seq_pos_tok_le(0, 0)
    with pytest.raises(ValueError):
        cache.seq_pos_tok_le(-1, 0)


def test_matches_a_brute_force_walk() -> None:
    rng = np.random.default_rng(4)
    cache = KVCache(1, 32, 32, kv_size=64, n_seq_max=3, cell_tokens=True)
    held = {s: {} for s in range(3)}  # seq -> {cell: (pos, token)}
    nxt = [0, 0, 0]
    for _ in range(12):
        s = int(rng.integers(0, 3))
        n = int(rng.integers(1, 4))
        toks = rng.integers(0, 1000, n).tolist()
        pos = list(range(nxt[s], nxt[s] + n))
        cells = _decode(cache, toks, pos, [s] * n)
        for c, p, t in zip(cells, pos, toks):
            held[s][c] = (p, t)
        nxt[s] += n
        if rng.random() < 0.3 and nxt[s] > 2:  # drop a tail
            cut = int(rng.integers(1, nxt[s]))
            cache.seq_rm(s, cut, -1)
            held[s] = {c: v for c, v in held[s].items() if v[0] < cut}
            nxt[s] = cut
    for s in range(3):
        for p in range(-1, max(nxt) + 2):
            best = [(pp, c, t) for c, (pp, t) in held[s].items() if pp <= p]
            want = max(best)[2] if best else -1
            assert cache.seq_pos_tok_le(s, p) == want, (s, p)
