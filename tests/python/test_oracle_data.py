"""Sanity checks of the recorded llama.cpp oracle data (no llmem code involved).

They make sure every scenario has a complete recording that ``oracle_replay`` can walk, so that
replay tests written later fail for llmem reasons only.
"""
from __future__ import annotations

import pytest

from oracle_replay import (COMPARE_EXACT, EXPECTED_DIR, KNOWN_META_GAPS, SCENARIO_DIR, expand_decode,
                           load_cases, strip_hashes)

CASES = load_cases()
KINDS = {"kv", "iswa", "recurrent", "hybrid", "hybrid_iswa"}


def test_every_scenario_has_a_recording():
    scenarios = {p.stem for p in SCENARIO_DIR.glob("*.json")}
    expected = {p.stem for p in EXPECTED_DIR.glob("*.json")}
    assert scenarios and scenarios == expected


def test_every_memory_kind_is_covered():
    assert {c.kind for c in CASES} == KINDS


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_recording_is_complete(case):
    scenario, expected = case
    assert expected["scenario"] == case.name
    assert expected["info"]["model"] == scenario["model"]
    n = 0
    for step in case.steps():
        n += 1
        assert step.op in COMPARE_EXACT, step.where()
        if step.op == "decode":
            batch = step.decode_batch()
            assert step.refused or isinstance(step.obs["ret"], int), step.where("ret")
            if case.traced and step.obs.get("ret") == 0:
                ubs = step.obs["ubatches"]
                assert sum(len(u["tokens"]) for u in ubs) == len(batch["tokens"]), step.where("ubatches")
                for u in ubs:
                    assert u["n_seq_tokens"] * u["n_seqs"] == len(u["tokens"]), step.where("ubatches")
        elif step.op == "pos":
            assert len(step.obs["min"]) == len(step.obs["max"]) == len(step.args["seqs"]), step.where()
        elif step.op in ("state_seq_get", "state_get"):
            assert step.obs["size"] == step.obs["n"], step.where("size")
            meta = step.obs["meta"]
            assert meta is not None, step.where("meta")
            if (case.name, step.index) in KNOWN_META_GAPS:
                assert "parse_error" in meta and "meta" not in step.exact_fields()
                continue
            assert "parse_error" not in meta, step.where("meta")
            assert meta["trailing_bytes"] == 0, step.where("meta")
            assert "sha" not in repr(strip_hashes(meta)), step.where("meta")
    assert n == len(scenario["steps"])


def test_known_meta_gaps_exist():
    names = {c.name for c in CASES}
    for name, index in KNOWN_META_GAPS:
        assert name in names
        case = next(c for c in CASES if c.name == name)
        assert "parse_error" in case.expected["observations"][index]["meta"]


def test_same_logits_pairs_found():
    case = next(c for c in CASES if c.name == "kv_state_roundtrip")
    pairs = {(a.index, b.index) for a, b in case.same_logits_pairs()}
    assert {(8, 9), (8, 10), (9, 10)} <= pairs


def test_expand_decode_shorthand():
    b = expand_decode({"op": "decode", "n": 3, "pos0": 62, "seqs": [1, 2]})
    assert b == {"tokens": [62, 63, 0], "pos": [62, 63, 64], "seq_ids": [[1, 2]] * 3, "logits": [0, 0, 1]}
    b = expand_decode({"op": "decode", "tokens": [5, 6], "logits": "all"})
    assert b == {"tokens": [5, 6], "pos": None, "seq_ids": None, "logits": [1, 1]}
