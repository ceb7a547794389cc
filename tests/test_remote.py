"""graphlora.teach.remote in this process: the checks the grader's child runs on a student's
calls (an input written into, named by its parameter) and imports it refuses."""

from __future__ import annotations

import functools
import importlib
import sys

import numpy as np
import pytest

from graphlora.teach import remote


def merge_in_place(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    w += (a @ b) * s
    return w


def merge(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    return w + (a @ b) * s


def _call(function: object, *args: object, **kwargs: object) -> str | None:
    before = [np.array(v) if isinstance(v, np.ndarray) else v for v in args]
    before += [np.array(v) if isinstance(v, np.ndarray) else v for v in kwargs.values()]
    function(*args, **kwargs)  # type: ignore[operator]
    return remote.changed_inputs(function, args, kwargs, before)  # type: ignore[arg-type]


def test_an_input_written_into_is_named_by_its_parameter() -> None:
    w, a, b = np.ones((3, 2)), np.ones((3, 1)), np.ones((1, 2))
    assert _call(merge, w, a, b, 0.5) is None
    assert _call(merge_in_place, w, a, b, 0.5) == (
        "merge_in_place changed its input w (argument 1) in place: leave every input as it was "
        "and return new arrays (a frozen weight written into is lost for good)"
    )
    assert _call(merge_in_place, np.ones((3, 2)), a, b=b, s=0.5).startswith(  # type: ignore[union-attr]
        "merge_in_place changed its input w (argument 1)"
    )

    # the last of several arguments, as a keyword; NaN where it was NaN is no change
    def scale_last(x: np.ndarray, out: np.ndarray) -> None:
        out *= 2.0

    assert _call(scale_last, np.array([np.nan]), out=np.array([np.nan, 1.0])) == (
        "scale_last changed its input out (argument 2) in place: leave every input as it was "
        "and return new arrays (a frozen weight written into is lost for good)"
    )
    assert _call(scale_last, np.array([1.0]), out=np.array([np.nan])) is None


def test_a_signature_it_cannot_bind_numbers_the_argument() -> None:
    # np.multiply's third argument is its out=, which it writes: named as such
    assert _call(np.multiply, np.ones(2), 2.0, np.ones(2)) == (
        "multiply changed its input out (argument 3) in place: leave every input as it was and "
        "return new arrays (a frozen weight written into is lost for good)"
    )
    # arguments its signature does not take (as a builtin without one) are numbered only
    found = remote.changed_inputs(
        merge, (np.ones(2),), {"z": np.ones(1)}, [np.ones(2), np.zeros(1)]
    )
    assert found == (
        "merge changed its input argument 2 in place: leave every input as it was and return new "
        "arrays (a frozen weight written into is lost for good)"
    )
    assert remote.changed_inputs(merge, (np.ones(2), 1), {}, [np.ones(2), 2]) is None  # not arrays
    first = remote.changed_inputs(merge, (np.ones(2),), {"z": 1}, [np.zeros(2), 1])
    assert first is not None and first.startswith("merge changed its input argument 1 in place")
    # a callable without a name (a partial) is "a function"
    unnamed = functools.partial(merge_in_place, b=np.ones((1, 2)), s=1.0)
    said = _call(unnamed, np.ones((3, 2)), np.ones((3, 1)))
    assert said is not None and said.startswith("a function changed its input w (argument 1)")


def test_forbidden_packages_are_refused_and_others_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # restored after the test
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    remote.forbid(("graphlora", "torch"), "softmax")
    assert not [name for name in sys.modules if name.partition(".")[0] == "graphlora"]
    for name in ("graphlora", "graphlora.ops.kernels", "torch"):
        with pytest.raises(remote.Refused) as info:
            importlib.import_module(name)
        top = name.partition(".")[0]  # the package is looked up first, and refused
        assert str(info.value) == (
            f"softmax is done by hand with NumPy: the file may not import {top} (graded without "
            "graphlora, torch)"
        )
    assert importlib.import_module("json") is sys.modules["json"]  # the rest imports as ever
    assert remote._Refuse(("torch",), "x").find_spec("torchvision", None) is None
    with pytest.raises(remote.Refused, match=r"the file may not import torch\.nn "):
        remote._Refuse(("torch",), "x").find_spec("torch.nn", None)


def test_forbidding_reaches_modules_under_another_name_and_builtins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    sys.modules["__mp_main__"] = sys.modules["graphlora.teach.remote"]  # as a spawned child has
    remote.forbid(("graphlora", "itertools"), "merge")
    assert "__mp_main__" not in sys.modules  # found by its spec's name, not its key
    assert isinstance(sys.meta_path[0], remote._Refuse)  # asked before any other finder
    with pytest.raises(remote.Refused):  # a builtin module too: the finder comes first
        importlib.import_module("itertools")
