#pragma once

// The re-entrant lock of a Python memory (`memory.lock`), shared by Python and the C API.
//
// Python's threading.RLock can only be taken with the GIL; a C caller driving a memory without
// the GIL needs a lock it can take directly. This one is a mutex with an owner thread and a
// recursion count: Python takes it through the MemoryLock type (acquire/release/with, like an
// RLock; the GIL is released while it waits), C through memory_lock_acquire/release (no GIL; a
// thread that holds the GIL releases it while it waits, so a Python holder can finish).
//
// Two counters connect the sides. `epoch` moves whenever the memory may have changed: every C
// change, and every Python acquire (C cannot see what a Python call did); a C context planned at
// another epoch is stale. `c_changes` counts the C changes; a Python acquire that finds new ones
// calls `_touch()` on the memories registered by the C API, so Python contexts planned before
// the C change are stale too.

#include <Python.h>
#include <structmember.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace llmem::capi {

// Taken by a compare-and-swap of `owner` (free: 0); a thread that finds it taken waits on `cv`.
// Everything below `owner` is read and written only by the holder (ownership passes with
// acquire/release ordering on `owner`).
struct memory_lock_state {
    std::atomic<unsigned long> owner{ 0 };    // thread ident of the holder, 0 when free
    std::atomic<uint32_t>      waiters{ 0 };  // threads in the slow path
    std::mutex                 wait_mutex;
    std::condition_variable    cv;
    uint32_t                   count = 0;  // recursion depth
    uint64_t                   epoch = 0;
    uint64_t                   c_changes = 0;
    uint64_t                   c_changes_seen = 0;  // by the Python side
};

/// The MemoryLock object (a Python object whose state a C caller reaches through the pointer).
struct memory_lock_object {
    PyObject_HEAD
    memory_lock_state * state;
    PyObject *          touch_list;  // memories whose _touch() a Python acquire calls after C changes
    PyObject *          weakreflist;
};

/// Add the MemoryLock type to module `m` (as `MemoryLock`). Returns 0, or -1 with an exception.
int add_memory_lock_type(PyObject * m);

/// The lock state of a MemoryLock instance; nullptr (no exception) for any other object.
memory_lock_state * memory_lock_of(PyObject * obj);

/// Register `memory` for _touch() after C changes (with the GIL held). -1 with an exception.
int memory_lock_register(PyObject * lock, PyObject * memory);

/// Take the lock from C (re-entrant, any GIL state). Returns true when this call took it
/// outermost.
bool memory_lock_acquire(memory_lock_state & s);
/// Try without waiting; true when taken.
bool memory_lock_try_acquire(memory_lock_state & s);
/// Release once; false (nothing done) when this thread does not hold it.
bool memory_lock_release(memory_lock_state & s);
/// Release once when the caller knows it holds the lock (a scope that took it): no owner check.
void memory_lock_release_held(memory_lock_state & s);
/// Whether the calling thread holds it.
bool memory_lock_owned(const memory_lock_state & s);
/// Take the lock of a MemoryLock object as Python's `with memory.lock` does (the GIL held; it is
/// released while waiting), with a Python acquire's bookkeeping (epoch, _touch() after C
/// changes): for compiled Python-facing calls that hold the lock themselves (decode_step).
/// False (nothing taken, no exception) when obj is not a MemoryLock.
bool memory_lock_python_acquire(PyObject * obj);

/// Record a change made through C (the holder calls it).
inline void memory_lock_changed(memory_lock_state & s) {
    ++s.epoch;
    ++s.c_changes;
}

} // namespace llmem::capi
