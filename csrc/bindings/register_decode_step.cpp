// The one-call decode step from Python (KVCache.decode_step, KVCacheISWA.decode_step, the
// hybrids' compiled step).
//
// The step of 64 sequences costs under 2 us in C++; building its Python answer the ordinary way
// (pybind11's dispatcher, a new compiled context registered with pybind11 and tied to the cache, a
// new numpy array of k rows, the context's __init__ run by the interpreter) cost as much again.
// So the KV steps are plain CPython functions (METH_FASTCALL) and:
//
//  * each cache keeps a small ring of compiled contexts and k-row arrays (`cache._step`, a
//    capsule made on the first step). An entry whose objects nobody else references any more
//    (reference count 1: the ring's own) is reused: the new plan is moved into the compiled
//    context and the k rows are written into the array. An entry still referenced (the caller
//    kept the previous context, its k rows or a view of them) is never written; when no entry is
//    free, the step's new objects take the place of a held one, which the ring then forgets. So
//    reuse cannot be observed. The ring holds nothing that references the Python cache (no cycle:
//    the cache is freed by reference counting), and before each step the free entries drop their
//    plans, so the step takes that storage back from the pools.
//  * the Python context is allocated with its type's tp_alloc and its __slots__ are filled
//    through the member offsets of the type, read once and checked against the slots the type
//    declares (slot_offsets); a type whose slots differ from the ones known here is called
//    instead, which runs __init__. The memory's _lock, _version and _step are read and written
//    through their slots the same way (getattr/setattr where its type has no such slots).
//
// Everything happens under the memory's lock, taken as `with memory.lock` takes it.

#include "pybind.h"

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/hybrid.h"
#include "llmem/kv_attention.h"
#include "llmem/kv_cache.h"

#include "../capi/memory_lock.h"

#include <structmember.h>

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <string>

// the member-type names of Python 3.12+ (structmember.h's older names before)
#ifndef Py_T_OBJECT_EX
#    define Py_T_OBJECT_EX T_OBJECT_EX
#endif
#ifndef Py_READONLY
#    define Py_READONLY READONLY
#endif

