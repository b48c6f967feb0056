"""A slow, plain-Python reference of llama.cpp's batch allocator.

Written from ``spec/batch_recurrent_hybrid.md`` (sections 1.6, 2.2, 3 and 4) and nothing else; the
comments cite the step numbers of that document. It exists to be compared with llmem's compiled
``BatchAllocator``, so it favours the obvious over the fast: lists, sets, dicts and loops.

Inputs are plain Python lists:

* ``token``: list of ints (``-1`` = NO_TOKEN, "this entry carries no token id"), or None;
* ``embd``: list of rows (each a list of floats, or None for "no embedding on this entry"), or None;
* ``pos``: flat list: ``n`` values for token batches, ``n_pos_per_embd * n`` (section-major) for
  embedding-only batches; None = positions continue from the memory (section 2.2);
* ``seq_id``: list of per-entry id lists in the caller's order; None = every entry in sequence 0;
* ``output``: list of 0/1 (or bools); None = only the last entry is an output;
* ``memory``: any object with ``seq_pos_min(s)`` / ``seq_pos_max(s)``, or None.

Choices the spec leaves to llmem, taken the way llmem's headers describe them:

* n_vocab None: token ids are only checked for being non-negative (step 5);
* n_embd None: embedding rows may have any width, but all rows must have the same width;
* n_seq_max above ``SEQ_MAX_LIMIT`` (llmem lifts llama.cpp's 256, see the spec README) -> SEQ_LIMIT;
* an empty batch (fatal in llama.cpp, step 2) -> EMPTY;
* an entry without ids (undefined in llama.cpp, step 8) -> NO_SEQ_ID;
* arrays whose lengths do not fit the batch -> BAD_SHAPE (pos: checked at step 7, embedding rows at
  step 6, the per-entry lists before the conversion, since without them there are no entries);
* a rejected ``init`` leaves the allocator exactly as it was (the spec allows anything, llmem
  promises this);
* ``split_equal`` with ``keep_tail > 0`` and ``n_ubatch <= keep_tail`` raises ``ValueError``
  before consuming anything (fatal in llama.cpp; llmem's rule: a failed call changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

NO_TOKEN = -1
SEQ_MAX_LIMIT = 1 << 16

REASONS = (
    "EMPTY",
    "SEQ_LIMIT",
    "MIXED_CONTENT",
    "NO_CONTENT",
    "BAD_TOKEN",
    "BAD_SHAPE",
    "NO_SEQ_ID",
    "BAD_SEQ_ID",
    "POS_NOT_CONTINUING",
    "POS_GAP",
    "COUPLED_DIVERGED",
    "POS_DECREASING",
)


def _wrap_i32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


class RefBatchError(ValueError):
    """The reference refused a batch; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class RefUBatch:
    """A micro-batch (spec 1.3). An empty ubatch has n_tokens == 0 and empty/None fields."""

    equal_seqs: bool = False
    n_tokens: int = 0
    n_seq_tokens: int = 0
    n_seqs: int = 0
    n_seqs_unq: int = 0
    token: Optional[List[int]] = None
    embd: Optional[List[List[float]]] = None
    pos: List[int] = field(default_factory=list)
    seq_id: List[List[int]] = field(default_factory=list)
    seq_id_unq: List[int] = field(default_factory=list)
    seq_idx: Dict[int, int] = field(default_factory=dict)
    output: List[int] = field(default_factory=list)
    batch_idx: List[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.n_tokens == 0


class _Entry:
    """One batch entry after the legacy conversion (spec 1.1)."""

    def __init__(self) -> None:
        self.token = NO_TOKEN
        self.embd_row: Optional[List[float]] = None
        self.ids: List[int] = []        # ordered, newest attached first (spec 1.6)
        self.pos: List[int] = [0, 0, 0, 0]
        self.output = False

    def attach(self, s: int) -> None:
        # spec 1.6, llmem rule: attaching prepends; attaching an id already present is a no-op.
        if s not in self.ids:
            self.ids.insert(0, s)


class RefBatchAllocator:
    """Reference of llama_batch_allocr: ``init`` (spec 2.2 + 3) and the three splits (spec 4)."""

    def __init__(self, n_seq_max: int, n_vocab: Optional[int] = None,
                 n_embd: Optional[int] = None, n_pos_per_embd: int = 1) -> None:
        self.n_seq_max = n_seq_max
        self.n_vocab = n_vocab
        self.n_embd = n_embd
        self.P = n_pos_per_embd
        self._clear()

    # ------------------------------------------------------------------------------------------
    # validated-batch state (spec 1.2)

    def _clear(self) -> None:
        self.n = 0
        self.has_token = False
        self.has_embd = False
        self.token: List[int] = []
        self.embd: List[List[float]] = []
        self.pos: List[int] = []              # flat; token batches n values, else P*n section-major
        self.seq_id: List[List[int]] = []     # stored order, primary first
        self.output: List[int] = []
        self._n_outputs = 0
        self.posset: Dict[int, set] = {}
        self.coupled: set = set()             # pairs (a, b): a non-primary, b primary
        self.has_coupled = False
        self.seqset: List[frozenset] = []
        self.groups: Dict[frozenset, List[int]] = {}
        self.seq_id_unq: List[int] = []
        self.used: List[bool] = []
        self._n_used = 0
        self._out_ids: List[int] = []

    @property
    def n_tokens(self) -> int:
        return self.n

    @property
    def n_used(self) -> int:
        return self._n_used

    @property
    def n_outputs(self) -> int:
        return self._n_outputs

    @property
    def out_ids(self) -> List[int]:
        return list(self._out_ids)

    def batch_pos_min(self, s: int) -> int:
        p = self.posset.get(s)
        return min(p) if p else -1

    def batch_pos_max(self, s: int) -> int:
        p = self.posset.get(s)
        return max(p) if p else -1

    def temporal_pos(self, i: int) -> int:
        """Temporal position of entry i (index i of the flat array, in both layouts)."""
        return self.pos[i]

    # ------------------------------------------------------------------------------------------
    # section 2.2: legacy array batch -> entries

    def _convert(self, token, embd, pos, seq_id, output, memory) -> List[_Entry]:
        if token is not None:
            n = len(token)
        elif embd is not None:
            n = len(embd)
        elif seq_id is not None:
            n = len(seq_id)
        else:
            n = 0
        if n == 0:
            # spec 3 step 2: an empty batch is fatal in llama.cpp; llmem rejects it.
            raise RefBatchError("EMPTY", "the batch has no entries")
        for name, arr in (("token", token), ("embd", embd), ("seq_id", seq_id), ("output", output)):
            if arr is not None and len(arr) != n:
                raise RefBatchError("BAD_SHAPE", f"{name} has {len(arr)} entries, expected {n}")

        entries = [_Entry() for _ in range(n)]
        # step 1: next_pos[s] = memory.seq_pos_max(s) + 1 (no memory: -1 + 1 = 0). Only ids in
        # [0, n_seq_max) have a counter; any other id is rejected by init step 8 anyway, and the
        # positions never decide a check before step 8, so its value (0) is not observable.
        # (Filled on first use; the same values as filling every s up front.)
        next_pos: Dict[int, int] = {}

        def counter(s: int) -> int:
            if s not in next_pos:
                next_pos[s] = (memory.seq_pos_max(s) if memory is not None else -1) + 1
            return next_pos[s]

        for i in range(n):
            e = entries[i]
            # step 2: ids attached in array order (default: one id, 0)
            arr_ids = [0] if seq_id is None else list(seq_id[i])
            for s in arr_ids:
                e.attach(int(s))
            # step 2: token / embedding copied if given
            if token is not None:
                e.token = int(token[i])
            if embd is not None and embd[i] is not None:
                e.embd_row = list(embd[i])
            # step 2: output = logits[i] != 0 if given, else only the last entry
            if output is not None:
                e.output = bool(output[i])
            else:
                e.output = (i == n - 1)
            # step 2: positions. Given positions are copied later (init step 7), after the shape
            # check; absent ones come from the counter of the *first array element*.
            if pos is None:
                if len(arr_ids) > 0:
                    first = int(arr_ids[0])
                    if 0 <= first < self.n_seq_max:
                        # positions are int32 (§0): a counter past 2**31 - 1 wraps, as the
                        # reference's int32 arithmetic does in practice
                        e.pos[0] = _wrap_i32(counter(first))
                        next_pos[first] += 1
        return entries

    # ------------------------------------------------------------------------------------------
    # section 3: init

    def init(self, token=None, embd=None, pos=None, seq_id=None, output=None, memory=None,
             output_all: bool = False) -> None:
        """Validate a batch (raises RefBatchError) and reset the split cursor."""
        # The new state is built in a scratch allocator and adopted only on success, so that a
        # rejected batch leaves this allocator as it was.
        scratch = RefBatchAllocator(self.n_seq_max, self.n_vocab, self.n_embd, self.P)
        scratch._init(token, embd, pos, seq_id, output, memory, output_all)
        self.__dict__.update(scratch.__dict__)

    def _init(self, token, embd, pos, seq_id, output, memory, output_all) -> None:
        P = self.P
        entries = self._convert(token, embd, pos, seq_id, output, memory)   # 2.2 (+ step 2)
        n = len(entries)

        # step 3: n_seq_max limit (llama.cpp 256; llmem's lifted limit)
        if self.n_seq_max > SEQ_MAX_LIMIT:
            raise RefBatchError("SEQ_LIMIT", f"n_seq_max {self.n_seq_max} > {SEQ_MAX_LIMIT}")

        # step 4: content kind decided by entry 0, every other entry must agree
        has_token = entries[0].token != NO_TOKEN
        has_embd = entries[0].embd_row is not None
        for i in range(1, n):
            if (entries[i].token != NO_TOKEN) != has_token or \
                    (entries[i].embd_row is not None) != has_embd:
                raise RefBatchError("MIXED_CONTENT", f"entry {i} differs from entry 0 in kind")
        if not has_token and not has_embd:
            raise RefBatchError("NO_CONTENT", "entries carry neither token ids nor embeddings")

        # step 5: token ids in [0, n_vocab)
        if has_token:
            for i in range(n):
                t = entries[i].token
                if t < 0 or (self.n_vocab is not None and t >= self.n_vocab):
                    raise RefBatchError("BAD_TOKEN", f"entry {i} has token id {t}")

        # step 6: embedding rows, taken verbatim (all rows must have the batch row width)
        rows: List[List[float]] = []
        if has_embd:
            width = self.n_embd if self.n_embd is not None else len(entries[0].embd_row)
            for i in range(n):
                if len(entries[i].embd_row) != width:
                    raise RefBatchError("BAD_SHAPE", f"embedding row {i} has width "
                                        f"{len(entries[i].embd_row)}, expected {width}")
                rows.append(list(entries[i].embd_row))

        # step 7: positions. Token batches: one per entry. Embedding-only: P per entry,
        # section-major. Given positions must have exactly that many values.
        if pos is not None:
            want = n if has_token else P * n
            if len(pos) != want:
                raise RefBatchError("BAD_SHAPE", f"pos has {len(pos)} values, expected {want}")
            if has_token:
                for i in range(n):
                    entries[i].pos[0] = int(pos[i])
            else:
                for i in range(n):
                    for j in range(P):
                        entries[i].pos[j] = int(pos[j * n + i])
        if has_token:
            flat_pos = [entries[i].pos[0] for i in range(n)]
        else:
            flat_pos = [0] * (P * n)
            for j in range(P):
                for i in range(n):
                    flat_pos[j * n + i] = entries[i].pos[j]

        # step 8: ids in [0, n_seq_max), entries with no id rejected (llmem rule)
        for i in range(n):
            if len(entries[i].ids) == 0:
                raise RefBatchError("NO_SEQ_ID", f"entry {i} has no sequence id")
            for s in entries[i].ids:
                if s < 0 or s >= self.n_seq_max:
                    raise RefBatchError("BAD_SEQ_ID", f"entry {i} has sequence id {s}")

        # step 9: outputs, output_all forces every entry to be an output
        outs = [1 if entries[i].output else 0 for i in range(n)]
        if output_all and any(o == 0 for o in outs):
            outs = [1] * n
        n_outputs = sum(outs)

        # step 10: position sets (temporal value) and coupling
        posset: Dict[int, set] = {}
        coupled = set()
        has_coupled = False
        for i in range(n):
            ids = entries[i].ids
            s0 = ids[0]
            for k, s in enumerate(ids):
                posset.setdefault(s, set()).add(flat_pos[i])
                if k > 0:
                    coupled.add((s, s0))
                    has_coupled = True

        # step 11: seqset, groups, seq_id_unq
        seqset = [frozenset(entries[i].ids) for i in range(n)]
        groups: Dict[frozenset, List[int]] = {}
        for i in range(n):
            groups.setdefault(seqset[i], []).append(i)
        seq_id_unq = sorted(posset.keys())

        # step 12: position consistency with the memory, per sequence in ascending order
        for s in range(self.n_seq_max):
            if s not in posset:
                continue
            X = memory.seq_pos_max(s) if memory is not None else -1
            y_min = min(posset[s])
            y_max = max(posset[s])
            if P > 1:
                # M-RoPE: only "not behind the memory"; gaps and jumps allowed
                if has_token:
                    if X >= 0 and X >= y_min:
                        raise RefBatchError("POS_NOT_CONTINUING",
                                            f"seq {s}: memory ends at {X}, batch starts at {y_min}")
                else:
                    if X >= 0 and X > y_min:
                        raise RefBatchError("POS_NOT_CONTINUING",
                                            f"seq {s}: memory ends at {X}, batch starts at {y_min}")
            else:
                if X >= 0 and y_min != X + 1:
                    raise RefBatchError("POS_NOT_CONTINUING",
                                        f"seq {s}: memory ends at {X}, batch starts at {y_min}")
                if y_max - y_min + 1 > len(posset[s]):
                    raise RefBatchError("POS_GAP", f"seq {s}: positions {sorted(posset[s])}")

        # step 13: coupled sequences must agree in the memory
        if memory is not None:
            for (a, b) in sorted(coupled):
                if memory.seq_pos_min(a) != memory.seq_pos_min(b) or \
                        memory.seq_pos_max(a) != memory.seq_pos_max(b):
                    raise RefBatchError("COUPLED_DIVERGED", f"seqs {a} and {b} differ in memory")

        # step 14: positions never decrease along the batch, per sequence (last starts at -1).
        # (The "incompatible sequence sets" rule never fires and is not implemented, quirk Q2.)
        last: Dict[int, int] = {}
        for i in range(n):
            for s in entries[i].ids:
                if flat_pos[i] < last.get(s, -1):
                    raise RefBatchError("POS_DECREASING",
                                        f"seq {s}: entry {i} at {flat_pos[i]} < {last.get(s, -1)}")
                last[s] = flat_pos[i]

        # accepted: adopt the state (step 1: W; the rest from the steps above)
        self.n = n
        self.has_token = has_token
        self.has_embd = has_embd
        self.token = [entries[i].token for i in range(n)] if has_token else []
        self.embd = rows
        self.pos = flat_pos
        self.seq_id = [list(entries[i].ids) for i in range(n)]
        self.output = outs
        self._n_outputs = n_outputs
        self.posset = posset
        self.coupled = coupled
        self.has_coupled = has_coupled
        self.seqset = seqset
        self.groups = groups
        self.seq_id_unq = seq_id_unq
        # step 15: reset the split cursor
        self.split_reset()

    # ------------------------------------------------------------------------------------------
    # section 4.1: the split cursor

    def split_reset(self) -> None:
        self.used = [False] * self.n
        self._n_used = 0
        self._out_ids = []

    # ------------------------------------------------------------------------------------------
    # section 4.2: assembling a ubatch from an ordered list of batch indices

    def _assemble(self, L: List[int], n_seqs: int, equal_seqs: bool) -> RefUBatch:
        n_tokens = len(L)
        ub = RefUBatch()
        ub.equal_seqs = equal_seqs
        ub.n_tokens = n_tokens
        ub.n_seqs = n_seqs
        ub.n_seq_tokens = n_tokens // n_seqs
        if self.has_token:
            ub.token = [self.token[i] for i in L]
        if self.has_embd:
            ub.embd = [list(self.embd[i]) for i in L]
        # positions, section-major; token batches broadcast the temporal value to every section
        ub.pos = [0] * (self.P * n_tokens)
        for j in range(self.P):
            for k in range(n_tokens):
                if self.has_token:
                    ub.pos[j * n_tokens + k] = self.pos[L[k]]
                else:
                    ub.pos[j * n_tokens + k] = self.pos[j * self.n + L[k]]
        ub.seq_id = [list(self.seq_id[i]) for i in L]
        ub.output = [self.output[i] for i in L]
        ub.batch_idx = list(L)
        # every output entry appends its batch index to out_ids, in ubatch order
        for i in L:
            if self.output[i]:
                self._out_ids.append(i)
        # seq_id_unq / seq_idx recomputed for the ubatch
        ids = set()
        for i in L:
            for s in self.seq_id[i]:
                ids.add(s)
        ub.seq_id_unq = sorted(ids)
        ub.seq_idx = {s: r for r, s in enumerate(ub.seq_id_unq)}
        ub.n_seqs_unq = len(ub.seq_id_unq)
        return ub

    def _take(self, i: int) -> None:
        self.used[i] = True
        self._n_used += 1

    def _give_back(self, i: int) -> None:
        self.used[i] = False
        self._n_used -= 1

    # ------------------------------------------------------------------------------------------
    # section 4.3: split_simple

    def split_simple(self, n_ubatch: int) -> RefUBatch:
        # step 1: first unused index
        f = None
        for i in range(self.n):
            if not self.used[i]:
                f = i
                break
        if f is None:
            return RefUBatch()
        # step 2: f, f+1, ... (without checking used), at least one, stop at n_ubatch or the end
        L: List[int] = []
        i = f
        while True:
            self._take(i)
            L.append(i)
            i += 1
            if i >= self.n or len(L) >= n_ubatch:
                break
        # step 3
        return self._assemble(L, n_seqs=len(L), equal_seqs=False)

    # ------------------------------------------------------------------------------------------
    # section 4.4: split_equal

    def split_equal(self, n_ubatch: int, sequential: bool, keep_tail: int = 0) -> RefUBatch:
        # step 1: the sequential split refuses coupled batches, consuming nothing
        if sequential and self.has_coupled:
            return RefUBatch()

        # step 2: pick the sequence sets
        chosen: List[frozenset] = []
        last = -1
        for i in range(self.n):
            if self.used[i]:
                continue
            S = self.seqset[i]
            overlaps = False
            for C in chosen:
                if len(S & C) > 0:
                    overlaps = True
                    break
            if overlaps:
                continue
            primary = self.seq_id[i][0]
            if sequential and len(chosen) > 0 and primary != last + 1:
                continue
            chosen.append(S)
            last = primary
            if len(chosen) > n_ubatch:
                break

        # step 3
        if len(chosen) == 0:
            return RefUBatch()

        # step 6 (checked up front): n_ubatch <= keep_tail is fatal in llama.cpp; llmem raises,
        # and raising before step 5 leaves the cursor untouched.
        if keep_tail > 0 and n_ubatch <= keep_tail:
            raise ValueError(f"split_equal: n_ubatch ({n_ubatch}) must be > keep_tail ({keep_tail})")

        # step 4: cursor = first unused position in each chosen set's group list
        cursor: List[int] = []
        for S in chosen:
            g = self.groups[S]
            c = 0
            while self.used[g[c]]:
                c += 1
            cursor.append(c)

        # step 5: rounds, one entry per chosen set per round
        n_seqs = len(chosen)
        taken: List[List[int]] = [[] for _ in chosen]
        rounds = 0
        while True:
            if any(cursor[s] >= len(self.groups[chosen[s]]) for s in range(n_seqs)):
                break
            for s in range(n_seqs):
                idx = self.groups[chosen[s]][cursor[s]]
                self._take(idx)
                taken[s].append(idx)
                cursor[s] += 1
            rounds += 1
            if (rounds + 1) * n_seqs > n_ubatch:
                break

        # step 6: the tail rule
        if keep_tail > 0:
            def remaining(s: int) -> int:
                return len(self.groups[chosen[s]]) - cursor[s]

            # 6.1: longest prefix of sets with remaining == 0 or remaining >= keep_tail
            keep = 0
            for s in range(len(chosen)):
                r = remaining(s)
                if r == 0 or r >= keep_tail:
                    keep += 1
                else:
                    break
            # 6.2: the first set violates: complete it if it fits, else shorten it
            if keep == 0:
                if len(taken[0]) + remaining(0) <= n_ubatch:
                    g = self.groups[chosen[0]]
                    while cursor[0] < len(g):
                        idx = g[cursor[0]]
                        self._take(idx)
                        taken[0].append(idx)
                        cursor[0] += 1
                else:
                    while remaining(0) < keep_tail:
                        idx = taken[0].pop()
                        self._give_back(idx)
                        cursor[0] -= 1
                keep = 1
            # 6.3: give back the sets after position keep
            for s in range(keep, len(chosen)):
                for idx in taken[s]:
                    self._give_back(idx)
            chosen = chosen[:keep]
            taken = taken[:keep]

        # step 7: concatenate set by set (inside a set, batch order)
        L: List[int] = []
        for s in range(len(chosen)):
            L.extend(taken[s])
        return self._assemble(L, n_seqs=len(chosen), equal_seqs=True)

    # ------------------------------------------------------------------------------------------
    # section 4.5: split_seq

    def split_seq(self, n_ubatch: int) -> RefUBatch:
        # step 1
        f = None
        for i in range(self.n):
            if not self.used[i]:
                f = i
                break
        if f is None:
            return RefUBatch()
        current = self.seqset[f]
        self._take(f)
        L = [f]
        # step 2: narrow to subsets of the current set
        i = f
        while True:
            if len(L) >= n_ubatch:
                break
            i += 1
            while i < self.n and (self.used[i] or not self.seqset[i] <= current):
                i += 1
            if i >= self.n:
                break
            self._take(i)
            L.append(i)
            current = self.seqset[i]
        # step 3
        return self._assemble(L, n_seqs=1, equal_seqs=True)


class FakeMemory:
    """A memory that only reports positions: ``ranges[s] = (min, max)``; absent = empty (-1)."""

    def __init__(self, ranges: Optional[Dict[int, Any]] = None) -> None:
        self.ranges = dict(ranges or {})

    def seq_pos_min(self, s: int) -> int:
        r = self.ranges.get(s)
        return r[0] if r is not None else -1

    def seq_pos_max(self, s: int) -> int:
        r = self.ranges.get(s)
        return r[1] if r is not None else -1
