import os
import sys

# tests/python holds shared helpers (reference models, oracle replay); make them importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # Hypothesis imports libcst to write its failure patch; libcst's use of mypy_extensions warns,
    # which filterwarnings = error turns into an INTERNALERROR hiding the failing example.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


# scripts/valgrind.sh: every test runs ~50x slower under valgrind, so the property tests take a
# few examples (enough to reach their code paths) and no deadline.
from hypothesis import settings  # noqa: E402

settings.register_profile("valgrind", max_examples=3, deadline=None)
