#include "llmem/kv_attention.h"

#include "llmem/errors.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llmem {


namespace {

constexpr int32_t POS_MAX = std::numeric_limits<int32_t>::max();

// The positions a query at p1 of a token's sequence can see: [lo, hi], lo >= 0 (the cache holds
// positions >= 0 only). Empty when lo > hi. Equal to "not (causal and p0 > p1) and not
// is_masked_swa(p0, p1)" for every p0 >= 0 (spec 7.3/7.4).
struct pos_window {
    int32_t lo;
    int32_t hi;
};

pos_window window_of(uint32_t n_swa, swa_type type, bool causal, int32_t p1) {
    int64_t lo = 0;
    int64_t hi = causal ? int64_t(p1) : int64_t(POS_MAX);
    switch (type) {
        case swa_type::NONE:
            break;
        case swa_type::STANDARD:  // masked when p1 - p0 >= n_swa
            lo = int64_t(p1) - int64_t(n_swa) + 1;
            break;
        case swa_type::CHUNKED:   // masked below the start of p1's chunk (n_swa = 0 masks nothing: guarded)
            lo = n_swa ? (int64_t(p1) / n_swa) * n_swa : 0;
            break;
        case swa_type::SYMMETRIC: {
            const int64_t half = int64_t(n_swa / 2);
            lo = int64_t(p1) - half;
            hi = std::min(hi, int64_t(p1) + half);
            break;
        }
    }
    lo = std::max<int64_t>(lo, 0);
    hi = std::min<int64_t>(hi, POS_MAX);
    return { int32_t(lo), int32_t(hi) };
}

using index_it = std::vector<uint64_t>::const_iterator;

// First entry of the position-ordered index with position >= p.
index_it first_at_or_after(const std::vector<uint64_t> & ix, int64_t p) {
    if (p > POS_MAX) {
        return ix.end();
    }
    if (p <= std::numeric_limits<int32_t>::min()) {
        return ix.begin();
    }
    return std::lower_bound(ix.begin(), ix.end(), kv_cells::key(int32_t(p), 0));
}

// The entries of ix whose position lies in [lo, hi] (one contiguous range, as ix is ordered).
std::pair<index_it, index_it> range_of(const std::vector<uint64_t> & ix, int64_t lo, int64_t hi) {
    if (lo > hi) {
        return { ix.end(), ix.end() };
    }
    // positions are >= 0: a window from 0 starts at the beginning without a search
    index_it a = lo <= 0 ? ix.begin() : first_at_or_after(ix, lo);
    index_it b = hi >= POS_MAX ? ix.end() : first_at_or_after(ix, hi + 1);
    if (b < a) {
        b = a;
    }
    return { a, b };
}

// Per-token facts shared by the builders.
struct token_view {
    uint32_t         group;
    uint32_t         k;       // index within the group
    const kv_cells * cells;
    int32_t          seq;
    int32_t          p1;
};

struct ubatch_walk {
    const kv_cache & cache;
    const slot_info & slot;
    const ubatch &    ub;
    uint32_t          n;  // tokens per group

    ubatch_walk(const kv_cache & c, const slot_info & s, const ubatch & u)
        : cache(c), slot(s), ub(u), n(s.n_per_group ? s.n_per_group : u.n_tokens) {
        if (s.strm.empty() || u.n_tokens == 0 || !u.data) {
            throw error("no micro-batch placed: call apply() first");
        }
    }

