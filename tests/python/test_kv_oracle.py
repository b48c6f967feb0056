"""Replay of the llama.cpp oracle recordings (tests/data/oracle) of the KV cache and iSWA
scenarios through llmem.KVCache / llmem.KVCacheISWA: decode results and micro-batches, sequence
operations, positions, can_shift, and the structure of every state blob (cells in order with
their sequence ids, stream counts, v_trans, layer counts, types, row sizes) must be llama.cpp's.

Where llama.cpp's failed restores change the memory and llmem's do not (docs/deviations.md, "A
failed state_read changes nothing"), the replay checks that llmem raised StateError and left the
cache unchanged, then performs llama.cpp's documented cleanup itself so the following steps stay
comparable.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from llmem import (Batch, BatchAllocator, BatchError, KVCache, KVCacheISWA, Rope, StateError,
                   Status, SWAType)
from llmem.kv_cache import STATE_PARTIAL_ONLY

from oracle_llmem import MODELS as MODEL_SHAPES
from oracle_replay import kv_cells, load_cases, meta_parts

SEQ_MAGIC = 0xAF143CD8
CASES = load_cases(kind="kv") + load_cases(kind="iswa")


def make_memory(case):
    info, ctx = case.info, case.context
    flash = ctx.get("flash_attn") == "on"
    common = dict(n_seq_max=info["n_seq_max"], unified=bool(ctx["kv_unified"]),
                  dtype_k=ctx.get("type_k", "f16"), dtype_v=ctx.get("type_v", "f16"), v_trans=not flash,
                  compat="b11312")  # recorded with llama.cpp b11312: its state bytes (format 3)
    if case.kind == "kv":
        shape = MODEL_SHAPES[case.model]
        return KVCache(2, shape.n_embd_k_gqa, shape.n_embd_v_gqa, info["n_ctx_seq"], rope=Rope(shape.head_dim),
                       **common)
    return KVCacheISWA(2, 32, 32, info["n_ctx_seq"], n_swa=info["n_swa"], swa_type=SWAType.STANDARD,
                       swa_full=bool(ctx["swa_full"]), is_swa_layer=[True, False],
                       n_ubatch=info["n_ubatch"], rope=Rope(16, mode="neox"), **common)


def parse_kv(blob, off):
    """One KV section of llmem's bytes in the oracle's meta shape (no hashes); returns (part, end)."""
    def take(fmt):
        nonlocal off
        vals = struct.unpack_from("<" + fmt, blob, off)
        off += struct.calcsize("<" + fmt)
        return vals

    (n_stream,) = take("I")
    streams = []
    for s in range(n_stream):
        (count,) = take("I")
        st = {"stream": s, "cell_count": count}
        if count:
            cells = []
            for _ in range(count):
                pos, n_seq = take("iI")
                cells.append([pos, list(take(f"{n_seq}i"))])
            st["cells"] = cells
            st["v_trans"], st["n_layer"] = take("II")
            st["k"] = []
            for _ in range(st["n_layer"]):
                t, row = take("iQ")
                st["k"].append({"type": t, "row_size": row})
                off += row * count
            st["v"] = []
            for _ in range(st["n_layer"]):
                if st["v_trans"]:
                    t, el, ne = take("iII")
                    st["v"].append({"type": t, "el_size": el, "n_embd_v_gqa": ne})
                    off += el * ne * count
                else:
                    t, row = take("iQ")
                    st["v"].append({"type": t, "row_size": row})
                    off += row * count
        streams.append(st)
    return {"n_stream": n_stream, "streams": streams}, off


def comparable(part):
    out = {"n_stream": part["n_stream"], "streams": []}
    for st in part["streams"]:
        d = {"cell_count": st["cell_count"]}
        if st["cell_count"]:
            d["cells"] = [[c[0], list(c[1])] for c in st["cells"]]
            d["v_trans"], d["n_layer"] = st["v_trans"], st["n_layer"]
            d["k"] = [{k: v for k, v in e.items() if k != "sha"} for e in st["k"]]
            d["v"] = [{k: v for k, v in e.items() if k != "sha"} for e in st["v"]]
        out["streams"].append(d)
    return out


class Replay:
    def __init__(self, case):
        self.case = case
        self.mem = make_memory(case)
        self.blobs = {}  # step index -> (kind, bytes)
        info = case.info
        self.n_batch, self.n_ubatch = info["n_batch"], info["n_ubatch"]
        self.arch = info["arch"].encode()

    # -- envelopes of llama_state_get_data / llama_state_seq_get_data -------------------------

    def seq_get(self, seq, flags):
        return struct.pack("<Ii", SEQ_MAGIC, seq) + self.mem.state_write(seq, flags)

    def full_get(self):
        return struct.pack("<I", len(self.arch)) + self.arch + self.mem.state_write(-1)

    def kv_parts(self, payload, flags=0):
        if self.case.kind == "kv":
            names = ["kv"]
        else:
            names = ["kv_swa"] if flags & STATE_PARTIAL_ONLY else ["kv_base", "kv_swa"]
        parts, off = {}, 0
        for name in names:
            parts[name], off = parse_kv(payload, off)
        return parts, off

    # -- steps ---------------------------------------------------------------------------------

    def decode(self, step):
        b = step.decode_batch()
        n = len(b["tokens"])
        if n == 0:
            return {"ret": -1}
        upd = self.mem.init_update()
        if upd.status == Status.SUCCESS:
            upd.apply()
        try:
            batch = Batch(token=np.array(b["tokens"], np.int32),
                          pos=None if b["pos"] is None else np.array(b["pos"], np.int32),
                          seq_id=b["seq_ids"],
                          output=None if b["logits"] is None else np.array(b["logits"], bool))
            balloc = BatchAllocator(self.case.info["n_seq_max"], n_vocab=64)
            balloc.init(batch, self.mem)
        except BatchError:
            return {"ret": -1}
        ctx = self.mem.init_batch(balloc, self.n_ubatch)
        if ctx.status != Status.SUCCESS:
            return {"ret": 1}
        ubs = []
        for ub in ctx:
            seqs = ub.seq_id_list
            ubs.append({"n_seq_tokens": ub.n_seq_tokens, "n_seqs": ub.n_seqs,
                        "equal_seqs": int(ub.equal_seqs), "seq_id_unq": ub.seq_id_unq.tolist(),
                        # id sets compared sorted: their order is the allocator's business
                        "tokens": [[int(t), int(p), sorted(s), int(o)] for t, p, s, o in
                                   zip(ub.token.tolist(), ub.pos.tolist(), seqs, ub.output.tolist())]})
        return {"ret": 0, "ubatches": ubs}

    def state_set(self, step, whole):
        """Returns (observation, what llama.cpp did to the memory on failure): None (nothing),
        "erase" (the destination sequence), "clear" (the whole cache) or "stop" (a half-applied
        state llmem does not reproduce)."""
        kind, blob = self.blobs[step.args["from"]]
        if "truncate" in step.args:
            blob = blob[:step.args["truncate"]]
        seq = -1 if whole else step.args["seq"]
        flags = step.args.get("flags", 0)
        # envelope checks happen before the memory is touched, in llama.cpp too
        if whole:
            if len(blob) < 4:
                return {"ret": 0}, None
            (n,) = struct.unpack_from("<I", blob)
            if blob[4:4 + n] != self.arch or len(blob) < 4 + n:
                return {"ret": 0}, None
            payload = blob[4 + n:]
        else:
            if len(blob) < 8 or struct.unpack_from("<I", blob)[0] != SEQ_MAGIC:
                return {"ret": 0}, None
            payload = blob[8:]
        before = str(self.mem.cells())
        try:
            self.mem.state_read(payload, seq, flags)
        except StateError:
            assert str(self.mem.cells()) == before, f"{step.where()}: a failed restore changed the cache"
            return {"ret": 0}, self.llama_cleanup(payload, whole)
        return {"ret": len(blob)}, None

    def llama_cleanup(self, payload, whole):
        """What llama.cpp's reader had done to the memory when it failed (spec §8.3-8.5)."""
        if self.case.kind != "kv":
            return "stop"  # iSWA: llama.cpp keeps a restored base section (spec §11 case 36)
        n_stream = self.mem.n_stream
        if len(payload) < 4 or struct.unpack_from("<I", payload)[0] != n_stream:
            return None  # n_stream missing or wrong: refused before any change
        off = 4
        if not whole:
            for _ in range(n_stream):
                if len(payload) < off + 4:
                    return None  # the read throws before the destination is erased
                (count,) = struct.unpack_from("<I", payload, off)
                if count:
                    return "erase"
                off += 4
            return None
        # whole restore: the cache was cleared first; a cut inside the cell records keeps the
        # cells read so far (a half state llmem never produces)
        for _ in range(n_stream):
            if len(payload) < off + 4:
                return "stop"
            (count,) = struct.unpack_from("<I", payload, off)
            off += 4
            for _ in range(count):
                if len(payload) < off + 8:
                    return "stop"
                n_seq = struct.unpack_from("<I", payload, off + 4)[0]
                off += 8 + 4 * n_seq
                if len(payload) < off:
                    return "stop"
            if count:
                return "clear"  # failed in the data part (or a returned failure)
        return "clear"


