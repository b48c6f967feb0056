"""A test driver for the toy models: decodes batches through a memory, mirrors each sequence
operation on a plain token history, and checks every logit obtained against ``forward_full``.

Tolerance: the models run in float32 on float32 caches. Cached decoding and ``forward_full`` do
the same arithmetic in a different shape (attention over ``n_kv`` cells with masked ones, matmuls
of other sizes, so BLAS sums in another order; a K-shift rotates K a second time), which moves
logits of magnitude ~4 by up to a few 1e-6. ``rtol=1e-4, atol=1e-5`` leaves that headroom, while
one wrong cell, position, mask entry or state changes logits by 1e-2 or more.
"""

from __future__ import annotations

import numpy as np

import llmem

TOL = dict(rtol=1e-4, atol=1e-5)


class Session:
    """One memory decoded by one model, with the token history of every sequence."""

    def __init__(self, model, memory, n_ubatch: int = 512) -> None:
        self.model = model
        self.memory = memory
        self.n_ubatch = n_ubatch
        self.tokens: dict[int, list[int]] = {}
        self.pos: dict[int, list[int]] = {}
        # (index into the history, logits row) of every output obtained, per sequence
        self.outputs: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.max_error = 0.0

    def feed(self, per_seq: dict, n_ubatch=None, outputs: str = "all") -> dict:
        """Decode one batch holding ``per_seq[seq]`` tokens for each sequence, interleaved
        round-robin across sequences. ``outputs``: "all" or "last" (per sequence).
        Returns the logits of each sequence's outputs."""
        order = []
        longest = max(len(t) for t in per_seq.values())
        for i in range(longest):
            for seq, toks in per_seq.items():
                if i < len(toks):
                    last = i == len(toks) - 1
                    order.append((seq, int(toks[i]), outputs == "all" or last))
        batch = llmem.Batch(token=np.array([t for _, t, _ in order], np.int32),
                            seq_id=np.array([s for s, _, _ in order], np.int32),
                            output=np.array([o for _, _, o in order], bool))
        logits = self.model.decode(batch, self.memory, n_ubatch=n_ubatch or self.n_ubatch)
        assert logits.shape == (sum(o for _, _, o in order), self.model.config.n_vocab)
        result: dict = {seq: [] for seq in per_seq}
        row = 0
        for seq, tok, out in order:
            hist, pos = self.tokens.setdefault(seq, []), self.pos.setdefault(seq, [])
            pos.append(pos[-1] + 1 if pos else 0)
            hist.append(tok)
            if out:
                self.outputs.setdefault(seq, []).append((len(hist) - 1, logits[row]))
                result[seq].append(logits[row])
                row += 1
        return {seq: np.array(rows) for seq, rows in result.items()}

    # -- sequence operations, on the memory and on the history -----------------------------------

    def seq_cp(self, src: int, dst: int, p1: int = -1) -> None:
        """Share ``src``'s positions below ``p1`` (all when -1) with ``dst``."""
        self.memory.seq_cp(src, dst, -1, p1)
        keep = [i for i, p in enumerate(self.pos[src]) if p1 < 0 or p < p1]
        self.tokens[dst] = [self.tokens[src][i] for i in keep]
        self.pos[dst] = [self.pos[src][i] for i in keep]
        self.outputs[dst] = []

    def seq_rm_tail(self, seq: int, p0: int) -> bool:
        """Remove positions ``p0`` and later; the history follows only when the memory agrees."""
        if not self.memory.seq_rm(seq, p0, -1):
            return False
        n = sum(p < p0 for p in self.pos[seq])
        self.tokens[seq], self.pos[seq] = self.tokens[seq][:n], self.pos[seq][:n]
        self.outputs[seq] = [(i, row) for i, row in self.outputs[seq] if i < n]
        return True

    def seq_rm_all(self, seq: int) -> None:
        assert self.memory.seq_rm(seq, -1, -1)
        self.tokens[seq], self.pos[seq], self.outputs[seq] = [], [], []

    def shift(self, seq: int, delta: int) -> None:
        """Move the whole sequence by ``delta`` positions (K-shift on the next decode)."""
        self.memory.seq_add(seq, 0, -1, delta)
        self.pos[seq] = [p + delta for p in self.pos[seq]]
        self.outputs[seq] = []  # only what is decoded after the shift is compared

    def context_shift(self, seq: int, n_keep: int, n_discard: int) -> None:
        """llama.cpp's context shift: drop positions [n_keep, n_keep + n_discard) and move the
        rest down by ``n_discard``."""
        assert self.memory.seq_rm(seq, n_keep, n_keep + n_discard)
        self.memory.seq_add(seq, n_keep + n_discard, -1, -n_discard)
        kept = [i for i, p in enumerate(self.pos[seq]) if not n_keep <= p < n_keep + n_discard]
        self.tokens[seq] = [self.tokens[seq][i] for i in kept]
        self.pos[seq] = [p - n_discard if p >= n_keep + n_discard else p
                         for p in (self.pos[seq][i] for i in kept)]
        self.outputs[seq] = []

    # -- the proof -------------------------------------------------------------------------------

    def reference(self, seq: int) -> np.ndarray:
        return self.model.forward_full(self.tokens[seq], self.pos[seq])

    def check(self, *seqs: int) -> int:
        """Every output recorded for ``seqs`` (default all) equals ``forward_full`` over the
        sequence's history; returns how many rows were compared."""
        n = 0
        for seq in seqs or tuple(self.outputs):
            if not self.outputs.get(seq):
                continue
            ref = self.reference(seq)
            idx = [i for i, _ in self.outputs[seq]]
            got = np.array([row for _, row in self.outputs[seq]])
            np.testing.assert_allclose(got, ref[idx], **TOL, err_msg=f"sequence {seq}")
            self.max_error = max(self.max_error, float(np.abs(got - ref[idx]).max()))
            n += len(idx)
        assert n > 0, "nothing was compared"
        return n


