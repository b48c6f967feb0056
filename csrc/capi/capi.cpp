// llmem's C API (include/llmem/llmem_capi.h): the function table published as the capsule
// llmem._core._C_API. Each entry catches every exception and answers with a return code and a
// message; each takes the memory's lock (memory_lock.h) and repeats the semantics of the Python
// class's method of the same name, composite memories included, so a C caller and a Python
// caller take the same decisions.

#include "memory_lock.h"

#include "../bindings/pybind.h"

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/hybrid.h"
#include "llmem/kv_attention.h"
#include "llmem/kv_cache.h"
#include "llmem/llmem_capi.h"
#include "llmem/rs_memory.h"

#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

using llmem::capi::memory_lock_state;

namespace {

// Storage of one model layer (K/V of a KV cache, or R/S of the recurrent memory).
struct layer_arrays {
    bool      present = false;
    int32_t   part    = LLMEM_PART_BASE;
    int32_t   index   = -1;  // layer index within its cache / among the present recurrent layers
    uint8_t * a       = nullptr;
    size_t    a_bytes = 0;
    uint8_t * b       = nullptr;
    size_t    b_bytes = 0;
};

} // namespace

struct llmem_memory {
    PyObject *          py   = nullptr;  // one strong reference, dropped by memory_release
    memory_lock_state * lock = nullptr;
    llmem_memory_info   info{};

    llmem::kv_cache *  base = nullptr;  // the (base) KV cache
    llmem::kv_cache *  swa  = nullptr;  // the SWA cache of iSWA kinds
    llmem::rs_memory * recr = nullptr;

    const llmem::seq_pos_source *            positions = nullptr;
    std::unique_ptr<llmem::hybrid_positions> hybrid_pos;
    std::unique_ptr<llmem::batch_allocr>     balloc;

    std::vector<layer_arrays> kv_layers;  // by model layer id
    std::vector<layer_arrays> rs_layers;

    // reused by init_batch / decode_step: a warm loop allocates no batch storage
    llmem::batch          batch;
    std::vector<uint32_t> seen;  // decode_step's duplicate check: stamp per sequence id
    uint32_t              stamp = 0;

    bool iswa() const { return info.kind == LLMEM_KIND_KV_ISWA || info.kind == LLMEM_KIND_HYBRID_ISWA; }
    bool has_kv() const { return base != nullptr; }
};

struct llmem_context {
    llmem_memory *                     mem = nullptr;
    llmem::memory_status               status = llmem::memory_status::FAILED_PREPARE;
    uint64_t                           epoch  = 0;
    std::optional<llmem::kv_context>   base;
    std::optional<llmem::kv_context>   swa;
    std::unique_ptr<llmem::rs_context> recr;
    size_t                             i = 0;
    size_t                             n = 0;
    std::vector<int32_t>               primary;  // primary ids of the current ubatch (ctx_ubatch)
    size_t                             primary_at = size_t(-1);
};

