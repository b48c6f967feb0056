"""Differential test: llama.cpp's recorded answers (``tests/data/oracle/``) replayed through llmem.

One test per recorded scenario. ``oracle_llmem.LlmemRunner`` builds the memory llama.cpp built and
executes the steps as llama.cpp's decode / memory / state functions do; every field the recordings
hold llmem to exactly (the context ``info``: sizes and ``can_shift``; ``oracle_replay.COMPARE_EXACT``:
``ret`` of decode / seq_rm / state sets, ``min``/``max`` of pos, ``can_shift``, the ubatches of traced
decodes, ``size``/``n``/``meta`` of state blobs without payload hashes) is compared, step by step, in
order; the first difference fails the test with the scenario, step index, op, field, expected and got
values. ``test_oracle_payload_relations`` adds relative checks of the state bytes.

Where llmem deliberately does something else than llama.cpp (fidelity policy of
``/work/shared/spec/README.md``: a bad argument raises, a failed call changes nothing, a failed
restore leaves the memory as it was; ``docs/deviations.md``), ``DEVIATIONS`` below states, step by
step, what llmem must answer instead, with the reason. Nothing is skipped: hybrid scenarios fail
with "HybridMemory not available" until the hybrid classes are merged.

Logits are not compared (llmem runs no model); ``logits`` steps are executed as no-ops.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import pytest

from oracle_replay import KNOWN_META_GAPS, Case, Step, load_cases, strip_hashes
from oracle_llmem import DecodeRefused, HybridUnavailable, LlmemRunner

CASES = load_cases()

Expected = Union[Any, Callable[[Case], Any]]


@dataclass(frozen=True)
class Deviation:
    """What llmem answers at one step where it deliberately differs from llama.cpp.

    ``expect`` maps an exact field to llmem's value (or to a function of the case computing it from
    the recordings, e.g. "the blob of step 20 again"); ``raises`` says the step raises instead of
    returning. ``why`` cites the deviation.
    """

    why: str
    expect: Dict[str, Expected] = field(default_factory=dict)
    raises: Optional[Type[BaseException]] = None
    match: Optional[str] = None


def recorded(step: int, fld: str, transform: Callable[[Any], Any] = lambda v: v) -> Callable[[Case], Any]:
    """llmem's value is llama.cpp's recorded value of another step of the same case (transformed)."""
    def get(case: Case) -> Any:
        obs = case.expected["observations"][step]
        return transform(copy.deepcopy(obs[fld]))
    get.__name__ = f"recorded(step {step}, {fld})"
    return get


def drop_cells(stream: int, *cells: list) -> Callable[[Any], Any]:
    """Transform a recorded full-state ``meta``: remove ``cells`` ([pos, [seq ids]]) from a stream
    of the (single) KV part and lower its ``cell_count``."""
    def tr(meta: Dict[str, Any]) -> Dict[str, Any]:
        st = meta["parts"][0]["streams"][stream]
        for c in cells:
            st["cells"].remove(c)
        st["cell_count"] = len(st["cells"])
        return meta
    return tr


def _empty_iswa_seq_meta(case: Case) -> Dict[str, Any]:
    """The meta of an iSWA sequence blob whose sequence has no cell (both sections empty)."""
    return {"magic": "0xaf143cd8", "seq_id": 1, "trailing_bytes": 0, "parts": [
        {"part": "kv_base", "offset": 8, "n_stream": 1, "streams": [{"stream": 0, "cell_count": 0}]},
        {"part": "kv_swa", "offset": 16, "n_stream": 1, "streams": [{"stream": 0, "cell_count": 0}]}]}


def add_recurrent_cells(*cells: list) -> Callable[[Any], Any]:
    """Transform a recorded state ``meta``: append ``cells`` ([pos, [seq ids]]) to its recurrent part."""
    def tr(meta: Dict[str, Any]) -> Dict[str, Any]:
        part = next(p for p in meta["parts"] if p["part"] == "recurrent")
        part["cells"].extend(copy.deepcopy(list(cells)))
        part["cell_count"] = len(part["cells"])
        return meta
    return tr


def empty_iswa_seq_blob_meta(seq: int) -> Dict[str, Any]:
    """``meta`` of an iSWA sequence blob (flags 0) of a sequence that neither cache holds (1 stream)."""
    return {"magic": "0xaf143cd8", "seq_id": seq, "trailing_bytes": 0, "parts": [
        {"part": "kv_base", "offset": 8, "n_stream": 1, "streams": [{"stream": 0, "cell_count": 0}]},
        {"part": "kv_swa", "offset": 16, "n_stream": 1, "streams": [{"stream": 0, "cell_count": 0}]}]}


# Reasons, cited by the table below.
_ISWA_PARTIAL_WHOLE = (
    "an iSWA state read with PARTIAL_ONLY of a blob written without it (base + SWA sections) is refused "
    "by llmem because bytes follow the section it reads")
_RESTORE_UNCHANGED = (
    "a failed state read leaves the memory unchanged (fidelity policy 2, shared/spec/README.md: 'a failed "
    "restore that leaves a sequence erased or half-written' is fixed; KVCache/RecurrentMemory.state_read "
    "docstrings: 'raises StateError and changes nothing'), where llama.cpp {what}")
_KV_POS_MINUS_1 = (
    "llmem refuses to place a token at position -1 in a KV cache (ValueError from init_batch, memory "
    "untouched; csrc/core/kv_cache.cpp check_ubatch): llama.cpp accepts the batch but writes a cell at "
    "pos -1 that counts as empty (not saved in state blobs) while seq_pos_min reports -1, a data-losing "
    "quirk (fidelity policy 2; docs/deviations.md, KV cache, 'Bad arguments raise')")
_KV_SEQ_CP_BEYOND = (
    "llmem refuses seq_cp to a destination >= n_seq_max (ValueError, memory untouched; "
    "csrc/core/kv_cache.cpp seq_cp: 'refusing keeps every cell saveable'): llama.cpp accepts ids up to "
    "255 in a unified cache but its state writer drops them (kv_cache.md §8.2 [quirk], case 16), a "
    "data-losing quirk (fidelity policy 2: 'a restore that drops sequence ids'; docs/deviations.md, "
    "KV cache, 'Sequence ids that could never be saved are refused')")
_HYBRID_ALL_OR_NOTHING = (
    "a failed hybrid state_read changes neither part (docs/deviations.md, 'Hybrid memories': all or "
    "nothing), where llama.cpp {what}")
_JAMBA_SEQ2 = (
    "; seq 2 therefore keeps the recurrent-only state restored at step 8 (PARTIAL_ONLY blob: recurrent "
    "cell at pos 5, no attention cells)")
# jamba, one recurrent cell of a full state: pos, n_seq_id 1, seq id (12 bytes) + r rows 2 x 768 bytes
# + s rows 2 x 4096 bytes
_JAMBA_RECURRENT_CELL_BYTES = 12 + 2 * 768 + 2 * 4096
_ISWA_ALL_OR_NOTHING = (
    "KVCacheISWA.state_read is all or nothing across the base and SWA sections (its docstring; fidelity "
    "policy 2): at step 7 the PARTIAL_ONLY blob read with flags 0 fails (ret 0 on both sides) but "
    "llama.cpp keeps the base section restored (kv_cache.md §9, case 36), llmem restores nothing")

_SHARED_TOKEN_DIVERGED = (
    "a token shared by seqs 1 and 2, whose recurrent states diverged at step 3 (same positions, "
    "different tokens), is refused by llmem (FAILED_PREPARE, nothing changed; docs/deviations.md R14): "
    "llama.cpp accepts it and keeps one recurrent state for both, silently dropping seq 2's")

#: (scenario, step) -> what llmem answers instead of the recording
DEVIATIONS: Dict[Tuple[str, int], Deviation] = {
    # -- a shared token over diverged recurrent states (single-stream hybrid) ---------------------
    ("hyb_multiseq_unified", 8): Deviation(_SHARED_TOKEN_DIVERGED, expect={"ret": 1, "ubatches": []}),
    ("hyb_multiseq_unified", 9): Deviation(_SHARED_TOKEN_DIVERGED + "; both seqs stay at position 2",
                                           expect={"min": [-1, 2, 2], "max": [-1, 2, 2]}),
    ("hyb_multiseq_unified", 10): Deviation(
        _SHARED_TOKEN_DIVERGED + "; the state is step 7's",
        expect={f: recorded(7, f) for f in ("size", "n", "meta")}),
    ("hyb_multiseq_unified", 12): Deviation(_SHARED_TOKEN_DIVERGED + "; both seqs stay at position 2",
                                            expect={"min": [-1, 2, 2], "max": [-1, 2, 2]}),
    # -- a whole iSWA blob read with PARTIAL_ONLY ---------------------------------------------------
    # llama.cpp reads the blob's first section (the *base* cache's) into the SWA cache and ignores
    # the rest: seq 1 then holds all 30 positions in the SWA cache, with K/V rows of the wrong
    # layer. llmem refuses a blob with bytes after the sections it was asked to read (StateError,
    # nothing changed; docs/deviations.md, iSWA), so seq 1 stays erased (step 10).
    ("iswa_state_partial", 11): Deviation(_ISWA_PARTIAL_WHOLE, expect={"ret": 0}),
    ("iswa_state_partial", 12): Deviation(_ISWA_PARTIAL_WHOLE + "; seq 1 stays erased",
                                          expect={"min": [0, -1], "max": [29, -1]}),
    ("iswa_state_partial", 13): Deviation(_ISWA_PARTIAL_WHOLE + "; the blob of the empty seq 1: the 8-byte "
                                          "header and two empty sections (n_stream, cell_count)",
                                          expect={"size": 24, "n": 24, "meta": _empty_iswa_seq_meta}),
    # -- a seq starting at position -1 (KV) -------------------------------------------------------
    ("batch_validation_edge", 4): Deviation(_KV_POS_MINUS_1, raises=ValueError, match="position -1"),
    ("batch_validation_edge", 5): Deviation(_KV_POS_MINUS_1 + "; so seq 1 stays empty",
                                            expect={"max": [2, -1]}),
    ("batch_validation_edge", 6): Deviation(
        _KV_POS_MINUS_1 + "; the full state lacks seq 1's cell at pos 0: 1145 - 268 bytes (12 bytes of "
        "cell metadata + 2 layers x (64 B K row + 64 B V column))",
        expect={"size": 877, "n": 877, "meta": recorded(6, "meta", drop_cells(0, [0, [1]]))}),
    # -- seq_cp onto an id >= n_seq_max in a unified KV cache -------------------------------------
    ("kv_seq_ids_beyond_n_seq_max", 1): Deviation(_KV_SEQ_CP_BEYOND, raises=ValueError, match="n_seq_max"),
    ("kv_seq_ids_beyond_n_seq_max", 2): Deviation(_KV_SEQ_CP_BEYOND + "; so seq 7 stays empty",
                                                  expect={"min": [0, -1, -1], "max": [2, -1, -1]}),
    ("kv_seq_ids_beyond_n_seq_max", 5): Deviation(_KV_SEQ_CP_BEYOND + "; so seq 7 stays empty",
                                                  expect={"min": [0, -1, -1], "max": [0, -1, -1]}),
    ("kv_seq_ids_beyond_n_seq_max", 6): Deviation(
        _KV_SEQ_CP_BEYOND + "; after seq_rm(0, 1, -1) cells 1 and 2 are free (llama.cpp keeps them for "
        "seq 7 and writes them with no seq id): 869 - 2 x 264 bytes (8 bytes of cell metadata + 256 of data)",
        expect={"size": 341, "n": 341,
                "meta": recorded(6, "meta", drop_cells(0, [1, []], [2, []]))}),
    # -- failed KV restores leave the cache unchanged ---------------------------------------------
    ("kv_state_restore_failures", 11): Deviation(
        _RESTORE_UNCHANGED.format(what="erases the target (step 10: blob cut inside the cell list)"),
        expect={"min": [0, 0, -1], "max": [4, 2, -1]}),
    ("kv_state_restore_failures", 14): Deviation(
        _RESTORE_UNCHANGED.format(what="erases the target (step 13: blob cut inside the data)"),
        expect={"min": [0, 0, -1], "max": [4, 2, -1]}),
    ("kv_state_restore_failures", 17): Deviation(
        _RESTORE_UNCHANGED.format(what="erases the target (step 16: blob cut inside the data)"),
        expect={"min": [0, 0, -1], "max": [4, 2, -1]}),
    ("kv_state_restore_failures", 26): Deviation(
        _RESTORE_UNCHANGED.format(what="clears the whole cache (step 25: full state cut inside the data)"),
        expect={"min": [0, 0, -1], "max": [4, 2, -1]}),
    ("kv_state_restore_failures", 30): Deviation(
        _RESTORE_UNCHANGED.format(what="keeps cell 0 and a seq-less cell at pos 1 (step 29: full state cut "
                                       "inside cell 1's seq id)"),
        expect={"min": [0, 0, -1], "max": [4, 2, -1]}),
    ("kv_state_restore_failures", 31): Deviation(
        _RESTORE_UNCHANGED.format(what="keeps cell 0 and a seq-less cell at pos 1 (step 29)")
        + "; the full state is the one saved at step 20 (restored at step 27)",
        expect={"size": recorded(20, "size"), "n": recorded(20, "n"), "meta": recorded(20, "meta")}),
    ("kv_state_restore_failures", 39): Deviation(
        _RESTORE_UNCHANGED.format(what="erases the target (step 38: 5 cells do not fit once seq 2 is removed)"),
        expect={"min": [0, 0, 0], "max": [4, 248, 1]}),
    # -- iSWA: all or nothing across the two sections ---------------------------------------------
    ("iswa_state_partial", 9): Deviation(
        _ISWA_ALL_OR_NOTHING + "; seq 1 (removed at step 6) is empty in both caches: a 24-byte blob",
        expect={"size": 24, "n": 24, "meta": empty_iswa_seq_blob_meta(1)}),
    # -- hybrid: a failed restore changes neither part ---------------------------------------------
    ("hyb_jamba_state", 11): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erases seq 2 in both parts (step 10: blob cut inside the recurrent "
                                           "part)") + _JAMBA_SEQ2 + ": pos_min = max(attn -1, recr 5) = 5",
        expect={"min": [6, 6, 5]}),
    ("hyb_jamba_state", 13): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erased seq 2 at step 10") + _JAMBA_SEQ2
        + " (step 12 fails in both at the attention n_stream check without changes)",
        expect={"min": [6, 6, 5]}),
    ("hyb_jamba_state", 14): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erased seq 2 at step 10") + _JAMBA_SEQ2
        + "; the full state has a third recurrent cell [5, [2]] (cell 2, restored at step 8)",
        expect={"size": recorded(14, "size", lambda v: v + _JAMBA_RECURRENT_CELL_BYTES),
                "n": recorded(14, "n", lambda v: v + _JAMBA_RECURRENT_CELL_BYTES),
                "meta": recorded(14, "meta", add_recurrent_cells([5, [2]]))}),
    ("hyb_jamba_state", 17): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erased seq 2 at step 10") + _JAMBA_SEQ2
        + "; restoring llmem's step-14 blob reads all of its bytes",
        expect={"ret": recorded(14, "size", lambda v: v + _JAMBA_RECURRENT_CELL_BYTES)}),
    ("hyb_jamba_state", 18): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erased seq 2 at step 10") + _JAMBA_SEQ2 + " (restored at step 17)",
        expect={"min": [6, 6, 5]}),
    ("hyb_jamba_state", 19): Deviation(
        _HYBRID_ALL_OR_NOTHING.format(what="erased seq 2 at step 10") + _JAMBA_SEQ2 + " (restored at step 17)",
        expect={"size": recorded(19, "size", lambda v: v + _JAMBA_RECURRENT_CELL_BYTES),
                "n": recorded(19, "n", lambda v: v + _JAMBA_RECURRENT_CELL_BYTES),
                "meta": recorded(19, "meta", add_recurrent_cells([5, [2]]))}),
    # -- failed recurrent restores leave the memory unchanged -------------------------------------
    ("rec_state_roundtrip", 17): Deviation(
        _RESTORE_UNCHANGED.format(what="erases the target (step 16: blob cut inside the data)"),
        expect={"min": [6, 5, -1], "max": [6, 5, -1]}),
    ("rec_state_roundtrip", 26): Deviation(
        _RESTORE_UNCHANGED.format(what="clears the whole memory (step 25: full state cut inside the data)"),
        expect={"min": [6, 5, -1], "max": [6, 5, -1]}),
}


def _cells(seq: int, positions: range) -> list:
    return [[p, [seq]] for p in positions]


#: State blobs whose recorded ``meta`` is a parse error (``oracle_replay.KNOWN_META_GAPS``): llmem's
#: blob is compared with the content decoded by hand from llama.cpp's bytes (the gap's description).
KNOWN_META_GAP_EXPECTED: Dict[Tuple[str, int], Dict[str, Any]] = {
    # hybrid-iSWA seq blob, PARTIAL_ONLY: SWA part then recurrent part, no base part (README C2).
    # Offsets: SWA part at 8; n_stream 4 + cell_count 4 + 16 cells x 12 + v_trans/n_layer 8
    # + 2 K layers x (12 + 16 x 32) + 2 transposed V layers x (12 + 16 x 2 x 16) + stream 1 count 4
    # = 2308 bytes, so the recurrent part starts at 2316; it holds 580 bytes (2896 in all).
    ("hiswa_lfm2_swa", 7): {
        "magic": "0xaf143cd8", "seq_id": 0, "trailing_bytes": 0, "parts": [
            {"part": "kv_swa", "offset": 8, "n_stream": 2, "streams": [
                {"stream": 0, "cell_count": 16, "cells": _cells(0, range(14, 30)), "v_trans": 1, "n_layer": 2,
                 "k": [{"type": 1, "row_size": 32}] * 2,
                 "v": [{"type": 1, "el_size": 2, "n_embd_v_gqa": 16}] * 2},
                {"stream": 1, "cell_count": 0}]},
            {"part": "recurrent", "offset": 2316, "cell_count": 1, "cells": [[29, []]], "s_trans": 0,
             "n_layer": 4, "r": [{"type": 0, "row_size": 256}] * 2, "s": [{"type": 0, "row_size": 0}] * 2}]},
}


# ----------------------------------------------------------------------------------------------

def _first_difference(a: Any, b: Any, where: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'expected' if k in a else 'got'}"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{where}: length {len(a)} expected, {len(b)} got"
        return None
    return None if a == b else f"{where}: expected {a!r}, got {b!r}"


def _short(v: Any, n: int = 600) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def _expected(case: Case, step: Step, fld: str, dev: Optional[Deviation]) -> Any:
    if dev is not None and fld in dev.expect:
        v = dev.expect[fld]
        return v(case) if callable(v) else v
    return step.obs[fld]


def _normalise(fld: str, v: Any) -> Any:
    return strip_hashes(v) if fld == "meta" else v


def _expect_raise(runner: LlmemRunner, step: Step, dev: Deviation) -> Optional[str]:
    """Run a step that llmem must refuse; return what went wrong, or None."""
    assert dev.raises is not None
    try:
        runner.run_step(step)
    except dev.raises as e:
        if dev.match is not None and dev.match not in str(e):
            return f"llmem raised {type(e).__name__}({e}) but the message lacks {dev.match!r} (deviation: {dev.why})"
        return None
    except Exception as e:  # noqa: BLE001
        return f"llmem should raise {dev.raises.__name__} ({dev.why}), raised {type(e).__name__}: {e}"
    return f"llmem should raise {dev.raises.__name__} ({dev.why}) but did not"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_oracle_replay(case: Case) -> None:
    unavailable = None
    try:
        runner = LlmemRunner(case)
    except HybridUnavailable as e:
        unavailable = str(e)
    if unavailable is not None:
        pytest.fail(unavailable, pytrace=False)
    # what llama.cpp reported after creating the context: the runner's size rules, llmem's can_shift
    info = runner.info()
    for fld, val in info.items():
        if case.info[fld] != val:
            pytest.fail(f"{case.name} info.{fld}: expected {case.info[fld]!r}, got {val!r}", pytrace=False)
    for step in case.steps():
        label = f"{case.name}[{step.index}] {step.op} {step.args}"
        dev = DEVIATIONS.get((case.name, step.index))
        if step.refused:
            # llama.cpp aborts (GGML_ASSERT n_tokens <= n_batch); the oracle declined the step. The
            # driver refuses it before touching the memory (llmem has no n_batch of its own).
            with pytest.raises(DecodeRefused):
                runner.run_step(step)
            continue
        if dev is not None and dev.raises is not None:
            problem = _expect_raise(runner, step, dev)
            if problem:
                pytest.fail(f"{label}: {problem}", pytrace=False)
            continue
        got, error = None, None
        try:
            got = runner.run_step(step)
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            pytest.fail(f"{label}: llmem raised {error}", pytrace=False)
        for fld in step.exact_fields():
            exp = _normalise(fld, _expected(case, step, fld, dev))
            if fld not in got:
                pytest.fail(f"{label}: field {fld!r} missing from llmem's observation {got!r}", pytrace=False)
            val = _normalise(fld, got[fld])
            if exp != val:
                where = _first_difference(exp, val, fld) or fld
                note = f" (llmem: {got['why']})" if "why" in got else ""
                dnote = f" [expected value from DEVIATIONS: {dev.why}]" if dev and fld in dev.expect else ""
                pytest.fail(f"{label}: {where}\n  expected {fld} = {_short(exp)}\n  got      {fld} = "
                            f"{_short(val)}{note}{dnote}", pytrace=False)
        gap = KNOWN_META_GAP_EXPECTED.get((case.name, step.index))
        if gap is not None:
            val = strip_hashes(got.get("meta"))
            if val != gap:
                where = _first_difference(gap, val, "meta") or "meta"
                pytest.fail(f"{label}: {where} (recorded meta unparsable, compared with the hand-decoded "
                            f"content of KNOWN_META_GAPS)\n  expected meta = {_short(gap)}\n  got      meta = "
                            f"{_short(val)}", pytrace=False)


def test_known_meta_gaps_are_all_checked() -> None:
    """Every blob the oracle could not parse is compared with hand-decoded content instead."""
    assert set(KNOWN_META_GAP_EXPECTED) == set(KNOWN_META_GAPS)


def test_deviation_table_is_consistent() -> None:
    """Every DEVIATIONS entry names a recorded step and really differs from the recording there
    (so an entry that llmem no longer needs, or a recording that changed, is noticed)."""
    by_name = {c.name: c for c in CASES}
    for (name, index), dev in DEVIATIONS.items():
        assert name in by_name, f"DEVIATIONS names unknown scenario {name!r}"
        case = by_name[name]
        steps = list(case.steps())
        assert 0 <= index < len(steps), f"DEVIATIONS: {name}[{index}] does not exist"
        step = steps[index]
        assert dev.why, f"DEVIATIONS: {name}[{index}] gives no reason"
        if dev.raises is not None:
            assert not dev.expect, f"DEVIATIONS: {name}[{index}] both raises and expects values"
            continue
        assert dev.expect, f"DEVIATIONS: {name}[{index}] changes nothing"
        for fld in dev.expect:
            assert fld in step.exact_fields(), f"DEVIATIONS: {name}[{index}] overrides non-compared field {fld!r}"
            assert _normalise(fld, _expected(case, step, fld, dev)) != _normalise(fld, step.obs[fld]), (
                f"DEVIATIONS: {name}[{index}].{fld} equals the recording: the entry is not needed")


# ----------------------------------------------------------------------------------------------
# payload relations
# ----------------------------------------------------------------------------------------------

def _payload_shas(meta: Any, step: int) -> Dict[tuple, str]:
    """``{(step, part, stream, kind, layer): sha}`` of every payload in a parsed state ``meta``."""
    out: Dict[tuple, str] = {}
    if not isinstance(meta, dict):
        return out
    for part in meta.get("parts", []):
        name = part["part"]
        if "streams" in part:
            for st in part["streams"]:
                for kind in ("k", "v"):
                    for il, layer in enumerate(st.get(kind, [])):
                        out[(step, name, st["stream"], kind, il)] = layer["sha"]
        else:
            for kind in ("r", "s"):
                for il, layer in enumerate(part.get(kind, [])):
                    out[(step, name, 0, kind, il)] = layer["sha"]
    return out


#: (scenario, step) -> (payload kinds, reason): payloads left out of the relation check because llmem
#: deliberately writes other bytes there.
PAYLOAD_DEVIATIONS: Dict[Tuple[str, int], Tuple[Tuple[str, ...], str]] = {
    **{("kv_seq_add_div", i): (("k",), (
        "saved while a seq_add/seq_div K-shift is pending: llama.cpp writes the K rows not yet rotated "
        "(kv_cache.md §8.2 item 4), so its blobs of steps 10, 13 and 19 share K bytes; llmem saves a "
        "pending shift as if applied (KVCache.state_write docstring; fidelity policy 2 'a pending shift "
        "lost by a save')")) for i in (5, 10, 13, 19)},
    ("kv_seq_cp_keep_streams", 5): (("k", "v"), (
        "seq 1's blob between a cross-stream seq_cp(0, 1) and the next decode: llama.cpp writes seq 0's "
        "cells with the destination stream's old bytes (the copy is queued until the update; a blob whose "
        "data does not match its cells), llmem writes the bytes the stream will hold once the pending copy "
        "has run, i.e. seq 0's (csrc/core/kv_cache.cpp state_write; fidelity policy 2; docs/deviations.md, "
        "KV cache, 'Pending cross-stream copies and the state bytes')")),
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_oracle_payload_relations(case: Case) -> None:
    """State bytes move like llama.cpp's: payloads that are byte-identical in the recording (a
    restored copy and its original, a full state before and after a round trip, an untouched buffer
    read twice, ...) are byte-identical in llmem too, and layer-0 K/V payloads that differ in the
    recording differ in llmem.

    llmem runs no model, so the runner writes stand-in K/V rows and recurrent states
    (``LlmemRunner(fake_data=True)``) that depend on what the real layer-0 values depend on. Beyond
    layer 0 only "equal in llama.cpp => equal in llmem" is checked (llama.cpp's deeper layers depend
    on more context than the stand-ins). ``PAYLOAD_DEVIATIONS`` leaves out payloads llmem writes
    differently on purpose. Blobs are collected up to the first step where llmem differs
    from the recording (a DEVIATIONS entry or a failure of ``test_oracle_replay``)."""
    unavailable = None
    try:
        runner = LlmemRunner(case, fake_data=True)
    except HybridUnavailable as e:
        unavailable = str(e)
    if unavailable is not None:
        pytest.fail(unavailable, pytrace=False)
    stop = min([i for (n, i) in DEVIATIONS if n == case.name], default=None)
    recorded_shas: Dict[tuple, str] = {}
    llmem_shas: Dict[tuple, str] = {}
    for step in case.steps():
        if stop is not None and step.index >= stop:
            break
        if step.refused:
            with pytest.raises(DecodeRefused):
                runner.run_step(step)
            continue
        got = runner.run_step(step)
        if any(_normalise(f, got.get(f)) != _normalise(f, step.obs[f]) for f in step.exact_fields()):
            break  # test_oracle_replay reports it
        if step.op in ("state_get", "state_seq_get") and (case.name, step.index) not in KNOWN_META_GAPS:
            recorded_shas.update(_payload_shas(step.obs.get("meta"), step.index))
            llmem_shas.update(_payload_shas(got.get("meta"), step.index))
    groups: Dict[str, list] = {}
    for key, sha in recorded_shas.items():
        excluded = PAYLOAD_DEVIATIONS.get((case.name, key[0]))
        if excluded is not None and key[3] in excluded[0]:
            continue
        if key in llmem_shas:
            groups.setdefault(sha, []).append(key)
    for sha, keys in groups.items():
        keys = [k for k in keys if k in llmem_shas]
        mine = {llmem_shas[k] for k in keys}
        if len(mine) > 1:
            by = {}
            for k in keys:
                by.setdefault(llmem_shas[k], []).append(k)
            detail = "; ".join(f"{v} -> {s}" for s, v in by.items())
            pytest.fail(f"{case.name}: payloads identical in llama.cpp (sha {sha}) differ in llmem: {detail}\n"
                        f"  (key = (step, part, stream, k/v/r/s, layer))", pytrace=False)
    # Conversely, for layer-0 K and V (whose stand-ins depend on what the real values depend on:
    # token and position for K, token for V), payloads that differ in llama.cpp differ in llmem.
    layer0 = sorted(k for k in recorded_shas if k in llmem_shas and k[4] == 0 and k[3] in ("k", "v")
                    and k[3] not in PAYLOAD_DEVIATIONS.get((case.name, k[0]), ((), ""))[0])
    for i, a in enumerate(layer0):
        for b in layer0[i + 1:]:
            if a[3] == b[3] and recorded_shas[a] != recorded_shas[b] and llmem_shas[a] == llmem_shas[b]:
                pytest.fail(f"{case.name}: layer-0 payloads {a} and {b} differ in llama.cpp but are identical "
                            f"in llmem (key = (step, part, stream, k/v, layer))", pytrace=False)


def test_payload_deviations_name_state_blobs() -> None:
    by_name = {c.name: c for c in CASES}
    for (name, index), (kinds, why) in PAYLOAD_DEVIATIONS.items():
        assert name in by_name and why and kinds, f"PAYLOAD_DEVIATIONS: bad entry {name}[{index}]"
        step = list(by_name[name].steps())[index]
        assert step.op in ("state_get", "state_seq_get"), f"PAYLOAD_DEVIATIONS: {name}[{index}] is a {step.op}"
