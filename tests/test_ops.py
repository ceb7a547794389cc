"""Every op in ``ops.OPS`` (and the fused LoRA op), driven by the registry: forward against an
independent NumPy reference, gradients against complex-step derivatives of that reference (exact
to ~1e-15, no truncation error), against central differences through ``gradcheck``, and against
``torch.autograd`` where PyTorch is installed; float32 kept float32; no work for constants;
zero-size arrays handled as PyTorch handles them.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.special
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from op_cases import REFERENCES, TESTED, draw_example, nodes_for, record, reference
from refusals import Refusal, assert_refusals

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


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["full", "fast"])
@given(data=st.data())
def test_gradcheck_passes_for_every_op(name: str, mode: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    out_shape = reference(name, example.inputs, example.params).shape
    weights = data.draw(gst.arrays(out_shape), label="weights")
    floats = [example.inputs[i] for i in example.floats]
    assert gradcheck(_weighted(name, example, weights), *floats, mode=mode) is True


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_check_vjp_passes_every_bare_op(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name)
    assert check_vjp(TESTED[name], *example.inputs, params=example.params)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_each_input_alone_gets_the_gradient_it_gets_beside_the_others(
    name: str, data: st.DataObject
) -> None:
    """An op's VJP computes only what ``needs`` asks for: with one input a parameter and the
    rest constants, that input's gradient is the one it gets when all are parameters."""
    example = draw_example(data, name)
    g = gl.Graph()
    nodes = nodes_for(g, example)
    out = record(g, name, nodes, example.params)
    seed = data.draw(gst.arrays(out.shape), label="seed")
    g.backward(out, grad=seed)
    for i in example.floats:
        alone = gl.Graph()
        inputs = nodes_for(alone, example, trained=False)
        inputs[i] = alone.parameter(example.inputs[i])
        alone.backward(record(alone, name, inputs, example.params), grad=seed)
        np.testing.assert_array_equal(alone.grad(inputs[i]), g.grad(nodes[i]), err_msg=f"{i}")
        assert all(alone.grad(inputs[j]) is None for j in example.floats if j != i)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ops.OPS))
