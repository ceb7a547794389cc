"""gradcheck and check_vjp: pass correct gradients, catch every planted wrong VJP with a readable
message, refuse misuse; the Jacobian helpers."""

from __future__ import annotations

import functools
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from op_cases import TESTED, draw_example, reference

import graphlora as gl
from graphlora import ops
from graphlora.testing import GradcheckError, check_vjp, gradcheck, jacobian, numeric_jacobian
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
    # Distinct values: two different dropout masks (almost surely) give different sums.
    x = np.random.default_rng(0).normal(size=50)
    with pytest.raises(GradcheckError, match="fn is not deterministic"):
        gradcheck(lambda g, x: g.sum(g.dropout(x, 0.5)), x)
    # With a fixed seed the same mask is drawn every time, and the check passes.
    assert gradcheck(lambda g, x: g.sum(g.dropout(x, 0.5, rng=1)), x) is True


def test_float32_input_is_checked_in_float64() -> None:
    x = np.linspace(0.5, 2.0, 5, dtype=np.float32)
    with pytest.warns(UserWarning, match="gradcheck: input 0 is float32; it is checked in float64"):
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


# --- the kit has teeth: every planted wrong VJP is caught ----------------------------------------


def _planted(name: str, kind: str) -> ops.OpDef:
    """The op ``name`` with a VJP that is wrong in the way ``kind`` says (same check, same
    inputs)."""
    original = TESTED[name]

    @functools.wraps(original.forward)  # the same signature, so the same inputs
    def wrong(*args: Any, **kwargs: Any) -> tuple[ops.Array, ops.Vjp]:
        out, vjp = original.forward(*args, **kwargs)

        def wrong_vjp(g: ops.Array, needs: tuple[bool, ...]) -> ops.Grads:
            grads = list(vjp(g, needs))
            last = max(i for i, gr in enumerate(grads) if gr is not None or needs[i])
            if kind == "scaled":  # off by one per cent
                grads = [None if gr is None else gr * 1.01 for gr in grads]
            elif kind == "dropped":  # a term of the gradient forgotten
                grads[last] = None
            elif kind == "transposed" and grads[last] is not None:  # a matrix gradient transposed
                grads[last] = np.swapaxes(grads[last], -1, -2)
            elif kind == "permuted" and grads[last] is not None:  # misaligned indices
                grads[last] = np.roll(grads[last].ravel(), 1).reshape(grads[last].shape)
            return tuple(grads)

        return out, wrong_vjp

    data = {original.slots[i].name: original.slots[i].kind for i in original.data_slots}
    return ops.op(check=original.check, data=data, name=name)(wrong)


def _weighted_fn(op: ops.OpDef, example: Any, weights: np.ndarray) -> gl.testing.gradcheck.Fn:
    def fn(g: gl.Graph, *floats: gl.NodeId) -> gl.NodeId:
        given_nodes = dict(zip(example.floats, floats, strict=True))
        inputs = [given_nodes.get(i, value) for i, value in enumerate(example.inputs)]
        return g.sum(g.mul(g.apply(op, *inputs, **example.params), g.constant(weights)))

    return fn


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("kind", ["scaled", "dropped", "permuted"])
@pytest.mark.parametrize("name", sorted(TESTED))
@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_planted_wrong_vjp_is_caught(
    name: str, kind: str, mode: str, data: st.DataObject
) -> None:
    example = draw_example(data, name)
    weights = data.draw(
        gst.arrays(reference(name, example.inputs, example.params).shape), label="weights"
    )
    floats = [example.inputs[i] for i in example.floats]
    fn = _weighted_fn(TESTED[name], example, weights)
    true_grad = jacobian(fn, *floats)[-1].reshape(np.shape(floats[-1]))
    # Only a gradient that the mutation really changes can be caught.
    if kind == "permuted":
        rolled = np.roll(true_grad.ravel(), 1).reshape(true_grad.shape)
        assume(np.abs(true_grad - rolled).max(initial=0.0) > 1e-2)
    else:
        assume(np.abs(true_grad).max(initial=0.0) > 1e-2)
    assert gradcheck(fn, *floats, mode=mode)  # the true VJP passes
    with pytest.raises(GradcheckError):
        gradcheck(_weighted_fn(_planted(name, kind), example, weights), *floats, mode=mode)