namespace {

using llmem::kv_cache;
using llmem::memory_status;

// An error with a return code: thrown inside the table's functions, turned into the code there.
struct capi_error {
    int         rc;
    std::string msg;
};

[[noreturn]] void fail(int rc, std::string msg) { throw capi_error{ rc, std::move(msg) }; }

int report(char * err, size_t len, int rc, const char * msg) {
    if (err != nullptr && len > 0) {
        std::snprintf(err, len, "%s", msg);
    }
    return rc;
}

// Runs f (returning LLMEM_OK) and turns every exception into its code and message.
template <typename F>
int guarded(char * err, size_t len, F && f) noexcept {
    try {
        return f();
    } catch (const capi_error & e) {
        return report(err, len, e.rc, e.msg.c_str());
    } catch (const llmem::batch_error & e) {
        std::string msg = std::string(llmem::batch_reject_name(e.reason())) + ": " + e.what();
        return report(err, len, LLMEM_ERR_BATCH, msg.c_str());
    } catch (const llmem::state_error & e) {
        return report(err, len, LLMEM_ERR_STATE, e.what());
    } catch (const std::invalid_argument & e) {
        return report(err, len, LLMEM_ERR_INVALID, e.what());
    } catch (const std::out_of_range & e) {
        return report(err, len, LLMEM_ERR_INVALID, e.what());
    } catch (const llmem::error & e) {
        return report(err, len, LLMEM_ERR_FAILED, e.what());
    } catch (const std::bad_alloc &) {
        return report(err, len, LLMEM_ERR_NOMEM, "out of memory");
    } catch (const std::exception & e) {
        return report(err, len, LLMEM_ERR_INTERNAL, e.what());
    } catch (...) {
        return report(err, len, LLMEM_ERR_INTERNAL, "unknown C++ exception");
    }
}

// The memory's lock for one call (re-entrant: callers may hold it around several calls).
class held {
public:
    explicit held(memory_lock_state & s) : s_(s) { llmem::capi::memory_lock_acquire(s_); }
    ~held() { llmem::capi::memory_lock_release_held(s_); }
    held(const held &)             = delete;
    held & operator=(const held &) = delete;

private:
    memory_lock_state & s_;
};

llmem_memory & checked(llmem_memory * m) {
    if (m == nullptr) {
        fail(LLMEM_ERR_INVALID, "memory handle is NULL");
    }
    return *m;
}

llmem_context & checked(llmem_context * c) {
    if (c == nullptr) {
        fail(LLMEM_ERR_INVALID, "context is NULL");
    }
    return *c;
}

// -- handles ------------------------------------------------------------------------------------

void add_kv_layers(llmem_memory & m, py::handle kv, int32_t part) {
    py::list layers = kv.attr("_layers");
    py::list ks     = kv.attr("_k");
    py::list vs     = kv.attr("_v");
    for (size_t l = 0; l < layers.size(); ++l) {
        const int32_t il = layers[l].cast<int32_t>();
        if (size_t(il) >= m.kv_layers.size()) {
            m.kv_layers.resize(size_t(il) + 1);
        }
        py::array     k = py::reinterpret_borrow<py::array>(ks[l]);
        py::array     v = py::reinterpret_borrow<py::array>(vs[l]);
        layer_arrays & e = m.kv_layers[size_t(il)];
        e = { true, part, int32_t(l), static_cast<uint8_t *>(k.mutable_data()), size_t(k.nbytes()),
              static_cast<uint8_t *>(v.mutable_data()), size_t(v.nbytes()) };
    }
}

kv_cache * kv_core(py::handle kv) { return kv.attr("_core").cast<kv_cache *>(); }

void add_recurrent(llmem_memory & m, py::handle rs) {
    auto * base = rs.attr("_mem").cast<llmem::seq_pos_source *>();
    m.recr      = dynamic_cast<llmem::rs_memory *>(base);
    if (m.recr == nullptr) {
        fail(LLMEM_ERR_PYTHON, "the recurrent memory's core is not an rs_memory");
    }
    py::list rs_r = rs.attr("_r");
    py::list rs_s = rs.attr("_s");
    m.rs_layers.resize(rs_r.size());
    int32_t present = 0;
    for (size_t il = 0; il < rs_r.size(); ++il) {
        if (rs_r[il].is_none()) {
            continue;
        }
        py::array r = py::reinterpret_borrow<py::array>(rs_r[il]);
        py::array s = py::reinterpret_borrow<py::array>(rs_s[il]);
        m.rs_layers[il] = { true, 0, present++, static_cast<uint8_t *>(r.mutable_data()), size_t(r.nbytes()),
                            static_cast<uint8_t *>(s.mutable_data()), size_t(s.nbytes()) };
    }
}

void add_attention(llmem_memory & m, py::handle attn, bool iswa) {
    if (iswa) {
        py::object b = attn.attr("base"), s = attn.attr("swa");
        m.base = kv_core(b);
        m.swa  = kv_core(s);
        add_kv_layers(m, b, LLMEM_PART_BASE);
        add_kv_layers(m, s, LLMEM_PART_SWA);
    } else {
        m.base = kv_core(attn);
        add_kv_layers(m, attn, LLMEM_PART_BASE);
    }
}

int memory_get(void * py_memory, llmem_memory ** out, char * err, size_t len) {
    if (out != nullptr) {
        *out = nullptr;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    const int rc = guarded(err, len, [&]() -> int {
        if (py_memory == nullptr || out == nullptr) {
            fail(LLMEM_ERR_INVALID, "memory_get needs a memory object and an output pointer");
        }
        try {
            py::handle obj(static_cast<PyObject *>(py_memory));
            py::module_ lm = py::module_::import("llmem");
            int32_t kind = 0;
            if (py::isinstance(obj, lm.attr("HybridISWAMemory"))) {
                kind = LLMEM_KIND_HYBRID_ISWA;
            } else if (py::isinstance(obj, lm.attr("HybridMemory"))) {
                kind = LLMEM_KIND_HYBRID;
            } else if (py::isinstance(obj, lm.attr("KVCacheISWA"))) {
                kind = LLMEM_KIND_KV_ISWA;
            } else if (py::isinstance(obj, lm.attr("KVCache"))) {
                kind = LLMEM_KIND_KV;
            } else if (py::isinstance(obj, lm.attr("RecurrentMemory"))) {
                kind = LLMEM_KIND_RECURRENT;
            } else {
                fail(LLMEM_ERR_PYTHON, "memory_get: not an llmem memory: " +
                                           py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
            }
            py::object lock = obj.attr("_lock");
            memory_lock_state * state = llmem::capi::memory_lock_of(lock.ptr());
            if (state == nullptr) {
                fail(LLMEM_ERR_PYTHON, "memory_get: memory.lock is not llmem's MemoryLock (was it replaced?)");
            }
            auto m = std::make_unique<llmem_memory>();
            m->lock = state;
            m->info.kind = kind;
            switch (kind) {
            case LLMEM_KIND_KV:
            case LLMEM_KIND_KV_ISWA:
                add_attention(*m, obj, kind == LLMEM_KIND_KV_ISWA);
                m->positions = kind == LLMEM_KIND_KV_ISWA ? m->swa : m->base;
                break;
            case LLMEM_KIND_RECURRENT:
                add_recurrent(*m, obj);
                m->positions = m->recr;
                break;
            default:
                add_attention(*m, obj.attr("_attn"), kind == LLMEM_KIND_HYBRID_ISWA);
                add_recurrent(*m, obj.attr("_recr"));
                m->hybrid_pos = std::make_unique<llmem::hybrid_positions>(
                    kind == LLMEM_KIND_HYBRID_ISWA ? *static_cast<llmem::seq_pos_source *>(m->swa)
                                                   : *static_cast<llmem::seq_pos_source *>(m->base),
                    *m->recr);
                m->positions = m->hybrid_pos.get();
                break;
            }
            llmem_memory_info & in = m->info;
            in.n_seq_max = m->base ? m->base->n_seq_max() : m->recr->n_seq_max();
            in.kv_size   = m->base ? m->base->size() : 0;
            in.swa_size  = m->swa ? m->swa->size() : 0;
            in.n_stream  = m->base ? m->base->n_stream() : 1;
            in.rs_size   = m->recr ? m->recr->size() : 0;
            in.n_rs_seq  = m->recr ? m->recr->n_rs_seq() : 0;
            in.n_layer   = uint32_t(std::max(m->kv_layers.size(), m->rs_layers.size()));
            m->balloc = std::make_unique<llmem::batch_allocr>(in.n_seq_max);
            m->seen.assign(size_t(in.n_seq_max), 0);
            if (llmem::capi::memory_lock_register(lock.ptr(), obj.ptr()) != 0) {
                throw py::error_already_set();
            }
            Py_INCREF(obj.ptr());
            m->py = obj.ptr();
            *out  = m.release();
            return LLMEM_OK;
        } catch (py::error_already_set & e) {
            fail(LLMEM_ERR_PYTHON, std::string("memory_get: ") + e.what());
        } catch (const py::cast_error & e) {
            fail(LLMEM_ERR_PYTHON, std::string("memory_get: ") + e.what());
        }
    });
    PyGILState_Release(gil);
    return rc;
}

void memory_release(llmem_memory * m) {
    if (m == nullptr) {
        return;
    }
    PyObject * obj = m->py;
    delete m;
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_XDECREF(obj);
    PyGILState_Release(gil);
}

int memory_info(const llmem_memory * m, llmem_memory_info * out) {
    if (m == nullptr || out == nullptr) {
        return LLMEM_ERR_INVALID;
    }
    *out = m->info;
    return LLMEM_OK;
}

const layer_arrays & layer_of(const std::vector<layer_arrays> & v, int32_t il, const char * what) {
    if (il < 0 || size_t(il) >= v.size() || !v[size_t(il)].present) {
        fail(LLMEM_ERR_INVALID, "model layer " + std::to_string(il) + " has no " + what + " in this memory");
    }
    return v[size_t(il)];
}

int layer_kv(const llmem_memory * m, int32_t il, int32_t * part, void ** k, size_t * kb, void ** v, size_t * vb,
             char * err, size_t len) {
    return guarded(err, len, [&] {
        const layer_arrays & e = layer_of(checked(const_cast<llmem_memory *>(m)).kv_layers, il, "K/V arrays");
        if (part) *part = e.part;
        if (k) *k = e.a;
        if (kb) *kb = e.a_bytes;
        if (v) *v = e.b;
        if (vb) *vb = e.b_bytes;
        return LLMEM_OK;
    });
}

int layer_rs(const llmem_memory * m, int32_t il, void ** r, size_t * rb, void ** s, size_t * sb, char * err,
             size_t len) {
    return guarded(err, len, [&] {
        const layer_arrays & e = layer_of(checked(const_cast<llmem_memory *>(m)).rs_layers, il, "recurrent state");
        if (r) *r = e.a;
        if (rb) *rb = e.a_bytes;
        if (s) *s = e.b;
        if (sb) *sb = e.b_bytes;
        return LLMEM_OK;
    });
}

// -- lock ---------------------------------------------------------------------------------------

int lock(llmem_memory * m) {
    if (m == nullptr) {
        return LLMEM_ERR_INVALID;
    }
    llmem::capi::memory_lock_acquire(*m->lock);
    return LLMEM_OK;
}

int try_lock(llmem_memory * m) { return m != nullptr && llmem::capi::memory_lock_try_acquire(*m->lock) ? 1 : 0; }

int unlock(llmem_memory * m) {
    if (m == nullptr) {
        return LLMEM_ERR_INVALID;
    }
    return llmem::capi::memory_lock_release(*m->lock) ? LLMEM_OK : LLMEM_ERR_LOCK;
}

// -- sequences (the composite rules of KVCacheISWA and HybridMemory, in their order) --------------

bool attn_seq_rm(llmem_memory & m, int32_t seq, int32_t p0, int32_t p1) {
    const bool a = m.base->seq_rm(seq, p0, p1);
    if (m.swa == nullptr) {
        return a;
    }
    const bool b = m.swa->seq_rm(seq, p0, p1);
    return a && b;
}

void attn_seq_cp(llmem_memory & m, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    if (m.swa != nullptr) {
        // KVCacheISWA._validate_pair: every refusal before the base changes
        for (kv_cache * c : { m.swa, m.base }) {
            c->seq_pos_max(src);
            c->seq_pos_max(dst);
            if (dst >= c->n_seq_max()) {
                fail(LLMEM_ERR_INVALID, "seq_cp: destination seq_id " + std::to_string(dst) +
                                            " is not below n_seq_max " + std::to_string(c->n_seq_max()));
            }
            if (c->n_stream() > 1 && src != dst) {
                const int64_t last = int64_t(c->size()) - 1;
                if ((0 < p0 && p0 < last) || (0 < p1 && p1 < last)) {
                    fail(LLMEM_ERR_INVALID, "seq_cp across streams copies whole streams only: p0 and p1 must be "
                                            "<= 0 or >= kv_size - 1 (" + std::to_string(last) + "), got [" +
                                                std::to_string(p0) + ", " + std::to_string(p1) + ")");
                }
            }
        }
    }
    m.base->seq_cp(src, dst, p0, p1);
    if (m.swa != nullptr) {
        m.swa->seq_cp(src, dst, p0, p1);
    }
}

template <typename F>
void each_cache(llmem_memory & m, F && f) {
    f(*m.base);
    if (m.swa != nullptr) {
        f(*m.swa);
    }
}

int clear(llmem_memory * mp, int data, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        if (m.has_kv()) {
            each_cache(m, [&](kv_cache & c) { c.clear(data != 0); });
        }
        if (m.recr) {
            m.recr->clear(data != 0);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

int seq_rm(llmem_memory * mp, int32_t seq, int32_t p0, int32_t p1, int * removed, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        bool           r = true;
        if (m.recr) {
            // the recurrent side decides first: a refusal changes nothing
            r = m.recr->seq_rm(seq, p0, p1);
            if (r && m.has_kv()) {
                r = attn_seq_rm(m, seq, p0, p1);
            }
        } else {
            r = attn_seq_rm(m, seq, p0, p1);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        if (removed) {
            *removed = r ? 1 : 0;
        }
        return LLMEM_OK;
    });
}

int seq_cp(llmem_memory * mp, int32_t src, int32_t dst, int32_t p0, int32_t p1, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        if (m.has_kv()) {
            attn_seq_cp(m, src, dst, p0, p1);
        }
        if (m.recr) {
            m.recr->seq_cp(src, dst, p0, p1);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

int seq_keep(llmem_memory * mp, int32_t seq, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        if (m.has_kv()) {
            each_cache(m, [&](kv_cache & c) { c.seq_keep(seq); });
        }
        if (m.recr) {
            m.recr->seq_keep(seq);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

int seq_add(llmem_memory * mp, int32_t seq, int32_t p0, int32_t p1, int32_t shift, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        if (m.has_kv() && m.recr) {
            // HybridMemory.seq_add: the recurrent side's overflow refusal before either changes
            const int32_t pos = m.recr->seq_pos_min(seq);
            const int64_t lo = p0 >= 0 ? p0 : 0, hi = p1 >= 0 ? p1 : std::numeric_limits<int32_t>::max();
            const int64_t moved = int64_t(pos) + shift;
            if (shift != 0 && pos != -1 && lo <= pos && pos < hi &&
                (moved < std::numeric_limits<int32_t>::min() || moved > std::numeric_limits<int32_t>::max())) {
                fail(LLMEM_ERR_INVALID, "seq_add: position " + std::to_string(pos) + " + " + std::to_string(shift) +
                                            " of sequence " + std::to_string(seq) + " overflows int32");
            }
        }
        if (m.has_kv()) {
            each_cache(m, [&](kv_cache & c) { c.seq_add(seq, p0, p1, shift); });
        }
        if (m.recr) {
            m.recr->seq_add(seq, p0, p1, shift);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

int seq_div(llmem_memory * mp, int32_t seq, int32_t p0, int32_t p1, int32_t d, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        if (m.has_kv() && m.recr && d < 1) {
            fail(LLMEM_ERR_INVALID, "seq_div: divisor must be >= 1, got " + std::to_string(d));
        }
        if (m.has_kv()) {
            each_cache(m, [&](kv_cache & c) { c.seq_div(seq, p0, p1, d); });
        }
        if (m.recr) {
            m.recr->seq_div(seq, p0, p1, d);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

int seq_pos_min(llmem_memory * mp, int32_t seq, int32_t * out, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        // a plain KV cache directly: the position queries are a server's most frequent calls
        const int32_t  p = m.info.kind == LLMEM_KIND_KV ? m.base->kv_cache::seq_pos_min(seq) : m.positions->seq_pos_min(seq);
        if (out) *out = p;
        return LLMEM_OK;
    });
}

int seq_pos_max(llmem_memory * mp, int32_t seq, int32_t * out, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        // a plain KV cache directly: the position queries are a server's most frequent calls
        const int32_t  p = m.info.kind == LLMEM_KIND_KV ? m.base->kv_cache::seq_pos_max(seq) : m.positions->seq_pos_max(seq);
        if (out) *out = p;
        return LLMEM_OK;
    });
}

int update(llmem_memory * mp, int * applied, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        bool           pending = false;
        if (m.has_kv()) {
            each_cache(m, [&](kv_cache & c) { pending = pending || c.update_pending(); });
        }
        if (applied) *applied = pending ? 1 : 0;
        if (!pending) {
            return LLMEM_OK;
        }
        // KVUpdateContext.apply: every cache checked first, so a refused shift changes none
        each_cache(m, [&](kv_cache & c) {
            if (c.get_has_shift() && !c.params().rope.enabled) {
                fail(LLMEM_ERR_FAILED, "cannot apply a K-shift: positions were shifted (seq_add/seq_div) but the "
                                       "cache was built without rope=...");
            }
        });
        each_cache(m, [&](kv_cache & c) { c.update(); });
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

// -- batches ------------------------------------------------------------------------------------

void fill_batch(llmem::batch & b, const llmem_batch & in) {
    if (in.n_tokens == 0) {
        fail(LLMEM_ERR_BATCH, "EMPTY: the batch has no tokens");
    }
    const size_t n = in.n_tokens;
    b.n_tokens = in.n_tokens;
    if (in.token) b.token.assign(in.token, in.token + n); else b.token.clear();
    if (in.embd) {
        if (in.n_embd == 0) {
            fail(LLMEM_ERR_INVALID, "embd rows must have at least one value (n_embd = 0)");
        }
        b.embd.assign(in.embd, in.embd + n * in.n_embd);
        b.n_embd = in.n_embd;
    } else {
        b.embd.clear();
        b.n_embd = 0;
    }
    if (in.pos) b.pos.assign(in.pos, in.pos + n); else b.pos.clear();
    if (in.output) b.output.assign(in.output, in.output + n); else b.output.clear();
    b.seq_id_off.clear();
    b.seq_id.clear();
    if (in.seq_id) {
        b.seq_id_off.resize(n + 1);
        b.seq_id_off[0] = 0;
        size_t total = 0;
        for (size_t i = 0; i < n; ++i) {
            const int32_t k = in.n_seq_id ? in.n_seq_id[i] : 1;
            if (k < 0) {
                fail(LLMEM_ERR_INVALID, "n_seq_id[" + std::to_string(i) + "] = " + std::to_string(k) + " is negative");
            }
            total += size_t(k);
            if (total > size_t(std::numeric_limits<int32_t>::max())) {
                fail(LLMEM_ERR_INVALID, "too many sequence ids in the batch");
            }
            b.seq_id_off[i + 1] = int32_t(total);
        }
        b.seq_id.assign(in.seq_id, in.seq_id + total);
    }
}

// Plan the batch in m.balloc (validated) for the memory's kind, as the Python init_batch does.
std::unique_ptr<llmem_context> plan(llmem_memory & m, uint32_t n_ubatch, bool embd_all) {
    auto ctx = std::make_unique<llmem_context>();
    ctx->mem = &m;
    llmem::batch_allocr & balloc = *m.balloc;
    switch (m.info.kind) {
    case LLMEM_KIND_KV: {
        llmem::kv_context c = llmem::kv_init_batch(*m.base, balloc, n_ubatch);
        ctx->status = c.status();
        ctx->n      = c.n_ubatches();
        ctx->base.emplace(std::move(c));
        break;
    }
    case LLMEM_KIND_KV_ISWA: {
        auto p      = llmem::kv_iswa_init_batch(*m.base, *m.swa, balloc, n_ubatch);
        ctx->status = llmem::status_combine(p.first.status(), p.second.status());
        ctx->n      = p.first.n_ubatches();
        ctx->base.emplace(std::move(p.first));
        ctx->swa.emplace(std::move(p.second));
        break;
    }
    case LLMEM_KIND_RECURRENT:
        ctx->recr   = m.recr->init_batch(balloc, n_ubatch, embd_all);
        ctx->status = ctx->recr->status();
        ctx->n      = ctx->recr->n_ubatches();
        break;
    default: {
        llmem::hybrid_plan p = llmem::hybrid_prepare(balloc, n_ubatch, embd_all, *m.base, m.swa, *m.recr);
        ctx->status = p.status;
        if (p.status == memory_status::SUCCESS) {
            ctx->n    = p.ubatches.size();
            ctx->recr = std::make_unique<llmem::rs_context>(m.recr, p.ubatches);
            if (m.swa != nullptr) {
                ctx->swa.emplace(*m.swa, std::move(p.slots_swa), p.ubatches);
            }
            ctx->base.emplace(*m.base, std::move(p.slots_base), std::move(p.ubatches));
        }
        break;
    }
    }
    ctx->epoch = m.lock->epoch;
    return ctx;
}

void check_fresh(const llmem_context & c, const char * what) {
    if (c.epoch != c.mem->lock->epoch) {
        fail(LLMEM_ERR_STALE, std::string(what) +
                                  ": the memory changed after this context was planned (a C call changed it, or a "
                                  "Python call took memory.lock since); nothing was changed. Hold the lock from "
                                  "init_batch to the last apply when several threads share the memory");
    }
}

void apply_locked(llmem_context & c) {
    if (c.status != memory_status::SUCCESS) {
        fail(LLMEM_ERR_FAILED, std::string("cannot apply a context whose status is ") + llmem::status_name(c.status));
    }
    check_fresh(c, "apply");
    memory_lock_state & s = *c.mem->lock;
    // whatever part applies counts as a change, also when a later part refuses
    struct mark {
        memory_lock_state & s;
        bool                changed = false;
        ~mark() {
            if (changed) llmem::capi::memory_lock_changed(s);
        }
    } changed{ s };
    if (c.base) {
        changed.changed = true;
        c.base->apply();
    }
    if (c.swa) {
        c.swa->apply();
    }
    if (c.recr) {
        changed.changed = true;
        c.recr->apply();
    }
    c.epoch = s.epoch + 1;  // the mark's change is this context's own
}

int init_batch(llmem_memory * mp, const llmem_batch * batch, uint32_t n_ubatch, int embd_all, llmem_context ** out,
               int32_t * status, char * err, size_t len) {
    if (out) *out = nullptr;
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        if (batch == nullptr || out == nullptr) {
            fail(LLMEM_ERR_INVALID, "init_batch needs a batch and an output pointer");
        }
        if (n_ubatch == 0) {
            fail(LLMEM_ERR_INVALID, "n_ubatch must be positive, got 0");
        }
        held h(*m.lock);
        fill_batch(m.batch, *batch);
        m.balloc->init(m.batch, m.positions, false);
        std::unique_ptr<llmem_context> ctx = plan(m, n_ubatch, embd_all != 0);
        if (status) *status = int32_t(ctx->status);
        if (ctx->status == memory_status::SUCCESS) {
            *out = ctx.release();
        }
        return LLMEM_OK;
    });
}

const llmem::ubatch & current_ubatch(const llmem_context & c) {
    if (c.status != memory_status::SUCCESS || c.i >= c.n) {
        fail(LLMEM_ERR_FAILED, "this context has no current micro-batch");
    }
    return c.base ? c.base->get_ubatch() : c.recr->get_ubatch();
}

int64_t k_row(const kv_cache & cache, const llmem::slot_info & s, size_t t) {
    const uint32_t g = s.n_per_group ? uint32_t(t / s.n_per_group) : 0;
    return int64_t(s.strm[g]) * cache.size() + s.idxs[t];
}

// The decode step of a KV or iSWA cache through the compiled one-call step that
// KVCache.decode_step runs (kv_attention.h): no batch allocator, the same decisions. Taken when
// the step is one micro-batch (n_ubatch 0 or >= n; ascending consecutive ids with per-sequence
// streams) and the arguments are ones the allocator accepts (ids in range, tokens >= 0): other
// calls take the general path, whose allocator reports what is wrong. Returns whether it ran
// (the lock is held and the ids are distinct).
bool decode_step_compiled(llmem_memory & m, const int32_t * seq_ids, const int32_t * token, uint32_t n,
                          uint32_t n_ubatch, llmem_step * out, int64_t * k_idxs, int32_t * pos,
                          llmem_context ** ctx_out) {
    if ((m.info.kind != LLMEM_KIND_KV && m.info.kind != LLMEM_KIND_KV_ISWA) || (n_ubatch != 0 && n_ubatch < n) ||
        !llmem::decode_step_is_one_ubatch(m.info.n_stream, seq_ids, n)) {
        return false;
    }
    for (uint32_t i = 0; i < n; ++i) {
        if (seq_ids[i] < 0 || seq_ids[i] >= m.info.n_seq_max || (token != nullptr && token[i] < 0)) {
            return false;
        }
    }
    if (token == nullptr) {  // as the general path: token ids 0
        m.batch.token.assign(n, 0);
        token = m.batch.token.data();
    }
    std::optional<llmem::kv_context> base, swa;
    if (m.swa == nullptr) {
        base.emplace(llmem::kv_decode_step(*m.base, *m.base, seq_ids, n, token));
    } else {
        auto p = llmem::kv_iswa_decode_step(*m.base, *m.swa, seq_ids, n, token);
        base.emplace(std::move(p.first));
        swa.emplace(std::move(p.second));
    }
    *out        = llmem_step{};
    out->status = int32_t(base->status());
    if (base->status() != memory_status::SUCCESS) {
        return true;  // no room: nothing changed
    }
    llmem::capi::memory_lock_changed(*m.lock);
    out->n_ubatches = 1;
    out->n_kv       = base->n_kv();
    out->n_kv_swa   = swa ? swa->n_kv() : 0;
    if (pos) {
        const llmem::ubatch & ub = base->get_ubatch();  // one token per sequence, in input order
        std::copy(ub.data->pos.begin(), ub.data->pos.begin() + n, pos);
    }
    if (k_idxs) {
        llmem::kv_k_idxs(*m.base, base->get_slot(), k_idxs);
    }
    if (ctx_out) {
        auto ctx    = std::make_unique<llmem_context>();
        ctx->mem    = &m;
        ctx->status = memory_status::SUCCESS;
        ctx->n      = 1;
        ctx->base   = std::move(base);
        ctx->swa    = std::move(swa);
        ctx->epoch  = m.lock->epoch;  // its own change, as apply_locked leaves it
        *ctx_out    = ctx.release();
    }
    return true;
}

int decode_step(llmem_memory * mp, const int32_t * seq_ids, const int32_t * token, uint32_t n, uint32_t n_ubatch,
                llmem_step * out, int64_t * k_idxs, int32_t * pos, llmem_context ** ctx_out, char * err, size_t len) {
    if (ctx_out) *ctx_out = nullptr;
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        if (seq_ids == nullptr || out == nullptr) {
            fail(LLMEM_ERR_INVALID, "decode_step needs seq_ids and an output struct");
        }
        if (n == 0) {
            fail(LLMEM_ERR_INVALID, "decode_step needs at least one sequence");
        }
        held h(*m.lock);
        // the decode shape: each sequence once (a repeat would be a two-token prompt step)
        if (++m.stamp == 0) {
            std::fill(m.seen.begin(), m.seen.end(), 0);
            m.stamp = 1;
        }
        for (uint32_t i = 0; i < n; ++i) {
            const int32_t s = seq_ids[i];
            if (s >= 0 && s < m.info.n_seq_max) {
                if (m.seen[size_t(s)] == m.stamp) {
                    fail(LLMEM_ERR_INVALID, "decode_step: seq_id " + std::to_string(s) +
                                                " appears twice (one token per sequence)");
                }
                m.seen[size_t(s)] = m.stamp;
            }
        }
        if (decode_step_compiled(m, seq_ids, token, n, n_ubatch, out, k_idxs, pos, ctx_out)) {
            return LLMEM_OK;
        }
        llmem::batch & b = m.batch;
        b.n_tokens = n;
        if (token) b.token.assign(token, token + n); else b.token.assign(n, 0);
        b.embd.clear();
        b.n_embd = 0;
        b.pos.clear();
        b.seq_id.assign(seq_ids, seq_ids + n);
        b.seq_id_off.resize(size_t(n) + 1);
        for (uint32_t i = 0; i <= n; ++i) {
            b.seq_id_off[i] = int32_t(i);
        }
        b.output.assign(n, 1);
        m.balloc->init(b, m.positions, false);
        if (n_ubatch == 0) {
            // every sequence in one micro-batch; a recurrent split keeps n_rs_seq + 1 tokens of a
            // sequence together and needs a larger n_ubatch than that
            n_ubatch = std::max(n, m.info.n_rs_seq + 2);
        }
        std::unique_ptr<llmem_context> ctx = plan(m, n_ubatch, false);
        *out        = llmem_step{};
        out->status = int32_t(ctx->status);
        if (ctx->status != memory_status::SUCCESS) {
            return LLMEM_OK;
        }
        out->n_ubatches = uint32_t(ctx->n);
        apply_locked(*ctx);
        out->n_kv     = ctx->base ? ctx->base->n_kv() : 0;
        out->n_kv_swa = ctx->swa ? ctx->swa->n_kv() : 0;
        if (k_idxs || pos) {
            // every micro-batch's tokens: the cells planned for the later ones are those their
            // apply takes (apply refuses a plan whose cells are no longer free)
            if (pos) {
                for (uint32_t i = 0; i < n; ++i) {
                    pos[i] = m.balloc->batch_pos_min(seq_ids[i]);  // one token per sequence
                }
            }
            if (k_idxs) {
                std::fill(k_idxs, k_idxs + n, int64_t(-1));
                if (ctx->base) {
                    const std::vector<llmem::ubatch> & ubs = ctx->base->ubatches();
                    for (size_t j = 0; j < ubs.size(); ++j) {
                        for (uint32_t k = 0; k < ubs[j].n_tokens; ++k) {
                            k_idxs[ubs[j].data->batch_idx[k]] = k_row(*m.base, ctx->base->slots()[j], k);
                        }
                    }
                }
            }
        }
        if (ctx_out) {
            *ctx_out = ctx.release();
        }
        return LLMEM_OK;
    });
}

// -- contexts -----------------------------------------------------------------------------------

int ctx_status(const llmem_context * c) { return c ? int(c->status) : LLMEM_STATUS_FAILED_PREPARE; }

uint32_t ctx_n_ubatches(const llmem_context * c) { return c ? uint32_t(c->n) : 0; }

int ctx_apply(llmem_context * cp, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        apply_locked(c);
        return LLMEM_OK;
    });
}

int ctx_next(llmem_context * cp, int * more, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        if (c.status != memory_status::SUCCESS) {
            fail(LLMEM_ERR_FAILED, "this context failed to prepare: it has no micro-batches");
        }
        if (c.base) c.base->next();
        if (c.swa) c.swa->next();
        if (c.recr) c.recr->next();
        if (c.i < c.n) ++c.i;
        if (more) *more = c.i < c.n ? 1 : 0;
        return LLMEM_OK;
    });
}

int ctx_ubatch(const llmem_context * cp, llmem_ubatch * out, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context &       c  = checked(const_cast<llmem_context *>(cp));
        const llmem::ubatch & ub = current_ubatch(c);
        if (out == nullptr) {
            fail(LLMEM_ERR_INVALID, "ctx_ubatch needs an output struct");
        }
        if (c.primary_at != c.i) {
            c.primary.resize(ub.n_tokens);
            for (uint32_t k = 0; k < ub.n_tokens; ++k) {
                c.primary[k] = ub.primary(k);
            }
            c.primary_at = c.i;
        }
        const llmem::ubatch_data & d = *ub.data;
        *out = llmem_ubatch{ ub.n_tokens, ub.n_seq_tokens, ub.n_seqs, ub.n_seqs_unq, ub.equal_seqs ? 1 : 0,
                             d.token.empty() ? nullptr : d.token.data(), d.pos.data(), c.primary.data(),
                             d.output.data(), d.batch_idx.data(), d.seq_id_unq.data() };
        return LLMEM_OK;
    });
}

