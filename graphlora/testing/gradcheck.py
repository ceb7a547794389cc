"""Finite-difference gradient checking for graphlora functions and bare ops.

``gradcheck(fn, *arrays)`` builds a fresh float64 Graph with the arrays as parameters, computes the
gradient of the scalar ``fn(graph, *nodes)`` with ``backward`` and compares it with central
differences. ``mode="full"`` compares every element of every gradient; ``mode="fast"`` compares
directional derivatives along random directions: two evaluations a direction, whatever the size.
``check_vjp`` does the same for a bare op function ``(out, vjp)`` and also checks that its VJP
honours ``needs``. ``jacobian`` and ``numeric_jacobian`` return whole Jacobians, for teaching.
On disagreement ``GradcheckError`` names the input, the element or direction, the analytic and
numeric values and the tolerances.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora.engine.graph import Graph, NodeId
from graphlora.errors import GradcheckError
from graphlora.ops import Op, OpDef

__all__ = ["check_vjp", "gradcheck", "jacobian", "numeric_jacobian"]

Fn = Callable[..., NodeId]
"""``fn(graph, *nodes) -> NodeId``."""
Arrays = list[np.ndarray[Any, Any]]

_FAST_DIRECTIONS = 3


class _Harness:
    """``fn`` rebuilt in one float64 graph whose parameters can be set to any point."""

    def __init__(self, where: str, fn: Fn, arrays: Sequence[npt.ArrayLike]) -> None:
        if not callable(fn):
            raise TypeError(f"{where}: fn must be callable, got {type(fn).__name__}")
        self.where = where
        self.fn = fn
        self.graph = Graph(np.float64)
        for i, array in enumerate(arrays):
            if np.asarray(array).dtype == np.float32:
                warnings.warn(
                    f"{where}: input {i} is float32; it is checked in float64 (upcast), as "
                    "finite differences need the precision",
                    stacklevel=3,
                )
        self.nodes = [self.graph.parameter(a, name=f"input {i}") for i, a in enumerate(arrays)]
        self.points: Arrays = [np.array(self.graph.value(node)) for node in self.nodes]

    def _run(self, values: Sequence[np.ndarray[Any, Any]]) -> NodeId:
        graph = self.graph
        graph.reset()
        for node, value in zip(self.nodes, values, strict=True):
            graph.set_value(node, value)
        out = self.fn(graph, *self.nodes)
        if not isinstance(out, NodeId):
            raise TypeError(f"{self.where}: fn must return a NodeId, got {type(out).__name__}")
        return out

    def output(self, values: Sequence[np.ndarray[Any, Any]] | None = None) -> np.ndarray[Any, Any]:
        """``fn``'s value at ``values`` (default: the point being checked), as a new array."""
        out = self._run(self.points if values is None else values)
        return np.array(self.graph.value(out))

    def vjp(self, seed: np.ndarray[Any, Any]) -> Arrays:
        """The gradient of ``sum(fn(point) * seed)`` for every input, by ``backward``."""
        graph = self.graph
        out = self._run(self.points)
        graph.zero_grad()
        if not out.requires_grad:  # fn does not depend on its inputs
            return [np.zeros_like(point) for point in self.points]
        graph.backward(out, grad=seed)
        grads = [graph.grad(node) for node in self.nodes]
        return [
            np.zeros_like(p) if g is None else np.array(g)
            for g, p in zip(grads, self.points, strict=True)
        ]

    def shifted(self, i: int, shift: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """``fn`` with input ``i`` moved by ``shift``, the others at the point."""
        values = list(self.points)
        values[i] = self.points[i] + shift
        return self.output(values)


def _check_tolerances(where: str, eps: float, atol: float, rtol: float) -> None:
    if not eps > 0 or not atol >= 0 or not rtol >= 0:
        raise ValueError(
            f"{where}: need eps > 0, atol >= 0 and rtol >= 0, got eps={eps}, atol={atol}, "
            f"rtol={rtol}"
        )


def _check_wrt(wrt: Sequence[int] | None, count: int) -> list[int]:
    if wrt is None:
        return list(range(count))
    indices = list(wrt)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"gradcheck: wrt must hold input indices in [0, {count}), got {bad}")
    return indices


