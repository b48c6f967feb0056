"""The memory interface every llmem memory implements, and the context protocol.

A memory holds per-sequence state between decoding steps. Decoding one batch goes through a
*context*: ``init_batch`` plans every micro-batch without changing the memory, and the caller then
commits the micro-batches one at a time with ``apply()``, exactly like llama.cpp's decode loop::

    ctx = memory.init_batch(batch, n_ubatch=512)
    if ctx.status != Status.SUCCESS: ...          # FAILED_PREPARE: no room
    for ubatch in ctx:                            # apply(), then yield; next() between ubatches
        run_the_model(ubatch, ctx)
"""

from __future__ import annotations

import abc
import contextlib
import functools
import operator
import os
import tempfile
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Protocol, Tuple, TypeVar, Union, cast

from . import _core
from .batch import Batch, BatchAllocator, UBatch
from .errors import LlmemError, NoRoom, StaleContextError, StateError
from . import metrics
from .status import Status, status_is_fail

__all__ = ["Memory", "MemoryContext", "STATE_HEADER"]

#: ``state_write``/``state_read``/``save``/``load`` flag: prefix (and on read require and check)
#: llmem's versioned header, which records the memory's kind and configuration, the scope, the
#: flags, the payload length and CRC-32s (docs/reliability.md). The top bit of the flags, so it
#: never collides with llama.cpp's ``PARTIAL_ONLY = 1``/``ON_DEVICE = 2``. Without it the bytes
#: are exactly llama.cpp's.
STATE_HEADER: int = _core.STATE_HEADER

#: The first bytes of a state with the versioned header.
STATE_FILE_MAGIC: bytes = _core.STATE_FILE_MAGIC


def _wants_header(flags: Any) -> bool:
    """Whether ``flags`` asks for the header; other flag checks stay with each memory."""
    if isinstance(flags, bool):
        return False
    try:
        return operator.index(flags) >= 0 and bool(operator.index(flags) & STATE_HEADER)
    except TypeError:
        return False


_F = TypeVar("_F", bound=Callable[..., Any])


def locked(method: _F) -> _F:
    """Run ``method`` holding ``self._lock``: the call is atomic with respect to every other
    locked call on the same memory (and on the memories sharing its lock)."""

    # acquire/release rather than `with`: in CPython 3.11 the with-statement costs a lock about
    # 0.15 us more, and the decode path takes the lock twice per micro-batch
    @functools.wraps(method)
    def run_locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self._lock
        lock.acquire()
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

    return cast(_F, run_locked)


