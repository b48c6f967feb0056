// The pure C++ column of bench/bench_capi.py: the same calls the C API makes, on the compiled
// KV cache directly (no handle, no lock, no exception guard), timed in C++. It tells what the C
// API's own layer costs; it is not part of the C API.

#include "../bindings/pybind.h"

#include "llmem/kv_attention.h"
#include "llmem/kv_cache.h"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace llmem::bind {

namespace {

using clock_type = std::chrono::steady_clock;

double elapsed_ns(clock_type::time_point t0, size_t calls) {
    return std::chrono::duration<double, std::nano>(clock_type::now() - t0).count() / double(calls ? calls : 1);
}

} // namespace

void register_core_timing(py::module_ & m) {
    m.def(
        "_time_core",
        [](py::object memory, const std::string & op, std::vector<int32_t> seqs, std::vector<int32_t> p0,
           int64_t repeat) {
            kv_cache & c = *memory.attr("_core").cast<kv_cache *>();
            if (seqs.empty() || repeat < 1) {
                throw std::invalid_argument("_time_core needs sequences and repeat >= 1");
            }
            py::gil_scoped_release release;
            if (op == "seq_pos_max") {
                int64_t    acc = 0;
                const auto t0  = clock_type::now();
                for (int64_t i = 0; i < repeat; ++i) {
                    acc += c.seq_pos_max(seqs[size_t(i) % seqs.size()]);
                }
                const double ns = elapsed_ns(t0, size_t(repeat));
                return acc == -1 ? ns + 0.0 : ns;  // acc keeps the loop from being optimised away
            }
            if (op == "seq_rm_tail") {
                if (p0.size() != seqs.size()) {
                    throw std::invalid_argument("p0 must have one position per sequence");
                }
                const auto t0 = clock_type::now();
                for (size_t i = 0; i < seqs.size(); ++i) {
                    c.seq_rm(seqs[i], p0[i], -1);
                }
                return elapsed_ns(t0, seqs.size());
            }
            if (op == "decode_step") {
                // what llmem_capi.decode_step and KVCache.decode_step run: the compiled one-call
                // step (plan and apply without a batch allocator) and each token's K row
                const uint32_t       n = uint32_t(seqs.size());
                std::vector<int64_t> rows(n);
                const auto           t0 = clock_type::now();
                for (int64_t s = 0; s < repeat; ++s) {
                    kv_context ctx = kv_decode_step(c, c, seqs.data(), n, nullptr);
                    if (ctx.status() != memory_status::SUCCESS) {
                        throw std::runtime_error("_time_core: the cache is full");
                    }
                    kv_k_idxs(c, ctx.get_slot(), rows.data());
                }
                return elapsed_ns(t0, size_t(repeat));
            }
            throw std::invalid_argument("unknown op " + op);
        },
        py::arg("memory"), py::arg("op"), py::arg("seqs"), py::arg("p0") = std::vector<int32_t>{},
        py::arg("repeat") = 1,
        "Bench only: nanoseconds per call of op (seq_pos_max, seq_rm_tail, decode_step) on a KVCache's core.");
}

} // namespace llmem::bind
