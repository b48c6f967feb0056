#include "pybind.h"

#include "llmem/batch.h"
#include "llmem/errors.h"
#include "llmem/kv_cache.h"
#include "llmem/tensor_kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

namespace llmem::bind {

namespace {

int32_t to_i32(int64_t v, const char * name) {
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument(std::string(name) + " = " + std::to_string(v) + " does not fit in int32");
    }
    return int32_t(v);
}

std::vector<uint32_t> to_u32_list(const std::vector<int64_t> & v, const char * name) {
    std::vector<uint32_t> out;
    for (int64_t x : v) {
        out.push_back(to_count(x, name));
    }
    return out;
}

rope_params rope_from(py::handle obj) {
    rope_params r;
    if (obj.is_none()) {
        return r;
    }
    auto get = [&](const char * key, py::object dflt) -> py::object {
        return py::hasattr(obj, key) ? obj.attr(key) : dflt;
    };
    r.enabled     = true;
    r.n_rot       = to_count(get("n_rot", py::int_(0)).cast<int64_t>(), "rope.n_rot");
    py::object hd = get("head_dim", py::none());
    r.head_dim    = hd.is_none() ? r.n_rot : to_count(hd.cast<int64_t>(), "rope.head_dim");
    r.neox        = get("neox", py::bool_(false)).cast<bool>();
    r.freq_base   = get("freq_base", py::float_(10000.0)).cast<float>();
    r.freq_scale  = get("freq_scale", py::float_(1.0)).cast<float>();
    r.ext_factor  = get("ext_factor", py::float_(0.0)).cast<float>();
    r.attn_factor = get("attn_factor", py::float_(1.0)).cast<float>();
    r.beta_fast   = get("beta_fast", py::float_(32.0)).cast<float>();
    r.beta_slow   = get("beta_slow", py::float_(1.0)).cast<float>();
    r.n_ctx_orig  = to_count(get("n_ctx_orig", py::int_(0)).cast<int64_t>(), "rope.n_ctx_orig");
    return r;
}

// A C-contiguous, writeable numpy array of exactly `nbytes` bytes: its data pointer.
uint8_t * buffer_ptr(py::handle obj, size_t nbytes, const char * name) {
    if (!py::isinstance<py::array>(obj)) {
        throw py::type_error(std::string(name) + " must be a numpy array");
    }
    py::array a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(name) + " must be C-contiguous");
    }
    if (!a.writeable()) {
        throw std::invalid_argument(std::string(name) + " must be writeable");
    }
    if (size_t(a.nbytes()) != nbytes) {
        throw std::invalid_argument(std::string(name) + " has " + std::to_string(a.nbytes()) + " bytes, expected " +
                                    std::to_string(nbytes));
    }
    return static_cast<uint8_t *>(a.mutable_data());
}

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

// State bytes in a caller's buffer, not copied: C-contiguous 1-byte items, writable when the
// state is written into it (the checks and messages of llmem.memory.as_byte_view and
// as_writable_byte_view).
struct byte_view {
    Py_buffer view{};
    byte_view(py::handle obj, bool writable) {
        const char * name = writable ? "buffer" : "data";
        if (!writable && PyUnicode_Check(obj.ptr())) {
            throw py::type_error("data must be a bytes-like object, not str");
        }
        const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view, flags) != 0) {
            PyErr_Clear();
            Py_buffer probe{};
            if (writable && PyObject_GetBuffer(obj.ptr(), &probe, PyBUF_STRIDES | PyBUF_FORMAT) == 0) {
                const bool ro = probe.readonly != 0;
                PyBuffer_Release(&probe);
                throw py::type_error(std::string("buffer must be a writable, C-contiguous bytes-like object; ") +
                                     "got a " + (ro ? "read-only " : "non-contiguous ") + type_name(obj));
            }
            PyErr_Clear();
            throw py::type_error(std::string(name) +
                                 (writable ? " must be a writable bytes-like object, not "
                                           : " must be a C-contiguous bytes-like object, not ") +
                                 type_name(obj));
        }
        if (view.itemsize != 1) {
            const auto k = view.itemsize;
            PyBuffer_Release(&view);
            throw py::value_error(std::string(name) + " must be a bytes-like object (1-byte items), got items of " +
                                  std::to_string(k) + " bytes");
        }
    }
    ~byte_view() { PyBuffer_Release(&view); }
    byte_view(const byte_view &)             = delete;
    byte_view & operator=(const byte_view &) = delete;
    uint8_t * data() const { return static_cast<uint8_t *>(view.buf); }
    size_t    size() const { return size_t(view.len); }
};