#: Steps where llmem deviates on purpose (docs/deviations.md): the replay checks llmem's own
#: behaviour there and stops, because llama.cpp's memory afterwards is one llmem never produces.
DEVIATIONS = {
    ("batch_validation_edge", 4): "a ubatch position below 0 is refused (ValueError)",
    ("kv_seq_ids_beyond_n_seq_max", 1): "seq_cp to an id >= n_seq_max is refused (ValueError)",
}


#: scenario -> step at which a replay stopped at a deviation (for reports; see DEVIATIONS)
STOPPED: dict = {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_oracle_replay(case):
    r = Replay(case)
    mem = r.mem
    assert mem.get_can_shift() == case.info["can_shift"]
    steps = list(case.steps())
    for i, step in enumerate(steps):
        if step.refused:
            continue
        a, obs, op = step.args, step.obs, step.op
        if (case.name, i) in DEVIATIONS:
            with pytest.raises(ValueError):
                if op == "decode":
                    r.decode(step)
                else:
                    mem.seq_cp(a["src"], a["dst"], a["p0"], a["p1"])
            STOPPED[case.name] = i
            return
        got = {}
        if op == "decode":
            got = r.decode(step)
        elif op == "seq_rm":
            got = {"ret": int(mem.seq_rm(a["seq"], a["p0"], a["p1"]))}
        elif op == "seq_cp":
            mem.seq_cp(a["src"], a["dst"], a["p0"], a["p1"])
        elif op == "seq_keep":
            mem.seq_keep(a["seq"])
        elif op == "seq_add":
            mem.seq_add(a["seq"], a["p0"], a["p1"], a["delta"])
        elif op == "seq_div":
            mem.seq_div(a["seq"], a["p0"], a["p1"], a["d"])
        elif op == "clear":
            mem.clear(a.get("data", True))
        elif op == "pos":
            got = {"min": [mem.seq_pos_min(s) for s in a["seqs"]],
                   "max": [mem.seq_pos_max(s) for s in a["seqs"]]}
        elif op == "can_shift":
            got = {"ret": int(mem.get_can_shift())}
        elif op in ("state_seq_get", "state_get"):
            blob = r.seq_get(a["seq"], a.get("flags", 0)) if op == "state_seq_get" else r.full_get()
            r.blobs[i] = (op, blob)
            payload = blob[8:] if op == "state_seq_get" else blob[4 + len(r.arch):]
            parts, end = r.kv_parts(payload, a.get("flags", 0))
            assert end == len(payload)
            got = {"size": len(blob), "n": len(blob)}
            exp_parts = meta_parts(obs.get("meta"))
            for name, part in parts.items():
                assert comparable(part) == comparable(exp_parts[name]), step.where(name)
        elif op in ("state_seq_set", "state_set"):
            got, cleanup = r.state_set(step, op == "state_set")
            assert got["ret"] == obs["ret"], step.where("ret")
            if cleanup == "stop":
                STOPPED[case.name] = i
                return
            if cleanup == "erase":
                mem.seq_rm(a["seq"], -1, -1)
            elif cleanup == "clear":
                mem.clear(True)
        elif op == "logits":
            continue
        else:
            pytest.fail(f"unknown op {op}")
        for field in step.exact_fields():
            if field == "meta":
                continue
            if field == "ubatches" and "ubatches" not in got:
                continue
            want = obs[field]
            if field == "ubatches":
                want = [dict(u, tokens=[[t, p, sorted(s), o] for t, p, s, o in u["tokens"]]) for u in want]
            assert got[field] == want, step.where(field)
