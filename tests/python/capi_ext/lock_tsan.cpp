// ThreadSanitizer check of the lock shared by Python and the C API (csrc/capi/memory_lock.cpp),
// built and run by tests/python/test_capi.py with -fsanitize=thread against an embedded Python.
//
// C threads without the GIL and threads holding the GIL take the lock (nested, try, blocking),
// change state that only the holder may touch (the counters the C API uses) and a plain counter;
// TSan reports any access not ordered by the lock, and the final counts prove mutual exclusion.

#include "memory_lock.h"

#include <cstdio>
#include <thread>
#include <vector>

using namespace llmem::capi;

namespace {

memory_lock_state lock_state;
long              guarded_counter = 0;  // touched only under the lock

void c_worker(int n) {
    for (int i = 0; i < n; ++i) {
        if (i % 7 == 0) {
            while (!memory_lock_try_acquire(lock_state)) {
                std::this_thread::yield();
            }
        } else {
            memory_lock_acquire(lock_state);
        }
        memory_lock_acquire(lock_state);  // re-entrant
        ++guarded_counter;
        memory_lock_changed(lock_state);
        memory_lock_release(lock_state);
        memory_lock_release(lock_state);
    }
}

void gil_worker(int n) {
    // a thread that holds the GIL while it asks for the lock: it must let the GIL go meanwhile
    for (int i = 0; i < n; ++i) {
        PyGILState_STATE g = PyGILState_Ensure();
        memory_lock_acquire(lock_state);
        ++guarded_counter;
        ++lock_state.epoch;
        memory_lock_release(lock_state);
        PyGILState_Release(g);
    }
}

} // namespace

int main() {
    Py_Initialize();
    PyThreadState * main_state = PyEval_SaveThread();
    const int       n = 20000;
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
        threads.emplace_back(c_worker, n);
    }
    threads.emplace_back(gil_worker, n / 10);
    threads.emplace_back(gil_worker, n / 10);
    for (auto & t : threads) {
        t.join();
    }
    PyEval_RestoreThread(main_state);
    const long expect  = 3L * n + 2L * (n / 10);
    const bool counted = guarded_counter == expect && lock_state.c_changes == uint64_t(3L * n) &&
                         lock_state.epoch == uint64_t(expect) && !memory_lock_owned(lock_state) &&
                         lock_state.owner.load() == 0;
    std::printf("counter %ld of %ld, c_changes %llu, epoch %llu: %s\n", guarded_counter, expect,
                (unsigned long long) lock_state.c_changes, (unsigned long long) lock_state.epoch,
                counted ? "ok" : "WRONG");
    Py_Finalize();
    return counted ? 0 : 1;
}
