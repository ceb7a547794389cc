"""Every op in ``ops.OPS`` (and the fused LoRA op), driven by the registry: forward against an
independent NumPy reference, gradients against complex-step derivatives of that reference (exact
to ~1e-15, no truncation error), against central differences through ``gradcheck``, and against
``torch.autograd`` where PyTorch is installed; float32 kept float32; no work for constants;
zero-size arrays handled as PyTorch handles them.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.special
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from op_cases import REFERENCES, TESTED, draw_example, nodes_for, record, reference

import graphlora as gl
from graphlora import ops
from graphlora.testing import check_vjp, gradcheck
from graphlora.testing import strategies as gst

NAMES = sorted(TESTED)


def test_every_op_has_a_reference_row_and_a_sample() -> None:
    assert sorted(REFERENCES) == NAMES
    assert all(TESTED[name].sample is not None for name in NAMES)


def test_every_catalogue_op_is_a_graph_method_taking_its_inputs_by_name() -> None:
    for name, op in ops.OPS.items():
        method = getattr(gl.Graph, name)
        parameters = list(inspect.signature(method).parameters)[1:]  # after self
        if op.variadic:
            assert parameters[0] == "nodes", name
        else:
            assert parameters[: len(op.slots)] == [slot.name for slot in op.slots], name


def test_an_op_is_an_attribute_of_the_ops_module_and_checks_when_called() -> None:
    assert ops.matmul is ops.OPS["matmul"]
    out, _ = ops.sum(np.ones((2, 3)), axis=-1)  # the check normalises the axis
    np.testing.assert_array_equal(out, [3.0, 3.0])
    with pytest.raises(gl.ShapeError, match=r"sum: axis 2 is out of range for shape \(2, 3\)"):
        ops.sum(np.ones((2, 3)), axis=2)
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = ops.nonsense


def _reference_grads(name: str, example: gst.Example, seed: np.ndarray) -> dict[int, np.ndarray]:
    """d/dx of sum(reference(x) * seed) for each float input: by complex step (smooth ops) or
    by an exact secant away from the kink (relu, dropout)."""
    grads = {}
    h = 1e-20
    for i in example.floats:
        x = example.inputs[i]
        assert x is not None
        grad = np.zeros_like(x)
        for j in range(x.size):
            shifted = [
                a.astype(complex) if k in example.floats else a
                for k, a in enumerate(example.inputs)
            ]
            if TESTED[name].smooth:
                shifted[i].flat[j] += 1j * h
                grad.flat[j] = np.sum(reference(name, shifted, example.params) * seed).imag / h
            else:
                step = 1e-3
                shifted[i].flat[j] += step
                up = np.sum(reference(name, shifted, example.params) * seed).real
                shifted[i].flat[j] -= 2 * step
                down = np.sum(reference(name, shifted, example.params) * seed).real
                grad.flat[j] = (up - down) / (2 * step)
        grads[i] = grad
    return grads


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_forward_and_gradients_match_reference_to_1e9(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    g = gl.Graph()
    nodes = nodes_for(g, example)
    out = record(g, name, nodes, example.params)
    expected = reference(name, example.inputs, example.params)
    np.testing.assert_allclose(g.value(out), expected, rtol=1e-12, atol=1e-14)
    seed = data.draw(gst.arrays(expected.shape), label="seed")
    g.backward(out, grad=seed)
    for i, want in _reference_grads(name, example, seed).items():
        got = g.grad(nodes[i])
        assert got is not None, f"{name}: input {i} got no gradient"
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11, err_msg=f"{name} input {i}")


def _weighted(name: str, example: gst.Example, weights: np.ndarray) -> Any:
    """``fn(g, *float_nodes)``: the op's output weighted elementwise and summed, so that every
    output element counts differently; data inputs kept as they are."""

    def fn(g: gl.Graph, *floats: gl.NodeId) -> gl.NodeId:
        given_nodes = dict(zip(example.floats, floats, strict=True))
        inputs = [given_nodes.get(i, value) for i, value in enumerate(example.inputs)]
        return g.sum(g.mul(record(g, name, inputs, example.params), g.constant(weights)))

    return fn


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["full", "fast"])
@given(data=st.data())
def test_gradcheck_passes_for_every_op(name: str, mode: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    out_shape = reference(name, example.inputs, example.params).shape
    weights = data.draw(gst.arrays(out_shape), label="weights")
    floats = [example.inputs[i] for i in example.floats]
    assert gradcheck(_weighted(name, example, weights), *floats, mode=mode) is True


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_check_vjp_passes_every_bare_op(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    assert check_vjp(TESTED[name], *example.inputs, **example.params)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_float32_graph_keeps_float32(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    g = gl.Graph(np.float32)
    nodes = nodes_for(g, example)
    out = record(g, name, nodes, example.params)
    assert g.value(out).dtype == np.float32
    g.backward(out, grad=np.ones(out.shape))
    for i in example.floats:
        grad = g.grad(nodes[i])
        assert grad is not None
        assert grad.dtype == np.float32
        assert grad.shape == nodes[i].shape
    expected = reference(name, example.inputs, example.params)
    np.testing.assert_allclose(g.value(out), expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_constant_inputs_get_no_gradient_and_no_work(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    g = gl.Graph()
    nodes = nodes_for(g, example, trained=False)
    out = record(g, name, nodes, example.params)
    assert not out.requires_grad
    assert out._vjp is None  # no closure kept: nothing to run backward through
    assert all(g.grad(nodes[i]) is None for i in example.floats)


@pytest.mark.parametrize("name", sorted(ops.OPS))
@given(data=st.data())
def test_integer_and_bool_nodes_are_read_in_the_graphs_float_dtype(
    name: str, data: st.DataObject
) -> None:
    example = draw_example(data, name)
    g = gl.Graph(np.float32)
    nodes = nodes_for(g, example, trained=False)
    first = example.floats[0]
    as_ints = np.round(np.asarray(example.inputs[first])).astype(np.int64)
    nodes[first] = g.constant(as_ints)
    assert nodes[first].dtype == np.int64  # a data leaf keeps its kind
    inputs = list(example.inputs)
    inputs[first] = as_ints.astype(np.float64)
    with np.errstate(all="ignore"):
        out = record(g, name, nodes, example.params)
        expected = reference(name, inputs, example.params)
    assert g.value(out).dtype == np.float32  # no silent float64
    np.testing.assert_allclose(g.value(out), expected, rtol=2e-4, atol=2e-4)


# --- zero-size arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ops.OPS))
@settings(max_examples=30)
@given(data=st.data())
def test_zero_size_arrays_give_what_the_reference_gives_and_zero_gradients(
    name: str, data: st.DataObject
) -> None:
    example = draw_example(data, name, empty=True)
    assume(any(np.size(example.inputs[i]) == 0 for i in example.floats))
    g = gl.Graph()
    nodes = nodes_for(g, example)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's "mean of empty slice"
        expected = reference(name, example.inputs, example.params)
    out = record(g, name, nodes, example.params)
    np.testing.assert_array_equal(g.value(out), expected)  # NaN where the mean of nothing is
    g.backward(out, grad=np.ones(out.shape))
    for i in example.floats:
        grad = g.grad(nodes[i])
        assert grad is not None and grad.shape == nodes[i].shape
        if nodes[i].shape and 0 in nodes[i].shape:
            continue
        np.testing.assert_array_equal(grad, 0.0)  # a non-empty input beside an empty one


def test_matmul_with_an_empty_inner_or_output_axis() -> None:
    # Found by tinygrad's gemm-with-zeros case: the VJP reshaped (-1, 0).
    for a_shape, b_shape in [
        ((0,), (0, 8)),
        ((2, 3, 0), (0, 5)),
        ((2, 3, 5), (5, 0)),
        ((3, 0), (0,)),
        ((2, 3, 0), (0,)),
    ]:
        g = gl.Graph()
        a, b = g.parameter(np.zeros(a_shape)), g.parameter(np.zeros(b_shape))
        g.backward(g.sum(g.matmul(a, b)))
        assert g.grad(a).shape == a_shape  # type: ignore[union-attr]
        assert g.grad(b).shape == b_shape  # type: ignore[union-attr]


# --- PyTorch cross-check (skipped where PyTorch is not installed) -------------------------------


def _torch_tensor(torch: Any, value: Any, grad: bool) -> Any:
    if value is None:
        return None
    array = np.asarray(value)
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    if array.dtype.kind == "b":
        return torch.from_numpy(array)
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("name", [n for n in NAMES if TESTED[n].torch is not None])
@pytest.mark.parametrize("empty", [False, True])
@given(data=st.data())
def test_matches_torch_autograd(name: str, empty: bool, data: st.DataObject) -> None:
    torch = pytest.importorskip("torch")
    example = draw_example(data, name, empty=empty)
    g = gl.Graph()
    nodes = nodes_for(g, example)
    out = record(g, name, nodes, example.params)
    seed = data.draw(gst.arrays(out.shape), label="seed")
    g.backward(out, grad=seed)
    tensors = [
        _torch_tensor(torch, value, i in example.floats) for i, value in enumerate(example.inputs)
    ]
    expected = TESTED[name].torch(torch, *tensors, **example.params)  # type: ignore[misc]
    expected.backward(torch.from_numpy(np.ascontiguousarray(seed)).reshape(expected.shape))
    np.testing.assert_allclose(
        g.value(out), expected.detach().numpy().reshape(out.shape), rtol=1e-9, atol=1e-12
    )
    for i in example.floats:
        want = tensors[i].grad
        want = np.zeros(nodes[i].shape) if want is None else want.numpy()
        np.testing.assert_allclose(g.grad(nodes[i]), want, rtol=1e-9, atol=1e-12)


# --- single facts -----------------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    x=gst.arrays(gst.shapes(min_dims=1, max_dims=3, max_side=5), min_value=-50.0, max_value=50.0),
    data=st.data(),
)
def test_log_softmax_agrees_with_scipy_to_the_last_bit(x: np.ndarray, data: st.DataObject) -> None:
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    out, _ = ops.log_softmax(x, axis=axis)
    np.testing.assert_array_equal(out, scipy.special.log_softmax(x, axis=axis))


def test_log_softmax_handles_infinite_rows_as_scipy_does() -> None:
    x = np.array([[0.0, -np.inf], [-np.inf, -np.inf], [np.inf, 1.0], [1000.0, 0.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        out, _ = ops.log_softmax(x, axis=1)
        want = scipy.special.log_softmax(x, axis=1)
    np.testing.assert_array_equal(out, want)
