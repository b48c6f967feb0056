#include "llmem/state_file.h"

#include "llmem/errors.h"

#include <array>
#include <cstring>
#include <stdexcept>

#ifdef LLMEM_HAVE_ZLIB
#include <zlib.h>
#endif

namespace llmem {

namespace {

// The header bytes after the magic, little-endian like the payload (docs/reliability.md).
constexpr size_t OFF_VERSION      = 8;
constexpr size_t OFF_KIND         = 12;
constexpr size_t OFF_FLAGS        = 16;
constexpr size_t OFF_SEQ          = 20;
constexpr size_t OFF_N_FIELDS     = 24;
constexpr size_t OFF_CONFIG_BYTES = 28;
constexpr size_t OFF_PAYLOAD_LEN  = 32;
constexpr size_t OFF_PAYLOAD_CRC  = 40;
static_assert(OFF_PAYLOAD_CRC + 4 == STATE_HEADER_FIXED_BYTES, "the fixed header ends with the payload CRC");

// Only PARTIAL_ONLY changes which sections the payload holds; ON_DEVICE is a write-side check.
constexpr uint32_t LAYOUT_FLAGS = RS_STATE_PARTIAL_ONLY;

// Longest field name a record may hold (the names are ours: "recr.layer[99].s_row_bytes").
constexpr size_t MAX_NAME = 64;

#ifndef LLMEM_HAVE_ZLIB
std::array<uint32_t, 256> make_crc_table() {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) {
            c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        t[i] = c;
    }
    return t;
}
#endif

template <typename T>
void put(std::vector<uint8_t> & out, size_t at, T v) {
    std::memcpy(out.data() + at, &v, sizeof(T));
}

template <typename T>
void append(std::vector<uint8_t> & out, T v) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    put(out, at, v);
}

template <typename T>
T get(const uint8_t * data, size_t at) {
    T v;
    std::memcpy(&v, data + at, sizeof(T));
    return v;
}

// A name read from the file, as message text: printable ASCII kept, every other byte as \xNN
// (the bytes are untrusted; a message must stay valid UTF-8 for Python's StateError).
std::string printable(const std::string & name) {
    static const char hex[] = "0123456789abcdef";
    std::string out;
    for (const unsigned char ch : name) {
        if (ch >= 0x20 && ch < 0x7f && ch != '\\') {
            out.push_back(char(ch));
        } else {
            out += "\\x";
            out.push_back(hex[ch >> 4]);
            out.push_back(hex[ch & 15]);
        }
    }
    return out;
}

std::string scope_name(int32_t seq) {
    return seq < 0 ? "the whole memory" : "one sequence (" + std::to_string(seq) + ")";
}

void mismatch(const std::string & what, int64_t file, int64_t memory) {
    throw state_error(what + ": file " + std::to_string(file) + ", memory " + std::to_string(memory), state_reject::CONFIG_MISMATCH);
}

void describe_cache(std::vector<state_config_field> & out, const std::string & prefix, const kv_cache & c) {
    const kv_cache_params & p = c.params();
    auto add = [&](const char * name, int64_t v) { out.push_back({ prefix + "." + name, v }); };
    add("kv_size", p.kv_size);
    add("n_seq_max", p.n_seq_max);
    add("n_stream", c.n_stream());
    add("n_pad", p.n_pad);
    add("n_swa", p.n_swa);
    add("swa_type", int64_t(p.swa));
    add("n_pos_per_embd", p.n_pos_per_embd);
    add("type_k", p.type_k);
    add("type_v", p.type_v);
    add("v_trans", p.v_trans ? 1 : 0);
    add("n_embd_v_max", p.n_embd_v_max);
    add("n_layer", c.n_layer());
    for (uint32_t l = 0; l < c.n_layer(); ++l) {
        const std::string layer = "layer[" + std::to_string(l) + "].";
        out.push_back({ prefix + "." + layer + "il", p.layer_il[l] });
        out.push_back({ prefix + "." + layer + "n_embd_k", p.n_embd_k[l] });
        out.push_back({ prefix + "." + layer + "n_embd_v", p.n_embd_v[l] });
    }
}

void describe_recurrent(std::vector<state_config_field> & out, const rs_memory & r) {
    const rs_buffers & b = r.buffers();
    auto add = [&](const std::string & name, int64_t v) { out.push_back({ "recr." + name, v }); };
    add("size", r.size());
    add("n_seq_max", r.n_seq_max());
    add("n_rs_seq", r.n_rs_seq());
    add("n_layer", b.n_layer_total);
    add("type_r", b.type_r);
    add("type_s", b.type_s);
    add("n_present", int64_t(b.r_row_bytes.size()));
    for (size_t l = 0; l < b.r_row_bytes.size(); ++l) {
        const std::string layer = "layer[" + std::to_string(l) + "].";
        add(layer + "r_row_bytes", int64_t(b.r_row_bytes[l]));
        add(layer + "s_row_bytes", int64_t(b.s_row_bytes[l]));
        if (b.p_bytes(l) != 0) {  // only layers with a P array: other memories' headers stay as they were
            add(layer + "p_row_bytes", int64_t(b.p_bytes(l)));
        }
    }
}

} // namespace

