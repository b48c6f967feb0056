"""Hypothesis profiles of the model-based tests: "ci" (the default, a few hundred examples per
test) and "long" (the same tests scaled up, for the reliability runs of docs/reliability.md).

Select with the environment variable ``LLMEM_HYPOTHESIS_PROFILE=ci|long|valgrind``; the long profile
multiplies every model test's example count by ``LLMEM_HYPOTHESIS_SCALE`` (default 10). Tests
build their settings with :func:`model_settings` instead of ``settings(max_examples=...)`` so that
the per-test sizes, which override any loaded profile, follow the selected one too.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "LLMEM_HYPOTHESIS_PROFILE"
SCALE_ENV = "LLMEM_HYPOTHESIS_SCALE"
PROFILES = ("ci", "long", "valgrind")

PROFILE = os.environ.get(PROFILE_ENV, "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"{PROFILE_ENV}={PROFILE!r}: expected one of {', '.join(PROFILES)}")

LONG_SCALE = int(os.environ.get(SCALE_ENV, "10"))
VALGRIND_EXAMPLES = 3

# Shrinking a failure found after thousands of examples can take longer than the run; the long
# profile keeps the default phases but never gives up on a slow example (deadline None).
# The CI profile is derandomized: every run explores the same examples (seeded per test), so a
# commit that passed here passes in CI; exploring new examples is the long profile's job
# (docs/reliability.md), which keeps hypothesis's random seeds.
settings.register_profile("ci", deadline=None, derandomize=True)
settings.register_profile("long", deadline=None, max_examples=100 * LONG_SCALE)
# scripts/valgrind.sh: every test runs ~50x slower under valgrind, so property tests take a few
# examples (enough to reach their code paths)
settings.register_profile("valgrind", deadline=None, max_examples=VALGRIND_EXAMPLES)
settings.load_profile(PROFILE)


def model_settings(max_examples: int, **kwargs) -> settings:
    """Settings for one model-based test: ``max_examples`` is its CI size, scaled in the long
    profile. Other keywords (``stateful_step_count``...) pass through unchanged."""
    if PROFILE == "long":
        max_examples *= LONG_SCALE
    elif PROFILE == "valgrind":
        max_examples = min(max_examples, VALGRIND_EXAMPLES)
    kwargs.setdefault("deadline", None)
    suppress = set(kwargs.pop("suppress_health_check", ())) | {HealthCheck.too_slow}
    return settings(max_examples=max_examples, suppress_health_check=sorted(suppress, key=lambda h: h.value),
                    **kwargs)