def test_a_planted_op_reaches_the_graph_method_through_its_family_module() -> None:
    # One op, one place: the Graph one-liner reads the op from its family module.
    g = gl.Graph()
    x = g.parameter(np.array([0.5, 2.0]))
    with (
        mock.patch.object(ops.activations, "tanh", _planted("tanh", "scaled")),
        pytest.raises(GradcheckError),
    ):
        gradcheck(lambda g, x: g.sum(g.tanh(x)), g.value(x))
    assert gradcheck(lambda g, x: g.sum(g.tanh(x)), g.value(x))


@pytest.mark.parametrize("mode", ["full", "fast"])
@given(a=gst.arrays((3, 3)), b=gst.arrays((3, 3)))
def test_a_transposed_matmul_gradient_is_caught(mode: str, a: np.ndarray, b: np.ndarray) -> None:
    def fn(g: gl.Graph, a: gl.NodeId, b: gl.NodeId) -> gl.NodeId:
        return g.sum(g.tanh(g.matmul(a, b)))

    true_grad = jacobian(fn, a, b)[1].reshape(3, 3)
    assume(np.abs(true_grad - true_grad.T).max() > 1e-2)
    assert gradcheck(fn, a, b, mode=mode)
    with (
        mock.patch.object(ops.linalg, "matmul", _planted("matmul", "transposed")),
        pytest.raises(GradcheckError, match="input 1"),
    ):
        gradcheck(fn, a, b, mode=mode)


# --- check_vjp and the Jacobians -------------------------------------------------------------------


def test_check_vjp_catches_wasted_work_and_wrong_gradients() -> None:
    def greedy(a: ops.Array, b: ops.Array) -> tuple[ops.Array, ops.Vjp]:
        return a * b, lambda g, needs: (g * b, g * a)  # ignores needs

    with pytest.raises(
        GradcheckError,
        match=r"check_vjp: greedy's VJP computed a gradient for input 1 although needs=\(True, False\)",
    ):
        check_vjp(greedy, np.ones(3), np.ones(3))
    with pytest.raises(GradcheckError, match="gradient of input 0"):
        check_vjp(_square_wrong, np.array([1.0, 2.0]))
    assert check_vjp(ops.scale, np.array([1.0, 2.0]), c=3.0)
    assert check_vjp(ops.sum, np.ones((2, 3)), axis=-1)  # an OpDef checks (and normalises) first
    labels = np.array([0, 2])  # data inputs pass through and get no gradient
    assert check_vjp(ops.cross_entropy, np.ones((2, 3)), labels, label_smoothing=0.1)


def test_jacobian_and_numeric_jacobian_agree_with_the_formula() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    w = np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])

    def fn(g: gl.Graph, x: gl.NodeId, w: gl.NodeId) -> gl.NodeId:
        return g.tanh(g.matmul(x, w))

    analytic = jacobian(fn, x, w)
    numeric = numeric_jacobian(fn, x, w)
    assert [j.shape for j in analytic] == [(6, 4), (6, 6)]
    # d tanh(x w)[i, k] / d w[j, k'] = (1 - tanh²)[i, k] * x[i, j] * [k == k']
    dt = 1 - np.tanh(x @ w) ** 2
    expected_w = np.einsum("ik,ij,kl->ikjl", dt, x, np.eye(3)).reshape(6, 6)
    np.testing.assert_allclose(analytic[1], expected_w, rtol=1e-12, atol=1e-15)
    for a, n in zip(analytic, numeric, strict=True):
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8)
