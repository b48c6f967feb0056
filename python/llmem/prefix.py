"""Prefix caching over any llmem memory: a radix tree of token ids that owns cached content.

:class:`PrefixCache` serves requests on a memory (``KVCache``, ``KVCacheISWA``,
``RecurrentMemory``, ``HybridMemory``, ``HybridISWAMemory``) and keeps what they decoded for the
requests that follow, as SGLang's ``RadixCache``/``MambaRadixCache`` and vLLM's prefix caching do,
within llama.cpp's sequence model:

* **K/V cells are shared, never copied.** The memory's sequence ids are split in two: ids
  ``[0, n_requests)`` serve requests, the others are *holders*. Each tree node owns one holder
  sequence that holds exactly the node's positions ``[start, end)`` (a ``seq_cp`` adds the holder
  to the cells a request decoded). ``admit`` hands a request the cells of its longest cached
  prefix with one ``seq_cp`` per node on the path.
* **Recurrent state is checkpointed.** A recurrent state cannot be cut back, so the cache keeps
  checkpoints (``RecurrentMemory.checkpoint_save``: host copies of a sequence's rows) at the
  lengths where requests stood after a decode; a recurrent or hybrid hit ends at the longest
  checkpoint on the matched path and restores it.
* **Live requests share too.** Every :meth:`commit` (after each decode of a request) inserts what
  the request has decoded so far, so a request can reuse a prefix another one is still extending.
* **Sliding windows.** In a window cache (iSWA) a holder keeps only the window before its node's
  end (a window cell shared by two sequences is never reused as the window slides, so sharing
  more would fill the cache); a hit is taken only where that window is held, so it ends at a
  node's end, and checkpoints of a hybrid-iSWA memory are placed at node ends.

A server's loop::

    cache = PrefixCache(memory, n_requests=8)
    seq, n_cached = cache.admit(prompt)               # the first n_cached tokens are in the memory
    for chunk in cache.prefill_chunks(seq, prompt[n_cached:], n_batch):
        ctx = cache.init_batch(batch_of(chunk), n_ubatch)   # evicts cached content if no room
        ...decode...; cache.commit(seq, chunk)         # index it, checkpoint the state
    while generating:
        ...decode one token t...; cache.commit(seq, [t])
    cache.release(seq)                                # the content stays cached; seq is free

Threads: every method takes the memory's lock, so cache calls are atomic with memory calls.
The cache owns the holder ids: do not ``clear``, ``seq_keep`` or ``seq_rm(-1, ...)`` the memory
behind its back (use :meth:`clear`), nor shift (``seq_add``/``seq_div``) a sequence served through
it (cells shared with the cache would move too).
"""

from __future__ import annotations

import heapq
import itertools
from typing import (AbstractSet, Any, Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Set, Tuple,
                    TypedDict, Union, cast)

import numpy as np

from . import _core
from .errors import LlmemError
from .hybrid import HybridMemory
from .kv_cache import IntsLike, KVCache, KVCacheISWA
from .memory import STATE_HEADER, BatchOrAllocator, MemoryContext
from .recurrent import RecurrentMemory, _int
from .store.keys import ExtraKey, memory_config_digest
from .status import Status, SWAType
from .store.tier import PrefixStore

__all__ = ["PrefixCache"]

#: The memories a prefix cache serves (a HybridISWAMemory is a HybridMemory).
PrefixMemory = Union[KVCache, KVCacheISWA, RecurrentMemory, HybridMemory]


class PrefixStats(TypedDict):
    """What :meth:`PrefixCache.stats` returns."""

    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_rate: float
    evictions: int
    evicted_tokens: int
    checkpoints_saved: int
    cached_tokens: int
    nodes: int
    checkpoints: int
    checkpoint_bytes: int
    live: int
    store_hits: int
    store_hit_tokens: int
    store_spills: int


class _Node:
    """A run of tokens at positions ``[start, end)``; its holder sequence holds their cells
    (K/V memories) and ``ckpts`` maps a length in ``(start, end]`` to a checkpoint id."""

    __slots__ = ("parent", "children", "tokens", "start", "holder", "ckpts", "last_used", "lockers", "key",
                 "alive")

    def __init__(self, parent: Optional["_Node"], tokens: np.ndarray, start: int, holder: int, key: Hashable) -> None:
        self.parent = parent
        self.children: Dict[int, _Node] = {}
        self.tokens = tokens
        self.start = start
        self.holder = holder
        self.ckpts: Dict[int, int] = {}
        self.last_used = 0
        self.lockers: Set[int] = set()
        self.key = key
        self.alive = True

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class _Live:
    """A request being served: its sequence, the tokens the memory holds for it, the nodes on
    its path (locked: evicting them would free no cell the request holds)."""

    __slots__ = ("seq", "key", "tokens", "n", "path", "branch", "transient", "indexed", "shared", "leaf")

    def __init__(self, seq: int, key: Hashable, tokens: np.ndarray, n: int, branch: int) -> None:
        self.seq = seq
        self.key = key
        self.tokens = tokens   # grows by doubling; the first n are held by the memory
        self.n = n
        self.path: List[_Node] = []
        self.branch = branch   # where the prompt leaves the cached tokens: a checkpoint pays there
        self.transient = -1    # checkpoint of the last one-token commit (replaced by the next)
        self.indexed = True    # False once the request's history is no longer a plain prefix
        self.shared = n        # its cells below this position may be shared with the cache
        self.leaf: Optional[_Node] = None  # the node it created last (it grows in place)


def _as_tokens(tokens: IntsLike, name: str = "tokens") -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, not {arr.dtype}")
    return arr.astype(np.int32, copy=False)




