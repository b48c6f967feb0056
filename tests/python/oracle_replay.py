"""Loader for the llama.cpp oracle recordings in ``tests/data/oracle/``.

The oracle (``/work/shared/oracle/oracle.py``) ran every scenario of ``tests/data/oracle/scenarios/``
through the real llama.cpp (llama-cpp-python 0.3.36) and stored what it observed in
``tests/data/oracle/expected/<name>.json``. This module only reads those files: it imports nothing
from llmem, so replay tests can be written as soon as the memory classes exist::

    from oracle_replay import load_cases, iter_steps, COMPARE_EXACT

    @pytest.mark.parametrize("case", load_cases(kind="kv"), ids=lambda c: c.name)
    def test_kv_replay(case):
        mem = make_memory_like(case.info)            # llmem side, written by the memory engineers
        for step in case.steps():
            got = run_step_on_llmem(mem, step)        # same op, same arguments
            for field in step.exact_fields():
                assert got[field] == step.obs[field], step.where(field)

Terms
-----
scenario
    The input script (model, context parameters, list of step dicts). See the docstring of
    ``oracle.py`` for the ops (decode, seq_rm, seq_cp, seq_keep, seq_add, seq_div, clear, pos,
    can_shift, state_seq_get, state_seq_set, state_get, state_set, logits).
expected
    ``{"scenario", "description", "info", "observations": [...]}``; one observation per step, with
    ``step`` (index) and ``op``, plus the op's result (``ret``, ``min``/``max``, ``ubatches``,
    ``size``/``n``/``sha256``/``meta``, ``logits``...).
info
    What llama.cpp reported after creating the context: ``n_ctx`` (padded to 256), ``n_ctx_seq``,
    ``n_batch``, ``n_ubatch``, ``n_seq_max``, ``n_swa``, ``can_shift``, ``memory`` (one of ``kv``,
    ``iswa``, ``recurrent``, ``hybrid``, ``hybrid_iswa``), ``arch``, ``n_vocab``.

Which fields llmem is held to (see ``tests/data/oracle/README.md``):

* exactly: ``ret`` of decode / seq_rm / state_*_set, ``min``/``max`` of pos, ``can_shift``, the
  ``ubatches`` of traced decodes, the ``meta`` of state blobs except its payload hashes, ``size``
  and ``n`` of state blobs;
* only against llama.cpp itself: payload ``sha`` values inside ``meta``, the blob ``sha256`` and
  ``logits`` (weights and kernels differ); the useful llmem-side check is *relative*: two
  observations that are equal in the recording (e.g. logits of a restored copy and of the original)
  should be equal in llmem too, see ``same_logits_pairs``;
* never: ``log`` (llama.cpp's warning text) and ``refused`` (the oracle declined a step that aborts
  llama.cpp; llmem should raise there).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

ORACLE_DIR = Path(__file__).resolve().parents[1] / "data" / "oracle"
SCENARIO_DIR = ORACLE_DIR / "scenarios"
EXPECTED_DIR = ORACLE_DIR / "expected"

N_VOCAB = 64  # every oracle model uses the 64-token "test" vocabulary

#: observation fields a re-implementation must reproduce exactly, per op
COMPARE_EXACT: Dict[str, Tuple[str, ...]] = {
    "decode": ("ret", "ubatches"),
    "seq_rm": ("ret",),
    "seq_cp": (),
    "seq_keep": (),
    "seq_add": (),
    "seq_div": (),
    "clear": (),
    "pos": ("min", "max"),
    "can_shift": ("ret",),
    "state_seq_get": ("size", "n", "meta"),
    "state_get": ("size", "n", "meta"),
    "state_seq_set": ("ret",),
    "state_set": ("ret",),
    "logits": (),
}

#: observation fields that only make sense against llama.cpp itself
COMPARE_ORACLE_ONLY = ("sha256", "logits", "argmax")
#: informational only
COMPARE_NEVER = ("log", "refused")

#: State blobs that oracle.py could not parse (its ``meta`` is ``{"parse_error": ...}``), with what
#: the blob really holds (decoded by hand from the ``--hex`` output). ``size``/``n`` are still exact.
KNOWN_META_GAPS: Dict[Tuple[str, int], str] = {
    ("hiswa_lfm2_swa", 7): (
        "hybrid-iSWA seq blob with flags PARTIAL_ONLY (2896 bytes): magic, seq 0, then the SWA part "
        "(n_stream 2; stream 0: 16 cells pos 14..29 of seq 0, v_trans 1, n_layer 2; stream 1: 0 cells), "
        "then the recurrent part (1 cell, pos 29, n_seq_id 0; n_layer 4; r rows 256 bytes x2, s rows 0 x2). "
        "There is NO base part: 260 bytes shorter than the flags-0 blob of step 6, whose base part is "
        "exactly those 260 bytes. oracle.py assumes hybrid-iSWA writes all three parts whatever the flags."),
}


@dataclass
class Step:
    """One scenario step together with what llama.cpp observed for it."""

    index: int
    op: str
    args: Dict[str, Any]
    obs: Dict[str, Any]
    scenario: str

    def exact_fields(self) -> Tuple[str, ...]:
        """Fields of ``obs`` that llmem must reproduce exactly (present ones only).

        ``meta`` is left out where oracle.py could not parse the blob (``KNOWN_META_GAPS``).
        """
        skip = {"meta"} if (self.scenario, self.index) in KNOWN_META_GAPS else set()
        return tuple(f for f in COMPARE_EXACT.get(self.op, ()) if f in self.obs and f not in skip)

    def where(self, what: str = "") -> str:
        """A label for assertion messages: ``scenario[step] op.field``."""
        return f"{self.scenario}[{self.index}] {self.op}" + (f".{what}" if what else "")

    @property
    def refused(self) -> bool:
        """True when the oracle did not run the step (it would have aborted llama.cpp)."""
        return self.obs.get("ret", 0) is None and "refused" in self.obs

    def decode_batch(self, n_vocab: int = N_VOCAB) -> Dict[str, Any]:
        """For a decode step: the batch as the oracle handed it to llama.cpp.

        Returns ``{"tokens", "pos", "seq_ids", "logits"}``; ``pos``/``seq_ids``/``logits`` are
        ``None`` when the scenario left them out (llama.cpp then fills them in: positions continue
        from ``seq_pos_max + 1`` of each token's first seq id, seq 0, only the last token outputs).
        The ``n``/``pos0``/``seqs``/``tok0`` shorthand is expanded exactly as ``oracle.py`` does.
        """
        if self.op != "decode":
            raise ValueError(f"{self.where()} is not a decode step")
        return expand_decode(self.args, n_vocab)


def expand_decode(step: Dict[str, Any], n_vocab: int = N_VOCAB) -> Dict[str, Any]:
    """Expand a decode step (explicit or shorthand) into tokens/pos/seq_ids/logits lists."""
    if "n" in step:
        n = int(step["n"])
        seqs = list(step.get("seqs", [0]))
        tok0 = int(step.get("tok0", step.get("pos0", 0)))
        tokens = [(tok0 + i) % n_vocab for i in range(n)]
        pos = [int(step["pos0"]) + i for i in range(n)] if "pos0" in step else None
        logits = step.get("logits")
        if logits is None:
            logits = [0] * (n - 1) + [1] if n else []
        elif logits == "all":
            logits = [1] * n
        return {"tokens": tokens, "pos": pos, "seq_ids": [list(seqs) for _ in range(n)], "logits": logits}
    tokens = list(step["tokens"])
    logits = step.get("logits")
    if logits == "all":
        logits = [1] * len(tokens)
    seq_ids = step.get("seq_ids")
    return {"tokens": tokens,
            "pos": list(step["pos"]) if step.get("pos") is not None else None,
            "seq_ids": [list(s) for s in seq_ids] if seq_ids is not None else None,
            "logits": list(logits) if logits is not None else None}


@dataclass
class Case:
    """A scenario and its recorded llama.cpp answers."""

    name: str
    scenario: Dict[str, Any]
    expected: Dict[str, Any]
    path: Path = field(repr=False, default=Path())

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """Unpacks as the pair ``(scenario, expected)``: ``for sc, exp in load_cases(): ...``."""
        return iter((self.scenario, self.expected))

    @property
    def model(self) -> str:
        return self.scenario["model"]

    @property
    def kind(self) -> str:
        """Memory kind llama.cpp built: kv, iswa, recurrent, hybrid or hybrid_iswa."""
        return self.expected["info"]["memory"]

    @property
    def info(self) -> Dict[str, Any]:
        return self.expected["info"]

    @property
    def context(self) -> Dict[str, Any]:
        """Context parameters with the oracle's defaults filled in."""
        c = {"n_ctx": 256, "n_seq_max": 1, "n_batch": 512, "n_ubatch": 512, "kv_unified": False,
             "swa_full": False, "flash_attn": "off", "type_k": "f16", "type_v": "f16", "n_rs_seq": 0}
        c.update(self.scenario.get("context", {}))
        return c

    @property
    def traced(self) -> bool:
        return "ubatches" in self.scenario.get("trace", [])

    def steps(self) -> Iterator[Step]:
        """Yield each step with its observation, in order."""
        obs = self.expected["observations"]
        steps = self.scenario["steps"]
        if len(obs) != len(steps):
            raise ValueError(f"{self.name}: {len(steps)} steps but {len(obs)} observations")
        for i, (st, ob) in enumerate(zip(steps, obs)):
            if ob.get("step") != i or ob.get("op") != st.get("op"):
                raise ValueError(f"{self.name}[{i}]: observation does not match the step")
            args = {k: v for k, v in st.items() if k != "op"}
            yield Step(i, st["op"], args, ob, self.name)

    def steps_of(self, *ops: str) -> List[Step]:
        return [s for s in self.steps() if s.op in ops]

    def same_logits_pairs(self, atol: float = 2e-4) -> List[Tuple[Step, Step]]:
        """Pairs of ``logits`` steps whose recorded logits agree within ``atol`` (and are not null).

        These are the "a restored / copied sequence decodes like the original" checks that carry
        over to llmem whatever its numerics: llmem's logits for both steps must agree too. Logits
        are stored rounded to 4 decimals, and two cache layouts can change the summation order, so
        an exact match is not guaranteed (``iswa_state_partial`` steps 17/18 differ by 1e-4 in one
        entry). Pairs that llama.cpp itself decodes differently are listed in the README (e.g. a
        rollback of a whole ubatch in ``hyb_lfm2_rollback``).
        """
        got = [s for s in self.steps_of("logits") if s.obs.get("logits") is not None]
        return [(a, b) for i, a in enumerate(got) for b in got[i + 1:]
                if max(abs(x - y) for x, y in zip(a.obs["logits"], b.obs["logits"])) <= atol]


def strip_hashes(meta: Any) -> Any:
    """A copy of a state ``meta`` without payload hashes (``sha`` keys), for comparing with llmem.

    Cell lists, stream counts, ``v_trans``, layer counts, types, row sizes and offsets stay.
    """
    if isinstance(meta, dict):
        return {k: strip_hashes(v) for k, v in meta.items() if k != "sha"}
    if isinstance(meta, list):
        return [strip_hashes(v) for v in meta]
    return copy.deepcopy(meta)


def meta_parts(meta: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{part name: part}`` of a parsed state blob (kv, kv_base, kv_swa, kv_attn, recurrent)."""
    if not meta or "parts" not in meta:
        return {}
    return {p["part"]: p for p in meta["parts"]}


def kv_cells(part: Dict[str, Any]) -> List[List[Tuple[int, Tuple[int, ...]]]]:
    """Cells of a KV part, per stream: ``[[(pos, (seq ids...)), ...], ...]`` in cell order."""
    return [[(c[0], tuple(c[1])) for c in st.get("cells", [])] for st in part["streams"]]


def ubatch_summary(obs: Dict[str, Any]) -> List[Tuple[int, int, List[int]]]:
    """``[(n_seq_tokens, n_seqs, seq_id_unq), ...]`` of a traced decode observation."""
    return [(u["n_seq_tokens"], u["n_seqs"], u["seq_id_unq"]) for u in obs.get("ubatches", [])]


def load_case(name: str, scenario_dir: Path = SCENARIO_DIR, expected_dir: Path = EXPECTED_DIR) -> Case:
    sc_path = scenario_dir / f"{name}.json"
    scenario = json.loads(sc_path.read_text())
    scenario.setdefault("name", name)
    expected = json.loads((expected_dir / f"{name}.json").read_text())
    return Case(name, scenario, expected, sc_path)


def load_cases(kind: Optional[str] = None, model: Optional[str] = None,
               names: Optional[Sequence[str]] = None,
               scenario_dir: Path = SCENARIO_DIR, expected_dir: Path = EXPECTED_DIR) -> List[Case]:
    """All recorded cases (sorted by name), optionally filtered.

    kind  : memory kind (``kv``, ``iswa``, ``recurrent``, ``hybrid``, ``hybrid_iswa``)
    model : oracle model name (``llama``, ``gemma2``, ``mamba``, ``mamba2``, ``jamba``, ``lfm2``,
            ``lfm2_swa``)
    names : explicit scenario names

    Each case unpacks as the pair ``(scenario, expected)`` (the parsed JSON files), and also offers
    ``case.steps()`` (steps with their observations), ``case.info``, ``case.kind``, ``case.context``.
    """
    out = []
    wanted = set(names) if names is not None else None
    for path in sorted(scenario_dir.glob("*.json")):
        if wanted is not None and path.stem not in wanted:
            continue
        case = load_case(path.stem, scenario_dir, expected_dir)
        if kind is not None and case.kind != kind:
            continue
        if model is not None and case.model != model:
            continue
        out.append(case)
    return out


def iter_pairs(**filters: Any) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """Yield plain ``(scenario, expected)`` dict pairs (same filters as ``load_cases``)."""
    for case in load_cases(**filters):
        yield case.scenario, case.expected


def iter_steps(case: Case) -> Iterator[Tuple[int, Dict[str, Any], Dict[str, Any]]]:
    """Yield ``(index, step dict, observation dict)`` for plain-dict users."""
    for st in case.steps():
        yield st.index, dict(st.args, op=st.op), st.obs


__all__ = [
    "ORACLE_DIR", "SCENARIO_DIR", "EXPECTED_DIR", "N_VOCAB", "COMPARE_EXACT", "COMPARE_ORACLE_ONLY",
    "COMPARE_NEVER", "KNOWN_META_GAPS", "Step", "Case", "expand_decode", "strip_hashes", "meta_parts", "kv_cells",
    "ubatch_summary", "load_case", "load_cases", "iter_pairs", "iter_steps",
]
