#include "memory_lock.h"

#include <chrono>
#include <pthread.h>
#include <new>

namespace llmem::capi {

namespace {

// The calling thread's identity, read on every C API call and every Python acquire: the thread
// pointer register where the compiler exposes it (glibc's pthread_self() returns that same
// value, through a call into libc), else pthread_self(). Both sides of the lock use this one
// function, so only its uniqueness per live thread matters.
#if defined(__has_builtin)
#    if __has_builtin(__builtin_thread_pointer) && (defined(__x86_64__) || defined(__aarch64__))
#        define LLMEM_THREAD_POINTER 1
#    endif
#endif
unsigned long this_thread() {
#if defined(LLMEM_THREAD_POINTER)
    return reinterpret_cast<unsigned long>(__builtin_thread_pointer());
#else
    return static_cast<unsigned long>(pthread_self());
#endif
}

PyTypeObject * lock_type = nullptr;

bool try_take(memory_lock_state & s, unsigned long me) {
    unsigned long expected = 0;
    return s.owner.compare_exchange_strong(expected, me, std::memory_order_acquire, std::memory_order_relaxed);
}

// The slow path: wait until the lock is free and take it; timeout < 0 waits for ever. The waiter
// counts itself before its last try, and the releaser frees `owner` before it reads `waiters`
// (both sequentially consistent), so either the try succeeds or the releaser sees the waiter
// and notifies it under wait_mutex, which the waiter holds until it waits: no lost wake-up.
bool wait_take(memory_lock_state & s, unsigned long me, double timeout) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout < 0 ? 0 : timeout));
    std::unique_lock<std::mutex> lk(s.wait_mutex);
    s.waiters.fetch_add(1, std::memory_order_seq_cst);
    bool got = false;
    while (true) {
        unsigned long expected = 0;
        if (s.owner.compare_exchange_strong(expected, me, std::memory_order_seq_cst, std::memory_order_relaxed)) {
            got = true;
            break;
        }
        if (timeout < 0) {
            s.cv.wait(lk);
        } else if (s.cv.wait_until(lk, deadline) == std::cv_status::timeout) {
            expected = 0;
            got = s.owner.compare_exchange_strong(expected, me, std::memory_order_seq_cst,
                                                  std::memory_order_relaxed);
            break;
        }
    }
    s.waiters.fetch_sub(1, std::memory_order_seq_cst);
    return got;
}

// After a Python acquire: the epoch moves (C contexts cannot tell what this holder will do), and
// C changes made since the last Python acquire reach the Python side's modification counters.
void after_python_acquire(memory_lock_object * self) {
    memory_lock_state & s = *self->state;
    ++s.epoch;
    if (s.c_changes == s.c_changes_seen) {
        return;
    }
    s.c_changes_seen = s.c_changes;
    if (self->touch_list == nullptr) {
        return;
    }
    PyObject * list = self->touch_list;
    Py_INCREF(list);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
        PyObject * r = PyObject_CallMethod(PyList_GET_ITEM(list, i), "_touch", nullptr);
        if (r == nullptr) {
            PyErr_WriteUnraisable(PyList_GET_ITEM(list, i));
        }
        Py_XDECREF(r);
    }
    Py_DECREF(list);
}

// Python's acquire: the GIL is held on entry and released only while waiting.
int python_take(memory_lock_object * self, bool blocking, double timeout) {
    memory_lock_state & s  = *self->state;
    const unsigned long me = this_thread();
    if (s.owner.load(std::memory_order_relaxed) == me) {
        ++s.count;
        after_python_acquire(self);
        return 1;
    }
    if (!try_take(s, me)) {
        if (!blocking) {
            return 0;
        }
        bool got = true;
        Py_BEGIN_ALLOW_THREADS
        got = wait_take(s, me, timeout);
        Py_END_ALLOW_THREADS
        if (!got) {
            return 0;
        }
    }
    s.count = 1;
    after_python_acquire(self);
    return 1;
}