namespace llmem::bind {

namespace {

// -- arguments ------------------------------------------------------------------------------------

// seq_ids / tokens as int32: a Python list or tuple of ints is read directly; anything else goes
// through the general conversion (which names what is wrong).
void read_ids(py::handle obj, const char * name, std::vector<int32_t> & out) {
    PyObject * o = obj.ptr();
    if (PyList_CheckExact(o) || PyTuple_CheckExact(o)) {
        const Py_ssize_t n     = PySequence_Fast_GET_SIZE(o);
        PyObject **      items = PySequence_Fast_ITEMS(o);
        out.resize(size_t(n));
        for (Py_ssize_t k = 0; k < n; ++k) {
            PyObject * it = items[k];
            if (!PyLong_CheckExact(it)) {
                out.clear();
                break;  // numpy scalars, bools, floats: the general path says what is wrong
            }
            int overflow = 0;
            const long long v = PyLong_AsLongLongAndOverflow(it, &overflow);
            if (overflow || v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
                throw py::value_error(std::string(name) + "[" + std::to_string(k) + "] = " +
                                      std::string(py::str(it)) + " does not fit in int32");
            }
            out[size_t(k)] = int32_t(v);
        }
        if (out.size() == size_t(n)) {
            return;
        }
    }
    if (PyBool_Check(o) || PyLong_Check(o)) {
        throw py::type_error(std::string(name) + " must be a sequence of ints, not a single " +
                             std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    if (PyList_Check(o) || PyTuple_Check(o)) {
        for (py::handle it : obj) {
            if (PyBool_Check(it.ptr()) || PyFloat_Check(it.ptr())) {
                throw py::type_error(std::string(name) + " must hold ints, got " + std::string(py::repr(it)));
            }
        }
    }
    converted<int32_t> c = to_int32(obj, name, 1);
    out = std::move(c.values);
}

std::string no_room(size_t n) {
    return "decode_step: no room for one token of each of the " + std::to_string(n) +
           " sequences; the memory is unchanged (free cells with seq_rm, or use a larger cache)";
}

thread_local std::vector<int32_t> t_seq_ids;
thread_local std::vector<int32_t> t_tokens;

// The int32 values of a 1-D C-contiguous int32 array in place; anything else converted (and
// checked) into `scratch` as read_ids does.
const int32_t * ids_view(py::handle obj, const char * name, std::vector<int32_t> & scratch, size_t & n) {
    using exact = py::array_t<int32_t, py::array::c_style>;
    auto & api = py::detail::npy_api::get();
    if (api.PyArray_Check_(obj.ptr())) {
        const auto *             a     = py::detail::array_proxy(obj.ptr());
        static PyObject * const int32 = py::dtype::of<int32_t>().release().ptr();  // kept for the process
        // the usual array carries numpy's int32 descriptor itself: no equivalence call
        const bool is_int32 = a->descr == int32 || exact::check_(obj);
        if (is_int32 && a->nd == 1 && (a->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) != 0) {
            n = size_t(a->dimensions[0]);
            return reinterpret_cast<const int32_t *>(a->data);
        }
    }
    read_ids(obj, name, scratch);
    n = scratch.size();
    return scratch.data();
}

struct step_args {
    const int32_t * ids = nullptr;
    const int32_t * tok = nullptr;
    uint32_t        n   = 0;
};

step_args read_step_args(py::handle seq_ids, py::handle tokens) {
    step_args a;
    size_t    n = 0;
    a.ids       = ids_view(seq_ids, "seq_ids", t_seq_ids, n);
    if (n > size_t(std::numeric_limits<int32_t>::max())) {
        throw py::value_error("seq_ids has more than 2^31 - 1 entries");
    }
    a.n = uint32_t(n);
    if (!tokens.is_none()) {
        size_t nt = 0;
        a.tok     = ids_view(tokens, "tokens", t_tokens, nt);
        if (nt != n) {
            throw py::value_error("tokens has " + std::to_string(nt) + " entries, seq_ids " + std::to_string(n) +
                                  ": one token per sequence");
        }
    }
    return a;
}

// -- the memory's attributes ----------------------------------------------------------------------

struct step_names {
    PyObject * core    = PyUnicode_InternFromString("_core");
    PyObject * lock    = PyUnicode_InternFromString("_lock");
    PyObject * version = PyUnicode_InternFromString("_version");
    PyObject * step    = PyUnicode_InternFromString("_step");
    PyObject * base    = PyUnicode_InternFromString("base");
    PyObject * swa     = PyUnicode_InternFromString("swa");
};

const step_names & names() {
    static const step_names n;  // interned for the process's lifetime
    return n;
}

py::object attr(py::handle obj, PyObject * name) {
    PyObject * r = PyObject_GetAttr(obj.ptr(), name);
    if (r == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(r);
}

// -- a Python context built without __init__ ------------------------------------------------------

// Named __slots__ of a type as member offsets, resolved on a type's first use (a few types are
// remembered, and kept alive: the offsets belong to the type object). A name qualifies when the type
// resolves it to a plain object slot (a member descriptor, not a property of a subclass). With
// `exact` the type must also declare no other slot, no __dict__ and no __new__ of its own: then an
// instance is fully described by these slots and can be built by filling them (instead of __init__).
template <size_t N>
class slot_offsets {
public:
    slot_offsets(const std::array<const char *, N> & names, bool exact) : names_(names), exact_(exact) {}

    // The offsets for `type`, or nullptr when it does not qualify (the caller takes the generic way).
    const Py_ssize_t * of(PyObject * type) {
        for (const auto & t : types_) {
            if (t.type == type) {
                return t.ok ? t.offset.data() : nullptr;
            }
        }
        if (!PyType_Check(type)) {
            return nullptr;
        }
        for (auto & t : types_) {
            if (t.type == nullptr) {
                t.type = type;
                Py_INCREF(type);
                t.ok = resolve(reinterpret_cast<PyTypeObject *>(type), t.offset);
                return t.ok ? t.offset.data() : nullptr;
            }
        }
        return nullptr;  // more types than remembered: the generic way
    }

private:
    struct resolved {
        PyObject *                type = nullptr;
        bool                      ok   = false;
        std::array<Py_ssize_t, N> offset{};
    };

    bool resolve(PyTypeObject * tp, std::array<Py_ssize_t, N> & offset) const {
        if (exact_ && (tp->tp_dictoffset != 0 || tp->tp_new != PyBaseObject_Type.tp_new)) {
            return false;
        }
        for (size_t k = 0; k < N; ++k) {
            PyObject * d = PyObject_GetAttrString(reinterpret_cast<PyObject *>(tp), names_[k]);
            if (d == nullptr) {
                PyErr_Clear();
                return false;
            }
            bool plain = false;
            if (Py_TYPE(d) == &PyMemberDescr_Type) {
                const PyMemberDef * m = reinterpret_cast<PyMemberDescrObject *>(d)->d_member;
                offset[k]             = m->offset;
                plain                 = m->type == Py_T_OBJECT_EX && (m->flags & Py_READONLY) == 0;
            }
            Py_DECREF(d);
            if (!plain) {
                return false;
            }
        }
        if (!exact_) {
            return true;
        }
        // no slot left out: count the member descriptors declared along the MRO
        size_t     declared = 0;
        PyObject * mro      = tp->tp_mro;
        for (Py_ssize_t i = 0; mro != nullptr && i < PyTuple_GET_SIZE(mro); ++i) {
            auto * base = reinterpret_cast<PyTypeObject *>(PyTuple_GET_ITEM(mro, i));
            if (base == &PyBaseObject_Type || base->tp_dict == nullptr) {
                continue;
            }
            PyObject * key   = nullptr;
            PyObject * value = nullptr;
            Py_ssize_t pos   = 0;
            while (PyDict_Next(base->tp_dict, &pos, &key, &value)) {
                declared += Py_TYPE(value) == &PyMemberDescr_Type ? 1 : 0;
            }
        }
        return declared == N;
    }

    std::array<const char *, N> names_;
    bool                        exact_;
    std::array<resolved, 4>     types_{};
};

PyObject *& slot_at(PyObject * obj, Py_ssize_t offset) {
    return *reinterpret_cast<PyObject **>(reinterpret_cast<char *>(obj) + offset);
}

// A new instance of `type`, whose exact slots are at `offset`, with slot k set to values[k]
// (nullptr: left unset, as __init__ leaves it).
template <size_t N>
py::object build_from_slots(PyObject * type, const Py_ssize_t * offset, const std::array<PyObject *, N> & values) {
    auto *     tp  = reinterpret_cast<PyTypeObject *>(type);
    PyObject * obj = tp->tp_alloc(tp, 0);
    if (obj == nullptr) {
        throw py::error_already_set();
    }
    for (size_t k = 0; k < N; ++k) {
        if (values[k] != nullptr) {
            Py_INCREF(values[k]);
            slot_at(obj, offset[k]) = values[k];
        }
    }
    return py::reinterpret_steal<py::object>(obj);
}

// A memory's fields the step reads and writes (_lock, _version, _step): through their slots where
// its type has them as plain slots (KVCache does), else through getattr/setattr.
enum memory_field { FIELD_LOCK, FIELD_VERSION, FIELD_STEP, FIELD_N };

class memory_fields {
public:
    explicit memory_fields(py::handle mem) : mem_(mem.ptr()) {
        static slot_offsets<FIELD_N> offsets({ "_lock", "_version", "_step" }, false);
        off_ = offsets.of(reinterpret_cast<PyObject *>(Py_TYPE(mem_)));
    }

    py::object get(memory_field f) const {
        if (off_ != nullptr) {
            if (PyObject * v = slot_at(mem_, off_[f])) {
                return py::reinterpret_borrow<py::object>(v);
            }  // unset: getattr raises the AttributeError
        }
        return attr(mem_, name(f));
    }

    void set(memory_field f, py::object v) const {
        if (off_ != nullptr) {
            PyObject *& s   = slot_at(mem_, off_[f]);
            PyObject *  old = s;
            s               = v.release().ptr();
            Py_XDECREF(old);
            return;
        }
        if (PyObject_SetAttr(mem_, name(f), v.ptr()) != 0) {
            throw py::error_already_set();
        }
    }

private:
    static PyObject * name(memory_field f) {
        return f == FIELD_LOCK ? names().lock : f == FIELD_VERSION ? names().version : names().step;
    }

    PyObject *         mem_;
    const Py_ssize_t * off_ = nullptr;
};

// The memory's lock for the call, taken as Python takes it (memory_lock.h).
class python_lock {
public:
    explicit python_lock(const memory_fields & mem) {
        py::object lock = mem.get(FIELD_LOCK);
        state_          = capi::memory_lock_of(lock.ptr());
        if (state_ == nullptr) {
            throw py::type_error("memory._lock is not llmem's MemoryLock (was it replaced?)");
        }
        if (!capi::memory_lock_python_acquire(lock.ptr())) {
            throw py::error_already_set();  // the acquire's bookkeeping (_touch) raised
        }
        lock_ = std::move(lock);
    }
    ~python_lock() { capi::memory_lock_release_held(*state_); }
    python_lock(const python_lock &)             = delete;
    python_lock & operator=(const python_lock &) = delete;

private:
    py::object                lock_;  // held until the release
    capi::memory_lock_state * state_ = nullptr;
};

// memory._version += 1 (the Python side's change counter); returns the new value.
py::object bump_version(const memory_fields & mem) {
    py::object v = mem.get(FIELD_VERSION);
    PyObject * nv;
    if (PyLong_CheckExact(v.ptr())) {
        int             overflow = 0;
        const long long x        = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
        nv = overflow == 0 && x < std::numeric_limits<long long>::max() ? PyLong_FromLongLong(x + 1) : nullptr;
    } else {
        nv = nullptr;
    }
    if (nv == nullptr) {
        PyErr_Clear();
        PyObject * one = PyLong_FromLong(1);
        nv             = one ? PyNumber_Add(v.ptr(), one) : nullptr;
        Py_XDECREF(one);
        if (nv == nullptr) {
            throw py::error_already_set();
        }
    }
    py::object r = py::reinterpret_steal<py::object>(nv);
    mem.set(FIELD_VERSION, r);
    return r;
}

// KVCacheContext's slots and the values its __init__(cache, ctx, version, k_idxs) gives them.
enum kv_slot { K_CACHE, K_CTX, K_KIDX, K_KIDX_AT, K_VERSION, K_NO_ROOM, K_DIDX, K_DIDX_AT, K_DTAB, K_DTAB_KEY, K_N };

slot_offsets<K_N> & kv_context_slots() {
    static slot_offsets<K_N> l({ "_cache", "_ctx", "_kidx", "_kidx_at", "_version", "_no_room", "_didx", "_didx_at",
                                 "_dtab", "_dtab_key" },
                               true);
    return l;
}

// KVCacheISWAContext's slots: (mem, base, swa) and _no_room, unset.
enum iswa_slot { I_MEM, I_BASE, I_SWA, I_NO_ROOM, I_N };

slot_offsets<I_N> & iswa_context_slots() {
    static slot_offsets<I_N> l({ "_mem", "base", "swa", "_no_room" }, true);
    return l;
}

// -- the per-cache ring of reusable step objects --------------------------------------------------

// A compiled context (pybind11 instance of kv_context) and a k-rows array, reused together once
// only the ring references them.
struct ring_entry {
    PyObject *   ctx_obj = nullptr;
    kv_context * ctx     = nullptr;
    PyObject *   rows    = nullptr;
    int64_t *    rows_data = nullptr;
    Py_ssize_t   rows_len  = 0;
};

struct step_ring {
    static constexpr size_t SIZE = 3;  // the context in use, the caller's previous one, and one spare
    PyObject *                   core_obj     = nullptr;  // the cache's _core (held)
    kv_cache *                   core         = nullptr;
    size_t                       next_evicted = 0;
    std::array<ring_entry, SIZE> entries;

    ~step_ring() {
        for (auto & e : entries) {
            Py_XDECREF(e.ctx_obj);
            Py_XDECREF(e.rows);
        }
        Py_XDECREF(core_obj);
    }
};

constexpr const char * RING_CAPSULE = "llmem.decode_step_ring";

void delete_ring(PyObject * capsule) {
    delete static_cast<step_ring *>(PyCapsule_GetPointer(capsule, RING_CAPSULE));
}

// cache._step, made on the first step (None before).
step_ring & ring_of(py::handle cache, const memory_fields & fields) {
    py::object r = fields.get(FIELD_STEP);
    if (PyCapsule_CheckExact(r.ptr())) {
        if (void * p = PyCapsule_GetPointer(r.ptr(), RING_CAPSULE)) {
            return *static_cast<step_ring *>(p);
        }
        throw py::error_already_set();
    }
    if (!r.is_none()) {
        throw py::type_error("cache._step must be None or llmem's decode-step ring");
    }
    py::object core    = attr(cache, names().core);
    kv_cache & c       = core.cast<kv_cache &>();
    auto *     ring    = new step_ring();
    ring->core         = &c;
    ring->core_obj     = core.release().ptr();
    PyObject * capsule = PyCapsule_New(ring, RING_CAPSULE, delete_ring);
    if (capsule == nullptr) {
        delete ring;
        throw py::error_already_set();
    }
    fields.set(FIELD_STEP, py::reinterpret_steal<py::object>(capsule));  // the cache holds it now
    return *ring;
}

// Before a step: the compiled contexts of free entries (only the ring references them) drop their
// plans, so that the step takes that storage back from the cache's and the allocator's pools. The
// first free entry is the one the step refills (nullptr: none is free).
ring_entry * release_free(step_ring & ring) {
    ring_entry * first = nullptr;
    for (auto & e : ring.entries) {
        if (e.ctx_obj != nullptr && Py_REFCNT(e.ctx_obj) == 1 && Py_REFCNT(e.rows) == 1) {
            if (e.ctx->cache() != nullptr) {
                *e.ctx = kv_context(memory_status::NO_UPDATE);
            }
            first = first ? first : &e;
        }
    }
    return first;
}

// The step's compiled context and k rows as Python objects: the free entry's, refilled, or new
// ones, which the ring keeps for later steps.
std::pair<py::object, py::object> step_objects(step_ring & ring, ring_entry * free, kv_context && ctx) {
    kv_cache &       c = *ring.core;
    const Py_ssize_t n = Py_ssize_t(ctx.get_slot().idxs.size());
    if (free != nullptr) {
        *free->ctx = std::move(ctx);
        if (free->rows_len != n) {
            py::array_t<int64_t> rows(n);
            Py_DECREF(free->rows);
            free->rows_data = rows.mutable_data();
            free->rows_len  = n;
            free->rows      = rows.release().ptr();
        }
        kv_k_idxs(c, free->ctx->get_slot(), free->rows_data);
        return { py::reinterpret_borrow<py::object>(free->ctx_obj), py::reinterpret_borrow<py::object>(free->rows) };
    }
    py::array_t<int64_t> rows(n);
    kv_k_idxs(c, ctx.get_slot(), rows.mutable_data());
    py::object compiled = owned_by(py::cast(std::move(ctx)), ring.core_obj);
    // kept in an empty entry, else in place of one the caller still holds (round robin): the
    // caller keeps those objects, the ring lets them go and never reuses them
    ring_entry * slot = nullptr;
    for (auto & e : ring.entries) {
        if (e.ctx_obj == nullptr) {
            slot = &e;
            break;
        }
    }
    if (slot == nullptr) {
        slot              = &ring.entries[ring.next_evicted];
        ring.next_evicted = (ring.next_evicted + 1) % step_ring::SIZE;
        Py_CLEAR(slot->ctx_obj);
        Py_CLEAR(slot->rows);
    }
    slot->ctx_obj   = py::object(compiled).release().ptr();
    slot->ctx       = compiled.cast<kv_context *>();
    slot->rows_data = rows.mutable_data();
    slot->rows_len  = n;
    slot->rows      = py::object(rows).release().ptr();
    return { std::move(compiled), std::move(rows) };
}

// The applied step as the Python context: what context_type(cache, compiled, version, rows) makes.
py::object python_context(py::handle context_type, py::handle cache, const memory_fields & fields, step_ring & ring,
                          ring_entry * free, kv_context && ctx) {
    auto [compiled, rows] = step_objects(ring, free, std::move(ctx));
    py::object version    = bump_version(fields);
    if (const Py_ssize_t * offset = kv_context_slots().of(context_type.ptr())) {
        static PyObject * const zero      = PyLong_FromLong(0);
        static PyObject * const minus_one = PyLong_FromLong(-1);
        std::array<PyObject *, K_N> v{};
        v[K_CACHE]    = cache.ptr();
        v[K_CTX]      = compiled.ptr();
        v[K_KIDX]     = rows.ptr();
        v[K_KIDX_AT]  = zero;  // the k rows are the current micro-batch's
        v[K_VERSION]  = version.ptr();
        v[K_NO_ROOM]  = nullptr;
        v[K_DIDX]     = Py_None;
        v[K_DIDX_AT]  = minus_one;
        v[K_DTAB]     = Py_None;
        v[K_DTAB_KEY] = Py_None;
        return build_from_slots<K_N>(context_type.ptr(), offset, v);
    }
    PyObject * args[] = { cache.ptr(), compiled.ptr(), version.ptr(), rows.ptr() };
    PyObject * r      = PyObject_Vectorcall(context_type.ptr(), args, 4, nullptr);
    if (r == nullptr) {
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(r);
}

PyObject * translate_current() {
    try {
        throw;
    } catch (py::error_already_set & e) {
        e.restore();
    } catch (...) {
        py::detail::try_translate_exceptions();
    }
    return nullptr;
}

// kv_decode_step(cache, seq_ids, tokens, context_type) -> context or None
PyObject * kv_decode_step_py(PyObject *, PyObject * const * args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "kv_decode_step(cache, seq_ids, tokens, context_type) takes 4 arguments");
        return nullptr;
    }
    try {
        py::handle          mem(args[0]);
        const memory_fields fields(mem);
        python_lock         hold(fields);  // first: the ids are read into per-thread scratch under it
        step_ring &         ring = ring_of(mem, fields);
        kv_cache &          c    = *ring.core;
        const step_args     a    = read_step_args(args[1], args[2]);
        ring_entry *        free = release_free(ring);
        // a plain cache is its own position source (as init_batch reads it)
        kv_context ctx = kv_decode_step(c, c, a.ids, a.n, a.tok);
        if (ctx.status() == memory_status::NO_UPDATE) {
            Py_RETURN_NONE;  // several micro-batches: the caller takes the general path
        }
        if (ctx.status() != memory_status::SUCCESS) {
            throw llmem::error(no_room(a.n));
        }
        return python_context(args[3], mem, fields, ring, free, std::move(ctx)).release().ptr();
    } catch (...) {
        return translate_current();
    }
}

// kv_iswa_decode_step(mem, seq_ids, tokens, context_type, iswa_context_type) -> context or None
PyObject * kv_iswa_decode_step_py(PyObject *, PyObject * const * args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "kv_iswa_decode_step(mem, seq_ids, tokens, context_type, iswa_context_type) takes 5 arguments");
        return nullptr;
    }
    try {
        py::handle          mem(args[0]);
        py::object          base = attr(mem, names().base), swa = attr(mem, names().swa);
        const memory_fields fields_b(base), fields_s(swa);
        python_lock         hold{ memory_fields(mem) };
        step_ring &         ring_b = ring_of(base, fields_b);
        step_ring &         ring_s = ring_of(swa, fields_s);
        const step_args     a      = read_step_args(args[1], args[2]);
        ring_entry *        free_b = release_free(ring_b);
        ring_entry *        free_s = release_free(ring_s);
        auto                p      = kv_iswa_decode_step(*ring_b.core, *ring_s.core, a.ids, a.n, a.tok);
        if (p.first.status() == memory_status::NO_UPDATE) {
            Py_RETURN_NONE;
        }
        if (p.first.status() != memory_status::SUCCESS) {
            throw llmem::error(no_room(a.n));
        }
        py::object cb = python_context(args[3], base, fields_b, ring_b, free_b, std::move(p.first));
        py::object cs = python_context(args[3], swa, fields_s, ring_s, free_s, std::move(p.second));
        if (const Py_ssize_t * offset = iswa_context_slots().of(args[4])) {
            return build_from_slots<I_N>(args[4], offset, { mem.ptr(), cb.ptr(), cs.ptr(), nullptr }).release().ptr();
        }
        PyObject * in[] = { mem.ptr(), cb.ptr(), cs.ptr() };
        return PyObject_Vectorcall(args[4], in, 3, nullptr);
    } catch (...) {
        return translate_current();
    }
}

// _decode_step_fast_layout(context_type) -> whether decode steps build context_type without
// calling it (a test checks that llmem's own context types qualify).
PyObject * fast_layout_py(PyObject *, PyObject * const * args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_decode_step_fast_layout(kind, context_type) takes 2 arguments");
        return nullptr;
    }
    const char * kind = PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8(args[0]) : nullptr;
    if (kind == nullptr) {
        PyErr_SetString(PyExc_TypeError, "kind must be 'kv' or 'iswa'");
        return nullptr;
    }
    const std::string k(kind);
    if (k == "kv") {
        return PyBool_FromLong(kv_context_slots().of(args[1]) != nullptr);
    }
    if (k == "iswa") {
        return PyBool_FromLong(iswa_context_slots().of(args[1]) != nullptr);
    }
    PyErr_Format(PyExc_ValueError, "kind must be 'kv' or 'iswa', got %R", args[0]);
    return nullptr;
}

template <typename F>
PyCFunction fastcall(F f) {
    return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f));
}

