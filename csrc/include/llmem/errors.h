#pragma once

#include <stdexcept>
#include <string>

namespace llmem {

// Bad arguments throw std::invalid_argument (Python ValueError); the classes below are the
// domain failures. Every throwing entry point leaves the object it was called on unchanged.

/// Base of llmem's own failures (Python: LlmemError).
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Why the batch allocator refused a batch. The names follow llama.cpp's checks in order.
enum class batch_reject {
    EMPTY,               // the batch has no tokens
    SEQ_LIMIT,           // n_seq_max above SEQ_MAX_LIMIT
    MIXED_CONTENT,       // entries disagree on carrying a token id / an embedding
    NO_CONTENT,          // entries carry neither a token id nor an embedding
    BAD_TOKEN,           // token id outside [0, n_vocab)
    BAD_SHAPE,           // an input array has the wrong length for this batch
    NO_SEQ_ID,           // an entry belongs to no sequence
    BAD_SEQ_ID,          // a sequence id outside [0, n_seq_max)
    POS_NOT_CONTINUING,  // first position of a sequence is not the memory's last position + 1
    POS_GAP,             // positions of a sequence leave a gap inside the batch
    COUPLED_DIVERGED,    // sequences coupled by a token differ in the memory
    POS_DECREASING,      // positions of a sequence go backwards inside the batch
    POS_OVERFLOW,        // a sequence's positions would pass INT32_MAX (the memory ends there)
};

const char * batch_reject_name(batch_reject r);

/// A batch the allocator refuses (Python: BatchError, a ValueError).
class batch_error : public error {
public:
    batch_error(batch_reject reason, const std::string & msg) : error(msg), reason_(reason) {}
    batch_reject reason() const { return reason_; }

private:
    batch_reject reason_;
};

/// Why state bytes were refused, so that a caller can act on it (Python: ``StateError.reason``).
enum class state_reject {
    CORRUPT,          // truncated, malformed or failing a checksum: the bytes are unusable
    NO_ROOM,          // well-formed, but this memory has no free cells for them now
    CONFIG_MISMATCH,  // written by a memory of another kind or configuration (layers, types, sizes, ids)
    VERSION,          // a state file format this llmem does not read
};

const char * state_reject_name(state_reject r);

/// State bytes that cannot be read into a memory (Python: StateError, a ValueError).
class state_error : public error {
public:
    explicit state_error(const std::string & msg, state_reject reason = state_reject::CORRUPT)
        : error(msg), reason_(reason) {}
    state_reject reason() const { return reason_; }

private:
    state_reject reason_;
};

} // namespace llmem