class LockLike(Protocol):
    """The type :attr:`Memory.lock` is annotated with: the object is a
    :class:`~llmem._core.MemoryLock`, a re-entrant lock used like ``threading.RLock`` (its C type
    declares no signatures the generated stubs could carry, so its protocol is spelled out here)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool:
        """Take the lock (re-entrant), as ``RLock.acquire``."""
        ...

    def release(self) -> None:
        """Release the lock once (RuntimeError if not held by this thread)."""
        ...

    def locked(self) -> bool:
        """Whether any thread holds the lock."""
        ...

    def __enter__(self) -> bool: ...

    def __exit__(self, *exc: object) -> None: ...


def new_lock() -> LockLike:
    """A new :class:`~llmem._core.MemoryLock`."""
    return cast("Callable[[], LockLike]", _core.MemoryLock)()


def stale_context_error(what: str) -> StaleContextError:
    return StaleContextError(
        f"{what}: this plan is stale: the memory changed after init_batch made it (another "
        "plan was applied, or a seq_*/state/clear call ran, in this thread or another); nothing "
        "was changed. Plans cannot be interleaved: apply every micro-batch of one plan before "
        "planning the next, then plan again (to plan step N+1 while step N's model runs, plan it "
        "after step N's last apply). When threads share the memory, hold `memory.lock` for the "
        "whole decode (init_batch, every apply and K/V write)")


class MemoryContext(abc.ABC):
    """One plan made by ``init_batch``/``init_full``/``init_update``.

    ``apply()`` is the only call that changes the memory. A context with a failed status has no
    micro-batches; iterating it raises :class:`LlmemError`.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def status(self) -> Status:
        """SUCCESS, NO_UPDATE (nothing to do) or a failure status."""

    @abc.abstractmethod
    def next(self) -> bool:
        """Move to the next micro-batch; False when there is none."""

    @abc.abstractmethod
    def apply(self) -> bool:
        """Commit the current micro-batch (or the update) into the memory."""

    @property
    @abc.abstractmethod
    def ubatch(self) -> Optional[UBatch]:
        """The current micro-batch (None for full and update contexts)."""

    def _is_fresh(self) -> bool:
        """False when the memory changed since this plan was made (applying it would be wrong)."""
        return True

    def _check_apply(self) -> None:
        """Raise what ``apply()`` would raise, changing nothing: a composite context checks every
        sub-context before it applies any (one of them may have been applied directly)."""
        if not self._is_fresh():
            raise stale_context_error("apply")

    def __copy__(self) -> NoReturn:
        # a shallow copy would share the compiled plan (and its position in it) with the original
        raise TypeError(f"a {type(self).__name__} cannot be copied: plan the batch again with init_batch")

    def __deepcopy__(self, memo: Dict[int, Any]) -> NoReturn:
        raise TypeError(f"a {type(self).__name__} cannot be copied: plan the batch again with init_batch")
    @property
    def no_room(self) -> Optional[NoRoom]:
        """Why this plan failed for lack of cells: the sequences that could not be placed and
        how many cells were missing (:class:`~llmem.NoRoom`); None when the plan succeeded or
        failed for another reason (a batch that cannot be split for this memory)."""
        return getattr(self, "_no_room", None)

    def __iter__(self) -> Iterator[UBatch]:
        """Apply each micro-batch in turn and yield it (llama.cpp's apply/next loop)."""
        status = self.status
        if status_is_fail(status):
            raise LlmemError(f"cannot run a memory context whose status is {Status(status).name}")
        if status == Status.NO_UPDATE:
            return
        ub = self.ubatch
        if ub is None:
            self.apply()
            return
        while True:
            if not self.apply():
                raise LlmemError("the memory refused to apply a micro-batch")
            yield self.ubatch  # type: ignore[misc]  # not None while applying
            if not self.next():
                return


BatchOrAllocator = Union[Batch, BatchAllocator]


