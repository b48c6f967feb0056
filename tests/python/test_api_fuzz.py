"""Issue 20: the public API fuzzed as a whole (api_fuzz.py says what is called and checked).

Hypothesis drives the choices (``st.randoms``), so a finding shrinks to a short program. CI runs a
short profile; ``LLMEM_HYPOTHESIS_PROFILE=long`` scales it, and ``python tests/python/api_fuzz.py
--calls 1000000`` is the long run of docs/reliability.md.
"""

from hypothesis import given, strategies as st

from api_fuzz import run
from hypothesis_profiles import model_settings


@model_settings(40)
@given(rng=st.randoms(use_true_random=False), threads=st.sampled_from([1, 3]))
def test_public_api_under_hostile_calls(rng, threads):
    stats = run(calls=150, threads=threads, rng=rng)
    assert stats.calls > 0