PyObject * lock_acquire(PyObject * op, PyObject * const * args, Py_ssize_t nargs, PyObject * kwnames) {
    auto * self     = reinterpret_cast<memory_lock_object *>(op);
    bool   blocking = true;
    double timeout  = -1;
    if (nargs != 0 || kwnames != nullptr) {  // the rare forms: acquire(False), acquire(timeout=...)
        static const char * names[] = { "blocking", "timeout", nullptr };
        PyObject * tuple = PyTuple_New(nargs);
        if (tuple == nullptr) {
            return nullptr;
        }
        for (Py_ssize_t i = 0; i < nargs; ++i) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(tuple, i, args[i]);
        }
        PyObject * kw = nullptr;
        if (kwnames != nullptr) {
            kw = PyDict_New();
            for (Py_ssize_t i = 0; kw != nullptr && i < PyTuple_GET_SIZE(kwnames); ++i) {
                PyDict_SetItem(kw, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]);
            }
        }
        int        b  = 1;
        const bool ok = PyArg_ParseTupleAndKeywords(tuple, kw, "|pd:acquire", const_cast<char **>(names), &b,
                                                    &timeout) != 0;
        Py_DECREF(tuple);
        Py_XDECREF(kw);
        if (!ok) {
            return nullptr;
        }
        blocking = b != 0;
        if (!blocking && timeout != -1) {
            PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
            return nullptr;
        }
        if (timeout < 0 && timeout != -1) {
            PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
            return nullptr;
        }
    }
    return PyBool_FromLong(python_take(self, blocking, timeout));
}

PyObject * lock_release(PyObject * op, PyObject *) {
    auto * self = reinterpret_cast<memory_lock_object *>(op);
    if (!memory_lock_release(*self->state)) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return nullptr;
    }
    Py_RETURN_NONE;
}

PyObject * lock_enter(PyObject * op, PyObject *) {
    return PyBool_FromLong(python_take(reinterpret_cast<memory_lock_object *>(op), true, -1));
}

PyObject * lock_exit(PyObject * op, PyObject * const *, Py_ssize_t) { return lock_release(op, nullptr); }

PyObject * lock_locked(PyObject * op, PyObject *) {
    auto * self = reinterpret_cast<memory_lock_object *>(op);
    return PyBool_FromLong(self->state->owner.load(std::memory_order_relaxed) != 0);
}

PyObject * lock_is_owned(PyObject * op, PyObject *) {
    return PyBool_FromLong(memory_lock_owned(*reinterpret_cast<memory_lock_object *>(op)->state));
}

PyObject * lock_new(PyTypeObject * type, PyObject * args, PyObject * kwargs) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "MemoryLock() takes no arguments");
        return nullptr;
    }
    auto * self = reinterpret_cast<memory_lock_object *>(type->tp_alloc(type, 0));
    if (self == nullptr) {
        return nullptr;
    }
    self->state = new (std::nothrow) memory_lock_state();
    if (self->state == nullptr) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->touch_list  = nullptr;
    self->weakreflist = nullptr;
    return reinterpret_cast<PyObject *>(self);
}

int lock_traverse(PyObject * op, visitproc visit, void * arg) {
    auto * self = reinterpret_cast<memory_lock_object *>(op);
    Py_VISIT(self->touch_list);
#if PY_VERSION_HEX >= 0x03090000
    Py_VISIT(Py_TYPE(op));
#endif
    return 0;
}

int lock_clear(PyObject * op) {
    Py_CLEAR(reinterpret_cast<memory_lock_object *>(op)->touch_list);
    return 0;
}

void lock_dealloc(PyObject * op) {
    auto *         self = reinterpret_cast<memory_lock_object *>(op);
    PyTypeObject * tp   = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    if (self->weakreflist != nullptr) {
        PyObject_ClearWeakRefs(op);
    }
    lock_clear(op);
    delete self->state;
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyObject * lock_repr(PyObject * op) {
    auto *        self  = reinterpret_cast<memory_lock_object *>(op);
    unsigned long owner = self->state->owner.load(std::memory_order_relaxed);
    return PyUnicode_FromFormat("<llmem.MemoryLock %s owner=%lu count=%u at %p>", owner ? "locked" : "unlocked",
                                owner, owner == this_thread() ? self->state->count : 0u, op);
}

PyMethodDef lock_methods[] = {
    { "acquire", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(lock_acquire)),
      METH_FASTCALL | METH_KEYWORDS,
      "acquire(blocking=True, timeout=-1) -> bool: take the lock (re-entrant), as RLock.acquire." },
    { "release", lock_release, METH_NOARGS, "Release the lock once (RuntimeError if not held by this thread)." },
    { "__enter__", lock_enter, METH_NOARGS, nullptr },
    { "__exit__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(lock_exit)), METH_FASTCALL,
      nullptr },
    { "locked", lock_locked, METH_NOARGS, "Whether any thread holds the lock." },
    { "_is_owned", lock_is_owned, METH_NOARGS, "Whether the calling thread holds the lock." },
    { nullptr, nullptr, 0, nullptr },
};