def random_tokens(rng, n: int, n_vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(0, n_vocab, n)]


# -- scenarios every model must pass (the test files run them on their models) -------------------

def prompt_then_tokens(model, memory, seed: int, n_prompt: int = 13, n_steps: int = 6,
                       n_ubatch: int = 512) -> Session:
    """A prompt in one batch, then one token per decode."""
    rng = np.random.default_rng(seed)
    s = Session(model, memory, n_ubatch)
    s.feed({0: random_tokens(rng, n_prompt, model.config.n_vocab)})
    for _ in range(n_steps):
        s.feed({0: random_tokens(rng, 1, model.config.n_vocab)})
    s.check(0)
    return s


def parallel_sequences(model, memory, seed: int, prompt_lens=(7, 4, 9), n_steps: int = 4,
                       n_ubatch: int = 512) -> Session:
    """Several sequences' prompts in one batch (unequal lengths), then one token each per
    batch, with only the last token of each sequence as output."""
    rng = np.random.default_rng(seed)
    v = model.config.n_vocab
    s = Session(model, memory, n_ubatch)
    s.feed({seq: random_tokens(rng, n, v) for seq, n in enumerate(prompt_lens)}, outputs="last")
    for _ in range(n_steps):
        s.feed({seq: random_tokens(rng, 1, v) for seq in range(len(prompt_lens))}, outputs="last")
    s.check()
    return s


def prefix_sharing(model, memory, seed: int, n_prefix: int = 9, p1: int = -1) -> Session:
    """Sequence 0 decodes a shared prefix; ``seq_cp`` gives it to 1 and 2 (positions below
    ``p1``, or all of it); then all three continue differently in the same batches."""
    rng = np.random.default_rng(seed)
    v = model.config.n_vocab
    s = Session(model, memory)
    s.feed({0: random_tokens(rng, n_prefix, v)})
    s.seq_cp(0, 1, p1)
    s.seq_cp(0, 2, p1)
    s.feed({seq: random_tokens(rng, 3 + seq, v) for seq in range(3)})
    for _ in range(3):
        s.feed({seq: random_tokens(rng, 1, v) for seq in range(3)})
    s.check()
    # the continuations differ, so their logits must too: the comparison can tell histories apart
    assert not np.allclose(s.outputs[1][-1][1], s.outputs[2][-1][1], **TOL)
    return s


def state_round_trip(model, make_memory, seed: int) -> Session:
    """Decode two sequences, save the whole memory and sequence 1 alone, restore the whole memory
    into a fresh one and sequence 1 into sequence 0 of another, and continue both."""
    rng = np.random.default_rng(seed)
    v = model.config.n_vocab
    s = Session(model, make_memory())
    s.feed({0: random_tokens(rng, 8, v), 1: random_tokens(rng, 11, v)})
    whole, seq1 = s.memory.state_write(-1), s.memory.state_write(1)

    restored = Session(model, make_memory())
    restored.memory.state_read(whole, -1)
    restored.tokens, restored.pos = {k: list(t) for k, t in s.tokens.items()}, {k: list(p) for k, p in s.pos.items()}
    moved = Session(model, make_memory())
    moved.memory.state_read(seq1, 0)
    moved.tokens, moved.pos = {0: list(s.tokens[1])}, {0: list(s.pos[1])}
    for _ in range(3):
        step = {0: random_tokens(rng, 2, v), 1: random_tokens(rng, 1, v)}
        restored.feed(step)
        moved.feed({0: step[1]})
    restored.check()
    moved.check()
    # the restored sequence continues exactly as the original would have
    s.feed({1: restored.tokens[1][len(s.tokens[1]):]})
    np.testing.assert_allclose(s.outputs[1][-1][1], moved.outputs[0][-1][1], **TOL)
    return restored
