"""gradcheck: passes correct gradients, catches wrong ones with a readable message, refuses misuse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import graphlora as gl
from graphlora import ops
from graphlora.testing import GradcheckError, gradcheck
from graphlora.testing import strategies as gst


def _square(x: ops.Array) -> tuple[ops.Array, ops.Vjp]:
    def vjp(g: ops.Array, needs: tuple[bool, ...]) -> ops.Grads:
        return (2 * x * g,)

    return x * x, vjp


def _square_wrong(x: ops.Array) -> tuple[ops.Array, ops.Vjp]:
    def vjp(g: ops.Array, needs: tuple[bool, ...]) -> ops.Grads:
        return (2.02 * x * g,)  # one per cent off

    return x * x, vjp


def _sum_of(op: ops.Op) -> gl.testing.gradcheck.Fn:
    return lambda g, x: g.sum(g.apply(op, x))


@pytest.mark.parametrize("mode", ["full", "fast"])
@given(x=gst.arrays(gst.shapes(min_dims=1), min_value=0.5, max_value=2.0))
def test_correct_user_op_passes(mode: str, x: np.ndarray) -> None:
    assert gradcheck(_sum_of(_square), x, mode=mode) is True


@pytest.mark.parametrize("mode", ["full", "fast"])
@given(x=gst.arrays(gst.shapes(min_dims=1), min_value=0.5, max_value=2.0))
def test_wrong_user_op_fails(mode: str, x: np.ndarray) -> None:
    with pytest.raises(GradcheckError, match="gradient of input 0"):
        gradcheck(_sum_of(_square_wrong), x, mode=mode)


def test_failure_message_names_input_element_values_and_tolerances() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    w = np.ones(3)
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda g, w, x: g.add(g.sum(w), g.sum(g.apply(_square_wrong, x))), w, x)
    message = str(info.value)
    assert "gradient of input 1 (shape (2, 2)) disagrees at element (1, 1)" in message
    assert "analytic 8.08" in message
    assert "numeric 8.0" in message
    assert "4 of 4 elements fail" in message
    assert "atol=1e-05, rtol=0.001" in message
    assert isinstance(info.value, AssertionError)


def test_wrt_restricts_the_inputs_checked() -> None:
    def fn(g: gl.Graph, a: gl.NodeId, b: gl.NodeId) -> gl.NodeId:
        return g.add(g.sum(g.apply(_square_wrong, a)), g.sum(g.apply(_square, b)))

    a, b = np.ones(2), np.ones(2)
    assert gradcheck(fn, a, b, wrt=[1]) is True
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(fn, a, b, wrt=[0])
    with pytest.raises(
        ValueError, match=r"gradcheck: wrt must hold input indices in \[0, 2\), got \[2\]"
    ):
        gradcheck(fn, a, b, wrt=[2])


def test_nondeterministic_fn_is_reported() -> None:
    with pytest.raises(GradcheckError, match="fn is not deterministic"):
        gradcheck(lambda g, x: g.sum(g.dropout(x, 0.5)), np.ones(50))
    # With a fixed seed the same mask is drawn every time, and the check passes.
    assert gradcheck(lambda g, x: g.sum(g.dropout(x, 0.5, rng=1)), np.ones(50)) is True


def test_float32_input_is_checked_in_float64() -> None:
    x = np.linspace(0.5, 2.0, 5, dtype=np.float32)
    assert gradcheck(lambda g, x: g.sum(g.log(x)), x, atol=1e-8, rtol=1e-7) is True


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="gradcheck: mode must be 'full' or 'fast', got 'slow'"):
        gradcheck(lambda g, x: g.sum(x), np.ones(2), mode="slow")
    with pytest.raises(ValueError, match="gradcheck: need eps > 0"):
        gradcheck(lambda g, x: g.sum(x), np.ones(2), eps=0.0)
    with pytest.raises(TypeError, match="gradcheck: fn must return a NodeId, got float"):
        gradcheck(lambda g, x: 1.0, np.ones(2))  # type: ignore[arg-type, return-value]
    with pytest.raises(
        ValueError, match=r"gradcheck: fn must return a node of size 1, got shape \(2,\)"
    ):
        gradcheck(lambda g, x: g.exp(x), np.ones(2))


def test_errors_are_exported_where_documented() -> None:
    assert gl.testing.GradcheckError is gl.GradcheckError
    assert issubclass(GradcheckError, AssertionError)
