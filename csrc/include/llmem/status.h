#pragma once

#include <cstdint>

namespace llmem {

/// Outcome of preparing a memory context (llama.cpp's llama_memory_status, same numbering).
enum class memory_status : int32_t {
    SUCCESS        = 0,
    NO_UPDATE      = 1,
    FAILED_PREPARE = 2,
    FAILED_COMPUTE = 3,
};

/// True for FAILED_PREPARE and FAILED_COMPUTE.
bool status_is_fail(memory_status s);

/// Status of a context made of two: the first failure wins (a before b); otherwise SUCCESS if
/// either succeeded, else NO_UPDATE.
memory_status status_combine(memory_status a, memory_status b);

const char * status_name(memory_status s);

} // namespace llmem