    token_view at(uint32_t t) const {
        const uint32_t g = std::min<uint32_t>(t / n, uint32_t(slot.strm.size()) - 1);
        return { g, t - g * n, &cache.cells(slot.strm[g]), ub.primary(t), ub.pos(t) };
    }
};

// Rank of a sequence among the ubatch's distinct ids (ubatches built by hand may lack seq_idx).
inline int32_t rank_of(const ubatch & ub, int32_t s) {
    const int32_t r = ub.seq_idx(s);
    if (r >= 0) {
        return r;
    }
    const auto & unq = ub.data->seq_id_unq;
    const auto   it  = std::lower_bound(unq.begin(), unq.end(), s);
    if (it == unq.end() || *it != s) {
        throw std::invalid_argument("malformed ubatch: sequence " + std::to_string(s) + " is not in seq_id_unq");
    }
    return int32_t(it - unq.begin());
}

// Cells at p0 == p1 hidden from a 2-D (image) query by the cell's (y, x) coordinates.
inline bool hidden_2d(const kv_cells & T, uint32_t c, const ubatch & ub, uint32_t t) {
    const cell_ext e  = T.ext_get(c);
    const int32_t  x1 = ub.pos(2, t);
    const int32_t  y1 = ub.pos(1, t);
    return e.y > y1 || (e.y == y1 && e.x > x1);
}

template <typename T> struct mask_values;
template <> struct mask_values<float> {
    static float keep() { return 0.0f; }
    static float drop() { return -std::numeric_limits<float>::infinity(); }
};
template <> struct mask_values<uint16_t> {  // IEEE half bit patterns
    static uint16_t keep() { return 0x0000; }
    static uint16_t drop() { return 0xFC00; }
};

// A mask row is built as a bit row (bit c: the token attends cell c), n_kv bits that stay in the
// first-level cache, and written out once, expanded to the mask's element type.
class bit_row {
public:
    void reset(uint32_t n_kv) {
        n_kv_ = n_kv;
        w_.assign((size_t(n_kv) + 63) / 64, 0);
    }
    void clear() { std::fill(w_.begin(), w_.end(), 0); }
    void put(uint32_t c, bool on) {
        const uint64_t m = uint64_t(1) << (c & 63);
        w_[c >> 6]       = on ? (w_[c >> 6] | m) : (w_[c >> 6] & ~m);
    }
    // Set cells [c0, c1).
    void set_range(uint32_t c0, uint32_t c1) {
        while (c0 < c1 && (c0 & 63)) {
            put(c0++, true);
        }
        for (; c0 + 64 <= c1; c0 += 64) {
            w_[c0 >> 6] = ~uint64_t(0);
        }
        while (c0 < c1) {
            put(c0++, true);
        }
    }
    uint64_t *       words() { return w_.data(); }
    const uint64_t * words() const { return w_.data(); }
    uint32_t         n_kv() const { return n_kv_; }

private:
    std::vector<uint64_t> w_;
    uint32_t              n_kv_ = 0;
};

thread_local bit_row t_bits;

// Set (on) or clear the bits of the cells of index entries [a, b); `unchecked` when every cell of
// the stream lies below n_kv (n_kv >= used_max_p1), so no entry needs the bound check.
void set_range(bit_row & row, index_it a, index_it b, bool on, bool unchecked = false) {
    const uint32_t n_kv = row.n_kv();
    uint64_t *     w    = row.words();
    const size_t   n    = size_t(b - a);
    if (n == 0) {
        return;
    }
    const uint64_t * k = &*a;
    if (on && unchecked) {
        // Eight cells at a time: cells of a sequence come mostly in ascending order, so the eight
        // usually share a word, set with one store (setting them one by one chains every store
        // to the one before through the same word).
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint32_t c[8];
            uint64_t bits = 0;
            uint32_t diff = 0;
            for (int j = 0; j < 8; ++j) {
                c[j] = kv_cells::key_cell(k[i + size_t(j)]);
                bits |= uint64_t(1) << (c[j] & 63);
            }
            for (int j = 1; j < 8; ++j) {
                diff |= c[j] ^ c[0];
            }
            if ((diff >> 6) == 0) {
                w[c[0] >> 6] |= bits;
            } else {
                for (int j = 0; j < 8; ++j) {
                    w[c[j] >> 6] |= uint64_t(1) << (c[j] & 63);
                }
            }
        }
        for (; i < n; ++i) {
            const uint32_t c = kv_cells::key_cell(k[i]);
            w[c >> 6] |= uint64_t(1) << (c & 63);
        }
    } else if (on) {
        for (size_t i = 0; i < n; ++i) {
            const uint32_t c = kv_cells::key_cell(k[i]);
            if (c < n_kv) {
                w[c >> 6] |= uint64_t(1) << (c & 63);
            }
        }
    } else {
        for (size_t i = 0; i < n; ++i) {
            const uint32_t c = kv_cells::key_cell(k[i]);
            if (c < n_kv) {
                w[c >> 6] &= ~(uint64_t(1) << (c & 63));
            }
        }
    }
}