const char * memory_kind_name(uint32_t kind) {
    switch (memory_kind(kind)) {
        case memory_kind::KV_CACHE:      return "KVCache";
        case memory_kind::KV_CACHE_ISWA: return "KVCacheISWA";
        case memory_kind::RECURRENT:     return "RecurrentMemory";
        case memory_kind::HYBRID:        return "HybridMemory";
        case memory_kind::HYBRID_ISWA:   return "HybridISWAMemory";
    }
    return "unknown";
}

uint32_t crc32(const uint8_t * data, size_t n, uint32_t crc) {
#ifdef LLMEM_HAVE_ZLIB
    // zlib's CRC-32 (the one zlib.crc32 runs): several GB/s where the byte table below does
    // ~300 MiB/s. Its length is an unsigned int, so a large state goes in pieces.
    uLong c = crc;
    constexpr size_t piece = size_t(1) << 30;
    while (n > 0) {
        const size_t k = n < piece ? n : piece;
        c = ::crc32(c, data, uInt(k));
        data += k;
        n -= k;
    }
    return uint32_t(c);
#else
    static const std::array<uint32_t, 256> table = make_crc_table();
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) {
        crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
    }
    return ~crc;
#endif
}

std::vector<state_config_field> state_config(const state_memory & mem) {
    size_t n_caches = 0;
    bool   recr     = false;
    switch (mem.kind) {
        case memory_kind::KV_CACHE:      n_caches = 1; break;
        case memory_kind::KV_CACHE_ISWA: n_caches = 2; break;
        case memory_kind::RECURRENT:     recr = true; break;
        case memory_kind::HYBRID:        n_caches = 1; recr = true; break;
        case memory_kind::HYBRID_ISWA:   n_caches = 2; recr = true; break;
        default: throw std::invalid_argument("unknown memory kind " + std::to_string(uint32_t(mem.kind)));
    }
    if (mem.caches.size() != n_caches || (mem.recr != nullptr) != recr) {
        throw std::invalid_argument(std::string("a ") + memory_kind_name(uint32_t(mem.kind)) + " state has " +
                                    std::to_string(n_caches) + " attention cache(s) and " +
                                    (recr ? "a" : "no") + " recurrent memory");
    }
    std::vector<state_config_field> out;
    for (size_t i = 0; i < n_caches; ++i) {
        if (mem.caches[i] == nullptr) {
            throw std::invalid_argument("state_memory: null attention cache");
        }
        describe_cache(out, n_caches == 1 ? "attn" : (i == 0 ? "base" : "swa"), *mem.caches[i]);
    }
    if (recr) {
        describe_recurrent(out, *mem.recr);
    }
    return out;
}

std::vector<uint8_t> state_header_write(const state_memory & mem, int32_t seq, uint32_t flags, const uint8_t * payload,
                                        size_t n_payload) {
    const std::vector<state_config_field> config = state_config(mem);
    std::vector<uint8_t> out(STATE_HEADER_FIXED_BYTES, 0);
    std::memcpy(out.data(), STATE_FILE_MAGIC, sizeof(STATE_FILE_MAGIC));
    put<uint32_t>(out, OFF_VERSION, STATE_FILE_VERSION);
    put<uint32_t>(out, OFF_KIND, uint32_t(mem.kind));
    put<uint32_t>(out, OFF_FLAGS, flags);
    put<int32_t>(out, OFF_SEQ, seq < 0 ? -1 : seq);
    put<uint32_t>(out, OFF_N_FIELDS, uint32_t(config.size()));
    put<uint64_t>(out, OFF_PAYLOAD_LEN, uint64_t(n_payload));
    put<uint32_t>(out, OFF_PAYLOAD_CRC, crc32(payload, n_payload));
    for (const auto & f : config) {
        out.push_back(uint8_t(f.name.size()));
        out.insert(out.end(), f.name.begin(), f.name.end());
        append<int64_t>(out, f.value);
    }
    put<uint32_t>(out, OFF_CONFIG_BYTES, uint32_t(out.size() - STATE_HEADER_FIXED_BYTES));
    append<uint32_t>(out, crc32(out.data(), out.size()));
    return out;
}