def _stable_key(key: Hashable) -> bool:
    """Whether a request key has a byte form that is the same in every process (the store's
    keys are built from it)."""
    return key is None or (isinstance(key, (str, bytes, int)) and not isinstance(key, bool))


def _window_of(cache: KVCache) -> int:
    """How many positions before a token a window cache must hold for it: ``n_swa - 1`` with
    the standard mask (a key ``n_swa`` or more positions back is masked), ``n_swa`` with the
    others (chunked, symmetric), read from the configuration fields the cache's versioned
    state header records (the cache object keeps no Python copy of them)."""
    header = bytes(_core.state_header(1, [cache._core], None, -1, STATE_HEADER, b""))

    def field(name: bytes) -> int:
        at = header.find(bytes([len(name)]) + name)
        if at < 0:  # pragma: no cover - the header always describes the window
            raise LlmemError("cannot read the window of the sliding-window cache")
        at += 1 + len(name)
        return int.from_bytes(header[at:at + 8], "little", signed=True)

    n_swa = field(b"attn.n_swa")
    return n_swa - 1 if field(b"attn.swa_type") == int(SWAType.STANDARD) else n_swa


class PrefixCache:
    """A token-keyed prefix index owning cached content of ``memory`` (see the module doc).

    Parameters
    ----------
    memory:
        The memory served: KVCache or KVCacheISWA (one stream), RecurrentMemory, HybridMemory or
        HybridISWAMemory. Its sequence ids ``[0, n_requests)`` serve requests; the others hold
        cached K/V content (one per tree node), so ``n_seq_max`` bounds the nodes kept.
    n_requests:
        Sequence ids given to requests. Default: every id for a RecurrentMemory (it needs no
        holders), half of ``n_seq_max`` otherwise. Recurrent parts need ``mem_size >= n_requests``.
    max_cached_tokens:
        Retention bound: cached tokens above it are evicted (LRU) after each commit. None: kept
        until room is needed.
    checkpoint_interval:
        With a recurrent part, :meth:`prefill_chunks` ends chunks on multiples of it, so a long
        prompt leaves a checkpoint every ``checkpoint_interval`` tokens (0: prompts end only
        where the caller's batches end).
    max_checkpoints, max_checkpoint_bytes:
        The recurrent checkpoint pool's limits (None: the memory's current ones).
    store:
        A second tier (:class:`llmem.store.PrefixStore`: host memory, a directory, Redis):
        what is evicted is spilled to it (block-aligned prefixes; recurrent states where a
        checkpoint lies on a block boundary), and a request whose longest prefix in memory is
        shorter than one in the store restores the stored one (see docs/store.md). Requests
        whose ``key`` is not None, a str, bytes or an int do not use the store.
    """

    def __init__(self, memory: PrefixMemory, n_requests: Optional[int] = None, *,
                 max_cached_tokens: Optional[int] = None, checkpoint_interval: int = 0,
                 max_checkpoints: Optional[int] = None, max_checkpoint_bytes: Optional[int] = None,
                 store: Optional[PrefixStore] = None) -> None:
        kv: Optional[Union[KVCache, KVCacheISWA]]
        recr: Optional[RecurrentMemory]
        if isinstance(memory, HybridMemory):
            kv, recr = memory.mem_attn, memory.mem_recr
        elif isinstance(memory, RecurrentMemory):
            kv, recr = None, memory
        elif isinstance(memory, (KVCache, KVCacheISWA)):
            kv, recr = memory, None
        else:
            raise TypeError("memory must be a KVCache, KVCacheISWA, RecurrentMemory, HybridMemory or "
                            f"HybridISWAMemory, not {type(memory).__name__}")
        if kv is not None:
            for part in ((kv.base, kv.swa) if isinstance(kv, KVCacheISWA) else (kv,)):
                if part.n_stream != 1:
                    raise ValueError("a prefix cache shares cells between sequences: the KV cache must be unified "
                                     f"(one stream), this one has {part.n_stream}")
        n_seq_max = memory.n_seq_max
        if n_requests is None:
            n_requests = n_seq_max if kv is None else max(1, n_seq_max // 2)
        hi = n_seq_max if kv is None else n_seq_max - 1
        n_requests = _int("n_requests", n_requests, 1, hi)
        if recr is not None and recr.size < n_requests:
            raise ValueError(f"the recurrent memory has {recr.size} cells, fewer than n_requests={n_requests}")
        self._memory = memory
        self._kv = kv
        self._recr = recr
        self._swa = kv.swa if isinstance(kv, KVCacheISWA) else None
        self._window = _window_of(self._swa) if self._swa is not None else 0
        self._lock = memory.lock
        self._n_requests = n_requests
        self._max_cached = None if max_cached_tokens is None else _int("max_cached_tokens", max_cached_tokens, 0,
                                                                        2**62)
        self._interval = _int("checkpoint_interval", checkpoint_interval, 0, 2**31 - 1)
        if recr is not None and (max_checkpoints is not None or max_checkpoint_bytes is not None):
            recr.set_checkpoint_limits(max_checkpoints, max_checkpoint_bytes)
        self._roots: Dict[Hashable, _Node] = {}
        self._free_seqs = list(range(n_requests - 1, -1, -1))        # popped from the end: 0 first
        self._free_holders = list(range(n_seq_max - 1, n_requests - 1, -1)) if kv is not None else []
        self._live: Dict[int, _Live] = {}
        self._clock = itertools.count(1)
        # eviction candidates: (last_used, tick, node) pushed whenever a node may have become an
        # unlocked leaf; entries are checked when popped (no scan of the tree per eviction)
        self._heap: List[Tuple[int, int, _Node]] = []
        self._tick = itertools.count()
        self._n_nodes = 0
        self._cached_tokens = 0
        self._n_ckpts = 0
        self._ckpt_node: Dict[int, _Node] = {}  # checkpoint id -> the node listing it
        self._stats: Dict[str, int] = {"requests": 0, "prompt_tokens": 0, "hit_tokens": 0, "evictions": 0,
                       "evicted_tokens": 0, "checkpoints_saved": 0, "store_hits": 0, "store_hit_tokens": 0,
                       "store_spills": 0}
        if store is not None and not isinstance(store, PrefixStore):
            raise TypeError(f"store must be a llmem.store.PrefixStore, not {type(store).__name__}")
        if store is not None and store.keys.config_digest != memory_config_digest(memory):
            raise ValueError("the store's keys were made for a memory of another kind or configuration")
        self._store = store

    # -- queries -----------------------------------------------------------------------------------

    @property
    def memory(self) -> PrefixMemory:
        return self._memory

    @property
    def n_requests(self) -> int:
        return self._n_requests

    def live_sequences(self) -> List[int]:
        """Sequence ids of the requests being served, ascending."""
        with self._lock:
            return sorted(self._live)

    def tokens(self, seq_id: int) -> np.ndarray:
        """The tokens the memory holds for a live request (a copy)."""
        with self._lock:
            live = self._live_of(seq_id)
            return live.tokens[:live.n].copy()

    def stats(self) -> PrefixStats:
        """Counters a server exports: ``requests`` admitted, ``prompt_tokens`` they brought,
        ``hit_tokens`` found cached, ``hit_rate`` (hit / prompt tokens), ``evictions`` (nodes)
        and ``evicted_tokens``, ``cached_tokens`` and ``nodes`` held now, ``checkpoints`` and
        ``checkpoint_bytes`` held now, ``live`` requests; with a store, ``store_hits`` and
        ``store_hit_tokens`` (requests whose prefix came from the store) and ``store_spills``
        (prefixes written to it when evicted)."""
        with self._lock:
            out = cast(PrefixStats, dict(self._stats))  # the keys below complete it
            out["hit_rate"] = out["hit_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else 0.0
            out["cached_tokens"] = self._cached_tokens
            out["nodes"] = self._n_nodes
            out["checkpoints"] = self._n_ckpts
            out["checkpoint_bytes"] = (self._recr.checkpoint_stats()["checkpoint_bytes"] * self._n_ckpts
                                       if self._recr is not None else 0)
            out["live"] = len(self._live)
            return out

    def match(self, tokens: IntsLike, key: Hashable = None) -> int:
        """Tokens :meth:`admit` would find cached for ``tokens`` now (changes nothing)."""
        tokens = _as_tokens(tokens)
        with self._lock:
            return self._plan_hit(tokens, key)[0]

    # -- requests ----------------------------------------------------------------------------------

    def admit(self, tokens: IntsLike, seq_id: Optional[int] = None, key: Hashable = None) -> Tuple[int, int]:
        """Start a request for ``tokens`` (its whole prompt); ``key`` separates caches that must
        not mix (a LoRA adapter, an image hash). Returns ``(seq_id, n_cached)``: the request's
        sequence (a free one, or ``seq_id``, which must be free and hold nothing) now holds the
        first ``n_cached`` tokens, at positions ``0 .. n_cached - 1``; decode the rest and
        :meth:`commit` them. At most ``len(tokens) - 1`` tokens are reused (the last one is
        decoded to produce logits). K/V: the longest cached prefix, whose cells are shared; a
        sliding-window cache only where the window's cells are still held. Recurrent and
        hybrid: the longest checkpointed length on it, restored. LlmemError when no sequence is
        free; ValueError for a busy ``seq_id``."""
        tokens = _as_tokens(tokens)
        # the store is asked before the memory's lock is taken: other threads' decodes never
        # wait on its network
        stored = self._store_candidates(tokens, key)
        with self._lock:
            if seq_id is None:
                if not self._free_seqs:
                    raise LlmemError(f"no free request sequence: all {self._n_requests} are serving requests")
                seq = self._free_seqs[-1]
            else:
                seq = _int("seq_id", seq_id, 0, self._n_requests - 1)
                if seq in self._live:
                    raise ValueError(f"sequence {seq} is serving a request: release it first")
                if seq not in self._free_seqs:  # pragma: no cover - live and free cover every id
                    raise ValueError(f"sequence {seq} is not free")
            if any(part is not None and part.seq_pos_max(seq) != -1 for part in (self._kv, self._recr)):
                raise ValueError(f"sequence {seq} holds cells or a state: remove them (seq_rm) before admitting "
                                 "a request into it")
            n_hit, path, ckpt = self._plan_hit(tokens, key)
            for store_key, length, value in stored:
                if length <= n_hit:
                    break
                assert self._store is not None  # candidates come only from a store
                if self._store.restore_value(self._memory, seq, store_key, length, value,
                                             exact=self._recr is not None):
                    n_hit, path, ckpt = length, [], None
                    self._stats["store_hits"] += 1
                    self._stats["store_hit_tokens"] += length
                    break
            matched = self._walk(tokens, len(tokens), key)[1] if self._recr is not None else n_hit
            # share the cells, then the state: nothing has changed if the restore refuses
            if self._kv is not None:
                for node in path:
                    p1 = min(node.end, n_hit)
                    if p1 > node.start:
                        self._share(node.holder, seq, node.start, p1, n_hit)
            if ckpt is not None:
                assert self._recr is not None  # a checkpoint is planned only with a recurrent part
                try:
                    self._recr.checkpoint_restore(ckpt, seq)
                except BaseException:
                    if self._kv is not None:
                        self._kv.seq_rm(seq, -1, -1)
                    raise
            if seq_id is None:
                self._free_seqs.pop()
            else:
                self._free_seqs.remove(seq)
            buf = np.empty(max(16, 2 * len(tokens)), np.int32)
            buf[:n_hit] = tokens[:n_hit]
            live = _Live(seq, key, buf, n_hit, matched if n_hit < matched < len(tokens) else -1)
            self._live[seq] = live
            self._lock_path(live, [node for node in path if node.start < n_hit])
            now = next(self._clock)
            for node in live.path:
                node.last_used = now
            self._stats["requests"] += 1
            self._stats["prompt_tokens"] += len(tokens)
            self._stats["hit_tokens"] += n_hit
            return seq, n_hit

    def prefill_chunks(self, seq_id: int, tokens: IntsLike, n_batch: int) -> List[np.ndarray]:
        """``tokens`` (what the request decodes next) cut into chunks of at most ``n_batch``
        whose ends, as lengths of the request's history, fall on multiples of
        ``checkpoint_interval`` where one lies inside: decode and :meth:`commit` them one by one
        and a long prompt leaves a checkpoint every interval."""
        tokens = _as_tokens(tokens)
        n_batch = _int("n_batch", n_batch, 1, 2**31 - 1)
        with self._lock:
            live = self._live_of(seq_id)
            start, branch = live.n, live.branch
        # with a recurrent part, a chunk also ends where the prompt leaves the cached tokens
        # (the next request branching there then finds a checkpoint) and on interval multiples
        recurrent = self._recr is not None
        chunks: List[np.ndarray] = []
        pos, n = 0, len(tokens)
        while pos < n:
            end = min(pos + n_batch, n)
            if recurrent:
                here = start + pos
                if self._interval:
                    due = (here // self._interval + 1) * self._interval - start
                    end = min(end, due)
                if here < branch < start + end:
                    end = branch - start
            chunks.append(tokens[pos:end])
            pos = end
        return chunks

    def commit(self, seq_id: int, tokens: IntsLike, index: bool = True) -> None:
        """Record ``tokens`` as decoded into the request's sequence (after its last position):
        they are indexed at once, so other requests can reuse them, and a recurrent part's
        state is checkpointed at the new length. Call it after each decode of the request.
        ValueError (nothing recorded) when the memory's last position for the sequence is not
        the request's length plus ``len(tokens)`` minus one. ``index=False`` only records the
        tokens (nothing shared or checkpointed): for a request whose sequence will be shifted
        (:meth:`shift`), which must not share cells beyond the positions it keeps."""
        tokens = _as_tokens(tokens)
        with self._lock:
            live = self._live_of(seq_id)
            n_new = live.n + len(tokens)
            last = self._memory.seq_pos_max(live.seq)
            if last != n_new - 1:
                raise ValueError(f"commit: sequence {live.seq} ends at position {last} in the memory, but the "
                                 f"request would hold {n_new} tokens (positions up to {n_new - 1})")
            if len(tokens) == 0:
                return
            if n_new > len(live.tokens):
                grown = np.empty(2 * n_new, np.int32)
                grown[:live.n] = live.tokens[:live.n]
                live.tokens = grown
            live.tokens[live.n:n_new] = tokens
            live.n = n_new
            if index and live.indexed:
                live.shared = n_new
                self._insert(live, transient=len(tokens) == 1)
            if self._max_cached is not None and self._cached_tokens > self._max_cached:
                self._evict_tokens(self._cached_tokens - self._max_cached)

    def shift(self, seq_id: int, n_keep: int, n_discard: int) -> None:
        """llama.cpp server's context shift of a live request: drop positions ``[n_keep,
        n_keep + n_discard)`` and move the later ones back by ``n_discard``. Cells shared with the
        cache would move for every sharer, so the request may share only positions below
        ``n_keep`` (commit the rest with ``index=False``); ValueError (nothing changed)
        otherwise. Afterwards the request's history is no longer a prefix of anything: its
        later commits are not indexed."""
        with self._lock:
            live = self._live_of(seq_id)
            n_keep = _int("n_keep", n_keep, 0, live.n)
            n_discard = _int("n_discard", n_discard, 0, live.n - n_keep)
            if not self._memory.get_can_shift():
                raise ValueError(f"{type(self._memory).__name__} cannot shift positions")
            shared = live.shared
            if shared > n_keep:
                raise ValueError(f"sequence {live.seq} shares positions up to {shared - 1} with the cache, beyond "
                                 f"n_keep={n_keep}: a shift would move them for every sharer")
            self._memory.seq_rm(live.seq, n_keep, n_keep + n_discard)
            self._memory.seq_add(live.seq, n_keep + n_discard, -1, -n_discard)
            live.tokens[n_keep:live.n - n_discard] = live.tokens[n_keep + n_discard:live.n].copy()
            live.n -= n_discard
            live.indexed = False

    def release(self, seq_id: int) -> None:
        """The request is done: its sequence is emptied and free again; what it committed stays
        cached under its tokens (until evicted)."""
        with self._lock:
            live = self._live_of(seq_id)
            self._memory.seq_rm(live.seq, -1, -1)
            if self._recr is not None and self._recr.seq_pos_max(live.seq) != -1:
                self._recr.seq_rm(live.seq, -1, -1)
            self._lock_path(live, [])
            del self._live[live.seq]
            self._free_seqs.append(live.seq)

    # -- room ----------------------------------------------------------------------------------------

    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int, embd_all: bool = False) -> MemoryContext:
        """``memory.init_batch``; when it finds no room, evict cached content (least recently
        used leaves first, never a live request's) just until the plan succeeds or nothing is
        left to evict. A server calls this instead of ``memory.init_batch``: one call, and the
        returned context is applied as usual (its status is FAILED_PREPARE only when even an
        empty cache could not hold the batch)."""
        with self._lock:
            ctx = self._memory.init_batch(balloc_or_batch, n_ubatch, embd_all)
            step = 0
            while ctx.status == Status.FAILED_PREPARE and self._kv is not None:
                n_tokens = getattr(balloc_or_batch, "n_tokens", 1)
                free = self._kv.size - self._kv.used
                # first the missing cells, then doubling: a few plans even where the estimate
                # misses (fragmentation, a small window cache)
                want = max(1, int(n_tokens) - free) << step
                if self._evict_tokens(want) == 0:
                    break
                step += 1
                ctx = self._memory.init_batch(balloc_or_batch, n_ubatch, embd_all)
            return ctx

    def evict(self, n_tokens: int) -> int:
        """Evict cached content not used by a live request, least recently used leaves first,
        until ``n_tokens`` cached tokens are freed (or none is left); returns the tokens freed."""
        n_tokens = _int("n_tokens", n_tokens, 0, 2**62)
        with self._lock:
            return self._evict_tokens(n_tokens)

    def clear(self) -> None:
        """Evict everything not used by a live request."""
        with self._lock:
            self._evict_tokens(2**62)

    # -- internals: the tree -------------------------------------------------------------------------

    def _live_of(self, seq_id: int) -> _Live:
        seq = _int("seq_id", seq_id, -(2**31), 2**31 - 1)
        live = self._live.get(seq)
        if live is None:
            raise ValueError(f"sequence {seq} is not serving a request of this prefix cache")
        return live

    def _nodes(self) -> Iterator[_Node]:
        stack = [r for r in self._roots.values()]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.parent is not None:
                yield node

    def _walk(self, tokens: np.ndarray, n: int, key: Hashable) -> Tuple[List[_Node], int]:
        """Nodes matching ``tokens[:n]`` from the root of ``key`` and the length matched; the
        last node may match only partly (the length then ends inside it)."""
        node = self._roots.get(key)
        path: List[_Node] = []
        i = 0
        while node is not None and i < n:
            child = node.children.get(int(tokens[i]))
            if child is None:
                break
            run = child.tokens
            m = min(len(run), n - i)
            diff = np.flatnonzero(run[:m] != tokens[i:i + m])
            path.append(child)
            if len(diff):
                i += int(diff[0])
                break
            i += m
            if m < len(run):
                break
            node = child
        return path, i

    def _plan_hit(self, tokens: np.ndarray, key: Hashable) -> Tuple[int, List[_Node], Optional[int]]:
        """(tokens reusable, nodes to share them from, checkpoint to restore or None)."""
        n_max = len(tokens) - 1
        if n_max <= 0:
            return 0, [], None
        path, matched = self._walk(tokens, n_max, key)
        if self._recr is None:
            n_hit = matched
            if self._swa is not None:
                n_hit = self._window_held(path, n_hit)
            return n_hit, path, None
        # the longest checkpoint at or below the match; with a window cache, one whose window
        # is held
        candidates = sorted(((length, ck) for node in path for length, ck in node.ckpts.items()
                             if length <= matched), reverse=True)
        for length, ck in candidates:
            if self._swa is None or self._window_held(path, length) == length:
                return length, path, ck
        return 0, [], None

    def _window_held(self, path: List[_Node], n_hit: int) -> int:
        """The longest hit <= n_hit at which the sliding-window cache still holds the cells the
        next token sees (positions ``n_hit - n_swa .. n_hit - 1``): tried at n_hit, then at the
        ends of the nodes before it, which each holder keeps (see :meth:`_window_ok`)."""
        candidates = [n_hit] + [node.end for node in reversed(path) if node.end < n_hit]
        for length in candidates:
            if length <= 0:
                return 0
            if self._window_ok(path, length):
                return length
        return 0

    def _window_ok(self, path: List[_Node], length: int) -> bool:
        lo = max(0, length - self._window)
        swa = self._swa
        assert swa is not None  # asked only of a memory with a window cache
        for node in path:
            if node.start >= length:
                break
            if node.end <= lo:
                continue
            need = max(node.start, lo)
            have = swa.seq_pos_min(node.holder)
            if have < 0 or have > need or swa.seq_pos_max(node.holder) < min(node.end, length) - 1:
                return False
        return True

    def _share(self, src: int, dst: int, p0: int, p1: int, end: int) -> None:
        """Share ``src``'s cells of [p0, p1) with ``dst``; in a window cache only those of the
        window before ``end`` (the positions the token at ``end`` sees). Cells a window cache
        shares between two sequences are never reused for the window sliding on, so sharing
        more than the window would fill it."""
        kv = self._kv
        assert kv is not None  # shared only by a memory with a KV part
        if self._swa is None:
            kv.seq_cp(src, dst, p0, p1)
            return
        assert isinstance(kv, KVCacheISWA)  # the window cache is its swa part
        kv.base.seq_cp(src, dst, p0, p1)
        w0 = max(p0, end - self._window)
        if w0 < p1:
            self._swa.seq_cp(src, dst, w0, p1)

    def _lock_path(self, live: _Live, path: List[_Node]) -> None:
        kept = set(map(id, path))
        for node in path:
            node.lockers.add(live.seq)
        for node in live.path:
            if id(node) not in kept:
                node.lockers.discard(live.seq)
                if not node.lockers:
                    self._offer(node)
        live.path = list(path)  # its own list: splits insert into it

    def _offer(self, node: _Node) -> None:
        """Make ``node`` an eviction candidate (it is checked again when its turn comes)."""
        if node.parent is not None and node.alive:
            heapq.heappush(self._heap, (node.last_used, next(self._tick), node))

    def _new_holder(self, protect: Iterable[_Node]) -> int:
        """A free holder id, evicting an unlocked leaf (not in ``protect``) if none is free; -1
        when nothing can be evicted."""
        if self._kv is None:
            return -1
        if not self._free_holders:
            self._evict_tokens(1, protect=set(map(id, protect)))
        return self._free_holders.pop() if self._free_holders else -1

    def _split(self, node: _Node, at: int, protect: Iterable[_Node], seq: int) -> Optional[_Node]:
        """Cut ``node`` at position ``at`` (start < at < end): a new upper node takes
        ``[start, at)`` and becomes the parent of ``node``. None when no holder is free. With a
        window cache the upper node's window is taken from ``seq``, the request leaving the
        node there, which decoded it."""
        holder = -1
        if self._kv is not None:
            holder = self._new_holder(list(protect) + [node])
            if holder < 0:
                return None
            self._kv.seq_cp(node.holder, holder, node.start, at)
            self._kv.seq_rm(node.holder, node.start, at)
        cut = at - node.start
        upper = _Node(node.parent, node.tokens[:cut], node.start, holder, node.key)
        self._n_nodes += 1
        upper.last_used = node.last_used
        upper.ckpts = {length: ck for length, ck in node.ckpts.items() if length <= at}
        node.ckpts = {length: ck for length, ck in node.ckpts.items() if length > at}
        for ck in upper.ckpts.values():
            self._ckpt_node[ck] = upper
        assert node.parent is not None  # a node of a path, never a root
        node.parent.children[int(upper.tokens[0])] = upper
        node.tokens = node.tokens[cut:]
        node.start = at
        node.parent = upper
        upper.children[int(node.tokens[0])] = node
        upper.lockers = set(node.lockers)
        for locker in upper.lockers:
            live = self._live[locker]
            live.path.insert(live.path.index(node), upper)
        if self._swa is not None:
            self._take_window(upper, at, seq)
            self._keep_window(upper)
        return upper

    def _take_window(self, node: _Node, end: int, seq: int) -> None:
        """Window cache: give ``node``'s holder the cells of the window before ``end`` that
        ``seq`` holds (replacing its own there: one cell per position)."""
        if self._swa is None:
            return
        w0 = max(node.start, end - self._window)
        if self._swa.seq_pos_min(node.holder) <= w0 and self._swa.seq_pos_max(node.holder) >= end - 1 and \
                self._window_ok([node], end):
            return  # held already
        self._swa.seq_rm(node.holder, w0, end)
        self._swa.seq_cp(seq, node.holder, w0, end)

    def _keep_window(self, node: _Node) -> None:
        """Window cache: the holder keeps the window before its end and nothing else (cells
        shared by two sequences are never reused by the window sliding on, so keeping more
        would fill the window cache). A hit in a window cache therefore ends at a node's end;
        checkpoints are placed at node ends there (see _insert)."""
        assert self._swa is not None  # called only with a window cache
        if node.end - self._window > node.start:
            self._swa.seq_rm(node.holder, node.start, node.end - self._window)

    def _insert(self, live: _Live, transient: bool) -> None:
        """Index the request's tokens: split where they leave a node, extend a leaf or add a
        child for the new ones, and checkpoint the state at the request's length."""
        n = live.n
        tokens = live.tokens
        root = self._roots.get(live.key)
        if root is None:
            root = self._roots[live.key] = _Node(None, np.zeros(0, np.int32), 0, -1, live.key)
        path, matched = self._walk(tokens, n, live.key)
        now = next(self._clock)
        if path and matched < min(path[-1].end, n):
            # the tokens leave the last node inside it: cut it there (tokens that merely end
            # inside a node are cached already)
            upper = self._split(path[-1], matched, path, live.seq)
            if upper is None:
                self._lock_path(live, path[:-1])
                return
            path[-1] = upper
        parent = path[-1] if path else root
        if matched < n:
            # a leaf grows in place; with a window cache only the request's own leaf, and not past
            # a checkpoint at its end: the window is kept at a node's end only, where a hit of
            # another request may need it
            grows = parent is not root and not parent.children and parent.end == matched
            if grows and self._swa is not None:
                grows = parent is live.leaf and not any(
                    ck != live.transient for length, ck in parent.ckpts.items() if length == parent.end)
            if grows:
                # the request's own leaf: it grows in place
                if self._kv is not None:
                    self._share(live.seq, parent.holder, matched, n, n)
                parent.tokens = np.concatenate([parent.tokens, tokens[matched:n]])
                if self._swa is not None:
                    self._keep_window(parent)
            else:
                holder = self._new_holder(path)
                if self._kv is not None and holder < 0:
                    self._lock_path(live, path)
                    return
                self._roots.setdefault(live.key, root)  # an eviction may have emptied it
                child = _Node(parent, tokens[matched:n].copy(), matched, holder, live.key)
                self._n_nodes += 1
                if self._kv is not None:
                    self._share(live.seq, holder, matched, n, n)
                parent.children[int(child.tokens[0])] = child
                path.append(child)
                live.leaf = child
            self._cached_tokens += n - matched
        for node in path:
            node.last_used = now
        self._lock_path(live, path)
        if self._recr is not None and path:
            if self._swa is not None and n < path[-1].end and n not in path[-1].ckpts:
                # with a window cache a hit ends at a node's end (only there is the window
                # kept): the checkpoint goes to the end of a node cut here
                upper = self._split(path[-1], n, path, live.seq)
                if upper is None:
                    return
                path[-1] = upper
                self._lock_path(live, path)
            # a generation step's checkpoint replaces the request's previous one: a request
            # keeps those of its prompt chunks, its branch point and its latest step
            previous = live.transient
            ck = self._checkpoint(path[-1], n, live.seq, path)
            live.transient = ck if transient and ck is not None else -1
            if previous >= 0 and previous != ck:
                self._drop_checkpoint(previous)

    def _checkpoint(self, node: _Node, length: int, seq: int, protect: Iterable[_Node]) -> Optional[int]:
        if length in node.ckpts:
            return None
        recr = self._recr
        assert recr is not None  # checkpoints are taken only with a recurrent part
        if not recr.checkpoint_has_room():
            self._free_checkpoint(protect)
            if not recr.checkpoint_has_room():
                return None
        ck = node.ckpts[length] = recr.checkpoint_save(seq)
        self._ckpt_node[ck] = node
        self._n_ckpts += 1
        self._stats["checkpoints_saved"] += 1
        return ck

    def _drop_checkpoint(self, ck: int) -> None:
        node = self._ckpt_node.pop(ck, None)
        if node is None:
            return  # evicted meanwhile
        for length, c in list(node.ckpts.items()):
            if c == ck:
                del node.ckpts[length]
        assert self._recr is not None  # a checkpoint exists only with a recurrent part
        self._recr.checkpoint_drop(ck)
        self._n_ckpts -= 1

    def _free_checkpoint(self, protect: Iterable[_Node]) -> None:
        """Room for one checkpoint: evict an unlocked leaf holding one, else drop the least
        recently used checkpoint of a node not in ``protect``."""
        keep = set(map(id, protect))
        before = self._n_ckpts
        self._evict(lambda: self._n_ckpts < before, keep)
        if self._n_ckpts < before:
            return
        nodes = sorted((n for n in self._nodes() if n.ckpts and id(n) not in keep), key=lambda n: n.last_used)
        if nodes:
            node = nodes[0]
            self._drop_checkpoint(node.ckpts[min(node.ckpts)])

    # -- internals: eviction -------------------------------------------------------------------------

    def _evict_tokens(self, n_tokens: int, protect: AbstractSet[int] = frozenset()) -> int:
        start = self._stats["evicted_tokens"]
        holders = len(self._free_holders)
        if n_tokens <= 0:
            return 0
        if protect and self._kv is not None and not self._free_holders:
            # a holder is wanted: one eviction of any size
            self._evict(lambda: len(self._free_holders) > holders, protect)
        else:
            self._evict(lambda: self._stats["evicted_tokens"] - start >= n_tokens, protect)
        return self._stats["evicted_tokens"] - start

    def _evict(self, done: Callable[[], bool], protect: AbstractSet[int]) -> None:
        """Evict unlocked leaves, least recently used first, until ``done()``."""
        heap = self._heap
        if len(heap) > 2 * self._n_nodes + 1024:
            # stale entries dominate: start again from the nodes that are candidates now
            heap[:] = [(n.last_used, next(self._tick), n) for n in self._nodes() if not n.children and not n.lockers]
            heapq.heapify(heap)
        kept: List[Tuple[int, int, _Node]] = []
        while heap and not done():
            entry = heapq.heappop(heap)
            last_used, _, node = entry
            if not node.alive or node.children or node.lockers or last_used != node.last_used:
                continue  # stale: offered again when it becomes a candidate
            if id(node) in protect:
                kept.append(entry)
                continue
            parent = self._remove_leaf(node)
            if parent is not None and not parent.children and not parent.lockers:
                self._offer(parent)
        for entry in kept:
            heapq.heappush(heap, entry)

    def _remove_leaf(self, node: _Node) -> Optional[_Node]:
        if self._store is not None and _stable_key(node.key):
            self._spill(node)
        if self._kv is not None:
            self._kv.seq_rm(node.holder, -1, -1)
            self._free_holders.append(node.holder)
        for ck in node.ckpts.values():
            assert self._recr is not None  # a checkpoint exists only with a recurrent part
            self._recr.checkpoint_drop(ck)
            del self._ckpt_node[ck]
        self._n_ckpts -= len(node.ckpts)
        parent: Optional[_Node] = node.parent
        assert parent is not None  # an eviction candidate is never a root (_offer)
        del parent.children[int(node.tokens[0])]
        node.alive = False
        self._n_nodes -= 1
        if parent.parent is None and not parent.children:
            del self._roots[parent.key]
            parent = None
        self._cached_tokens -= len(node.tokens)
        self._stats["evictions"] += 1
        self._stats["evicted_tokens"] += len(node.tokens)
        return parent

    # -- internals: the store tier ---------------------------------------------------------------------

    def _store_candidates(self, tokens: np.ndarray, key: Hashable) -> List[Tuple[str, int, bytes]]:
        """(key, length, value) of stored prefixes longer than the memory's hit, longest
        first: the values fetched (at most two tried), so admit only reads them into the memory."""
        if self._store is None or not _stable_key(key) or len(tokens) <= self._store.block_size:
            return []
        with self._lock:
            n_have = self._plan_hit(tokens, key)[0]
        return self._store.fetch(tokens, cast(ExtraKey, key), len(tokens) - 1, n_have)

    def _spill(self, node: _Node) -> None:
        """Before ``node`` (a leaf) is evicted: store the state of the prefix ending at its last
        block boundary (K/V), or at its longest block-aligned checkpoint (recurrent, hybrid),
        assembled in a free request sequence from the holders on its path."""
        store = self._store
        assert store is not None
        block = store.block_size
        ck = -1
        if self._recr is not None:
            aligned = [length for length in node.ckpts if length % block == 0]
            if not aligned:
                return
            length = max(aligned)
            ck = node.ckpts[length]
        else:
            length = node.end // block * block
        if length <= node.start or not self._free_seqs:
            return
        path: List[_Node] = []
        up: Optional[_Node] = node
        while up is not None and up.parent is not None:
            path.append(up)
            up = up.parent
        path.reverse()
        seq = self._free_seqs[-1]  # empty while free: a scratch sequence
        state: Optional[bytes] = None
        try:
            self._assemble(path, length, ck, seq)
            if self._swa is None or (self._swa.seq_pos_max(seq) == length - 1 and
                                     self._swa.seq_pos_min(seq) <= max(0, length - self._window)):
                state = self._memory.state_write(seq, STATE_HEADER)
        except (LlmemError, ValueError) as exc:
            # (no recurrent cell free for the scratch state, say): the prefix is not spilled,
            # the eviction goes on
            store.note_spill_failed(exc)
        finally:
            self._memory.seq_rm(seq, -1, -1)
            if self._recr is not None and self._recr.seq_pos_max(seq) != -1:
                self._recr.seq_rm(seq, -1, -1)
        if state is not None:
            tokens = np.concatenate([p.tokens for p in path])[:length]
            if store.spill(tokens, cast(ExtraKey, node.key), length, state):
                self._stats["store_spills"] += 1

    def _assemble(self, path: List[_Node], length: int, ck: int, seq: int) -> None:
        """Give the empty sequence ``seq`` the prefix of ``length`` tokens: the holders' cells
        on ``path`` (shared, not copied) and checkpoint ``ck`` (with a recurrent part)."""
        if self._kv is not None:
            for p in path:
                p1 = min(p.end, length)
                if p1 > p.start:
                    self._kv.seq_cp(p.holder, seq, p.start, p1)
        if self._recr is not None:
            self._recr.checkpoint_restore(ck, seq)

    # -- checks (tests) ------------------------------------------------------------------------------

    def check(self) -> None:
        """Assert the index agrees with the memory: every node's holder holds exactly its
        positions, every checkpoint exists at its length, every holder id and request id is
        accounted for, the counters match. AssertionError naming the first disagreement."""
        with self._lock:
            seen_holders: Set[int] = set()
            total = ckpts = 0
            for node in self._nodes():
                assert len(node.tokens) > 0, "an empty node"
                assert node.parent is not None  # _nodes() yields no root
                assert node.parent.children.get(int(node.tokens[0])) is node, "a node its parent does not list"
                assert node.start == (node.parent.end if node.parent.parent is not None else 0), "a gap"
                total += len(node.tokens)
                if self._kv is not None:
                    h = node.holder
                    assert self._n_requests <= h < self._memory.n_seq_max and h not in seen_holders, h
                    seen_holders.add(h)
                    kv = self._kv
                    base = kv.base if isinstance(kv, KVCacheISWA) else kv
                    assert base.seq_pos_min(h) == node.start and base.seq_pos_max(h) == node.end - 1, \
                        f"holder {h} holds [{base.seq_pos_min(h)}, {base.seq_pos_max(h)}], node [{node.start}, {node.end})"
                    if self._swa is not None and self._swa.seq_pos_max(h) >= 0:
                        # at most the window before its end (contiguous: the window cache
                        # prunes a sequence from its front)
                        assert max(node.start, node.end - self._window) <= self._swa.seq_pos_min(h), \
                            f"holder {h} keeps window cells from {self._swa.seq_pos_min(h)}, node [{node.start}, {node.end})"
                        assert self._swa.seq_pos_max(h) == node.end - 1
                for length, ck in node.ckpts.items():
                    assert node.start < length <= node.end
                    assert self._recr is not None and self._recr.checkpoint_pos(ck) == length - 1
                    assert self._ckpt_node[ck] is node
                    ckpts += 1
                for seq in node.lockers:
                    assert node in self._live[seq].path
            assert total == self._cached_tokens, (total, self._cached_tokens)
            assert sum(1 for _ in self._nodes()) == self._n_nodes
            for node in self._nodes():
                if not node.children and not node.lockers:
                    assert any(e[2] is node and e[0] == node.last_used for e in self._heap), "an unlisted candidate"
            assert ckpts == self._n_ckpts
            if self._recr is not None:
                assert self._recr.checkpoint_stats()["count"] == ckpts, "a checkpoint leaked"
            if self._kv is not None:
                free = set(self._free_holders)
                assert not free & seen_holders and len(free) == len(self._free_holders)
                assert free | seen_holders == set(range(self._n_requests, self._memory.n_seq_max)), "a holder leaked"
                for h in free:
                    assert self._kv.seq_pos_max(h) == -1, f"free holder {h} holds cells"
            assert set(self._free_seqs) | set(self._live) == set(range(self._n_requests))
            for seq in self._free_seqs:
                assert self._memory.seq_pos_max(seq) == -1, f"free sequence {seq} holds cells"
            for seq, live in self._live.items():
                assert self._memory.seq_pos_max(seq) == live.n - 1, (seq, self._memory.seq_pos_max(seq), live.n)