// A row from nothing: the window's range of the index; when the token's sequence holds every
// used cell of its stream and sees all of them, the used runs (no position read); when it holds
// every used cell and sees a large part, one pass over the positions.
void build_row(bit_row & row, const kv_cells & C, int32_t seq, pos_window w) {
    const uint32_t n_kv = row.n_kv();
    const auto &   ix   = C.seq_index(seq);
    auto [a, b] = range_of(ix, w.lo, w.hi);
    const size_t k        = size_t(b - a);
    const bool   owns_all = C.seq_n_cells(seq) == C.used_count();
    row.clear();
    if (owns_all && k == ix.size()) {
        for (uint32_t c0 = C.next_used(0); c0 < n_kv;) {
            const uint32_t c1 = std::min(C.next_empty(c0), n_kv);
            row.set_range(c0, c1);
            c0 = c1 < n_kv ? C.next_used(c1) : n_kv;
        }
        return;
    }
    if (k * 4 >= n_kv && owns_all) {
        // visible <=> the position is in the window (empty cells hold -1, below every lo)
        const uint32_t span = uint32_t(w.hi) - uint32_t(w.lo);
        uint64_t *     out  = row.words();
        for (uint32_t c0 = 0; c0 < n_kv; c0 += 64) {
            const uint32_t n    = std::min<uint32_t>(64, n_kv - c0);
            uint64_t       word = 0;
            for (uint32_t j = 0; j < n; ++j) {
                const uint32_t d = uint32_t(C.pos_get(c0 + j)) - uint32_t(w.lo);
                word |= uint64_t(d <= span) << j;
            }
            out[c0 >> 6] = word;
        }
        return;
    }
    set_range(row, a, b, true, n_kv >= C.used_max_p1());
}

// Turn the row of window `from` into the row of window `to` (same sequence, same stream): only
// the cells whose positions lie in one window and not the other change.
void move_row(bit_row & row, const std::vector<uint64_t> & ix, pos_window from, pos_window to) {
    auto minus = [&](pos_window x, pos_window y, bool on) {  // cells of x \ y
        if (x.lo > x.hi) {
            return;
        }
        if (y.lo > y.hi) {
            auto r = range_of(ix, x.lo, x.hi);
            set_range(row, r.first, r.second, on);
            return;
        }
        auto left = range_of(ix, x.lo, std::min<int64_t>(x.hi, int64_t(y.lo) - 1));
        set_range(row, left.first, left.second, on);
        auto right = range_of(ix, std::max<int64_t>(x.lo, int64_t(y.hi) + 1), x.hi);
        set_range(row, right.first, right.second, on);
    };
    minus(from, to, false);
    minus(to, from, true);
}

#if defined(__SSE2__)
// 16 bytes of mask for each pattern of bits: 4 floats or 8 halves.
template <typename T> struct expand_table {
    static constexpr unsigned per = 16 / sizeof(T);
    struct alignas(16) entry {
        T v[per];
    };
    entry e[1u << per];

    expand_table() {
        for (unsigned m = 0; m < (1u << per); ++m) {
            for (unsigned i = 0; i < per; ++i) {
                e[m].v[i] = (m >> i) & 1 ? mask_values<T>::keep() : mask_values<T>::drop();
            }
        }
    }
    __m128i at(uint64_t m) const { return _mm_load_si128(reinterpret_cast<const __m128i *>(e[m].v)); }

    static const expand_table & get() {
        static const expand_table t;
        return t;
    }
};
#endif

// Write the row to the caller's mask. Large masks do not fit in the caches: streaming
// (non-temporal) stores write them without first reading every destination line, which halves
// the memory traffic of the fill.
template <typename T> void expand_row(T * dst, const bit_row & row, bool stream) {
    const uint32_t   n_kv = row.n_kv();
    const uint64_t * w    = row.words();
    uint32_t         c    = 0;
#if defined(__SSE2__)
    if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
        constexpr unsigned         per   = expand_table<T>::per;
        constexpr uint64_t         mask  = (uint64_t(1) << per) - 1;
        const expand_table<T> &    table = expand_table<T>::get();
        for (; c + 64 <= n_kv; c += 64) {
            const uint64_t word = w[c >> 6];
            __m128i *      d    = reinterpret_cast<__m128i *>(dst + c);
            if (stream) {
                for (unsigned q = 0; q < 64 / per; ++q) {
                    _mm_stream_si128(d + q, table.at((word >> (q * per)) & mask));
                }
            } else {
                for (unsigned q = 0; q < 64 / per; ++q) {
                    _mm_store_si128(d + q, table.at((word >> (q * per)) & mask));
                }
            }
        }
    }
#else
    (void) stream;
