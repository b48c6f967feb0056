"""A slow, obviously-correct model of the KV cache cells, written from shared/spec/kv_cache.md
(sections 2, 4, 5, 8) and llmem's documented deviations, not from the C++ code.

Every cell is a plain Python record; every operation is a literal transcription of the spec's
pseudo-code. Used by the hypothesis model test to check the compiled cache step by step.
"""

from __future__ import annotations

import copy

NONE, STANDARD, CHUNKED, SYMMETRIC = 0, 1, 2, 3
POS_OPEN = 2**31 - 1


def is_masked_swa(n_swa, swa_type, p0, p1):
    """spec §7.3"""
    if swa_type == NONE:
        return False
    if swa_type == STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == CHUNKED:
        return p0 < (p1 // n_swa) * n_swa
    if swa_type == SYMMETRIC:
        return abs(p1 - p0) > n_swa // 2
    raise ValueError(swa_type)


def normalise(p0, p1):
    return (0 if p0 < 0 else p0), (POS_OPEN if p1 < 0 else p1)


class Cell:
    __slots__ = ("pos", "shift", "seqs")

    def __init__(self):
        self.pos = -1
        self.shift = 0
        self.seqs = set()

    def empty(self):
        self.pos = -1
        self.shift = 0
        self.seqs = set()


class RefKV:
    """Cells and heads of a KV cache; tokens are (seq_ids, pos) with the primary id first."""

    def __init__(self, size, n_seq_max=1, unified=True, n_swa=0, swa_type=NONE):
        self.size = size
        self.n_seq_max = n_seq_max
        self.unified = unified
        self.n_stream = 1 if unified else n_seq_max
        self.n_seq_ids = max(256, n_seq_max) if unified else n_seq_max
        self.n_swa = n_swa
        self.swa_type = swa_type
        self.cells = [[Cell() for _ in range(size)] for _ in range(self.n_stream)]
        self.heads = [0] * self.n_stream
        self.has_shift = [False] * self.n_stream

    # -- queries -------------------------------------------------------------------------------

    def stream_of(self, seq):
        return 0 if self.unified else seq

    def check(self, seq):
        if not 0 <= seq < self.n_seq_ids:
            raise ValueError(f"seq_id {seq} out of range")

    def positions(self, seq):
        return [c.pos for c in self.cells[self.stream_of(seq)] if seq in c.seqs]

    def seq_pos_min(self, seq):
        self.check(seq)
        p = self.positions(seq)
        return min(p) if p else -1

    def seq_pos_max(self, seq):
        self.check(seq)
        p = self.positions(seq)
        return max(p) if p else -1

    def used(self, stream=None):
        streams = range(self.n_stream) if stream is None else [stream]
        return sum(1 for s in streams for c in self.cells[s] if c.pos != -1)

    def get_has_shift(self):
        return any(self.has_shift)

    def _lower_head(self, stream, emptied):
        if emptied and min(emptied) < self.heads[stream]:
            self.heads[stream] = min(emptied)

    # -- sequence operations (spec §4) -----------------------------------------------------------

    def seq_rm(self, seq, p0, p1):
        if seq != -1:
            self.check(seq)
        p0, p1 = normalise(p0, p1)
        streams = range(self.n_stream) if seq == -1 else [self.stream_of(seq)]
        for s in streams:
            emptied = []
            for i, c in enumerate(self.cells[s]):
                if c.pos == -1 or not p0 <= c.pos < p1:
                    continue
                if seq == -1:
                    c.empty()
                    emptied.append(i)
                elif seq in c.seqs:
                    c.seqs.discard(seq)
                    if not c.seqs:
                        c.empty()
                        emptied.append(i)
            self._lower_head(s, emptied)
        return True

    def seq_cp(self, src, dst, p0, p1):
        self.check(src)
        self.check(dst)
        if dst >= self.n_seq_max:
            raise ValueError("llmem refuses destinations >= n_seq_max")
        s0, s1 = self.stream_of(src), self.stream_of(dst)
        if s0 == s1:
            if src == dst:
                return
            p0, p1 = normalise(p0, p1)
            for c in self.cells[s0]:
                if c.pos != -1 and p0 <= c.pos < p1 and src in c.seqs:
                    c.seqs.add(dst)
            return
        if 0 < p0 < self.size - 1 or 0 < p1 < self.size - 1:
            raise ValueError("partial cross-stream copy")
        self.cells[s1] = [Cell() for _ in range(self.size)]
        self.has_shift[s1] = False
        for i, c in enumerate(self.cells[s0]):
            if src in c.seqs:
                d = self.cells[s1][i]
                d.pos, d.shift, d.seqs = c.pos, c.shift, {dst}
                if c.shift != 0:
                    self.has_shift[s1] = True
        self.heads[s1] = self.heads[s0]

    def seq_keep(self, seq):
        self.check(seq)
        s = self.stream_of(seq)
        emptied = []
        for i, c in enumerate(self.cells[s]):
            if seq in c.seqs:
                c.seqs = {seq}
            elif c.seqs:
                c.empty()
                emptied.append(i)
        self._lower_head(s, emptied)

    def seq_add(self, seq, p0, p1, d):
        self.check(seq)
        if d == 0:
            return
        p0, p1 = normalise(p0, p1)
        if p0 == p1:
            return
        s = self.stream_of(seq)
        emptied = []
        for i, c in enumerate(self.cells[s]):
            if c.pos != -1 and p0 <= c.pos < p1 and seq in c.seqs:
                self.has_shift[s] = True
                if c.pos + d < 0:
                    c.empty()
                    emptied.append(i)
                else:
                    c.pos += d
                    c.shift += d
        self.heads[s] = min(emptied) if emptied else 0

    def seq_div(self, seq, p0, p1, d):
        self.check(seq)
        if d < 1:
            raise ValueError("divisor")
        if d == 1:
            return
        p0, p1 = normalise(p0, p1)
        if p0 == p1:
            return
        s = self.stream_of(seq)
        for c in self.cells[s]:
            if c.pos != -1 and p0 <= c.pos < p1 and seq in c.seqs:
                new = c.pos // d
                c.shift += new - c.pos  # llmem records the real (signed) change
                c.pos = new
                self.has_shift[s] = True

    def update(self):
        """Shifts applied and forgotten (the K bytes are not modelled)."""
        for row in self.cells:
            for c in row:
                c.shift = 0
        self.has_shift = [False] * self.n_stream

    # -- placement (spec §5) ---------------------------------------------------------------------

    def _groups(self, toks):
        if self.n_stream == 1:
            return [(0, toks)]
        unq = sorted({t[0][0] for t in toks})
        n = len(toks) // len(unq)
        return [(self.stream_of(unq[g]), toks[g * n:(g + 1) * n]) for g in range(len(unq))]

    def find_slot(self, toks, cont=False):
        result = []
        for s, gt in self._groups(toks):
            cells, n = self.cells[s], len(gt)
            h = self.heads[s]
            if h > self.used(s) + 2 * n:
                h = 0
            if n > self.size:
                return None
            tested, step, chosen = 0, (n if cont else 1), []
            while True:
                if h + step > self.size:
                    tested += self.size - h
                    h = 0
                    continue
                for _ in range(step):
                    c = h
                    h += 1
                    tested += 1
                    usable = cells[c].pos == -1
                    if not usable and len(cells[c].seqs) == 1:
                        (t,) = cells[c].seqs
                        usable = is_masked_swa(self.n_swa, self.swa_type, cells[c].pos,
                                               self._stream_pos_max(s, t) + 1)
                    if usable:
                        chosen.append(c)
                    elif cont:
                        break
                if len(chosen) == n:
                    break
                if cont:
                    chosen = []
                if tested >= self.size:
                    return None
            result.append((s, chosen))
        return result

    def _stream_pos_max(self, s, t):
        p = [c.pos for c in self.cells[s] if t in c.seqs]
        return max(p) if p else -1

    def apply_ubatch(self, slot, toks):
        max_rm = {}
        i = 0
        for s, idxs in slot:
            for c in idxs:
                cell = self.cells[s][c]
                seqs, pos = toks[i]
                i += 1
                if cell.pos != -1:
                    for t in cell.seqs:
                        max_rm[t] = max(max_rm.get(t, -1), cell.pos)
                    cell.empty()
                cell.pos = pos
                cell.seqs = set(seqs)
        for t in sorted(max_rm):
            s = self.stream_of(t)
            mn = self._stream_pos_min(s, t)
            if mn != -1 and mn <= max_rm[t]:
                for cell in self.cells[s]:
                    if t in cell.seqs and mn <= cell.pos < max_rm[t] + 1:
                        cell.seqs.discard(t)
                        if not cell.seqs:
                            cell.empty()
        for s, idxs in slot:
            self.heads[s] = idxs[-1] + 1

    def _stream_pos_min(self, s, t):
        p = [c.pos for c in self.cells[s] if t in c.seqs]
        return min(p) if p else -1

    def prepare(self, ubatches):
        """Slots of every ubatch as if applied in turn; llmem leaves the cells untouched."""
        saved = (copy.deepcopy(self.cells), list(self.heads), list(self.has_shift))
        slots = []
        ok = True
        for toks in ubatches:
            slot = self.find_slot(toks)
            if slot is None:
                ok = False
                break
            slots.append(slot)
            self.apply_ubatch(slot, toks)
        self.cells, self.heads, self.has_shift = saved
        return slots if ok else None

    def decode(self, ubatches):
        """init_batch + apply of every ubatch; None when it does not fit (nothing changes)."""
        slots = self.prepare(ubatches)
        if slots is None:
            return None
        for slot, toks in zip(slots, ubatches):
            self.apply_ubatch(slot, toks)
        return slots

    # -- state (spec §8.2, §8.4) ---------------------------------------------------------------

    def seq_state_cells(self, seq):
        """(pos) of the cells a per-sequence save writes, in cell order."""
        s = self.stream_of(seq)
        pmax = self.seq_pos_max(seq)
        return [c.pos for c in self.cells[s]
                if seq in c.seqs and not is_masked_swa(self.n_swa, self.swa_type, c.pos, pmax)]

    def seq_state_restore(self, positions, dest):
        """Restore a saved sequence into dest; False (and no change) when it does not fit."""
        self.check(dest)
        if not positions:
            return True
        if len(positions) > self.size:
            return False
        saved = (copy.deepcopy(self.cells), list(self.heads), list(self.has_shift))
        self.seq_rm(dest, -1, -1)
        toks = [((dest,), p) for p in positions]
        slot = self.find_slot(toks)
        if slot is None:
            self.cells, self.heads, self.has_shift = saved
            return False
        self.apply_ubatch(slot, toks)
        return True

    # -- snapshot for comparisons ------------------------------------------------------------------

    def snapshot(self):
        return {
            "pos": [[c.pos for c in row] for row in self.cells],
            "shift": [[c.shift for c in row] for row in self.cells],
            "seqs": [[tuple(sorted(c.seqs)) for c in row] for row in self.cells],
            "head": list(self.heads),
        }