PyMethodDef decode_step_defs[] = {
    { "kv_decode_step", fastcall(kv_decode_step_py), METH_FASTCALL,
      "kv_decode_step($module, cache, seq_ids, tokens, context_type, /)\n--\n\n"
      "One token per sequence planned and applied in one call, under cache._lock (see "
      "llmem.KVCache.decode_step): the context context_type(cache, KVContext, version, k_idxs) would "
      "make, or None when the step takes several micro-batches." },
    { "kv_iswa_decode_step", fastcall(kv_iswa_decode_step_py), METH_FASTCALL,
      "kv_iswa_decode_step($module, mem, seq_ids, tokens, context_type, iswa_context_type, /)\n--\n\n"
      "The decode step of a KVCacheISWA in one call: iswa_context_type(mem, base context, swa context), or "
      "None when the step takes several micro-batches." },
    { "_decode_step_fast_layout", fastcall(fast_layout_py), METH_FASTCALL,
      "_decode_step_fast_layout($module, kind, context_type, /)\n--\n\n"
      "Whether the decode step builds context_type ('kv' or 'iswa' kind) from its slots, without calling it." },
    { nullptr, nullptr, 0, nullptr },
};

// A hybrid memory's decode step in one call: the decode batch (token ids 0 without tokens, as
// the general path's Batch), the allocator with the hybrid's positions, hybrid_prepare with n_ubatch
// max(n, n_rs_seq + 2) and the apply of the first micro-batch on every part: init_batch + apply
// without the Python objects between.
py::tuple hybrid_decode_step(py::object base_obj, py::object swa_obj, py::object recr_obj, py::object positions_obj,
                             py::handle seq_ids, py::handle tokens) {
    kv_cache & base = base_obj.cast<kv_cache &>();
    kv_cache * swa  = swa_obj.is_none() ? nullptr : swa_obj.cast<kv_cache *>();
    auto *     recr = dynamic_cast<rs_memory *>(recr_obj.cast<seq_pos_source *>());
    if (recr == nullptr) {
        throw py::type_error("recr must be the compiled core of a RecurrentMemory");
    }
    const seq_pos_source & positions = *positions_obj.cast<const seq_pos_source *>();
    const step_args        a         = read_step_args(seq_ids, tokens);
    check_decode_step_args(base.n_seq_max(), a.ids, a.n, a.tok);
    thread_local batch                         b;
    thread_local std::unique_ptr<batch_allocr> balloc;
    if (!balloc || balloc->n_seq_max() != base.n_seq_max()) {
        balloc = std::make_unique<batch_allocr>(base.n_seq_max());
    }
    b.n_tokens = a.n;
    if (a.tok) {
        b.token.assign(a.tok, a.tok + a.n);
    } else {
        b.token.assign(a.n, 0);  // the allocator needs token ids: 0, as the C API's decode_step
    }
    b.embd.clear();
    b.n_embd = 0;
    b.pos.clear();
    b.seq_id.assign(a.ids, a.ids + a.n);
    b.seq_id_off.resize(size_t(a.n) + 1);
    for (uint32_t i = 0; i <= a.n; ++i) {
        b.seq_id_off[i] = int32_t(i);
    }
    b.output.assign(a.n, 1);
    balloc->init(b, &positions, false);
    // every sequence in one micro-batch, and room for the recurrent split's kept tail (n_rs_seq + 1
    // tokens of a sequence stay together): the C API's decode_step n_ubatch
    const uint32_t n_ubatch = std::max(a.n, recr->n_rs_seq() + 2);
    hybrid_plan    plan     = hybrid_prepare(*balloc, n_ubatch, false, base, swa, *recr);
    if (plan.status != memory_status::SUCCESS) {
        throw llmem::error(no_room(a.n));
    }
    rs_context                recr_ctx(recr, plan.ubatches);
    std::optional<kv_context> swa_ctx;
    if (swa != nullptr) {
        swa_ctx.emplace(*swa, std::move(plan.slots_swa), plan.ubatches);
    }
    kv_context base_ctx(base, std::move(plan.slots_base), std::move(plan.ubatches));
    base_ctx.apply();  // the attention side first, then the recurrent side (HybridContext.apply)
    if (swa_ctx) {
        swa_ctx->apply();
    }
    recr_ctx.apply();
    py::object swa_out = swa_ctx ? owned_by(py::cast(std::move(*swa_ctx)), swa_obj) : py::object(py::none());
    return py::make_tuple(owned_by(py::cast(std::move(base_ctx)), base_obj), swa_out,
                          owned_by(py::cast(std::move(recr_ctx)), recr_obj));
}

} // namespace

void register_decode_step(py::module_ & m) {
    if (PyModule_AddFunctions(m.ptr(), decode_step_defs) != 0) {
        throw py::error_already_set();
    }
    m.def("hybrid_decode_step", &hybrid_decode_step, py::arg("base"), py::arg("swa"), py::arg("recr"),
          py::arg("positions"), py::arg("seq_ids"), py::arg("tokens") = py::none(),
          "A hybrid memory's decode step (init_batch + apply of its first micro-batch) in one call: "
          "(base context, swa context or None, recurrent context), applied.");
}

} // namespace llmem::bind