#endif
    const T keep = mask_values<T>::keep();
    const T drop = mask_values<T>::drop();
    for (; c < n_kv; ++c) {
        dst[c] = (w[c >> 6] >> (c & 63)) & 1 ? keep : drop;
    }
}

// Masks at least this large are written with streaming stores.
constexpr size_t STREAM_BYTES = size_t(1) << 20;

// Each row is built in the bit row and written once. A token of the sequence whose row the bit
// row holds only moves the window (a prefill chunk's next token); any other starts afresh.
template <typename T>
void fill_mask(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
               const kq_mask_shape & shape, T * out) {
    const auto &      p = cache.params();
    const ubatch_walk w(cache, slot, ub);
    const bool        two_d  = causal && ub.n_pos >= 3 && cache.cells(0).with_ext();
    const bool        stream = shape.n_elements() * sizeof(T) >= STREAM_BYTES;

    bit_row & row = t_bits;
    row.reset(n_kv);
    int32_t    held_seq   = -1;  // the sequence whose row the bit row holds, and its window
    uint32_t   held_group = 0;
    pos_window held_win{ 0, -1 };
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        const token_view v   = w.at(t);
        const pos_window win = window_of(p.n_swa, p.swa, causal, v.p1);
        if (two_d) {
            // image tokens: within the query's own position the cell's (y, x) decides
            row.clear();
            auto [a, b] = range_of(v.cells->seq_index(v.seq), win.lo, win.hi);
            for (; a != b; ++a) {
                const uint32_t c = kv_cells::key_cell(*a);
                if (c < n_kv && !(kv_cells::key_pos(*a) == v.p1 && hidden_2d(*v.cells, c, ub, t))) {
                    row.put(c, true);
                }
            }
        } else if (held_seq == v.seq && held_group == v.group) {
            move_row(row, v.cells->seq_index(v.seq), held_win, win);
        } else {
            build_row(row, *v.cells, v.seq, win);
        }
        held_seq   = two_d ? -1 : v.seq;
        held_group = v.group;
        held_win   = win;
        expand_row(out + (size_t(v.group) * shape.rows_per_group + v.k) * n_kv, row, stream);
    }
    // padding rows
    if (shape.rows_per_group > shape.n_tps) {
        row.clear();
        for (uint32_t g = 0; g < shape.n_groups; ++g) {
            for (uint32_t k = shape.n_tps; k < shape.rows_per_group; ++k) {
                expand_row(out + (size_t(g) * shape.rows_per_group + k) * n_kv, row, stream);
            }
        }
    }
#if defined(__SSE2__)
    if (stream) {
        _mm_sfence();  // streaming stores are weakly ordered: finish them before returning
    }
#endif
}

} // namespace

// -- dense mask and lists ----------------------------------------------------------------------

kq_mask_shape kq_mask_shape_of(const slot_info & slot, const ubatch & ub, uint32_t n_kv, uint32_t pad) {
    if (pad == 0) {
        throw std::invalid_argument("mask row padding must be >= 1, got 0");
    }
    kq_mask_shape s;
    s.n_groups       = std::max<uint32_t>(1, slot.n_groups());
    s.n_tps          = ub.n_tokens / s.n_groups;
    s.rows_per_group = uint32_t((uint64_t(s.n_tps) + pad - 1) / pad * pad);
    s.n_kv           = n_kv;
    return s;
}

void kq_mask_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                  mask_type type, uint32_t pad, void * out) {
    const kq_mask_shape shape = kq_mask_shape_of(slot, ub, n_kv, pad);
    if (type == mask_type::F16) {
        fill_mask(cache, slot, ub, n_kv, causal, shape, static_cast<uint16_t *>(out));
    } else {
        fill_mask(cache, slot, ub, n_kv, causal, shape, static_cast<float *>(out));
    }
}

size_t kq_cells_count(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal) {
    const auto &      p = cache.params();
    const ubatch_walk w(cache, slot, ub);
    const bool        two_d = causal && ub.n_pos >= 3 && cache.cells(0).with_ext();
    size_t            total = 0;
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        const token_view v   = w.at(t);
        const pos_window win = window_of(p.n_swa, p.swa, causal, v.p1);
        auto [a, b] = range_of(v.cells->seq_index(v.seq), win.lo, win.hi);
        for (; a != b; ++a) {
            const uint32_t c = kv_cells::key_cell(*a);
            total += c < n_kv && !(two_d && kv_cells::key_pos(*a) == v.p1 && hidden_2d(*v.cells, c, ub, t));
        }
    }
    return total;
}

