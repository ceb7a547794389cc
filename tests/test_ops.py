"""Every op in ``ops.OPS``: forward against an independent NumPy reference, gradients against
complex-step derivatives of that reference (exact to ~1e-15, no truncation error), against
central differences through ``gradcheck``, and against ``torch.autograd`` where PyTorch is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from op_cases import CASES, Arrays, Case, Params, draw_case

import graphlora as gl
from graphlora import ops
from graphlora.testing import gradcheck
from graphlora.testing import strategies as gst


def test_every_op_has_a_case() -> None:
    assert sorted(CASES) == sorted(ops.OPS)


def test_every_op_is_a_graph_method() -> None:
    for name in ops.OPS:
        assert callable(getattr(gl.Graph, name)), name


def _reference_grads(
    case: Case, arrays: Arrays, params: Params, seed: np.ndarray
) -> list[np.ndarray]:
    """d/dx of sum(reference(x) * seed), by complex step (smooth ops) or exact finite pieces."""
    grads = []
    h = 1e-20
    for i, x in enumerate(arrays):
        grad = np.zeros_like(x)
        for j in range(x.size):
            shifted = [a.astype(complex) for a in arrays]
            if case.smooth:
                shifted[i].flat[j] += 1j * h
                grad.flat[j] = np.sum(case.reference(*shifted, **params) * seed).imag / h
            else:  # piecewise linear (relu, dropout): an exact secant away from the kink
                step = 1e-3
                shifted[i].flat[j] += step
                up = np.sum(case.reference(*shifted, **params) * seed).real
                shifted[i].flat[j] -= 2 * step
                down = np.sum(case.reference(*shifted, **params) * seed).real
                grad.flat[j] = (up - down) / (2 * step)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("name", sorted(CASES))
@given(data=st.data())
def test_forward_and_gradients_match_reference_to_1e9(name: str, data: st.DataObject) -> None:
    case, arrays, params = draw_case(data, name)
    g = gl.Graph()
    nodes = [g.parameter(a) for a in arrays]
    out = case.call(g, *nodes, **params)
    expected = np.asarray(case.reference(*arrays, **params))
    np.testing.assert_allclose(g.value(out), expected, rtol=1e-12, atol=1e-14)
    seed = data.draw(gst.arrays(expected.shape), label="seed")
    g.backward(out, grad=seed)
    for i, (node, want) in enumerate(
        zip(nodes, _reference_grads(case, arrays, params, seed), strict=True)
    ):
        got = g.grad(node)
        assert got is not None, f"{name}: input {i} got no gradient"
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=f"{name} input {i}")


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["full", "fast"])
@given(data=st.data())
def test_gradcheck_passes_for_every_op(name: str, mode: str, data: st.DataObject) -> None:
    case, arrays, params = draw_case(data, name)
    out_shape = np.shape(case.reference(*arrays, **params))
    weights = data.draw(gst.arrays(out_shape), label="weights")

    def fn(g: gl.Graph, *nodes: gl.NodeId) -> gl.NodeId:
        # Weighting the output makes every output element count differently in the loss.
        return g.sum(g.mul(case.call(g, *nodes, **params), g.constant(weights)))

    assert gradcheck(fn, *arrays, mode=mode) is True


@pytest.mark.parametrize("name", sorted(CASES))
@given(data=st.data())
def test_float32_graph_keeps_float32(name: str, data: st.DataObject) -> None:
    case, arrays, params = draw_case(data, name)
    g = gl.Graph(np.float32)
    nodes = [g.parameter(a) for a in arrays]
    out = case.call(g, *nodes, **params)
    assert g.value(out).dtype == np.float32
    g.backward(out, grad=np.ones(out.shape))
    for node in nodes:
        grad = g.grad(node)
        assert grad is not None
        assert grad.dtype == np.float32
        assert grad.shape == node.shape
    expected = case.reference(*arrays, **params)
    np.testing.assert_allclose(g.value(out), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", sorted(CASES))
@given(data=st.data())
def test_constant_inputs_get_no_gradient_and_no_work(name: str, data: st.DataObject) -> None:
    case, arrays, params = draw_case(data, name)
    g = gl.Graph()
    nodes = [g.constant(a) for a in arrays]
    out = case.call(g, *nodes, **params)
    assert not out.requires_grad
    assert out._vjp is None  # no closure kept: nothing to run backward through
    assert all(g.grad(node) is None for node in nodes)


# --- PyTorch cross-check (skipped where PyTorch is not installed) -------------------------------


def _torch_call(name: str, torch: Any, tensors: list[Any], params: Params) -> Any:
    F = torch.nn.functional
    a = tensors[0]
    simple = {
        "add": lambda: a + tensors[1],
        "sub": lambda: a - tensors[1],
        "mul": lambda: a * tensors[1],
        "div": lambda: a / tensors[1],
        "neg": lambda: -a,
        "matmul": lambda: torch.matmul(a, tensors[1]),
        "relu": lambda: torch.relu(a),
        "tanh": lambda: torch.tanh(a),
        "sigmoid": lambda: torch.sigmoid(a),
        "exp": lambda: torch.exp(a),
        "log": lambda: torch.log(a),
        "mse_loss": lambda: F.mse_loss(a, tensors[1]),
    }
    if name in simple:
        return simple[name]()
    if name == "scale":
        return a * params["c"]
    if name == "pow":
        return a ** params["p"]
    if name in ("sum", "mean"):
        axis = params["axis"]
        reduce = torch.sum if name == "sum" else torch.mean
        if axis is None:
            out = reduce(a)
            return out.reshape((1,) * a.ndim) if params["keepdims"] else out
        dims = axis if isinstance(axis, tuple) else (axis,)
        if dims == ():
            return a.clone() if name == "sum" else a * 1.0
        return reduce(a, dim=dims, keepdim=params["keepdims"])
    if name == "reshape":
        return a.reshape(params["shape"])
    if name == "transpose":
        axes = params["axes"]
        return a.permute(tuple(reversed(range(a.ndim))) if axes is None else axes)
    if name == "gelu":
        return F.gelu(a, approximate=params["approximate"])
    if name == "softmax":
        return torch.softmax(a, dim=params["axis"])
    if name == "log_softmax":
        return torch.log_softmax(a, dim=params["axis"])
    if name == "lora_linear":
        x, w, lora_a, lora_b, *bias = tensors
        mask = params.get("mask")
        xd = x if mask is None else x * torch.from_numpy(mask)
        out = x @ w + ((xd @ lora_a) * params["scaling"]) @ lora_b
        return out + bias[0] if bias else out
    if name == "cross_entropy":
        return F.cross_entropy(a, torch.from_numpy(params["labels"]).long())
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"dropout"}))
@given(data=st.data())
def test_matches_torch_autograd(name: str, data: st.DataObject) -> None:
    torch = pytest.importorskip("torch")
    case, arrays, params = draw_case(data, name)
    g = gl.Graph()
    nodes = [g.parameter(a) for a in arrays]
    out = case.call(g, *nodes, **params)
    seed = data.draw(gst.arrays(out.shape), label="seed")
    g.backward(out, grad=seed)
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    expected = _torch_call(name, torch, tensors, params)
    expected.backward(torch.from_numpy(np.ascontiguousarray(seed)).reshape(expected.shape))
    np.testing.assert_allclose(
        g.value(out), expected.detach().numpy().reshape(out.shape), rtol=1e-9, atol=1e-12
    )
    for node, tensor in zip(nodes, tensors, strict=True):
        np.testing.assert_allclose(g.grad(node), tensor.grad.numpy(), rtol=1e-9, atol=1e-12)


@settings(max_examples=100)
@given(
    x=gst.arrays(gst.shapes(min_dims=1, max_dims=3, max_side=5), min_value=-50.0, max_value=50.0),
    data=st.data(),
)
def test_log_softmax_agrees_with_scipy_to_the_last_bit(x: np.ndarray, data: st.DataObject) -> None:
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    out, _ = ops.log_softmax(x, axis)
    np.testing.assert_array_equal(out, scipy.special.log_softmax(x, axis=axis))


def test_log_softmax_handles_infinite_rows_as_scipy_does() -> None:
    x = np.array([[0.0, -np.inf], [-np.inf, -np.inf], [np.inf, 1.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        out, _ = ops.log_softmax(x, 1)
        want = scipy.special.log_softmax(x, axis=1)
    np.testing.assert_array_equal(out, want)