std::vector<int64_t> k_idxs_of(const kv_cache & c, const slot_info & s) {
    std::vector<int64_t> out(s.idxs.size());
    const uint32_t       n = s.n_per_group;
    for (size_t t = 0; t < s.idxs.size(); ++t) {
        const uint32_t g = n ? uint32_t(t / n) : 0;
        out[t]           = int64_t(s.strm[g]) * c.size() + s.idxs[t];
    }
    return out;
}

const kv_context & ready(const kv_context & ctx) {
    if (ctx.status() != memory_status::SUCCESS || !ctx.cache()) {
        throw llmem::error("this KV context failed to prepare: it has no micro-batches");
    }
    return ctx;
}

} // namespace

void register_kv_cache(py::module_ & m) {
    // Registered before KVCache so that the signatures of init_batch/init_full name a Python type:
    // pybind11 crashed formatting the TypeError of a bad argument (kv.init_batch(b, 1.5)) while a
    // signature still held the unregistered C++ name.
    py::class_<kv_context> context_class(m, "KVContext", "A prepared plan of micro-batches for one KV cache.");

    py::class_<kv_cache, llmem::seq_pos_source>(m, "KVCache", R"doc(
The compiled KV cache (cells, slot search, sequence operations, masks, state bytes). The K/V bytes
live in numpy arrays registered with set_layer_buffers; use llmem.KVCache, which owns them.
)doc")
        .def(py::init([](int64_t kv_size, int64_t n_seq_max, bool unified, int64_t n_pad, int64_t n_swa,
                         int32_t swa, int64_t n_pos_per_embd, int32_t type_k, int32_t type_v, bool v_trans,
                         std::vector<int32_t> layer_il, std::vector<int64_t> n_embd_k,
                         std::vector<int64_t> n_embd_v, int64_t n_embd_v_max, py::object rope, int64_t n_rot_k,
                         int64_t n_rot_v, int64_t state_format, bool cell_tokens) {
                 kv_cache_params p;
                 p.kv_size        = to_count(kv_size, "kv_size");
                 p.n_seq_max      = to_i32(n_seq_max, "n_seq_max");
                 p.unified        = unified;
                 p.n_pad          = to_count(n_pad, "n_pad");
                 p.n_swa          = to_count(n_swa, "n_swa");
                 if (swa < 0 || swa > 3) {
                     throw std::invalid_argument("swa_type must be 0..3, got " + std::to_string(swa));
                 }
                 p.swa            = swa_type(swa);
                 p.n_pos_per_embd = to_count(n_pos_per_embd, "n_pos_per_embd");
                 p.type_k         = type_k;
                 p.type_v         = type_v;
                 p.v_trans        = v_trans;
                 p.layer_il       = std::move(layer_il);
                 p.n_embd_k       = to_u32_list(n_embd_k, "n_embd_k");
                 p.n_embd_v       = to_u32_list(n_embd_v, "n_embd_v");
                 p.n_embd_v_max   = to_count(n_embd_v_max, "n_embd_v_max");
                 p.rope           = rope_from(rope);
                 p.n_rot_k        = to_count(n_rot_k, "n_rot_k");
                 p.n_rot_v        = to_count(n_rot_v, "n_rot_v");
                 p.state_format   = to_count(state_format, "state_format");
                 p.cell_tokens    = cell_tokens;
                 return new kv_cache(p);
             }),
             py::arg("kv_size"), py::arg("n_seq_max") = 1, py::arg("unified") = true, py::arg("n_pad") = 1,
             py::arg("n_swa") = 0, py::arg("swa_type") = 0, py::arg("n_pos_per_embd") = 1,
             py::arg("type_k") = 1, py::arg("type_v") = 1, py::arg("v_trans") = true,
             py::arg("layer_il") = std::vector<int32_t>{}, py::arg("n_embd_k") = std::vector<int64_t>{},
             py::arg("n_embd_v") = std::vector<int64_t>{}, py::arg("n_embd_v_max") = 0,
             py::arg("rope") = py::none(), py::arg("n_rot_k") = 0, py::arg("n_rot_v") = 0,
             py::arg("state_format") = int64_t(KV_STATE_FORMAT_B11549), py::arg("cell_tokens") = false)
        .def("seq_pos_tok_le", &kv_cache::seq_pos_tok_le, py::arg("seq_id"), py::arg("pos"))
        .def_property_readonly("size", &kv_cache::size)
        .def_property_readonly("state_format", [](const kv_cache & c) { return c.params().state_format; })
        .def_property_readonly("n_rot_k", [](const kv_cache & c) { return c.params().n_rot_k; })
        .def_property_readonly("n_rot_v", [](const kv_cache & c) { return c.params().n_rot_v; })
        .def_property_readonly("n_stream", &kv_cache::n_stream)
        .def_property_readonly("n_seq_max", &kv_cache::n_seq_max)
        .def_property_readonly("n_seq_ids", &kv_cache::n_seq_ids)
        .def_property_readonly("n_layer", &kv_cache::n_layer)
        .def_property_readonly("used", &kv_cache::used_count)
        .def_property_readonly("n_embd_v_max", [](const kv_cache & c) { return c.params().n_embd_v_max; })
        .def_property_readonly("pending_copies", [](const kv_cache & c) { return c.pending_copies().size(); })
        .def("pending_copy_list",
             [](const kv_cache & c) {
                 py::list out;
                 for (const stream_copy & x : c.pending_copies()) {
                     out.append(py::make_tuple(x.src, x.dst));
                 }
                 return out;
             },
             "The whole-stream copies (src, dst) the next update() runs, in order.")
        .def_property_readonly("address", [](const kv_cache & c) { return reinterpret_cast<uintptr_t>(&c); },
                               "This cache's address: the owner column of collect_state_holes.")
        .def("head", [](const kv_cache & c, int64_t s) { return c.head(to_count(s, "stream")); }, py::arg("stream") = 0)
        .def("k_buffer_bytes", &kv_cache::k_buffer_bytes, py::arg("layer"))
        .def("v_buffer_bytes", &kv_cache::v_buffer_bytes, py::arg("layer"))
        .def("total_bytes", &kv_cache::total_bytes)
        .def("stats_counts",
             [](const kv_cache & c) {
                 py::list used;
                 for (uint32_t s = 0; s < c.n_stream(); ++s) {
                     used.append(c.used_in_stream(s));
                 }
                 return py::make_tuple(used, c.n_seqs_present(), c.counters().tokens_placed, c.counters().k_shifts);
             },
             "(cells used per stream, sequences holding cells, tokens placed, K-shifts) for stats().")
        .def("usable_in_stream", [](const kv_cache & c, int64_t s) { return c.usable_in_stream(to_count(s, "stream")); },
             py::arg("stream"), "Cells a slot search may take in `stream` now (empty, or out of every window).")
        .def("set_layer_buffers",
             [](kv_cache & c, int64_t l, py::handle k, py::handle v) {
                 const uint32_t layer = to_count(l, "layer");
                 if (layer >= c.n_layer()) {
                     throw std::invalid_argument("layer " + std::to_string(layer) + " out of range");
                 }
                 c.set_layer_buffers(layer, buffer_ptr(k, c.k_buffer_bytes(layer), "k"),
                                     buffer_ptr(v, c.v_buffer_bytes(layer), "v"));
             },
             py::arg("layer"), py::arg("k"), py::arg("v"), py::keep_alive<1, 3>(), py::keep_alive<1, 4>(),
             "Register the K and V arrays of cache layer `layer` (kept alive by the cache).")
        // sequence operations
        .def("clear", &kv_cache::clear, py::arg("data") = true, py::call_guard<py::gil_scoped_release>())
        .def("seq_rm",
             [](kv_cache & c, int64_t s, int64_t p0, int64_t p1) {
                 const int32_t a = to_i32(s, "seq_id"), b = to_i32(p0, "p0"), e = to_i32(p1, "p1");
                 py::gil_scoped_release r;
                 return c.seq_rm(a, b, e);
             },
             py::arg("seq_id"), py::arg("p0") = -1, py::arg("p1") = -1)
        .def("seq_cp",
             [](kv_cache & c, int64_t s, int64_t d, int64_t p0, int64_t p1) {
                 const int32_t a = to_i32(s, "seq_id_src"), b = to_i32(d, "seq_id_dst");
                 const int32_t x = to_i32(p0, "p0"), y = to_i32(p1, "p1");
                 py::gil_scoped_release r;
                 c.seq_cp(a, b, x, y);
             },
             py::arg("seq_id_src"), py::arg("seq_id_dst"), py::arg("p0") = -1, py::arg("p1") = -1)
        .def("seq_keep",
             [](kv_cache & c, int64_t s) {
                 const int32_t a = to_i32(s, "seq_id");
                 py::gil_scoped_release r;
                 c.seq_keep(a);
             },
             py::arg("seq_id"))
        .def("seq_add",
             [](kv_cache & c, int64_t s, int64_t p0, int64_t p1, int64_t d) {
                 const int32_t a = to_i32(s, "seq_id"), x = to_i32(p0, "p0"), y = to_i32(p1, "p1");
                 const int32_t z = to_i32(d, "shift");
                 py::gil_scoped_release r;
                 c.seq_add(a, x, y, z);
             },
             py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("shift"))
        .def("seq_div",
             [](kv_cache & c, int64_t s, int64_t p0, int64_t p1, int64_t d) {
                 const int32_t a = to_i32(s, "seq_id"), x = to_i32(p0, "p0"), y = to_i32(p1, "p1");
                 const int32_t z = to_i32(d, "d");
                 py::gil_scoped_release r;
                 c.seq_div(a, x, y, z);
             },
             py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("d"))
        // the same checks without the change: composite memories check every part first
        .def("check_seq_rm", [](const kv_cache & c, int64_t s) { c.check_seq_rm(to_i32(s, "seq_id")); },
             py::arg("seq_id"))
        .def("check_seq_cp",
             [](const kv_cache & c, int64_t s, int64_t d, int64_t p0, int64_t p1) {
                 c.check_seq_cp(to_i32(s, "seq_id_src"), to_i32(d, "seq_id_dst"), to_i32(p0, "p0"), to_i32(p1, "p1"));
             },
             py::arg("seq_id_src"), py::arg("seq_id_dst"), py::arg("p0") = -1, py::arg("p1") = -1)
        .def("check_seq_keep", [](const kv_cache & c, int64_t s) { c.check_seq_keep(to_i32(s, "seq_id")); },
             py::arg("seq_id"))
        .def("check_seq_add",
             [](const kv_cache & c, int64_t s, int64_t p0, int64_t p1, int64_t d) {
                 c.check_seq_add(to_i32(s, "seq_id"), to_i32(p0, "p0"), to_i32(p1, "p1"), to_i32(d, "shift"));
             },
             py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("shift"))
        .def("check_seq_div",
             [](const kv_cache & c, int64_t s, int64_t p0, int64_t p1, int64_t d) {
                 c.check_seq_div(to_i32(s, "seq_id"), to_i32(p0, "p0"), to_i32(p1, "p1"), to_i32(d, "d"));
             },
             py::arg("seq_id"), py::arg("p0"), py::arg("p1"), py::arg("d"))
        .def("seq_pos_min", [](const kv_cache & c, int64_t s) { return c.seq_pos_min(to_i32(s, "seq_id")); },
             py::arg("seq_id"))
        .def("seq_pos_max", [](const kv_cache & c, int64_t s) { return c.seq_pos_max(to_i32(s, "seq_id")); },
             py::arg("seq_id"))
        .def("get_can_shift", &kv_cache::get_can_shift)
        .def("get_has_shift", &kv_cache::get_has_shift)
        .def("update_pending", &kv_cache::update_pending)
        .def("update", &kv_cache::update, py::call_guard<py::gil_scoped_release>(),
             "Run pending stream copies and the K-shift on the registered K buffers.")
        // placement
        .def("init_batch",
             [](py::object self, batch_allocr & b, int64_t n_ubatch) {
                 kv_cache &     c = self.cast<kv_cache &>();
                 const uint32_t n = to_count(n_ubatch, "n_ubatch");
                 if (n == 0) {
                     throw std::invalid_argument("n_ubatch must be positive, got 0");
                 }
                 kv_context ctx(memory_status::FAILED_PREPARE);
                 {
                     py::gil_scoped_release r;
                     ctx = kv_init_batch(c, b, n);
                 }
                 return owned_by(py::cast(std::move(ctx)), self);
             },
             py::arg("balloc"), py::arg("n_ubatch"))
        .def("init_full",
             [](py::object self) { return owned_by(py::cast(kv_context::full(self.cast<kv_cache &>())), self); })
        .def("find_slot",
             [](const kv_cache & c, const ubatch & ub, bool cont) -> py::object {
                 if (ub.empty()) {
                     throw std::invalid_argument("cannot place an empty ubatch");
                 }
                 slot_info s;
                 if (!c.find_slot(ub, cont, s)) {
                     return py::none();
                 }
                 return py::cast(s.idxs);
             },
             py::arg("ubatch"), py::arg("cont") = false,
             "Cells the ubatch would take (None: no room); changes nothing.")
        .def("cells",
             [](const kv_cache & c, int64_t stream) {
                 const uint32_t s = to_count(stream, "stream");
                 if (s >= c.n_stream()) {
                     throw std::invalid_argument("stream " + std::to_string(s) + " out of range");
                 }
                 const kv_cells &     T = c.cells(s);
                 py::array_t<int32_t> pos(T.size()), shift(T.size()), n_seq(T.size());
                 std::vector<int32_t> ids;
                 auto                 P = pos.mutable_unchecked<1>(), S = shift.mutable_unchecked<1>();
                 auto                 N = n_seq.mutable_unchecked<1>();
                 for (uint32_t i = 0; i < T.size(); ++i) {
                     P(i)                  = T.pos_get(i);
                     S(i)                  = T.shift_get(i);
                     uint32_t        n     = 0;
                     const int32_t * l     = T.seq_list(i, n);
                     N(i)                  = int32_t(n);
                     ids.insert(ids.end(), l, l + n);
                 }
                 py::array_t<int32_t> seq_ids(py::ssize_t(ids.size()));
                 std::copy(ids.begin(), ids.end(), seq_ids.mutable_data());
                 py::dict d;
                 d["pos"]     = pos;
                 d["shift"]   = shift;
                 d["n_seq"]   = n_seq;
                 d["seq_ids"] = seq_ids;
                 d["head"]    = c.head(s);
                 d["used"]    = T.used_count();
                 return d;
             },
             py::arg("stream") = 0,
             "Copy of one stream's cells: pos, shift, n_seq (per cell) and seq_ids (concatenated).")
        .def("check_invariants",
             [](const kv_cache & c) {
                 for (uint32_t s = 0; s < c.n_stream(); ++s) {
                     if (!c.cells(s).check_invariants()) {
                         return false;
                     }
                 }
                 return true;
             })
        // state
        .def("state_write",
             [](const kv_cache & c, int64_t seq) {
                 const int32_t s = to_i32(seq, "seq_id");
                 // sized first, then written straight into the bytes object returned: no
                 // intermediate buffer to fault in and copy again
                 size_t n = 0;
                 {
                     py::gil_scoped_release r;
                     n = c.state_write_size(s);
                 }
                 PyObject * raw = PyBytes_FromStringAndSize(nullptr, py::ssize_t(n));
                 if (raw == nullptr) {
                     throw py::error_already_set();
                 }
                 py::bytes blob = py::reinterpret_steal<py::bytes>(raw);
                 uint8_t * dst  = reinterpret_cast<uint8_t *>(PyBytes_AS_STRING(raw));
                 {
                     py::gil_scoped_release r;
                     c.state_write(dst, n, s);
                 }
                 return blob;
             },
             py::arg("seq_id") = -1)
        .def("state_size",
             [](const kv_cache & c, int64_t seq) {
                 const int32_t s = to_i32(seq, "seq_id");
                 py::gil_scoped_release r;
                 return c.state_write_size(s);
             },
             py::arg("seq_id") = -1, "Bytes state_write(seq_id) returns now.")
        .def("state_write_into",
             [](const kv_cache & c, py::handle buffer, int64_t seq) {
                 const int32_t s = to_i32(seq, "seq_id");
                 byte_view     out(buffer, true);
                 py::gil_scoped_release r;
                 return c.state_write_into(out.data(), out.size(), s);  // ValueError when too small
             },
             py::arg("buffer"), py::arg("seq_id") = -1,
             "Write state_write(seq_id)'s bytes at the start of a writable buffer; returns their number "
             "(ValueError, nothing written, when the buffer is smaller).")
        .def("state_read",
             [](kv_cache & c, py::handle data, int64_t seq) {
                 const int32_t s = to_i32(seq, "seq_id");
                 byte_view     d(data, false);
                 py::gil_scoped_release r;
                 kv_cache * one = &c;
                 kv_state_read_all(&one, 1, d.data(), d.size(), 0, s, true);
             },
             py::arg("data"), py::arg("seq_id") = -1,
             "kv_state_read of this cache alone: the bytes of any buffer, read in place.")
        .def("state_clear", [](kv_cache & c, int64_t seq) { c.state_clear(to_i32(seq, "seq_id")); },
             py::arg("seq_id"));

    context_class
        .def_property_readonly("status", &kv_context::status)
        .def("next", &kv_context::next)
        .def("apply", &kv_context::apply)
        .def_property_readonly("n_kv", &kv_context::n_kv)
        .def_property_readonly("n_ubatches", &kv_context::n_ubatches)
        .def_property_readonly("i_cur", &kv_context::i_cur)
        .def_property_readonly("has_ubatch", &kv_context::has_ubatch)
        .def_property_readonly("applied", &kv_context::applied)
        .def_property_readonly("ubatch", [](const kv_context & ctx) { return ready(ctx).get_ubatch(); })
        .def_property_readonly("head",
                               [](const kv_context & ctx) {
                                   const slot_info & s = ready(ctx).get_slot();
                                   return s.idxs.empty() ? 0u : s.idxs[0];
                               })
        .def_property_readonly("s0", [](const kv_context & ctx) { return ready(ctx).get_slot().s0(); })
        .def_property_readonly("s1", [](const kv_context & ctx) { return ready(ctx).get_slot().s1(); })
        .def("slot_streams", [](const kv_context & ctx) { return ready(ctx).get_slot().strm; })
        .def("slot_cells",
             [](const kv_context & ctx) {
                 const auto & s = ready(ctx).get_slot();
                 py::array_t<uint32_t> a(py::ssize_t(s.idxs.size()));
                 std::copy(s.idxs.begin(), s.idxs.end(), a.mutable_data());
                 return a;
             })
        .def("k_idxs",
             [](const kv_context & ctx) {
                 const auto &        c = *ready(ctx).cache();
                 auto                v = k_idxs_of(c, ctx.get_slot());
                 py::array_t<int64_t> a(py::ssize_t(v.size()));
                 std::copy(v.begin(), v.end(), a.mutable_data());
                 return a;
             },
             "Global row of each token in the stacked [n_stream * kv_size] K rows.")
        .def("kq_mask",
             [](const kv_context & ctx, bool causal) {
                 const auto &       c  = *ready(ctx).cache();
                 const ubatch &     ub = ctx.get_ubatch();
                 const uint32_t     nk = ctx.n_kv();
                 if (nk == 0) {
                     throw llmem::error("kq_mask needs apply() first (n_kv is 0)");
                 }
                 py::array_t<float> a({ py::ssize_t(ub.n_tokens), py::ssize_t(nk) });
                 float *            out = a.mutable_data();
                 {
                     py::gil_scoped_release r;
                     c.kq_mask(ctx.get_slot(), ub, nk, causal, out);
                 }
                 return a;
             },
             py::arg("causal") = true)
        .def("kq_cells",
             [](const kv_context & ctx, bool causal) {
                 const auto &         c  = *ready(ctx).cache();
                 const ubatch &       ub = ctx.get_ubatch();
                 std::vector<int64_t> offs;
                 std::vector<int32_t> cells;
                 {
                     py::gil_scoped_release r;
                     c.kq_cells(ctx.get_slot(), ub, ctx.n_kv(), causal, offs, cells);
                 }
                 py::array_t<int64_t> o(py::ssize_t(offs.size()));
                 std::copy(offs.begin(), offs.end(), o.mutable_data());
                 py::array_t<int32_t> k(py::ssize_t(cells.size()));
                 std::copy(cells.begin(), cells.end(), k.mutable_data());
                 return py::make_tuple(o, k);
             },
             py::arg("causal") = true);

    m.def("kv_iswa_init_batch",
          [](kv_cache & base, kv_cache & swa, batch_allocr & b, int64_t n_ubatch) {
              const uint32_t n = to_count(n_ubatch, "n_ubatch");
              if (n == 0) {
                  throw std::invalid_argument("n_ubatch must be positive");
              }
              std::pair<kv_context, kv_context> p{ kv_context(memory_status::FAILED_PREPARE),
                                                   kv_context(memory_status::FAILED_PREPARE) };
              {
                  py::gil_scoped_release r;
                  p = kv_iswa_init_batch(base, swa, b, n);
              }
              py::object keep_base = py::cast(&base, py::return_value_policy::reference);
              py::object keep_swa  = py::cast(&swa, py::return_value_policy::reference);
              py::object a = py::cast(std::move(p.first));
              py::object z = py::cast(std::move(p.second));
              py::detail::keep_alive_impl(a, keep_base);
              py::detail::keep_alive_impl(z, keep_swa);
              return py::make_tuple(a, z);
          },
          py::arg("base"), py::arg("swa"), py::arg("balloc"), py::arg("n_ubatch"),
          "init_batch of an iSWA pair: (base context, swa context).");

    m.def("kv_state_read",
          [](std::vector<kv_cache *> caches, py::handle data, int64_t seq) {
              const int32_t s = to_i32(seq, "seq_id");
              byte_view     bv(data, false);
              for (kv_cache * c : caches) {
                  if (c == nullptr) {
                      throw py::type_error("caches must be KVCache objects");
                  }
              }
              py::gil_scoped_release r;
              kv_state_read_all(caches, bv.data(), bv.size(), 0, s, true);
          },
          py::arg("caches"), py::arg("data"), py::arg("seq_id") = -1,
          "Read consecutive KV sections into the caches, all or nothing (StateError on failure).");

    m.def("kv_state_read_partial",
          [](std::vector<kv_cache *> caches, py::handle data, int64_t offset, int64_t seq) {
              const int32_t s = to_i32(seq, "seq_id");
              byte_view     bv(data, false);
              if (offset < 0 || size_t(offset) > bv.size()) {
                  throw std::invalid_argument("offset out of range");
              }
              py::gil_scoped_release r;
              return kv_state_read_all(caches, bv.data(), bv.size(), size_t(offset), s, false);
          },
          py::arg("caches"), py::arg("data"), py::arg("offset"), py::arg("seq_id") = -1,
          "As kv_state_read from `offset`, allowing bytes after the sections; returns the end offset.");

    m.def("kv_scatter_v_trans",
          [](py::handle v_obj, py::handle vals_obj, py::array_t<int64_t, py::array::c_style> idx, int64_t size_,
             int64_t n_stream_) {
              if (!py::isinstance<py::array>(v_obj) || !py::isinstance<py::array>(vals_obj)) {
                  throw py::type_error("v and values must be numpy arrays");
              }
              py::array v    = py::reinterpret_borrow<py::array>(v_obj);
              py::array vals = py::reinterpret_borrow<py::array>(vals_obj);
              if (v.ndim() != 3 || !(v.flags() & py::array::c_style) || !v.writeable()) {
                  throw std::invalid_argument("v must be a writeable C-contiguous [n_stream, n_embd_v_max, kv_size] array");
              }
              if (vals.ndim() != 2 || !(vals.flags() & py::array::c_style) || !vals.dtype().is(v.dtype())) {
                  throw std::invalid_argument("values must be a C-contiguous [n_tokens, n_embd_v] array of V's dtype");
              }
              const size_t   es = size_t(v.itemsize());
              const uint32_t size = to_count(size_, "kv_size"), n_stream = to_count(n_stream_, "n_stream");
              const size_t   e_max = size_t(v.shape(1));
              const size_t   n = size_t(vals.shape(0)), ne = size_t(vals.shape(1));
              if (size_t(v.shape(0)) != n_stream || size_t(v.shape(2)) != size || ne > e_max ||
                  size_t(idx.size()) != n || (es != 2 && es != 4)) {
                  throw std::invalid_argument("kv_scatter_v_trans: shapes do not match");
              }
              const int64_t * ix = idx.data();
              for (size_t t = 0; t < n; ++t) {
                  if (ix[t] < 0 || ix[t] >= int64_t(n_stream) * size) {
                      throw std::invalid_argument("kv_scatter_v_trans: row index out of range");
                  }
              }
              uint8_t *       dst = static_cast<uint8_t *>(v.mutable_data());
              const uint8_t * src = static_cast<const uint8_t *>(vals.data());
              py::gil_scoped_release r;
              scatter_v_trans(dst, es, e_max, size, src, n, ne, ix);
          },
          py::arg("v"), py::arg("values"), py::arg("k_idxs"), py::arg("kv_size"), py::arg("n_stream"),
          "Write token rows into transposed V: v[s, j, c] = values[t, j] for row k_idxs[t] = s*kv_size + c.");

    m.def("kv_is_masked_swa",
          [](int64_t n_swa, int32_t type, int64_t p0, int64_t p1) {
              if (type < 0 || type > 3) {
                  throw std::invalid_argument("swa_type must be 0..3");
              }
              return is_masked_swa(to_count(n_swa, "n_swa"), swa_type(type), to_i32(p0, "p0"), to_i32(p1, "p1"));
          },
          py::arg("n_swa"), py::arg("swa_type"), py::arg("p0"), py::arg("p1"));
}

} // namespace llmem::bind