void kq_cells_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                   int64_t * offsets, int32_t * cells) {
    const auto &      p = cache.params();
    const ubatch_walk w(cache, slot, ub);
    const bool        two_d = causal && ub.n_pos >= 3 && cache.cells(0).with_ext();
    size_t            k     = 0;
    offsets[0]              = 0;
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        const token_view v   = w.at(t);
        const pos_window win = window_of(p.n_swa, p.swa, causal, v.p1);
        auto [a, b] = range_of(v.cells->seq_index(v.seq), win.lo, win.hi);
        const size_t first = k;
        for (; a != b; ++a) {
            const uint32_t c = kv_cells::key_cell(*a);
            if (c < n_kv && !(two_d && kv_cells::key_pos(*a) == v.p1 && hidden_2d(*v.cells, c, ub, t))) {
                cells[k++] = int32_t(c);
            }
        }
        // the index is in position order; cells placed in position order (the usual case) are
        // already ascending
        if (!std::is_sorted(cells + first, cells + k)) {
            std::sort(cells + first, cells + k);
        }
        offsets[t + 1] = int64_t(k);
    }
}

void kv_cache::kq_mask(const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal, float * out) const {
    kq_mask_fill(*this, slot, ub, n_kv, causal, mask_type::F32, 1, out);
}

void kv_cache::kq_cells(const slot_info & slot, const ubatch & ub, uint32_t n_kv, bool causal,
                        std::vector<int64_t> & offsets, std::vector<int32_t> & cells_out) const {
    offsets.assign(size_t(ub.n_tokens) + 1, 0);
    cells_out.resize(kq_cells_count(*this, slot, ub, n_kv, causal));
    kq_cells_fill(*this, slot, ub, n_kv, causal, offsets.data(), cells_out.data());
}

// -- write indices ------------------------------------------------------------------------------

void kv_k_idxs(const kv_cache & cache, const slot_info & slot, int64_t * out) {
    const uint32_t * idxs = slot.idxs.data();
    const size_t     m    = slot.idxs.size();
    const size_t     n    = slot.n_per_group ? slot.n_per_group : m;  // group g: entries [g n, (g+1) n)
    const int64_t    size = cache.size();
    for (size_t g = 0, t = 0; t < m; ++g) {
        const int64_t base = int64_t(slot.strm[g]) * size;
        for (const size_t end = std::min(m, t + n); t < end; ++t) {
            out[t] = base + idxs[t];
        }
    }
}

size_t kv_v_idxs_count(const kv_cache & cache, const slot_info & slot) {
    return cache.params().v_trans ? slot.idxs.size() * size_t(cache.params().n_embd_v_max) : slot.idxs.size();
}

void kv_v_idxs(const kv_cache & cache, const slot_info & slot, int64_t * out) {
    if (!cache.params().v_trans) {
        kv_k_idxs(cache, slot, out);
        return;
    }
    const uint32_t n    = slot.n_per_group;
    const int64_t  size = cache.size();
    const int64_t  e    = cache.params().n_embd_v_max;
    for (size_t t = 0; t < slot.idxs.size(); ++t) {
        const uint32_t g    = n ? uint32_t(t / n) : 0;
        int64_t        base = int64_t(slot.strm[g]) * size * e + slot.idxs[t];
        int64_t *      o    = out + t * size_t(e);
        for (int64_t j = 0; j < e; ++j, base += size) {
            o[j] = base;
        }
    }
}

// -- paged form ---------------------------------------------------------------------------------