llmem::kv_context & kv_part(llmem_context & c, int32_t part) {
    if (part == LLMEM_PART_BASE && c.base) {
        return *c.base;
    }
    if (part == LLMEM_PART_SWA && c.swa) {
        return *c.swa;
    }
    fail(LLMEM_ERR_INVALID, "this context has no KV part " + std::to_string(part));
}

const llmem::kv_context & applied_kv(llmem_context & c, int32_t part) {
    current_ubatch(c);
    llmem::kv_context & k = kv_part(c, part);
    if (k.n_kv() == 0) {
        fail(LLMEM_ERR_FAILED, "call apply() before reading the context's cells (n_kv is 0)");
    }
    return k;
}

int ctx_kv_slot(llmem_context * cp, int32_t part, llmem_kv_slot * slot, int64_t * k_idxs, size_t cap, char * err,
                size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        check_fresh(c, "ctx_kv_slot");
        const llmem::kv_context & k = applied_kv(c, part);
        const llmem::slot_info &  s = k.get_slot();
        const size_t              n = s.idxs.size();
        if (slot) {
            *slot = llmem_kv_slot{ uint32_t(n), k.n_kv(), n ? s.idxs[0] : 0u, s.s0(), s.s1() };
        }
        if (k_idxs) {
            if (cap < n) {
                fail(LLMEM_ERR_TOO_SMALL, "k_idxs holds " + std::to_string(cap) + " entries, the micro-batch has " +
                                              std::to_string(n) + " tokens");
            }
            for (size_t t = 0; t < n; ++t) {
                k_idxs[t] = k_row(*k.cache(), s, t);
            }
        }
        return LLMEM_OK;
    });
}

