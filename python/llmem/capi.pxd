# cython: language_level=3
# Cython declarations of llmem's C API (csrc/include/llmem/llmem_capi.h; rules in docs/capi.md).
#
#     from llmem cimport capi
#     cdef const capi.llmem_capi* api = capi.import_capi()     # once, with the GIL
#     cdef capi.llmem_memory* mem
#     api.memory_get(<void*>py_memory, &mem, err, sizeof(err))
#     with nogil:
#         api.seq_pos_max(mem, 0, &pos, NULL, 0)
#
# Compile with include_dirs=[llmem.get_include()]. Every function pointer is nogil.

from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint32_t

cdef extern from "llmem/llmem_capi.h" nogil:
    enum:
        LLMEM_CAPI_VERSION
        LLMEM_OK
        LLMEM_ERR_INVALID
        LLMEM_ERR_BATCH
        LLMEM_ERR_STATE
        LLMEM_ERR_STALE
        LLMEM_ERR_TOO_SMALL
        LLMEM_ERR_FAILED
        LLMEM_ERR_NOMEM
        LLMEM_ERR_PYTHON
        LLMEM_ERR_LOCK
        LLMEM_ERR_INTERNAL
        LLMEM_KIND_KV
        LLMEM_KIND_KV_ISWA
        LLMEM_KIND_RECURRENT
        LLMEM_KIND_HYBRID
        LLMEM_KIND_HYBRID_ISWA
        LLMEM_STATUS_SUCCESS
        LLMEM_STATUS_NO_UPDATE
        LLMEM_STATUS_FAILED_PREPARE
        LLMEM_PART_BASE
        LLMEM_PART_SWA
        LLMEM_STATE_PARTIAL_ONLY

    const char* LLMEM_CAPI_CAPSULE

    ctypedef struct llmem_memory:
        pass
    ctypedef struct llmem_context:
        pass

    ctypedef struct llmem_memory_info:
        int32_t kind
        int32_t n_seq_max
        uint32_t kv_size
        uint32_t swa_size
        uint32_t n_stream
        uint32_t rs_size
        uint32_t n_rs_seq
        uint32_t n_layer

    ctypedef struct llmem_batch:
        uint32_t n_tokens
        const int32_t* token
        const float* embd
        uint32_t n_embd
        const int32_t* pos
        const int32_t* n_seq_id
        const int32_t* seq_id
        const int8_t* output

    ctypedef struct llmem_ubatch:
        uint32_t n_tokens
        uint32_t n_seq_tokens
        uint32_t n_seqs
        uint32_t n_seqs_unq
        int32_t equal_seqs
        const int32_t* token
        const int32_t* pos
        const int32_t* seq_id
        const int8_t* output
        const int32_t* batch_idx
        const int32_t* seq_id_unq

    ctypedef struct llmem_kv_slot:
        uint32_t n_tokens
        uint32_t n_kv
        uint32_t head
        uint32_t s0
        uint32_t s1

    ctypedef struct llmem_rs_slot:
        uint32_t head
        uint32_t n_rs
        int32_t rs_z
        uint32_t n_seqs

    ctypedef struct llmem_step:
        int32_t status
        uint32_t n_ubatches
        uint32_t n_kv
        uint32_t n_kv_swa

    ctypedef struct llmem_capi:
        uint32_t abi_version
        uint32_t struct_size
        const char* llmem_version

        int (*memory_get)(void* py_memory, llmem_memory** out, char* err, size_t err_len) nogil
        void (*memory_release)(llmem_memory* mem) nogil
        int (*memory_info)(const llmem_memory* mem, llmem_memory_info* out) nogil
        int (*layer_kv)(const llmem_memory* mem, int32_t il, int32_t* part, void** k, size_t* k_bytes, void** v,
                        size_t* v_bytes, char* err, size_t err_len) nogil
        int (*layer_rs)(const llmem_memory* mem, int32_t il, void** r, size_t* r_bytes, void** s, size_t* s_bytes,
                        char* err, size_t err_len) nogil

        int (*lock)(llmem_memory* mem) nogil
        int (*try_lock)(llmem_memory* mem) nogil
        int (*unlock)(llmem_memory* mem) nogil

        int (*clear)(llmem_memory* mem, int data, char* err, size_t err_len) nogil
        int (*seq_rm)(llmem_memory* mem, int32_t seq, int32_t p0, int32_t p1, int* removed, char* err,
                      size_t err_len) nogil
        int (*seq_cp)(llmem_memory* mem, int32_t src, int32_t dst, int32_t p0, int32_t p1, char* err,
                      size_t err_len) nogil
        int (*seq_keep)(llmem_memory* mem, int32_t seq, char* err, size_t err_len) nogil
        int (*seq_add)(llmem_memory* mem, int32_t seq, int32_t p0, int32_t p1, int32_t shift, char* err,
                       size_t err_len) nogil
        int (*seq_div)(llmem_memory* mem, int32_t seq, int32_t p0, int32_t p1, int32_t d, char* err,
                       size_t err_len) nogil
        int (*seq_pos_min)(llmem_memory* mem, int32_t seq, int32_t* out, char* err, size_t err_len) nogil
        int (*seq_pos_max)(llmem_memory* mem, int32_t seq, int32_t* out, char* err, size_t err_len) nogil
        int (*update)(llmem_memory* mem, int* applied, char* err, size_t err_len) nogil

        int (*init_batch)(llmem_memory* mem, const llmem_batch* batch, uint32_t n_ubatch, int embd_all,
                          llmem_context** out, int32_t* status, char* err, size_t err_len) nogil
        int (*decode_step)(llmem_memory* mem, const int32_t* seq_ids, const int32_t* token, uint32_t n,
                           uint32_t n_ubatch, llmem_step* out, int64_t* k_idxs, int32_t* pos, llmem_context** ctx, char* err,
                           size_t err_len) nogil

        int (*ctx_status)(const llmem_context* ctx) nogil
        uint32_t (*ctx_n_ubatches)(const llmem_context* ctx) nogil
        int (*ctx_apply)(llmem_context* ctx, char* err, size_t err_len) nogil
        int (*ctx_next)(llmem_context* ctx, int* more, char* err, size_t err_len) nogil
        int (*ctx_ubatch)(const llmem_context* ctx, llmem_ubatch* out, char* err, size_t err_len) nogil
        int (*ctx_kv_slot)(llmem_context* ctx, int32_t part, llmem_kv_slot* slot, int64_t* k_idxs, size_t cap,
                           char* err, size_t err_len) nogil
        int (*ctx_kq_mask)(llmem_context* ctx, int32_t part, int causal, float* out, size_t cap, char* err,
                           size_t err_len) nogil
        int (*ctx_rs_slot)(llmem_context* ctx, llmem_rs_slot* slot, int32_t* s_copy, size_t cap, char* err,
                           size_t err_len) nogil
        int (*ctx_rs_gather)(llmem_context* ctx, int32_t kind, int32_t il, void* out, size_t cap, char* err,
                             size_t err_len) nogil
        int (*ctx_rs_store)(llmem_context* ctx, int32_t kind, int32_t il, const void* rows, size_t nbytes,
                            uint32_t n_planes, char* err, size_t err_len) nogil
        void (*ctx_free)(llmem_context* ctx) nogil

        int (*state_size)(llmem_memory* mem, int32_t seq, uint32_t flags, size_t* out, char* err,
                          size_t err_len) nogil
        int (*state_write_into)(llmem_memory* mem, int32_t seq, uint32_t flags, uint8_t* buf, size_t cap,
                                size_t* written, char* err, size_t err_len) nogil
        int (*state_read)(llmem_memory* mem, int32_t seq, uint32_t flags, const uint8_t* data, size_t n,
                          char* err, size_t err_len) nogil


cdef extern from "Python.h":
    void* PyCapsule_Import(const char* name, int no_block) except NULL


cdef inline const llmem_capi* import_capi() except NULL:
    """The table of the installed llmem (imports llmem._core); ImportError when its C API is older
    than the header this module was compiled with."""
    cdef const llmem_capi* api = <const llmem_capi*>PyCapsule_Import(LLMEM_CAPI_CAPSULE, 0)
    if api.abi_version < LLMEM_CAPI_VERSION:
        raise ImportError(f"llmem's C API is version {api.abi_version}, this module needs {LLMEM_CAPI_VERSION}")
    return api