def gradcheck(
    fn: Fn,
    *arrays: npt.ArrayLike,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    mode: str = "full",
    wrt: Sequence[int] | None = None,
    seed: int = 0,
) -> bool:
    """Check the gradients of ``fn`` at ``arrays`` against central finite differences.

    An element passes when ``|analytic - numeric| <= atol + rtol * |numeric|`` (as ``np.isclose``).

    Parameters
    ----------
    fn
        ``fn(graph, *nodes)`` returning a NodeId of size 1, built only from ``graph``'s ops.
    *arrays
        The point to check at, one array per input; float32 is upcast to float64, with a warning.
    eps
        The finite-difference step.
    atol, rtol
        Absolute and relative tolerance.
    mode
        ``"full"``: every element of every gradient (``2 * size`` evaluations per input);
        ``"fast"``: the derivative along a few random unit directions ``v``, ``<grad, v>`` against
        ``(f(x + eps v) - f(x - eps v)) / 2 eps``: cheap for large inputs.
    wrt
        Indices of the inputs to check (default: all).
    seed
        Seed of the random directions in ``"fast"`` mode.

    Returns
    -------
    bool
        ``True`` when every checked gradient agrees.

    Raises
    ------
    GradcheckError
        On disagreement, or when ``fn`` is not deterministic (two evaluations at the same point
        differ, e.g. dropout without a fixed seed).
    TypeError, ValueError
        For an ``fn`` that does not return a size-1 NodeId of its graph, or bad arguments.
    """
    if mode not in ("full", "fast"):
        raise ValueError(f"gradcheck: mode must be 'full' or 'fast', got {mode!r}")
    _check_tolerances("gradcheck", eps, atol, rtol)
    harness = _Harness("gradcheck", fn, arrays)
    checked = _check_wrt(wrt, len(arrays))
    first = harness.output()
    if first.size != 1:
        raise ValueError(f"gradcheck: fn must return a node of size 1, got shape {first.shape}")
    second = harness.output()
    if not np.array_equal(first, second, equal_nan=True):
        raise GradcheckError(
            f"gradcheck: fn is not deterministic: two evaluations at the same point gave "
            f"{float(first.flat[0])!r} and {float(second.flat[0])!r} (dropout or another random "
            "op without a fixed seed?)"
        )
    analytic = harness.vjp(np.ones(first.shape))
    if mode == "full":
        for i in checked:
            numeric = _numeric_gradient(harness, i, np.ones(first.shape), eps)
            _compare_elements("gradcheck", i, analytic[i], numeric, eps, atol, rtol)
    else:
        _compare_directions(harness, analytic, checked, eps, atol, rtol, seed)
    return True


def _numeric_gradient(
    harness: _Harness, i: int, seed: np.ndarray[Any, Any], eps: float
) -> np.ndarray[Any, Any]:
    """d sum(fn * seed) / d input ``i`` by central differences, one element at a time."""
    point = harness.points[i]
    numeric = np.zeros_like(point)
    step = np.zeros_like(point)
    for j in range(point.size):
        step.flat[j] = eps
        f_plus = np.sum(harness.shifted(i, step) * seed)
        f_minus = np.sum(harness.shifted(i, -step) * seed)
        step.flat[j] = 0.0
        numeric.flat[j] = (f_plus - f_minus) / (2 * eps)
    return numeric


def _compare_elements(
    where: str,
    i: int,
    analytic: np.ndarray[Any, Any],
    numeric: np.ndarray[Any, Any],
    eps: float,
    atol: float,
    rtol: float,
) -> None:
    excess = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
    bad = ~(excess <= 0)  # NaN counts as a failure
    if not bad.any():
        return
    worst = int(np.argmax(np.where(np.isnan(excess), np.inf, excess)))
    element = tuple(int(k) for k in np.unravel_index(worst, analytic.shape))
    raise GradcheckError(
        f"{where}: gradient of input {i} (shape {analytic.shape}) disagrees at element "
        f"{element}: analytic {float(analytic.flat[worst])!r} vs numeric "
        f"{float(numeric.flat[worst])!r}; {int(bad.sum())} of {bad.size} elements fail "
        f"|analytic - numeric| <= atol + rtol * |numeric| with atol={atol}, rtol={rtol}, eps={eps}"
    )