int ctx_kq_mask(llmem_context * cp, int32_t part, int causal, float * out, size_t cap, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        check_fresh(c, "ctx_kq_mask");
        const llmem::kv_context & k  = applied_kv(c, part);
        const llmem::ubatch &     ub = k.get_ubatch();
        const size_t              need = size_t(ub.n_tokens) * k.n_kv();
        if (out == nullptr || cap < need) {
            fail(LLMEM_ERR_TOO_SMALL, "the mask needs " + std::to_string(need) + " floats, the buffer holds " +
                                          std::to_string(out ? cap : 0));
        }
        k.cache()->kq_mask(k.get_slot(), ub, k.n_kv(), causal != 0, out);
        return LLMEM_OK;
    });
}

llmem::rs_context & rs_part(llmem_context & c) {
    current_ubatch(c);
    if (!c.recr) {
        fail(LLMEM_ERR_INVALID, "this context has no recurrent part");
    }
    return *c.recr;
}

int ctx_rs_slot(llmem_context * cp, llmem_rs_slot * slot, int32_t * s_copy, size_t cap, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        check_fresh(c, "ctx_rs_slot");
        llmem::rs_context & r = rs_part(c);
        if (slot) {
            *slot = llmem_rs_slot{ r.head(), r.n_rs(), r.rs_z(), r.get_ubatch().n_seqs };
        }
        if (s_copy) {
            const std::vector<int32_t> & copies = r.s_copy_all();
            if (cap < copies.size()) {
                fail(LLMEM_ERR_TOO_SMALL, "s_copy holds " + std::to_string(cap) + " entries, the slot has " +
                                              std::to_string(copies.size()) + " cells");
            }
            std::memcpy(s_copy, copies.data(), copies.size() * sizeof(int32_t));
        }
        return LLMEM_OK;
    });
}

