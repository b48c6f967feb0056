#pragma once

#include "llmem/kv_cache.h"
#include "llmem/rs_memory.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace llmem {

/// State flag asking state_write to prefix the versioned header and state_read to require and
/// check it. The top bit, so it never collides with llama_state_seq_flags (PARTIAL_ONLY = 1,
/// ON_DEVICE = 2) and is stripped before the flags reach the llama.cpp-compatible readers.
constexpr uint32_t STATE_HEADER = 1u << 31;

/// Format version the header writer emits and the only one the checker accepts.
constexpr uint32_t STATE_FILE_VERSION = 1;

/// The 8 bytes every header starts with.
constexpr char STATE_FILE_MAGIC[8] = { 'L', 'L', 'M', 'E', 'M', 'S', 'T', 'F' };

/// Fixed part of the header (magic to payload CRC); the configuration record and the header
/// CRC follow it (docs/reliability.md has the byte table).
constexpr size_t STATE_HEADER_FIXED_BYTES = 44;

/// Bound on the configuration record a reader accepts: a corrupted length field must not make
/// it allocate or scan more than this (real records are a few KiB even for 100-layer models).
constexpr uint32_t STATE_HEADER_MAX_CONFIG_BYTES = 1u << 20;

/// Which memory class wrote a state (the composition decides the payload's sections).
enum class memory_kind : uint32_t {
    KV_CACHE      = 1,  // one KV section
    KV_CACHE_ISWA = 2,  // base then swa KV sections (swa only with PARTIAL_ONLY)
    RECURRENT     = 3,  // one recurrent block
    HYBRID        = 4,  // KV section then recurrent block (recurrent only with PARTIAL_ONLY)
    HYBRID_ISWA   = 5,  // base, swa, recurrent (swa, recurrent with PARTIAL_ONLY)
};

const char * memory_kind_name(uint32_t kind);

/// The parts of one memory whose configuration a header records: every attention cache in
/// state order (KV: the cache; iSWA: base, swa) and the recurrent memory, or null.
struct state_memory {
    memory_kind                   kind = memory_kind::KV_CACHE;
    std::vector<const kv_cache *> caches;
    const rs_memory *             recr = nullptr;
};

/// One named integer of a configuration record ("base.n_layer" = 2).
struct state_config_field {
    std::string name;
    int64_t     value;
};

/// The configuration record of `mem`: geometry, dtypes, streams, window and recurrent sizes of
/// every part, in a fixed order. Throws std::invalid_argument when the parts do not match kind.
std::vector<state_config_field> state_config(const state_memory & mem);

/// CRC-32 (IEEE 802.3, the polynomial of zlib.crc32), continuing from `crc`.
uint32_t crc32(const uint8_t * data, size_t n, uint32_t crc = 0);

/// The header for `payload`, the raw state bytes `mem` wrote for `seq` (-1: whole memory) with
/// `flags` (STATE_HEADER may be set; it is recorded as given).
std::vector<uint8_t> state_header_write(const state_memory & mem, int32_t seq, uint32_t flags, const uint8_t * payload,
                                        size_t n_payload);

/// Check the header at the start of data[0..n) for a read into `mem` of `seq` (-1: whole
/// memory) with `flags`: magic, version, checksums, memory kind, scope (whole memory or one
/// sequence), the llama.cpp flags, every configuration field and the payload length. Returns the
/// offset of the payload, which runs to n. Throws state_error naming the first mismatch
/// ("base.n_layer: file 4, memory 2"); reads nothing outside data[0..n) and allocates at most
/// STATE_HEADER_MAX_CONFIG_BYTES plus the memory's own record.
size_t state_header_check(const state_memory & mem, const uint8_t * data, size_t n, int32_t seq, uint32_t flags);

} // namespace llmem
