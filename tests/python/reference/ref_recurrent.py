"""A slow, literal pure-Python model of the recurrent memory, written from section 5 of
``shared/spec/batch_recurrent_hybrid.md`` only (not from llmem's C++).

It keeps the spec's data structures as they are described (every cell with its own ``tail`` field,
tails rewritten over all cells on a swap, ``src`` counts over all cells) so that it is independent
of the shortcuts the C++ core takes. State arrays are not modelled, only the cell metadata and the
``s_copy`` row numbers. A micro-batch is given as a list of sequence sets
``(ids, n_seq_tokens, last_pos)`` with ``ids`` in entry order (primary id first).
"""

from __future__ import annotations

import copy

OPEN = 2**31 - 1


def normalise(p0: int, p1: int) -> tuple[int, int]:
    return (0 if p0 < 0 else p0), (OPEN if p1 < 0 else p1)


class Cell:
    __slots__ = ("pos", "src", "src0", "tail", "ids")

    def __init__(self) -> None:
        self.pos = -1
        self.src = -1
        self.src0 = -1
        self.tail = -1
        self.ids: set[int] = set()


class RefRecurrent:
    def __init__(self, size: int, n_seq_max: int, n_rs_seq: int = 0, compat: str = "b11312") -> None:
        self.size = size
        self.n_seq_max = n_seq_max
        # llama.cpp b11549 refuses to roll back a cell shared by several sequences
        self.refuse_shared_rollback = compat == "b11549"
        self.n_rs_seq = n_rs_seq
        self.cells = [Cell() for _ in range(size)]
        self.head = 0
        self.used = 0
        self.n = 0
        self.rs_z = -1
        self.rs_idx = [0] * n_seq_max

    # 5.3
    def clear(self) -> None:
        for c in self.cells:
            c.pos = -1
            c.ids = set()
            c.src = -1
            c.tail = -1
        self.head = 0
        self.used = 0
        self.rs_idx = [0] * self.n_seq_max

    # 5.4
    def seq_rm(self, seq: int, p0: int, p1: int) -> bool:
        p0, p1 = normalise(p0, p1)
        if (seq & 0xFFFFFFFF) >= self.n_seq_max:
            return False
        if p0 == 0 and p1 == OPEN:
            self.rs_idx[seq] = 0
        if seq >= self.size:
            return False
        t = self.cells[seq].tail
        if t >= 0:
            c = self.cells[t]
            if 0 < p0 <= c.pos < p1:
                if self.refuse_shared_rollback and len(c.ids) > 1:
                    return False
                r = c.pos - p0 + 1
                if self.rs_idx[seq] == 0 and 1 <= r <= self.n_rs_seq:
                    self.rs_idx[seq] = r
                    c.pos = p0 - 1
                    return True
                return False
            if p0 <= c.pos < p1:
                self.cells[seq].tail = -1
        new_head = None
        for i, c in enumerate(self.cells):
            if p0 <= c.pos < p1 and seq in c.ids:
                c.ids.discard(seq)
                if not c.ids:
                    self.used -= 1
                    c.pos = -1
                    c.src = -1
                    if new_head is None:
                        new_head = i
        if new_head is not None and new_head < self.head:
            self.head = new_head
        return True

    # 5.5
    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        if src == dst:
            return
        if 0 <= src < self.size and 0 <= dst < self.size:
            td = self.cells[dst].tail
            if td >= 0:
                c = self.cells[td]
                c.ids.discard(dst)
                self.cells[dst].tail = -1
                if not c.ids:
                    c.pos = -1
                    c.src = -1
                    self.used -= 1
            ts = self.cells[src].tail
            if ts >= 0:
                self.cells[ts].ids.add(dst)
                self.cells[dst].tail = ts

    # 5.6
    def seq_keep(self, seq: int) -> None:
        new_head = None
        for i, c in enumerate(self.cells):
            if i != seq:
                c.tail = -1
            if seq not in c.ids:
                if c.pos >= 0:
                    self.used -= 1
                c.pos = -1
                c.src = -1
                c.ids = set()
                if new_head is None:
                    new_head = i
            else:
                c.ids = {seq}
        if new_head is not None and new_head < self.head:
            self.head = new_head

    # 5.7
    def seq_add(self, seq: int, p0: int, p1: int, shift: int) -> None:
        if shift == 0:
            return
        p0, p1 = normalise(p0, p1)
        if p0 == p1:
            return
        if 0 <= seq < self.size:
            t = self.cells[seq].tail
            if t >= 0:
                c = self.cells[t]
                if seq in c.ids and p0 <= c.pos < p1:
                    c.pos += shift

    def seq_div(self, seq: int, p0: int, p1: int, d: int) -> None:
        if d == 0:
            raise ValueError("d == 0")
        if d == 1:
            return
        p0, p1 = normalise(p0, p1)
        if p0 == p1:
            return
        if 0 <= seq < self.size:
            t = self.cells[seq].tail
            if t >= 0:
                c = self.cells[t]
                if seq in c.ids and p0 <= c.pos < p1:
                    c.pos = int(c.pos / d)  # truncation toward zero

    # 5.8
    def seq_pos_min(self, seq: int) -> int:
        ps = [c.pos for c in self.cells if seq in c.ids]
        return min(ps) if ps else -1

    def seq_pos_max(self, seq: int) -> int:
        # llama.cpp starts the maximum at -1 (tests/data/oracle/README.md, C1: the spec's tricky
        # case 29 says -4, the recording of rec_seq_ops shows -1)
        return max([-1] + [c.pos for c in self.cells if seq in c.ids])

    # 5.10
    def _next_empty(self, start: int) -> int:
        i = start
        for _ in range(self.size):
            if i >= self.size:
                i -= self.size
            if not self.cells[i].ids:
                return i
            i += 1
        return i % self.size

    def find_slot(self, sets: list[tuple[list[int], int, int]]) -> bool:
        cells = self.cells
        n_seqs = len(sets)
        if self.head > self.used + 2 * n_seqs:
            self.head = 0
        # llmem deviation R14: a shared token may not merge two different states (one would be lost)
        for ids, _, _ in sets:
            if 0 <= ids[0] < self.size:
                primary_tail = cells[ids[0]].tail
                if any(0 <= x < self.size and cells[x].tail >= 0 and cells[x].tail != primary_tail
                       for x in ids[1:]):
                    return False
        for ids, _, _ in sets:
            for j, x in enumerate(ids):
                if x < 0 or x >= self.size:
                    return False
                if j > 0 and cells[x].tail >= 0:
                    c = cells[cells[x].tail]
                    c.ids.discard(x)
                    cells[x].tail = -1
                    if not c.ids:
                        c.pos = -1
                        c.src = -1
                        self.used -= 1
        empty = self._next_empty(self.head)
        lo, hi = self.size - 1, 0
        for s, (ids, _, _) in enumerate(sets):
            q = ids[0]
            t = cells[q].tail
            owned = False
            if t >= 0:
                assert q in cells[t].ids
                owned = len(cells[t].ids) == 1
            if not owned:
                e = cells[empty]
                assert not e.ids
                if t >= 0:
                    e.pos = cells[t].pos
                    e.src = cells[t].src
                    cells[t].ids.discard(q)
                    e.ids.add(q)
                    assert cells[t].ids
                cells[q].tail = empty
                if s + 1 < n_seqs:
                    for _ in range(self.size):
                        empty = (empty + 1) % self.size
                        if not cells[empty].ids:
                            break
            lo = min(lo, cells[q].tail)
            hi = max(hi, cells[q].tail)
        for s, (ids, _, _) in enumerate(sets):
            dst = lo + s
            src = cells[ids[0]].tail
            if dst != src:
                a, b = cells[dst], cells[src]
                a.pos, b.pos = b.pos, a.pos
                a.src, b.src = b.src, a.src
                a.ids, b.ids = b.ids, a.ids
                for c in cells:
                    if c.tail == src:
                        c.tail = dst
                    elif c.tail == dst:
                        c.tail = src
        for s, (ids, _, last_pos) in enumerate(sets):
            c = cells[lo + s]
            c.pos = last_pos
            c.ids = set(ids)
            for x in ids:
                cells[x].tail = lo + s
        counts = [0] * self.size
        for c in cells:
            if c.src >= 0:
                counts[c.src] += 1
        self.rs_z = next((k for k in range(lo, hi + 1) if counts[k] == 0), -1)
        for k in range(lo, hi + 1):
            c = cells[k]
            if c.src < 0:
                assert self.rs_z >= 0
                c.src0 = self.rs_z
            else:
                c.src0 = c.src
            c.src = k
        self.head = lo
        self.n = hi - lo + 1
        self.used = sum(1 for c in cells if c.ids)
        return self.n >= n_seqs

    # 5.9
    def prepare(self, ubatches: list) -> bool:
        saved = (copy.deepcopy(self.cells), self.used, self.head)
        ok = all(self.find_slot(sets) for sets in ubatches)
        self.cells, self.used, self.head = saved
        return ok

    # 5.12
    def s_copy(self, k: int) -> int:
        c = self.cells[k + self.head]
        if self.n_rs_seq == 0:
            return c.src0
        idx = 0
        if c.ids:
            q = min(c.ids)
            if 0 <= q < self.n_seq_max:
                idx = self.rs_idx[q]
                self.rs_idx[q] = 0
        return idx * self.size + c.src0

    # 5.14: which cells a write selects and the metadata it writes for them
    def state_write_meta(self, seq: int) -> list[tuple[int, tuple[int, ...]]]:
        out = []
        for c in self.cells:
            if seq == -1 and c.ids:
                out.append((c.pos, tuple(sorted(c.ids))))
            elif seq != -1 and seq in c.ids:
                out.append((c.pos, ()))
        return out

    def state_write_refused(self, seq: int) -> bool:
        """A whole write aborts in llama.cpp when sharers of a cell have different rollbacks."""
        if seq != -1 or self.n_rs_seq == 0:
            return False
        for c in self.cells:
            planes = {self.rs_idx[x] if x < self.n_seq_max else 0 for x in c.ids}
            if len(planes) > 1:
                return True
        return False

    # 5.15, metadata part, for blocks that are readable (llmem refuses the rest unchanged);
    # returns False (and leaves everything as it was) where the read fails
    def state_read_meta(self, seq: int, cells: list[tuple[int, tuple[int, ...]]]) -> bool:
        if len(cells) > self.size:
            return False
        if seq == -1:
            seen = [x for _, ids in cells for x in ids]
            if len(seen) != len(set(seen)) or any(not 0 <= x < min(self.n_seq_max, self.size) for x in seen):
                return False
            self.clear()
            for i, (pos, ids) in enumerate(cells):
                c = self.cells[i]
                c.pos = pos
                for x in ids:
                    c.ids.add(x)
                    self.cells[x].tail = i
                c.src = i
            self.head = 0
            self.used = len(cells)
            return True
        if len(cells) > 1 or any(ids for _, ids in cells):
            return False
        saved = copy.deepcopy(self.__dict__)
        self.seq_rm(seq, -1, -1)
        if cells:
            pos = cells[0][0]
            if not self.find_slot([([seq], 1, pos)]):
                self.__dict__.update(saved)
                return False
            assert self.cells[self.head].pos == pos and seq in self.cells[self.head].ids
            self.cells[self.head].src = self.head
        if self.n_rs_seq:
            self.rs_idx[seq] = 0
        return True

    def snapshot(self) -> dict:
        return {
            "pos": [c.pos for c in self.cells],
            "src": [c.src for c in self.cells],
            "src0": [c.src0 for c in self.cells],
            "tail": [c.tail for c in self.cells],
            "seq_ids": [tuple(sorted(c.ids)) for c in self.cells],
        }