@settings(max_examples=30)
@given(data=st.data())
def test_zero_size_arrays_give_what_the_reference_gives(name: str, data: st.DataObject) -> None:
    example = draw_example(data, name, empty=True)
    assume(any(np.size(example.inputs[i]) == 0 for i in example.floats))
    g = gl.Graph()
    nodes = nodes_for(g, example)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's "mean of empty slice"
        expected = reference(name, example.inputs, example.params)
    out = record(g, name, nodes, example.params)
    np.testing.assert_array_equal(g.value(out), expected)  # NaN where the mean of nothing is
    seed = np.ones(out.shape)
    g.backward(out, grad=seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wanted = _reference_grads(name, example, seed)
    for i, want in wanted.items():
        grad = g.grad(nodes[i])
        assert grad is not None and grad.shape == nodes[i].shape
        np.testing.assert_allclose(grad, want, rtol=1e-9, atol=1e-11, err_msg=f"{name} input {i}")


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


@pytest.mark.slow
@pytest.mark.crosscheck
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
    with warnings.catch_warnings():  # PyTorch warns of a variance over too few elements
        warnings.simplefilter("ignore", UserWarning)
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


# --- transformer ops: refusals and single facts ------------------------------------------------


def _refused(g: gl.Graph, error: type[BaseException], match: str, call: Any) -> None:
    before = len(g)
    with pytest.raises(error, match=match):
        call()
    assert len(g) == before, "a refused call recorded something"


def test_embedding_refuses_ids_out_of_range_float_ids_and_a_weight_that_is_not_a_matrix() -> None:
    g = gl.Graph()
    weight = g.parameter(np.arange(12.0).reshape(4, 3))
    _refused(
        g,
        ValueError,
        re.escape("embedding: id 4 is out of range for 4 embeddings (ids must lie in [0, 4))"),
        lambda: g.embedding(weight, [0, 4]),
    )
    _refused(
        g,
        ValueError,
        re.escape("embedding: id -1 is out of range for 4 embeddings"),
        lambda: g.embedding(weight, np.array([[-1, 2]])),
    )
    _refused(
        g,
        TypeError,
        "embedding: ids must be integers, got dtype float64",
        lambda: g.embedding(weight, [0.0, 1.0]),
    )
    flat = g.parameter(np.ones(12))
    _refused(
        g,
        gl.ShapeError,
        re.escape("embedding: weight must be [V, D], got shape (12,)"),
        lambda: g.embedding(flat, [0]),
    )
    ids = g.constant(np.array([[3, 0], [3, 3]]))  # a data leaf; the last id is at the boundary
    out = g.embedding(weight, ids)
    np.testing.assert_array_equal(g.value(out), g.value(weight)[[[3, 0], [3, 3]]])
    g.backward(g.sum(out))
    np.testing.assert_array_equal(g.grad(weight)[:, 0], [1.0, 0.0, 0.0, 3.0])  # row 3 picked 3x


def test_an_embedding_step_compiles_and_reads_each_new_batch_of_ids() -> None:
    g = gl.Graph()
    weight = g.parameter(np.arange(8.0).reshape(4, 2))
    ids = g.constant(np.array([0, 1]))
    step = g.compile(g.sum(g.embedding(weight, ids)))
    g.set_value(ids, np.array([3, 3]))
    assert float(step()) == 2 * (6.0 + 7.0)
    np.testing.assert_array_equal(g.grad(weight), [[0, 0], [0, 0], [0, 0], [2, 2]])


def test_getitem_basic_and_integer_array_indexing_and_its_refusals() -> None:
    g = gl.Graph()
    x = g.parameter(np.arange(6.0).reshape(2, 3))
    picked = g.getitem(x, (slice(None), [2, 0, 2]))  # column 2 twice
    np.testing.assert_array_equal(g.value(picked), [[2, 0, 2], [5, 3, 5]])
    g.backward(g.sum(picked))
    np.testing.assert_array_equal(g.grad(x), [[1, 0, 2], [1, 0, 2]])
    np.testing.assert_array_equal(g.value(g.getitem(x, (Ellipsis, None, -1))), [[2], [5]])
    _refused(
        g,
        gl.ShapeError,
        r"getitem: index \(0, 3\) does not fit shape \(2, 3\): index 3 is out of bounds",
        lambda: g.getitem(x, (0, 3)),
    )
    _refused(
        g,
        TypeError,
        "getitem: index arrays must hold integers or bools, got dtype float64",
        lambda: g.getitem(x, np.array([0.0])),
    )
    _refused(g, TypeError, "getitem: an index is made of ints, slices", lambda: g.getitem(x, "a"))


def test_concat_stack_and_split_with_numpys_meaning() -> None:
    g = gl.Graph()
    a, b = g.parameter(np.ones((2, 3))), g.parameter(np.zeros((2, 1)))
    joined = g.concat([a, b], axis=-1)
    assert joined.shape == (2, 4)
    g.backward(g.sum(g.mul(joined, g.constant(np.arange(8.0).reshape(2, 4)))))
    np.testing.assert_array_equal(g.grad(b), [[3.0], [7.0]])
    _refused(
        g,
        gl.ShapeError,
        re.escape(
            "concat: input 1 has shape (2, 1), which does not fit (2, 3) except along axis 0"
        ),
        lambda: g.concat([a, b], axis=0),
    )
    _refused(g, ValueError, "concat: needs at least one node", lambda: g.concat([]))
    _refused(
        g,
        gl.ShapeError,
        re.escape("stack: input 1 has shape (2, 1), input 0 has (2, 3)"),
        lambda: g.stack([a, b]),
    )
    assert g.stack([a, a], axis=-1).shape == (2, 3, 2)
    x = g.parameter(np.arange(10.0))
    for cut in (5, [3, 7], [4, 20], [6, 2]):
        pieces = g.split(x, cut)
        wanted = np.split(np.arange(10.0), cut)
        assert len(pieces) == len(wanted)
        for piece, want in zip(pieces, wanted, strict=True):
            np.testing.assert_array_equal(g.value(piece), want)
    _refused(
        g,
        ValueError,
        "split: 10 along axis 0 does not split into 3 equal sections",
        lambda: g.split(x, 3),
    )


def test_where_takes_a_bool_mask_and_refuses_others() -> None:
    g = gl.Graph()
    a, b = g.parameter(np.ones(3)), g.parameter(np.zeros(3))
    cond = g.constant(np.array([True, False, True]))
    out = g.where(cond, a, b)
    g.backward(g.sum(out))
    np.testing.assert_array_equal(g.grad(a), [1, 0, 1])
    np.testing.assert_array_equal(g.grad(b), [0, 1, 0])
    _refused(
        g,
        TypeError,
        "where: cond must be a bool array, got dtype int64",
        lambda: g.where(np.array([1, 0, 1]), a, b),
    )
    _refused(
        g,
        gl.ShapeError,
        re.escape("where: shapes cond (2,), a (3,) and b (3,) do not broadcast together"),
        lambda: g.where(np.array([True, False]), a, b),
    )


@pytest.mark.crosscheck
@pytest.mark.parametrize("name", ["maximum", "max"])
def test_ties_share_the_gradient_as_torch_does(name: str) -> None:
    torch = pytest.importorskip("torch")
    g = gl.Graph()
    if name == "maximum":
        a, b = g.parameter([1.0, 2.0, 3.0]), g.parameter([1.0, 1.0, 4.0])
        g.backward(g.sum(g.maximum(a, b)))
        ta = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
        tb = torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
        torch.maximum(ta, tb).sum().backward()
        np.testing.assert_array_equal(g.grad(a), ta.grad.numpy())  # [0.5, 1, 0]
        np.testing.assert_array_equal(g.grad(b), tb.grad.numpy())
    else:
        data = [[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]
        x = g.parameter(data)
        g.backward(g.sum(g.max(x, axis=1)))
        tx = torch.tensor(data, dtype=torch.float64, requires_grad=True)
        torch.amax(tx, dim=1).sum().backward()
        np.testing.assert_allclose(g.grad(x), tx.grad.numpy(), rtol=1e-15)  # halves, thirds


def test_max_refuses_an_empty_reduction_and_relu_abs_have_gradient_zero_at_zero() -> None:
    g = gl.Graph()
    empty = g.constant(np.zeros((2, 0)))
    _refused(
        g,
        gl.ShapeError,
        r"max: cannot reduce over an axis of size 0 \(axis \[1\] of shape \(2, 0\)\)",
        lambda: g.max(empty, axis=1),
    )
    x = g.parameter([0.0, 1.0, -1.0])
    g.backward(g.sum(g.relu(x)))
    np.testing.assert_array_equal(g.grad(x), [0.0, 1.0, 0.0])  # as PyTorch
    g.zero_grad()
    g.backward(g.sum(g.abs(x)))
    np.testing.assert_array_equal(g.grad(x), [0.0, 1.0, -1.0])


def test_attention_refuses_a_mask_that_is_not_bool_and_shapes_that_do_not_fit() -> None:
    g = gl.Graph()
    q, k, v = (g.parameter(np.ones((2, 3, 4))) for _ in range(3))
    _refused(
        g,
        TypeError,
        "scaled_dot_product_attention: mask must be a bool array, got dtype float64",
        lambda: g.scaled_dot_product_attention(q, k, v, mask=np.zeros((3, 3))),
    )
    _refused(
        g,
        gl.ShapeError,
        re.escape("scaled_dot_product_attention: mask of shape (3, 2) does not broadcast"),
        lambda: g.scaled_dot_product_attention(q, k, v, mask=np.ones((3, 2), dtype=bool)),
    )
    wide = g.parameter(np.ones((2, 3, 5)))
    _refused(
        g,
        gl.ShapeError,
        "scaled_dot_product_attention: shapes do not fit q",
        lambda: g.scaled_dot_product_attention(q, wide, v),
    )


def test_a_query_that_keeps_no_key_gets_zeros_and_no_gradient_as_in_torch() -> None:
    g = gl.Graph()
    rng = np.random.default_rng(0)
    q, k, v = (g.parameter(rng.normal(size=(3, 2))) for _ in range(3))
    mask = np.array([[True, True, False], [False, False, False], [True, False, False]])
    out = g.scaled_dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(g.value(out)[1], 0.0)
    g.backward(g.sum(out))
    np.testing.assert_array_equal(g.grad(q)[1], 0.0)
    causal = g.scaled_dot_product_attention(q, k, v, causal=True)
    np.testing.assert_allclose(g.value(causal)[0], g.value(v)[0], rtol=1e-15)  # only itself


def test_layer_norm_checks_its_weights() -> None:
    g = gl.Graph()
    x, w, b = g.parameter(np.ones((2, 3))), g.parameter(np.ones(3)), g.parameter(np.ones(2))
    _refused(
        g,
        gl.ShapeError,
        re.escape("layer_norm: bias has shape (2,); x (2, 3) needs (3,)"),
        lambda: g.layer_norm(x, w, b),
    )
    _refused(
        g,
        ValueError,
        re.escape("rms_norm: eps must be >= 0, got -1.0"),
        lambda: g.rms_norm(x, eps=-1.0),
    )


# --- behaviours a mutation of the ops would change (mutation testing found them unchecked) ------


def test_relu_gradient_at_exactly_zero_is_zero_as_pytorch() -> None:
    g = gl.Graph()
    x = g.parameter([0.0, 1.0, -1.0])
    g.backward(g.sum(g.relu(x)))
    np.testing.assert_array_equal(g.grad(x), [0.0, 1.0, 0.0])


def test_log_softmax_of_a_large_row_beside_an_all_minus_inf_row_is_scipys() -> None:
    x = np.array([[1000.0, 0.0], [-np.inf, -np.inf]])
    g = gl.Graph()
    with np.errstate(invalid="ignore", divide="ignore"):  # the -inf row is NaN on both sides
        ours = g.value(g.log_softmax(g.constant(x)))
        theirs = scipy.special.log_softmax(x, axis=-1)
    np.testing.assert_array_equal(ours, theirs)
    assert ours[0, 0] == 0.0 and ours[0, 1] == -1000.0


def test_matmul_with_1d_operands_as_numpy_and_its_refusals() -> None:
    g = gl.Graph()
    v, m = g.parameter([1.0, 2.0]), g.parameter([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    np.testing.assert_array_equal(g.value(g.matmul(v, m)), [9.0, 12.0, 15.0])
    np.testing.assert_array_equal(g.value(g.matmul(v, v)), 5.0)
    g.backward(g.sum(g.matmul(v, m)))
    np.testing.assert_array_equal(g.grad(v), [6.0, 15.0])
    np.testing.assert_array_equal(g.grad(m), [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    with pytest.raises(gl.ShapeError, match=r"matmul: cannot multiply \(3,\) by \(2,\)"):
        g.matmul(g.constant([1.0, 2.0, 3.0]), v)


def test_cross_entropy_of_a_one_row_batch() -> None:
    g = gl.Graph()
    logits = g.parameter([[2.0, 0.0, -1.0]])
    loss = g.cross_entropy(logits, np.array([0]))
    expected = -(2.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0)))
    np.testing.assert_allclose(g.value(loss), expected, rtol=1e-15)
    g.backward(loss)
    soft = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    np.testing.assert_allclose(g.grad(logits), [soft - [1.0, 0.0, 0.0]], rtol=1e-14)


def test_every_graph_method_records_a_node_named_after_its_op() -> None:
    g = gl.Graph()
    x = g.parameter([[0.5, -1.0], [2.0, 0.25]])
    named = {
        "neg": g.neg(x),
        "abs": g.abs(x),
        "exp": g.exp(x),
        "tanh": g.tanh(x),
        "sigmoid": g.sigmoid(x),
        "relu": g.relu(x),
        "scale": g.scale(x, 2.0),
        "sum": g.sum(x),
        "mean": g.mean(x),
        "transpose": g.transpose(x),
        "reshape": g.reshape(x, (4,)),
        "softmax": g.softmax(x),
        "matmul": g.matmul(x, x),
    }
    assert {name: node.op for name, node in named.items()} == {name: name for name in named}


def test_gelu_defaults_to_the_exact_form_and_names_a_bad_approximation() -> None:
    x = np.array([-2.0, -0.5, 0.0, 1.5])
    exact, _ = ops.gelu(x)  # the op called directly, with its default
    np.testing.assert_allclose(exact, x * scipy.special.ndtr(x), rtol=1e-15)
    tanh, _ = ops.gelu(x, approximate="tanh")
    assert not np.array_equal(exact, tanh)
    g = gl.Graph()
    with pytest.raises(
        ValueError, match=r"^gelu: approximate must be 'none' or 'tanh', got 'erf'$"
    ):
        g.gelu(g.constant(x), approximate="erf")
    assert len(g) == 1  # the constant only: nothing recorded


def test_linear_refuses_shapes_that_do_not_fit_and_records_nothing() -> None:
    g = gl.Graph()
    x, w = g.constant(np.ones((2, 3))), g.constant(np.ones((3, 4)))
    cases = [
        (
            g.constant(np.ones((4, 3))),
            None,
            "linear: x (2, 3) needs a weight [in, out] with in = x's last axis, got (4, 3)",
        ),
        (w, g.constant(np.ones(3)), "linear: bias has shape (3,); the weight (3, 4) needs (4,)"),
    ]
    for weight, bias, message in cases:
        before = len(g)
        with pytest.raises(gl.ShapeError, match=re.escape(message)):
            g.linear(x, weight, bias)
        assert len(g) == before


def test_dir_of_the_ops_package_lists_every_op_and_export() -> None:
    names = dir(ops)
    assert names == sorted(names)
    assert set(ops.OPS) <= set(names)
    assert {"op", "OPS", "relu", "linear", "scaled_dot_product_attention"} <= set(names)


# --- what mutation testing found untested in the ops --------------------------------------------


def test_an_op_called_directly_names_a_wrong_number_of_inputs_and_uses_its_defaults() -> None:
    with pytest.raises(TypeError) as info:
        ops.relu(np.ones(2), np.ones(2))
    assert str(info.value) == "relu: takes the inputs (x), got 2 of them"
    with pytest.raises(TypeError) as info:
        ops.add(np.ones(2))
    assert str(info.value) == "add: takes the inputs (a, b), got 1 of them"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 / 0 over no elements: NaN, without np.mean's warning
        nothing, _ = ops.mean(np.ones((0, 2)))
    assert np.isnan(nothing)
    x = np.arange(6.0).reshape(2, 3)
    mean, _ = ops.mean(x)  # over every axis, not keeping them
    assert mean.shape == ()
    assert float(mean) == 2.5
    lse, _ = ops.logsumexp(x)  # over the last axis, not keeping it
    np.testing.assert_allclose(lse, scipy.special.logsumexp(x, axis=-1), rtol=1e-15)
    assert lse.shape == (2,)


def test_a_plain_function_must_return_exactly_a_tuple_of_out_and_vjp() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones(2))
    for result in (
        lambda a: (a, lambda grad, needs: (grad,), "extra"),
        lambda a: (a,),
        lambda a: [a, lambda grad, needs: (grad,)],
    ):
        with pytest.raises(TypeError) as info:
            g.apply(result, x)
        assert str(info.value).startswith("apply: <lambda> must return a pair (out, vjp), got ")
    assert g.tape == ()  # nothing recorded


def test_a_plain_functions_gradient_is_read_in_the_graph_dtype() -> None:
    g = gl.Graph(np.float32)
    x = g.parameter(np.ones(2))
    y = g.apply(lambda a: (a * 2, lambda grad, needs: (np.full(2, 2.0),)), x)  # float64 back
    g.backward(g.sum(y))
    assert g.grad(x).dtype == np.float32
    np.testing.assert_array_equal(g.grad(x), [2.0, 2.0])


def test_scale_and_pow_take_integer_scalars() -> None:
    g = gl.Graph()
    x = g.parameter([1.5, -2.0])
    np.testing.assert_array_equal(g.value(g.scale(x, 2)), [3.0, -4.0])
    np.testing.assert_array_equal(g.value(g.pow(x, 2)), [2.25, 4.0])


def test_sqrt_at_zero_has_an_infinite_gradient_and_no_warning() -> None:
    g = gl.Graph()
    x = g.parameter([0.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.backward(g.sum(g.sqrt(x)))
    np.testing.assert_array_equal(g.grad(x), [np.inf, 0.25])  # as torch.sqrt's


def test_transpose_takes_negative_axes_and_names_bad_ones() -> None:
    g = gl.Graph()
    x = g.parameter(np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(g.value(g.transpose(x, (-1, -2))), np.arange(6.0).reshape(2, 3).T)
    with pytest.raises(gl.ShapeError) as info:
        g.transpose(x, (2, 1))  # 2 is no axis of a matrix, though 2 % 2 is
    assert (
        str(info.value)
        == "transpose: axes (2, 1) is not a permutation of the 2 axes of shape (2, 3)"
    )
    with pytest.raises(TypeError) as type_info:
        g.transpose(x, "a")  # type: ignore[arg-type]
    assert str(type_info.value) == "transpose: axes must be an int or a tuple of ints, got 'a'"


def test_getitem_with_a_list_adds_the_gradients_of_repeated_indices() -> None:
    g = gl.Graph()
    x = g.parameter([1.0, 2.0, 3.0])
    picked = g.getitem(x, [0, 0, 2])  # a list is an integer array index, as in NumPy
    np.testing.assert_array_equal(g.value(picked), [1.0, 1.0, 3.0])
    g.backward(g.sum(picked))
    np.testing.assert_array_equal(g.grad(x), [2.0, 0.0, 1.0])
    with pytest.raises(TypeError) as info:
        g.getitem(x, 1.5)  # type: ignore[arg-type]
    assert str(info.value) == (
        "getitem: an index is made of ints, slices, None, ..., and integer or bool arrays, "
        "got float: 1.5"
    )


def test_logsumexp_and_softmax_shift_each_row_by_its_own_maximum() -> None:
    g = gl.Graph()
    x = g.constant([[1000.0, 1000.0], [0.0, 0.0], [-np.inf, -np.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # log(0) for the row of -inf: no warning
        lse = g.value(g.logsumexp(x, axis=-1))
    np.testing.assert_allclose(lse, [1000.0 + np.log(2), np.log(2), -np.inf], rtol=1e-15)
    soft = g.value(g.softmax(g.constant([[1000.0, 999.0]]), axis=-1))
    np.testing.assert_allclose(soft, [[1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))]], rtol=1e-15)
    empty = gl.Graph(np.float32).constant(np.ones((2, 0)))
    out = empty.graph.value(empty.graph.logsumexp(empty, axis=-1))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [-np.inf, -np.inf])


def test_norms_default_eps_and_give_nan_without_a_warning_where_eps_0_meets_a_flat_row() -> None:
    x = np.array([[1.0, 2.0, 4.0]])
    rms, _ = ops.rms_norm(x)  # eps 1e-6 by default
    np.testing.assert_allclose(rms, x / np.sqrt(np.mean(x**2) + 1e-6), rtol=1e-15)
    layer, _ = ops.layer_norm(x)  # eps 1e-5, as torch.nn.LayerNorm's
    np.testing.assert_allclose(layer, (x - x.mean()) / np.sqrt(x.var() + 1e-5), rtol=1e-13)
    g = gl.Graph()
    flat = g.parameter([[0.0, 0.0], [3.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [g.rms_norm(flat, eps=0.0), g.layer_norm(flat, eps=0.0)]
        g.backward(g.sum(g.add(*outs)))
    assert np.isnan(g.value(outs[0])[0]).all()  # 0 / 0 in the row of zeros
    np.testing.assert_allclose(g.value(outs[0])[1], [1.0, 1.0])
    assert np.isnan(g.value(outs[1])).all()  # every row is flat: variance 0
    smallest, _ = ops.min(np.array([[3.0, 1.0], [2.0, 5.0]]))  # over every axis by default
    assert smallest.shape == ()
    assert float(smallest) == 1.0
    spread, _ = ops.var(np.array([[3.0, 1.0], [2.0, 6.0]]))  # over every axis, ddof 0
    assert spread.shape == ()
    assert float(spread) == 3.5


def test_dropout_names_a_bad_probability_and_a_bad_rng() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones(3))
    with pytest.raises(ValueError, match=r"^dropout: p must be") as info:
        g.dropout(x, 1.5)
    assert str(info.value) == "dropout: p must be in [0, 1), got 1.5"
    with pytest.raises(TypeError) as type_info:
        g.dropout(x, 0.5, rng="a")  # type: ignore[arg-type]
    assert str(type_info.value) == (
        "dropout: rng must be a np.random.Generator, an int seed or None, got str"
    )


def test_stack_and_concat_by_default_join_on_axis_0_and_name_what_is_wrong() -> None:
    stacked, _ = ops.stack(np.ones(2), np.zeros(2))
    np.testing.assert_array_equal(stacked, [[1.0, 1.0], [0.0, 0.0]])
    joined, _ = ops.concat(np.ones((1, 2)), np.zeros((1, 2)))
    np.testing.assert_array_equal(joined, [[1.0, 1.0], [0.0, 0.0]])
    g = gl.Graph()
    x = g.parameter(np.ones(3))
    with pytest.raises(ValueError, match=r"^stack") as info:
        g.stack([])
    assert str(info.value) == "stack: needs at least one node to stack"
    with pytest.raises(gl.ShapeError) as shape_info:
        g.stack([x, x], axis=2)  # the stacked result (2, 3) has axes -2 .. 1
    assert str(shape_info.value) == "stack: axis 2 is out of range for shape (2, 3)"
    np.testing.assert_array_equal(g.value(g.stack([x, x], axis=1)), np.ones((3, 2)))
    assert_refusals(
        [
            (ValueError, "concat: needs at least one node to join", lambda: g.concat([])),
            (
                gl.ShapeError,
                "concat: cannot join 0-d values; reshape them to (1,) first",
                lambda: g.concat([g.constant(1.0)]),
            ),
            (
                gl.ShapeError,
                "concat: axis 1 is out of range for shape (3,)",
                lambda: g.concat([x, x], axis=1),
            ),
        ]
    )


def test_mse_loss_names_unequal_shapes_and_is_nan_over_nothing_in_the_graph_dtype() -> None:
    g = gl.Graph(np.float32)
    pred = g.parameter(np.ones(3))
    with pytest.raises(gl.ShapeError) as info:
        g.mse_loss(pred, g.constant(np.ones(2)))
    assert str(info.value) == (
        "mse_loss: pred has shape (3,) but target has shape (2,); they must be equal"
    )
    empty, target = g.parameter(np.ones((0, 2))), g.constant(np.ones((0, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 / 0 over no elements: NaN, without a warning
        loss = g.mse_loss(empty, target)
        g.backward(loss)
    assert g.value(loss).dtype == np.float32
    assert np.isnan(g.value(loss))
    assert g.grad(empty).shape == (0, 2)
    assert g.grad(target) is None  # a constant gets no gradient, even an empty one


def test_logsumexp_names_a_bad_axis_and_keepdims() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones((2, 3)))
    with pytest.raises(gl.ShapeError) as info:
        g.logsumexp(x, axis=5)
    assert str(info.value) == "logsumexp: axis 5 is out of range for shape (2, 3)"
    with pytest.raises(TypeError) as type_info:
        g.logsumexp(x, keepdims="no")  # type: ignore[arg-type]
    assert str(type_info.value) == "logsumexp: keepdims must be a bool, got str"
    kept, _ = ops.logsumexp(np.zeros((2, 3)), keepdims=True)
    np.testing.assert_allclose(kept, np.full((2, 1), np.log(3)), rtol=1e-15)


def test_attention_and_cross_entropy_name_each_bad_argument() -> None:
    g = gl.Graph()
    q = g.parameter(np.ones((2, 3, 4)))
    other_batch = g.parameter(np.ones((3, 3, 4)))
    one = g.parameter(np.ones(4))
    logits = g.parameter(np.ones((7, 3)))
    where = "scaled_dot_product_attention"
    cases: list[Refusal] = [
        (
            gl.ShapeError,
            f"{where}: q, k and v must be [..., T, d], got q (4,), k (4,), v (4,)",
            lambda: g.scaled_dot_product_attention(one, one, one),
        ),
        (
            gl.ShapeError,
            f"{where}: the batch axes do not broadcast together: q (2, 3, 4), k (3, 3, 4), "
            "v (2, 3, 4)",
            lambda: g.scaled_dot_product_attention(q, other_batch, q),
        ),
        (
            TypeError,
            f"{where}: causal must be a bool, got int",
            lambda: g.scaled_dot_product_attention(q, q, q, causal=1),
        ),
        (
            TypeError,
            f"{where}: scale must be a real scalar (int or float), got str: 'a'",
            lambda: g.scaled_dot_product_attention(q, q, q, scale="a"),
        ),
        (
            ValueError,
            f"{where}: dropout must be in [0, 1), got 2.0",
            lambda: g.scaled_dot_product_attention(q, q, q, dropout=2.0),
        ),
        (
            TypeError,
            "cross_entropy: ignore_index must be an int, got 1.5",
            lambda: g.cross_entropy(logits, np.zeros(7, int), ignore_index=1.5),
        ),
        (
            TypeError,
            "cross_entropy: ignore_index must be an int, got True",
            lambda: g.cross_entropy(logits, np.zeros(7, int), ignore_index=True),
        ),
        (
            ValueError,
            "cross_entropy: labels must lie in [0, 3) for 3 classes (or equal ignore_index -100), "
            "got [3, 4, 5, 6, 7] ...",  # the first five of six
            lambda: g.cross_entropy(logits, np.array([3, 4, 5, 6, 7, 8, 0])),
        ),
        (
            ValueError,
            "cross_entropy: labels must lie in [0, 3) for 3 classes (or equal ignore_index -100), "
            "got [3, 4, 5, 6, 7]",  # all five
            lambda: g.cross_entropy(logits, np.array([3, 4, 5, 6, 7, 0, 0])),
        ),
    ]
    assert_refusals(cases)
    assert g.tape == ()


def test_norms_over_no_features_give_empty_results_without_a_warning() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones((2, 0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # means over no elements: 0 / 0, silenced
        for y in (g.layer_norm(x), g.rms_norm(x)):
            g.backward(y, grad=np.ones((2, 0)))
            assert g.value(y).shape == (2, 0)
    assert g.grad(x).shape == (2, 0)


def test_dropout_called_directly_names_its_probability() -> None:
    with pytest.raises(ValueError, match=r"^dropout: ") as info:
        ops.dropout(np.ones(3), p=1.5)
    assert str(info.value) == "dropout: p must be in [0, 1), got 1.5"


def test_minimum_and_maximum_split_a_tie_in_half_as_torch() -> None:
    g = gl.Graph()
    a, b = g.parameter([1.0, 2.0, 5.0]), g.parameter([1.0, 3.0, 4.0])
    g.backward(g.sum(g.minimum(a, b)))
    np.testing.assert_array_equal(g.grad(a), [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(g.grad(b), [0.5, 0.0, 1.0])
    g.zero_grad()
    g.backward(g.sum(g.maximum(a, b)))
    np.testing.assert_array_equal(g.grad(a), [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(g.grad(b), [0.5, 1.0, 0.0])


def test_attention_dropout_drops_weights_with_the_mask_its_generator_draws() -> None:
    from graphlora.ops.regularization import dropout_mask

    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 3, 4)) for _ in range(3))
    g = gl.Graph()
    nodes = [g.parameter(a) for a in (q, k, v)]
    out = g.scaled_dot_product_attention(*nodes, dropout=0.5, rng=7)
    scores = q @ k.transpose(0, 2, 1) / 2.0  # d = 4: scale 1 / sqrt(4)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mask = dropout_mask(weights.shape, weights.dtype, 0.5, np.random.default_rng(7))
    np.testing.assert_allclose(g.value(out), (weights * mask) @ v, rtol=1e-12)
    assert (mask == 0).any()
    assert gradcheck(  # an int seed draws the same mask on every call
        lambda gr, *xs: gr.sum(gr.scaled_dot_product_attention(*xs, dropout=0.5, rng=7)), q, k, v
    )


def test_qkv_attention_names_each_bad_argument() -> None:
    g = gl.Graph()
    qkv = g.parameter(np.ones((2, 5, 12)))  # C = 4
    where = "qkv_attention"
    assert_refusals(
        [
            (
                ValueError,
                f"{where}: n_head must be >= 1, got 0",
                lambda: g.qkv_attention(qkv, n_head=0),
            ),
            (
                gl.ShapeError,
                f"{where}: qkv must be [..., T, 3C] with C a multiple of n_head 3, got (2, 5, 12)",
                lambda: g.qkv_attention(qkv, n_head=3),
            ),
            (
                gl.ShapeError,
                f"{where}: qkv must be [..., T, 3C] with C a multiple of n_head 1, got (12,)",
                lambda: g.qkv_attention(g.parameter(np.ones(12)), n_head=1),
            ),
            (
                gl.ShapeError,
                f"{where}: mask of shape (5, 4) does not broadcast to [..., Tq, Tk] = (2, 2, 5, 5)",
                lambda: g.qkv_attention(qkv, np.ones((5, 4), dtype=bool), n_head=2),
            ),
            (
                ValueError,
                f"{where}: dropout must be in [0, 1), got 2.0",
                lambda: g.qkv_attention(qkv, n_head=2, dropout=2.0),
            ),
        ]
    )


@given(
    lead=gst.shapes(max_dims=2, min_side=1, max_side=2),
    t=st.integers(0, 4),
    n_head=st.integers(1, 3),
    d=st.integers(0, 3),
    causal=st.booleans(),
    dropout=st.sampled_from([0.0, 0.5]),
)
def test_qkv_attention_is_split_heads_attention_and_merge_to_the_last_bit(
    lead: tuple[int, ...], t: int, n_head: int, d: int, causal: bool, dropout: float
) -> None:
    # the same graph written with split, reshape and transpose around scaled_dot_product_attention
    # (as GPT's attention was), with the same dropout draws: the same values and gradients
    qkv = np.random.default_rng(0).normal(size=(*lead, t, 3 * n_head * d))
    front = tuple(range(len(lead)))
    order = (*front, len(lead) + 1, len(lead), len(lead) + 2)
    found = []
    for packed in (True, False):
        g = gl.Graph()
        x = g.parameter(qkv)
        if packed:
            out = g.qkv_attention(x, n_head=n_head, causal=causal, dropout=dropout, rng=3)
        else:
            q, k, v = (
                g.transpose(g.reshape(y, (*lead, t, n_head, d)), order)
                for y in g.split(x, 3, axis=-1)
            )
            y = g.scaled_dot_product_attention(q, k, v, causal=causal, dropout=dropout, rng=3)
            out = g.reshape(g.transpose(y, order), (*lead, t, n_head * d))
        weights = np.cos(np.arange(math.prod(out.shape))).reshape(out.shape)  # each its own
        g.backward(g.sum(g.mul(out, g.constant(weights))))
        found.append((g.value(out), g.grad(x)))
    (value, grad), (value_by_ops, grad_by_ops) = found
    np.testing.assert_array_equal(value, value_by_ops)
    np.testing.assert_array_equal(grad, grad_by_ops)


def test_qkv_attention_called_as_an_op_is_not_causal_unless_asked() -> None:
    qkv = np.random.default_rng(0).normal(size=(3, 6))  # T = 3, C = 2
    found, _ = ops.qkv_attention(qkv, n_head=1)
    np.testing.assert_array_equal(found, ops.qkv_attention(qkv, n_head=1, causal=False)[0])
    assert not np.allclose(found, ops.qkv_attention(qkv, n_head=1, causal=True)[0])


@given(
    shape=gst.shapes(min_dims=1, max_dims=3, min_side=0, max_side=4),
    axis=st.integers(-1, 0),
)
def test_log_softmax_parts_are_scipys_log_softmax_its_exps_and_their_sum(
    shape: tuple[int, ...], axis: int
) -> None:
    from graphlora.ops.activations import log_softmax_parts

    x = np.random.default_rng(0).normal(size=shape) * 10
    out, exps, total = log_softmax_parts(x, axis)
    assert out.shape == exps.shape == x.shape
    assert total.shape == np.sum(x, axis=axis, keepdims=True).shape
    if x.shape[axis]:  # scipy refuses an empty axis
        np.testing.assert_array_equal(out, scipy.special.log_softmax(x, axis=axis))  # to the bit
        np.testing.assert_allclose(exps, np.exp(x - x.max(axis=axis, keepdims=True)), rtol=1e-15)
    np.testing.assert_allclose(total, exps.sum(axis=axis, keepdims=True), rtol=1e-15)


def test_attention_shifts_each_row_by_its_own_largest_score() -> None:
    g = gl.Graph()
    q = g.constant([[30.0, 0.0], [0.0, 30.0]])  # scores of about 636: exp would overflow
    v = g.constant([[1.0, 0.0], [0.0, 1.0]])
    out = g.value(g.scaled_dot_product_attention(q, q, v))
    np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]], atol=1e-12)


def test_var_names_its_bad_arguments_and_is_nan_without_a_warning_past_ddof() -> None:
    g = gl.Graph()
    x = g.parameter(np.ones((2, 3)))
    assert_refusals(
        [
            (ValueError, "var: ddof must be an int >= 0, got -1", lambda: g.var(x, ddof=-1)),
            (ValueError, "var: ddof must be an int >= 0, got 1.5", lambda: g.var(x, ddof=1.5)),
            (ValueError, "var: ddof must be an int >= 0, got True", lambda: g.var(x, ddof=True)),
            (
                gl.ShapeError,
                "var: axis 5 is out of range for shape (2, 3)",
                lambda: g.var(x, axis=5),
            ),
            (TypeError, "var: keepdims must be a bool, got str", lambda: g.var(x, keepdims="a")),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n - ddof <= 0 and no elements: NaN, as NumPy's value
        past = g.var(x, axis=-1, ddof=3)
        empty = g.var(g.parameter(np.ones((2, 0))), axis=-1)
        g.backward(g.sum(past))
    assert np.isnan(g.value(past)).all()
    assert np.isnan(g.value(empty)).all()
    assert g.value(g.var(x, axis=0, keepdims=True)).shape == (1, 3)


def test_cross_entropy_defaults_bounds_and_all_ignored_rows() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 2])
    loss, _ = ops.cross_entropy(logits, labels)  # no smoothing, -100 ignored
    expected = -np.mean(scipy.special.log_softmax(logits, axis=-1)[[0, 1], labels])
    np.testing.assert_allclose(loss, expected, rtol=1e-15)
    g = gl.Graph(np.float32)
    x = g.parameter(logits)
    smoothed = g.cross_entropy(x, labels, label_smoothing=1.0)  # allowed, as in PyTorch
    np.testing.assert_allclose(
        g.value(smoothed), -np.mean(scipy.special.log_softmax(logits, axis=-1)), rtol=1e-6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no row kept: 0 / 0, NaN, as PyTorch, no warning
        none_kept = g.cross_entropy(x, np.array([-100, -100]))
        g.backward(none_kept)
    assert g.value(none_kept).dtype == np.float32
    assert np.isnan(g.value(none_kept))
    np.testing.assert_array_equal(g.grad(x), np.zeros((2, 3)))
    with pytest.raises(gl.ShapeError) as info:
        g.cross_entropy(g.parameter(np.ones((2, 3, 4))), np.zeros((2, 2), int))
    assert str(info.value) == (
        "cross_entropy: labels must have shape (2, 3) to match logits (2, 3, 4), got (2, 2)"
    )


def test_more_refusals_found_by_mutation_testing_name_their_values() -> None:
    g = gl.Graph()

    def ones(*shape: int) -> gl.NodeId:
        return g.parameter(np.ones(shape))

    attention = "scaled_dot_product_attention"
    cases: list[Refusal] = [
        (
            gl.ShapeError,
            "where: shapes cond (2, 1), a (3,) and b (2, 4) do not broadcast together",
            lambda: g.where(np.ones((2, 1), bool), ones(3), ones(2, 4)),
        ),
        (
            gl.ShapeError,
            "max: cannot reduce over an axis of size 0 (axis [0] of shape (0, 2)); there is no "
            "max of nothing",
            lambda: g.max(ones(0, 2)),
        ),
        (
            gl.ShapeError,
            "min: axis 5 is out of range for shape (2, 3)",
            lambda: g.min(ones(2, 3), axis=5),
        ),
        (
            gl.ShapeError,
            f"{attention}: q, k and v must be [..., T, d], got q (2, 3, 4), k (4,), v (2, 3, 4)",
            lambda: g.scaled_dot_product_attention(ones(2, 3, 4), ones(4), ones(2, 3, 4)),
        ),
        (
            gl.ShapeError,
            f"{attention}: the batch axes do not broadcast together: q (2, 3, 4), k (3, 3, 4), "
            "v (3, 3, 4)",  # k and v agree; q does not
            lambda: g.scaled_dot_product_attention(ones(2, 3, 4), ones(3, 3, 4), ones(3, 3, 4)),
        ),
        (
            gl.ShapeError,
            f"{attention}: the batch axes do not broadcast together: q (2, 3, 4), k (2, 3, 4), "
            "v (3, 3, 4)",  # q and k agree; v does not
            lambda: g.scaled_dot_product_attention(ones(2, 3, 4), ones(2, 3, 4), ones(3, 3, 4)),
        ),
        (
            gl.ShapeError,
            f"{attention}: mask of shape (4, 4) does not broadcast to [..., Tq, Tk] = (2, 3, 5)",
            lambda: g.scaled_dot_product_attention(
                ones(2, 3, 4), ones(2, 5, 4), ones(2, 5, 4), np.ones((4, 4), bool)
            ),
        ),
        (
            TypeError,
            f"{attention}: rng must be a np.random.Generator, an int seed or None, got str",
            lambda: g.scaled_dot_product_attention(
                ones(2, 3, 4), ones(2, 3, 4), ones(2, 3, 4), dropout=0.5, rng="x"
            ),
        ),
        (
            gl.ShapeError,
            "layer_norm: x must have at least one axis (normalised: the last), got ()",
            lambda: g.layer_norm(g.parameter(1.0)),
        ),
        (
            gl.ShapeError,
            "layer_norm: weight has shape (3,); x (2, 3, 4) needs (4,)",
            lambda: g.layer_norm(ones(2, 3, 4), ones(3)),
        ),
        (
            gl.ShapeError,
            "rms_norm: weight has shape (3,); x (2, 3, 4) needs (4,)",
            lambda: g.rms_norm(ones(2, 3, 4), ones(3)),
        ),
        (
            gl.ShapeError,
            "linear: x () needs a weight [in, out] with in = x's last axis, got (3, 2)",
            lambda: g.linear(g.parameter(1.0), ones(3, 2)),
        ),
    ]
    assert_refusals(cases)
    assert g.tape == ()
    q = np.random.default_rng(0).normal(size=(3, 2))
    plain, _ = ops.scaled_dot_product_attention(q, q, q)  # not causal by default
    scores = q @ q.T / np.sqrt(2)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(plain, weights / weights.sum(-1, keepdims=True) @ q, rtol=1e-12)


def test_var_past_ddof_of_a_spread_row_is_inf_without_a_warning() -> None:
    g = gl.Graph()
    x = g.parameter([[1.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a positive sum over n - ddof = 0: inf, as NumPy's value
        spread = g.var(x, axis=-1, ddof=2)
    assert np.isinf(g.value(spread)).all()


def test_attention_with_dropout_keeps_a_float32_graph_float32() -> None:
    g = gl.Graph(np.float32)
    q = g.parameter(np.random.default_rng(0).normal(size=(2, 3, 4)))
    out = g.scaled_dot_product_attention(q, q, q, dropout=0.5, rng=0)
    assert g.value(out).dtype == np.float32


@given(
    shape=gst.shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    special=st.sampled_from([None, np.inf, -np.inf, np.nan]),
)
def test_row_and_column_sums_are_numpys_sums_with_infinities_and_nan(
    shape: tuple[int, ...], special: float | None
) -> None:
    from graphlora.ops.kernels import column_sum, row_sum

    x = np.random.default_rng(0).normal(size=shape)
    if special is not None and x.size:
        x.flat[x.size // 2] = special
    for found, expected in [
        (row_sum(x), np.sum(x, axis=-1, keepdims=True)),  # over the last axis, kept
        (column_sum(x), np.sum(x, axis=tuple(range(x.ndim - 1)))),  # over all the others
    ]:
        assert found.shape == expected.shape
        assert found.dtype == x.dtype
        np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)


@given(
    size=st.integers(0, 3 * (1 << 16) + 7),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
@example(size=(1 << 16) + 1, dtype=np.float32)  # a last block of one element
@example(size=1 << 16, dtype=np.float32)  # exactly one block
def test_blocks_cut_a_flat_array_into_cache_sized_pieces_in_order(
    size: int, dtype: type[np.floating[Any]]
) -> None:
    from graphlora.ops.kernels import BLOCK_BYTES, block_length, blocks

    x = np.empty(size, dtype=dtype)
    assert block_length(x) * x.itemsize == BLOCK_BYTES
    covered = np.concatenate([np.arange(size)[b] for b in blocks(x)] or [np.arange(0)])
    np.testing.assert_array_equal(covered, np.arange(size))  # each element once, in order
    assert all(b.stop - b.start == block_length(x) for b in blocks(x))
    assert len(blocks(x)) == -(-size // block_length(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_tanh_over_several_blocks_is_the_formula_everywhere(
    dtype: type[np.floating[Any]],
) -> None:
    # 3 * 43_691 elements: two whole blocks and one element in float32, four and one in float64;
    # the transpose is not contiguous
    x = np.random.default_rng(0).normal(0.0, 3.0, size=(43_691, 3)).astype(dtype).T
    g = np.random.default_rng(1).normal(size=x.shape).astype(dtype)
    c = np.sqrt(2.0 / np.pi)
    x64 = x.astype(np.float64)
    t = np.tanh(c * (x64 + 0.044715 * x64**3))
    by_hand = 0.5 * x64 * (1.0 + t)
    slope = 0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x64**2)
    out, vjp = ops.gelu(x, approximate="tanh")
    (grad,) = vjp(g, (True,))
    tol = 1e-5 if dtype is np.float32 else 1e-12
    assert out.shape == grad.shape == x.shape
    assert out.dtype == grad.dtype == dtype
    np.testing.assert_allclose(out, by_hand, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, g * slope, rtol=tol, atol=tol)


@given(
    x=st.floats(-9.0, -1 / 1024, width=32),  # out is normal: subnormals hold no relative precision
    dtype=st.sampled_from([np.float32, np.float64]),
)
@example(x=-5.0, dtype=np.float32)  # 1 + tanh(u) in float32 keeps one significant bit here
def test_gelu_tanh_keeps_its_relative_precision_where_tanh_is_near_minus_one(
    x: float, dtype: type[np.floating[Any]]
) -> None:
    # By scipy's logistic in float64, the identity (1 + tanh(u)) / 2 = expit(2u): no cancellation
    u = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
    by_hand = x * scipy.special.expit(2.0 * u)
    out, _ = ops.gelu(np.array([x], dtype=dtype), approximate="tanh")
    assert out.dtype == dtype
    np.testing.assert_allclose(out, [by_hand], rtol=1e-5 if dtype is np.float32 else 1e-12)


def test_gelu_tanh_far_below_zero_is_minus_zero_with_zero_gradient_and_no_warning() -> None:
    x = np.array([-1e3, -50.0, -3e12], dtype=np.float32)  # exp(-2u) overflows to inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, vjp = ops.gelu(x, approximate="tanh")
    (grad,) = vjp(np.ones_like(x), (True,))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])
    assert np.signbit(out).all()  # -0.0, as PyTorch's 0.5 x (1 + tanh(u))
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0])


def _attention_beside_pytorchs(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, causal: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(graphlora's, PyTorch's) attention output, then its sum's gradients with respect to q, k
    and v; graphlora's raising no warning on the way."""
    torch = pytest.importorskip("torch")
    g = gl.Graph()
    nodes = [g.parameter(a) for a in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = g.scaled_dot_product_attention(*nodes, mask, causal=causal)
        g.backward(g.sum(out))
    tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    t_mask = None if mask is None else torch.from_numpy(mask)
    expected = ops.scaled_dot_product_attention.torch(torch, *tensors, t_mask, causal=causal)
    expected.sum().backward()
    grads = [
        (g.grad(node), tensor.grad.numpy()) for node, tensor in zip(nodes, tensors, strict=True)
    ]
    return [(g.value(out), expected.detach().numpy()), *grads]


def _assert_attention_is_pytorchs(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None, causal: bool
) -> None:
    """graphlora's attention and its three gradients (of the output's sum) are PyTorch's, NaN for
    NaN and inf for inf, with no warning on graphlora's side."""
    for ours, theirs in _attention_beside_pytorchs(q, k, v, mask, causal):
        # NaN and inf where PyTorch has them, and the finite values to rounding
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.crosscheck
@pytest.mark.parametrize("special", [np.nan, np.inf])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_rows_holding_nan_come_out_nan_as_in_pytorch(
    special: float, causal: bool
) -> None:
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = np.array([[special, 0.0], [0.0, 1.0], [2.0, 0.5]])  # key 0's scores: NaN or +-inf
    v = np.arange(6.0).reshape(3, 2)
    out, _ = ops.scaled_dot_product_attention(q, k, v, causal=causal)
    assert np.isnan(out).all()  # every query keeps key 0
    _assert_attention_is_pytorchs(q, k, v, None, causal)


@pytest.mark.crosscheck
@pytest.mark.parametrize("causal", [False, True])
def test_attention_scores_and_gradients_that_overflow_are_pytorchs_silently(causal: bool) -> None:
    # Query 0's score with key 0 overflows to +inf: PyTorch's softmax gives that query NaN
    # weights throughout (inf - inf), so its output and every gradient through it are NaN.
    q = np.array([[1e200, 0.0], [0.0, 1.0]])
    _assert_attention_is_pytorchs(q, q.copy(), np.array([[1e308, 1.0], [1e308, 2.0]]), None, causal)
    # In backward, v's first row times the output gradient (1e308 + 1e308) overflows too. The
    # VJP takes rowsum(P * g vᵀ) as rowsum(g * out), so an element may be inf where PyTorch's is
    # NaN: non-finite where PyTorch's is, and the rest equal, without a warning.
    v = np.array([[1e308, 1e308], [1e308, 2.0]])
    _, *grads = _attention_beside_pytorchs(q, q.copy(), v, None, causal)
    for ours, theirs in grads:
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
        finite = np.isfinite(theirs)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-12, atol=0)
    assert not np.isfinite(grads[0][0]).any()  # the overflow reaches all of q's gradient


def test_the_causal_mask_is_minus_inf_below_the_diagonal_read_only_and_kept() -> None:
    from graphlora.ops.attention import _cached_causal_bias

    bias = _cached_causal_bias(3, 2, np.dtype(np.float32))  # [Tk, Tq]: key j, query i
    expected = np.array([[0.0, 0.0], [-np.inf, 0.0], [-np.inf, -np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(bias, expected)  # j > i dropped, as torch.tril's complement
    assert bias.dtype == np.float32
    assert not bias.flags.writeable  # shared by every call of these sizes
    assert _cached_causal_bias(3, 2, np.dtype(np.float32)) is bias
    assert _cached_causal_bias(3, 2, np.dtype(np.float64)).dtype == np.float64


def _dropped_score_case(special: float) -> tuple[np.ndarray, ...]:
    """q, k, v whose scores with key 1 are ``special`` for both queries (d = 2: ``special * 1 +
    1 * 0``), a mask that drops key 1 for both, and a causal one that drops it for query 0."""
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    k = np.array([[2.0, 0.0], [special, 1.0]])
    v = np.array([[1.0, 2.0], [3.0, 4.0]])
    return q, k, v, np.array([True, False])


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf, 1e300])
def test_attention_adds_minus_inf_to_a_dropped_score_as_pytorch_does(special: float) -> None:
    # By hand: -inf + a finite score or -inf is -inf, and the query keeps key 0 alone, so its
    # output is v[0]; -inf + NaN or +inf is NaN, and the query's output is NaN. No warning.
    q, k, v, mask = _dropped_score_case(special)
    clean = np.isfinite(special) or special < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked, _ = ops.scaled_dot_product_attention(q, k, v, mask)
        causal, _ = ops.scaled_dot_product_attention(q[:1], k, v, causal=True)
    if clean:
        np.testing.assert_array_equal(masked, [[1.0, 2.0], [1.0, 2.0]])
        np.testing.assert_array_equal(causal, [[1.0, 2.0]])
    else:
        assert np.isnan(masked).all() and np.isnan(causal).all()


@pytest.mark.crosscheck
@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf, 1e300])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_a_dropped_special_score_matches_pytorch_value_and_gradients(
    special: float, causal: bool
) -> None:
    q, k, v, mask = _dropped_score_case(special)
    if causal:  # query 0 drops key 1 by causality alone
        _assert_attention_is_pytorchs(q[:1], k, v, None, causal=True)
    else:
        _assert_attention_is_pytorchs(q, k, v, mask, causal=False)


@pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
def test_a_reduction_over_every_axis_is_0d_and_keepdims_keeps_every_axis(name: str) -> None:
    g = gl.Graph()
    x = g.parameter(np.arange(6.0).reshape(2, 3))
    method = getattr(g, name)
    assert getattr(ops, name)(np.ones((2, 3)))[0].shape == ()  # the op's own defaults
    assert g.value(method(x)).shape == ()
    assert g.value(method(x, keepdims=True)).shape == (1, 1)
    assert g.value(method(x, axis=None, keepdims=True)).shape == (1, 1)
    assert g.value(method(x, axis=(0, 1))).shape == ()


@pytest.mark.crosscheck
def test_var_of_one_element_with_ddof_1_has_nan_value_and_gradient_as_pytorch() -> None:
    torch = pytest.importorskip("torch")
    g = gl.Graph()
    x = g.parameter([[2.0], [3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g.backward(g.sum(g.var(x, axis=-1, ddof=1)))
    t = torch.tensor([[2.0], [3.0]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch warns of the same degenerate case
        t.var(dim=-1, correction=1).sum().backward()
    assert t.grad is not None and torch.isnan(t.grad).all()
    assert np.isnan(g.grad(x)).all()


def test_label_smoothing_just_above_1_is_read_as_1() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = np.array([0, 2])
    at_one, _ = ops.cross_entropy(logits, labels, label_smoothing=1.0)
    above, _ = ops.cross_entropy(logits, labels, label_smoothing=1.0 + 1e-13)
    assert above == at_one


def test_mse_loss_over_no_elements_gives_only_the_gradients_asked_for() -> None:
    _, vjp = ops.mse_loss(np.zeros((2, 0)), np.zeros((2, 0)))
    for needs in [(True, False), (False, True), (True, True)]:
        grads = vjp(np.array(1.0), needs)
        for grad, wanted in zip(grads, needs, strict=True):
            assert (grad is not None) == wanted
            if grad is not None:
                assert grad.shape == (2, 0)


def test_attention_and_lora_linear_refuse_a_bad_rng_even_without_dropout() -> None:
    g = gl.Graph()
    q = g.parameter(np.ones((2, 3)))
    w, a, b = (
        g.constant(np.ones((3, 2))),
        g.parameter(np.ones((3, 1))),
        g.parameter(np.ones((1, 2))),
    )
    message = "rng must be a np.random.Generator, an int seed or None, got str"
    assert_refusals(
        [
            (
                TypeError,
                f"scaled_dot_product_attention: {message}",
                lambda: g.scaled_dot_product_attention(q, q, q, rng="seed"),
            ),
            (
                TypeError,
                f"lora_linear: {message}",
                lambda: g.apply(gl.lora.lora_linear, q, w, a, b, rng="seed"),
            ),
        ]
    )


def _scored(x, weight=None, labels=None, keep=None, *, power=1):  # type: ignore[no-untyped-def]
    """A user op with every kind of input."""
    return x, lambda g, needs: (g, None, None, None)


def test_op_reads_its_inputs_and_attributes_from_the_function() -> None:
    def check(*arrays: Any, **params: Any) -> None:
        return None

    def torch_form(t: Any, *tensors: Any) -> Any:
        return tensors[0]

    sample = ops.elementwise()
    made = ops.op(
        data={"labels": "int", "keep": "bool"},
        check=check,
        sample=sample,
        torch=torch_form,
        smooth=False,
    )(_scored)
    assert (made.name, made.__name__, repr(made)) == ("scored", "scored", "<op scored>")
    assert made.__doc__ == "A user op with every kind of input."
    assert made.__wrapped__ is _scored and made.forward is _scored
    assert (made.check, made.sample, made.torch, made.smooth) == (check, sample, torch_form, False)
    assert made.slots == (
        ops.Slot("x"),
        ops.Slot("weight", "float", True),
        ops.Slot("labels", "int", True),
        ops.Slot("keep", "bool", True),
    )
    assert (made.required, made.optional) == (1, (False, True, True, True))
    assert (made.data_slots, made.floats_only, made.variadic) == ((2, 3), False, False)
    plain = ops.op()(_scored)
    assert (plain.check, plain.sample, plain.torch, plain.smooth) == (None, None, None, True)
    assert (plain.data_slots, plain.floats_only) == ((), True)
    assert ops.op(name="renamed")(_scored).name == "renamed"
    direct = ops.OpDef(_scored)
    assert (direct.name, direct.smooth) == ("_scored", True)  # only op() drops the underscore


def test_a_variadic_op_has_no_slots_and_checks_no_arity() -> None:
    def joined(*xs, axis=0):  # type: ignore[no-untyped-def]
        return np.concatenate(xs, axis=axis), lambda g, needs: tuple(g for _ in xs)

    made = ops.op()(joined)
    assert (made.slots, made.variadic, made.required, made.floats_only) == ((), True, 0, False)
    out, _ = made(np.ones(2), np.zeros(1), np.ones(3))
    np.testing.assert_array_equal(out, [1, 1, 0, 1, 1, 1])


def test_op_refuses_unknown_kinds_and_data_names_that_are_not_inputs() -> None:
    assert_refusals(
        [
            (
                ValueError,
                "op: input 'labels' has unknown kind 'str'",
                lambda: ops.op(data={"labels": "str"})(_scored),
            ),
            (
                ValueError,
                "op: data names ['ids', 'other'] are not inputs of _scored",
                lambda: ops.op(data={"other": "int", "ids": "int"})(_scored),
            ),
        ]
    )


def test_an_op_call_checks_arity_and_data_kinds_then_runs_with_the_checked_params() -> None:
    seen: list[dict[str, Any]] = []

    def normalise(x: Any, weight: Any = None, labels: Any = None, keep: Any = None, **params: Any):  # type: ignore[no-untyped-def]
        return {"power": 2} if params.get("power") == "two" else None

    def forward(x, weight=None, labels=None, keep=None, *, power=1):  # type: ignore[no-untyped-def]
        seen.append({"power": power})
        return x**power, lambda g, needs: (g, None, None, None)

    made = ops.op(data={"labels": "int", "keep": "bool"}, check=normalise)(forward)
    x = np.array([3.0])
    np.testing.assert_array_equal(made(x, None, np.array([1]), np.array([True]))[0], [3.0])
    np.testing.assert_array_equal(made(x, power="two")[0], [9.0])
    np.testing.assert_array_equal(made(x, power=3)[0], [27.0])  # the check kept them as given
    assert seen == [{"power": 1}, {"power": 2}, {"power": 3}]
    assert_refusals(
        [
            (TypeError, "forward: takes the inputs (x, weight, labels, keep), got 0 of them", made),
            (
                TypeError,
                "forward: takes the inputs (x, weight, labels, keep), got 5 of them",
                lambda: made(x, x, x, x, x),
            ),
            (
                TypeError,
                "forward: labels must be integers, got dtype float64",
                lambda: made(x, None, np.array([1.0])),
            ),
            (
                TypeError,
                "forward: keep must be a bool array, got dtype int64",
                lambda: made(x, None, None, np.array([1])),
            ),
        ]
    )
    assert len(seen) == 3


def test_attention_takes_a_mask_of_fewer_than_two_axes_as_numpy_broadcasts_it() -> None:
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(2, 4)), rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
    keys = np.array([True, False, True])
    dense, _ = ops.scaled_dot_product_attention(q, k, v, np.broadcast_to(keys, (2, 3)).copy())
    by_keys, _ = ops.scaled_dot_product_attention(q, k, v, keys)
    np.testing.assert_array_equal(by_keys, dense)
    everything, _ = ops.scaled_dot_product_attention(q, k, v, np.array(True))
    np.testing.assert_array_equal(everything, ops.scaled_dot_product_attention(q, k, v)[0])
    nothing, _ = ops.scaled_dot_product_attention(q, k, v, np.array(False))
    np.testing.assert_array_equal(nothing, np.zeros((2, 5)))


def test_attention_dropout_mask_is_drawn_as_queries_by_keys() -> None:
    from graphlora.ops.regularization import dropout_mask

    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(2, 4)), rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    out, _ = ops.scaled_dot_product_attention(q, k, v, dropout=0.5, rng=11)
    weights = scipy.special.softmax(q @ k.T / 2.0, axis=-1)  # (Tq, Tk) = (2, 5)
    mask = dropout_mask((2, 5), np.float64, 0.5, np.random.default_rng(11))
    np.testing.assert_allclose(out, (weights * mask) @ v, rtol=1e-12)


def test_attention_without_dropout_draws_nothing_from_its_generator() -> None:
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    x = np.ones((2, 3))
    ops.scaled_dot_product_attention(x, x, x, dropout=0.0, rng=rng)
    assert rng.bit_generator.state == before


def test_dropout_mask_takes_a_generator_or_a_seed_and_keeps_the_dtype() -> None:
    from graphlora.ops.regularization import dropout_mask

    by_seed = dropout_mask((4, 5), np.float32, 0.5, 7)
    by_generator = dropout_mask((4, 5), np.float32, 0.5, np.random.default_rng(7))
    np.testing.assert_array_equal(by_seed, by_generator)
    assert by_seed.dtype == np.float32
    assert set(np.unique(by_seed)) == {0.0, 2.0}
    kept = np.random.default_rng(7).random((4, 5)) >= 0.5
    np.testing.assert_array_equal(by_seed, np.where(kept, 2.0, 0.0))


def test_gelu_called_as_an_op_without_approximate_is_the_exact_form() -> None:
    x = np.array([-1.5, 0.3, 2.0])
    out, _ = ops.gelu(x)
    np.testing.assert_allclose(out, x * scipy.special.ndtr(x), rtol=1e-15)


# --- rope: its refusals, and Llama 3's frequencies at the band edges ------------------------------

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def test_rope_names_every_bad_argument() -> None:
    g = gl.Graph()
    x = g.constant(np.ones((3, 4)))
    odd = g.constant(np.ones((3, 5)))
    scalar = g.constant(np.ones(()))
    short = {k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}
    assert_refusals(
        [
            (
                gl.ShapeError,
                "rope: x must be [..., d] with d even (pairs rotate), got (3, 5)",
                lambda: g.rope(odd, np.arange(3)),
            ),
            (
                gl.ShapeError,
                "rope: x must be [..., d] with d even (pairs rotate), got ()",
                lambda: g.rope(scalar, np.arange(1)),
            ),
            (
                gl.ShapeError,
                "rope: positions of shape (4,) do not line up with x's leading axes (3,) (positions "
                "[..., T]: the batch axes, then T)",
                lambda: g.rope(x, np.arange(4)),
            ),
            (
                gl.ShapeError,
                "rope: positions of shape (2, 3) do not line up with x's leading axes (3,) "
                "(positions [..., T]: the batch axes, then T)",
                lambda: g.rope(x, np.zeros((2, 3), np.int64)),
            ),
            (
                ValueError,
                "rope: theta must be > 0, got 0.0",
                lambda: g.rope(x, np.arange(3), theta=0.0),
            ),
            (
                ValueError,
                "rope: theta must be >= 0, got -1.0",
                lambda: g.rope(x, np.arange(3), theta=-1.0),
            ),
            (
                TypeError,
                "rope: scaling must be a mapping or None, got 'llama3'",
                lambda: g.rope(x, np.arange(3), scaling="llama3"),  # type: ignore[arg-type]
            ),
            (
                ValueError,
                "rope: rope_type 'yarn' is not implemented; graphlora implements "
                "('default', 'llama3')",
                lambda: g.rope(x, np.arange(3), scaling={"rope_type": "yarn"}),
            ),
            (
                ValueError,
                "rope: rope_type 'linear' is not implemented; graphlora implements "
                "('default', 'llama3')",
                lambda: g.rope(x, np.arange(3), scaling={"type": "linear", "factor": 2.0}),
            ),
            (
                ValueError,
                f"rope: llama3 rope scaling needs high_freq_factor, got {short}",
                lambda: g.rope(x, np.arange(3), scaling=short),
            ),
            (
                ValueError,
                "rope: llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 "
                f"and low_freq_factor < high_freq_factor, got {dict(LLAMA3, factor=0.0)}",
                lambda: g.rope(x, np.arange(3), scaling=dict(LLAMA3, factor=0.0)),
            ),
            (
                ValueError,
                "rope: llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 "
                f"and low_freq_factor < high_freq_factor, got {dict(LLAMA3, low_freq_factor=4.0)}",
                lambda: g.rope(x, np.arange(3), scaling=dict(LLAMA3, low_freq_factor=4.0)),
            ),
            (
                ValueError,
                "rope: llama3 rope scaling needs factor > 0, original_max_position_embeddings > 0 "
                "and low_freq_factor < high_freq_factor, got "
                f"{dict(LLAMA3, original_max_position_embeddings=0)}",
                lambda: g.rope(
                    x, np.arange(3), scaling=dict(LLAMA3, original_max_position_embeddings=0)
                ),
            ),
        ]
    )
    assert len(g.tape) == 0


def test_rope_default_scaling_is_no_scaling_and_frequencies_are_read_only() -> None:
    from graphlora.ops.positional import rope_frequencies

    g = gl.Graph()
    x = g.constant(np.random.default_rng(0).normal(size=(5, 8)))
    plain = g.value(g.rope(x, np.arange(5)))
    for scaling in ({"rope_type": "default"}, {}, None):
        np.testing.assert_array_equal(g.value(g.rope(x, np.arange(5), scaling=scaling)), plain)
    np.testing.assert_array_equal(g.value(g.rope(x, np.zeros(5, np.int64))), g.value(x))
    freqs = rope_frequencies(8, 10000.0)
    np.testing.assert_allclose(freqs, [1.0, 0.1, 0.01, 0.001], rtol=1e-15)
    assert not freqs.flags.writeable
    assert rope_frequencies(8, 10000.0) is freqs  # cached


def test_llama3_frequencies_at_the_band_edges_follow_meta_s_definition() -> None:
    """Wavelengths exactly at original / high_freq_factor and original / low_freq_factor, and one
    each side: kept, blended (smoothly: equal at the edges), slowed by the factor."""
    from graphlora.ops.positional import rope_frequencies

    original, low, high, factor = 64.0, 1.0, 4.0, 8.0
    scaling = (factor, low, high, original)
    # a head of width 4 has the frequencies 1 and theta ** -0.5: theta picks the second's
    for wavelength, expected in [
        (10.0, 2 * np.pi / 10.0),  # shorter than 64 / 4 = 16: kept
        (16.0, 2 * np.pi / 16.0),  # at the short edge: smooth = 1, kept
        (64.0, 2 * np.pi / 64.0 / factor),  # at the long edge: smooth = 0, slowed
        (100.0, 2 * np.pi / 100.0 / factor),  # longer: slowed
        (32.0, None),  # between: blended
    ]:
        theta = (2 * np.pi / wavelength) ** -2.0
        found = rope_frequencies(4, theta, scaling)[1:]
        f = 2 * np.pi / wavelength
        if expected is None:
            smooth = (original / wavelength - low) / (high - low)
            expected = (1 - smooth) * f / factor + smooth * f
        np.testing.assert_allclose(found, [expected], rtol=1e-12)


def test_rope_s_defaults_one_axis_and_the_old_type_key() -> None:
    from graphlora import ops

    x = np.random.default_rng(0).normal(size=(3, 4))
    default, _ = ops.rope(x, np.arange(3))
    explicit, _ = ops.rope(x, np.arange(3), theta=10000.0, scaling=None)
    np.testing.assert_array_equal(default, explicit)
    g = gl.Graph()
    one = g.value(g.rope(g.constant(x[1]), np.array(1)))  # x [d] at one position
    np.testing.assert_array_equal(one, default[1])
    old = dict(LLAMA3, type="llama3")
    del old["rope_type"]
    new = g.value(g.rope(g.constant(x), np.arange(3) * 9, scaling=LLAMA3))
    np.testing.assert_array_equal(
        g.value(g.rope(g.constant(x), np.arange(3) * 9, scaling=old)), new
    )
    assert np.abs(new - g.value(g.rope(g.constant(x), np.arange(3) * 9))).max() > 1e-3


def test_llama3_frequencies_with_a_low_factor_other_than_one() -> None:
    from graphlora.ops.positional import rope_frequencies

    original, low, high, factor = 64.0, 2.0, 8.0, 4.0  # band: wavelengths 8 .. 32
    for wavelength in (6.0, 8.0, 20.0, 32.0, 40.0):
        f = 2 * np.pi / wavelength
        found = rope_frequencies(4, f**-2.0, (factor, low, high, original))[1:]
        if wavelength < original / high:
            expected = f
        elif wavelength > original / low:
            expected = f / factor
        else:
            smooth = (original / wavelength - low) / (high - low)
            expected = (1 - smooth) * f / factor + smooth * f
        np.testing.assert_allclose(found, [expected], rtol=1e-12)


def test_rope_accepts_small_valid_settings_and_names_bad_field_values() -> None:
    g = gl.Graph()
    x = g.constant(np.ones((2, 3, 4)))
    small = dict(LLAMA3, factor=0.5, original_max_position_embeddings=1)
    assert g.value(g.rope(x, np.arange(3), theta=0.5, scaling=small)).shape == (2, 3, 4)
    assert_refusals(
        [
            (
                TypeError,
                "rope: factor must be a real number, got 'x'",
                lambda: g.rope(x, np.arange(3), scaling=dict(LLAMA3, factor="x")),
            ),
            (
                gl.ShapeError,
                "rope: positions of shape (4,) do not line up with x's leading axes (2, 3) "
                "(positions [..., T]: the batch axes, then T)",
                lambda: g.rope(x, np.arange(4)),
            ),
        ]
    )


def test_rope_lines_positions_up_with_the_batch_and_sequence_axes() -> None:
    g = gl.Graph()
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 6))  # [B, H, T, d]
    positions = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])  # [B, T]
    found = g.value(g.rope(g.constant(x), positions))
    explicit = g.value(g.rope(g.constant(x), positions[:, None, :]))
    np.testing.assert_array_equal(found, explicit)
    for b in range(2):
        np.testing.assert_array_equal(found[b], g.value(g.rope(g.constant(x[b]), positions[b])))