namespace {

// Requests of the ubatch (distinct primary sequences in order of their first token) and, per
// request, the union of its tokens' windows.
struct paged_plan {
    std::vector<int32_t>    req_of_rank;  // per seq rank of the ubatch: request index or -1
    std::vector<int32_t>    seq;          // per request
    std::vector<uint32_t>   stream;       // per request
    std::vector<pos_window> span;         // per request: [min lo, max hi]
};

thread_local paged_plan            t_plan;
thread_local std::vector<index_it> t_starts;  // per request: its first page in the index
thread_local std::vector<int32_t>  t_fill;    // per request: next free slot of qo_order

const paged_plan & plan_requests(const kv_cache & cache, const slot_info & slot, const ubatch & ub, bool causal) {
    if (causal && ub.n_pos >= 3 && cache.cells(0).with_ext()) {
        throw error("the paged form cannot express the causal mask of a 2-D (M-RoPE image) micro-batch, where "
                    "cells of the query's own position are ordered by (y, x): use kq_mask or kq_cells");
    }
    const auto &      p = cache.params();
    const ubatch_walk w(cache, slot, ub);
    paged_plan &      pl = t_plan;
    pl.req_of_rank.assign(ub.data->seq_id_unq.size(), -1);
    pl.seq.clear();
    pl.stream.clear();
    pl.span.clear();
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        const token_view v   = w.at(t);
        const pos_window win = window_of(p.n_swa, p.swa, causal, v.p1);
        int32_t &        r   = pl.req_of_rank[size_t(rank_of(ub, v.seq))];
        if (r < 0) {
            r = int32_t(pl.seq.size());
            pl.seq.push_back(v.seq);
            pl.stream.push_back(slot.strm[v.group]);
            pl.span.push_back(win);
        } else {
            pos_window & s = pl.span[size_t(r)];
            if (win.lo <= win.hi) {
                if (s.lo > s.hi) {
                    s = win;
                } else {
                    s.lo = std::min(s.lo, win.lo);
                    s.hi = std::max(s.hi, win.hi);
                }
            }
        }
    }
    return pl;
}

} // namespace

paged_kv_sizes paged_kv_count(const kv_cache & cache, const slot_info & slot, const ubatch & ub, bool causal) {
    const paged_plan & pl = plan_requests(cache, slot, ub, causal);
    paged_kv_sizes     s;
    s.n_tokens = ub.n_tokens;
    s.n_seqs   = uint32_t(pl.seq.size());
    for (size_t r = 0; r < pl.seq.size(); ++r) {
        auto [a, b] = range_of(cache.cells(pl.stream[r]).seq_index(pl.seq[r]), pl.span[r].lo, pl.span[r].hi);
        s.n_pages += size_t(b - a);
    }
    return s;
}

void paged_kv_fill(const kv_cache & cache, const slot_info & slot, const ubatch & ub, bool causal,
                   const paged_kv_out & out) {
    const paged_plan & pl = plan_requests(cache, slot, ub, causal);
    const auto &       p  = cache.params();
    const int64_t      size = cache.size();
    const size_t       n_req = pl.seq.size();
    // pages of each request
    std::vector<index_it> & starts = t_starts;
    starts.resize(n_req);
    out.kv_indptr[0] = 0;
    int64_t k = 0;
    for (size_t r = 0; r < n_req; ++r) {
        const auto & ix = cache.cells(pl.stream[r]).seq_index(pl.seq[r]);
        auto [a, b] = range_of(ix, pl.span[r].lo, pl.span[r].hi);
        starts[r]   = a;
        const int64_t base = int64_t(pl.stream[r]) * size;
        for (index_it it = a; it != b; ++it) {
            out.kv_indices[k++] = int32_t(base + kv_cells::key_cell(*it));
        }
        if (k > std::numeric_limits<int32_t>::max()) {
            throw error("paged form: more than 2^31 - 1 pages");
        }
        out.seq_ids[r]          = pl.seq[r];
        out.kv_indptr[r + 1]    = int32_t(k);
        out.kv_last_page_len[r] = k > out.kv_indptr[r] ? 1 : 0;
    }
    // tokens: their request, their slice, and the tokens grouped by request
    std::fill(out.qo_indptr, out.qo_indptr + n_req + 1, 0);
    const ubatch_walk w(cache, slot, ub);
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        const token_view v = w.at(t);
        const int32_t    r = pl.req_of_rank[size_t(rank_of(ub, v.seq))];
        out.qo_seq[t]      = r;
        ++out.qo_indptr[r + 1];
        const pos_window win = window_of(p.n_swa, p.swa, causal, v.p1);
        const auto &     ix  = v.cells->seq_index(v.seq);
        auto [a, b] = range_of(ix, win.lo, win.hi);
        const int64_t base = out.kv_indptr[r];
        const int64_t end  = out.kv_indptr[r + 1];
        // the request's pages are the index range starting at starts[r]; a token's window lies
        // inside the request's span, so its range lies inside the pages
        int64_t s = base + (a - starts[r]);
        int64_t e = base + (b - starts[r]);
        if (a == b) {
            s = e = base;
        }
        out.kv_start[t] = int32_t(std::clamp<int64_t>(s, base, end));
        out.kv_end[t]   = int32_t(std::clamp<int64_t>(e, base, end));
    }
    for (size_t r = 0; r < n_req; ++r) {
        out.qo_indptr[r + 1] += out.qo_indptr[r];
    }
    // qo_order: counting sort of the tokens by request, stable (ubatch order within a request)
    std::vector<int32_t> & fillp = t_fill;
    fillp.assign(out.qo_indptr, out.qo_indptr + n_req);
    for (uint32_t t = 0; t < ub.n_tokens; ++t) {
        out.qo_order[fillp[size_t(out.qo_seq[t])]++] = int32_t(t);
    }
}