size_t state_header_check(const state_memory & mem, const uint8_t * data, size_t n, int32_t seq, uint32_t flags) {
    if (data == nullptr && n != 0) {
        throw std::invalid_argument("state_read: no data");
    }
    if (n < sizeof(STATE_FILE_MAGIC) || std::memcmp(data, STATE_FILE_MAGIC, sizeof(STATE_FILE_MAGIC)) != 0) {
        throw state_error("not an llmem state file: the versioned header's magic 'LLMEMSTF' is missing "
                          "(read raw llama.cpp state bytes without the STATE_HEADER flag)");
    }
    if (n < STATE_HEADER_FIXED_BYTES + 4) {
        throw state_error("truncated state header: " + std::to_string(n) + " bytes");
    }
    const uint32_t version = get<uint32_t>(data, OFF_VERSION);
    if (version != STATE_FILE_VERSION) {
        throw state_error("state file format version " + std::to_string(version) + ", this llmem reads version " +
                          std::to_string(STATE_FILE_VERSION), state_reject::VERSION);
    }
    const uint32_t config_bytes = get<uint32_t>(data, OFF_CONFIG_BYTES);
    if (config_bytes > STATE_HEADER_MAX_CONFIG_BYTES || config_bytes > n - STATE_HEADER_FIXED_BYTES - 4) {
        throw state_error("truncated or corrupt state header: its configuration record claims " +
                          std::to_string(config_bytes) + " bytes, " +
                          std::to_string(n - STATE_HEADER_FIXED_BYTES - 4) + " follow");
    }
    const size_t header_end = STATE_HEADER_FIXED_BYTES + config_bytes;
    // the header's own checksum comes first: a corrupted field must not be reported as a
    // configuration mismatch
    if (crc32(data, header_end) != get<uint32_t>(data, header_end)) {
        throw state_error("state header checksum mismatch: the header is corrupt");
    }
    const size_t payload_at = header_end + 4;

    const uint32_t kind = get<uint32_t>(data, OFF_KIND);
    if (kind != uint32_t(mem.kind)) {
        throw state_error(std::string("memory kind: file ") + memory_kind_name(kind) + " (" + std::to_string(kind) +
                          "), memory " + memory_kind_name(uint32_t(mem.kind)) + " (" +
                          std::to_string(uint32_t(mem.kind)) + ")", state_reject::CONFIG_MISMATCH);
    }
    const int32_t file_seq = get<int32_t>(data, OFF_SEQ);
    if ((file_seq < 0) != (seq < 0)) {
        throw state_error("scope: the file holds " + scope_name(file_seq) + ", the read is into " + scope_name(seq), state_reject::CONFIG_MISMATCH);
    }
    const uint32_t file_flags = get<uint32_t>(data, OFF_FLAGS);
    if ((file_flags & LAYOUT_FLAGS) != (flags & LAYOUT_FLAGS)) {
        throw state_error("flags PARTIAL_ONLY: file " + std::to_string(file_flags & LAYOUT_FLAGS) + ", read " +
                          std::to_string(flags & LAYOUT_FLAGS), state_reject::CONFIG_MISMATCH);
    }

    const std::vector<state_config_field> own = state_config(mem);
    const uint32_t n_fields = get<uint32_t>(data, OFF_N_FIELDS);
    size_t at = STATE_HEADER_FIXED_BYTES;
    for (size_t i = 0; i < own.size() && i < n_fields; ++i) {
        if (at >= header_end) {
            throw state_error("corrupt state header: the configuration record ends after " + std::to_string(i) +
                              " of " + std::to_string(n_fields) + " fields");
        }
        const size_t len = data[at];
        if (len > MAX_NAME || len + 8 > header_end - at - 1) {
            throw state_error("corrupt state header: configuration field " + std::to_string(i) + " overruns the record");
        }
        const std::string name(reinterpret_cast<const char *>(data + at + 1), len);
        const int64_t     value = get<int64_t>(data, at + 1 + len);
        at += 1 + len + 8;
        if (name != own[i].name) {
            throw state_error("configuration field " + std::to_string(i) + ": file '" + printable(name) +
                              "', memory '" + own[i].name + "'", state_reject::CONFIG_MISMATCH);
        }
        if (value != own[i].value) {
            mismatch(name, value, own[i].value);
        }
    }
    if (n_fields != own.size()) {
        mismatch("configuration fields", n_fields, int64_t(own.size()));
    }
    if (at != header_end) {
        throw state_error("corrupt state header: " + std::to_string(header_end - at) +
                          " bytes after the configuration fields");
    }

    const uint64_t payload_len = get<uint64_t>(data, OFF_PAYLOAD_LEN);
    if (payload_len != n - payload_at) {
        throw state_error("payload length: file " + std::to_string(payload_len) + ", data " +
                          std::to_string(n - payload_at) + " bytes after the header");
    }
    const uint32_t payload_crc = get<uint32_t>(data, OFF_PAYLOAD_CRC);
    if (crc32(data + payload_at, n - payload_at) != payload_crc) {
        throw state_error("state payload checksum mismatch: the state bytes are corrupt");
    }
    return payload_at;
}

} // namespace llmem
