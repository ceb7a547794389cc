"""Hypothesis profiles shared by the whole suite.

``ci`` (the default) is derandomized with no deadline, so a run is repeatable and never flaky on a
loaded machine; ``explore`` draws many more, random examples: ``HYPOTHESIS_PROFILE=explore pytest``.
"""

from __future__ import annotations

import os

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
