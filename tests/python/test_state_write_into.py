"""state_size / state_write_into (state bytes written into the caller's buffer) on every memory
type, and state_read from any buffer, read in place."""

import mmap

import numpy as np
import pytest

from llmem import STATE_HEADER, KVCacheISWA, StateError
from llmem.kv_cache import STATE_PARTIAL_ONLY
from memory_zoo import MEMORIES, filled, snapshot

FLAGS = [0, STATE_HEADER]


def scopes(mem):
    return [-1, 0, 1, 3]


@pytest.mark.parametrize("flags", FLAGS, ids=["raw", "header"])
@pytest.mark.parametrize("name", list(MEMORIES))
def test_write_into_equals_state_write(name, flags):
    mem = filled(name)
    all_flags = [flags, flags | STATE_PARTIAL_ONLY] if isinstance(mem, KVCacheISWA) else [flags]
    for f in all_flags:
        for seq in scopes(mem):
            blob = mem.state_write(seq, f)
            assert mem.state_size(seq, f) == len(blob)
            for make in (lambda n: bytearray(n), lambda n: np.zeros(n, np.uint8),
                         lambda n: np.zeros((1, n), np.int8)):
                buf = make(len(blob) + 7)
                memoryview(buf).cast("B")[-7:] = b"\xaa" * 7
                assert mem.state_write_into(buf, seq, f) == len(blob)
                raw = bytes(memoryview(buf).cast("B"))
                assert raw[:len(blob)] == blob
                assert raw[len(blob):] == b"\xaa" * 7  # bytes after the state are left alone
            # into the middle of a larger buffer, through a memoryview slice
            big = bytearray(len(blob) + 16)
            assert mem.state_write_into(memoryview(big)[8:8 + len(blob)], seq, f) == len(blob)
            assert bytes(big[8:8 + len(blob)]) == blob and big[:8] == bytearray(8)


@pytest.mark.parametrize("name", list(MEMORIES))
def test_write_into_a_small_buffer_names_both_sizes_and_writes_nothing(name):
    mem = filled(name)
    for flags in FLAGS:
        need = mem.state_size(-1, flags)
        buf = bytearray(b"\x55" * (need - 1))
        with pytest.raises(ValueError, match=f"buffer holds {need - 1} bytes, the state needs {need}"):
            mem.state_write_into(buf, -1, flags)
        assert buf == bytearray(b"\x55" * (need - 1))


@pytest.mark.parametrize("name", list(MEMORIES))
@pytest.mark.parametrize("buffer, exc, words", [
    (b"\0" * 4096, TypeError, ("read-only", "bytes")),
    (np.zeros(8192, np.uint8)[::2], TypeError, ("non-contiguous",)),
    (np.zeros(1024, np.float32), ValueError, ("1-byte items", "4 bytes")),
    ("text", TypeError, ("buffer", "str")),
    (None, TypeError, ("buffer", "NoneType")),
], ids=["bytes", "strided", "float32", "str", "none"])
def test_write_into_refuses_buffers_it_cannot_fill(name, buffer, exc, words):
    mem = filled(name)
    before = snapshot(mem)
    with pytest.raises(exc) as info:
        mem.state_write_into(buffer)
    for w in words:
        assert w in str(info.value)
    assert snapshot(mem) == before


def test_write_into_shared_memory_and_read_back_in_place():
    mem = filled("kv")
    n = mem.state_size(1)
    with mmap.mmap(-1, n) as shm:
        assert mem.state_write_into(shm, 1) == n
        blob = mem.state_write(1)
        assert shm[:] == blob
        mem.state_clear(1)
        mem.state_read(shm, 1)  # any buffer, not copied to bytes first
        assert mem.state_write(1) == blob
    # the same with a numpy array and a memoryview slice of a larger buffer
    arr = np.zeros(n + 3, np.uint8)
    mem.state_write_into(arr, 1)
    mem.state_clear(1)
    mem.state_read(memoryview(arr)[:n], 1)
    assert mem.state_write(1) == blob
    mem.state_clear(1)
    mem.state_read(arr[:n], 1)
    assert mem.state_write(1) == blob


@pytest.mark.parametrize("name", list(MEMORIES))
def test_state_read_of_bad_buffers_changes_nothing(name):
    mem = filled(name)
    blob = mem.state_write(-1)
    before = snapshot(mem)
    with pytest.raises(StateError):
        mem.state_read(np.frombuffer(blob[:-1], np.uint8))
    with pytest.raises(ValueError, match="1-byte items"):
        mem.state_read(np.zeros(len(blob) // 4, np.float32))
    with pytest.raises(TypeError, match="contiguous"):  # not read as its first len bytes
        mem.state_read(np.frombuffer(blob + blob, np.uint8)[::2])
    assert snapshot(mem) == before


def test_state_size_follows_the_cache():
    mem = filled("kv")
    sizes = {seq: mem.state_size(seq) for seq in (-1, 0, 1, 2, 3)}
    assert sizes == {seq: len(mem.state_write(seq)) for seq in sizes}
    mem.seq_rm(0, -1, -1)
    assert mem.state_size(0) == len(mem.state_write(0)) < sizes[0]
    assert mem.state_size(-1) < sizes[-1]
