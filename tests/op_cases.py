"""The op catalogue as test cases: how to draw inputs for each op, call it, and compute it
independently in NumPy. Shared by the op tests and the gradcheck mutation test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special
from hypothesis import strategies as st

import graphlora as gl
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


def _draw_lora_linear(d: st.DrawFn) -> tuple[Arrays, Params]:
    batch = d(st.sampled_from([(), (3,), (2, 2)]))
    n_in, n_out, rank = d(st.integers(1, 4)), d(st.integers(1, 4)), d(st.integers(1, 3))
    shapes = [(*batch, n_in), (n_in, n_out), (n_in, rank), (rank, n_out)]
    if d(st.booleans()):
        shapes.append((n_out,))
    arrays = tuple(d(gst.arrays(shape)) for shape in shapes)
    params: Params = {"scaling": d(st.sampled_from([0.5, 2.0]))}
    if d(st.booleans()):
        keep = np.array(
            d(st.lists(st.booleans(), min_size=arrays[0].size, max_size=arrays[0].size))
        )
        params["mask"] = keep.reshape(arrays[0].shape) * 2.0  # inverted dropout with p = 0.5
    return arrays, params


def _lora_linear_ref(
    x: np.ndarray,
    w: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    bias: np.ndarray | None = None,
    scaling: float = 1.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    xd = x if mask is None else x * mask
    out = x @ w + ((xd @ a) * scaling) @ b
    return out if bias is None else out + bias


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
    "lora_linear": Case(
        _draw_lora_linear,
        lambda g, *nodes, **k: g.lora_linear(*nodes, **k),
        _lora_linear_ref,
    ),
    "dropout": Case(
        _draw_dropout,
        lambda g, x, p, rng: g.dropout(x, p, rng=rng),
        _dropout_ref,
        smooth=False,
    ),
}


def draw_case(data: st.DataObject, name: str) -> tuple[Case, Arrays, Params]:
    case = CASES[name]
    arrays, params = data.draw(st.composite(lambda d: case.draw(d))())
    return case, arrays, params