int check_kind(int32_t kind) {
    if (kind < 0 || kind >= llmem::RS_KINDS) {
        fail(LLMEM_ERR_INVALID, "kind must be 0 (r), 1 (s) or 2 (p), got " + std::to_string(kind));
    }
    return kind;
}

int ctx_rs_gather(llmem_context * cp, int32_t kind, int32_t il, void * out, size_t cap, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        check_fresh(c, "ctx_rs_gather");
        llmem::rs_context & r     = rs_part(c);
        const size_t        layer = size_t(layer_of(c.mem->rs_layers, il, "recurrent state").index);
        const size_t        need  = size_t(r.row_bytes(check_kind(kind), layer)) * r.get_ubatch().n_seqs;
        if (out == nullptr || cap < need) {
            fail(LLMEM_ERR_TOO_SMALL, "gather needs " + std::to_string(need) + " bytes, the buffer holds " +
                                          std::to_string(out ? cap : 0));
        }
        r.gather(kind, layer, static_cast<uint8_t *>(out));
        return LLMEM_OK;
    });
}

int ctx_rs_store(llmem_context * cp, int32_t kind, int32_t il, const void * rows, size_t nbytes, uint32_t n_planes,
                 char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_context & c = checked(cp);
        held            h(*c.mem->lock);
        check_fresh(c, "ctx_rs_store");
        llmem::rs_context & r     = rs_part(c);
        const size_t        layer = size_t(layer_of(c.mem->rs_layers, il, "recurrent state").index);
        const uint32_t      max_planes = c.mem->recr->n_rs_seq() + 1;
        const size_t plane = size_t(r.row_bytes(check_kind(kind), layer)) * r.get_ubatch().n_seqs;
        if (n_planes < 1 || n_planes > max_planes) {
            fail(LLMEM_ERR_INVALID, "n_planes must be in [1, " + std::to_string(max_planes) + "], got " +
                                        std::to_string(n_planes));
        }
        if (rows == nullptr || nbytes != plane * n_planes) {
            fail(LLMEM_ERR_INVALID, "store needs " + std::to_string(plane * n_planes) + " bytes (" +
                                        std::to_string(n_planes) + " planes of n_seqs rows), got " +
                                        std::to_string(rows ? nbytes : 0));
        }
        r.store(kind, layer, static_cast<const uint8_t *>(rows), n_planes);
        return LLMEM_OK;
    });
}