// -- the one-call decode step --------------------------------------------------------------------

bool decode_step_is_one_ubatch(uint32_t n_stream, const int32_t * seq_ids, uint32_t n) {
    if (n_stream == 1) {
        return true;  // the simple split takes every entry
    }
    // the sequential equal split takes consecutive ascending ids only
    for (uint32_t k = 1; k < n; ++k) {
        if (seq_ids[k] != seq_ids[k - 1] + 1) {
            return false;
        }
    }
    return true;
}

namespace {

// Recycled ubatch storage of the decode step (reused once nobody holds the previous step's).
std::shared_ptr<ubatch_data> decode_data(int32_t n_seq_max) {
    thread_local std::vector<std::shared_ptr<ubatch_data>> pool;
    constexpr size_t POOL_MAX = 8;
    for (auto & d : pool) {
        if (d.use_count() == 1) {
            for (int32_t s : d->seq_id_unq) {
                if (size_t(s) < d->seq_idx.size()) {
                    d->seq_idx[size_t(s)] = -1;
                }
            }
            if (d->seq_idx.size() != size_t(n_seq_max)) {
                d->seq_idx.assign(size_t(n_seq_max), -1);
            }
            return d;
        }
    }
    auto d = std::make_shared<ubatch_data>();
    d->seq_idx.assign(size_t(n_seq_max), -1);
    if (pool.size() < POOL_MAX) {
        pool.push_back(d);
    }
    return d;
}

// The ubatch llama.cpp's allocator forms from the decode batch (simple or equal split: the same
// arrays, every entry one sequence and one token).
ubatch decode_ubatch(int32_t n_seq_max, const seq_pos_source & positions, const int32_t * seq_ids, uint32_t n,
                     const int32_t * tokens, bool equal_seqs) {
    std::shared_ptr<ubatch_data> d = decode_data(n_seq_max);
    d->embd.clear();
    if (tokens) {
        d->token.assign(tokens, tokens + n);
    } else {
        d->token.clear();
    }
    d->pos.resize(n);
    positions.seq_pos_max_each(seq_ids, n, d->pos.data());
    d->seq_id.assign(seq_ids, seq_ids + n);
    d->seq_id_off.resize(size_t(n) + 1);
    d->output.assign(n, 1);
    d->batch_idx.resize(n);
    d->seq_id_unq.assign(seq_ids, seq_ids + n);
    int32_t * pos    = d->pos.data();
    int32_t * off    = d->seq_id_off.data();
    int32_t * bidx   = d->batch_idx.data();
    bool      sorted = true;
    for (uint32_t k = 0; k < n; ++k) {
        pos[k] += 1;
        off[k]  = int32_t(k);
        bidx[k] = int32_t(k);
        sorted  = sorted && (k == 0 || seq_ids[k - 1] < seq_ids[k]);
    }
    off[n] = int32_t(n);
    if (!sorted) {
        std::sort(d->seq_id_unq.begin(), d->seq_id_unq.end());
    }
    for (size_t r = 0; r < d->seq_id_unq.size(); ++r) {
        d->seq_idx[size_t(d->seq_id_unq[r])] = int32_t(r);
    }
    ubatch ub;
    ub.equal_seqs   = equal_seqs;
    ub.n_tokens     = n;
    ub.n_seqs       = n;
    ub.n_seq_tokens = 1;
    ub.n_seqs_unq   = n;
    ub.n_pos        = 1;
    ub.n_embd       = 0;
    ub.data         = std::move(d);
    return ub;
}

[[noreturn]] void bad_decode_arg(const std::string & what) {
    throw std::invalid_argument("decode_step: " + what);
}

} // namespace