PyMemberDef lock_members[] = {
    { "__weaklistoffset__", T_PYSSIZET, offsetof(memory_lock_object, weakreflist), READONLY, nullptr },
    { nullptr, 0, 0, 0, nullptr },
};

} // namespace

bool memory_lock_acquire(memory_lock_state & s) {
    const unsigned long me = this_thread();
    if (s.owner.load(std::memory_order_relaxed) == me) {
        ++s.count;
        return false;
    }
    if (!try_take(s, me)) {
        // a Python holder may need the GIL to finish: never wait for the lock while holding it
        if (PyGILState_Check()) {
            PyThreadState * ts = PyEval_SaveThread();
            wait_take(s, me, -1);
            PyEval_RestoreThread(ts);
        } else {
            wait_take(s, me, -1);
        }
    }
    s.count = 1;
    return true;
}

bool memory_lock_try_acquire(memory_lock_state & s) {
    const unsigned long me = this_thread();
    if (s.owner.load(std::memory_order_relaxed) == me) {
        ++s.count;
        return true;
    }
    if (!try_take(s, me)) {
        return false;
    }
    s.count = 1;
    return true;
}

void memory_lock_release_held(memory_lock_state & s) {
    if (--s.count == 0) {
        s.owner.store(0, std::memory_order_seq_cst);
        if (s.waiters.load(std::memory_order_seq_cst) != 0) {
            std::lock_guard<std::mutex> g(s.wait_mutex);
            s.cv.notify_one();
        }
    }
}

bool memory_lock_release(memory_lock_state & s) {
    if (s.owner.load(std::memory_order_relaxed) != this_thread() || s.count == 0) {
        return false;
    }
    memory_lock_release_held(s);
    return true;
}

bool memory_lock_owned(const memory_lock_state & s) {
    return s.owner.load(std::memory_order_relaxed) == this_thread() && s.count > 0;
}

bool memory_lock_python_acquire(PyObject * obj) {
    if (lock_type == nullptr || !PyObject_TypeCheck(obj, lock_type)) {
        return false;
    }
    return python_take(reinterpret_cast<memory_lock_object *>(obj), true, -1) == 1;
}

memory_lock_state * memory_lock_of(PyObject * obj) {
    if (lock_type == nullptr || !PyObject_TypeCheck(obj, lock_type)) {
        return nullptr;
    }
    return reinterpret_cast<memory_lock_object *>(obj)->state;
}

int memory_lock_register(PyObject * lock, PyObject * memory) {
    auto * self = reinterpret_cast<memory_lock_object *>(lock);
    if (self->touch_list == nullptr) {
        self->touch_list = PyList_New(0);
        if (self->touch_list == nullptr) {
            return -1;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(self->touch_list); ++i) {
        if (PyList_GET_ITEM(self->touch_list, i) == memory) {
            return 0;
        }
    }
    return PyList_Append(self->touch_list, memory);
}

int add_memory_lock_type(PyObject * m) {
    PyType_Slot slots[] = {
        { Py_tp_doc, const_cast<char *>(
                         "The re-entrant lock of an llmem memory (memory.lock), shared with the C API.\n\n"
                         "Used like threading.RLock (acquire/release/with); C code reaches the same mutex "
                         "through llmem._core._C_API without the GIL.") },
        { Py_tp_new, reinterpret_cast<void *>(lock_new) },
        { Py_tp_dealloc, reinterpret_cast<void *>(lock_dealloc) },
        { Py_tp_traverse, reinterpret_cast<void *>(lock_traverse) },
        { Py_tp_clear, reinterpret_cast<void *>(lock_clear) },
        { Py_tp_repr, reinterpret_cast<void *>(lock_repr) },
        { Py_tp_methods, lock_methods },
        { Py_tp_members, lock_members },
        { 0, nullptr },
    };
    PyType_Spec spec = { "llmem._core.MemoryLock", sizeof(memory_lock_object), 0,
                         Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, slots };
    PyObject * type = PyType_FromSpec(&spec);
    if (type == nullptr) {
        return -1;
    }
    lock_type = reinterpret_cast<PyTypeObject *>(type);
    Py_INCREF(type);  // one reference kept in lock_type for the module's lifetime
    if (PyModule_AddObject(m, "MemoryLock", type) != 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

} // namespace llmem::capi
