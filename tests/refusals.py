"""One check shared by the tests of documented refusals: each call raises its error with exactly
its message (the messages are part of the contract; docs/errors.md shows them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

Refusal = tuple[type[Exception], str, Callable[[], object]]
"""The error a call must raise, its exact message, and the call."""


def assert_refusals(cases: Sequence[Refusal]) -> None:
    """Run each call; it must raise its error with exactly its message."""
    for error, message, call in cases:
        with pytest.raises(error) as info:
            call()
        assert str(info.value) == message