void ctx_free(llmem_context * c) {
    if (c == nullptr) {
        return;
    }
    // a KV context gives its plan storage back to its cache: under the lock
    memory_lock_state & s = *c->mem->lock;
    llmem::capi::memory_lock_acquire(s);
    delete c;
    llmem::capi::memory_lock_release_held(s);
}

// -- state bytes --------------------------------------------------------------------------------

constexpr uint32_t STATE_HEADER_FLAG = 1u << 31;

// The attention sections a state call covers, in state order (Memory._state_parts / _attn_caches).
size_t attn_sections(const llmem_memory & m, uint32_t flags, kv_cache * out[2]) {
    if (!m.has_kv()) {
        return 0;
    }
    const bool partial = (flags & LLMEM_STATE_PARTIAL_ONLY) != 0;
    switch (m.info.kind) {
    case LLMEM_KIND_KV:
        out[0] = m.base;  // a KV cache alone ignores PARTIAL_ONLY, as KVCache.state_write
        return 1;
    case LLMEM_KIND_HYBRID:
        if (partial) return 0;
        out[0] = m.base;
        return 1;
    default:  // iSWA kinds
        if (partial) {
            out[0] = m.swa;
            return 1;
        }
        out[0] = m.base;
        out[1] = m.swa;
        return 2;
    }
}

