#include "pybind.h"

#include "llmem/errors.h"
#include "llmem/hybrid.h"

#include <string>

namespace llmem::bind {

namespace {

// The recurrent memory's compiled class is private to its binding file; reach it through the
// base every memory shares.
llmem::rs_memory & as_recurrent(py::handle obj) {
    auto * base = obj.cast<llmem::seq_pos_source *>();
    auto * recr = dynamic_cast<llmem::rs_memory *>(base);
    if (recr == nullptr) {
        throw py::type_error("recr must be the compiled core of a RecurrentMemory");
    }
    return *recr;
}

const llmem::seq_pos_source & as_positions(py::handle obj, const char * name) {
    if (!py::isinstance<llmem::seq_pos_source>(obj)) {
        throw py::type_error(std::string(name) + " must be the compiled core of an llmem memory");
    }
    return *obj.cast<const llmem::seq_pos_source *>();
}

} // namespace

void register_hybrid(py::module_ & m) {
    py::class_<llmem::hybrid_positions, llmem::seq_pos_source>(
        m, "HybridPositions", "Positions of a hybrid memory: max of the minima, min of the maxima.")
        .def(py::init([](py::object attn, py::object recr) {
                 return std::make_unique<llmem::hybrid_positions>(as_positions(attn, "attn"), as_positions(recr, "recr"));
             }),
             py::arg("attn"), py::arg("recr"), py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
        .def("seq_pos_min", &llmem::hybrid_positions::seq_pos_min, py::arg("seq_id"))
        .def("seq_pos_max", &llmem::hybrid_positions::seq_pos_max, py::arg("seq_id"));

    m.def(
        "hybrid_init_batch",
        [](llmem::batch_allocr & balloc, int64_t n_ubatch, bool embd_all, llmem::kv_cache & base,
           llmem::kv_cache * swa, py::object recr_obj) -> py::tuple {
            const uint32_t     nub  = to_count(n_ubatch, "n_ubatch");
            llmem::rs_memory & recr = as_recurrent(recr_obj);
            llmem::hybrid_plan plan;
            {
                py::gil_scoped_release release;
                plan = llmem::hybrid_prepare(balloc, nub, embd_all, base, swa, recr);
            }
            const auto status = plan.status;
            if (status != llmem::memory_status::SUCCESS) {
                py::object failed_swa = swa ? py::cast(llmem::kv_context(status)) : py::object(py::none());
                return py::make_tuple(status, py::cast(llmem::kv_context(status)), failed_swa,
                                      owned_by(py::cast(llmem::rs_context(&recr, status)), recr_obj));
            }
            // Each context keeps its memory alive: a KV context hands its buffers back to its
            // cache when destroyed, and a garbage-collected cycle may free the cache first
            // (valgrind found that use-after-free while these contexts had no keep-alive).
            auto cache_object = [](llmem::kv_cache * c) { return py::cast(c, py::return_value_policy::reference); };
            llmem::rs_context recr_plan(&recr, plan.ubatches);
            py::object        recr_ctx = owned_by(py::cast(std::move(recr_plan)), recr_obj);
            py::object        swa_ctx  = py::none();
            if (swa != nullptr) {
                swa_ctx = owned_by(py::cast(llmem::kv_context(*swa, std::move(plan.slots_swa), plan.ubatches)),
                                   cache_object(swa));
            }
            llmem::kv_context base_plan(base, std::move(plan.slots_base), std::move(plan.ubatches));
            py::object        base_ctx = owned_by(py::cast(std::move(base_plan)), cache_object(&base));
            return py::make_tuple(status, base_ctx, swa_ctx, recr_ctx);
        },
        py::arg("balloc"), py::arg("n_ubatch"), py::arg("embd_all"), py::arg("base"), py::arg("swa"), py::arg("recr"),
        "Split once and prepare the recurrent memory and the attention cache(s): "
        "(status, base context, swa context or None, recurrent context).");

    m.def(
        "hybrid_state_read",
        [](const std::vector<llmem::kv_cache *> & caches, py::object recr_obj, py::buffer data, int64_t seq,
           int64_t flags) {
            llmem::rs_memory & recr = as_recurrent(recr_obj);
            py::buffer_info    info = data.request();
            if (info.ndim != 1 || info.itemsize != 1) {
                throw py::type_error("data must be a bytes-like object");
            }
            if (seq < -1 || seq > std::numeric_limits<int32_t>::max()) {
                throw py::value_error("seq_id must be -1 or a sequence id, got " + std::to_string(seq));
            }
            const auto * bytes = static_cast<const uint8_t *>(info.ptr);
            const size_t n     = size_t(info.size);
            py::gil_scoped_release release;
            return llmem::hybrid_state_read(caches, recr, bytes, n, int32_t(seq), uint32_t(flags));
        },
        py::arg("caches"), py::arg("recr"), py::arg("data"), py::arg("seq_id"), py::arg("flags"),
        "Read attention sections then the recurrent section, all or nothing (StateError).");
}

} // namespace llmem::bind
