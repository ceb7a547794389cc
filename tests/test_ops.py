"""Every op in ``ops.OPS``: forward against an independent NumPy reference, gradients against
complex-step derivatives of that reference (exact to ~1e-15, no truncation error), against
central differences through ``gradcheck``, and against ``torch.autograd`` where PyTorch is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

import graphlora as gl
from graphlora import ops
from graphlora.testing import gradcheck
from graphlora.testing import strategies as gst

Arrays = tuple[np.ndarray, ...]
Params = dict[str, Any]

# --- the catalogue as test cases ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """How to draw inputs for one op, call it on a graph, and compute it independently."""

    draw: Callable[[st.DrawFn], tuple[Arrays, Params]]
    call: Callable[..., gl.NodeId]  # call(g, *nodes, **params)
    reference: Callable[..., np.ndarray]  # reference(*arrays, **params), complex-safe
    smooth: bool = True  # differentiable in the complex-step sense (not relu, not dropout)


def _values(low: float = -3.0, high: float = 3.0) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def _away_from_zero(low: float) -> st.SearchStrategy[float]:
    """Floats with ``low <= |x| <= 3``: safe for division and away from relu's kink."""
    return st.tuples(_values(low, 3.0), st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


def _unary(elements: st.SearchStrategy[float] | None = None, **params: Any) -> Callable[..., Any]:
    def draw(d: st.DrawFn) -> tuple[Arrays, Params]:
        x = d(gst.arrays(gst.shapes(), elements=elements))
        return (x,), {k: d(v) for k, v in params.items()}

    return draw


def _binary(b_elements: st.SearchStrategy[float] | None = None) -> Callable[..., Any]:
    def draw(d: st.DrawFn) -> tuple[Arrays, Params]:
        shape_a, shape_b = d(gst.broadcastable_shapes())
        return (d(gst.arrays(shape_a)), d(gst.arrays(shape_b, elements=b_elements))), {}

    return draw


def _draw_matmul(d: st.DrawFn) -> tuple[Arrays, Params]:
    shape_a, shape_b = d(gst.matmul_shapes())
    return (d(gst.arrays(shape_a)), d(gst.arrays(shape_b))), {}


def _draw_reduction(d: st.DrawFn) -> tuple[Arrays, Params]:
    x = d(gst.arrays(gst.shapes()))
    axes = st.lists(st.integers(0, max(x.ndim - 1, 0)), unique=True, max_size=x.ndim)
    axis = d(
        st.none() | axes.map(tuple) | st.integers(-x.ndim, x.ndim - 1) if x.ndim else st.none()
    )
    return (x,), {"axis": axis, "keepdims": d(st.booleans())}


def _draw_reshape(d: st.DrawFn) -> tuple[Arrays, Params]:
    x = d(gst.arrays(gst.shapes()))
    target = d(st.sampled_from([(-1,), (1, x.size), tuple(reversed(x.shape)), (x.size, -1)]))
    return (x,), {"shape": target}


def _draw_transpose(d: st.DrawFn) -> tuple[Arrays, Params]:
    x = d(gst.arrays(gst.shapes()))
    axes = d(st.none() | st.permutations(range(x.ndim)).map(tuple))
    return (x,), {"axes": axes}


def _draw_softmax(d: st.DrawFn) -> tuple[Arrays, Params]:
    x = d(gst.arrays(gst.shapes(min_dims=1)))
    return (x,), {"axis": d(st.integers(-x.ndim, x.ndim - 1))}


def _draw_mse(d: st.DrawFn) -> tuple[Arrays, Params]:
    shape = d(gst.shapes())
    return (d(gst.arrays(shape)), d(gst.arrays(shape))), {}


def _draw_cross_entropy(d: st.DrawFn) -> tuple[Arrays, Params]:
    n, c = d(st.integers(1, 5)), d(st.integers(1, 5))
    labels = np.array(d(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return (d(gst.arrays((n, c))),), {"labels": labels}


def _draw_dropout(d: st.DrawFn) -> tuple[Arrays, Params]:
    x = d(gst.arrays(gst.shapes()))
    return (x,), {"p": d(st.sampled_from([0.25, 0.5, 0.9])), "rng": d(st.integers(0, 2**16))}


def _softmax_ref(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - np.max(x.real, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _log_softmax_ref(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x.real, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _gelu_ref(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def _dropout_ref(x: np.ndarray, p: float, rng: int) -> np.ndarray:
    keep = np.random.default_rng(rng).random(x.shape) >= p
    return np.where(keep, x / (1 - p), 0)


def _cross_entropy_ref(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logp = _log_softmax_ref(logits, axis=1)
    return -np.mean(logp[np.arange(len(labels)), labels])


CASES: dict[str, Case] = {
    "add": Case(_binary(), lambda g, a, b: g.add(a, b), lambda a, b: a + b),
    "sub": Case(_binary(), lambda g, a, b: g.sub(a, b), lambda a, b: a - b),
    "mul": Case(_binary(), lambda g, a, b: g.mul(a, b), lambda a, b: a * b),
    "div": Case(_binary(_away_from_zero(0.5)), lambda g, a, b: g.div(a, b), lambda a, b: a / b),
    "scale": Case(_unary(c=_values()), lambda g, x, c: g.scale(x, c), lambda x, c: c * x),
    "neg": Case(_unary(), lambda g, x: g.neg(x), lambda x: -x),
    "pow": Case(
        _unary(_values(0.5, 2.0), p=st.sampled_from([-1.5, -1, 0, 0.5, 1, 2, 3])),
        lambda g, x, p: g.pow(x, p),
        lambda x, p: x**p,
    ),
    "matmul": Case(_draw_matmul, lambda g, a, b: g.matmul(a, b), lambda a, b: a @ b),
    "sum": Case(_draw_reduction, lambda g, x, **k: g.sum(x, **k), lambda x, **k: np.sum(x, **k)),
    "mean": Case(_draw_reduction, lambda g, x, **k: g.mean(x, **k), lambda x, **k: np.mean(x, **k)),
    "reshape": Case(
        _draw_reshape, lambda g, x, shape: g.reshape(x, shape), lambda x, shape: x.reshape(shape)
    ),
    "transpose": Case(
        _draw_transpose,
        lambda g, x, axes: g.transpose(x, axes),
        lambda x, axes: np.transpose(x, axes),
    ),
    "relu": Case(
        _unary(_away_from_zero(0.05)),
        lambda g, x: g.relu(x),
        lambda x: np.where(x.real > 0, x, 0),
        smooth=False,
    ),
    "tanh": Case(_unary(), lambda g, x: g.tanh(x), np.tanh),
    "sigmoid": Case(_unary(), lambda g, x: g.sigmoid(x), lambda x: 1 / (1 + np.exp(-x))),
    "exp": Case(_unary(), lambda g, x: g.exp(x), np.exp),
    "log": Case(_unary(_values(0.1, 3.0)), lambda g, x: g.log(x), np.log),
    "gelu": Case(
        _unary(approximate=st.sampled_from(["none", "tanh"])),
        lambda g, x, approximate: g.gelu(x, approximate),
        _gelu_ref,
    ),
    "softmax": Case(
        _draw_softmax, lambda g, x, axis: g.softmax(x, axis), lambda x, axis: _softmax_ref(x, axis)
    ),
    "log_softmax": Case(
        _draw_softmax,
        lambda g, x, axis: g.log_softmax(x, axis),
        lambda x, axis: _log_softmax_ref(x, axis),
    ),
    "mse_loss": Case(
        _draw_mse, lambda g, p, t: g.mse_loss(p, t), lambda p, t: np.mean((p - t) ** 2)
    ),
    "cross_entropy": Case(
        _draw_cross_entropy,
        lambda g, x, labels: g.cross_entropy(x, labels),
        _cross_entropy_ref,
    ),
    "dropout": Case(
        _draw_dropout,
        lambda g, x, p, rng: g.dropout(x, p, rng=rng),
        _dropout_ref,
        smooth=False,
    ),
}


def test_every_op_has_a_case() -> None:
    assert sorted(CASES) == sorted(ops.OPS)


def test_every_op_is_a_graph_method() -> None:
    for name in ops.OPS:
        assert callable(getattr(gl.Graph, name)), name


def _draw_case(data: st.DataObject, name: str) -> tuple[Case, Arrays, Params]:
    case = CASES[name]
    arrays, params = data.draw(st.composite(lambda d: case.draw(d))())
    return case, arrays, params


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
    case, arrays, params = _draw_case(data, name)
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
    case, arrays, params = _draw_case(data, name)
    out_shape = np.shape(case.reference(*arrays, **params))
    weights = data.draw(gst.arrays(out_shape), label="weights")

    def fn(g: gl.Graph, *nodes: gl.NodeId) -> gl.NodeId:
        # Weighting the output makes every output element count differently in the loss.
        return g.sum(g.mul(case.call(g, *nodes, **params), g.constant(weights)))

    assert gradcheck(fn, *arrays, mode=mode) is True


@pytest.mark.parametrize("name", sorted(CASES))
@given(data=st.data())
def test_float32_graph_keeps_float32(name: str, data: st.DataObject) -> None:
    case, arrays, params = _draw_case(data, name)
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
    case, arrays, params = _draw_case(data, name)
    g = gl.Graph()
    nodes = [g.constant(a) for a in arrays]
    out = case.call(g, *nodes, **params)
    assert not out.requires_grad
    assert out.inputs == ()  # no closure kept: nothing to run backward through
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
    if name == "cross_entropy":
        return F.cross_entropy(a, torch.from_numpy(params["labels"]).long())
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"dropout"}))
@given(data=st.data())
def test_matches_torch_autograd(name: str, data: st.DataObject) -> None:
    torch = pytest.importorskip("torch")
    case, arrays, params = _draw_case(data, name)
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