void check_flags(uint32_t flags) {
    if (flags & STATE_HEADER_FLAG) {
        fail(LLMEM_ERR_INVALID, "STATE_HEADER is a Python-side flag (Memory.save/load); the C API reads and writes "
                                "llama.cpp's raw bytes");
    }
}

size_t size_locked(llmem_memory & m, int32_t seq, uint32_t flags) {
    check_flags(flags);
    kv_cache * caches[2];
    size_t     total = 0;
    for (size_t i = 0, n = attn_sections(m, flags, caches); i < n; ++i) {
        total += caches[i]->state_write_size(seq);
    }
    if (m.recr) {
        total += m.recr->state_write_size(seq, flags);
    }
    return total;
}

int state_size(llmem_memory * mp, int32_t seq, uint32_t flags, size_t * out, char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        const size_t   n = size_locked(m, seq, flags);
        if (out) *out = n;
        return LLMEM_OK;
    });
}

int state_write_into(llmem_memory * mp, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap, size_t * written,
                     char * err, size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        held           h(*m.lock);
        const size_t   need = size_locked(m, seq, flags);
        if (buf == nullptr || cap < need) {
            fail(LLMEM_ERR_TOO_SMALL, "buffer holds " + std::to_string(buf ? cap : 0) + " bytes, the state needs " +
                                          std::to_string(need));
        }
        kv_cache * caches[2];
        size_t     at = 0;
        for (size_t i = 0, n = attn_sections(m, flags, caches); i < n; ++i) {
            at += caches[i]->state_write_into(buf + at, cap - at, seq);
        }
        if (m.recr) {
            m.recr->state_write(buf + at, need - at, seq, flags);
        }
        if (written) *written = need;
        return LLMEM_OK;
    });
}

