import collections
import json
import os
import sys

from hypothesis.stateful import RuleBasedStateMachine

# tests/python holds shared helpers (reference models, oracle replay); make them importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hypothesis_profiles  # noqa: E402  (registers and loads the "ci"/"long" profile)

# Steps executed by each state machine class in this session, for the long-profile report
# (docs/reliability.md). Hypothesis checks the invariants once before the first step and once
# after every step (initialize rules included), so every check after an instance's first is one
# executed step. Counting there covers every machine without touching their rules.
STATE_MACHINE_STEPS: collections.Counter = collections.Counter()
STATE_MACHINE_RUNS: collections.Counter = collections.Counter()
_check_invariants = RuleBasedStateMachine.check_invariants


def _counting_check_invariants(self, *args, **kwargs):
    name = type(self).__name__
    if getattr(self, "_llmem_checked_once", False):
        STATE_MACHINE_STEPS[name] += 1
    else:
        self._llmem_checked_once = True
        STATE_MACHINE_RUNS[name] += 1
    return _check_invariants(self, *args, **kwargs)


RuleBasedStateMachine.check_invariants = _counting_check_invariants


def pytest_configure(config):
    # Hypothesis imports libcst to write its failure patch; libcst's use of mypy_extensions warns,
    # which filterwarnings = error turns into an INTERNALERROR hiding the failing example.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not STATE_MACHINE_STEPS:
        return
    total = sum(STATE_MACHINE_STEPS.values())
    terminalreporter.write_sep("-", f"state machine steps (hypothesis profile {hypothesis_profiles.PROFILE})")
    for name in sorted(STATE_MACHINE_STEPS):
        terminalreporter.write_line(f"{name}: {STATE_MACHINE_STEPS[name]} steps in "
                                    f"{STATE_MACHINE_RUNS[name]} runs")
    terminalreporter.write_line(f"total: {total} steps")
    report = os.environ.get("LLMEM_HYPOTHESIS_STEPS_FILE")
    if report:
        with open(report, "w") as f:
            json.dump({"profile": hypothesis_profiles.PROFILE, "exitstatus": int(exitstatus),
                       "steps": dict(STATE_MACHINE_STEPS), "runs": dict(STATE_MACHINE_RUNS),
                       "total_steps": total}, f, indent=1, sort_keys=True)