def as_byte_view(data: Any) -> memoryview:
    """``data`` (bytes, bytearray, memoryview, a numpy uint8 array...) as a flat byte view, not
    copied; TypeError for objects without a buffer (str included) or a non-contiguous one,
    ValueError for a buffer of wider items (a float array is not state bytes)."""
    if isinstance(data, str):
        raise TypeError("data must be a bytes-like object, not str")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a bytes-like object, not {type(data).__name__}") from None
    if view.itemsize != 1:
        raise ValueError(f"data must be a bytes-like object (1-byte items), got items of {view.itemsize} bytes")
    if not view.c_contiguous:
        # a strided view's bytes are not the state's (a reader given its pointer and length
        # would read the bytes in between)
        raise TypeError(f"data must be a C-contiguous bytes-like object, got a non-contiguous {type(data).__name__}")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def as_writable_byte_view(buffer: Any) -> memoryview:
    """``buffer`` (bytearray, numpy uint8 array, mmap, shared memory...) as a flat writable byte
    view; TypeError for an object without a buffer, a read-only or a non-contiguous one,
    ValueError for a buffer of wider items."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"buffer must be a writable bytes-like object, not {type(buffer).__name__}") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("buffer must be a writable, C-contiguous bytes-like object; got a "
                        f"{'read-only' if view.readonly else 'non-contiguous'} {type(buffer).__name__}")
    if view.itemsize != 1:
        raise ValueError(f"buffer must be a bytes-like object (1-byte items), got items of {view.itemsize} bytes")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def _too_small(have: int, need: int) -> ValueError:
    return ValueError(f"buffer holds {have} bytes, the state needs {need}")


_NO_LOCK = contextlib.nullcontext()


def _lock_of(memory: Any) -> Any:
    """The memory's lock; none for a Memory subclass of the user's that has none."""
    return getattr(memory, "_lock", None) or _NO_LOCK


def _counted_write(method: Any) -> Any:
    @functools.wraps(method)
    def state_write(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock_of(self):  # the depth and the totals are shared by the memory's threads
            c = metrics.counters(self)
            c.depth += 1
            try:
                data = method(self, *args, **kwargs)
            finally:
                c.depth -= 1
            if c.depth == 0:
                c.state_bytes_written += len(data)
            return data

    state_write._llmem_counted = True  # type: ignore[attr-defined]
    return state_write


def _counted_write_into(method: Any) -> Any:
    @functools.wraps(method)
    def state_write_into(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock_of(self):
            c = metrics.counters(self)
            c.depth += 1
            try:
                n = method(self, *args, **kwargs)
            finally:
                c.depth -= 1
            if c.depth == 0:
                c.state_bytes_written += n
            return n

    state_write_into._llmem_counted = True  # type: ignore[attr-defined]
    return state_write_into


def _counted_read(method: Any) -> Any:
    @functools.wraps(method)
    def state_read(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock_of(self):
            c = metrics.counters(self)
            c.depth += 1
            try:
                out = method(self, data, *args, **kwargs)
            except StateError as exc:
                c.depth -= 1
                if c.depth == 0:
                    c.state_reads_refused += 1
                    metrics.logger.warning("state restore refused by %s (%s): %s",
                                           type(self).__name__, exc.reason, exc)
                raise
            except BaseException:
                c.depth -= 1
                raise
            c.depth -= 1
            if c.depth == 0:
                try:
                    c.state_bytes_read += memoryview(data).nbytes
                except TypeError:
                    pass
            return out

    state_read._llmem_counted = True  # type: ignore[attr-defined]
    return state_read


class Memory(abc.ABC):
    """Common interface of KVCache, KVCacheISWA, RecurrentMemory, HybridMemory and
    HybridISWAMemory; method names and semantics follow llama.cpp's ``llama_memory_i``.

    Position ranges are half-open ``[p0, p1)``; ``p0 < 0`` means from the start and ``p1 < 0``
    means to the end. Sequence ids are ints in ``[0, n_seq_max)`` unless a method says otherwise.

    Threads (see ``docs/threading.md``): every public method takes the memory's re-entrant
    :attr:`lock`, so each call is atomic; a decode (``init_batch``, its applies and the K/V or
    state writes) is atomic only when the caller holds ``lock`` around all of it. A context
    applied after another call changed the memory raises :class:`StaleContextError`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # count the state bytes and log refused restores (metrics.py) around each memory's own
        # state methods, so that none of them has to
        for name, wrap in (("state_write", _counted_write), ("state_write_into", _counted_write_into),
                           ("state_read", _counted_read)):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_llmem_counted", False):
                setattr(cls, name, wrap(method))

    def stats(self) -> "metrics.MemoryStats":
        """A snapshot of this memory's use and running totals (:class:`llmem.MemoryStats`):
        cells used (per stream), sequences, tokens placed, plans failed for lack of room, state
        bytes written and read, restores refused, K-shifts. A few microseconds: cheap enough to
        call every step (examples/prometheus_exporter.py exports it)."""
        with _lock_of(self):
            return metrics.memory_stats(self)

    @property
    def lock(self) -> LockLike:
        """The re-entrant lock every call of this memory takes (shared with the parts of an iSWA
        or hybrid memory). Hold it to make several calls one atomic step::

            with memory.lock:
                ctx = memory.init_batch(batch, n_ubatch)
                for ubatch in ctx: ...
        """
        return self._lock

    def _share_lock(self, lock: LockLike) -> None:
        """Make this memory (and its parts) take ``lock``: used by the memories built on it."""
        self._lock = lock

    # A shallow copy would share the compiled core, the buffers and the lock but keep its own
    # modification counter, so changes through it would not make the original's contexts stale.
    # A real copy is a state round trip into a new memory of the same configuration.
    def __copy__(self) -> NoReturn:
        raise TypeError(f"a {type(self).__name__} cannot be copied: build a new one and "
                        "state_read(memory.state_write()) into it")

    def __deepcopy__(self, memo: Dict[int, Any]) -> NoReturn:
        raise TypeError(f"a {type(self).__name__} cannot be copied: build a new one and "
                        "state_read(memory.state_write()) into it")

    # -- batches -------------------------------------------------------------------------------

    @abc.abstractmethod
    def init_batch(self, balloc_or_batch: BatchOrAllocator, n_ubatch: int,
                   embd_all: bool = False) -> MemoryContext:
        """Split a batch into micro-batches and check each can be placed; changes nothing."""

    @abc.abstractmethod
    def init_full(self) -> MemoryContext:
        """A context covering the whole memory (for sizing a compute graph)."""

    @abc.abstractmethod
    def init_update(self, optimize: bool = False) -> MemoryContext:
        """A context that applies pending work (K-shift, stream copies); NO_UPDATE if none."""

    # -- sequences -----------------------------------------------------------------------------

    @abc.abstractmethod
    def clear(self, data: bool = True) -> None:
        """Forget every sequence; with ``data`` also zero the state buffers."""

    @abc.abstractmethod
    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        """Remove positions [p0, p1) of a sequence; False when the memory cannot do it."""

    @abc.abstractmethod
    def seq_cp(self, seq_id_src: int, seq_id_dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``seq_id_dst`` share the cells of ``seq_id_src`` in [p0, p1)."""

    @abc.abstractmethod
    def seq_keep(self, seq_id: int) -> None:
        """Remove every sequence except ``seq_id``."""

    @abc.abstractmethod
    def seq_add(self, seq_id: int, p0: int, p1: int, shift: int) -> None:
        """Add ``shift`` to the positions in [p0, p1) of a sequence."""

    @abc.abstractmethod
    def seq_div(self, seq_id: int, p0: int, p1: int, d: int) -> None:
        """Integer-divide the positions in [p0, p1) of a sequence by ``d`` (d >= 1)."""

    @abc.abstractmethod
    def seq_pos_min(self, seq_id: int) -> int:
        """Smallest position the memory holds for a sequence, -1 if none."""

    @abc.abstractmethod
    def seq_pos_max(self, seq_id: int) -> int:
        """Largest position the memory holds for a sequence, -1 if none."""

    # -- introspection -------------------------------------------------------------------------

    @abc.abstractmethod
    def get_can_shift(self) -> bool:
        """Whether ``seq_add``/``seq_div`` are supported (llama.cpp's ``get_can_shift``)."""

    @abc.abstractmethod
    def memory_breakdown(self) -> dict[str, int]:
        """Bytes of state held, by buffer name."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of cells."""

    @property
    @abc.abstractmethod
    def used(self) -> int:
        """Number of cells in use."""

    @property
    @abc.abstractmethod
    def head(self) -> int:
        """Where the next slot search starts."""

    @property
    @abc.abstractmethod
    def n_seq_max(self) -> int:
        """Number of sequence ids the memory accepts."""

    @abc.abstractmethod
    def cells(self) -> Dict[str, Any]:
        """A snapshot of the cell metadata (numpy arrays) for inspection and tests."""

    # -- state ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def state_write(self, seq_id: int = -1, flags: int = 0) -> bytes:
        """Serialise the whole memory (-1) or one sequence in llama.cpp's byte layout (with
        ``STATE_HEADER`` in ``flags``, after llmem's versioned header)."""

    @abc.abstractmethod
    def state_read(self, data: bytes, seq_id: int = -1, flags: int = 0) -> None:
        """Restore from ``state_write`` bytes; raises StateError and changes nothing on failure.
        With ``STATE_HEADER`` the header is required and checked against this memory first."""

    def state_size(self, seq_id: int = -1, flags: int = 0) -> int:
        """Bytes ``state_write(seq_id, flags)`` returns now: the room :meth:`state_write_into`
        needs. The KV caches count them without writing; the recurrent and hybrid memories write
        the state to measure it."""
        return len(self.state_write(seq_id, flags))

    def state_write_into(self, buffer: Any, seq_id: int = -1, flags: int = 0) -> int:
        """Write ``state_write(seq_id, flags)``'s bytes at the start of ``buffer`` (any writable,
        C-contiguous bytes-like object: a bytearray, a numpy uint8 array, an mmap, a shared
        memory block) and return their number; bytes after them are left as they were.
        TypeError for a read-only or non-contiguous buffer, ValueError naming both sizes (and
        nothing written) when it holds fewer than :meth:`state_size` bytes. The KV caches write
        straight into the buffer; the recurrent and hybrid memories copy their bytes in."""
        view = as_writable_byte_view(buffer)
        with self._lock:
            data = self.state_write(seq_id, flags)
        if len(data) > len(view):
            raise _too_small(len(view), len(data))
        view[:len(data)] = data
        return len(data)

    # The header is added and checked here, around each memory's own llama.cpp-layout code, so
    # that the raw bytes stay exactly llama.cpp's. Neither helper calls back into the public
    # state methods (no re-entry into a memory's entry point).

    _STATE_KIND: int = 0  # llmem::memory_kind of the subclass
    _own_balloc: Optional[_core.BatchAllocator]  # the allocator init_batch(Batch) reuses
    _lock: LockLike

    def _state_parts(self) -> Tuple[List[Any], Any]:
        """The compiled attention caches (state order) and recurrent core (or None)."""
        raise NotImplementedError

    def _with_state_header(self, payload: bytes, seq_id: int, flags: int) -> bytes:
        """``payload`` (raw bytes written for seq_id), prefixed by the header when asked."""
        if not _wants_header(flags):
            return payload
        caches, recr = self._state_parts()
        header: bytes = _core.state_header(self._STATE_KIND, caches, recr, seq_id, flags, payload)
        return header + payload

    def _header_size(self, seq_id: int, flags: int) -> int:
        """Bytes of the header a write with ``flags`` puts first (its length does not depend on
        the payload)."""
        if not _wants_header(flags):
            return 0
        caches, recr = self._state_parts()
        return len(_core.state_header(self._STATE_KIND, caches, recr, seq_id, flags, b""))

    def _write_into(self, buffer: Any, seq_id: int, flags: int, payload_size: int,
                    write_payload: Callable[[memoryview], int]) -> int:
        """state_write_into around ``write_payload(view) -> bytes written``: the room is checked
        first (nothing written when short), then the payload goes after the header's room and
        the header, computed over it, goes first."""
        view = as_writable_byte_view(buffer)
        head = self._header_size(seq_id, flags)
        if head + payload_size > len(view):
            raise _too_small(len(view), head + payload_size)
        n = write_payload(view[head:] if head else view)
        if head:
            caches, recr = self._state_parts()
            view[:head] = _core.state_header(self._STATE_KIND, caches, recr, seq_id, flags, view[head:head + n])
        return head + n

    def _without_state_header(self, data: Any, seq_id: int, flags: int) -> Tuple[Any, int]:
        """(payload, flags without STATE_HEADER) of a read: the header, when asked for, is
        checked against this memory (StateError naming the mismatch; nothing changes)."""
        if not _wants_header(flags):
            return data, flags
        view = as_byte_view(data)
        caches, recr = self._state_parts()
        offset = _core.state_header_check(self._STATE_KIND, caches, recr, view, seq_id, flags)
        return view[offset:], operator.index(flags) & ~STATE_HEADER

    def save(self, path: Union[str, "os.PathLike[str]"], seq_id: int = -1, flags: int = STATE_HEADER) -> None:
        """Write ``state_write(seq_id, flags)`` to a file, atomically (a crash leaves the old
        file). By default the file starts with the versioned header (``STATE_HEADER``), so
        :meth:`load` can check it belongs to this memory; ``flags=0`` writes llama.cpp's raw
        bytes."""
        data = self.state_write(seq_id, flags)
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".llmem-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path: Union[str, "os.PathLike[str]"], seq_id: int = -1, flags: int = 0) -> None:
        """Read a file written by :meth:`save` into the whole memory (-1) or one sequence.

        A file that starts with the header's magic is read with ``STATE_HEADER`` (its kind,
        configuration, scope, length and checksums are checked first); any other file is read as
        llama.cpp's raw bytes, unless ``flags`` holds ``STATE_HEADER``, which requires the header.
        """
        with open(os.fspath(path), "rb") as f:
            data = f.read()
        if data.startswith(STATE_FILE_MAGIC) and not isinstance(flags, bool):
            flags = operator.index(flags) | STATE_HEADER
        self.state_read(data, seq_id, flags)

    # -- helpers for implementations -----------------------------------------------------------

    def _allocator_for(self, balloc_or_batch: BatchOrAllocator) -> BatchAllocator:
        """The allocator to split: the caller's (already initialised) or one validated here."""
        if isinstance(balloc_or_batch, _core.BatchAllocator):
            return balloc_or_batch
        if isinstance(balloc_or_batch, _core.Batch):
            # the compiled allocator itself: every caller already holds self._lock, so the
            # locking init of llmem.BatchAllocator would only add a call on the decode path
            balloc = getattr(self, "_own_balloc", None)
            if balloc is None:
                balloc = _core.BatchAllocator(self.n_seq_max)
                self._own_balloc = balloc
            balloc.init(balloc_or_batch, self)
            return balloc  # type: ignore[return-value]  # the compiled allocator, as the callers need
        raise TypeError(
            f"balloc_or_batch must be a llmem.Batch or llmem.BatchAllocator, "
            f"not {type(balloc_or_batch).__name__}")