// Ids in range and distinct, tokens non-negative: what the batch allocator would refuse, and the
// shape the step is for (a repeated id would be two tokens of one sequence). Ascending ids (the
// usual order) are distinct by their order; others are checked with a bitmap.
void check_decode_step_args(int32_t n_seq_max, const int32_t * seq_ids, uint32_t n, const int32_t * tokens) {
    if (n == 0) {
        bad_decode_arg("at least one sequence is needed, got seq_ids = []");
    }
    bool ascending = true;
    for (uint32_t k = 0; k < n; ++k) {
        const int32_t s = seq_ids[k];
        if (s < 0 || s >= n_seq_max) {
            bad_decode_arg("seq_ids[" + std::to_string(k) + "] = " + std::to_string(s) + " is outside [0, " +
                           std::to_string(n_seq_max) + ")");
        }
        if (tokens && tokens[k] < 0) {
            bad_decode_arg("tokens[" + std::to_string(k) + "] = " + std::to_string(tokens[k]) + " is negative");
        }
        ascending = ascending && (k == 0 || seq_ids[k - 1] < s);
    }
    if (ascending) {
        return;
    }
    thread_local std::vector<uint8_t> seen;
    if (seen.size() < size_t(n_seq_max)) {
        seen.assign(size_t(n_seq_max), 0);
    }
    uint32_t dup = n;
    for (uint32_t k = 0; k < n && dup == n; ++k) {
        uint8_t & f = seen[size_t(seq_ids[k])];
        dup = f ? k : n;
        f   = 1;
    }
    for (uint32_t k = 0; k < n; ++k) {
        seen[size_t(seq_ids[k])] = 0;
    }
    if (dup < n) {
        bad_decode_arg("seq_ids[" + std::to_string(dup) + "] = " + std::to_string(seq_ids[dup]) +
                       " repeats a sequence: a decode step takes one token of each sequence");
    }
}

kv_context kv_decode_step(kv_cache & cache, const seq_pos_source & positions, const int32_t * seq_ids, uint32_t n,
                          const int32_t * tokens) {
    check_decode_step_args(cache.n_seq_max(), seq_ids, n, tokens);
    if (!decode_step_is_one_ubatch(cache.n_stream(), seq_ids, n)) {
        return kv_context(memory_status::NO_UPDATE);
    }
    std::vector<ubatch>    ubs;
    std::vector<slot_info> slots;
    cache.acquire_plan(slots, ubs);
    ubs.push_back(decode_ubatch(cache.n_seq_max(), positions, seq_ids, n, tokens, cache.n_stream() > 1));
    // prepare_into of one ubatch is find_slot on the current state (the ubatch is well formed by
    // construction: its checks are the ones above)
    slots.resize(1);
    if (!cache.find_slot(ubs[0], false, slots[0])) {
        cache.release_plan(std::move(slots), std::move(ubs));
        return kv_context(memory_status::FAILED_PREPARE);
    }
    kv_context ctx(cache, std::move(slots), std::move(ubs));
    ctx.apply_just_planned();  // find_slot ran on the state it applies to
    return ctx;
}

std::pair<kv_context, kv_context> kv_iswa_decode_step(kv_cache & base, kv_cache & swa, const int32_t * seq_ids,
                                                      uint32_t n, const int32_t * tokens) {
    check_decode_step_args(base.n_seq_max(), seq_ids, n, tokens);
    const bool unified = base.n_stream() == 1;
    if (!decode_step_is_one_ubatch(base.n_stream(), seq_ids, n)) {
        return { kv_context(memory_status::NO_UPDATE), kv_context(memory_status::NO_UPDATE) };
    }
    // llama.cpp's attempts: the simple split (unified only), then the equal split
    for (int attempt = unified ? 0 : 1; attempt < 2; ++attempt) {
        std::vector<ubatch> ubs{ decode_ubatch(base.n_seq_max(), swa, seq_ids, n, tokens, attempt == 1) };
        std::vector<slot_info> sb, ss;
        if (!base.prepare_into(ubs, sb) || !swa.prepare_into(ubs, ss)) {
            continue;
        }
        std::vector<ubatch> ubs2 = ubs;
        std::pair<kv_context, kv_context> out{ kv_context(base, std::move(sb), std::move(ubs)),
                                               kv_context(swa, std::move(ss), std::move(ubs2)) };
        out.first.apply_just_planned();  // two caches: applying one leaves the other's plan valid
        out.second.apply_just_planned();
        return out;
    }
    return { kv_context(memory_status::FAILED_PREPARE), kv_context(memory_status::FAILED_PREPARE) };
}

} // namespace llmem
