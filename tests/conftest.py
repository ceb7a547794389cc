"""Hypothesis profiles shared by the whole suite, and the rule that cross-checks never skip in CI.

``ci`` (the default) is derandomized with no deadline, so a run is repeatable and never flaky on a
loaded machine; ``explore`` draws many more, random examples: ``HYPOTHESIS_PROFILE=explore pytest``.

Tests marked ``crosscheck`` compare graphlora with PyTorch, PEFT or transformers and skip where
those are not installed. With ``GRAPHLORA_CROSSCHECK=1`` (set by ``.ci/run`` after installing the
``crosscheck`` extra) such a skip is a failure, so the cross-checks cannot silently not run; and
an unmarked test that skips for want of one of them always fails, since CI would never run it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CROSSCHECK_REQUIRED = os.environ.get("GRAPHLORA_CROSSCHECK") == "1"
CROSSCHECKED = ("torch", "peft", "transformers", "tokenizers")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped:
        return
    if item.get_closest_marker("crosscheck") is None:
        if any(f"could not import '{name}'" in str(report.longrepr) for name in CROSSCHECKED):
            report.outcome = "failed"  # else CI, which runs only marked tests with them, skips it
            report.longrepr = (
                f"a test that skips this way must be marked crosscheck: {report.longrepr}"
            )
    elif CROSSCHECK_REQUIRED:
        report.outcome = "failed"
        report.longrepr = (
            f"a cross-check skipped, which GRAPHLORA_CROSSCHECK=1 forbids: {report.longrepr}"
        )
