#include "llmem/rs_checkpoints.h"

#include "llmem/errors.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace llmem {

rs_checkpoints::rs_checkpoints(const rs_memory & mem, uint64_t max_count, uint64_t max_bytes, bool copy_rows)
    : copy_rows_(copy_rows), max_count_(max_count), max_bytes_(max_bytes) {
    const rs_buffers & b = mem.buffers();
    r_row_bytes_ = b.r_row_bytes;
    s_row_bytes_ = b.s_row_bytes;
    for (uint64_t rb : r_row_bytes_) {
        bytes_ += rb;
    }
    for (uint64_t sb : s_row_bytes_) {
        bytes_ += sb;
    }
    p_row_bytes_ = b.p_row_bytes;
    for (uint64_t pb : p_row_bytes_) {
        bytes_ += pb;
    }
}

bool rs_checkpoints::same_layout(const rs_memory & mem) const {
    const rs_buffers & b = mem.buffers();
    return b.r_row_bytes == r_row_bytes_ && b.s_row_bytes == s_row_bytes_ && b.p_row_bytes == p_row_bytes_;
}

bool rs_checkpoints::has_room() const {
    return count_ < max_count_ && (count_ + 1) * bytes_ <= max_bytes_;
}

void rs_checkpoints::set_limits(uint64_t max_count, uint64_t max_bytes) {
    max_count_ = max_count;
    max_bytes_ = max_bytes;
}

bool rs_checkpoints::contains(int64_t id) const {
    return index_.count(id) != 0;
}

const rs_checkpoints::slot & rs_checkpoints::find(int64_t id) const {
    const auto it = index_.find(id);
    if (it == index_.end()) {
        throw std::invalid_argument("no checkpoint with id " + std::to_string(id));
    }
    return slots_[it->second];
}

int32_t rs_checkpoints::pos(int64_t id) const {
    return find(id).pos;
}

namespace {
// Checkpoints copy rows through host memory: a memory whose rows live elsewhere (torch storage,
// bookkeeping-only) has none to copy.
void require_host_rows(const rs_memory & mem) {
    const rs_buffers & b = mem.buffers();
    for (size_t l = 0; l < b.r.size(); ++l) {
        if ((b.r[l] == nullptr && b.r_row_bytes[l] != 0) || (b.s[l] == nullptr && b.s_row_bytes[l] != 0)) {
            throw error("recurrent checkpoints need the states in host memory (numpy storage): this memory's "
                        "rows are held by its storage");
        }
    }
}
} // namespace

int64_t rs_checkpoints::save(const rs_memory & mem, int32_t seq) {
    if (!same_layout(mem)) {
        throw std::invalid_argument("checkpoint pool: the memory's rows differ from the pool's");
    }
    if (copy_rows_) {
        require_host_rows(mem);
    }
    const int64_t row = mem.seq_state_row(seq);
    if (row < 0) {
        throw std::invalid_argument("sequence " + std::to_string(seq) + " holds no state to checkpoint");
    }
    if (!has_room()) {
        throw error("checkpoint pool full: " + std::to_string(count_) + " checkpoints of " +
                    std::to_string(bytes_) + " bytes (limits: " + std::to_string(max_count_) + " checkpoints, " +
                    std::to_string(max_bytes_) + " bytes); drop some first");
    }
    uint32_t k;
    if (!free_.empty()) {
        k = free_.back();
        free_.pop_back();
    } else {
        slots_.emplace_back();
        k = uint32_t(slots_.size() - 1);
    }
    slot & s = slots_[k];
    if (copy_rows_) {
        if (!s.data && bytes_ != 0) {
            s.data.reset(new uint8_t[bytes_]);
        }
        const rs_buffers & b = mem.buffers();
        uint8_t * out = s.data.get();
        for (size_t l = 0; l < b.r.size(); ++l) {
            std::memcpy(out, b.r[l] + uint64_t(row) * r_row_bytes_[l], size_t(r_row_bytes_[l]));
            out += r_row_bytes_[l];
        }
        for (size_t l = 0; l < b.s.size(); ++l) {
            std::memcpy(out, b.s[l] + uint64_t(row) * s_row_bytes_[l], size_t(s_row_bytes_[l]));
            out += s_row_bytes_[l];
        }
        for (size_t l = 0; l < p_row_bytes_.size(); ++l) {
            if (p_row_bytes_[l] != 0) {
                std::memcpy(out, b.p[l] + uint64_t(row) * p_row_bytes_[l], size_t(p_row_bytes_[l]));
                out += p_row_bytes_[l];
            }
        }
    }
    s.id = next_id_++;
    s.pos = mem.seq_pos_min(seq);
    index_.emplace(s.id, k);
    ++count_;
    return s.id;
}

void rs_checkpoints::restore(rs_memory & mem, int64_t id, int32_t seq) const {
    const slot & s = find(id);
    if (!same_layout(mem)) {
        throw std::invalid_argument("checkpoint pool: the memory's rows differ from the pool's");
    }
    if (copy_rows_) {
        require_host_rows(mem);
    }
    const uint64_t row = mem.seq_place(seq, s.pos);  // throws, unchanged, when seq cannot take it
    if (!copy_rows_) {
        return;  // the rows' holder copies them into seq_state_row(seq)
    }
    const rs_buffers & b = mem.buffers();
    const uint8_t * in = s.data.get();
    for (size_t l = 0; l < b.r.size(); ++l) {
        std::memcpy(b.r[l] + row * r_row_bytes_[l], in, size_t(r_row_bytes_[l]));
        in += r_row_bytes_[l];
    }
    for (size_t l = 0; l < b.s.size(); ++l) {
        std::memcpy(b.s[l] + row * s_row_bytes_[l], in, size_t(s_row_bytes_[l]));
        in += s_row_bytes_[l];
    }
    for (size_t l = 0; l < p_row_bytes_.size(); ++l) {
        if (p_row_bytes_[l] != 0) {
            std::memcpy(b.p[l] + row * p_row_bytes_[l], in, size_t(p_row_bytes_[l]));
            in += p_row_bytes_[l];
        }
    }
}

bool rs_checkpoints::drop(int64_t id) {
    const auto it = index_.find(id);
    if (it == index_.end()) {
        return false;
    }
    slots_[it->second].id = -1;
    free_.push_back(it->second);
    index_.erase(it);
    --count_;
    return true;
}

void rs_checkpoints::clear() {
    for (const auto & e : index_) {
        slots_[e.second].id = -1;
        free_.push_back(e.second);
    }
    index_.clear();
    count_ = 0;
}

} // namespace llmem
