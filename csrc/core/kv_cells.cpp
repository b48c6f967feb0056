#include "llmem/kv_cells.h"

#include <algorithm>
#include <cassert>
#include <limits>
#include <stdexcept>

namespace llmem {

namespace {

inline uint32_t ctz64(uint64_t w) { return uint32_t(__builtin_ctzll(w)); }
inline uint32_t clz64(uint64_t w) { return uint32_t(__builtin_clzll(w)); }

} // namespace

kv_cells::kv_cells(uint32_t size, int32_t n_seq_max, bool with_ext, int32_t seq_base, int32_t n_local)
    : size_(size), n_seq_max_(n_seq_max), seq_base_(seq_base), n_local_(n_local > 0 ? n_local : n_seq_max - seq_base),
      with_ext_(with_ext) {
    if (n_seq_max <= 0) {
        throw std::invalid_argument("n_seq_max must be positive, got " + std::to_string(n_seq_max));
    }
    if (seq_base < 0 || n_local_ <= 0 || seq_base + n_local_ > n_seq_max) {
        throw std::invalid_argument("kv_cells: local id range outside [0, n_seq_max)");
    }
    pos_.assign(size, -1);
    shift_.assign(size, 0);
    if (with_ext_) {
        ext_.assign(size, cell_ext{});
    }
    n_seq_.assign(size, 0);
    ids_.assign(size_t(size) * 2, -1);
    used_bits_.assign((size_t(size) + 63) / 64, 0);
    index_.resize(size_t(n_local_));
    last_key_.assign(size_t(n_local_), 0);
    stamp_.assign(size, 0);
}

// -- queries ------------------------------------------------------------------------------------

uint32_t kv_cells::used_max_p1() const {
    if (used_count_ == 0) {
        used_max_hint_ = 0;
        return 0;
    }
    // The hint is an upper bound; walk down to the highest set bit below it.
    uint32_t hint = used_max_hint_;
    size_t   w    = (size_t(hint) + 63) / 64;
    while (w > 0) {
        uint64_t word = used_bits_[w - 1];
        if (w * 64 > hint) {
            const uint32_t keep = hint - uint32_t((w - 1) * 64);
            word &= keep >= 64 ? ~uint64_t(0) : ((uint64_t(1) << keep) - 1);
        }
        if (word) {
            used_max_hint_ = uint32_t((w - 1) * 64) + (63 - clz64(word)) + 1;
            return used_max_hint_;
        }
        --w;
    }
    used_max_hint_ = 0;
    return 0;
}

bool kv_cells::seq_has(uint32_t i, int32_t s) const {
    const uint32_t n = n_seq_[i];
    if (n == 0) {
        return false;
    }
    const int32_t * pair = &ids_[size_t(i) * 2];
    if (n <= 2) {
        return pair[0] == s || (n == 2 && pair[1] == s);
    }
    const auto & l = multi_[uint32_t(pair[0])];
    return std::binary_search(l.begin(), l.end(), s);
}

const int32_t * kv_cells::seq_list(uint32_t i, uint32_t & n) const {
    n = n_seq_[i];
    if (n == 0) {
        return nullptr;
    }
    if (n <= 2) {
        return &ids_[size_t(i) * 2];
    }
    return multi_[uint32_t(ids_[size_t(i) * 2])].data();
}

int32_t kv_cells::seq_pos_min(int32_t s) const {
    if (!in_range(s) || ix(s).empty()) {
        return -1;
    }
    return key_pos(ix(s).front());
}

uint32_t kv_cells::seq_n_cells(int32_t s) const {
    return in_range(s) ? uint32_t(ix(s).size()) : 0;
}

uint32_t kv_cells::next_empty(uint32_t from) const {
    if (from >= size_) {
        return size_;
    }
    size_t   w    = from / 64;
    uint64_t free = ~used_bits_[w] & (~uint64_t(0) << (from % 64));
    const size_t n_words = used_bits_.size();
    while (true) {
        if (free) {
            const uint32_t i = uint32_t(w * 64) + ctz64(free);
            return i < size_ ? i : size_;
        }
        if (++w >= n_words) {
            return size_;
        }
        free = ~used_bits_[w];
    }
}

uint32_t kv_cells::collect_empty(uint32_t from, uint32_t to, uint32_t n, std::vector<uint32_t> & out) const {
    to = std::min(to, size_);
    if (from >= to || n == 0) {
        return 0;
    }
    const size_t start = out.size();
    out.resize(start + n);
    uint32_t * dst = out.data() + start;
    uint32_t   got = 0;
    size_t     w   = from / 64;
    uint64_t   free = ~used_bits_[w] & (~uint64_t(0) << (from % 64));
    const size_t w_end = (size_t(to) + 63) / 64;
    while (true) {
        if (w + 1 == w_end && to % 64 != 0) {
            free &= (uint64_t(1) << (to % 64)) - 1;  // the bits past `to` in its last word
        }
        while (free != 0 && got < n) {
            dst[got++] = uint32_t(w * 64) + ctz64(free);
            free &= free - 1;
        }
        if (got == n || ++w >= w_end) {
            break;
        }
        free = ~used_bits_[w];
    }
    out.resize(start + got);
    return got;
}

uint32_t kv_cells::next_used(uint32_t from) const {
    if (from >= size_) {
        return size_;
    }
    size_t   w    = from / 64;
    uint64_t bits = used_bits_[w] & (~uint64_t(0) << (from % 64));
    const size_t n_words = used_bits_.size();
    while (true) {
        if (bits) {
            return uint32_t(w * 64) + ctz64(bits);
        }
        if (++w >= n_words) {
            return size_;
        }
        bits = used_bits_[w];
    }
}

// -- internal helpers ---------------------------------------------------------------------------

void kv_cells::mark_used(uint32_t i) {
    used_bits_[i / 64] |= uint64_t(1) << (i % 64);
    ++used_count_;
    if (i + 1 > used_max_hint_) {
        used_max_hint_ = i + 1;
    }
}

void kv_cells::mark_unused(uint32_t i) {
    used_bits_[i / 64] &= ~(uint64_t(1) << (i % 64));
    --used_count_;
}

void kv_cells::sync_last(int32_t s) {
    const auto & v = ix(s);
    last_key_[size_t(s - seq_base_)] = v.empty() ? 0 : v.back();
}

void kv_cells::merge_scratch_keys(int32_t s) {
    auto &       v   = ix(s);
    const size_t mid = v.size();
    v.insert(v.end(), scratch_keys_.begin(), scratch_keys_.end());
    if (mid > 0 && mid < v.size() && v[mid - 1] > v[mid]) {  // else the keys simply follow
        std::inplace_merge(v.begin(), v.begin() + std::ptrdiff_t(mid), v.end());
    }
    sync_last(s);
}

void kv_cells::index_insert(int32_t s, int32_t p, uint32_t i) {
    auto &         v    = ix(s);
    uint64_t &     last = last_key_[size_t(s - seq_base_)];
    const uint64_t k    = key(p, i);
    if (last < k) {  // an empty index has last 0, below every key
        v.push_back(k);  // the decode case: the newest position of the sequence
        last = k;
        return;
    }
    v.insert(std::upper_bound(v.begin(), v.end(), k), k);
}

void kv_cells::index_erase(int32_t s, int32_t p, uint32_t i) {
    auto &         v    = ix(s);
    uint64_t &     last = last_key_[size_t(s - seq_base_)];
    const uint64_t k    = key(p, i);
    if (!v.empty() && last == k) {
        v.pop_back();
        last = v.empty() ? 0 : v.back();
        return;
    }
    auto it = std::lower_bound(v.begin(), v.end(), k);
    assert(it != v.end() && *it == k);
    v.erase(it);
}

uint32_t kv_cells::multi_alloc() {
    if (!multi_free_.empty()) {
        const uint32_t slot = multi_free_.back();
        multi_free_.pop_back();
        multi_[slot].clear();
        return slot;
    }
    multi_.emplace_back();
    return uint32_t(multi_.size() - 1);
}

void kv_cells::multi_free(uint32_t slot) {
    multi_free_.push_back(slot);
}

void kv_cells::seqs_clear(uint32_t i) {
    int32_t * pair = &ids_[size_t(i) * 2];
    if (n_seq_[i] > 2) {
        multi_free(uint32_t(pair[0]));
    }
    n_seq_[i] = 0;
    pair[0]   = -1;
    pair[1]   = -1;
}

void kv_cells::seqs_insert(uint32_t i, int32_t s) {
    int32_t *      pair = &ids_[size_t(i) * 2];
    const uint32_t n    = n_seq_[i];
    if (n == 0) {
        pair[0]   = s;
        n_seq_[i] = 1;
        return;
    }
    if (n == 1) {
        const int32_t a = pair[0];
        pair[0]         = std::min(a, s);
        pair[1]         = std::max(a, s);
        n_seq_[i]       = 2;
        return;
    }
    if (n == 2) {
        const uint32_t slot = multi_alloc();
        auto &         l    = multi_[slot];
        l.assign(pair, pair + 2);
        l.insert(std::lower_bound(l.begin(), l.end(), s), s);
        pair[0]   = int32_t(slot);
        pair[1]   = -1;
        n_seq_[i] = 3;
        return;
    }
    auto & l = multi_[uint32_t(pair[0])];
    l.insert(std::lower_bound(l.begin(), l.end(), s), s);
    ++n_seq_[i];
}

void kv_cells::seqs_erase(uint32_t i, int32_t s) {
    int32_t *      pair = &ids_[size_t(i) * 2];
    const uint32_t n    = n_seq_[i];
    if (n == 1) {
        pair[0]   = -1;
        n_seq_[i] = 0;
        return;
    }
    if (n == 2) {
        pair[0]   = pair[0] == s ? pair[1] : pair[0];
        pair[1]   = -1;
        n_seq_[i] = 1;
        return;
    }
    const uint32_t slot = uint32_t(pair[0]);
    auto &         l    = multi_[slot];
    l.erase(std::lower_bound(l.begin(), l.end(), s));
    if (n == 3) {
        pair[0] = l[0];
        pair[1] = l[1];
        multi_free(slot);
    }
    --n_seq_[i];
}

void kv_cells::empty_cell(uint32_t i) {
    seqs_clear(i);
    pos_[i]   = -1;
    shift_[i] = 0;
    if (with_ext_) {
        ext_[i] = cell_ext{};
    }
    mark_unused(i);
}

void kv_cells::save_cell(uint32_t i) {
    stamp_[i] = epoch_;
    uint32_t        n    = 0;
    const int32_t * ids  = seq_list(i, n);
    saved_cell      rec{ i, pos_[i], shift_[i], ext_get(i), uint32_t(saved_seqs_.size()), n };
    saved_seqs_.insert(saved_seqs_.end(), ids, ids + n);
    saved_.push_back(rec);
}

// -- primitives ---------------------------------------------------------------------------------

void kv_cells::reset() {
    assert(!journal_active_);
    std::fill(pos_.begin(), pos_.end(), -1);
    std::fill(shift_.begin(), shift_.end(), 0);
    if (with_ext_) {
        std::fill(ext_.begin(), ext_.end(), cell_ext{});
    }
    std::fill(n_seq_.begin(), n_seq_.end(), 0u);
    std::fill(ids_.begin(), ids_.end(), -1);
    std::fill(used_bits_.begin(), used_bits_.end(), 0);
    multi_free_.clear();
    for (uint32_t k = 0; k < multi_.size(); ++k) {
        multi_free_.push_back(k);
    }
    for (auto & v : index_) {
        v.clear();
    }
    std::fill(last_key_.begin(), last_key_.end(), uint64_t(0));
    used_count_    = 0;
    used_max_hint_ = 0;
    has_shift_     = false;
}

void kv_cells::reset_shift() {
    std::fill(shift_.begin(), shift_.end(), 0);
    has_shift_ = false;
}

void kv_cells::rm(uint32_t i) {
    assert(!is_empty(i));
    touch(i);
    uint32_t        n   = 0;
    const int32_t * ids = seq_list(i, n);
    for (uint32_t k = 0; k < n; ++k) {
        index_erase(ids[k], pos_[i], i);
    }
    empty_cell(i);
}

bool kv_cells::seq_rm(uint32_t i, int32_t s) {
    assert(seq_has(i, s));
    touch(i);
    index_erase(s, pos_[i], i);
    seqs_erase(i, s);
    if (n_seq_[i] == 0) {
        empty_cell(i);
        return true;
    }
    return false;
}

bool kv_cells::seq_keep(uint32_t i, int32_t s) {
    if (seq_has(i, s)) {
        if (n_seq_[i] > 1) {
            touch(i);
            uint32_t        n   = 0;
            const int32_t * ids = seq_list(i, n);
            for (uint32_t k = 0; k < n; ++k) {
                if (ids[k] != s) {
                    index_erase(ids[k], pos_[i], i);
                }
            }
            seqs_clear(i);
            seqs_insert(i, s);
        }
        return false;
    }
    if (n_seq_[i] > 0) {
        rm(i);
        return true;
    }
    return false;
}

void kv_cells::seq_add(uint32_t i, int32_t s) {
    assert(!is_empty(i) && in_range(s));
    if (seq_has(i, s)) {
        return;
    }
    touch(i);
    seqs_insert(i, s);
    index_insert(s, pos_[i], i);
}

void kv_cells::pos_set(uint32_t i, int32_t p) {
    assert(is_empty(i) && n_seq_[i] == 0 && p >= 0);
    touch(i);
    pos_[i] = p;
    mark_used(i);
}

void kv_cells::occupy(uint32_t i, int32_t p, int32_t s) {
    assert(is_empty(i) && n_seq_[i] == 0 && p >= 0 && in_range(s));
    touch(i);
    pos_[i] = p;
    mark_used(i);
    ids_[size_t(i) * 2] = s;
    n_seq_[i]           = 1;
    index_insert(s, p, i);
}

uint32_t kv_cells::occupy_each(const uint32_t * cells, const int32_t * pos, const int32_t * seqs, uint32_t n) {
    uint32_t k   = 0;
    uint32_t top = 0;
    for (; k < n; ++k) {
        const uint32_t i = cells[k];
        const int32_t  s = seqs[k];
        const int32_t  p = pos[k];
        if (pos_[i] != -1) {
            break;
        }
        assert(n_seq_[i] == 0 && p >= 0 && in_range(s));
        // occupy(i, p, s) written out: this loop is the whole apply of a decode step
        touch(i);
        pos_[i] = p;
        used_bits_[i / 64] |= uint64_t(1) << (i % 64);
        ids_[size_t(i) * 2] = s;
        n_seq_[i]           = 1;
        top                 = std::max(top, i);
        const uint64_t key_i = key(p, i);
        uint64_t &     last  = last_key_[size_t(s - seq_base_)];
        if (last < key_i) {  // the newest position of s (an empty index has last 0): append
            ix(s).push_back(key_i);
            last = key_i;
        } else {
            auto & v = ix(s);
            v.insert(std::upper_bound(v.begin(), v.end(), key_i), key_i);
        }
    }
    used_count_ += k;
    if (k > 0 && top + 1 > used_max_hint_) {
        used_max_hint_ = top + 1;
    }
    return k;
}

void kv_cells::occupy_all(const uint32_t * cells, const int32_t * pos, uint32_t n, int32_t s) {
    assert(in_range(s));
    scratch_keys_.resize(n);
    uint64_t * keys   = scratch_keys_.data();
    bool       sorted = true;
    for (uint32_t k = 0; k < n; ++k) {
        const uint32_t i = cells[k];
        const int32_t  p = pos[k];
        assert(is_empty(i) && n_seq_[i] == 0 && p >= 0);
        touch(i);
        pos_[i] = p;
        mark_used(i);
        ids_[size_t(i) * 2] = s;
        n_seq_[i]           = 1;
        keys[k]             = key(p, i);
        sorted              = sorted && (k == 0 || keys[k - 1] < keys[k]);
    }
    if (n == 0) {
        return;
    }
    if (!sorted) {
        std::sort(scratch_keys_.begin(), scratch_keys_.end());
    }
    merge_scratch_keys(s);
}

void kv_cells::ext_set(uint32_t i, const cell_ext & e) {
    if (with_ext_) {
        touch(i);
        ext_[i] = e;
    }
}

bool kv_cells::pos_add(uint32_t i, int32_t d) {
    assert(!is_empty(i));
    touch(i);
    has_shift_ = true;
    const int32_t   old = pos_[i];
    const int64_t   np  = int64_t(old) + d;
    uint32_t        n   = 0;
    const int32_t * ids = seq_list(i, n);
    for (uint32_t k = 0; k < n; ++k) {
        index_erase(ids[k], old, i);
    }
    if (np < 0) {
        empty_cell(i);
        return true;
    }
    pos_[i] = int32_t(np);
    shift_[i] += d;
    ids = seq_list(i, n);
    for (uint32_t k = 0; k < n; ++k) {
        index_insert(ids[k], pos_[i], i);
    }
    return false;
}

void kv_cells::pos_div(uint32_t i, int32_t d) {
    assert(!is_empty(i) && d >= 1);
    touch(i);
    has_shift_ = true;
    const int32_t   old = pos_[i];
    uint32_t        n   = 0;
    const int32_t * ids = seq_list(i, n);
    for (uint32_t k = 0; k < n; ++k) {
        index_erase(ids[k], old, i);
    }
    pos_[i] = old / d;
    // llama.cpp records old - new here (the wrong direction); llmem records the real change.
    shift_[i] += pos_[i] - old;
    for (uint32_t k = 0; k < n; ++k) {
        index_insert(ids[k], pos_[i], i);
    }
}

// -- bulk operations ----------------------------------------------------------------------------

uint32_t kv_cells::seq_rm_range(int32_t s, int32_t p0, int32_t p1) {
    if (!in_range(s) || p0 >= p1) {
        return size_;
    }
    auto &   v      = ix(s);
    auto     lo     = std::lower_bound(v.begin(), v.end(), key(p0, 0));
    auto     hi     = std::lower_bound(lo, v.end(), key(p1, 0));
    uint32_t lowest = size_;
    for (auto it = lo; it != hi; ++it) {
        const uint32_t i = key_cell(*it);
        touch(i);
        if (n_seq_[i] == 1) {
            // the common case (removing a request's tokens, restoring a sequence): s alone
            // holds the cell, which empties; written out, this loop is the whole cost
            n_seq_[i]           = 0;
            ids_[size_t(i) * 2] = -1;
            pos_[i]             = -1;
            shift_[i]           = 0;
            if (with_ext_) {
                ext_[i] = cell_ext{};
            }
            used_bits_[i / 64] &= ~(uint64_t(1) << (i % 64));
            --used_count_;
            lowest = std::min(lowest, i);
            continue;
        }
        seqs_erase(i, s);
    }
    v.erase(lo, hi);
    sync_last(s);
    return lowest;
}

uint32_t kv_cells::rm_range(int32_t p0, int32_t p1) {
    if (p0 >= p1) {
        return size_;
    }
    uint32_t lowest = size_;
    for (uint32_t i = next_used(0); i < size_; i = next_used(i + 1)) {
        if (pos_[i] >= p0 && pos_[i] < p1) {
            touch(i);
            empty_cell(i);
            lowest = std::min(lowest, i);
        }
    }
    // Every index entry with a position in [p0, p1) belonged to a cell emptied above.
    for (int32_t s = seq_base_; s < seq_base_ + n_local_; ++s) {
        auto & v  = ix(s);
        auto   lo = std::lower_bound(v.begin(), v.end(), key(p0, 0));
        auto   hi = std::lower_bound(lo, v.end(), key(p1, 0));
        v.erase(lo, hi);
        sync_last(s);
    }
    return lowest;
}

uint32_t kv_cells::keep_only(int32_t s) {
    uint32_t lowest = size_;
    for (uint32_t i = next_used(0); i < size_; i = next_used(i + 1)) {
        if (seq_has(i, s)) {
            if (n_seq_[i] > 1) {
                touch(i);
                seqs_clear(i);
                seqs_insert(i, s);
            }
        } else if (n_seq_[i] > 0) {
            touch(i);
            empty_cell(i);
            lowest = std::min(lowest, i);
        }
    }
    // No cell holds any other sequence now.
    for (int32_t t = seq_base_; t < seq_base_ + n_local_; ++t) {
        if (t != s) {
            ix(t).clear();
            sync_last(t);
        }
    }
    return lowest;
}

void kv_cells::seq_copy(int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    if (!in_range(src) || !in_range(dst) || src == dst || p0 >= p1) {
        return;
    }
    const auto & v  = ix(src);
    auto         lo = std::lower_bound(v.begin(), v.end(), key(p0, 0));
    auto         hi = std::lower_bound(lo, v.end(), key(p1, 0));
    scratch_keys_.resize(size_t(hi - lo));
    uint64_t * keys = scratch_keys_.data();
    size_t     m    = 0;
    for (auto it = lo; it != hi; ++it) {
        const uint32_t i    = key_cell(*it);
        int32_t *      pair = &ids_[size_t(i) * 2];
        if (n_seq_[i] == 1) {
            // the common case, a cell of src alone: it becomes {src, dst} inline
            const int32_t a = pair[0];
            if (a == dst) {
                continue;
            }
            touch(i);
            pair[0]   = std::min(a, dst);
            pair[1]   = std::max(a, dst);
            n_seq_[i] = 2;
        } else {
            if (seq_has(i, dst)) {
                continue;
            }
            touch(i);
            seqs_insert(i, dst);
        }
        keys[m++] = *it;  // same cell, same position: the same key in dst's index
    }
    scratch_keys_.resize(m);
    if (m == 0) {
        return;
    }
    merge_scratch_keys(dst);
}

uint32_t kv_cells::seq_pos_add(int32_t s, int32_t p0, int32_t p1, int32_t d) {
    if (!in_range(s) || p0 >= p1 || d == 0) {
        return size_;
    }
    auto & v  = ix(s);
    auto   lo = std::lower_bound(v.begin(), v.end(), key(p0, 0));
    auto   hi = std::lower_bound(lo, v.end(), key(p1, 0));
    if (lo == hi) {
        return size_;
    }
    scratch_cells_.clear();
    for (auto it = lo; it != hi; ++it) {
        scratch_cells_.push_back(key_cell(*it));
    }
    v.erase(lo, hi);

    has_shift_      = true;
    uint32_t lowest = size_;
    scratch_keys_.clear();
    for (const uint32_t i : scratch_cells_) {
        touch(i);
        const int32_t   old = pos_[i];
        const int64_t   np  = int64_t(old) + d;
        uint32_t        n   = 0;
        const int32_t * ids = seq_list(i, n);
        for (uint32_t k = 0; k < n; ++k) {
            if (ids[k] != s) {
                index_erase(ids[k], old, i);
            }
        }
        if (np < 0) {
            // The position is shared by every sequence of the cell: all of them lose it.
            empty_cell(i);
            lowest = std::min(lowest, i);
            continue;
        }
        pos_[i] = int32_t(np);
        shift_[i] += d;
        ids = seq_list(i, n);
        for (uint32_t k = 0; k < n; ++k) {
            if (ids[k] != s) {
                index_insert(ids[k], pos_[i], i);
            }
        }
        scratch_keys_.push_back(key(pos_[i], i));
    }
    // The moved block keeps its order (same delta for all); merge it back.
    merge_scratch_keys(s);
    return lowest;
}

void kv_cells::seq_pos_div(int32_t s, int32_t p0, int32_t p1, int32_t d) {
    if (!in_range(s) || p0 >= p1 || d == 1) {
        return;
    }
    auto & v  = ix(s);
    auto   lo = std::lower_bound(v.begin(), v.end(), key(p0, 0));
    auto   hi = std::lower_bound(lo, v.end(), key(p1, 0));
    if (lo == hi) {
        return;
    }
    scratch_cells_.clear();
    for (auto it = lo; it != hi; ++it) {
        scratch_cells_.push_back(key_cell(*it));
    }
    v.erase(lo, hi);

    has_shift_ = true;
    scratch_keys_.clear();
    for (const uint32_t i : scratch_cells_) {
        touch(i);
        const int32_t   old = pos_[i];
        uint32_t        n   = 0;
        const int32_t * ids = seq_list(i, n);
        for (uint32_t k = 0; k < n; ++k) {
            if (ids[k] != s) {
                index_erase(ids[k], old, i);
            }
        }
        pos_[i] = old / d;
        shift_[i] += pos_[i] - old;
        for (uint32_t k = 0; k < n; ++k) {
            if (ids[k] != s) {
                index_insert(ids[k], pos_[i], i);
            }
        }
        scratch_keys_.push_back(key(pos_[i], i));
    }
    std::sort(scratch_keys_.begin(), scratch_keys_.end());
    merge_scratch_keys(s);
}

// -- journal ------------------------------------------------------------------------------------

void kv_cells::journal_begin() {
    assert(!journal_active_);
    journal_active_    = true;
    journal_has_shift_ = has_shift_;
    saved_.clear();
    saved_seqs_.clear();
    if (++epoch_ == 0) {
        std::fill(stamp_.begin(), stamp_.end(), 0u);
        epoch_ = 1;
    }
}

void kv_cells::journal_commit() {
    journal_active_ = false;
}

void kv_cells::journal_rollback() {
    assert(journal_active_);
    journal_active_ = false;
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
        const uint32_t i = it->cell;
        if (pos_[i] != -1) {
            uint32_t        n   = 0;
            const int32_t * ids = seq_list(i, n);
            for (uint32_t k = 0; k < n; ++k) {
                index_erase(ids[k], pos_[i], i);
            }
            seqs_clear(i);
            mark_unused(i);
        }
        pos_[i]   = it->pos;
        shift_[i] = it->shift;
        if (with_ext_) {
            ext_[i] = it->ext;
        }
        if (it->pos != -1) {
            mark_used(i);
            for (uint32_t k = 0; k < it->n_seq; ++k) {
                const int32_t s = saved_seqs_[it->seq_off + k];
                seqs_insert(i, s);
                index_insert(s, it->pos, i);
            }
        }
    }
    has_shift_ = journal_has_shift_;
    saved_.clear();
    saved_seqs_.clear();
}