int state_read(llmem_memory * mp, int32_t seq, uint32_t flags, const uint8_t * data, size_t n, char * err,
               size_t len) {
    return guarded(err, len, [&] {
        llmem_memory & m = checked(mp);
        check_flags(flags);
        if (data == nullptr && n > 0) {
            fail(LLMEM_ERR_INVALID, "state_read: data is NULL");
        }
        static const uint8_t empty = 0;
        const uint8_t *      bytes = data ? data : &empty;
        held                 h(*m.lock);
        kv_cache *           caches[2];
        const size_t         n_caches = attn_sections(m, flags, caches);
        if (m.recr == nullptr) {
            llmem::kv_state_read_all(caches, n_caches, bytes, n, 0, seq, true);
        } else if (!m.has_kv()) {
            m.recr->state_read(bytes, n, seq, flags, true);
        } else {
            if (!(seq == -1 || (seq >= 0 && seq < m.info.n_seq_max))) {
                fail(LLMEM_ERR_INVALID, "seq_id must be -1 or in [0, " + std::to_string(m.info.n_seq_max) +
                                            "), got " + std::to_string(seq));
            }
            llmem::hybrid_state_read(std::vector<kv_cache *>(caches, caches + n_caches), *m.recr, bytes, n, seq,
                                     flags);
        }
        llmem::capi::memory_lock_changed(*m.lock);
        return LLMEM_OK;
    });
}

const llmem_capi table = {
    LLMEM_CAPI_VERSION,
    uint32_t(sizeof(llmem_capi)),
    LLMEM_VERSION,
    memory_get,
    memory_release,
    memory_info,
    layer_kv,
    layer_rs,
    lock,
    try_lock,
    unlock,
    clear,
    seq_rm,
    seq_cp,
    seq_keep,
    seq_add,
    seq_div,
    seq_pos_min,
    seq_pos_max,
    update,
    init_batch,
    decode_step,
    ctx_status,
    ctx_n_ubatches,
    ctx_apply,
    ctx_next,
    ctx_ubatch,
    ctx_kv_slot,
    ctx_kq_mask,
    ctx_rs_slot,
    ctx_rs_gather,
    ctx_rs_store,
    ctx_free,
    state_size,
    state_write_into,
    state_read,
};

} // namespace

namespace llmem::bind {

void register_core_timing(py::module_ & m);  // core_timing.cpp

void register_capi(py::module_ & m) {
    if (llmem::capi::add_memory_lock_type(m.ptr()) != 0) {
        throw py::error_already_set();
    }
    PyObject * capsule = PyCapsule_New(const_cast<llmem_capi *>(&table), LLMEM_CAPI_CAPSULE, nullptr);
    if (capsule == nullptr) {
        throw py::error_already_set();
    }
    m.attr("_C_API")             = py::reinterpret_steal<py::object>(capsule);
    m.attr("CAPI_VERSION")       = LLMEM_CAPI_VERSION;
    register_core_timing(m);
}

} // namespace llmem::bind
