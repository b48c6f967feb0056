// C++ timing of the decode step's attention metadata and of the one-call decode step (the
// companion of scripts/time_kv_attention.py, without Python). Not a test: prints the lowest
// per-call thread CPU time over several samples. Build against the core library of any build:
//
//   g++ -O2 -std=c++17 -Icsrc/include scripts/time_kv_attention_core.cpp
//       build/cp311-cp311-linux_x86_64/libllmem_core.a -o build/time_kv_attention_core  (one line)
//   build/time_kv_attention_core

#include "llmem/kv_attention.h"
#include "llmem/kv_cache.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <memory>
#include <vector>

using namespace llmem;

namespace {

double thread_us() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) * 1e6 + double(ts.tv_nsec) * 1e-3;
}

template <typename F> double best_us(F && f, int reps, int inner) {
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const double t0 = thread_us();
        for (int k = 0; k < inner; ++k) {
            f();
        }
        best = std::min(best, (thread_us() - t0) / inner);
    }
    return best;
}

kv_cache_params params(uint32_t size, int32_t n_seq, bool unified, swa_type swa = swa_type::NONE, uint32_t n_swa = 0) {
    kv_cache_params p;
    p.kv_size   = size;
    p.n_seq_max = n_seq;
    p.unified   = unified;
    p.swa       = swa;
    p.n_swa     = n_swa;
    p.layer_il  = { 0 };
    p.n_embd_k  = { 8 };
    p.n_embd_v  = { 8 };
    p.n_embd_v_max = 8;
    return p;
}

// Every sequence filled with (cells per sequence - free) tokens through decode steps of all
// sequences (for unified caches that interleaves them cell by cell, as a server's cache is).
std::unique_ptr<kv_cache> filled(uint32_t total, int32_t n_seq, bool unified, swa_type swa = swa_type::NONE,
                                 uint32_t n_swa = 0, uint32_t free_cells = 8) {
    const uint32_t per = total / uint32_t(n_seq);
    auto c = std::make_unique<kv_cache>(params(unified ? total : per, n_seq, unified, swa, n_swa));
    std::vector<int32_t> ids(static_cast<size_t>(n_seq));
    for (int32_t s = 0; s < n_seq; ++s) {
        ids[size_t(s)] = s;
    }
    for (uint32_t k = 0; k + free_cells < per; ++k) {
        kv_context ctx = kv_decode_step(*c, *c, ids.data(), uint32_t(n_seq), nullptr);
        if (ctx.status() != memory_status::SUCCESS) {
            std::fprintf(stderr, "fill failed\n");
            std::exit(1);
        }
    }
    return c;
}

void time_mask(const char * label, kv_cache & c, int32_t n_seq) {
    std::vector<int32_t> ids(static_cast<size_t>(n_seq));
    for (int32_t s = 0; s < n_seq; ++s) {
        ids[size_t(s)] = s;
    }
    kv_context          ctx = kv_decode_step(c, c, ids.data(), uint32_t(n_seq), nullptr);
    const kq_mask_shape sh  = kq_mask_shape_of(ctx.get_slot(), ctx.get_ubatch(), ctx.n_kv(), 1);
    std::vector<float>    m(sh.n_elements());
    std::vector<uint16_t> h(sh.n_elements());
    const int inner = int(std::max<size_t>(1, std::min<size_t>(1000, 4000000 / sh.n_elements())));
    const double f32 = best_us([&] { kq_mask_fill(c, ctx.get_slot(), ctx.get_ubatch(), ctx.n_kv(), true,
                                                  mask_type::F32, 1, m.data()); }, 7, inner);
    const double f16 = best_us([&] { kq_mask_fill(c, ctx.get_slot(), ctx.get_ubatch(), ctx.n_kv(), true,
                                                  mask_type::F16, 1, h.data()); }, 7, inner);
    const paged_kv_sizes ps = paged_kv_count(c, ctx.get_slot(), ctx.get_ubatch(), true);
    std::vector<int32_t> a(ps.n_tokens + 1), b(ps.n_tokens + 1), d(ps.n_seqs + 1), e(ps.n_tokens + 1),
        f(ps.n_seqs + 1), g(ps.n_pages), i(ps.n_seqs + 1), j(ps.n_tokens), k(ps.n_tokens);
    const double paged = best_us([&] {
        paged_kv_count(c, ctx.get_slot(), ctx.get_ubatch(), true);
        paged_kv_fill(c, ctx.get_slot(), ctx.get_ubatch(), true,
                      { a.data(), b.data(), d.data(), e.data(), f.data(), g.data(), i.data(), j.data(), k.data() });
    }, 7, inner);
    std::printf("%-40s n_kv %8u  mask f32 %9.1f us  f16 %9.1f us  paged %9.1f us (%zu pages)\n", label,
                ctx.n_kv(), f32, f16, paged, ps.n_pages);
}

void time_step(const char * label, kv_cache & c, int32_t n_seq) {
    std::vector<int32_t> ids(static_cast<size_t>(n_seq));
    for (int32_t s = 0; s < n_seq; ++s) {
        ids[size_t(s)] = s;
    }
    const int32_t base = c.seq_pos_max(0) + 1;
    double        best = 1e30;
    for (int r = 0; r < 20; ++r) {
        const double t0 = thread_us();
        for (int k = 0; k < 100; ++k) {
            kv_context ctx = kv_decode_step(c, c, ids.data(), uint32_t(n_seq), nullptr);
        }
        best = std::min(best, (thread_us() - t0) / 100);
        for (int32_t s = 0; s < n_seq; ++s) {
            c.seq_rm(s, base, -1);
        }
    }
    std::printf("%-40s decode_step %7.2f us\n", label, best);
}

} // namespace

int main() {
    const uint32_t K = 1u << 16, M = 1u << 20;
    struct mc { const char * label; uint32_t total; int32_t n; bool unified; };
    for (const mc & x : { mc{ "unified 64k cells, 1 seq", K, 1, true }, mc{ "unified 64k cells, 4 seqs", K, 4, true },
                          mc{ "unified 64k cells, 64 seqs", K, 64, true },
                          mc{ "streams 64k cells, 64 seqs", K, 64, false },
                          mc{ "streams 1M cells, 256 seqs", M, 256, false } }) {
        auto c = filled(x.total, x.n, x.unified);
        time_mask(x.label, *c, x.n);
    }
    for (const mc & x : { mc{ "unified 1M cells, 64 seqs", M, 64, true }, mc{ "unified 1M cells, 256 seqs", M, 256, true },
                          mc{ "streams 1M cells, 64 seqs", M, 64, false },
                          mc{ "streams 1M cells, 256 seqs", M, 256, false } }) {
        auto c = filled(x.total, x.n, x.unified, swa_type::NONE, 0, 120);
        time_step(x.label, *c, x.n);
    }
    return 0;
}