def _compare_directions(
    harness: _Harness,
    analytic: Arrays,
    checked: Sequence[int],
    eps: float,
    atol: float,
    rtol: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    for i in checked:
        point = harness.points[i]
        for k in range(_FAST_DIRECTIONS):
            gaussian = np.asarray(rng.standard_normal(point.shape))
            direction = gaussian / max(float(np.linalg.norm(gaussian)), 1e-300)  # unit v
            f_plus = float(np.sum(harness.shifted(i, eps * direction)))
            f_minus = float(np.sum(harness.shifted(i, -eps * direction)))
            numeric = (f_plus - f_minus) / (2 * eps)  # J v by central differences
            exact = float(np.sum(analytic[i] * direction))  # vᵀ (the VJP's gradient)
            if not abs(exact - numeric) <= atol + rtol * abs(numeric):
                raise GradcheckError(
                    f"gradcheck (fast): gradient of input {i} (shape {point.shape}) disagrees "
                    f"along random direction {k} (seed {seed}): analytic <grad, v> {exact!r} vs "
                    f"numeric (f(x + eps v) - f(x - eps v)) / 2eps {numeric!r}; "
                    f"|analytic - numeric| <= atol + rtol * |numeric| fails with atol={atol}, "
                    f"rtol={rtol}, eps={eps}"
                )


def check_vjp(
    op: Op | OpDef,
    *arrays: npt.ArrayLike | None,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    mode: str = "full",
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> bool:
    """Check a bare op ``op(*arrays, **kwargs) -> (out, vjp)`` without writing a graph.

    The op's keyword parameters come as ``**kwargs``, or in ``params`` (a mapping) when their
    names are check_vjp's own (a layer norm's ``eps``, say).

    Draws a random cotangent ``u`` of the output's shape and runs ``gradcheck`` on
    ``sum(op(*arrays) * u)``, so every output element counts. Then checks the VJP's contract:
    it returns one entry per input, each ``None`` or of that input's shape; asked for one input
    at a time (``needs`` with a single True), it returns ``None`` for the others (no wasted work)
    and the same gradient as when asked for all. For an ``OpDef`` (``ops.op``), its integer/bool
    data inputs (labels, masks) and optional inputs given as ``None`` are passed as they are and
    must get no gradient; every other input is checked in float64.

    Raises
    ------
    GradcheckError
        On a wrong gradient or a broken contract.
    """
    if not callable(op):
        raise TypeError(f"check_vjp: op must be callable, got {type(op).__name__}")
    kwargs = {**kwargs, **(params or {})}
    name = getattr(op, "__name__", type(op).__name__)
    data = set(op.data_slots) if isinstance(op, OpDef) else set()
    checked = [i for i, a in enumerate(arrays) if a is not None and i not in data]
    points: list[Any] = [
        np.array(a, dtype=np.float64) if i in checked else a for i, a in enumerate(arrays)
    ]
    out, _ = op(*points, **kwargs)
    cotangent = np.random.default_rng(seed).standard_normal(np.shape(out))

    def fn(g: Graph, *nodes: NodeId) -> NodeId:
        inputs = list(points)
        for i, node in zip(checked, nodes, strict=True):
            inputs[i] = node
        return g.sum(g.mul(g.apply(op, *inputs, **kwargs), g.constant(cotangent)))

    gradcheck(
        fn, *(points[i] for i in checked), eps=eps, atol=atol, rtol=rtol, mode=mode, seed=seed
    )
    count = len(points)
    _, vjp = op(*points, **kwargs)
    all_grads = vjp(cotangent, tuple(i in checked for i in range(count)))
    if not isinstance(all_grads, tuple) or len(all_grads) != count:
        raise GradcheckError(
            f"check_vjp: {name}'s VJP must return a tuple of {count} gradients, got "
            f"{all_grads!r:.80}"
        )
    for i in checked:
        needs = tuple(j == i for j in range(count))
        grads = vjp(cotangent, needs)
        for j, grad in enumerate(grads):
            if j != i and grad is not None:
                raise GradcheckError(
                    f"check_vjp: {name}'s VJP computed a gradient for input {j} although "
                    f"needs={needs} asked only for input {i}: wasted work"
                )
        alone, full = grads[i], all_grads[i]
        if alone is None or full is None or np.shape(alone) != points[i].shape:
            shape = None if alone is None else np.shape(alone)
            raise GradcheckError(
                f"check_vjp: {name}'s VJP gave {shape} for input {i} of shape "
                f"{points[i].shape} (needs={needs})"
            )
        if not np.allclose(alone, full, rtol=1e-12, atol=0.0):
            raise GradcheckError(
                f"check_vjp: {name}'s gradient of input {i} changes with needs: asked alone it "
                "differs from asked with all inputs"
            )
    return True


def jacobian(fn: Fn, *arrays: npt.ArrayLike) -> Arrays:
    """The Jacobian of ``fn`` with respect to each input, by ``backward``: one pass per output.

    Returns one ``[out.size, input.size]`` matrix per input, in C order.
    """
    harness = _Harness("jacobian", fn, arrays)
    out = harness.output()
    rows: list[Arrays] = []
    for k in range(out.size):
        seed = np.zeros(out.shape)
        seed.flat[k] = 1.0
        rows.append([grad.ravel() for grad in harness.vjp(seed)])
    return [
        np.array([row[i] for row in rows]).reshape(out.size, p.size)
        for i, p in enumerate(harness.points)
    ]


def numeric_jacobian(fn: Fn, *arrays: npt.ArrayLike, eps: float = 1e-6) -> Arrays:
    """The Jacobian of ``fn`` with respect to each input, by central differences.

    Returns one ``[out.size, input.size]`` matrix per input, in C order.
    """
    _check_tolerances("numeric_jacobian", eps, 0.0, 0.0)
    harness = _Harness("numeric_jacobian", fn, arrays)
    out_size = harness.output().size
    result = []
    for i, point in enumerate(harness.points):
        jac = np.zeros((out_size, point.size))
        step = np.zeros_like(point)
        for j in range(point.size):
            step.flat[j] = eps
            plus, minus = harness.shifted(i, step), harness.shifted(i, -step)
            step.flat[j] = 0.0
            jac[:, j] = ((plus - minus) / (2 * eps)).ravel()
        result.append(jac)
    return result
