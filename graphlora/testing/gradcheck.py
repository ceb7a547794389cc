"""Finite-difference gradient checking for graphlora functions.

``gradcheck(fn, *arrays)`` builds a fresh float64 Graph with the arrays as parameters, computes the
gradient of the scalar ``fn(graph, *nodes)`` with ``backward`` and compares it with central
differences. ``mode="full"`` compares every element of every gradient; ``mode="fast"`` compares
directional derivatives along random directions: two evaluations a direction, whatever the size.
On disagreement it raises ``GradcheckError`` naming the input, the element or direction, the
analytic and numeric values and the tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from graphlora.errors import GradcheckError
from graphlora.graph import Graph, NodeId

__all__ = ["gradcheck"]

Fn = Callable[..., NodeId]
"""``fn(graph, *nodes) -> NodeId`` of size 1."""

_FAST_DIRECTIONS = 3


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
        The point to check at, one array per input; upcast to float64.
    eps
        The finite-difference step.
    atol, rtol
        Absolute and relative tolerance.
    mode
        ``"full"``: every element of every gradient (``2 * size`` evaluations per input);
        ``"fast"``: the derivative along a few random directions (``uᵀ J v`` with ``u = 1`` for a
        scalar output), cheap for large inputs.
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
    if not eps > 0 or not atol >= 0 or not rtol >= 0:
        raise ValueError(
            f"gradcheck: need eps > 0, atol >= 0 and rtol >= 0, got eps={eps}, atol={atol}, "
            f"rtol={rtol}"
        )
    graph = Graph(np.float64)
    nodes = [graph.parameter(a, name=f"input {i}") for i, a in enumerate(arrays)]
    points = [np.array(graph.value(node)) for node in nodes]
    checked = _check_wrt(wrt, len(nodes))

    def evaluate(values: Sequence[np.ndarray[Any, Any]]) -> float:
        graph.reset()
        for node, value in zip(nodes, values, strict=True):
            graph.set_value(node, value)
        return float(graph.value(_call(fn, graph, nodes))[()])

    first, second = evaluate(points), evaluate(points)
    if not (first == second or (np.isnan(first) and np.isnan(second))):
        raise GradcheckError(
            f"gradcheck: fn is not deterministic: two evaluations at the same point gave {first!r} "
            f"and {second!r} (dropout or another random op without a fixed seed?)"
        )
    analytic = _analytic(fn, graph, nodes, points)
    if mode == "full":
        _check_full(evaluate, points, analytic, checked, eps, atol, rtol)
    else:
        _check_fast(evaluate, points, analytic, checked, eps, atol, rtol, seed)
    return True


def _call(fn: Fn, graph: Graph, nodes: Sequence[NodeId]) -> NodeId:
    out = fn(graph, *nodes)
    if not isinstance(out, NodeId):
        raise TypeError(f"gradcheck: fn must return a NodeId, got {type(out).__name__}")
    if out.shape != () and int(np.prod(out.shape)) != 1:
        raise ValueError(f"gradcheck: fn must return a node of size 1, got shape {out.shape}")
    return out


def _check_wrt(wrt: Sequence[int] | None, count: int) -> list[int]:
    if wrt is None:
        return list(range(count))
    indices = list(wrt)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < count]
    if bad:
        raise ValueError(f"gradcheck: wrt must hold input indices in [0, {count}), got {bad}")
    return indices


def _analytic(
    fn: Fn, graph: Graph, nodes: Sequence[NodeId], points: Sequence[np.ndarray[Any, Any]]
) -> list[np.ndarray[Any, Any]]:
    """The gradient of every input by ``backward`` (zeros where none flowed)."""
    graph.reset()
    graph.zero_grad()
    for node, value in zip(nodes, points, strict=True):
        graph.set_value(node, value)
    graph.backward(_call(fn, graph, nodes))
    grads = []
    for node, point in zip(nodes, points, strict=True):
        grad = graph.grad(node)
        grads.append(np.zeros_like(point) if grad is None else np.array(grad))
    return grads


def _check_full(
    evaluate: Callable[[Sequence[np.ndarray[Any, Any]]], float],
    points: Sequence[np.ndarray[Any, Any]],
    analytic: Sequence[np.ndarray[Any, Any]],
    checked: Sequence[int],
    eps: float,
    atol: float,
    rtol: float,
) -> None:
    for i in checked:
        numeric = np.zeros_like(points[i])
        values = list(points)
        for j in range(points[i].size):
            shifted = points[i].copy()
            shifted.flat[j] += eps
            values[i] = shifted
            f_plus = evaluate(values)
            shifted.flat[j] -= 2 * eps
            f_minus = evaluate(values)
            numeric.flat[j] = (f_plus - f_minus) / (2 * eps)
        excess = np.abs(analytic[i] - numeric) - (atol + rtol * np.abs(numeric))
        bad = ~(excess <= 0)  # NaN counts as a failure
        if bad.any():
            worst = int(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)))
            where = np.unravel_index(worst, points[i].shape)
            element = tuple(int(k) for k in where)
            raise GradcheckError(
                f"gradcheck: gradient of input {i} (shape {points[i].shape}) disagrees at "
                f"element {element}: analytic {float(analytic[i].flat[worst])!r} vs numeric "
                f"{float(numeric.flat[worst])!r}; {int(bad.sum())} of {bad.size} elements fail "
                f"|analytic - numeric| <= atol + rtol * |numeric| with atol={atol}, rtol={rtol}, "
                f"eps={eps}"
            )


def _check_fast(
    evaluate: Callable[[Sequence[np.ndarray[Any, Any]]], float],
    points: Sequence[np.ndarray[Any, Any]],
    analytic: Sequence[np.ndarray[Any, Any]],
    checked: Sequence[int],
    eps: float,
    atol: float,
    rtol: float,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    for i in checked:
        for k in range(_FAST_DIRECTIONS):
            direction = rng.standard_normal(points[i].shape)
            direction /= max(float(np.linalg.norm(direction)), 1e-300)  # a unit vector v
            values = list(points)
            values[i] = points[i] + eps * direction
            f_plus = evaluate(values)
            values[i] = points[i] - eps * direction
            f_minus = evaluate(values)
            numeric = (f_plus - f_minus) / (2 * eps)  # J v by central differences
            exact = float(np.sum(analytic[i] * direction))  # the VJP's gradient dotted with v
            if not abs(exact - numeric) <= atol + rtol * abs(numeric):
                raise GradcheckError(
                    f"gradcheck (fast): gradient of input {i} (shape {points[i].shape}) disagrees "
                    f"along random direction {k} (seed {seed}): analytic <grad, v> {exact!r} vs "
                    f"numeric (f(x + eps v) - f(x - eps v)) / 2eps {numeric!r}; "
                    f"|analytic - numeric| <= atol + rtol * |numeric| fails with atol={atol}, "
                    f"rtol={rtol}, eps={eps}"
                )