// -- self check ---------------------------------------------------------------------------------

bool kv_cells::check_invariants() const {
    uint32_t used = 0;
    size_t   memberships = 0;
    for (uint32_t i = 0; i < size_; ++i) {
        const bool bit = (used_bits_[i / 64] >> (i % 64)) & 1;
        if ((pos_[i] != -1) != bit) {
            return false;
        }
        if (pos_[i] == -1) {
            if (n_seq_[i] != 0 || shift_[i] != 0) {
                return false;
            }
            continue;
        }
        ++used;
        uint32_t        n   = 0;
        const int32_t * ids = seq_list(i, n);
        for (uint32_t k = 0; k < n; ++k) {
            if (!in_range(ids[k]) || (k > 0 && ids[k - 1] >= ids[k])) {
                return false;
            }
            const auto & v = ix(ids[k]);
            if (!std::binary_search(v.begin(), v.end(), key(pos_[i], i))) {
                return false;
            }
        }
        memberships += n;
    }
    if (used != used_count_ || used_max_hint_ < used_max_p1()) {
        return false;
    }
    for (int32_t s = seq_base_; s < seq_base_ + n_local_; ++s) {
        if (last_key_[size_t(s - seq_base_)] != (ix(s).empty() ? 0 : ix(s).back())) {
            return false;
        }
    }
    size_t indexed = 0;
    for (const auto & v : index_) {
        indexed += v.size();
        for (size_t k = 1; k < v.size(); ++k) {
            if (v[k - 1] >= v[k]) {
                return false;
            }
        }
    }
    return indexed == memberships;
}

int32_t kv_cells::seq_pos_tok_le(int32_t s, int32_t p) const {
    const std::vector<uint64_t> & idx = seq_index(s);
    // the first key past (p, any cell): the one before it is the last cell at a position <= p
    const auto it = std::upper_bound(idx.begin(), idx.end(), key(p, std::numeric_limits<uint32_t>::max()));
    if (it == idx.begin()) {
        return -1;
    }
    return ext_get(key_cell(*(it - 1))).tok;
}

} // namespace llmem
